//! Which queues and exchanges `status` looks at: the configured handlers' (work, response,
//! dead-letter, suspect and delay queues) or the named ones.

use super::super::CliError;
use crate::{
    config::{Config, ConsumerConfig},
    registry,
    settings::{self, delay_queue_name},
};

use super::*;

/// The queues to check, and notes about configured handlers that could not be resolved.
pub(super) fn targets(
    config: &Config,
    named: &[String],
) -> Result<(Vec<Target>, Vec<String>), CliError> {
    let (derived, mut notes) = configured_targets(config)?;
    if named.is_empty() {
        if derived.is_empty() {
            return Err(CliError::Usage(
                "no queues to check: name them with --queue, or configure handlers \
                 (`queue` or [consumers.<name>] queue = ...)"
                    .to_owned(),
            ));
        }
        return Ok((derived, notes));
    }
    let mut chosen: Vec<Target> = Vec::new();
    for name in named {
        if chosen.iter().any(|t| &t.queue == name) {
            continue;
        }
        chosen.push(
            derived
                .iter()
                .find(|t| &t.queue == name)
                .cloned()
                .unwrap_or_else(|| Target {
                    queue: name.clone(),
                    role: Role::Named,
                    handler: None,
                    reply_key: None,
                    dead_letter_source: settings::source_of_dead_letter_queue(name)
                        .map(str::to_owned),
                }),
        );
    }
    notes.clear();
    Ok((chosen, notes))
}

/// The work queue whose dead letters `queue` holds: the queue of the configured handler (or
/// of this binary's registered handler) whose dead-letter queue it is, else by the naming
/// rule (`a.dlq` holds the dead letters of `a`); `None` when `queue` is no dead-letter queue.
/// `status` reports the same (`dead_letter_sources`).
pub(crate) fn dead_letter_source(config: &Config, queue: &str) -> Result<Option<String>, CliError> {
    let (configured, _) = configured_targets(config)?;
    Ok(configured
        .into_iter()
        .find(|t| t.role == Role::DeadLetter && t.queue == queue)
        .and_then(|t| t.dead_letter_source)
        .or_else(|| settings::source_of_dead_letter_queue(queue).map(str::to_owned)))
}

/// The queues the configuration (or this binary's handlers) implies, and notes about
/// configured handlers that could not be resolved.
pub(super) fn configured_targets(config: &Config) -> Result<(Vec<Target>, Vec<String>), CliError> {
    let mut notes = Vec::new();
    let specs = registry::handlers();
    let mut derived = Vec::new();
    let mut push = |target: Target| {
        if !derived.iter().any(|t: &Target| t.queue == target.queue) {
            derived.push(target);
        }
    };
    if specs.is_empty() {
        // The stand-alone binary knows no handlers: use what the configuration names.
        let mut sections: Vec<(String, ConsumerConfig)> = config
            .consumers
            .iter()
            .map(|(name, section)| (name.clone(), section.clone()))
            .collect();
        if sections.is_empty() && config.queue.is_some() {
            sections.push(("(config)".to_owned(), ConsumerConfig::default()));
        }
        for (name, section) in sections {
            if section.enabled == Some(false) {
                continue;
            }
            let Some(names) = settings::QueueNames::resolve(config, &section, None) else {
                notes.push(format!(
                    "[consumers.{name}] sets no `queue` and no handler `{name}` is registered in \
                     this binary: its queues are not checked"
                ));
                continue;
            };
            let delay_queues = names
                .retry_delays
                .iter()
                .map(|d| delay_queue_name(&names.queue, *d))
                .collect();
            for target in handler_targets(
                &name,
                names.queue,
                names.reply_queue,
                names.reply_key,
                names.dead_letter_queue,
                delay_queues,
            ) {
                push(target);
            }
        }
    } else {
        for settings in settings::resolve(config, &specs)? {
            let delay_queues = settings
                .retry_delays
                .iter()
                .map(|d| settings.delay_queue(*d))
                .collect();
            for target in handler_targets(
                &settings.name,
                settings.queue,
                settings.reply_queue,
                settings.reply_key,
                settings.dead_letter_queue,
                delay_queues,
            ) {
                push(target);
            }
        }
    }
    Ok((derived, notes))
}

pub(super) fn handler_targets(
    handler: &str,
    queue: String,
    reply_queue: Option<String>,
    reply_key: Option<String>,
    dead_letter_queue: Option<String>,
    delay_queues: Vec<String>,
) -> Vec<Target> {
    let target = |queue: String, role: Role, reply_key: Option<String>| Target {
        queue,
        role,
        handler: Some(handler.to_owned()),
        reply_key,
        dead_letter_source: None,
    };
    let source = queue.clone();
    let mut all = vec![target(queue, Role::Work, None)];
    if let Some(reply_queue) = reply_queue {
        all.push(target(reply_queue, Role::Reply, reply_key));
    }
    if let Some(dlq) = dead_letter_queue {
        all.push(Target {
            dead_letter_source: Some(source),
            ..target(dlq, Role::DeadLetter, None)
        });
    }
    for delay in delay_queues {
        all.push(target(delay, Role::Delay, None));
    }
    all
}
