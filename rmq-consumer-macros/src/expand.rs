//! Code generation: the user's fn, untouched, followed by its registration.
//!
//! ```text
//! <the fn, verbatim>
//! const _: () = {
//!     fn __rmq_prepare(body: &[u8]) -> Result<Prepared, HandlerError> { decode, uuid, bind }
//!     inventory::submit! { HandlerSpec { name, queue, ..., prepare: __rmq_prepare } }
//! };
//! ```
//!
//! A batch handler (`batch = N`, `async fn h(items: Vec<T>) -> Vec<R>`) gets instead:
//!
//! ```text
//! const _: () = {
//!     fn __rmq_decode(body: &[u8]) -> Result<(String, T), HandlerError> { decode, uuid }
//!     fn __rmq_prepare_item(body: &[u8]) -> Result<PreparedItem, HandlerError> { .. }
//!     fn __rmq_bind(items: Vec<T>) -> BatchRun { the handler's one call, converted }
//!     fn __rmq_run_batch(items: Vec<Item>) -> Result<BatchRun, HandlerError> { downcast, bind }
//!     // A batch of one, its output converted back to one (the suspect queue's way).
//!     fn __rmq_prepare(body: &[u8]) -> Result<Prepared, HandlerError> { decode, bind, alone }
//!     inventory::submit! { HandlerSpec { ..., batch: Some(BatchSpec { .. }) } }
//! };
//! ```

use proc_macro2::{Span, TokenStream};
use quote::{quote, quote_spanned};
use syn::{Attribute, Ident, ItemFn, ReturnType, Type, ext::IdentExt, spanned::Spanned};

use crate::{
    args::{self, Args},
    paths,
    validate::{self, Batch, Errors, Handler, Shape, strip},
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
    let handler = validate::handler(&func, blocking, args.batched, &mut errors);
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
    let (prepare, batch) = match &handler.batch {
        None => (prepare_fn(args, handler), option(None::<TokenStream>)),
        Some(batch) => {
            let size = args.batch?;
            let wait_ms = option(args.batch_wait);
            let batch_spec = paths::batch_spec(site);
            let spec = quote! {
                ::core::option::Option::Some(#batch_spec {
                    size: #size,
                    wait_ms: #wait_ms,
                    prepare: __rmq_prepare_item,
                    run: __rmq_run_batch,
                })
            };
            (batch_fns(args, handler, batch), spec)
        }
    };

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
                    batch: #batch,
                }
            }
        };
    })
}

/// The local names the generated fns share. Locals get mixed-site hygiene: user code (the
/// `uuid` path) cannot see or shadow them. Those an error may point at are located at the
/// user's tokens instead, as rustc shows mixed-site spans at the attribute.
struct Locals {
    body: Ident,
    arg: Ident,
    task_uuid: Ident,
}

impl Locals {
    fn new() -> Self {
        Self {
            body: Ident::new("__rmq_body", Span::call_site()),
            arg: Ident::new("__rmq_arg", Span::mixed_site()),
            task_uuid: Ident::new("__rmq_task_uuid", Span::mixed_site()),
        }
    }
}

/// `fn __rmq_prepare(&[u8]) -> Result<Prepared, HandlerError>`: computes the task uuid, decodes
/// the argument and binds the handler call to it.
fn prepare_fn(args: &Args, handler: &Handler<'_>) -> TokenStream {
    let site = Span::call_site();
    let locals = Locals::new();
    let Locals {
        body,
        arg,
        task_uuid,
    } = &locals;
    let decode = decode(args, handler.arg_ty, &locals);
    let (conversion, output_span) = conversion(handler.output, handler.ident.span());
    let convert = paths::output(conversion.name(), output_span);
    let converted = converted(
        handler,
        args.blocking,
        arg,
        conversion,
        output_span,
        |output| quote_spanned!(output_span=> #convert(#output)),
    );
    let bind = bind(args.blocking, handler, task_uuid, &converted);
    let prepared = paths::prepared(site);
    let handler_error = paths::handler_error(site);
    quote! {
        #[allow(deprecated, reason = "registering a deprecated handler is not a use of it")]
        fn __rmq_prepare(
            #body: &[u8],
        ) -> ::core::result::Result<#prepared, #handler_error> {
            #decode
            ::core::result::Result::Ok(#bind)
        }
    }
}

/// The fns of a batch handler: `__rmq_decode` (one body to its task uuid and item),
/// `__rmq_prepare_item`, `__rmq_bind` (the one call of the handler, on a `Vec` of items),
/// `__rmq_run_batch` and `__rmq_prepare` (a batch of one).
fn batch_fns(args: &Args, handler: &Handler<'_>, batch: &Batch<'_>) -> TokenStream {
    let site = Span::call_site();
    let locals = Locals::new();
    let Locals {
        body,
        arg,
        task_uuid,
    } = &locals;
    let item_ty = batch.item_ty;
    let item_span = item_ty.span();
    let items = Ident::new("__rmq_items", Span::mixed_site());
    let decode = decode(args, item_ty, &locals);
    let handler_error = paths::handler_error(site);
    let prepared = paths::prepared(site);
    let prepared_item = paths::prepared_item(site);
    let item = paths::item(site);
    let batch_run = paths::batch_run(site);
    // At the item type, so `T: Send + 'static` failures point at it (rustc would show a
    // mixed-site local at the attribute). Nothing the user wrote is in the fn it is bound in.
    let located_arg = Ident::new("__rmq_item", item_span);
    let new_item = paths::prepared_item(item_span);
    let new_item = quote_spanned!(item_span=> #new_item::new(#task_uuid, #located_arg));
    let downcast = paths::downcast_items(item_span);
    let downcast = quote_spanned!(item_span=> #downcast::<#item_ty>(#items)?);
    let alone = paths::batch("alone", site);

    // `batch::vec_*(output)`, or `batch::result(output, batch::vec_*)` around a `Result`.
    // `vec_*` is at the type of one item's result, so `R: Serialize` and `E: Into<HandlerError>`
    // failures point at it; the output and `result` at the whole return type around a
    // `Result` (the bound on its `E`), else at the item's result type too.
    let output_span = if batch.fallible {
        batch.output_span
    } else {
        batch.item_output_span
    };
    let vec = paths::batch(
        &format!("vec_{}", batch.shape.name()),
        batch.item_output_span,
    );
    let result = paths::batch("result", output_span);
    let convert = |output: TokenStream| {
        if batch.fallible {
            quote_spanned!(output_span=> #result(#output, #vec))
        } else {
            quote_spanned!(output_span=> #vec(#output))
        }
    };
    // Binding `Vec<()>` to a local is fine: treat every batch shape as a value.
    let run = converted(
        handler,
        args.blocking,
        arg,
        Shape::Value,
        output_span,
        convert,
    );
    // At the fn's name, so a call that is not `Send` is reported there.
    let ident_span = handler.ident.span();
    let run = if args.blocking {
        let call = quote_spanned!(ident_span=> move || { #run });
        quote!(#batch_run::blocking(#call))
    } else {
        let boxed = quote_spanned! {ident_span=>
            ::std::boxed::Box::pin(async move { #run })
        };
        quote!(#batch_run::new(#boxed))
    };

    quote! {
        fn __rmq_decode(
            #body: &[u8],
        ) -> ::core::result::Result<(::std::string::String, #item_ty), #handler_error> {
            #decode
            ::core::result::Result::Ok((#task_uuid, #arg))
        }

        fn __rmq_prepare_item(
            #body: &[u8],
        ) -> ::core::result::Result<#prepared_item, #handler_error> {
            let (#task_uuid, #located_arg) = __rmq_decode(#body)?;
            ::core::result::Result::Ok(#new_item)
        }

        #[allow(deprecated, reason = "registering a deprecated handler is not a use of it")]
        fn __rmq_bind(#arg: ::std::vec::Vec<#item_ty>) -> #batch_run {
            #run
        }

        fn __rmq_run_batch(
            #items: ::std::vec::Vec<#item>,
        ) -> ::core::result::Result<#batch_run, #handler_error> {
            ::core::result::Result::Ok(__rmq_bind(#downcast))
        }

        fn __rmq_prepare(
            #body: &[u8],
        ) -> ::core::result::Result<#prepared, #handler_error> {
            let (#task_uuid, #arg) = __rmq_decode(#body)?;
            ::core::result::Result::Ok(#alone(#task_uuid, __rmq_bind(::std::vec![#arg])))
        }
    }
}

/// Statements that decode `body` into `arg: ty` and compute `task_uuid`.
fn decode(args: &Args, ty: &Type, locals: &Locals) -> TokenStream {
    let site = Span::call_site();
    let ty_span = ty.span();
    let Locals {
        body,
        arg,
        task_uuid,
    } = locals;
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

    quote! {
        #uuid_before
        #decode
        #uuid_after
    }
}

/// The handler called on `arg` (awaited, blocked on, or plainly called) and its output
/// converted by `convert`, as statements.
fn converted(
    handler: &Handler<'_>,
    blocking: bool,
    arg: &Ident,
    shape: Shape,
    output_span: Span,
    convert: impl FnOnce(TokenStream) -> TokenStream,
) -> TokenStream {
    let ident = handler.ident;
    let ident_span = ident.span();
    let call = quote_spanned!(ident_span=> #ident(#arg));
    let call = match (blocking, handler.is_async) {
        (false, _) => quote_spanned!(ident_span=> #call.await),
        (true, true) => {
            let block_on = paths::block_on(ident_span);
            quote_spanned!(ident_span=> #block_on(#call))
        }
        (true, false) => call,
    };
    if shape == Shape::Unit {
        // Nothing to check, and binding `()` to a local would trip `clippy::let_unit_value`.
        convert(call)
    } else {
        // Bound to a local located at the return type and converted there, so `R: Serialize`
        // and `E: Into<HandlerError>` failures point at the return type alone.
        let output = Ident::new("__rmq_output", output_span);
        let converted = convert(quote!(#output));
        quote_spanned! {output_span=>
            let #output = #call;
            #converted
        }
    }
}

/// `Prepared::new(uuid, || boxed future)` or `Prepared::blocking(uuid, || output)` around the
/// `converted` statements.
fn bind(
    blocking: bool,
    handler: &Handler<'_>,
    task_uuid: &Ident,
    converted: &TokenStream,
) -> TokenStream {
    let ident_span = handler.ident.span();
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
fn conversion(output: &ReturnType, fallback: Span) -> (Shape, Span) {
    match output {
        ReturnType::Default => (Shape::Unit, fallback),
        ReturnType::Type(_, ty) => (Shape::of(ty), ty.span()),
    }
}

#[cfg(test)]
#[path = "tests/expand.rs"]
mod tests;
