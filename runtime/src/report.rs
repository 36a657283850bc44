//! Error chains as one line for people: the message of each cause, without the repeats.
//!
//! Library errors here carry their cause both ways: as text in their own message (so a log
//! line of the error alone says what went wrong) and as `source()` (so callers can match on
//! it). anyhow's `{:#}` prints every message of the chain, so the same cause would appear two
//! or three times; [`chain`] drops a cause whose text already ends the line.

/// `e` and its causes, outermost first, joined with `: `, each cause's text at most once.
pub fn chain(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if text.is_empty() || line.ends_with(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("layer L: {source}")]
    struct Wrapper {
        source: std::io::Error,
    }

    #[test]
    fn causes_already_in_the_message_are_not_repeated() {
        let io = std::io::Error::other("disk on fire");
        let e = anyhow::Error::new(Wrapper { source: io }).context("opening layer L");
        assert_eq!(chain(&e), "opening layer L: layer L: disk on fire");
        // What anyhow's alternate form prints instead.
        let alternate = format!("{e:#}");
        assert_eq!(alternate.matches("disk on fire").count(), 2, "{alternate}");
        // Causes that add something are kept, in order, even when their text appears earlier.
        let e = anyhow::anyhow!("timed out").context("reading: timed out twice");
        assert_eq!(chain(&e), "reading: timed out twice: timed out");
        // Causes that add something are kept, in order.
        let e = anyhow::anyhow!("inner").context("middle").context("outer");
        assert_eq!(chain(&e), "outer: middle: inner");
    }
}
