//! Errors as one message: an error and its causes, each said once.

/// `e` and its causes, joined by ": ". A cause whose text the message already carries
/// (an error that prints its source as part of itself) is not repeated.
pub fn full(e: &anyhow::Error) -> String {
    let mut message = e.to_string();
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("{path}: cannot write: {source}")]
    struct Write {
        path: String,
        source: std::io::Error,
    }

    #[test]
    fn a_cause_already_said_is_not_repeated() {
        let io = std::io::Error::new(std::io::ErrorKind::StorageFull, "disk full");
        let e = anyhow::Error::from(Write {
            path: "f".into(),
            source: io,
        });
        assert_eq!(full(&e), "f: cannot write: disk full");
        let e = e.context("checkout failed");
        assert_eq!(full(&e), "checkout failed: f: cannot write: disk full");
    }
}
