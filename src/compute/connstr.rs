//! libpq connection strings (URIs and `key=value` forms) as zenith hands them on: the
//! password taken out, to travel through `PGPASSWORD` instead of a command line other
//! local users can read, and replaced by `***` in every message.

/// A libpq URI or key=value string without its password, and the password: programs get
/// it through `PGPASSWORD`, never on a command line other users can read.
pub fn split_password(connstr: &str) -> (String, Option<String>) {
    if let Some((scheme, rest)) = connstr.split_once("://") {
        let (mut rest, mut password) = (rest.to_string(), None);
        if let Some((userinfo, host)) = rest.split_once('@') {
            if let Some((user, pw)) = userinfo.split_once(':') {
                password = Some(percent_decode(pw));
                rest = format!("{user}@{host}");
            }
        }
        if let Some((base, query)) = rest.split_once('?') {
            let mut kept = Vec::new();
            for pair in query.split('&') {
                match pair.strip_prefix("password=") {
                    Some(pw) => password = Some(percent_decode(pw)),
                    None => kept.push(pair),
                }
            }
            rest = if kept.is_empty() {
                base.to_string()
            } else {
                format!("{base}?{}", kept.join("&"))
            };
        }
        return (format!("{scheme}://{rest}"), password);
    }
    let mut password = None;
    let kept: Vec<&str> = connstr
        .split_whitespace()
        .filter(|kv| match kv.strip_prefix("password=") {
            Some(pw) if !pw.starts_with('\'') => {
                password = Some(pw.to_string());
                false
            }
            _ => true,
        })
        .collect();
    (kept.join(" "), password)
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
            if let Some(b) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A libpq URI or key=value string with its password replaced, for messages.
pub fn redact_password(connstr: &str) -> String {
    if let Some((scheme, rest)) = connstr.split_once("://") {
        if let Some((userinfo, host)) = rest.split_once('@') {
            if let Some((user, _)) = userinfo.split_once(':') {
                return format!("{scheme}://{user}:***@{host}");
            }
        }
        return connstr.to_string();
    }
    connstr
        .split_whitespace()
        .map(|kv| {
            if kv.starts_with("password=") {
                "password=***"
            } else {
                kv
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_leave_connection_strings_for_the_environment() {
        assert_eq!(
            split_password("postgres://u:s%40cret@h:5432/db?sslmode=disable"),
            (
                "postgres://u@h:5432/db?sslmode=disable".into(),
                Some("s@cret".into())
            )
        );
        assert_eq!(
            split_password("postgresql://u@h/db?password=pw&application_name=x"),
            (
                "postgresql://u@h/db?application_name=x".into(),
                Some("pw".into())
            )
        );
        assert_eq!(
            split_password("host=h password=pw user=u"),
            ("host=h user=u".into(), Some("pw".into()))
        );
        assert_eq!(
            split_password("host=/tmp port=5"),
            ("host=/tmp port=5".into(), None)
        );
    }

    #[test]
    fn passwords_never_reach_messages() {
        assert_eq!(
            redact_password("postgres://u:s3cret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(
            redact_password("postgresql://u@h/db"),
            "postgresql://u@h/db"
        );
        assert_eq!(
            redact_password("host=h password=s3cret user=u"),
            "host=h password=*** user=u"
        );
    }
}
