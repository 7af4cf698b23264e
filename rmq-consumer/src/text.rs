//! Untrusted text made safe to print: message content (bodies, header values, queue names
//! from headers, error texts quoting them) must not move the cursor, recolour the terminal,
//! forge a log line or hide what follows.
//!
//! [`printable`] escapes every control character — C0 (including ESC, CR, LF and TAB), DEL
//! and C1 — as `\n`, `\r`, `\t` or `\u{..}`, the way Rust's `{:?}` does inside quotes (so a
//! value already formatted with `{:?}` is left as it is). [`json_safe`] escapes, in encoded JSON, the control
//! characters a JSON encoder leaves raw (DEL and C1: it escapes only C0).
//!
//! ```
//! use rmq_consumer::text::printable;
//! assert_eq!(printable("ok\n\u{1b}[2Jfake"), "ok\\n\\u{1b}[2Jfake");
//! assert_eq!(printable("plain text"), "plain text");
//! ```

use std::borrow::Cow;

/// Cuts `text` to at most `max` bytes on a character boundary.
pub(crate) fn truncate(text: &str, max: usize) -> &str {
    let mut end = max.min(text.len());
    while !text.is_char_boundary(end) {
        end = end.saturating_sub(1);
    }
    text.get(..end).unwrap_or_default()
}

/// Whether `c` is a control character a terminal or a line-oriented log may act on: C0, DEL
/// or C1.
#[must_use]
pub fn is_control(c: char) -> bool {
    c.is_control()
}

/// `text` with every control character escaped (`\n`, `\r`, `\t`, `\u{1b}`, ...); borrowed
/// when there is nothing to escape.
#[must_use]
pub fn printable(text: &str) -> Cow<'_, str> {
    if !text.chars().any(is_control) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        push_escaped(&mut out, c);
    }
    Cow::Owned(out)
}

/// An encoded JSON text with DEL and C1 control characters written as `\u00XX` escapes: JSON
/// encoders escape only C0, and leave those raw inside strings, where a terminal still acts on
/// them. The JSON stays valid and decodes to the same values.
#[must_use]
pub fn json_safe(json: &str) -> Cow<'_, str> {
    if !json.chars().any(needs_json_escape) {
        return Cow::Borrowed(json);
    }
    let mut out = String::with_capacity(json.len() + 8);
    for c in json.chars() {
        if needs_json_escape(c) {
            use std::fmt::Write as _;
            let _ = write!(out, "\\u{:04x}", u32::from(c));
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// DEL and C1: control characters a JSON encoder leaves raw.
fn needs_json_escape(c: char) -> bool {
    is_control(c) && !matches!(c, '\0'..='\u{1f}')
}

fn push_escaped(out: &mut String, c: char) {
    use std::fmt::Write as _;
    match c {
        '\n' => out.push_str("\\n"),
        '\r' => out.push_str("\\r"),
        '\t' => out.push_str("\\t"),
        c if is_control(c) => {
            let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
        }
        c => out.push(c),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(printable("a\nb\rc\td"), "a\\nb\\rc\\td");
        assert_eq!(printable("\u{1b}[31mred"), "\\u{1b}[31mred");
        assert_eq!(printable("del\u{7f}"), "del\\u{7f}");
        assert_eq!(printable("c1\u{9b}2J"), "c1\\u{9b}2J");
        assert_eq!(printable("nul\0"), "nul\\u{0}");
        assert_eq!(printable("back\\slash"), "back\\slash");
        assert_eq!(printable("héllo ✓"), "héllo ✓");
        assert!(matches!(printable("clean"), Cow::Borrowed(_)));
    }

    #[test]
    fn json_safe_escapes_what_json_leaves_raw() {
        let encoded = serde_json::to_string("x\u{1b}\u{7f}\u{9b}\n").unwrap_or_default();
        let safe = json_safe(&encoded);
        assert_eq!(safe, r#""x\u001b\u007f\u009b\n""#);
        assert!(!safe.chars().any(char::is_control), "{safe}");
        let back: String = serde_json::from_str(&safe).unwrap_or_default();
        assert_eq!(back, "x\u{1b}\u{7f}\u{9b}\n");
        assert!(matches!(json_safe("\"plain\""), Cow::Borrowed(_)));
    }
}
