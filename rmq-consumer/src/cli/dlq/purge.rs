//! `dlq purge`: delete every message of a dead-letter queue.

use lapin::options::QueuePurgeOptions;

use crate::amqp::short;
use crate::cli::output::say;
use crate::cli::{CliError, EXIT_OK, Io, close_channel, probe_queue, thousands};

pub(super) async fn purge(
    connection: &lapin::Connection,
    queue: &str,
    yes: bool,
    io: &mut Io<'_>,
) -> Result<i32, CliError> {
    let Some((ready, _)) = probe_queue(connection, queue).await? else {
        return Err(CliError::MissingQueue(queue.to_owned()));
    };
    if !yes {
        return Err(CliError::Usage(format!(
            "refusing to purge `{queue}` ({} ready message{}) without --yes",
            thousands(ready.into()),
            if ready == 1 { "" } else { "s" }
        )));
    }
    let channel = connection
        .create_channel()
        .await
        .map_err(CliError::amqp("cannot open a channel"))?;
    let purged = channel
        .queue_purge(short(queue), QueuePurgeOptions::default())
        .await
        .map_err(CliError::amqp(format!("cannot purge `{queue}`")))?;
    close_channel(&channel).await;
    say!(
        io.out,
        "purged {} message{} from `{queue}`",
        thousands(purged.into()),
        if purged == 1 { "" } else { "s" }
    )?;
    Ok(EXIT_OK)
}
