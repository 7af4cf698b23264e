//! A TCP proxy between the engine and the broker, for network faults (F06 in
//! `observability.rs`, F07 in `fault_network.rs`): the engine connects through it, the test's
//! own connections go to the broker directly.

use std::{
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::{net::TcpListener, task::JoinSet};
use tokio_util::sync::CancellationToken;

use crate::env::broker_addr;

/// A TCP proxy to the broker that the test can cut and restore, freeze (a silent network
/// loss), or make reset every connection after it has forwarded a few KB.
#[derive(Debug)]
pub struct Proxy {
    /// Where it listens (127.0.0.1, a free port).
    addr: std::net::SocketAddr,
    /// The accept loop and one task per proxied connection.
    tasks: Arc<tokio::sync::Mutex<JoinSet<()>>>,
    /// While set, the proxy holds its connections open but forwards nothing (a silent
    /// network loss).
    frozen: Arc<AtomicBool>,
    /// The reset mode and the counters.
    state: Arc<ProxyState>,
}

/// The proxy's reset mode and counters, shared with its connection tasks.
#[derive(Debug, Default)]
struct ProxyState {
    /// Reset each connection after it forwarded between `reset_min` and `reset_max` bytes
    /// (both directions together); `reset_max == 0`: plain forwarding.
    reset_min: AtomicUsize,
    reset_max: AtomicUsize,
    /// Back to plain forwarding after the next reset.
    reset_once: AtomicBool,
    /// A xorshift state for the per-connection limits.
    seed: AtomicU64,
    /// Connections reset so far.
    resets: AtomicU64,
    /// Connections accepted so far.
    accepted: AtomicU64,
    /// Proxied connections open now.
    open: AtomicUsize,
    /// The local port of every connection the proxy opened to the broker (the broker's
    /// `peer_port` of the proxied connection).
    upstream_ports: Mutex<Vec<u16>>,
}

impl ProxyState {
    /// The reset limit of a new connection: uniform in `reset_min..=reset_max`.
    fn pick_limit(&self) -> usize {
        use Ordering::Relaxed;
        let mut x = self.seed.load(Relaxed) | 1;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.seed.store(x, Relaxed);
        let (min, max) = (self.reset_min.load(Relaxed), self.reset_max.load(Relaxed));
        let span = max.saturating_sub(min) as u64 + 1;
        min + (x % span) as usize
    }

    fn resetting(&self) -> bool {
        self.reset_max.load(Ordering::Relaxed) > 0
    }
}

/// One proxied connection: its byte count, its reset limit, and the token that stops both
/// directions at a reset.
struct ProxyLink {
    state: Arc<ProxyState>,
    frozen: Arc<AtomicBool>,
    forwarded: AtomicUsize,
    limit: usize,
    reset: CancellationToken,
}

/// Counts the open proxied connections.
struct OpenGuard(Arc<ProxyState>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Copies `from` to `to` until EOF, pausing (without reading) while frozen. In reset mode,
/// once the connection forwarded its limit, sets `SO_LINGER` 0 on both sockets and stops
/// both directions: the sockets close with an RST each way.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    link: Arc<ProxyLink>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0_u8; 16 * 1024];
    loop {
        while link.frozen.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let read = tokio::select! {
            read = from.read(&mut buf) => read,
            () = link.reset.cancelled() => return,
            () = tokio::time::sleep(Duration::from_millis(50)) => continue,
        };
        let Ok(n @ 1..) = read else { return };
        while link.frozen.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if link.reset.is_cancelled() || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
        let forwarded = link.forwarded.fetch_add(n, Ordering::SeqCst) + n;
        if link.state.resetting() && forwarded >= link.limit && !link.reset.is_cancelled() {
            let _ = from.as_ref().set_zero_linger();
            let _ = to.as_ref().set_zero_linger();
            if link.state.reset_once.swap(false, Ordering::SeqCst) {
                link.state.reset_max.store(0, Ordering::SeqCst);
            }
            link.state.resets.fetch_add(1, Ordering::SeqCst);
            link.reset.cancel();
            return;
        }
    }
}

impl Proxy {
    /// Listens on a free local port and forwards every connection to the test broker.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0x9e37_79b9, |d| d.as_nanos() as u64);
        let state = ProxyState::default();
        state.seed.store(seed, Ordering::Relaxed);
        let proxy = Self {
            addr,
            tasks: Arc::new(tokio::sync::Mutex::new(JoinSet::new())),
            frozen: Arc::new(AtomicBool::new(false)),
            state: Arc::new(state),
        };
        proxy.serve(listener).await;
        proxy
    }

    async fn serve(&self, listener: TcpListener) {
        let tasks = Arc::clone(&self.tasks);
        let frozen = Arc::clone(&self.frozen);
        let state = Arc::clone(&self.state);
        // The test broker's AMQP address (`RMQ_TEST_BROKER`, `RMQ_TEST_URL`).
        let (host, port) = broker_addr();
        let upstream_addr: Arc<str> = Arc::from(format!("{host}:{port}"));
        self.tasks.lock().await.spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    return;
                };
                let frozen = Arc::clone(&frozen);
                let state = Arc::clone(&state);
                let upstream_addr = Arc::clone(&upstream_addr);
                let mut tasks = tasks.lock().await;
                // Reap finished connections: the set holds only live ones.
                while tasks.try_join_next().is_some() {}
                tasks.spawn(async move {
                    state.accepted.fetch_add(1, Ordering::SeqCst);
                    state.open.fetch_add(1, Ordering::SeqCst);
                    let _open = OpenGuard(Arc::clone(&state));
                    let Ok(upstream) = tokio::net::TcpStream::connect(&*upstream_addr).await else {
                        return;
                    };
                    // Forward small frames at once, as a direct connection does (Nagle plus
                    // delayed ACKs would add ~40 ms to every round trip).
                    let _ = inbound.set_nodelay(true);
                    let _ = upstream.set_nodelay(true);
                    if let Ok(local) = upstream.local_addr() {
                        state
                            .upstream_ports
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .push(local.port());
                    }
                    let link = Arc::new(ProxyLink {
                        limit: state.pick_limit(),
                        state,
                        frozen,
                        forwarded: AtomicUsize::new(0),
                        reset: CancellationToken::new(),
                    });
                    let (in_read, in_write) = inbound.into_split();
                    let (up_read, up_write) = upstream.into_split();
                    tokio::join!(
                        pump(in_read, up_write, Arc::clone(&link)),
                        pump(up_read, in_write, link),
                    );
                });
            }
        });
    }

    /// Drops every proxied connection and stops listening: the broker is unreachable.
    pub async fn cut(&self) {
        self.tasks.lock().await.abort_all();
    }

    /// Stops (`true`) or resumes (`false`) forwarding, keeping the connections open: a
    /// silent network loss.
    pub fn freeze(&self, frozen: bool) {
        self.frozen.store(frozen, Ordering::SeqCst);
    }

    /// Listens again on the same address after [`Proxy::cut`].
    pub async fn restore(&self) {
        let listener = TcpListener::bind(self.addr).await.unwrap();
        self.serve(listener).await;
    }

    /// Resets (RST both ways) every connection, the open ones included, once it has forwarded
    /// between `min` and `max` bytes (both directions together; a fresh limit per connection).
    pub fn reset_every(&self, min: usize, max: usize) {
        assert!(0 < min && min <= max, "a byte range, not {min}..={max}");
        self.state.reset_min.store(min, Ordering::SeqCst);
        self.state.reset_max.store(max, Ordering::SeqCst);
    }

    /// Resets the next connection that forwards a byte, then forwards plainly again.
    pub fn reset_once(&self) {
        self.state.reset_once.store(true, Ordering::SeqCst);
        self.reset_every(1, 1);
    }

    /// Back to plain forwarding.
    pub fn stop_resetting(&self) {
        self.state.reset_max.store(0, Ordering::SeqCst);
    }

    /// Connections reset so far.
    pub fn resets(&self) -> u64 {
        self.state.resets.load(Ordering::SeqCst)
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.state.accepted.load(Ordering::SeqCst)
    }

    /// Proxied connections open now.
    pub fn open_connections(&self) -> usize {
        self.state.open.load(Ordering::SeqCst)
    }

    /// The local ports of every connection the proxy opened to the broker.
    pub fn upstream_ports(&self) -> Vec<u16> {
        self.state
            .upstream_ports
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// An AMQP URL (user `guest`, vhost `/`) through the proxy, for the engine.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.addr)
    }
}
