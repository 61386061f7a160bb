//! Free TCP ports on 127.0.0.1, for servers zenith starts.

/// The first port from `first` on that nothing listens on at 127.0.0.1.
pub fn free_port(first: u16) -> Result<u16, String> {
    free_port_except(first, &[])
}

/// The first port from `first` on that nothing listens on at 127.0.0.1 and that is not in
/// `promised` (ports of stopped servers that will want theirs back).
pub fn free_port_except(first: u16, promised: &[u16]) -> Result<u16, String> {
    (first..=u16::MAX)
        .take(1000)
        .find(|p| !promised.contains(p) && std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .ok_or_else(|| {
            format!("no free port among the 1000 from {first}; set pg_port in config.toml")
        })
}
