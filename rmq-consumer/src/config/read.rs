//! The reader: one [`Scope`] per table with its environment variables, and the unknown-key
//! hints.
//!
//! Every key is spelled once, where it is read (its entry in [`super::keys`]): the scope
//! records the names it is asked for, and whatever is left over is unknown, with a hint
//! among the names recorded.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use super::error::syntax_problem;
use super::value::{FromConfigValue, range_message};
use super::{CONFIG_PATH_ENV, Config, ConfigError, ConfigProblem, ENV_PREFIX};

const CONSUMERS_ENV: &str = "CONSUMERS__";

mod special;

pub(crate) fn build(
    toml: Option<(&str, &str)>,
    env: impl IntoIterator<Item = (String, String)>,
    mut problems: Vec<ConfigProblem>,
) -> Result<Config, ConfigError> {
    let table = match toml {
        Some((text, origin)) => match text.parse::<toml::Table>() {
            Ok(table) => table,
            Err(error) => {
                problems.push(syntax_problem(text, origin, &error));
                toml::Table::new()
            }
        },
        None => toml::Table::new(),
    };

    // Split the environment into top-level keys and per-consumer keys.
    let mut top_env = BTreeMap::new();
    let mut consumer_env: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for (name, value) in env {
        let Some(suffix) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        if name == CONFIG_PATH_ENV {
            continue;
        }
        if let Some(rest) = suffix.strip_prefix(CONSUMERS_ENV) {
            match rest.split_once("__") {
                Some((handler, key)) if !handler.is_empty() && !key.is_empty() => {
                    consumer_env
                        .entry(handler.to_ascii_lowercase())
                        .or_default()
                        .insert(key.to_ascii_uppercase(), value);
                }
                _ => problems.push(ConfigProblem {
                    key: name.clone(),
                    message: format!(
                        "expected {ENV_PREFIX}{CONSUMERS_ENV}<HANDLER>__<KEY>, e.g. \
                         {ENV_PREFIX}{CONSUMERS_ENV}MY_HANDLER__QUEUE"
                    ),
                }),
            }
        } else {
            top_env.insert(suffix.to_owned(), value);
        }
    }

    let mut scope = Scope::new(String::new(), ENV_PREFIX.to_owned(), table, top_env);
    scope.problems = problems;
    scope.consumer_env = consumer_env;
    let config = Config::read_from(&mut scope);
    scope.report_unknown();
    scope.check_result_store(&config);
    if scope.problems.is_empty() {
        Ok(config)
    } else {
        Err(ConfigError::Invalid {
            problems: scope.problems,
        })
    }
}

/// A raw value before conversion to its key's type.
enum Raw {
    Toml(toml::Value),
    Env(String),
}

/// One table of settings (the top level or a `[consumers.x]` section) and its environment
/// variables. Keys are removed as they are read, so what remains is unknown; the names asked
/// for are recorded, for the hints.
pub(super) struct Scope {
    /// Prefix of TOML keys in messages: `""` or `"consumers.<name>."`.
    toml_prefix: String,
    /// Prefix of environment variable names: `"RMQ_CONSUMER_"` or
    /// `"RMQ_CONSUMER_CONSUMERS__<NAME>__"`.
    env_prefix: String,
    table: toml::Table,
    /// Upper-cased key → value.
    env: BTreeMap<String, String>,
    problems: Vec<ConfigProblem>,
    /// Every spelling asked for so far, in order (`log.level` for a key of a sub-table).
    known: Vec<&'static str>,
    /// The sub-tables asked for (`log`, `consumers`): keys in the file, not in the
    /// environment.
    tables: Vec<&'static str>,
    /// The top level's `[consumers.<name>]` variables, by handler name (read by `consumers`).
    consumer_env: BTreeMap<String, BTreeMap<String, String>>,
    /// Whether `url` was given (and parsed): `password` then goes into it, else into the
    /// default URL.
    url_given: bool,
}

impl Scope {
    fn new(
        toml_prefix: String,
        env_prefix: String,
        table: toml::Table,
        env: BTreeMap<String, String>,
    ) -> Self {
        Self {
            toml_prefix,
            env_prefix,
            table,
            env,
            problems: Vec::new(),
            known: Vec::new(),
            tables: Vec::new(),
            consumer_env: BTreeMap::new(),
            url_given: false,
        }
    }

    /// Removes the sub-table `name` (`log`, `consumers`), recording the name.
    fn take_table(&mut self, name: &'static str) -> Option<toml::Value> {
        self.tables.push(name);
        self.table.remove(name)
    }

    fn problem(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.problems.push(ConfigProblem {
            key: key.into(),
            message: message.into(),
        });
    }

    /// Reports what is left, with hints among the names asked for: in the file, the keys and
    /// sub-tables of this table (not `log.level`); in the environment, the keys.
    fn report_unknown(&mut self) {
        let known: Vec<&str> = (self.known.iter())
            .copied()
            .filter(|name| !name.contains('.'))
            .collect();
        let known_toml: Vec<&str> = known.iter().chain(&self.tables).copied().collect();
        let keys: Vec<String> = self.table.keys().cloned().collect();
        for key in keys {
            let message = unknown_message(&key, &known_toml, "");
            self.problem(format!("{}{key}", self.toml_prefix), message);
        }
        let known_env: Vec<String> = known.iter().map(|name| name.to_ascii_uppercase()).collect();
        let known_env: Vec<&str> = known_env.iter().map(String::as_str).collect();
        let vars: Vec<String> = self.env.keys().cloned().collect();
        for var in vars {
            let message = unknown_message(&var, &known_env, &self.env_prefix);
            self.problem(format!("{}{var}", self.env_prefix), message);
        }
        self.table.clear();
        self.env.clear();
    }

    /// Removes every spelling of one setting and returns the effective one (the environment
    /// wins over the file), reporting spellings given twice. Records the names.
    fn take(&mut self, names: &'static [&'static str]) -> Option<(String, Raw)> {
        self.known.extend_from_slice(names);
        let mut from_toml: Option<(String, toml::Value)> = None;
        for name in names {
            let value = match name.split_once('.') {
                Some((table, key)) => match self.table.get_mut(table) {
                    Some(toml::Value::Table(table)) => table.remove(key),
                    _ => None,
                },
                None => self.table.remove(*name),
            };
            if let Some(value) = value {
                let key = format!("{}{name}", self.toml_prefix);
                match &from_toml {
                    Some((first, _)) => {
                        let message = format!("`{first}` is also set; keep only one of them");
                        self.problem(key, message);
                    }
                    None => from_toml = Some((key, value)),
                }
            }
        }
        let mut from_env: Option<(String, String)> = None;
        for name in names.iter().filter(|name| !name.contains('.')) {
            let upper = name.to_ascii_uppercase();
            if let Some(value) = self.env.remove(&upper) {
                let key = format!("{}{upper}", self.env_prefix);
                match &from_env {
                    Some((first, _)) => {
                        let message = format!("`{first}` is also set; keep only one of them");
                        self.problem(key, message);
                    }
                    None => from_env = Some((key, value)),
                }
            }
        }
        match (from_env, from_toml) {
            (Some((key, value)), _) => Some((key, Raw::Env(value))),
            (None, Some((key, value))) => Some((key, Raw::Toml(value))),
            (None, None) => None,
        }
    }

    fn get_keyed<T: FromConfigValue>(
        &mut self,
        names: &'static [&'static str],
    ) -> Option<(String, T)> {
        let (key, raw) = self.take(names)?;
        let parsed = match &raw {
            Raw::Toml(value) => T::from_toml(value),
            Raw::Env(text) => T::from_env(text),
        };
        match parsed {
            Ok(value) => Some((key, value)),
            Err(message) => {
                self.problem(key, message);
                None
            }
        }
    }

    pub(super) fn get<T: FromConfigValue>(&mut self, names: &'static [&'static str]) -> Option<T> {
        self.get_keyed(names).map(|(_, value)| value)
    }

    /// A queue or exchange name: must not be empty.
    pub(super) fn name(&mut self, names: &'static [&'static str]) -> Option<String> {
        let (key, name) = self.get_keyed::<String>(names)?;
        if name.is_empty() {
            self.problem(key, "must not be empty");
            return None;
        }
        Some(name)
    }

    pub(super) fn positive_duration(&mut self, names: &'static [&'static str]) -> Option<Duration> {
        let (key, duration) = self.get_keyed::<Duration>(names)?;
        if duration.is_zero() {
            self.problem(key, "must be greater than zero");
            return None;
        }
        Some(duration)
    }

    /// Retry delays: each becomes a queue's message TTL in milliseconds, so at least 1 ms.
    pub(super) fn retry_delays(&mut self, names: &'static [&'static str]) -> Option<Vec<Duration>> {
        let (key, delays) = self.get_keyed::<Vec<Duration>>(names)?;
        if delays.iter().any(|delay| delay.as_millis() == 0) {
            self.problem(key, "every delay must be at least 1ms");
            return None;
        }
        Some(delays)
    }

    pub(super) fn int<T>(&mut self, names: &'static [&'static str], min: T, max: T) -> Option<T>
    where
        T: Copy + fmt::Display + Into<i128> + TryFrom<i128>,
    {
        let (key, value) = self.get_keyed::<i128>(names)?;
        let converted = T::try_from(value)
            .ok()
            .filter(|v| (min.into()..=max.into()).contains(&(*v).into()));
        if converted.is_none() {
            self.problem(key, range_message(value, min.into(), max.into()));
        }
        converted
    }

    /// A positive `usize` up to `max`.
    pub(super) fn size(&mut self, names: &'static [&'static str], max: usize) -> Option<usize> {
        let max = u64::try_from(max).unwrap_or(u64::MAX);
        self.int(names, 1, max)
            .and_then(|value| usize::try_from(value).ok())
    }
}

fn unknown_message(key: &str, known: &[&str], prefix: &str) -> String {
    let noun = if prefix.is_empty() {
        "unknown key"
    } else {
        "unknown variable"
    };
    let suggestion = known
        .iter()
        .map(|candidate| {
            (
                levenshtein(&key.to_ascii_lowercase(), &candidate.to_ascii_lowercase()),
                candidate,
            )
        })
        // At most two edits, and not more than half the candidate (`foo` is not `log`).
        .filter(|(distance, candidate)| *distance <= 2 && 2 * *distance <= candidate.len())
        .min_by_key(|(distance, _)| *distance);
    match suggestion {
        Some((_, candidate)) => format!("{noun} (did you mean `{prefix}{candidate}`?)"),
        None => noun.to_owned(),
    }
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitution = diagonal + usize::from(ca != *cb);
            diagonal = row[j + 1];
            row[j + 1] = substitution.min(row[j] + 1).min(diagonal + 1);
        }
    }
    row[b.len()]
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic, reason = "tests fail loudly")]
#[path = "tests/read.rs"]
mod tests;
