//! Code generation: the user's fn, untouched, followed by its registration.
//!
//! ```text
//! <the fn, verbatim>
//! const _: () = {
//!     fn __rmq_prepare(body: &[u8]) -> Result<Prepared, HandlerError> { decode, uuid, bind }
//!     inventory::submit! { HandlerSpec { name, queue, ..., prepare: __rmq_prepare } }
//! };
//! ```

use proc_macro2::{Span, TokenStream};
use quote::{quote, quote_spanned};
use syn::{
    Attribute, GenericArgument, Ident, ItemFn, PathArguments, ReturnType, Type, ext::IdentExt,
    spanned::Spanned,
};

use crate::{
    args::{self, Args},
    paths,
    validate::{self, Errors, Handler, strip},
};

/// The attribute: `attr` is what is inside `#[consumer(...)]`, `item` the annotated item.
pub(crate) fn consumer(attr: TokenStream, item: TokenStream) -> TokenStream {
    let mut errors = Errors::default();
    let args = args::parse(attr, &mut errors);
    let func = match syn::parse2::<ItemFn>(item.clone()) {
        Ok(func) => func,
        Err(error) => {
            errors.at(
                error.span(),
                "#[consumer] applies to a free `async fn` with a body (or a plain fn with \
                 `blocking = true`)",
            );
            return with_errors(item, errors);
        }
    };
    let blocking = (!args.blocking_invalid).then_some(args.blocking);
    let handler = validate::handler(&func, blocking, &mut errors);
    if let Err(error) = errors.finish() {
        return with_error(item, &error);
    }
    let mut expanded = item;
    if let Some(handler) = handler {
        expanded.extend(registration(&args, &handler, &func.attrs));
    }
    expanded
}

/// The original item plus the errors, so the fn still exists for IDEs and other diagnostics
/// (tokio-macros' `token_stream_with_error`).
fn with_error(mut item: TokenStream, error: &syn::Error) -> TokenStream {
    item.extend(error.to_compile_error());
    item
}

fn with_errors(item: TokenStream, errors: Errors) -> TokenStream {
    match errors.finish() {
        Ok(()) => item,
        Err(error) => with_error(item, &error),
    }
}

/// The hidden `prepare` fn and the `inventory` registration. `None` only when `args` lacks a
/// queue, which `args::parse` has already reported.
fn registration(args: &Args, handler: &Handler<'_>, attrs: &[Attribute]) -> Option<TokenStream> {
    let queue = args.queue.as_deref()?;
    let site = Span::call_site();
    let ident = handler.ident;
    let prepare = prepare_fn(args, handler);

    let name = args
        .name
        .clone()
        .unwrap_or_else(|| ident.unraw().to_string());
    let reply_key = option(args.reply_key.as_deref());
    let reply_queue = option(args.reply_queue.as_deref());
    let prefetch = option(args.prefetch);
    let timeout_secs = option(args.timeout);
    let max_retries = option(args.max_retries);
    let queue_type = option(args.queue_type.map(args::QueueType::as_str));
    let blocking = args.blocking;
    // At the fn's name, so they report the user's file and line.
    let file = quote_spanned!(ident.span()=> ::core::file!());
    let line = quote_spanned!(ident.span()=> ::core::line!());

    let inventory = paths::inventory(site);
    let spec = paths::handler_spec(site);
    // A handler behind `#[cfg(...)]` is registered under the same condition.
    let cfgs = attrs.iter().filter(|attr| attr.path().is_ident("cfg"));

    Some(quote! {
        #(#cfgs)*
        const _: () = {
            #prepare

            #inventory::submit! {
                #spec {
                    name: #name,
                    queue: #queue,
                    reply_key: #reply_key,
                    reply_queue: #reply_queue,
                    prefetch: #prefetch,
                    timeout_secs: #timeout_secs,
                    max_retries: #max_retries,
                    queue_type: #queue_type,
                    blocking: #blocking,
                    module_path: ::core::module_path!(),
                    file: #file,
                    line: #line,
                    prepare: __rmq_prepare,
                    batch: ::core::option::Option::None,
                }
            }
        };
    })
}

/// `fn __rmq_prepare(&[u8]) -> Result<Prepared, HandlerError>`: computes the task uuid, decodes
/// the argument and binds the handler call to it.
fn prepare_fn(args: &Args, handler: &Handler<'_>) -> TokenStream {
    let site = Span::call_site();
    let ty = handler.arg_ty;
    let ty_span = ty.span();

    // Locals get mixed-site hygiene: user code (the `uuid` path) cannot see or shadow them.
    // Those an error may point at are located at the user's tokens instead, as rustc shows
    // mixed-site spans at the attribute.
    let body = Ident::new("__rmq_body", site);
    let arg = Ident::new("__rmq_arg", Span::mixed_site());
    let task_uuid = Ident::new("__rmq_task_uuid", Span::mixed_site());
    let uuid_fn = Ident::new("__rmq_uuid", Span::mixed_site());
    let json_value = is_json_value(ty);

    // The default uuid hashes the JSON as sent (of the parsed `Value`, or of the body's bytes
    // before a typed decode); a custom one needs the argument.
    let (uuid_before, uuid_after) = match &args.uuid {
        None if json_value => {
            let default_task_uuid = paths::default_task_uuid(site);
            (
                quote!(),
                quote!(let #task_uuid = #default_task_uuid(&#arg);),
            )
        }
        None => {
            let of_body = paths::default_task_uuid_of_body(site);
            (quote!(let #task_uuid = #of_body(#body)?;), quote!())
        }
        Some(uuid) => {
            let path = &uuid.path;
            // At the literal, so a wrong signature is reported on the `uuid = "..."` string.
            let after = quote_spanned! {uuid.lit.span()=>
                let #uuid_fn: fn(&#ty) -> ::std::string::String = #path;
                let #task_uuid = #uuid_fn(&#arg);
            };
            (quote!(), after)
        }
    };

    // At the argument type, so `T: DeserializeOwned` failures point at it.
    // Typed arguments are decoded from the bytes, never through a `Value`, so a body costs
    // what `T` costs.
    let decode = if json_value {
        let parse = paths::parse(ty_span);
        quote_spanned!(ty_span=> let #arg: #ty = #parse(#body)?;)
    } else {
        let decode = paths::decode(ty_span);
        quote_spanned!(ty_span=> let #arg: #ty = #decode::<#ty>(#body)?;)
    };

    let bind = bind(args.blocking, handler, &task_uuid, &arg);
    let prepared = paths::prepared(site);
    let handler_error = paths::handler_error(site);
    quote! {
        #[allow(deprecated, reason = "registering a deprecated handler is not a use of it")]
        fn __rmq_prepare(
            #body: &[u8],
        ) -> ::core::result::Result<#prepared, #handler_error> {
            #uuid_before
            #decode
            #uuid_after
            ::core::result::Result::Ok(#bind)
        }
    }
}

/// `Prepared::new(uuid, || boxed future)` or `Prepared::blocking(uuid, || output)`.
fn bind(blocking: bool, handler: &Handler<'_>, task_uuid: &Ident, arg: &Ident) -> TokenStream {
    let ident = handler.ident;
    let ident_span = ident.span();
    let (conversion, output_span) = conversion(handler.output, ident_span);
    let call = quote_spanned!(ident_span=> #ident(#arg));
    let call = match (blocking, handler.is_async) {
        (false, _) => quote_spanned!(ident_span=> #call.await),
        (true, true) => {
            let block_on = paths::block_on(ident_span);
            quote_spanned!(ident_span=> #block_on(#call))
        }
        (true, false) => call,
    };
    let convert = paths::output(conversion, output_span);
    let converted = if conversion == "unit" {
        // Nothing to check, and binding `()` to a local would trip `clippy::let_unit_value`.
        quote_spanned!(output_span=> #convert(#call))
    } else {
        // Bound to a local located at the return type and converted there, so `R: Serialize`
        // and `E: Into<HandlerError>` failures point at the return type alone.
        let output = Ident::new("__rmq_output", output_span);
        quote_spanned! {output_span=>
            let #output = #call;
            #convert(#output)
        }
    };
    let prepared = paths::prepared(Span::call_site());
    if blocking {
        quote!(#prepared::blocking(#task_uuid, move || { #converted }))
    } else {
        let future = paths::handler_future(Span::call_site());
        // At the fn's name, so a future that is not `Send` is reported there.
        let boxed = quote_spanned! {ident_span=>
            ::std::boxed::Box::pin(async move { #converted })
        };
        quote!(#prepared::new(#task_uuid, move || -> #future { #boxed }))
    }
}

fn option<T: quote::ToTokens>(value: Option<T>) -> TokenStream {
    value.map_or_else(
        || quote!(::core::option::Option::None),
        |value| quote!(::core::option::Option::Some(#value)),
    )
}

/// `Value` or `serde_json::Value`: passed through without decoding. Any other type (including
/// a renamed `serde_json`) is decoded, which is correct for `Value` too, only slower.
fn is_json_value(ty: &Type) -> bool {
    let Type::Path(path) = strip(ty) else {
        return false;
    };
    if path.qself.is_some() {
        return false;
    }
    let segments: Vec<_> = path.path.segments.iter().collect();
    let plain = |index: usize, name: &str| {
        segments[index].ident == name && segments[index].arguments.is_none()
    };
    match segments.len() {
        1 => plain(0, "Value"),
        2 => plain(0, "serde_json") && plain(1, "Value"),
        _ => false,
    }
}

/// Picks the `__private::output` conversion from the declared return type, syntactically, and
/// the span to report its trait bounds at.
fn conversion(output: &ReturnType, fallback: Span) -> (&'static str, Span) {
    let ReturnType::Type(_, ty) = output else {
        return ("unit", fallback);
    };
    let name = match strip(ty) {
        Type::Tuple(tuple) if tuple.elems.is_empty() => "unit",
        ty => match generic_of(ty)
            .as_ref()
            .map(|(name, args)| (*name, args.as_slice()))
        {
            Some(("Option", [_])) => "option",
            Some(("Result", [ok] | [ok, _])) => match strip(ok) {
                Type::Tuple(tuple) if tuple.elems.is_empty() => "result_unit",
                ok if generic_of(ok)
                    .is_some_and(|(name, args)| name == "Option" && args.len() == 1) =>
                {
                    "result_option"
                }
                _ => "result",
            },
            _ => "value",
        },
    };
    (name, ty.span())
}

/// For a path type like `a::Result<X, Y>`: `("Result", [X, Y])` (type arguments only).
fn generic_of(ty: &Type) -> Option<(&'static str, Vec<&Type>)> {
    let Type::Path(path) = ty else {
        return None;
    };
    let last = path.path.segments.last()?;
    let name = ["Option", "Result"]
        .into_iter()
        .find(|name| last.ident == name)?;
    let PathArguments::AngleBracketed(generics) = &last.arguments else {
        return None;
    };
    let types = generics
        .args
        .iter()
        .filter_map(|arg| match arg {
            GenericArgument::Type(ty) => Some(ty),
            _ => None,
        })
        .collect();
    Some((name, types))
}

#[cfg(test)]
mod tests {
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
        conversion(&output, Span::call_site()).0
    }

    #[test]
    fn conversions() {
        assert_eq!(
            conversion(&ReturnType::Default, Span::call_site()).0,
            "unit"
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
}
