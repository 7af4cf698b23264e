//! The retry policy: a pure decision from a failure, the message's retry count and the
//! handler's limits. Only the engine acts on it.

use std::time::Duration;

use crate::{handler::FailureAction, headers::RetryCount};

/// The header that counts retries ([`crate::headers::RETRY_COUNT`]).
pub use crate::headers::RETRY_COUNT as RETRY_COUNT_HEADER;

/// The header naming the queue a dead-lettered message failed on
/// ([`crate::headers::ORIGINAL_QUEUE`]).
pub use crate::headers::ORIGINAL_QUEUE as ORIGINAL_QUEUE_HEADER;

/// The header counting a task's deliveries that ended without a settlement
/// ([`crate::headers::LOST_DELIVERIES`]).
pub use crate::headers::LOST_DELIVERIES as LOST_DELIVERIES_HEADER;

/// What to do with a failed message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Publish a copy with `x-retry-count = count`, after `delay` (`None`: at once).
    Retry { count: u32, delay: Option<Duration> },
    /// Send it to the dead-letter queue (or reject it when dead-lettering is off).
    DeadLetter { retries_exhausted: bool },
}

/// Decides what happens to a message whose processing failed.
pub(crate) fn decide(
    action: FailureAction,
    previous: RetryCount,
    max_retries: u32,
    delays: &[Duration],
) -> Decision {
    match (action, previous) {
        (FailureAction::DeadLetter, _) => Decision::DeadLetter {
            retries_exhausted: false,
        },
        (FailureAction::Retry, RetryCount::Malformed) => Decision::DeadLetter {
            retries_exhausted: true,
        },
        (FailureAction::Retry, RetryCount::Count(done)) if done >= max_retries => {
            Decision::DeadLetter {
                retries_exhausted: true,
            }
        }
        (FailureAction::Retry, RetryCount::Count(done)) => {
            let index = usize::try_from(done).unwrap_or(usize::MAX);
            Decision::Retry {
                count: done.saturating_add(1),
                delay: delays.get(index).or(delays.last()).copied(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn retries_count_up_then_dead_letter() {
        let delays = [S(1), S(10)];
        assert_eq!(
            decide(FailureAction::Retry, RetryCount::Count(0), 3, &delays),
            Decision::Retry {
                count: 1,
                delay: Some(S(1))
            }
        );
        assert_eq!(
            decide(FailureAction::Retry, RetryCount::Count(2), 3, &delays),
            Decision::Retry {
                count: 3,
                delay: Some(S(10))
            }
        );
        assert_eq!(
            decide(FailureAction::Retry, RetryCount::Count(3), 3, &delays),
            Decision::DeadLetter {
                retries_exhausted: true
            }
        );
    }

    #[test]
    fn immediate_retry_without_delays_and_zero_max() {
        assert_eq!(
            decide(FailureAction::Retry, RetryCount::Count(0), 1, &[]),
            Decision::Retry {
                count: 1,
                delay: None
            }
        );
        assert_eq!(
            decide(FailureAction::Retry, RetryCount::Count(0), 0, &[]),
            Decision::DeadLetter {
                retries_exhausted: true
            }
        );
    }

    #[test]
    fn explicit_dead_letter_and_malformed_counts_skip_retries() {
        assert_eq!(
            decide(FailureAction::DeadLetter, RetryCount::Count(0), 3, &[]),
            Decision::DeadLetter {
                retries_exhausted: false
            }
        );
        assert_eq!(
            decide(FailureAction::Retry, RetryCount::Malformed, 3, &[]),
            Decision::DeadLetter {
                retries_exhausted: true
            }
        );
    }
}
