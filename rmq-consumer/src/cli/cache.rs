//! `rmq-consumer cache get|forget`: one task's entry in the shared result store
//! (`result_store`), for operators: what a task's result is, who holds its lease, and how to
//! make its next delivery run the handler again (on a worker whose in-process LRU does not
//! still hold the result: `forget` reaches the store, not the workers' memory).
//!
//! Exit codes of `get`: 0 a result is stored, 1 nothing is stored, 2 the store failed (or is
//! not configured). `forget`: 0 when the store answered, 2 otherwise. The store's URL is
//! printed masked; results and uuids go through [`super::output`].

use serde::Serialize;
use serde_json::Value;

use super::{CliError, EXIT_ERROR, EXIT_FAILURE, EXIT_OK, Global, Io, load_config, output};
use crate::store::{Inspected, Store};

/// A task's entry in the shared result store.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum Command {
    /// Print a task's stored result (the JSON its workers publish); exit 1 when nothing is
    /// stored, 2 when the store fails.
    Get(GetArgs),
    /// Delete a task's stored result and lease: its next delivery runs the handler again,
    /// unless a worker's in-process cache still holds the result.
    Forget(Task),
}

/// The task: its handler and uuid.
#[derive(Debug, clap::Args)]
pub(crate) struct Task {
    /// The handler's name (its fn name, as in `[consumers.<name>]`).
    #[arg(long, value_name = "NAME")]
    handler: String,
    /// The task uuid (the result's `message_id`).
    uuid: String,
}

/// `cache get`.
#[derive(Debug, clap::Args)]
pub(crate) struct GetArgs {
    #[command(flatten)]
    task: Task,
    /// Print JSON: the key, whether a result is stored, the result, its time to live and the
    /// lease holder.
    #[arg(long)]
    json: bool,
}

/// `cache get --json`.
#[derive(Debug, Serialize)]
struct Report<'a> {
    handler: &'a str,
    uuid: &'a str,
    key: &'a str,
    stored: bool,
    /// Whether the handler returned a result (`false`: nothing is published for the task).
    #[serde(skip_serializing_if = "Option::is_none")]
    has_result: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<&'a Value>,
    /// Milliseconds the stored result lives on.
    #[serde(skip_serializing_if = "Option::is_none")]
    ttl_ms: Option<u64>,
    /// The token of the replica holding the task's lease (running it now).
    #[serde(skip_serializing_if = "Option::is_none")]
    lease_holder: Option<&'a str>,
}

pub(crate) async fn run(
    global: &Global,
    command: Command,
    io: &mut Io<'_>,
) -> Result<i32, CliError> {
    let config = load_config(global)?;
    let Some(url) = &config.result_store else {
        return Err(CliError::Usage(
            "no result store is configured: set `result_store` (or RMQ_CONSUMER_RESULT_STORE) \
             to the workers' redis:// URL"
                .to_owned(),
        ));
    };
    let store = Store::new(&config, url, Vec::new())?;
    match command {
        Command::Get(args) => get(&store, &args, io).await,
        Command::Forget(task) => forget(&store, &task, io).await,
    }
}

fn checked(task: &Task) -> Result<(), CliError> {
    if task.handler.is_empty() || task.handler.contains(':') {
        return Err(CliError::Usage(
            "--handler must be a handler's name (its fn name: not empty, no `:`)".to_owned(),
        ));
    }
    Ok(())
}

async fn get(store: &Store, args: &GetArgs, io: &mut Io<'_>) -> Result<i32, CliError> {
    let task = &args.task;
    checked(task)?;
    let key = store.key(&task.handler, &task.uuid);
    let Inspected {
        stored,
        ttl_ms,
        lease_holder,
    } = match store.inspect(&task.handler, &task.uuid).await {
        Ok(inspected) => inspected,
        Err(error) => {
            output::say!(io.err, "error: {}", super::chain(&error))?;
            return Ok(EXIT_ERROR);
        }
    };
    if args.json {
        let report = Report {
            handler: &task.handler,
            uuid: &task.uuid,
            key: &key,
            stored: stored.is_some(),
            has_result: stored.as_ref().map(Option::is_some),
            result: stored.as_ref().and_then(Option::as_ref),
            ttl_ms: stored.as_ref().and(ttl_ms),
            lease_holder: lease_holder.as_deref(),
        };
        output::json(io.out, &report)?;
    } else {
        match &stored {
            Some(Some(result)) => output::json_line(io.out, result)?,
            Some(None) => output::say!(
                io.out,
                "the handler returned no result for this task (nothing is published for it)"
            )?,
            None => {
                let running = lease_holder.as_deref().map_or_else(String::new, |holder| {
                    format!("; its lease is held by `{holder}` (running now)")
                });
                output::say!(
                    io.err,
                    "nothing is stored for task `{}` of handler `{}` in {} (key `{}`){running}",
                    task.uuid,
                    task.handler,
                    store.shown(),
                    key
                )?;
            }
        }
    }
    Ok(if stored.is_some() {
        EXIT_OK
    } else {
        EXIT_FAILURE
    })
}

async fn forget(store: &Store, task: &Task, io: &mut Io<'_>) -> Result<i32, CliError> {
    checked(task)?;
    match store.forget(&task.handler, &task.uuid).await {
        Ok(0) => {
            output::say!(
                io.out,
                "nothing was stored for task `{}` of handler `{}`",
                task.uuid,
                task.handler
            )?;
            Ok(EXIT_OK)
        }
        Ok(deleted) => {
            output::say!(
                io.out,
                "forgot task `{}` of handler `{}` ({deleted} key{} deleted); its next delivery runs the handler unless a worker's in-process cache still holds it",
                task.uuid,
                task.handler,
                if deleted == 1 { "" } else { "s" }
            )?;
            Ok(EXIT_OK)
        }
        Err(error) => {
            output::say!(io.err, "error: {}", super::chain(&error))?;
            Ok(EXIT_ERROR)
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::cli::{EXIT_ERROR, run_args};

    fn run(config: &str, args: &[&str]) -> (i32, String) {
        let dir = std::env::temp_dir().join(format!("rmq-cache-cli-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join(format!("{}.toml", args.join("_").replace(['/', ' '], "_")));
        let written = std::fs::write(&path, config);
        assert!(written.is_ok(), "{written:?}");
        let mut argv = vec!["rmq-consumer", "--config"];
        let path_text = path.display().to_string();
        argv.push(&path_text);
        argv.extend(args);
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let code = run_args(argv, &mut out, &mut err);
        let _ = std::fs::remove_file(&path);
        (
            code,
            format!(
                "{}{}",
                String::from_utf8_lossy(&out),
                String::from_utf8_lossy(&err)
            ),
        )
    }

    #[test]
    fn without_a_store_it_says_which_key_to_set() {
        let (code, text) = run("", &["cache", "get", "--handler", "h", "u"]);
        assert_eq!(code, EXIT_ERROR, "{text}");
        assert!(text.contains("result_store"), "{text}");
    }

    #[test]
    fn a_store_failure_exits_2_without_the_password() {
        // Nothing listens on port 1.
        let config =
            "result_store = \"redis://:s3cret@127.0.0.1:1/0\"\nresult_store_timeout = \"200ms\"";
        for args in [
            &["cache", "get", "--handler", "h", "u"][..],
            &["cache", "forget", "--handler", "h", "u"],
        ] {
            let (code, text) = run(config, args);
            assert_eq!(code, EXIT_ERROR, "{text}");
            assert!(!text.contains("s3cret"), "{text}");
            assert!(text.contains("redis://:****@127.0.0.1:1/0"), "{text}");
        }
    }

    #[test]
    fn a_handler_name_with_a_colon_is_refused() {
        let config = "result_store = \"redis://127.0.0.1:1/0\"";
        let (code, text) = run(config, &["cache", "get", "--handler", "a:b", "u"]);
        assert_eq!(code, EXIT_ERROR, "{text}");
        assert!(text.contains("--handler"), "{text}");
    }
}
