//! Parses the arguments of `#[consumer(key = value, ...)]`.
//!
//! The arguments are split at top-level commas and each `key = value` is parsed on its own, so
//! one malformed argument does not hide the errors in the others. Values are parsed as
//! expressions and then checked per key, which lets the errors say what was found.

use std::{
    fmt::{Display, Write as _},
    str::FromStr,
};

use proc_macro2::{Span, TokenStream, TokenTree};
use quote::ToTokens;
use syn::{
    Expr, ExprLit, ExprPath, Ident, Lit, LitStr, Token,
    ext::IdentExt,
    parse::{ParseStream, Parser},
};

use crate::validate::Errors;

/// A key of the attribute (`queue`, `reply_key`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Setting {
    Queue,
    ReplyKey,
    ReplyQueue,
    Uuid,
    Name,
    Prefetch,
    Timeout,
    MaxRetries,
    QueueType,
    Blocking,
    Batch,
    BatchWait,
}

impl Setting {
    /// Every key, in the order the docs list them.
    const ALL: [Self; 12] = [
        Self::Queue,
        Self::ReplyKey,
        Self::ReplyQueue,
        Self::Uuid,
        Self::Name,
        Self::Prefetch,
        Self::Timeout,
        Self::MaxRetries,
        Self::QueueType,
        Self::Blocking,
        Self::Batch,
        Self::BatchWait,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::Queue => "queue",
            Self::ReplyKey => "reply_key",
            Self::ReplyQueue => "reply_queue",
            Self::Uuid => "uuid",
            Self::Name => "name",
            Self::Prefetch => "prefetch",
            Self::Timeout => "timeout",
            Self::MaxRetries => "max_retries",
            Self::QueueType => "queue_type",
            Self::Blocking => "blocking",
            Self::Batch => "batch",
            Self::BatchWait => "batch_wait",
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|key| key.name() == name)
    }

    /// The value shown in "needs a value" errors and in the `expects` messages.
    fn example(self) -> &'static str {
        match self {
            Self::Queue => "\"tasks\"",
            Self::ReplyKey | Self::ReplyQueue => "\"results\"",
            Self::Uuid => "\"crate::task_uuid\"",
            Self::Name => "\"summarize\"",
            Self::Prefetch => "4",
            Self::Timeout => "30",
            Self::MaxRetries => "3",
            Self::QueueType => "\"quorum\"",
            Self::Blocking => "true",
            Self::Batch => "32",
            Self::BatchWait => "\"15ms\"",
        }
    }
}

impl Display for Setting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The longest `batch_wait`: one hour, in milliseconds. A batch's first message stays unacked
/// while it waits, so anything near this is a mistake; the bound keeps deadlines far from
/// overflow.
const MAX_BATCH_WAIT_MS: u64 = 3_600_000;

/// AMQP short strings (queue names, routing keys) are at most 255 bytes.
const SHORTSTR_MAX: usize = 255;

/// The `queue_type` key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum QueueType {
    Classic,
    Quorum,
}

impl QueueType {
    /// The spelling `HandlerSpec::queue_type` carries.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Classic => "classic",
            Self::Quorum => "quorum",
        }
    }
}

/// `uuid = "path::to::fn"`: the parsed path, spanned at the string literal, and the literal.
pub(crate) struct UuidFn {
    pub(crate) path: ExprPath,
    pub(crate) lit: LitStr,
}

/// The attribute's settings. Fields are `None` when absent or invalid (the error is recorded).
#[derive(Default)]
pub(crate) struct Args {
    pub(crate) queue: Option<String>,
    pub(crate) reply_key: Option<String>,
    pub(crate) reply_queue: Option<String>,
    pub(crate) uuid: Option<UuidFn>,
    pub(crate) name: Option<String>,
    pub(crate) prefetch: Option<u16>,
    pub(crate) timeout: Option<u64>,
    pub(crate) max_retries: Option<u32>,
    pub(crate) queue_type: Option<QueueType>,
    pub(crate) blocking: bool,
    /// `blocking` was given a value that is not a bool (reported); whether the handler may be
    /// a plain fn is unknown.
    pub(crate) blocking_invalid: bool,
    /// `batch = N`: the most messages one call takes.
    pub(crate) batch: Option<u16>,
    /// The `batch` key is present, valid or not: the signature is checked as a batch
    /// handler's.
    pub(crate) batched: bool,
    /// `batch_wait = "15ms"`, in milliseconds.
    pub(crate) batch_wait: Option<u64>,
}

/// One `key` or `key = value`, before the value is checked.
struct RawArg {
    key: Ident,
    value: Option<Expr>,
}

/// Parses the attribute's arguments, recording every problem in `errors`.
pub(crate) fn parse(attr: TokenStream, errors: &mut Errors) -> Args {
    let mut args = Args::default();
    let mut seen: Vec<Setting> = Vec::new();
    let mut batch_wait_key = None;
    let chunks = split_at_commas(attr.clone());
    let last = chunks.len().saturating_sub(1);
    for (index, (chunk, comma)) in chunks.into_iter().enumerate() {
        if chunk.is_empty() {
            // A trailing comma is fine; `a = 1,, b = 2` is not.
            if index != last
                && let Some(comma) = comma
            {
                errors.at(comma, "expected `key = value` before this `,`");
            }
            continue;
        }
        let first_key = match chunk.clone().into_iter().next() {
            Some(TokenTree::Ident(ident)) => Setting::from_name(&ident.unraw().to_string()),
            _ => None,
        };
        match parse_raw.parse2(chunk) {
            Ok(raw) => {
                let key = Setting::from_name(&raw.key.unraw().to_string());
                if key == Some(Setting::BatchWait) && batch_wait_key.is_none() {
                    batch_wait_key = Some(raw.key.span());
                }
                args.set(&raw, &mut seen, errors);
            }
            Err(error) => {
                // `queue "tasks"` is a syntax error, not a missing `queue`.
                seen.extend(first_key);
                errors.push(error);
            }
        }
    }
    if !seen.contains(&Setting::Queue) {
        let message = "missing required key `queue`: add `queue = \"...\"`";
        if attr.is_empty() {
            errors.at(Span::call_site(), message);
        } else {
            errors.spanned(attr, message);
        }
    }
    args.batched = seen.contains(&Setting::Batch);
    if let Some(span) = batch_wait_key
        && !args.batched
    {
        errors.at(
            span,
            "`batch_wait` applies to batch handlers only: add `batch = N` (the most messages \
             one call takes), or remove `batch_wait`",
        );
    }
    args
}

/// Splits at top-level commas; each chunk comes with the span of the comma that ends it.
fn split_at_commas(tokens: TokenStream) -> Vec<(TokenStream, Option<Span>)> {
    let mut chunks = Vec::new();
    let mut current = Vec::new();
    for tree in tokens {
        match tree {
            TokenTree::Punct(punct) if punct.as_char() == ',' => {
                chunks.push((current.drain(..).collect(), Some(punct.span())));
            }
            other => current.push(other),
        }
    }
    chunks.push((current.into_iter().collect(), None));
    chunks
}

fn parse_raw(input: ParseStream<'_>) -> syn::Result<RawArg> {
    if !input.peek(Ident::peek_any) {
        return Err(input.error("expected `key = value`, e.g. `queue = \"tasks\"`"));
    }
    let key = input.call(Ident::parse_any)?;
    if input.is_empty() {
        return Ok(RawArg { key, value: None });
    }
    if input.peek(Token![-]) && input.peek2(Ident::peek_any) {
        let dash: Token![-] = input.parse()?;
        let rest = input.call(Ident::parse_any)?;
        return Err(syn::Error::new(
            dash.span,
            format!("keys are written with underscores: `{key}_{rest}`"),
        ));
    }
    if !input.peek(Token![=]) {
        return Err(input.error(format!("expected `=` after `{key}`")));
    }
    let eq: Token![=] = input.parse()?;
    if input.is_empty() {
        return Err(syn::Error::new(
            eq.span,
            format!("expected a value after `{key} =`"),
        ));
    }
    let value: Expr = input.parse()?;
    if !input.is_empty() {
        return Err(input.error(format!("expected `,` after the value of `{key}`")));
    }
    Ok(RawArg {
        key,
        value: Some(value),
    })
}

impl Args {
    fn set(&mut self, raw: &RawArg, seen: &mut Vec<Setting>, errors: &mut Errors) {
        let name = raw.key.unraw().to_string();
        let Some(key) = Setting::from_name(&name) else {
            errors.at(raw.key.span(), unknown_key(&name));
            return;
        };
        if seen.contains(&key) {
            errors.at(raw.key.span(), format!("duplicate key `{key}`"));
            return;
        }
        seen.push(key);

        let result = match (&raw.value, key) {
            (None, Setting::Blocking) => {
                self.blocking = true;
                Ok(())
            }
            (None, _) => Err(syn::Error::new(
                raw.key.span(),
                format!("`{key}` needs a value: `{key} = {}`", key.example()),
            )),
            (Some(value), _) => self.set_value(key, value),
        };
        if let Err(error) = result {
            errors.push(error);
        }
    }

    fn set_value(&mut self, key: Setting, value: &Expr) -> syn::Result<()> {
        match key {
            Setting::Queue => self.queue = Some(queue_name(key, value)?),
            Setting::ReplyQueue => self.reply_queue = Some(queue_name(key, value)?),
            Setting::ReplyKey => {
                let lit = string(key, value, "a non-empty string (a routing key)")?;
                self.reply_key = Some(short_string(key, &lit)?);
            }
            Setting::Name => {
                let lit = string(key, value, "a non-empty string")?;
                if lit.value().is_empty() {
                    return Err(syn::Error::new(lit.span(), "`name` must not be empty"));
                }
                self.name = Some(lit.value());
            }
            Setting::Uuid => self.uuid = Some(uuid_fn(value)?),
            Setting::Prefetch => self.prefetch = Some(int(key, value, 1)?),
            Setting::Timeout => self.timeout = Some(int(key, value, 1)?),
            Setting::MaxRetries => self.max_retries = Some(int(key, value, 0)?),
            Setting::QueueType => self.queue_type = Some(queue_type(value)?),
            Setting::Blocking => {
                self.blocking_invalid = true;
                self.blocking = boolean(key, value)?;
                self.blocking_invalid = false;
            }
            Setting::Batch => self.batch = Some(int(key, value, 1)?),
            Setting::BatchWait => self.batch_wait = Some(batch_wait(value)?),
        }
        Ok(())
    }
}

fn unknown_key(name: &str) -> String {
    let keys: Vec<&str> = Setting::ALL.iter().map(|key| key.name()).collect();
    let mut message = format!("unknown key `{name}`; expected one of: {}", keys.join(", "));
    let closest = keys
        .iter()
        .map(|known| (edit_distance(name, known), known))
        .filter(|(distance, _)| *distance <= 2)
        .min_by_key(|(distance, _)| *distance);
    if let Some((_, known)) = closest {
        let _ = write!(message, "; did you mean `{known}`?");
    }
    message
}

/// Levenshtein distance, for "did you mean" hints.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != *cb);
            current.push(substitution.min(previous[j + 1] + 1).min(current[j] + 1));
        }
        previous = current;
    }
    previous[b.len()]
}

fn found(value: &Expr) -> String {
    format!("found `{}`", value.to_token_stream())
}

fn literal(value: &Expr) -> Option<&Lit> {
    match value {
        Expr::Lit(ExprLit { lit, attrs }) if attrs.is_empty() => Some(lit),
        _ => None,
    }
}

fn string(key: Setting, value: &Expr, expects: &str) -> syn::Result<LitStr> {
    match literal(value) {
        Some(Lit::Str(lit)) => Ok(lit.clone()),
        _ => Err(syn::Error::new_spanned(
            value,
            format!(
                "`{key}` expects {expects}, e.g. `{key} = {}`; {}",
                key.example(),
                found(value)
            ),
        )),
    }
}

/// A routing key: non-empty, at most 255 bytes.
fn short_string(key: Setting, lit: &LitStr) -> syn::Result<String> {
    let text = lit.value();
    if text.is_empty() {
        let hint = if key == Setting::ReplyKey {
            "; leave the key out to publish no result"
        } else {
            ""
        };
        return Err(syn::Error::new(
            lit.span(),
            format!("`{key}` must not be empty{hint}"),
        ));
    }
    if text.len() > SHORTSTR_MAX {
        return Err(syn::Error::new(
            lit.span(),
            format!(
                "`{key}` is {} bytes long; RabbitMQ allows at most {SHORTSTR_MAX}",
                text.len()
            ),
        ));
    }
    Ok(text)
}

/// A queue name: a routing key's limits, and not in the broker's reserved `amq.` namespace.
fn queue_name(key: Setting, value: &Expr) -> syn::Result<String> {
    let lit = string(key, value, "a non-empty string (a queue name)")?;
    let name = short_string(key, &lit)?;
    if name.starts_with("amq.") {
        return Err(syn::Error::new(
            lit.span(),
            format!("`{key}`: queue names starting with `amq.` are reserved by RabbitMQ"),
        ));
    }
    Ok(name)
}

fn uuid_fn(value: &Expr) -> syn::Result<UuidFn> {
    let expects = "a string holding the path of a fn `fn(&T) -> String`";
    let lit = string(Setting::Uuid, value, expects)?;
    // `LitStr::parse` gives every token of the path the literal's span, so errors about the
    // path (unresolved, wrong signature) point at the string.
    match lit.parse::<ExprPath>() {
        Ok(path) if path.attrs.is_empty() => Ok(UuidFn { path, lit }),
        _ => Err(syn::Error::new(
            lit.span(),
            format!(
                "`uuid` expects {expects}, e.g. `uuid = \"crate::task_uuid\"`; `{}` is not a path",
                lit.value()
            ),
        )),
    }
}

fn int<T>(key: Setting, value: &Expr, min: T) -> syn::Result<T>
where
    T: FromStr + PartialOrd + Display + Bounded + Copy,
    T::Err: Display,
{
    let range = if key == Setting::Timeout {
        format!("a whole number of seconds, at least {min}")
    } else {
        format!("an integer from {min} to {}", T::MAX)
    };
    let expects = format!("`{key}` expects {range}, e.g. `{key} = {}`", key.example());
    let error = |detail: String| syn::Error::new_spanned(value, format!("{expects}; {detail}"));
    match literal(value) {
        Some(Lit::Int(lit)) => match lit.base10_parse::<T>() {
            Ok(n) if n >= min => Ok(n),
            _ => Err(error(format!("found `{}`", lit.base10_digits()))),
        },
        Some(Lit::Str(lit)) => {
            let text = lit.value();
            let mut number = text.trim();
            if key == Setting::Timeout {
                // `timeout = "30s"`: the unit is implied.
                number = number.strip_suffix('s').unwrap_or(number).trim_end();
            }
            match number.parse::<T>() {
                Ok(n) if n >= min => Err(error(format!(
                    "found a string: write `{key} = {number}` without quotes"
                ))),
                _ => Err(error(found(value))),
            }
        }
        _ => Err(error(found(value))),
    }
}

/// The largest value of an integer key's type, for error messages.
trait Bounded {
    const MAX: Self;
}

impl Bounded for u16 {
    const MAX: Self = u16::MAX;
}

impl Bounded for u32 {
    const MAX: Self = u32::MAX;
}

impl Bounded for u64 {
    const MAX: Self = u64::MAX;
}

fn boolean(key: Setting, value: &Expr) -> syn::Result<bool> {
    let expects = format!("`{key}` expects `true` or `false` (a bare `{key}` means `true`)");
    match literal(value) {
        Some(Lit::Bool(lit)) => Ok(lit.value),
        Some(Lit::Str(lit)) if matches!(lit.value().as_str(), "true" | "false") => {
            Err(syn::Error::new_spanned(
                value,
                format!(
                    "{expects}; found a string: write `{key} = {}` without quotes",
                    lit.value()
                ),
            ))
        }
        _ => Err(syn::Error::new_spanned(
            value,
            format!("{expects}; {}", found(value)),
        )),
    }
}

/// `batch_wait = "15ms"`: a whole number of milliseconds (`ms`) or seconds (`s`), from 1 ms
/// to one hour, in milliseconds.
fn batch_wait(value: &Expr) -> syn::Result<u64> {
    let key = Setting::BatchWait;
    let expects = format!(
        "`{key}` expects a duration: a whole number followed by `ms` or `s`, from \"1ms\" to \
         \"3600s\", e.g. `{key} = {}`",
        key.example()
    );
    let error = |detail: String| syn::Error::new_spanned(value, format!("{expects}; {detail}"));
    match literal(value) {
        Some(Lit::Str(lit)) => {
            parse_wait(lit.value().trim()).map_err(|detail| error(format!("found {detail}")))
        }
        Some(Lit::Int(lit)) => Err(error(format!(
            "found `{}` without a unit: write `{key} = \"{}ms\"` for milliseconds",
            lit.base10_digits(),
            lit.base10_digits()
        ))),
        _ => Err(error(found(value))),
    }
}

/// The milliseconds of `15ms` or `2s`; `Err` describes what was found instead.
fn parse_wait(text: &str) -> Result<u64, String> {
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    let (number, unit) = text.split_at(digits);
    let factor = match unit.trim_start() {
        "ms" => 1,
        "s" => 1000,
        _ if number.is_empty() => return Err(format!("\"{text}\"")),
        "" => {
            return Err(format!(
                "\"{text}\" without a unit: write \"{text}ms\" for milliseconds"
            ));
        }
        _ if unit.starts_with('.') || unit.starts_with(',') => {
            return Err(format!(
                "\"{text}\": fractions are not supported, write milliseconds (\"1500ms\" for \
                 1.5 seconds)"
            ));
        }
        _ => {
            return Err(format!(
                "\"{text}\": the unit must be `ms` or `s` (the wait is counted in whole \
                 milliseconds)"
            ));
        }
    };
    let millis = number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(factor));
    match millis {
        Some(0) => Err(format!("\"{text}\": the wait must be at least 1ms")),
        Some(millis) if millis <= MAX_BATCH_WAIT_MS => Ok(millis),
        _ => Err(format!("\"{text}\": the wait must be at most one hour")),
    }
}

fn queue_type(value: &Expr) -> syn::Result<QueueType> {
    let expects = "\"classic\" or \"quorum\"";
    let lit = string(Setting::QueueType, value, expects)?;
    match lit.value().as_str() {
        "classic" => Ok(QueueType::Classic),
        "quorum" => Ok(QueueType::Quorum),
        other => {
            let hint = if other == "stream" {
                " (stream queues are not supported: they cannot dead-letter or requeue)"
            } else {
                ""
            };
            Err(syn::Error::new(
                lit.span(),
                format!("`queue_type` expects {expects}; found \"{other}\"{hint}"),
            ))
        }
    }
}

#[cfg(test)]
#[path = "tests/args.rs"]
mod tests;
