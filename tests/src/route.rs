//! One handler's queues for one test, named uniquely and tracked for cleanup.

use std::time::Duration;

use rmq_consumer::Config;

use crate::{broker::Broker, env::unique};

/// `<queue>.retry.<N>s` for whole seconds, `<queue>.retry.<N>ms` otherwise (as the engine names
/// its TTL delay queues).
pub fn delay_queue(queue: &str, delay: Duration) -> String {
    if delay.subsec_millis() == 0 {
        format!("{queue}.retry.{}s", delay.as_secs())
    } else {
        format!("{queue}.retry.{}ms", delay.as_millis())
    }
}

/// One handler's queues for one test: the work queue, the reply key and the queue bound to
/// it, the DLQ, and the delay queues of `retry_delays`.
#[derive(Debug, Clone)]
pub struct Route {
    /// The work queue.
    pub queue: String,
    /// The routing key of the results: `<queue>.result`.
    pub reply_key: String,
    /// The queue the engine binds to `reply_key`: `<queue>.results`.
    pub reply_queue: String,
    /// The dead-letter queue: `<queue>.dlq`.
    pub dlq: String,
    /// `<queue>.suspect`, which the engine declares for every handler.
    pub suspect: String,
    /// The TTL delay queues of the handler's `retry_delays`, in order ([`delay_queue`]).
    pub delay_queues: Vec<String>,
}

impl Route {
    /// Gives `handler` unique names in `config` (its `[consumers.<handler>]` section, keeping
    /// whatever else the section sets) and tracks every queue for cleanup on `broker`.
    pub fn new(config: &mut Config, handler: &str, broker: &mut Broker) -> Self {
        let queue = unique(handler);
        let section = config.consumers.entry(handler.to_owned()).or_default();
        let delays = section
            .retry_delays
            .clone()
            .unwrap_or_else(|| config.retry_delays.clone());
        let route = Self {
            reply_key: format!("{queue}.result"),
            reply_queue: format!("{queue}.results"),
            dlq: format!("{queue}.dlq"),
            suspect: format!("{queue}.suspect"),
            delay_queues: delays.iter().map(|d| delay_queue(&queue, *d)).collect(),
            queue,
        };
        let section = config.consumers.entry(handler.to_owned()).or_default();
        section.queue = Some(route.queue.clone());
        section.reply_key = Some(route.reply_key.clone());
        section.reply_queue = Some(route.reply_queue.clone());
        for name in route.all_queues() {
            broker.track_queue(&name);
        }
        route
    }

    /// The work queue and its delay queues: where a task can still wait.
    pub fn input_queues(&self) -> Vec<String> {
        let mut queues = vec![self.queue.clone()];
        queues.extend(self.delay_queues.iter().cloned());
        queues
    }

    /// Every queue of the route.
    fn all_queues(&self) -> Vec<String> {
        let mut queues = self.input_queues();
        queues.push(self.reply_queue.clone());
        queues.push(self.dlq.clone());
        queues.push(self.suspect.clone());
        queues
    }
}
