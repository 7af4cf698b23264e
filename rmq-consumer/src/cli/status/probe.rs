//! Reading a target's state: passive declares over AMQP (each on its own channel) and GET
//! requests to the management API.

use std::collections::{BTreeMap, HashMap};

use lapin::Connection;

use super::super::{
    EXIT_OK, chain, close, close_channel,
    management::{Management, ManagementError, RateDetails},
    probe_queue, vhost_of,
};
use crate::config::{Config, SecretUrl};

use super::*;

/// Holds the AMQP connection (reused across refreshes) and the management client.
pub(super) struct Prober<'a> {
    config: &'a Config,
    connection: Option<(Connection, SecretUrl)>,
}

impl<'a> Prober<'a> {
    pub(super) fn new(config: &'a Config) -> Self {
        Self {
            config,
            connection: None,
        }
    }

    pub(super) async fn close(&mut self) {
        if let Some((connection, _)) = self.connection.take() {
            close(&connection).await;
        }
    }

    pub(super) async fn report(
        &mut self,
        targets: &[Target],
        notes: &[String],
        previous: &HashMap<String, u64>,
    ) -> Report {
        let mut broker_error = None;
        if self
            .connection
            .as_ref()
            .is_none_or(|(c, _)| !c.status().connected())
        {
            self.connection = None;
            match super::super::connect(self.config, "status").await {
                Ok(found) => self.connection = Some(found),
                Err(error) => broker_error = Some(chain(&error)),
            }
        }
        let broker_url = self.connection.as_ref().map_or_else(
            || {
                self.config
                    .urls
                    .first()
                    .cloned()
                    .unwrap_or_else(|| SecretUrl::new(""))
            },
            |(_, url)| url.clone(),
        );
        let mut report = Report {
            broker: broker_url.masked(),
            vhost: vhost_of(&broker_url),
            source: "amqp",
            management_api: None,
            management_error: None,
            broker_error,
            exchange: None,
            queues: Vec::new(),
            warnings: Vec::new(),
            errors: Vec::new(),
            notes: notes.to_vec(),
            dead_letter_sources: targets
                .iter()
                .filter_map(|t| Some((t.queue.clone(), t.dead_letter_source.clone()?)))
                .collect(),
            health: Health::Healthy,
            exit_code: EXIT_OK,
        };
        let management = match Management::new(self.config, &broker_url) {
            Ok(management) => {
                report.management_api = Some(management.base().to_owned());
                match management.overview().await {
                    Ok(_) => Some(management),
                    Err(error) => {
                        report.management_error = Some(chain(&error));
                        None
                    }
                }
            }
            Err(error) => {
                report.management_error = Some(chain(&error));
                None
            }
        };
        if management.is_some() {
            report.source = "management";
        } else {
            report.notes.push(
                "the management API is not available: showing AMQP passive-declare data only \
                 (no bindings, unacknowledged counts, consumer details or rates)"
                    .to_owned(),
            );
        }
        let connection = self.connection.as_ref().map(|(c, _)| c);

        if targets.iter().any(|t| t.reply_key.is_some()) {
            report.exchange = Some(
                exchange_status(
                    &self.config.exchange,
                    connection,
                    management.as_ref(),
                    &mut report.notes,
                )
                .await,
            );
        }
        for target in targets {
            let status = queue_status(
                target,
                connection,
                management.as_ref(),
                &self.config.exchange,
                &mut report.notes,
            )
            .await;
            report.queues.push(status);
        }
        judge(&mut report, previous);
        report
    }
}

pub(super) async fn exchange_status(
    name: &str,
    connection: Option<&Connection>,
    management: Option<&Management>,
    notes: &mut Vec<String>,
) -> ExchangeStatus {
    let mut status = ExchangeStatus {
        name: name.to_owned(),
        exists: None,
        kind: None,
        durable: None,
    };
    if let Some(management) = management {
        match management.exchange(name).await {
            Ok(Some(found)) => {
                status.exists = Some(true);
                status.kind = found.kind;
                status.durable = found.durable;
            }
            Ok(None) => status.exists = Some(false),
            Err(error) => notes.push(chain(&error)),
        }
    }
    if let (None, Some(connection)) = (status.exists, connection) {
        status.exists = probe_exchange(connection, name).await;
    }
    status
}

/// Passive exchange declare on a channel of its own.
pub(super) async fn probe_exchange(connection: &Connection, name: &str) -> Option<bool> {
    let channel = connection.create_channel().await.ok()?;
    match crate::topology::passive_exchange(&channel, name).await {
        Ok(true) => {
            close_channel(&channel).await;
            Some(true)
        }
        Ok(false) => Some(false),
        Err(_) => None,
    }
}

pub(super) async fn queue_status(
    target: &Target,
    connection: Option<&Connection>,
    management: Option<&Management>,
    exchange: &str,
    notes: &mut Vec<String>,
) -> QueueStatus {
    let mut status = QueueStatus {
        name: target.queue.clone(),
        role: target.role,
        handler: target.handler.clone(),
        exists: None,
        messages_ready: None,
        messages_unacknowledged: None,
        consumers: None,
        queue_type: None,
        durable: None,
        state: None,
        arguments: BTreeMap::new(),
        policy: None,
        effective_policy: BTreeMap::new(),
        bindings: None,
        consumer_details: None,
        rates: None,
        expected_binding: target.reply_key.as_ref().map(|key| Binding {
            exchange: exchange.to_owned(),
            routing_key: key.clone(),
        }),
    };
    if let Some(connection) = connection {
        match probe_queue(connection, &target.queue).await {
            Ok(Some((ready, consumers))) => {
                status.exists = Some(true);
                status.messages_ready = Some(ready.into());
                status.consumers = Some(consumers.into());
            }
            Ok(None) => status.exists = Some(false),
            Err(error) => notes.push(chain(&error)),
        }
    }
    if status.exists == Some(false) {
        return status;
    }
    if let Some(management) = management {
        match management_details(management, &target.queue, &mut status).await {
            Ok(()) => {}
            Err(error) => notes.push(chain(&error)),
        }
    }
    status
}

pub(super) async fn management_details(
    management: &Management,
    queue: &str,
    status: &mut QueueStatus,
) -> Result<(), ManagementError> {
    let Some(found) = management.queue(queue).await? else {
        if status.exists.is_none() {
            status.exists = Some(false);
        }
        return Ok(());
    };
    status.exists = Some(true);
    if status.messages_ready.is_none() {
        status.messages_ready = found.messages_ready;
    }
    if status.consumers.is_none() {
        status.consumers = found.consumers;
    }
    status.messages_unacknowledged = found.messages_unacknowledged;
    status.queue_type = found.kind;
    status.durable = found.durable;
    status.state = found.state;
    status.policy = found.policy;
    if let Some(arguments) = found.arguments {
        status.arguments = arguments;
    }
    if let Some(policy) = found.effective_policy_definition {
        status.effective_policy = policy;
    }
    if let Some(consumers) = found.consumer_details {
        status.consumer_details = Some(
            consumers
                .into_iter()
                .map(|c| ConsumerInfo {
                    tag: c.consumer_tag.unwrap_or_default(),
                    prefetch: c.prefetch_count,
                    ack_mode: if c.ack_required.unwrap_or(true) {
                        "manual"
                    } else {
                        "auto"
                    },
                    channel: c.channel_details.and_then(|channel| channel.name),
                })
                .collect(),
        );
    }
    if found.messages_details.is_some() || found.message_stats.is_some() {
        let rate = |details: Option<&RateDetails>| details.and_then(|d| d.rate).unwrap_or(0.0);
        let stats = found.message_stats.as_ref();
        status.rates = Some(Rates {
            publish: rate(stats.and_then(|s| s.publish_details.as_ref())),
            deliver: rate(stats.and_then(|s| s.deliver_get_details.as_ref())),
            ack: rate(stats.and_then(|s| s.ack_details.as_ref())),
            messages: rate(found.messages_details.as_ref()),
        });
    }
    if let Some(bindings) = management.queue_bindings(queue).await? {
        status.bindings = Some(
            bindings
                .into_iter()
                .map(|b| Binding {
                    exchange: b.source.unwrap_or_default(),
                    routing_key: b.routing_key.unwrap_or_default(),
                })
                .collect(),
        );
    }
    Ok(())
}
