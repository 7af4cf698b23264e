//! What decoding a body will cost, known before decoding it.
//!
//! A JSON body's decoded size is not its length: parsed into a `serde_json::Value`, 4 MiB of
//! `[{"":0},{"":0},...]` takes ~400 MB (every one-key object allocates a B-tree node of ~600
//! bytes), and a typed argument of maps does the same. [`decoded_cost`] walks the body once
//! without allocating and returns an upper estimate of that memory; the worker charges it,
//! with the body's length, against the handler's `max_in_flight_bytes` before decoding, so
//! what a sender can make the worker hold is bounded by configuration, whatever the body's
//! shape. Calibrated against measured RSS growth of `serde_json::Value` (x86-64, glibc):
//! one-key objects ~660 B each (estimate 750), `[0]` arrays ~170 B (220), numbers in an array
//! ~36 B (48), strings length + ~16 B.

use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

/// Estimated bytes of one value slot (a `Value` is 32 bytes; vectors grow by doubling).
const SLOT: u64 = 48;
/// Estimated bytes of a non-empty object's first B-tree node.
const OBJECT: u64 = 640;
/// Estimated bytes per object entry beyond its slot (its share of further nodes, key heap).
const ENTRY: u64 = 64;
/// Estimated bytes of a non-empty array's first allocation.
const ARRAY: u64 = 128;
/// Estimated allocator overhead of a string.
const STRING: u64 = 16;

/// An upper estimate, in bytes, of the memory the body takes once decoded; an error when it
/// is not one JSON document (serde_json's own message: line, column, what was expected).
pub(crate) fn decoded_cost(body: &[u8]) -> Result<u64, serde_json::Error> {
    let mut cost = 0_u64;
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    Cost(&mut cost).deserialize(&mut deserializer)?;
    deserializer.end()?;
    Ok(cost)
}

/// The dead-letter error of a body that is not JSON (kind `invalid_json`).
pub(crate) fn not_json(error: serde_json::Error) -> crate::handler::HandlerError {
    crate::handler::HandlerError::with_kind(
        crate::handler::FailureAction::DeadLetter,
        "invalid_json",
        format_args!("the body is not JSON: {error}"),
    )
}

/// The memory a handler's messages in flight may take (`max_in_flight_bytes`), counted in KiB.
#[derive(Debug)]
pub(crate) struct Budget {
    kib: tokio::sync::Semaphore,
    total_kib: u32,
}

/// A message that alone needs more than the whole budget.
#[derive(Debug, thiserror::Error)]
#[error(
    "the body ({body} bytes) would take about {} once decoded, above max_in_flight_bytes ({})",
    mib(*cost),
    mib(*budget)
)]
pub(crate) struct OverBudget {
    body: usize,
    cost: u64,
    budget: u64,
}

/// `bytes` as MiB with one decimal, for messages.
fn mib(bytes: u64) -> String {
    #[expect(clippy::cast_precision_loss, reason = "a rounded figure for a message")]
    let mib = bytes as f64 / 1_048_576.0;
    format!("{mib:.1} MiB")
}

impl Budget {
    /// A budget of `bytes` (at least 1 KiB).
    pub(crate) fn new(bytes: u64) -> Self {
        let max = u32::try_from(tokio::sync::Semaphore::MAX_PERMITS).unwrap_or(u32::MAX);
        let total_kib = u32::try_from(bytes / 1024)
            .unwrap_or(u32::MAX)
            .clamp(1, max);
        Self {
            kib: tokio::sync::Semaphore::new(total_kib as usize),
            total_kib,
        }
    }

    /// Waits until `body` fits beside the messages in flight and reserves its length plus
    /// `decoded` bytes, until the permit is dropped.
    pub(crate) async fn reserve(
        &self,
        body: usize,
        decoded: u64,
    ) -> Result<tokio::sync::SemaphorePermit<'_>, OverBudget> {
        let cost = decoded.saturating_add(u64::try_from(body).unwrap_or(u64::MAX));
        let over = || OverBudget {
            body,
            cost,
            budget: u64::from(self.total_kib).saturating_mul(1024),
        };
        let kib = u32::try_from(cost.div_ceil(1024)).map_err(|_| over())?;
        if kib > self.total_kib {
            return Err(over());
        }
        // The semaphore is never closed.
        self.kib.acquire_many(kib).await.map_err(|_| over())
    }
}

/// Adds the cost of the value being deserialized to its counter.
struct Cost<'a>(&'a mut u64);

impl Cost<'_> {
    fn add(&mut self, bytes: u64) {
        *self.0 = self.0.saturating_add(bytes);
    }
}

impl<'de> DeserializeSeed<'de> for Cost<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Cost<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_unit<E>(mut self) -> Result<(), E> {
        self.add(SLOT);
        Ok(())
    }

    fn visit_bool<E>(mut self, _: bool) -> Result<(), E> {
        self.add(SLOT);
        Ok(())
    }

    fn visit_u64<E>(mut self, _: u64) -> Result<(), E> {
        self.add(SLOT);
        Ok(())
    }

    fn visit_i64<E>(mut self, _: i64) -> Result<(), E> {
        self.add(SLOT);
        Ok(())
    }

    fn visit_f64<E>(mut self, _: f64) -> Result<(), E> {
        self.add(SLOT);
        Ok(())
    }

    fn visit_str<E>(mut self, text: &str) -> Result<(), E> {
        let len = u64::try_from(text.len()).unwrap_or(u64::MAX);
        self.add(SLOT.saturating_add(len).saturating_add(STRING));
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(mut self, mut items: A) -> Result<(), A::Error> {
        self.add(SLOT);
        let mut empty = true;
        while items.next_element_seed(Cost(&mut *self.0))?.is_some() {
            if empty {
                self.add(ARRAY);
                empty = false;
            }
        }
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<(), A::Error> {
        self.add(SLOT);
        let mut empty = true;
        while let Some(()) = map.next_key_seed(KeyCost(&mut *self.0))? {
            if empty {
                self.add(OBJECT);
                empty = false;
            }
            self.add(ENTRY);
            map.next_value_seed(Cost(&mut *self.0))?;
        }
        Ok(())
    }
}

/// Adds the cost of an object key (its heap string).
struct KeyCost<'a>(&'a mut u64);

impl<'de> DeserializeSeed<'de> for KeyCost<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeyCost<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an object key")
    }

    fn visit_str<E>(self, text: &str) -> Result<(), E> {
        let len = u64::try_from(text.len()).unwrap_or(u64::MAX);
        *self.0 = self.0.saturating_add(len).saturating_add(STRING);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn costs_follow_the_shape_not_the_length() {
        let cost = |body: &str| decoded_cost(body.as_bytes()).unwrap_or(u64::MAX);
        let n = 10_000;
        let one_key = format!("[{}{{\"\":0}}]", "{\"\":0},".repeat(n - 1));
        let text = format!("\"{}\"", "a".repeat(one_key.len()));
        // The same length: a string costs about its length, one-key objects ~100 times it.
        assert!(cost(&text) < 2 * one_key.len() as u64);
        assert!(
            cost(&one_key) > 90 * one_key.len() as u64,
            "{}",
            cost(&one_key)
        );
        assert_eq!(cost("null"), SLOT);
        assert_eq!(cost("{}"), SLOT);
        assert_eq!(cost("[]"), SLOT);
        assert_eq!(cost("[1]"), SLOT + ARRAY + SLOT);
        assert_eq!(
            cost(r#"{"ab":1}"#),
            SLOT + OBJECT + 2 + STRING + ENTRY + SLOT
        );
    }

    #[test]
    fn anything_but_one_json_document_is_an_error() {
        for body in ["", "{", "[1,]", "{} {}", "nul", r#"{"a" 1}"#] {
            assert!(decoded_cost(body.as_bytes()).is_err(), "{body:?}");
        }
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(
            decoded_cost(deep.as_bytes()).is_err(),
            "serde_json's recursion limit"
        );
    }
}
