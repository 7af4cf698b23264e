//! Task uuids compatible with the Python template.
//!
//! The Python template's example `_generate_task_uuid` is
//!
//! ```python
//! hashlib.md5(json.dumps(data, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
//! ```
//!
//! [`canonical_json`] reproduces the exact text of that `json.dumps` call and [`md5_json`] its
//! md5, so a Rust worker computes the same task id as an old Python worker for the same message
//! (which matters for the result cache and for anyone correlating ids across both).
//!
//! ```
//! use rmq_consumer::uuid::{canonical_json, md5_json};
//!
//! let data = serde_json::json!({"b": [1, 2.5, "é"], "a": null});
//! assert_eq!(canonical_json(&data), r#"{"a": null, "b": [1, 2.5, "é"]}"#);
//! assert_eq!(md5_json(&data).len(), 32);
//! ```

use std::fmt::Write as _;

use md5::{Digest as _, Md5};
use serde_json::{Number, Value};

/// The lowercase hex md5 of [`canonical_json`]`(value)` encoded as UTF-8.
///
/// Equal to Python's
/// `hashlib.md5(json.dumps(value, sort_keys=True, ensure_ascii=False).encode()).hexdigest()`
/// for the same JSON document; see [`canonical_json`] for how numbers are treated.
#[must_use]
pub fn md5_json(value: &Value) -> String {
    md5_hex(canonical_json(value).as_bytes())
}

/// Lowercase hex md5 of `bytes`.
fn md5_hex(bytes: &[u8]) -> String {
    let digest = Md5::digest(bytes);
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut hex = String::with_capacity(32);
    for byte in digest {
        hex.push(char::from(HEX[usize::from(byte >> 4)]));
        hex.push(char::from(HEX[usize::from(byte & 0x0f)]));
    }
    hex
}

/// The text Python's `json.dumps(value, sort_keys=True, ensure_ascii=False)` produces.
///
/// - Separators are `", "` and `": "`; object keys are sorted by code point (Python's `str`
///   order, which is also the UTF-8 byte order Rust's `str` comparison uses).
/// - Strings escape `"`, `\`, `\n`, `\r`, `\t`, `\b`, `\f`, and other control characters below
///   U+0020 as `\u00xx` (lowercase hex); everything else, including DEL, U+2028 and all
///   non-ASCII text, is written literally.
/// - Integers are written in decimal.
/// - Floats follow Python's `float.__repr__`: the shortest digits that round-trip, with `.0`
///   on integral values (`1.0`, `100.0`), and scientific notation when the decimal exponent is
///   below -4 or at least 16 (`1e-05`, `1.5e-07`, `1e+16`).
///
/// # Numbers and `serde_json`
///
/// The hash is of the parsed [`Value`], so it depends on what `serde_json` kept:
/// - `1.0` in the message stays an `f64` and is written `1.0`, and `1` stays an integer and is
///   written `1`, exactly as Python keeps `float` and `int` apart.
/// - Floats are re-formatted, not copied: `1e5`, `100000.0` and `1.0E5` all become
///   `100000.0`, as they do in Python.
/// - Integers outside the `i64`/`u64` range are parsed by `serde_json` as `f64` (unless its
///   `arbitrary_precision` feature is enabled, in which case their digits are kept and written
///   verbatim); Python keeps them as exact `int`s, so such messages hash differently.
/// - `serde_json` cannot hold NaN or infinities; Python's `NaN`/`Infinity` spellings are used
///   should one ever appear.
#[must_use]
pub fn canonical_json(value: &Value) -> String {
    let mut out = String::new();
    write_value(&mut out, value);
    out
}

/// [`canonical_json`] of a body, computed from its bytes without building a [`Value`]: the
/// same text (and so the same [`md5_json`]) for every body that parses, with memory about the
/// size of the body (a `Value` can take 100 times that; see `max_in_flight_bytes`).
///
/// # Errors
/// The body is not one JSON document.
///
/// ```
/// use rmq_consumer::uuid::{canonical_json, canonical_json_from_slice};
///
/// let body = r#"{"b": [1, 2.5], "a": {"y": null, "x": "é"}, "b": true}"#.as_bytes();
/// let value: serde_json::Value = serde_json::from_slice(body).unwrap();
/// assert_eq!(canonical_json_from_slice(body).unwrap(), canonical_json(&value));
/// ```
pub fn canonical_json_from_slice(body: &[u8]) -> Result<String, serde_json::Error> {
    use serde::de::DeserializeSeed as _;
    let mut out = String::with_capacity(body.len().saturating_add(body.len() / 4));
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    Canonical(&mut out).deserialize(&mut deserializer)?;
    deserializer.end()?;
    Ok(out)
}

/// The md5 of [`canonical_json_from_slice`]: [`md5_json`] of the parsed body, without parsing
/// it into a [`Value`].
///
/// # Errors
/// The body is not one JSON document.
pub fn md5_json_slice(body: &[u8]) -> Result<String, serde_json::Error> {
    canonical_json_from_slice(body).map(|text| md5_hex(text.as_bytes()))
}

/// Writes the canonical text of the value being deserialized, as [`write_value`] does for a
/// parsed one (objects: keys sorted, the last of duplicate keys kept, as a parse keeps it).
struct Canonical<'a>(&'a mut String);

impl<'de> serde::de::DeserializeSeed<'de> for Canonical<'_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Canonical<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        self.0.push_str("null");
        Ok(())
    }

    fn visit_bool<E>(self, value: bool) -> Result<(), E> {
        self.0.push_str(if value { "true" } else { "false" });
        Ok(())
    }

    fn visit_u64<E>(self, value: u64) -> Result<(), E> {
        write_number(self.0, &Number::from(value));
        Ok(())
    }

    fn visit_i64<E>(self, value: i64) -> Result<(), E> {
        write_number(self.0, &Number::from(value));
        Ok(())
    }

    fn visit_f64<E>(self, value: f64) -> Result<(), E> {
        write_float(self.0, value);
        Ok(())
    }

    fn visit_str<E>(self, value: &str) -> Result<(), E> {
        write_string(self.0, value);
        Ok(())
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut items: A) -> Result<(), A::Error> {
        self.0.push('[');
        let mut first = true;
        loop {
            let mark = self.0.len();
            if !first {
                self.0.push_str(", ");
            }
            if items.next_element_seed(Canonical(&mut *self.0))?.is_none() {
                self.0.truncate(mark);
                break;
            }
            first = false;
        }
        self.0.push(']');
        Ok(())
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut entries: Vec<(String, String)> = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            let mut text = String::new();
            map.next_value_seed(Canonical(&mut text))?;
            entries.push((key, text));
        }
        // Stable: among equal keys the last written stays last, and is the one kept.
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        self.0.push('{');
        let mut first = true;
        let mut rest = entries.iter().peekable();
        while let Some((key, text)) = rest.next() {
            if rest.peek().is_some_and(|next| next.0 == *key) {
                continue;
            }
            if !first {
                self.0.push_str(", ");
            }
            first = false;
            write_string(self.0, key);
            self.0.push_str(": ");
            self.0.push_str(text);
        }
        self.0.push('}');
        Ok(())
    }
}

fn write_value(out: &mut String, value: &Value) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(true) => out.push_str("true"),
        Value::Bool(false) => out.push_str("false"),
        Value::Number(number) => write_number(out, number),
        Value::String(text) => write_string(out, text),
        Value::Array(items) => {
            out.push('[');
            for (index, item) in items.iter().enumerate() {
                if index > 0 {
                    out.push_str(", ");
                }
                write_value(out, item);
            }
            out.push(']');
        }
        Value::Object(map) => {
            // Sort explicitly: with serde_json's `preserve_order` feature the map keeps
            // insertion order.
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (index, (key, item)) in entries.into_iter().enumerate() {
                if index > 0 {
                    out.push_str(", ");
                }
                write_string(out, key);
                out.push_str(": ");
                write_value(out, item);
            }
            out.push('}');
        }
    }
}

fn write_number(out: &mut String, number: &Number) {
    if let Some(n) = number.as_u64() {
        let _ = write!(out, "{n}");
    } else if let Some(n) = number.as_i64() {
        let _ = write!(out, "{n}");
    } else {
        // With `arbitrary_precision`, integers beyond 64 bits keep their digits.
        let text = number.to_string();
        let digits = text.strip_prefix('-').unwrap_or(&text);
        if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
            out.push_str(&text);
        } else if let Some(float) = number.as_f64() {
            write_float(out, float);
        } else {
            out.push_str(&text);
        }
    }
}

/// Python's `float.__repr__`, built on Rust's shortest round-trip digits.
fn write_float(out: &mut String, value: f64) {
    if value.is_nan() {
        out.push_str("NaN");
        return;
    }
    if value.is_infinite() {
        out.push_str(if value > 0.0 { "Infinity" } else { "-Infinity" });
        return;
    }
    if value.is_sign_negative() {
        out.push('-');
    }
    let scientific = python_digits(value.abs());
    let (mantissa, exponent) = scientific
        .split_once('e')
        .unwrap_or((scientific.as_str(), "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    let (first, rest) = digits.split_at(1.min(digits.len()));

    if !(-4..16).contains(&exponent) {
        out.push_str(first);
        if !rest.is_empty() {
            out.push('.');
            out.push_str(rest);
        }
        let sign = if exponent < 0 { '-' } else { '+' };
        let _ = write!(out, "e{sign}{:02}", exponent.unsigned_abs());
    } else if exponent >= 0 {
        let int_len = usize::try_from(exponent).unwrap_or(0) + 1;
        if digits.len() <= int_len {
            out.push_str(&digits);
            out.extend(std::iter::repeat_n('0', int_len - digits.len()));
            out.push_str(".0");
        } else {
            let (int_part, frac_part) = digits.split_at(int_len);
            out.push_str(int_part);
            out.push('.');
            out.push_str(frac_part);
        }
    } else {
        let zeros = usize::try_from(-exponent - 1).unwrap_or(0);
        out.push_str("0.");
        out.extend(std::iter::repeat_n('0', zeros));
        out.push_str(&digits);
    }
}

/// The shortest round-trip digits of a finite `value >= 0` in Rust's `{:e}` form ("1.2345e16",
/// "5e-324", "0e0"), with Python's choice among equally short candidates.
///
/// Rust's shortest mode and Python's `repr` agree on the number of digits but not always on the
/// last one: when the value lies exactly halfway between two shortest candidates Rust rounds up
/// and Python rounds to even (e.g. `1059438285926254.25` is `...254.3` in Rust, `...254.2` in
/// Python). Python picks the round-tripping candidate nearest the exact value, ties to even;
/// correctly rounding to the same number of digits (which Rust's precision formatting does,
/// ties to even) gives that candidate whenever it round-trips.
fn python_digits(value: f64) -> String {
    let shortest = format!("{value:e}");
    let significant = shortest
        .split_once('e')
        .map_or(shortest.as_str(), |(mantissa, _)| mantissa)
        .bytes()
        .filter(u8::is_ascii_digit)
        .count();
    let nearest = format!("{value:.*e}", significant.saturating_sub(1));
    if nearest != shortest && nearest.parse::<f64>() == Ok(value) {
        nearest
    } else {
        shortest
    }
}

fn write_string(out: &mut String, text: &str) {
    out.push('"');
    // Everything that needs escaping is ASCII: copy the runs between such bytes as they are.
    let mut start = 0;
    for (index, byte) in text.bytes().enumerate() {
        let escaped = match byte {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x08 => "\\b",
            0x0c => "\\f",
            0x00..=0x1f => "",
            _ => continue,
        };
        out.push_str(&text[start..index]);
        if escaped.is_empty() {
            // Writing to a String cannot fail.
            let _ = write!(out, "\\u{byte:04x}");
        } else {
            out.push_str(escaped);
        }
        start = index + 1;
    }
    out.push_str(&text[start..]);
    out.push('"');
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use serde_json::json;

    use super::*;

    /// Expected text and md5 were produced with Python 3.11:
    /// `s = json.dumps(d, sort_keys=True, ensure_ascii=False); hashlib.md5(s.encode()).hexdigest()`.
    fn check(value: &Value, text: &str, md5: &str) {
        assert_eq!(canonical_json(value), text);
        assert_eq!(md5_json(value), md5);
        let body = serde_json::to_vec(value).unwrap();
        assert_eq!(canonical_json_from_slice(&body).unwrap(), text);
        assert_eq!(md5_json_slice(&body).unwrap(), md5);
    }

    #[test]
    fn from_bytes_equals_from_a_parsed_value() {
        let bodies = [
            r#"{"b": [1, 2.5, "\u00e9"], "a": null}"#,
            r#"{"k": 1, "k": 2, "a": {"z": [], "y": {}}, "k": 3}"#,
            r#"[1e5, 100000.0, 1.0E5, -0, -0.0, 0.1, 1e-7, 1e16, 18446744073709551615]"#,
            r#"[-9223372036854775808, 18446744073709551616, 1.7976931348623157e308]"#,
            r#"  "tab\tnew\nline \"quote\" \\ \u0001 \u2028 \ud83d\ude00"  "#,
            r#"{"\u00e9": 1, "e": 2, "E": 3, "": 4, "\u0000": 5}"#,
            "true",
            "[[[[]]], {}, [{}], {\"a\": [null, false]}]",
        ];
        for body in bodies {
            let value: Value = serde_json::from_str(body).unwrap();
            assert_eq!(
                canonical_json_from_slice(body.as_bytes()).unwrap(),
                canonical_json(&value),
                "{body}"
            );
        }
        for bad in ["", "{", "[1,]", "{} {}", "{\"a\" 1}", "\"\\x\""] {
            assert!(canonical_json_from_slice(bad.as_bytes()).is_err(), "{bad}");
        }
    }

    #[test]
    fn nested_objects_sorted() {
        let value = json!({"b": {"z": 1, "a": [1, 2, {"y": null, "x": true}]}, "a": false});
        check(
            &value,
            r#"{"a": false, "b": {"a": [1, 2, {"x": true, "y": null}], "z": 1}}"#,
            "3337f8e82ecd72f64bb0701eac703858",
        );
    }

    #[test]
    fn arrays() {
        let value = json!([3, "x", null, [], {}]);
        check(
            &value,
            r#"[3, "x", null, [], {}]"#,
            "c81a3ed5a319540700b59378b878281e",
        );
    }

    #[test]
    fn unicode_literal() {
        let value = json!({"text": "你好，世界", "emoji": "😀🎉", "key😀": "é"});
        check(
            &value,
            r#"{"emoji": "😀🎉", "key😀": "é", "text": "你好，世界"}"#,
            "cf2eccafb21855cc2932a2370a7a0d2e",
        );
    }

    #[test]
    fn escapes() {
        let value = json!({
            "s": "quote\" backslash\\ nl\n tab\t cr\r bs\u{8} ff\u{c} one\u{1} us\u{1f} del\u{7f} ls\u{2028} slash/"
        });
        check(
            &value,
            "{\"s\": \"quote\\\" backslash\\\\ nl\\n tab\\t cr\\r bs\\b ff\\f one\\u0001 us\\u001f del\u{7f} ls\u{2028} slash/\"}",
            "38500fae4d1925f76229c82edcfa0d2f",
        );
    }

    #[test]
    fn integers() {
        let value = json!({"neg": -42, "zero": 0, "big": u64::MAX, "min": i64::MIN});
        check(
            &value,
            r#"{"big": 18446744073709551615, "min": -9223372036854775808, "neg": -42, "zero": 0}"#,
            "987e4becaea6ed3b5fbb34cc211ef221",
        );
    }

    #[test]
    fn floats_like_python_repr() {
        let value = json!([
            0.1,
            1.0,
            1e16,
            1e-5,
            123.456,
            -0.0,
            1e15,
            0.0001,
            1.5e-7,
            1e100,
            2.5e-300,
            1.797_693_134_862_315_7e308,
            5e-324,
            12_345_678_901_234_567.0,
            100.0
        ]);
        check(
            &value,
            "[0.1, 1.0, 1e+16, 1e-05, 123.456, -0.0, 1000000000000000.0, 0.0001, 1.5e-07, \
             1e+100, 2.5e-300, 1.7976931348623157e+308, 5e-324, 1.2345678901234568e+16, 100.0]",
            "9638af45935834ed9a3b55447a7c6070",
        );
    }

    #[test]
    fn float_ties_round_to_even_like_python() {
        let value = json!([
            1_059_438_285_926_254.0 + 0.25, // exactly halfway between ...254.2 and ...254.3
            222_507_385_850_720.0 + 0.125,
            0.3,
            f64::from_bits(1),
            2f64.powi(1023),
            9_007_199_254_740_993.0
        ]);
        check(
            &value,
            "[1059438285926254.2, 222507385850720.12, 0.3, 5e-324, 8.98846567431158e+307, \
             9007199254740992.0]",
            "c7033be15c6c8023eca066dd5e5ad4ce",
        );
    }

    #[test]
    fn parsed_float_stays_float() {
        let value: Value = serde_json::from_str(r#"{"a": 1.0, "b": 1, "c": 1e5}"#).unwrap();
        assert_eq!(
            canonical_json(&value),
            r#"{"a": 1.0, "b": 1, "c": 100000.0}"#
        );
    }

    #[test]
    fn empty_containers() {
        check(&json!({}), "{}", "99914b932bd37a50b983c5e7c90ae93b");
        check(&json!([]), "[]", "d751713988987e9331980363e24189ce");
    }

    #[test]
    fn scalars() {
        check(&json!(true), "true", "b326b5062b2f0e69046810717534cb09");
        check(&json!(null), "null", "37a6259cc0c1dae299a7866489dff0bd");
        check(
            &json!("plain"),
            r#""plain""#,
            "a73442f033abd3c787518065af0eb10e",
        );
    }

    #[test]
    fn template_example() {
        let value =
            json!({"task_id": "abc-123", "data": {"text": "hello", "count": 2}, "priority": 1});
        check(
            &value,
            r#"{"data": {"count": 2, "text": "hello"}, "priority": 1, "task_id": "abc-123"}"#,
            "1eb9035dfd4474b01cfd44816c207697",
        );
    }

    #[test]
    fn key_order_is_code_point_order() {
        let value =
            json!({"b": 1, "a": 2, "B": 3, "_": 4, "é": 5, "😀": 6, "\u{ffff}": 7, "aa": 8, "": 9});
        check(
            &value,
            "{\"\": 9, \"B\": 3, \"_\": 4, \"a\": 2, \"aa\": 8, \"b\": 1, \"é\": 5, \"\u{ffff}\": 7, \"😀\": 6}",
            "ff2c1b075fdbea041cdb4714b2c4ff0d",
        );
    }
}
