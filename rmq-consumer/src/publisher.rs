//! Confirmed, mandatory publishing on a small pool of dedicated confirm channels. A channel
//! that failed (e.g. a publish to a missing exchange closes it) is replaced, so one bad route
//! does not stop other work.
//!
//! Each channel carries one publish at a time, its confirm included: lapin hands a
//! `basic.return` to whichever confirm it completes next (a multiple ack completes several,
//! in no set order), so with concurrent publishes on one channel a returned message could be
//! reported as delivered and its input acked and lost. Concurrency comes from the pool.

use std::{
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use lapin::{
    BasicProperties, Channel, Confirmation, Connection,
    options::{BasicPublishOptions, ConfirmSelectOptions},
};
use tokio::sync::Semaphore;

use crate::{amqp::short, error::PublishError};

/// Confirm channels per connection: the number of publishes (results, retries, dead letters)
/// waiting for their confirm at once.
pub const DEFAULT_PUBLISH_CHANNELS: usize = 32;

/// Publishes with publisher confirms and `mandatory`; a message counts as published only when
/// the broker acked it and did not return it.
#[derive(Clone, Debug)]
pub struct Publisher {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    connection: Arc<Connection>,
    /// Idle channels; at most `permits` exist.
    idle: Mutex<Vec<Channel>>,
    permits: Semaphore,
    confirm_timeout: Duration,
}

impl Publisher {
    /// Opens the first confirm channel on `connection` (more are opened on demand, up to
    /// `channels`).
    ///
    /// # Errors
    /// The channel cannot be opened or put in confirm mode.
    pub async fn open(
        connection: &Arc<Connection>,
        confirm_timeout: Duration,
        channels: usize,
    ) -> Result<Self, lapin::Error> {
        let channel = open_confirm_channel(connection).await?;
        Ok(Self {
            inner: Arc::new(Inner {
                connection: Arc::clone(connection),
                idle: Mutex::new(vec![channel]),
                permits: Semaphore::new(channels.max(1)),
                confirm_timeout,
            }),
        })
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<Channel>> {
        self.inner
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Publishes `body` and waits for the broker's confirm.
    ///
    /// # Errors
    /// The message was returned as unroutable, nacked, not confirmed within the confirm
    /// timeout, or the channel failed.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), PublishError> {
        let channel_error = |source| PublishError::Channel {
            exchange: exchange.to_owned(),
            routing_key: routing_key.to_owned(),
            source,
        };
        let _permit = self.inner.permits.acquire().await;
        let reusable = self.idle().pop().filter(|c| c.status().connected());
        let channel = match reusable {
            Some(channel) => channel,
            None => open_confirm_channel(&self.inner.connection)
                .await
                .map_err(channel_error)?,
        };
        let confirm = channel
            .basic_publish(
                short(exchange),
                short(routing_key),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                body,
                properties,
            )
            .await
            .map_err(channel_error)?;
        // A confirm that never came could still bring a late return: that channel is not
        // reused (dropping the last handle closes it).
        let confirmation = tokio::time::timeout(self.inner.confirm_timeout, confirm)
            .await
            .map_err(|_| PublishError::ConfirmTimeout {
                exchange: exchange.to_owned(),
                routing_key: routing_key.to_owned(),
                after: self.inner.confirm_timeout,
            })?
            .map_err(channel_error)?;
        if channel.status().connected() {
            self.idle().push(channel);
        }
        match confirmation {
            Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
            Confirmation::Ack(Some(returned)) => Err(PublishError::Unroutable {
                exchange: exchange.to_owned(),
                routing_key: routing_key.to_owned(),
                reply_code: returned.reply_code,
                reply_text: returned.reply_text.to_string(),
            }),
            Confirmation::Nack(_) => Err(PublishError::Nacked {
                exchange: exchange.to_owned(),
                routing_key: routing_key.to_owned(),
            }),
        }
    }

    /// Closes the channels.
    pub async fn close(&self) {
        self.inner.permits.close();
        let channels: Vec<Channel> = std::mem::take(&mut *self.idle());
        for channel in channels {
            if channel.status().connected() {
                let _ = channel.close(200, "bye".into()).await;
            }
        }
    }
}

async fn open_confirm_channel(connection: &Connection) -> Result<Channel, lapin::Error> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}
