//! W3C trace context: the `traceparent` header of a request is continued on its result, so a
//! result can be traced to its request.

use std::{
    hash::{BuildHasher, Hasher, RandomState},
    sync::atomic::{AtomicU64, Ordering::Relaxed},
};

/// The header name.
pub(crate) const TRACEPARENT: &str = "traceparent";

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

    /// The context for a result: the same trace, a new span id; a new sampled trace when the
    /// request carried none.
    pub(crate) fn child_of(parent: Option<&Self>) -> Self {
        match parent {
            Some(parent) => Self {
                trace_id: parent.trace_id.clone(),
                parent_id: format!("{:016x}", nonzero_random()),
                flags: parent.flags.clone(),
            },
            None => Self {
                trace_id: format!("{:016x}{:016x}", nonzero_random(), random()),
                parent_id: format!("{:016x}", nonzero_random()),
                flags: "01".to_owned(),
            },
        }
    }

    /// The header value.
    pub(crate) fn header(&self) -> String {
        format!("00-{}-{}-{}", self.trace_id, self.parent_id, self.flags)
    }
}

fn random() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Relaxed));
    hasher.finish()
}

fn nonzero_random() -> u64 {
    random().max(1)
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
        let child = TraceParent::child_of(Some(&parent));
        assert_eq!(child.trace_id, parent.trace_id);
        assert_ne!(child.parent_id, parent.parent_id);
        assert!(TraceParent::parse(&child.header()).is_some());
        let root = TraceParent::child_of(None);
        assert!(TraceParent::parse(&root.header()).is_some());
        assert_ne!(root.trace_id, TraceParent::child_of(None).trace_id);
    }
}
