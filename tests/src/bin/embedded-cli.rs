//! A worker binary that embeds the operator CLI, the way a user binary does: the same
//! `rmq_consumer::cli::main()` as the `rmq-consumer` binary. The CLI tests run it as a real
//! process (no handlers are registered in it).

fn main() -> std::process::ExitCode {
    rmq_consumer::cli::main()
}
