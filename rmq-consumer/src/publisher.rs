//! Confirmed, mandatory publishing on a dedicated channel that reopens itself after a
//! channel-level error (e.g. a missing exchange), so one bad route does not stop other work.

use std::{sync::Arc, time::Duration};

use lapin::{
    BasicProperties, Channel, Confirmation, Connection,
    options::{BasicPublishOptions, ConfirmSelectOptions},
};
use tokio::sync::Mutex;

use crate::{amqp::short, error::PublishError};

/// Publishes with publisher confirms and `mandatory`; a message counts as published only when
/// the broker acked it and did not return it.
#[derive(Clone, Debug)]
pub struct Publisher {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    connection: Arc<Connection>,
    channel: Mutex<Channel>,
    confirm_timeout: Duration,
}

impl Publisher {
    /// Opens the confirm channel on `connection`.
    ///
    /// # Errors
    /// The channel cannot be opened or put in confirm mode.
    pub async fn open(
        connection: &Arc<Connection>,
        confirm_timeout: Duration,
    ) -> Result<Self, lapin::Error> {
        let channel = open_confirm_channel(connection).await?;
        Ok(Self {
            inner: Arc::new(Inner {
                connection: Arc::clone(connection),
                channel: Mutex::new(channel),
                confirm_timeout,
            }),
        })
    }

    async fn channel(&self) -> Result<Channel, lapin::Error> {
        let mut guard = self.inner.channel.lock().await;
        if !guard.status().connected() && self.inner.connection.status().connected() {
            *guard = open_confirm_channel(&self.inner.connection).await?;
        }
        Ok(guard.clone())
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
        let channel = self.channel().await.map_err(channel_error)?;
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
        let confirmation = tokio::time::timeout(self.inner.confirm_timeout, confirm)
            .await
            .map_err(|_| PublishError::ConfirmTimeout {
                exchange: exchange.to_owned(),
                routing_key: routing_key.to_owned(),
                after: self.inner.confirm_timeout,
            })?
            .map_err(channel_error)?;
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

    /// Closes the channel.
    pub async fn close(&self) {
        let channel = self.inner.channel.lock().await;
        if channel.status().connected() {
            let _ = channel.close(200, "bye".into()).await;
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
