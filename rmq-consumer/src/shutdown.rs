//! SIGINT/SIGTERM: the first asks for a graceful shutdown, a second exits at once.

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Exit code used when a second signal cuts the drain short (128 + SIGINT).
pub const FORCED_EXIT_CODE: i32 = 130;

/// Cancels `token` on the first SIGINT or SIGTERM; exits the process on the second.
///
/// # Errors
/// The signal handlers cannot be installed.
pub(crate) fn listen(token: CancellationToken) -> Result<(), std::io::Error> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut interrupt = signal(SignalKind::interrupt())?;
        let mut terminate = signal(SignalKind::terminate())?;
        tokio::spawn(async move {
            for round in 0..2 {
                tokio::select! {
                    _ = interrupt.recv() => {}
                    _ = terminate.recv() => {}
                }
                if round == 0 {
                    info!(
                        "shutdown requested: cancelling consumers and draining in-flight deliveries (signal again to exit at once)"
                    );
                    token.cancel();
                } else {
                    warn!(
                        "second signal: exiting without draining; unacked deliveries will be redelivered"
                    );
                    std::process::exit(FORCED_EXIT_CODE);
                }
            }
        });
    }
    #[cfg(not(unix))]
    {
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                token.cancel();
            }
            if tokio::signal::ctrl_c().await.is_ok() {
                std::process::exit(FORCED_EXIT_CODE);
            }
        });
    }
    Ok(())
}
