//! Messages for people: an error and its causes as one line, each said once, and text
//! from untrusted sources (names in a pulled snapshot) made safe to print.

/// `e` and its causes, joined by ": ". A cause whose text the message already carries
/// (an error that prints its source as part of itself) is not repeated.
pub fn full(e: &(dyn std::error::Error + 'static)) -> String {
    let mut message = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        cause = c.source();
    }
    message
}

/// `text` with control characters (newlines, terminal escapes) escaped, so that text from
/// a storage can neither spoof lines of a listing nor drive the terminal.
pub fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    if text.chars().any(char::is_control) {
        text.escape_debug().to_string().into()
    } else {
        text.into()
    }
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
        assert_eq!(full(e.as_ref()), "f: cannot write: disk full");
        let e = e.context("checkout failed");
        assert_eq!(
            full(e.as_ref()),
            "checkout failed: f: cannot write: disk full"
        );
    }

    #[test]
    fn untrusted_text_prints_on_one_line_without_escapes() {
        assert_eq!(printable("main@before"), "main@before");
        assert_eq!(printable("a\nb\u{1b}[2J"), "a\\nb\\u{1b}[2J");
    }
}
