//! The worker-lost guard's pure parts: how a redelivered message is counted, and the
//! deliveries this process gave up on itself.
//!
//! A task whose processing kills the worker (abort, OOM kill, a crash in a native library)
//! is never settled: the broker hands it out again, to a new worker that dies the same way.
//! RabbitMQ counts such returns only on quorum queues (`x-delivery-count`); on classic queues a
//! redelivery is a flag. So the engine counts them itself, in the message: a delivery that
//! arrives redelivered is republished (confirmed) to the handler's suspect queue
//! (`<queue>.suspect`) with [`LOST_DELIVERIES_HEADER`] raised, and the original is acked. A
//! suspect runs alone (no other call of its handler in this process runs beside it), so when it
//! kills the worker again only it and the deliveries held unstarted are counted; each innocent
//! bystander moves to the suspect queue once and then runs alone, counted again only if it
//! itself dies. Past `max_redeliveries` the task is dead-lettered with the reason
//! `worker_lost` instead of running again.
//!
//! Redeliveries this process caused itself — the connection was lost while it held the
//! delivery, a subscription ended with deliveries queued, a copy could not be published and the
//! message was handed back — are remembered by fingerprint ([`Abandoned`]) and not counted when
//! they come back to this process. One that comes back to another replica, or after a restart,
//! counts once.

use std::{
    collections::{HashSet, VecDeque},
    hash::{DefaultHasher, Hash, Hasher},
};

use lapin::{
    message::Delivery,
    types::{AMQPValue, FieldTable},
};

use crate::headers::{RetryCount, count_header};

/// The header counting a task's deliveries that ended without a settlement
/// ([`crate::headers::LOST_DELIVERIES`]).
pub(crate) use crate::headers::LOST_DELIVERIES as LOST_DELIVERIES_HEADER;

use crate::headers::DELIVERY_COUNT as DELIVERY_COUNT_HEADER;

/// The error kind (and dead-letter reason) of a task dead-lettered by the guard.
pub(crate) const WORKER_LOST: &str = "worker_lost";

/// How many abandoned deliveries are remembered (the oldest is forgotten first).
const REMEMBERED: usize = 65_536;

/// What to do with a delivery before running it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Not redelivered, or redelivered by this process's own doing: run it.
    Run,
    /// Its earlier delivery ended unsettled `count` times in all: move it to the suspect queue.
    Suspect { count: u32 },
    /// Unsettled more than `max_redeliveries` times: dead-letter it as `worker_lost`.
    Exhausted { count: u32 },
}

/// Judges a delivery: `known` says this process abandoned it itself.
pub(crate) fn judge(
    redelivered: bool,
    headers: Option<&FieldTable>,
    known: bool,
    max_redeliveries: u32,
) -> Verdict {
    if !redelivered || known {
        return Verdict::Run;
    }
    // A forged or broken count can only shorten the task's own way to the dead-letter queue.
    let before = match count_header(headers, LOST_DELIVERIES_HEADER) {
        RetryCount::Count(n) => n,
        RetryCount::Malformed => u32::MAX,
    };
    // The broker's count covers every return since the message entered this queue; a flag
    // alone (classic queues) is one.
    let returns = match count_header(headers, DELIVERY_COUNT_HEADER) {
        RetryCount::Count(n) if n > 0 => n,
        _ => 1,
    };
    let count = before.saturating_add(returns);
    if count > max_redeliveries {
        Verdict::Exhausted { count }
    } else {
        Verdict::Suspect { count }
    }
}

/// `headers` with [`LOST_DELIVERIES_HEADER`] set to `count`.
pub(crate) fn counted(headers: Option<&FieldTable>, count: u32) -> FieldTable {
    let mut headers = headers.cloned().unwrap_or_default();
    headers.insert(
        LOST_DELIVERIES_HEADER.into(),
        AMQPValue::LongLongInt(count.into()),
    );
    headers
}

/// What identifies a message well enough to recognise its redelivery in this process: body,
/// ids and the engine's counters (a retry copy of a message is another message).
pub(crate) fn fingerprint(delivery: &Delivery) -> u64 {
    let mut hasher = DefaultHasher::new();
    delivery.data.hash(&mut hasher);
    let properties = &delivery.properties;
    properties
        .message_id()
        .as_ref()
        .map(|id| id.as_str())
        .hash(&mut hasher);
    properties
        .correlation_id()
        .as_ref()
        .map(|id| id.as_str())
        .hash(&mut hasher);
    let headers = properties.headers().as_ref();
    for key in [crate::retry::RETRY_COUNT_HEADER, LOST_DELIVERIES_HEADER] {
        count_header(headers, key).hash(&mut hasher);
    }
    hasher.finish()
}

/// Fingerprints of deliveries this process abandoned, oldest first, bounded.
#[derive(Debug, Default)]
pub(crate) struct Abandoned {
    order: VecDeque<u64>,
    known: HashSet<u64>,
}

impl Abandoned {
    /// Remembers one abandoned delivery.
    pub(crate) fn remember(&mut self, print: u64) {
        if !self.known.insert(print) {
            return;
        }
        self.order.push_back(print);
        if self.order.len() > REMEMBERED
            && let Some(oldest) = self.order.pop_front()
        {
            self.known.remove(&oldest);
        }
    }

    /// Whether `print` was abandoned here; forgets it (its next loss counts).
    pub(crate) fn take(&mut self, print: u64) -> bool {
        if !self.known.remove(&print) {
            return false;
        }
        self.order.retain(|p| *p != print);
        true
    }
}

#[cfg(test)]
mod tests {
    use lapin::types::LongString;

    use super::*;

    fn headers(pairs: &[(&str, AMQPValue)]) -> FieldTable {
        let mut table = FieldTable::default();
        for (key, value) in pairs {
            table.insert((*key).into(), value.clone());
        }
        table
    }

    #[test]
    fn fresh_and_known_deliveries_run() {
        assert_eq!(judge(false, None, false, 5), Verdict::Run);
        assert_eq!(judge(true, None, true, 5), Verdict::Run);
    }

    #[test]
    fn a_classic_redelivery_counts_one() {
        assert_eq!(judge(true, None, false, 5), Verdict::Suspect { count: 1 });
        let seen = headers(&[(LOST_DELIVERIES_HEADER, AMQPValue::LongLongInt(4))]);
        assert_eq!(
            judge(true, Some(&seen), false, 5),
            Verdict::Suspect { count: 5 }
        );
        let seen = headers(&[(LOST_DELIVERIES_HEADER, AMQPValue::LongLongInt(5))]);
        assert_eq!(
            judge(true, Some(&seen), false, 5),
            Verdict::Exhausted { count: 6 }
        );
    }

    #[test]
    fn a_quorum_redelivery_counts_the_brokers_returns() {
        let seen = headers(&[
            (LOST_DELIVERIES_HEADER, AMQPValue::LongLongInt(1)),
            (DELIVERY_COUNT_HEADER, AMQPValue::LongLongInt(2)),
        ]);
        assert_eq!(
            judge(true, Some(&seen), false, 5),
            Verdict::Suspect { count: 3 }
        );
        let zero = headers(&[(DELIVERY_COUNT_HEADER, AMQPValue::LongLongInt(0))]);
        assert_eq!(
            judge(true, Some(&zero), false, 5),
            Verdict::Suspect { count: 1 }
        );
    }

    #[test]
    fn forged_counts_only_hasten_the_dead_letter() {
        let forged = headers(&[(
            LOST_DELIVERIES_HEADER,
            AMQPValue::LongString(LongString::from("many")),
        )]);
        assert_eq!(
            judge(true, Some(&forged), false, 5),
            Verdict::Exhausted { count: u32::MAX }
        );
        let huge = headers(&[
            (
                LOST_DELIVERIES_HEADER,
                AMQPValue::LongLongInt(i64::from(u32::MAX)),
            ),
            (DELIVERY_COUNT_HEADER, AMQPValue::LongLongInt(7)),
        ]);
        assert_eq!(
            judge(true, Some(&huge), false, u32::MAX),
            Verdict::Suspect { count: u32::MAX }
        );
        // Redelivered without a count at all is one loss, never none.
        assert_eq!(judge(true, None, false, 0), Verdict::Exhausted { count: 1 });
    }

    #[test]
    fn counted_sets_the_header() {
        let table = counted(None, 3);
        assert_eq!(
            count_header(Some(&table), LOST_DELIVERIES_HEADER),
            RetryCount::Count(3)
        );
    }

    #[test]
    fn abandoned_deliveries_are_recognised_once() {
        let mut abandoned = Abandoned::default();
        abandoned.remember(7);
        abandoned.remember(7);
        assert!(abandoned.take(7));
        assert!(!abandoned.take(7));
        for print in 0..(REMEMBERED as u64 + 10) {
            abandoned.remember(print);
        }
        assert!(!abandoned.take(0), "the oldest are forgotten");
        assert!(abandoned.take(REMEMBERED as u64 + 9));
        assert!(abandoned.order.len() <= REMEMBERED);
    }
}
