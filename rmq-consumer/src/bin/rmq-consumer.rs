//! The `rmq-consumer` operator CLI; see [`rmq_consumer::cli`].

fn main() -> std::process::ExitCode {
    rmq_consumer::cli::main()
}
