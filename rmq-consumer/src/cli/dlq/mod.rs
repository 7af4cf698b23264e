//! `rmq-consumer dlq peek|list|replay|purge`: dead-letter queue tools.
//!
//! A dead-letter queue belongs to one work queue: the handler's whose configured
//! `dead_letter_queue` it is, else by the naming rule `<queue>.dlq` (one home:
//! [`crate::settings::source_of_dead_letter_queue`], which `status` reports as
//! `dead_letter_sources` too). `replay` and `purge` refuse a queue that is no dead-letter queue
//! (exit 2); `purge --force` purges it anyway.
//!
//! - `peek` (alias `list`) takes up to N messages with `basic.get` *without* acking them,
//!   prints them, then hands them all back with one `basic.nack(multiple, requeue)`. RabbitMQ
//!   puts requeued messages back in their original position, so the order is kept; they come
//!   back marked *redelivered*, and on a quorum queue each peek counts as a delivery attempt
//!   (which matters if the queue has a `delivery-limit`). While a peek runs, the peeked
//!   messages are invisible to other consumers. Message text is printed with its control
//!   characters escaped ([`crate::text::printable`]).
//! - `replay` moves messages back to the queue the dead-letter queue belongs to, or to
//!   `--to QUEUE`, one at a time: get (no ack), publish a copy through the default exchange
//!   with confirms and `mandatory` on a channel of its own, wait for the broker's confirm, and
//!   only then ack the dead-lettered original. Without `--to`, a message whose
//!   `x-original-queue` names another queue is skipped. A copy that is returned, nacked, not
//!   confirmed in time or refused with a channel error (the publishing channel is then
//!   reopened) is skipped too, and the replay goes on: each skip is reported on stderr, the
//!   skipped originals stay unacked until the end and are then given back together
//!   (`nack(multiple, requeue)`), in their order. A summary line counts what was replayed and
//!   skipped, and why; exit 1 when anything was skipped. So a message is never lost; at worst
//!   (the ack fails after a confirmed copy, or a copy not confirmed in time arrives after all)
//!   it is duplicated. Only the messages present when the replay starts are replayed, so a
//!   message that fails again is not replayed in a loop.
//!   The copy's headers: `x-retry-count` and the failure headers the engine wrote
//!   (`x-death-reason`, `x-error-kind`, `x-last-error`, `x-original-*`, `x-first-failure-at`,
//!   `x-last-failure-at`, `x-handler`) are removed so the message gets a full set of retries;
//!   they are kept, as they were, in the `x-replayed-failure` table (the latest failure's, when
//!   a message is replayed more than once); the broker's own `x-death`
//!   family is dropped; `x-replayed-from` (the DLQ), `x-replayed-at` (RFC 3339) and
//!   `x-replay-count` (1, 2, ...) are added. The routing headers `CC` and `BCC` and the
//!   `user_id` property are dropped (the copy is published with the operator's credentials
//!   and goes to one queue only); other headers and properties are copied unchanged.
//! - `purge` deletes every message of the queue, and only with `--yes`.

mod peek;
mod purge;
mod replay;

use super::status::dead_letter_source;
use super::{CliError, Global, Io, close, connect, load_config};
use crate::settings::DEAD_LETTER_SUFFIX;

/// Default number of messages `peek` shows.
const DEFAULT_PEEK_COUNT: u32 = 10;
/// Default body bytes `peek` prints per message.
const DEFAULT_PEEK_BODY_BYTES: usize = 2048;

#[derive(Debug, clap::Subcommand)]
pub(crate) enum Command {
    /// Show dead-lettered messages and their failure headers without removing them (they are
    /// requeued in order, marked redelivered).
    #[command(visible_alias = "list")]
    Peek {
        /// The dead-letter queue.
        queue: String,
        /// How many messages to show.
        #[arg(short = 'n', long, default_value_t = DEFAULT_PEEK_COUNT)]
        count: u32,
        /// Body bytes to print per message.
        #[arg(long, default_value_t = DEFAULT_PEEK_BODY_BYTES)]
        max_body: usize,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Move messages back to the queue the dead-letter queue belongs to, with the retry count
    /// reset; each is removed from the DLQ only after its copy is confirmed, and a copy the
    /// broker refuses is skipped (the message stays) and reported.
    Replay {
        /// The dead-letter queue (`<queue>.dlq`, or a handler's configured
        /// `dead_letter_queue`).
        queue: String,
        /// Replay at most this many messages (default: all present when the replay starts).
        #[arg(long)]
        limit: Option<u64>,
        /// Replay into this queue instead of the one the dead-letter queue belongs to (the
        /// messages' `x-original-queue` is then not checked).
        #[arg(long, value_name = "QUEUE")]
        to: Option<String>,
    },
    /// Delete every message in a dead-letter queue (needs --yes; another queue also needs
    /// --force).
    Purge {
        /// The queue.
        queue: String,
        /// Really delete the messages.
        #[arg(long)]
        yes: bool,
        /// Purge even a queue that is no dead-letter queue.
        #[arg(long)]
        force: bool,
    },
}

pub(crate) async fn run(
    global: &Global,
    command: Command,
    io: &mut Io<'_>,
) -> Result<i32, CliError> {
    let config = load_config(global)?;
    match command {
        Command::Peek {
            queue,
            count,
            max_body,
            json,
        } => {
            let (connection, _) = connect(&config, "dlq peek").await?;
            let result = peek::peek(&connection, &queue, count, max_body, json, io).await;
            close(&connection).await;
            result
        }
        Command::Replay { queue, limit, to } => {
            let Some(source) = dead_letter_source(&config, &queue)? else {
                return Err(not_a_dead_letter_queue(&queue, "replay"));
            };
            let (connection, _) = connect(&config, "dlq replay").await?;
            let result = replay::replay(
                &connection,
                &queue,
                &source,
                limit,
                to.as_deref(),
                &config,
                io,
            )
            .await;
            close(&connection).await;
            result
        }
        Command::Purge { queue, yes, force } => {
            if !force && dead_letter_source(&config, &queue)?.is_none() {
                return Err(not_a_dead_letter_queue(&queue, "purge"));
            }
            let (connection, _) = connect(&config, "dlq purge").await?;
            let result = purge::purge(&connection, &queue, yes, io).await;
            close(&connection).await;
            result
        }
    }
}

/// The refusal for a queue that is no dead-letter queue.
fn not_a_dead_letter_queue(queue: &str, what: &str) -> CliError {
    let force = if what == "purge" {
        " (or add --force to purge it anyway)"
    } else {
        ""
    };
    CliError::Usage(format!(
        "refusing to {what} `{queue}`: it is not a dead-letter queue (neither a configured \
         handler's `dead_letter_queue` nor named `<queue>{DEAD_LETTER_SUFFIX}`); name the \
         configuration with --config{force}"
    ))
}
