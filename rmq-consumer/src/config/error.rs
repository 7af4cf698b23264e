//! Why a configuration could not be loaded: [`ConfigError`] and its [`ConfigProblem`]s.

use std::fmt;
use std::path::PathBuf;

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The configuration file could not be read.
    #[error("cannot read config file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Some keys are bad, unknown or conflicting; every problem is listed.
    #[error("{}", describe_problems(problems))]
    Invalid {
        /// Every problem found, in a stable order.
        problems: Vec<ConfigProblem>,
    },
}

fn describe_problems(problems: &[ConfigProblem]) -> String {
    let list: Vec<String> = problems.iter().map(ToString::to_string).collect();
    format!(
        "invalid configuration ({} problem{}): {}",
        problems.len(),
        if problems.len() == 1 { "" } else { "s" },
        list.join("; ")
    )
}

/// One bad, unknown or conflicting configuration key. `Display`: `` `key`: message ``.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigProblem {
    /// The key as written: `prefetch_count`, `consumers.resize.timeout`, `log.level`, or an
    /// environment variable such as `RMQ_CONSUMER_PREFETCH_COUNT`.
    pub key: String,
    /// What is wrong, in lower case; never contains a password.
    pub message: String,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}`: {}", self.key, self.message)
    }
}

pub(crate) fn syntax_problem(text: &str, origin: &str, error: &toml::de::Error) -> ConfigProblem {
    let location = error.span().map(|span| {
        let before = text.get(..span.start).unwrap_or(text);
        let line = before.matches('\n').count() + 1;
        let column = before
            .rsplit('\n')
            .next()
            .map_or(0, |line| line.chars().count())
            + 1;
        format!(" at line {line}, column {column}")
    });
    // Only the parser's message, never the source excerpt `Display` adds: the offending
    // line may hold a password.
    let message = error.message().trim().replace('\n', ", ");
    ConfigProblem {
        key: origin.to_owned(),
        message: format!(
            "TOML syntax error{}: {message}",
            location.unwrap_or_default()
        ),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic, reason = "tests fail loudly")]
#[path = "tests/error.rs"]
mod tests;
