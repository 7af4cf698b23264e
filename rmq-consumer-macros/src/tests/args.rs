//! Unit tests of `args.rs`.

use quote::quote;

use super::*;

fn parse_ok(attr: TokenStream) -> Args {
    let mut errors = Errors::default();
    let args = parse(attr, &mut errors);
    if let Err(error) = errors.finish() {
        panic!("unexpected errors: {:?}", messages(error));
    }
    args
}

fn messages(error: syn::Error) -> Vec<String> {
    error.into_iter().map(|e| e.to_string()).collect()
}

fn parse_err(attr: TokenStream) -> Vec<String> {
    let mut errors = Errors::default();
    let _ = parse(attr, &mut errors);
    errors.finish().map_or_else(messages, |()| Vec::new())
}

#[test]
fn every_key() {
    let args = parse_ok(quote! {
        queue = "tasks", reply_key = "results", reply_queue = "results_q",
        uuid = "crate::ids::task_uuid", name = "summ", prefetch = 4, timeout = 30,
        max_retries = 0, queue_type = "quorum", blocking = true,
    });
    assert_eq!(args.queue.as_deref(), Some("tasks"));
    assert_eq!(args.reply_key.as_deref(), Some("results"));
    assert_eq!(args.reply_queue.as_deref(), Some("results_q"));
    let uuid = args.uuid.unwrap();
    assert_eq!(
        uuid.path.to_token_stream().to_string(),
        "crate :: ids :: task_uuid"
    );
    assert_eq!(uuid.lit.value(), "crate::ids::task_uuid");
    assert_eq!(args.name.as_deref(), Some("summ"));
    assert_eq!(args.prefetch, Some(4));
    assert_eq!(args.timeout, Some(30));
    assert_eq!(args.max_retries, Some(0));
    assert_eq!(args.queue_type, Some(QueueType::Quorum));
    assert!(args.blocking);
}

#[test]
fn only_queue_is_required() {
    let args = parse_ok(quote!(queue = "tasks"));
    assert_eq!(args.queue.as_deref(), Some("tasks"));
    assert!(args.reply_key.is_none() && args.uuid.is_none() && args.prefetch.is_none());
    assert!(!args.blocking);
}

#[test]
fn invalid_blocking_is_flagged() {
    let mut errors = Errors::default();
    let args = parse(quote!(queue = "q", blocking = "yes"), &mut errors);
    assert!(errors.finish().is_err());
    assert!(args.blocking_invalid);
    assert!(!parse_ok(quote!(queue = "q", blocking = true)).blocking_invalid);
}

#[test]
fn bare_blocking_means_true() {
    assert!(parse_ok(quote!(queue = "q", blocking)).blocking);
    assert!(!parse_ok(quote!(blocking = false, queue = "q")).blocking);
}

#[test]
fn raw_identifiers_are_keys() {
    assert_eq!(parse_ok(quote!(r#queue = "q")).queue.as_deref(), Some("q"));
}

#[test]
fn missing_queue() {
    assert_eq!(
        parse_err(quote!()),
        ["missing required key `queue`: add `queue = \"...\"`"]
    );
    assert_eq!(parse_err(quote!(reply_key = "r")).len(), 1);
}

#[test]
fn an_invalid_queue_is_not_also_missing() {
    assert_eq!(parse_err(quote!(queue = 4)).len(), 1);
    assert_eq!(parse_err(quote!(queue "tasks")).len(), 1);
    assert_eq!(parse_err(quote!(queue)).len(), 1);
}

#[test]
fn unknown_keys_suggest_the_closest() {
    let errors = parse_err(quote!(queue = "q", reply_keys = "r"));
    assert_eq!(errors.len(), 1);
    assert!(errors[0].starts_with("unknown key `reply_keys`; expected one of: queue,"));
    assert!(
        errors[0].ends_with("did you mean `reply_key`?"),
        "{}",
        errors[0]
    );
    let errors = parse_err(quote!(queue = "q", exchange = "x"));
    assert!(!errors[0].contains("did you mean"), "{}", errors[0]);
}

#[test]
fn duplicates() {
    assert_eq!(
        parse_err(quote!(queue = "a", queue = "b")),
        ["duplicate key `queue`"]
    );
}

#[test]
fn all_errors_are_collected() {
    let errors = parse_err(quote!(
        prefetch = 0,
        timeout = "30",
        queue_type = "stream",
        blocking = 1,
        foo,
    ));
    assert_eq!(errors.len(), 6, "{errors:#?}");
}

#[test]
fn integer_ranges() {
    assert_eq!(
        parse_ok(quote!(queue = "q", prefetch = 65535)).prefetch,
        Some(65535)
    );
    assert_eq!(parse_err(quote!(queue = "q", prefetch = 65536)).len(), 1);
    assert_eq!(parse_err(quote!(queue = "q", prefetch = -1)).len(), 1);
    assert_eq!(parse_err(quote!(queue = "q", timeout = 0)).len(), 1);
    assert_eq!(parse_err(quote!(queue = "q", timeout = 1.5)).len(), 1);
    assert_eq!(
        parse_err(quote!(queue = "q", timeout = "30s")),
        [
            "`timeout` expects a whole number of seconds, at least 1, e.g. `timeout = 30`; \
          found a string: write `timeout = 30` without quotes"
        ]
    );
    assert!(parse_err(quote!(queue = "q", prefetch = "0"))[0].ends_with("found `\"0\"`"));
    assert_eq!(
        parse_err(quote!(queue = "q", prefetch = "4")),
        [
            "`prefetch` expects an integer from 1 to 65535, e.g. `prefetch = 4`; found a \
          string: write `prefetch = 4` without quotes"
        ]
    );
}

#[test]
fn string_checks() {
    assert_eq!(parse_err(quote!(queue = "")).len(), 1);
    assert_eq!(parse_err(quote!(queue = "amq.tasks")).len(), 1);
    assert_eq!(parse_err(quote!(queue = "q", reply_key = "")).len(), 1);
    assert_eq!(parse_err(quote!(queue = "q", name = "")).len(), 1);
    let long = "x".repeat(256);
    assert_eq!(parse_err(quote!(queue = #long)).len(), 1);
}

#[test]
fn uuid_must_be_a_path() {
    assert_eq!(parse_err(quote!(queue = "q", uuid = "not a path")).len(), 1);
    assert_eq!(parse_err(quote!(queue = "q", uuid = task_uuid)).len(), 1);
    let args = parse_ok(quote!(queue = "q", uuid = "<Task as Id>::id"));
    assert!(args.uuid.is_some());
}

#[test]
fn syntax_errors() {
    assert_eq!(
        parse_err(quote!(queue = "q", reply - key = "r")),
        ["keys are written with underscores: `reply_key`"]
    );
    assert_eq!(
        parse_err(quote!(queue = "q",, prefetch = 1)),
        ["expected `key = value` before this `,`"]
    );
    assert_eq!(
        parse_err(quote!(queue =)),
        ["expected a value after `queue =`"]
    );
    assert_eq!(parse_err(quote!("q")).len(), 2);
}

#[test]
fn edit_distances() {
    assert_eq!(edit_distance("reply_keys", "reply_key"), 1);
    assert_eq!(edit_distance("queu", "queue"), 1);
    assert_eq!(edit_distance("", "abc"), 3);
    assert_eq!(edit_distance("prefecth", "prefetch"), 2);
}

#[test]
fn batch_keys() {
    let args = parse_ok(quote!(queue = "q", batch = 32, batch_wait = "15ms"));
    assert_eq!(args.batch, Some(32));
    assert!(args.batched);
    assert_eq!(args.batch_wait, Some(15));
    let args = parse_ok(quote!(queue = "q", batch = 65535));
    assert_eq!((args.batch, args.batch_wait), (Some(65535), None));
    let args = parse_ok(quote!(queue = "q"));
    assert_eq!(
        (args.batch, args.batched, args.batch_wait),
        (None, false, None)
    );
}

#[test]
fn batch_sizes() {
    assert_eq!(
        parse_err(quote!(queue = "q", batch = 0)),
        ["`batch` expects an integer from 1 to 65535, e.g. `batch = 32`; found `0`"]
    );
    assert_eq!(parse_err(quote!(queue = "q", batch = 65536)).len(), 1);
    assert_eq!(
        parse_err(quote!(queue = "q", batch)),
        ["`batch` needs a value: `batch = 32`"]
    );
    // An invalid `batch` still makes the handler a batch handler (its signature is
    // checked as one), and `batch_wait` is not reported as lacking it.
    let mut errors = Errors::default();
    let args = parse(
        quote!(queue = "q", batch = 0, batch_wait = "1s"),
        &mut errors,
    );
    assert_eq!(errors.finish().map_err(messages).unwrap_err().len(), 1);
    assert!(args.batched && args.batch.is_none());
}

#[test]
fn batch_wait_needs_batch() {
    let expected = "`batch_wait` applies to batch handlers only: add `batch = N` (the most \
                    messages one call takes), or remove `batch_wait`";
    assert_eq!(
        parse_err(quote!(queue = "q", batch_wait = "15ms")),
        [expected]
    );
    assert_eq!(
        parse_err(quote!(queue = "q", r#batch_wait = "15ms")),
        [expected]
    );
    // Also when its value is wrong: both are reported.
    assert_eq!(parse_err(quote!(queue = "q", batch_wait = 15)).len(), 2);
}

#[test]
fn batch_wait_values() {
    assert_eq!(parse_wait("1ms"), Ok(1));
    assert_eq!(parse_wait("250ms"), Ok(250));
    assert_eq!(parse_wait("15 ms"), Ok(15));
    assert_eq!(parse_wait("2s"), Ok(2000));
    assert_eq!(parse_wait("3600s"), Ok(3_600_000));
    assert_eq!(parse_wait("3600000ms"), Ok(3_600_000));
    for bad in [
        "",
        "ms",
        "15",
        "0ms",
        "0s",
        "1.5s",
        "500us",
        "1m",
        "3601s",
        "-1ms",
        "15MS",
        "99999999999999999999ms",
        "18446744073709552s",
    ] {
        assert!(parse_wait(bad).is_err(), "{bad}");
    }
    assert!(
        parse_wait("1.5s")
            .unwrap_err()
            .contains("fractions are not supported")
    );
    assert!(
        parse_wait("500us")
            .unwrap_err()
            .contains("the unit must be `ms` or `s`")
    );
    assert!(
        parse_wait("15")
            .unwrap_err()
            .contains("without a unit: write \"15ms\"")
    );
    assert!(parse_wait("0ms").unwrap_err().contains("at least 1ms"));
    assert!(
        parse_wait("3601s")
            .unwrap_err()
            .contains("at most one hour")
    );
}

#[test]
fn batch_wait_errors() {
    let expects = "`batch_wait` expects a duration: a whole number followed by `ms` or `s`, \
                   from \"1ms\" to \"3600s\", e.g. `batch_wait = \"15ms\"`; found ";
    assert_eq!(
        parse_err(quote!(queue = "q", batch = 2, batch_wait = "1.5s")),
        [format!(
            "{expects}\"1.5s\": fractions are not supported, write milliseconds \
             (\"1500ms\" for 1.5 seconds)"
        )]
    );
    assert_eq!(
        parse_err(quote!(queue = "q", batch = 2, batch_wait = 15)),
        [format!(
            "{expects}`15` without a unit: write `batch_wait = \"15ms\"` for milliseconds"
        )]
    );
    assert_eq!(
        parse_err(quote!(queue = "q", batch = 2, batch_wait = fifteen)),
        [format!("{expects}`fifteen`")]
    );
}
