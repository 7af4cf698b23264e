//! Helpers for the integration tests in `tests/tests/*.rs`, which run against a real
//! RabbitMQ (the one `$RMQ_TEST_BROKER` selects, see [`env`](mod@env)). The test binaries
//! link this library instead of each compiling a copy of the helpers, as tokio's
//! `tests/support` does.
//!
//! - [`env`](mod@env): which broker, its URLs, unique names for queues and exchanges.
//! - [`broker`]: the test's own connection ([`Broker`]): confirmed publishing, reading back
//!   ([`Received`]), queue probes, cleanup (also when a test panics).
//! - [`engine`]: a base [`Config`](rmq_consumer::Config) ([`test_config`]) and a spawned
//!   engine ([`Running`]).
//! - [`route`]: one handler's queues for one test ([`Route`]).
//! - [`ledger`]: the checker of `tests/RELIABILITY.md` ([`Ledger`]): nothing confirmed may be
//!   lost, duplicates are counted.
//! - [`rabbitmqctl`](mod@rabbitmqctl): `rabbitmqctl` on the test broker's node, and guards
//!   that undo what a fault test changed on the broker ([`PolicyGuard`], [`StoppedApp`],
//!   [`MemoryAlarm`]), one process's connections ([`close_connections_named`]).
//! - [`redis`](mod@redis): the shared Redis of the result store tests, a key guard
//!   ([`RedisKeys`]), a private `redis-server` to stop and start ([`PrivateRedis`]) and a
//!   listener that never answers ([`SilentRedis`]).
//! - [`users`]: broker users made for one test ([`TestUser`]).
//! - [`proxy`]: a TCP proxy that cuts, freezes or resets the engine's connections ([`Proxy`]).
//! - [`wait`]: polling until something holds ([`eventually`], [`eventually_async`]).
//! - [`worker`]: a worker process (`fault-worker`, `batch-worker`) the test can SIGTERM or
//!   kill ([`WorkerProcess`]).
//!
//! Every item is also re-exported at the root: a test writes
//! `use rmq_consumer_tests::{Broker, Route, Running, test_config, unique};`.
//!
//! The handlers stay in the test files: `#[consumer]` registers them in the test binary,
//! and [`Running::start`] picks them by name.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test helpers report a broken test environment by failing the test that called them"
)]

pub mod broker;
pub mod engine;
pub mod env;
pub mod ledger;
pub mod proxy;
pub mod rabbitmqctl;
pub mod redis;
pub mod route;
pub mod users;
pub mod wait;
pub mod worker;

pub use broker::{Broker, CleanupOnPanic, Received};
pub use engine::{Running, test_config};
pub use env::{
    TestBroker, broker_addr, broker_name, broker_url, cli_management_url, management_url, pki,
    test_broker, unique,
};
pub use ledger::{Ledger, LedgerReport, id_of, task};
pub use proxy::Proxy;
pub use rabbitmqctl::{
    MemoryAlarm, PolicyGuard, StoppedApp, close_connections_named, connections_named,
    host_rabbitmqctl, rabbitmqctl, rabbitmqctl_blocking,
};
pub use redis::{
    PrivateRedis, RedisKeys, RedisTls, SHARED_REDIS_URL, SilentRedis, redis_connect, redis_url,
};
pub use route::{Route, delay_queue};
pub use users::TestUser;
pub use wait::{eventually, eventually_async};
pub use worker::WorkerProcess;
