//! Unit tests of `expand.rs`.

use quote::ToTokens;

use super::*;

fn expand(attr: TokenStream, item: TokenStream) -> String {
    let expanded = consumer(attr, item);
    // The expansion must be valid Rust items.
    syn::parse2::<syn::File>(expanded.clone()).unwrap();
    expanded.to_string()
}

fn conversion_of(ty: &str) -> &'static str {
    let output: ReturnType = syn::parse_str(&format!("-> {ty}")).unwrap();
    conversion(&output, Span::call_site()).0.name()
}

#[test]
fn conversions() {
    assert_eq!(
        conversion(&ReturnType::Default, Span::call_site()).0,
        Shape::Unit
    );
    assert_eq!(conversion_of("()"), "unit");
    assert_eq!(conversion_of("Summary"), "value");
    assert_eq!(conversion_of("Value"), "value");
    assert_eq!(conversion_of("Option<Summary>"), "option");
    assert_eq!(conversion_of("std::option::Option<u8>"), "option");
    assert_eq!(conversion_of("Result<Summary, HandlerError>"), "result");
    assert_eq!(conversion_of("anyhow::Result<Summary>"), "result");
    assert_eq!(conversion_of("Result<(), MyError>"), "result_unit");
    assert_eq!(conversion_of("Result<()>"), "result_unit");
    assert_eq!(conversion_of("Result<Option<u8>, E>"), "result_option");
    assert_eq!(conversion_of("(Result<u8, E>)"), "result");
    assert_eq!(conversion_of("Vec<Option<u8>>"), "value");
    assert_eq!(conversion_of("impl Serialize"), "value");
}

#[test]
fn json_values_are_not_decoded() {
    for ty in ["Value", "serde_json::Value", "(Value)"] {
        assert!(is_json_value(&syn::parse_str(ty).unwrap()), "{ty}");
    }
    for ty in [
        "Task",
        "my::Value",
        "Value<u8>",
        "::other::serde_json::Value",
    ] {
        assert!(!is_json_value(&syn::parse_str(ty).unwrap()), "{ty}");
    }
}

#[test]
fn the_fn_is_kept_and_registered() {
    let item = quote!(
        /// Docs stay.
        pub async fn summarize(data: Value) -> Value {
            data
        }
    );
    let expanded = expand(quote!(queue = "tasks", reply_key = "results"), item.clone());
    assert!(expanded.starts_with(&item.to_string()));
    assert!(expanded.contains("inventory :: submit !"));
    assert!(expanded.contains("name : \"summarize\""));
    assert!(expanded.contains("reply_key : :: core :: option :: Option :: Some (\"results\")"));
    assert!(expanded.contains("default_task_uuid"));
    assert!(!expanded.contains("decode"));
    assert!(expanded.contains("output :: value"));
}

#[test]
fn typed_handlers_decode_then_compute_the_custom_uuid() {
    let expanded = expand(
        quote!(queue = "tasks", uuid = "ids::of_task", name = "sum"),
        quote!(
            async fn summarize(task: Task) -> Result<(), E> {
                Ok(())
            }
        ),
    );
    let decode = expanded.find("decode :: < Task >").unwrap();
    let uuid = expanded.find("ids :: of_task").unwrap();
    assert!(decode < uuid);
    assert!(!expanded.contains("default_task_uuid"));
    assert!(expanded.contains("name : \"sum\""));
    assert!(expanded.contains("output :: result_unit"));
}

#[test]
fn blocking_handlers() {
    let plain = expand(
        quote!(queue = "q", blocking),
        quote!(
            fn crunch(v: Value) -> u8 {
                1
            }
        ),
    );
    assert!(plain.contains("Prepared :: blocking"));
    assert!(!plain.contains("block_on"));
    let async_fn = expand(
        quote!(queue = "q", blocking = true),
        quote!(
            async fn crunch(v: Value) {}
        ),
    );
    assert!(async_fn.contains("block_on"));
}

#[test]
fn cfg_attributes_guard_the_registration() {
    let expanded = consumer(
        quote!(queue = "q"),
        quote!(
            #[cfg(feature = "x")]
            async fn h(v: Value) {}
        ),
    );
    let file: syn::File = syn::parse2(expanded).unwrap();
    let registration = file.items[1].to_token_stream().to_string();
    assert!(registration.starts_with("# [cfg (feature = \"x\")] const _"));
}

#[test]
fn errors_keep_the_item() {
    let item = quote!(
        async fn h(v: Value) {}
    );
    let expanded = expand(quote!(queue = 1, foo), item.clone());
    assert!(expanded.starts_with(&item.to_string()));
    assert_eq!(expanded.matches("compile_error").count(), 2);
    assert!(!expanded.contains("submit"));
}

#[test]
fn non_fn_items_are_rejected() {
    let expanded = expand(
        quote!(queue = "q"),
        quote!(
            struct Nope;
        ),
    );
    assert!(expanded.contains("applies to a free `async fn`"));
}

#[test]
fn batch_handlers() {
    let expanded = expand(
        quote!(
            queue = "q",
            reply_key = "r",
            batch = 32,
            batch_wait = "15ms"
        ),
        quote!(
            async fn infer(prompts: Vec<Prompt>) -> Vec<Result<Completion, HandlerError>> {
                todo!()
            }
        ),
    );
    for needle in [
        "fn __rmq_decode (__rmq_body : & [u8] ,) -> :: core :: result :: Result < (:: std :: \
         string :: String , Prompt) ,",
        "decode :: < Prompt > (__rmq_body) ?",
        "default_task_uuid_of_body (__rmq_body) ?",
        "PreparedItem :: new (__rmq_task_uuid , __rmq_item)",
        "fn __rmq_bind (__rmq_arg : :: std :: vec :: Vec < Prompt >) -> :: rmq_consumer :: \
         __private :: BatchRun { :: rmq_consumer :: __private :: BatchRun :: new (:: std :: \
         boxed :: Box :: pin (async move { let __rmq_output = infer (__rmq_arg) . await ; :: \
         rmq_consumer :: __private :: batch :: vec_result (__rmq_output) })) }",
        "Ok (__rmq_bind (:: rmq_consumer :: __private :: downcast_items :: < Prompt > \
         (__rmq_items) ?))",
        "batch :: alone (__rmq_task_uuid , __rmq_bind (:: std :: vec ! [__rmq_arg]))",
        "prepare : __rmq_prepare ,",
        "batch : :: core :: option :: Option :: Some (:: rmq_consumer :: __private :: \
         BatchSpec { size : 32u16 , wait_ms : :: core :: option :: Option :: Some (15u64) , \
         prepare : __rmq_prepare_item , run : __rmq_run_batch , })",
    ] {
        assert!(expanded.contains(needle), "{needle}");
    }
    // One call of the handler, so each type error is reported once.
    assert_eq!(expanded.matches("infer (__rmq_arg)").count(), 1);
}

#[test]
fn batch_handlers_without_a_wait_leave_it_to_the_engine() {
    let expanded = expand(
        quote!(queue = "q", batch = 1, uuid = "ids::of"),
        quote!(
            async fn h(items: Vec<Value>) -> Result<Vec<()>, E> {
                todo!()
            }
        ),
    );
    assert!(expanded.contains("size : 1u16 , wait_ms : :: core :: option :: Option :: None"));
    assert!(expanded.contains("parse (__rmq_body) ?"));
    assert!(
        expanded
            .contains("let __rmq_uuid : fn (& Value) -> :: std :: string :: String = ids :: of ;")
    );
    assert!(expanded.contains(
        "batch :: result (__rmq_output , :: rmq_consumer :: __private :: batch :: vec_unit)"
    ));
}

#[test]
fn blocking_batch_handlers() {
    let plain = expand(
        quote!(queue = "q", batch = 4, blocking),
        quote!(
            fn crunch(items: Vec<Value>) -> Vec<Option<u8>> {
                todo!()
            }
        ),
    );
    assert!(
        plain.contains("BatchRun :: blocking (move || { let __rmq_output = crunch (__rmq_arg) ;")
    );
    assert!(plain.contains("batch :: vec_option"));
    assert!(!plain.contains("block_on"));
    let async_fn = expand(
        quote!(queue = "q", batch = 4, blocking = true),
        quote!(
            async fn crunch(items: Vec<Value>) -> Vec<()> {
                todo!()
            }
        ),
    );
    assert!(async_fn.contains("BatchRun :: blocking"));
    assert_eq!(async_fn.matches("block_on (crunch (__rmq_arg))").count(), 1);
}

#[test]
fn non_batch_handlers_register_no_batch() {
    let expanded = expand(
        quote!(queue = "q"),
        quote!(
            async fn h(items: Vec<Value>) {}
        ),
    );
    assert!(expanded.contains("batch : :: core :: option :: Option :: None"));
    assert!(!expanded.contains("__rmq_run_batch"));
}

#[test]
fn invalid_batch_handlers_register_nothing() {
    for (attr, item) in [
        (
            quote!(queue = "q", batch = 0),
            quote!(
                async fn h(v: Vec<Value>) -> Vec<()> {}
            ),
        ),
        (
            quote!(queue = "q", batch = 2),
            quote!(
                async fn h(v: Value) -> Vec<()> {}
            ),
        ),
        (
            quote!(queue = "q", batch = 2),
            quote!(
                async fn h(v: Vec<Value>) -> u8 {}
            ),
        ),
        (
            quote!(queue = "q", batch_wait = "1s"),
            quote!(
                async fn h(v: Value) {}
            ),
        ),
    ] {
        let expanded = expand(attr, item.clone());
        assert!(expanded.starts_with(&item.to_string()));
        assert_eq!(expanded.matches("compile_error").count(), 1, "{expanded}");
        assert!(!expanded.contains("submit"));
    }
}
