//! Handlers registered by `#[consumer]`, collected with `inventory`.

use std::{fmt, future::Future, pin::Pin};

use crate::handler::{HandlerError, HandlerOutput};

/// A boxed handler future, as produced by generated code.
pub type HandlerFuture = Pin<Box<dyn Future<Output = HandlerOutput> + Send + 'static>>;

/// How the handler body runs.
pub(crate) enum Call {
    /// An async fn, polled on the runtime.
    Async(Box<dyn FnOnce() -> HandlerFuture + Send + 'static>),
    /// A blocking call, run on `spawn_blocking`.
    Blocking(Box<dyn FnOnce() -> HandlerOutput + Send + 'static>),
}

/// A decoded message, ready to run: its task uuid and the handler call bound to its argument.
pub struct Prepared {
    pub(crate) task_uuid: String,
    pub(crate) call: Call,
}

impl Prepared {
    /// An async handler call.
    pub fn new<F>(task_uuid: String, call: F) -> Self
    where
        F: FnOnce() -> HandlerFuture + Send + 'static,
    {
        Self {
            task_uuid,
            call: Call::Async(Box::new(call)),
        }
    }

    /// A handler call that blocks; the engine runs it on tokio's blocking pool.
    pub fn blocking<F>(task_uuid: String, call: F) -> Self
    where
        F: FnOnce() -> HandlerOutput + Send + 'static,
    {
        Self {
            task_uuid,
            call: Call::Blocking(Box::new(call)),
        }
    }

    /// The task uuid computed for this message.
    #[must_use]
    pub fn task_uuid(&self) -> &str {
        &self.task_uuid
    }
}

impl fmt::Debug for Prepared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.call {
            Call::Async(_) => "async",
            Call::Blocking(_) => "blocking",
        };
        f.debug_struct("Prepared")
            .field("task_uuid", &self.task_uuid)
            .field("call", &kind)
            .finish()
    }
}

/// Decodes a message body (its bytes, already checked to be one JSON document within the
/// handler's memory budget) into a [`Prepared`] call.
pub type PrepareFn = fn(&[u8]) -> Result<Prepared, HandlerError>;

/// One handler as declared by `#[consumer(...)]`. Generated code builds these; settings from
/// the configuration file override the attribute's at startup.
#[derive(Debug, Clone, Copy)]
pub struct HandlerSpec {
    /// The handler's name (`name = "..."`, default: the fn's name); keys `[consumers.<name>]`.
    pub name: &'static str,
    /// The queue to consume.
    pub queue: &'static str,
    /// The routing key results are published with; `None` publishes no result.
    pub reply_key: Option<&'static str>,
    /// The response queue to declare and bind to `reply_key`.
    pub reply_queue: Option<&'static str>,
    /// Per-handler prefetch override.
    pub prefetch: Option<u16>,
    /// Per-handler `message_timeout` override, in seconds.
    pub timeout_secs: Option<u64>,
    /// Per-handler `max_retry_count` override.
    pub max_retries: Option<u32>,
    /// Per-handler queue type override (`"classic"` or `"quorum"`).
    pub queue_type: Option<&'static str>,
    /// Whether the handler runs on the blocking thread pool.
    pub blocking: bool,
    /// `module_path!()` of the handler.
    pub module_path: &'static str,
    /// `file!()` of the handler.
    pub file: &'static str,
    /// `line!()` of the handler.
    pub line: u32,
    /// Decodes a body and binds the handler call.
    pub prepare: PrepareFn,
}

impl HandlerSpec {
    /// `file:line` of the annotated fn.
    #[must_use]
    pub fn location(&self) -> String {
        format!("{}:{}", self.file, self.line)
    }
}

inventory::collect!(HandlerSpec);

/// Every handler registered in this binary, sorted by name then queue (inventory's order is
/// unspecified).
#[must_use]
pub fn handlers() -> Vec<&'static HandlerSpec> {
    let mut all: Vec<&'static HandlerSpec> = inventory::iter::<HandlerSpec>.into_iter().collect();
    all.sort_by(|a, b| (a.name, a.queue, a.file, a.line).cmp(&(b.name, b.queue, b.file, b.line)));
    all
}
