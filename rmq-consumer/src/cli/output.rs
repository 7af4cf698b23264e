//! How commands write: every line of text goes through [`crate::text::printable`] and every
//! JSON document through [`crate::text::json_safe`], so that queue names, header values,
//! bodies and broker messages quoting them cannot drive the operator's terminal (escape
//! sequences), forge lines (CR, LF) or hide output.

use std::io::Write;

use serde::Serialize;

use crate::text::{json_safe, printable};

/// Writes one line, formatted like `writeln!`, with its control characters escaped.
/// `say!(out)` writes an empty line.
macro_rules! say {
    ($out:expr) => {
        writeln!($out)
    };
    ($out:expr, $($arg:tt)*) => {
        $crate::cli::output::line(&mut *$out, &format!($($arg)*))
    };
}
pub(crate) use say;

/// Writes `text` and a newline, its control characters escaped.
pub(crate) fn line(out: &mut dyn Write, text: &str) -> std::io::Result<()> {
    writeln!(out, "{}", printable(text))
}

/// Writes `value` as pretty JSON and a newline, DEL and C1 characters escaped.
pub(crate) fn json(out: &mut dyn Write, value: &impl Serialize) -> Result<(), super::CliError> {
    let text = serde_json::to_string_pretty(value)?;
    writeln!(out, "{}", json_safe(&text))?;
    Ok(())
}

/// Writes `value` as one line of JSON, DEL and C1 characters escaped.
pub(crate) fn json_line(
    out: &mut dyn Write,
    value: &impl Serialize,
) -> Result<(), super::CliError> {
    let text = serde_json::to_string(value)?;
    writeln!(out, "{}", json_safe(&text))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_and_json_are_escaped() {
        let mut out = Vec::new();
        let name = "q\n\u{1b}[2Jfake";
        let result = say!(&mut out, "queue `{name}`");
        assert!(result.is_ok());
        assert!(json(&mut out, &serde_json::json!({"n": "a\u{9b}b"})).is_ok());
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("queue `q\\n\\u{1b}[2Jfake`\n"), "{text}");
        assert!(text.contains(r#""n": "a\u009bb""#), "{text}");
        assert!(!text.chars().any(|c| c.is_control() && c != '\n'), "{text}");
    }
}
