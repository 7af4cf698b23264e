//! W3C trace context: the `traceparent` header of a request is continued on its result, so a
//! result can be traced to its request.

use std::{
    hash::{BuildHasher, Hasher, RandomState},
    sync::atomic::{AtomicU64, Ordering::Relaxed},
};

pub(crate) use crate::headers::TRACEPARENT;

/// A parsed `traceparent`: version 00, 32-hex trace id, 16-hex parent id, 2-hex flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TraceParent {
    pub(crate) trace_id: String,
    pub(crate) parent_id: String,
    pub(crate) flags: String,
}

impl TraceParent {
    /// Parses a header value; `None` when it is not a valid version-00 traceparent.
    pub(crate) fn parse(value: &str) -> Option<Self> {
        let mut parts = value.trim().split('-');
        let (version, trace_id, parent_id, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let hex = |s: &str, len: usize| {
            s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        };
        let valid = version == "00"
            && parts.next().is_none()
            && hex(trace_id, 32)
            && hex(parent_id, 16)
            && hex(flags, 2)
            && trace_id.bytes().any(|b| b != b'0')
            && parent_id.bytes().any(|b| b != b'0');
        valid.then(|| Self {
            trace_id: trace_id.to_owned(),
            parent_id: parent_id.to_owned(),
            flags: flags.to_owned(),
        })
    }

    /// The context for a result: the same trace and flags, a new span id.
    pub(crate) fn child(&self) -> Self {
        Self {
            trace_id: self.trace_id.clone(),
            parent_id: hex_id(random().max(1)),
            flags: self.flags.clone(),
        }
    }

    /// The header value.
    pub(crate) fn header(&self) -> String {
        let mut header = String::with_capacity(
            6 + self.trace_id.len() + self.parent_id.len() + self.flags.len(),
        );
        for part in [
            "00-",
            &self.trace_id,
            "-",
            &self.parent_id,
            "-",
            &self.flags,
        ] {
            header.push_str(part);
        }
        header
    }
}

/// `word` as 16 zero-padded lowercase hex digits (what `{:016x}` writes, without `fmt`).
fn hex_id(word: u64) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    (0..16)
        .rev()
        .map(|shift| char::from(HEX[usize::try_from((word >> (shift * 4)) & 0xf).unwrap_or(0)]))
        .collect()
}

fn random() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Relaxed));
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_valid_and_rejects_invalid() {
        let parsed = TraceParent::parse(VALID).unwrap();
        assert_eq!(parsed.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(parsed.header(), VALID);
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "00-4bf92f3577b34da6-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn child_keeps_the_trace_and_makes_a_new_span() {
        let parent = TraceParent::parse(VALID).unwrap();
        let child = parent.child();
        assert_eq!(child.trace_id, parent.trace_id);
        assert_ne!(child.parent_id, parent.parent_id);
        assert_ne!(child.parent_id, parent.child().parent_id);
        assert!(TraceParent::parse(&child.header()).is_some());
    }

    #[test]
    fn hex_ids_match_fmt() {
        for word in [0, 1, 0xdead_beef, u64::MAX] {
            assert_eq!(hex_id(word), format!("{word:016x}"));
        }
    }
}
