//! `rmq-consumer handlers`: the `#[consumer]` handlers registered in this binary.
//!
//! The stand-alone `rmq-consumer` binary has none; a binary that declares handlers and calls
//! [`crate::cli::main`] lists its own.

use serde::Serialize;

use super::{CliError, EXIT_OK, Global, Io, chain, load_config};
use crate::{registry, settings};

/// List the registered handlers.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// One handler as listed.
#[derive(Debug, Serialize)]
struct Listed {
    name: &'static str,
    /// The queue named in the attribute.
    queue: &'static str,
    reply_key: Option<&'static str>,
    reply_queue: Option<&'static str>,
    blocking: bool,
    location: String,
    module: &'static str,
    /// The queue after the configuration's overrides, when the configuration resolves.
    #[serde(skip_serializing_if = "Option::is_none")]
    effective_queue: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dead_letter_queue: Option<String>,
}

pub(crate) fn run(global: &Global, args: &Args, io: &mut Io<'_>) -> Result<i32, CliError> {
    let specs = registry::handlers();
    // The configuration only refines the listing; a bad one is reported but does not fail it.
    let resolved = if specs.is_empty() {
        Vec::new()
    } else {
        match load_config(global)
            .and_then(|config| settings::resolve(&config, &specs).map_err(CliError::from))
        {
            Ok(all) => all,
            Err(error) => {
                writeln!(
                    io.err,
                    "note: showing the attributes only; the configuration does not resolve: {}",
                    chain(&error)
                )?;
                Vec::new()
            }
        }
    };
    let listed: Vec<Listed> = specs
        .iter()
        .map(|spec| {
            let effective = resolved.iter().find(|s| s.name == spec.name);
            Listed {
                name: spec.name,
                queue: spec.queue,
                reply_key: spec.reply_key,
                reply_queue: spec.reply_queue,
                blocking: spec.blocking,
                location: spec.location(),
                module: spec.module_path,
                effective_queue: effective.map(|s| s.queue.clone()),
                dead_letter_queue: effective.and_then(|s| s.dead_letter_queue.clone()),
            }
        })
        .collect();
    if args.json {
        serde_json::to_writer_pretty(&mut *io.out, &listed)?;
        writeln!(io.out)?;
        return Ok(EXIT_OK);
    }
    if listed.is_empty() {
        writeln!(
            io.out,
            "no handlers are registered in this binary (a binary that declares #[consumer] \
             handlers lists them by calling rmq_consumer::cli::main())"
        )?;
        return Ok(EXIT_OK);
    }
    for handler in &listed {
        let queue = match &handler.effective_queue {
            Some(effective) if effective != handler.queue => {
                format!("{effective} (attribute: {})", handler.queue)
            }
            _ => handler.queue.to_owned(),
        };
        writeln!(io.out, "{}", handler.name)?;
        writeln!(io.out, "  queue: {queue}")?;
        if let Some(key) = handler.reply_key {
            writeln!(io.out, "  reply_key: {key}")?;
        }
        if let Some(reply_queue) = handler.reply_queue {
            writeln!(io.out, "  reply_queue: {reply_queue}")?;
        }
        if let Some(dlq) = &handler.dead_letter_queue {
            writeln!(io.out, "  dead_letter_queue: {dlq}")?;
        }
        if handler.blocking {
            writeln!(io.out, "  blocking: true")?;
        }
        writeln!(io.out, "  at: {} ({})", handler.location, handler.module)?;
    }
    Ok(EXIT_OK)
}
