//! Sending: the confirm window of `publish` (`publish`, `publish_one`), the outcome of each
//! message and the progress display.

use std::time::{Duration, Instant, SystemTime};

use futures_util::{StreamExt, stream::FuturesUnordered};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use lapin::{
    BasicProperties, Confirmation,
    options::{BasicPublishOptions, ConfirmSelectOptions},
    types::ShortString,
};

use crate::amqp::short;
use crate::cli::output::say;
use crate::cli::{CliError, Io, thousands};

use super::*;

/// Shows progress: a bar on a terminal, else a plain line every few seconds.
pub(super) enum Progress {
    Bar(ProgressBar),
    Plain { last: Instant },
    Quiet,
}

impl Progress {
    fn new(total: u64, io: &Io<'_>, json: bool) -> Self {
        if json {
            return Self::Quiet;
        }
        if io.terminal.stderr {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            if let Ok(style) = ProgressStyle::with_template(
                "{bar:40.cyan/blue} {human_pos}/{human_len} confirmed, {rate} msg/s, ETA {eta} {msg}",
            ) {
                bar.set_style(style.with_key(
                    "rate",
                    |state: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                        let _ = write!(w, "{}", thousands(state.per_sec().round() as u64));
                    },
                ));
            }
            Self::Bar(bar)
        } else {
            Self::Plain {
                last: Instant::now(),
            }
        }
    }

    fn update(&mut self, summary: &Summary, started: Instant, io: &mut Io<'_>) {
        match self {
            Self::Bar(bar) => {
                bar.set_position(summary.confirmed);
                if summary.returned + summary.nacked + summary.failed > 0 {
                    bar.set_message(format!(
                        "returned {} nacked {} failed {}",
                        summary.returned, summary.nacked, summary.failed
                    ));
                }
            }
            Self::Plain { last } => {
                if last.elapsed() >= PLAIN_PROGRESS_EVERY {
                    *last = Instant::now();
                    let secs = started.elapsed().as_secs_f64().max(1e-9);
                    let _ = say!(
                        io.err,
                        "progress: sent {}/{}, confirmed {} ({} msg/s)",
                        thousands(summary.sent),
                        thousands(summary.total),
                        thousands(summary.confirmed),
                        thousands((summary.confirmed as f64 / secs).round() as u64)
                    );
                }
            }
            Self::Quiet => {}
        }
    }

    fn finish(self) {
        if let Self::Bar(bar) = self {
            bar.finish_and_clear();
        }
    }
}

/// How one message ended.
#[derive(Debug)]
pub(super) enum Outcome {
    /// `basic.publish` itself failed (the channel is gone).
    NotSent(lapin::Error),
    /// Acked by the broker.
    Confirmed,
    /// Returned as unroutable (`mandatory`).
    Returned,
    /// Nacked by the broker.
    Nacked,
    /// The channel failed before the confirm arrived.
    Lost(lapin::Error),
}

impl From<Result<Confirmation, lapin::Error>> for Outcome {
    fn from(confirmation: Result<Confirmation, lapin::Error>) -> Self {
        match confirmation {
            Ok(Confirmation::Ack(None) | Confirmation::NotRequested) => Self::Confirmed,
            Ok(Confirmation::Ack(Some(_))) => Self::Returned,
            Ok(Confirmation::Nack(_)) => Self::Nacked,
            Err(error) => Self::Lost(error),
        }
    }
}

/// Publishes one message and waits for its confirm.
///
/// lapin resolves `basic_publish` only once its I/O thread has written the frames, so awaiting
/// publishes one after the other costs a thread round trip per message. Keeping many of these
/// futures in flight lets the I/O thread write many messages per wake-up. Each future takes its
/// delivery tag and queues its frames in the same (first) poll, and `FuturesUnordered` polls
/// new futures in the order they were pushed, so messages go out in order.
async fn publish_one(
    channel: lapin::Channel,
    exchange: ShortString,
    routing_key: ShortString,
    body: Vec<u8>,
    properties: BasicProperties,
) -> Outcome {
    let options = BasicPublishOptions {
        mandatory: true,
        ..BasicPublishOptions::default()
    };
    match channel
        .basic_publish(exchange, routing_key, options, &body, properties)
        .await
    {
        Ok(confirm) => confirm.await.into(),
        Err(error) => Outcome::NotSent(error),
    }
}

pub(super) async fn publish(
    connection: &lapin::Connection,
    source: &Source,
    exchange: &str,
    routing_key: &str,
    args: &Args,
    config: &crate::Config,
    io: &mut Io<'_>,
) -> Result<Summary, CliError> {
    let channel = connection
        .create_channel()
        .await
        .map_err(CliError::amqp("cannot open a channel"))?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(CliError::amqp("cannot enable publisher confirms"))?;
    let exchange_name: ShortString = short(exchange);
    let key: ShortString = short(routing_key);
    let timestamp = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_timestamp(timestamp);

    let mut summary = Summary {
        exchange: exchange.to_owned(),
        routing_key: routing_key.to_owned(),
        total: source.len(),
        ..Summary::default()
    };
    let mut progress = Progress::new(summary.total, io, args.json);
    let window = usize::try_from(args.concurrency.max(1)).unwrap_or(usize::MAX);
    let started = Instant::now();
    let due = |index: u64| {
        args.rate
            .map(|rate| started + Duration::from_secs_f64(index as f64 / rate))
    };
    let mut in_flight = FuturesUnordered::new();
    let mut next = 0_u64;
    let mut pushed = 0_u64;
    let mut invalid = None;
    loop {
        // Fill the window with what is due.
        while next < summary.total
            && in_flight.len() < window
            && summary.error.is_none()
            && invalid.is_none()
        {
            if due(next).is_some_and(|at| at > Instant::now()) {
                break;
            }
            match source.message(next) {
                Ok(body) => {
                    in_flight.push(publish_one(
                        channel.clone(),
                        exchange_name.clone(),
                        key.clone(),
                        body,
                        properties.clone(),
                    ));
                    pushed += 1;
                }
                Err(error) => invalid = Some(error),
            }
            next += 1;
        }
        let more = next < summary.total && summary.error.is_none() && invalid.is_none();
        if in_flight.is_empty() {
            if !more {
                break;
            }
            if let Some(at) = due(next) {
                tokio::time::sleep_until(at.into()).await;
            }
            continue;
        }
        let wake_at = due(next).filter(|_| more && in_flight.len() < window);
        tokio::select! {
            settled = tokio::time::timeout(config.confirm_timeout, in_flight.next()) => {
                match settled {
                    Ok(Some(outcome)) => summary.record(outcome),
                    Ok(None) => {}
                    Err(_) => {
                        summary.error.get_or_insert_with(|| {
                            format!(
                                "no publisher confirm within {}",
                                humantime::format_duration(config.confirm_timeout)
                            )
                        });
                        break;
                    }
                }
            }
            () = sleep_until_opt(wake_at) => {}
        }
        if summary.settled().is_multiple_of(512) {
            progress.update(&summary, started, io);
        }
    }
    progress.update(&summary, started, io);
    progress.finish();
    let elapsed = started.elapsed();
    summary.elapsed_secs = elapsed.as_secs_f64();
    summary.msgs_per_sec = summary.confirmed as f64 / elapsed.as_secs_f64().max(1e-9);
    // Whatever was handed to lapin but never settled (a confirm timeout) counts as failed.
    let unsettled = pushed.saturating_sub(summary.settled());
    summary.sent += unsettled;
    summary.failed += unsettled;
    drop(in_flight);
    crate::cli::close_channel(&channel).await;
    match invalid {
        Some(error) => Err(error),
        None => Ok(summary),
    }
}

/// Sleeps until `at`, or forever without one.
async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}
