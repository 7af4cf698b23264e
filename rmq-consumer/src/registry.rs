//! Handlers registered by `#[consumer]`, collected with `inventory`.

use std::{any::Any, fmt, future::Future, pin::Pin};

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

/// A batch handler's argument for one message, decoded, with its type erased (the engine
/// gathers items of one handler, whose generated code alone knows their type).
pub type Item = Box<dyn Any + Send>;

/// One message of a batch handler, decoded: its task uuid and its item.
pub struct PreparedItem {
    pub(crate) task_uuid: String,
    pub(crate) item: Item,
}

impl PreparedItem {
    /// A decoded item and its task uuid.
    pub fn new<T: Send + 'static>(task_uuid: String, item: T) -> Self {
        Self {
            task_uuid,
            item: Box::new(item),
        }
    }

    /// The task uuid computed for this message.
    #[must_use]
    pub fn task_uuid(&self) -> &str {
        &self.task_uuid
    }
}

impl fmt::Debug for PreparedItem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PreparedItem")
            .field("task_uuid", &self.task_uuid)
            .finish_non_exhaustive()
    }
}

/// What one call of a batch handler produced: one output per item, in the items' order, or
/// an error that fails every item.
pub type BatchOutput = Result<Vec<HandlerOutput>, HandlerError>;

/// A boxed batch-handler future, as produced by generated code.
pub type BatchFuture = Pin<Box<dyn Future<Output = BatchOutput> + Send + 'static>>;

/// How a batch handler's body runs.
pub(crate) enum BatchCall {
    /// An async fn, polled on the runtime.
    Async(BatchFuture),
    /// A blocking call, run on `spawn_blocking`.
    Blocking(Box<dyn FnOnce() -> BatchOutput + Send + 'static>),
}

/// A batch handler call bound to its items, ready to run.
pub struct BatchRun {
    pub(crate) call: BatchCall,
}

impl BatchRun {
    /// An async batch call.
    pub fn new(future: BatchFuture) -> Self {
        Self {
            call: BatchCall::Async(future),
        }
    }

    /// A batch call that blocks; the engine runs it on tokio's blocking pool.
    pub fn blocking<F>(call: F) -> Self
    where
        F: FnOnce() -> BatchOutput + Send + 'static,
    {
        Self {
            call: BatchCall::Blocking(Box::new(call)),
        }
    }
}

impl fmt::Debug for BatchRun {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.call {
            BatchCall::Async(_) => "async",
            BatchCall::Blocking(_) => "blocking",
        };
        f.debug_struct("BatchRun").field("call", &kind).finish()
    }
}

/// Decodes one message of a batch handler into a [`PreparedItem`] (the body is checked as
/// for [`PrepareFn`]).
pub type PrepareItemFn = fn(&[u8]) -> Result<PreparedItem, HandlerError>;

/// Binds a batch handler call to its items (each made by the same handler's
/// [`PrepareItemFn`]); an item of another type is an error, never a panic.
pub type RunBatchFn = fn(Vec<Item>) -> Result<BatchRun, HandlerError>;

/// What makes a handler a batch handler (`batch = N` on `#[consumer]`).
#[derive(Debug, Clone, Copy)]
pub struct BatchSpec {
    /// The most items one call takes (`batch = N`, at least 1).
    pub size: u16,
    /// How long the first item of a batch may wait for more (`batch_wait`), in
    /// milliseconds; `None`: the engine's default.
    pub wait_ms: Option<u64>,
    /// Decodes one message into an item.
    pub prepare: PrepareItemFn,
    /// Binds a call to a batch of items.
    pub run: RunBatchFn,
}

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
    /// Decodes a body and binds the handler call. For a batch handler: a call with a batch
    /// of this one message (what the suspect queue, where each message runs alone, uses).
    pub prepare: PrepareFn,
    /// `Some` for a batch handler (`batch = N`).
    pub batch: Option<BatchSpec>,
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
