//! Broker users made for one test (permissions, `user_id` checks), deleted when they drop.

use crate::{
    env::{broker_url, unique},
    rabbitmqctl::{rabbitmqctl, rabbitmqctl_blocking},
};

/// A broker user made for one test, deleted when it drops (even on a panic).
#[derive(Debug)]
pub struct TestUser {
    /// The user name, unique per test.
    pub name: String,
}

impl TestUser {
    /// A user with every permission.
    pub async fn create(password: &str) -> Self {
        Self::with_permissions(password, ".*", ".*", ".*").await
    }

    /// A user with these `configure`, `write` and `read` permission patterns.
    pub async fn with_permissions(
        password: &str,
        configure: &str,
        write: &str,
        read: &str,
    ) -> Self {
        let name = unique("user");
        rabbitmqctl(&["add_user", &name, password]).await;
        let user = Self { name };
        let vhost = <lapin::uri::AMQPUri as std::str::FromStr>::from_str(&broker_url())
            .unwrap()
            .vhost;
        rabbitmqctl(&[
            "set_permissions",
            "-p",
            &vhost,
            &user.name,
            configure,
            write,
            read,
        ])
        .await;
        user
    }

    /// The test broker's URL with this user's credentials.
    pub fn url(&self, password: &str) -> String {
        let mut uri = <lapin::uri::AMQPUri as std::str::FromStr>::from_str(&broker_url()).unwrap();
        uri.authority.userinfo.username = self.name.clone();
        uri.authority.userinfo.password = password.to_owned();
        let vhost: String = uri
            .vhost
            .bytes()
            .map(|b| match b {
                b'/' => "%2f".to_owned(),
                _ => char::from(b).to_string(),
            })
            .collect();
        format!(
            "amqp://{}:{}@{}:{}/{vhost}",
            uri.authority.userinfo.username,
            uri.authority.userinfo.password,
            uri.authority.host,
            uri.authority.port
        )
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        let _ = rabbitmqctl_blocking(&["delete_user", &self.name]);
    }
}
