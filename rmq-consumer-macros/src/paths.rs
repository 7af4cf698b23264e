//! The one place that spells the runtime's `::rmq_consumer::__private` paths.
//!
//! Each fn takes the span to give the path's tokens: rustc reports a failed trait bound at the
//! span of the call, so a call built at the user's type points the error at that type.

use proc_macro2::{Span, TokenStream};
use quote::quote_spanned;

fn private(span: Span) -> TokenStream {
    quote_spanned!(span=> ::rmq_consumer::__private)
}

/// `fn(&[u8]) -> Result<Value, HandlerError>`, the body of a `Value` handler.
pub(crate) fn parse(span: Span) -> TokenStream {
    let private = private(span);
    quote_spanned!(span=> #private::parse)
}

/// The error type `prepare` returns.
pub(crate) fn handler_error(span: Span) -> TokenStream {
    let private = private(span);
    quote_spanned!(span=> #private::HandlerError)
}

/// The boxed future of an async handler call.
pub(crate) fn handler_future(span: Span) -> TokenStream {
    let private = private(span);
    quote_spanned!(span=> #private::HandlerFuture)
}

/// `Prepared`, a decoded message bound to its handler call.
pub(crate) fn prepared(span: Span) -> TokenStream {
    let private = private(span);
    quote_spanned!(span=> #private::Prepared)
}

/// `fn(&Value) -> String`, the task uuid when the attribute has no `uuid` key.
pub(crate) fn default_task_uuid(span: Span) -> TokenStream {
    let private = private(span);
    quote_spanned!(span=> #private::default_task_uuid)
}

/// `fn(&[u8]) -> Result<String, HandlerError>`, the default task uuid of a typed handler's
/// body, computed from its bytes.
pub(crate) fn default_task_uuid_of_body(span: Span) -> TokenStream {
    let private = private(span);
    quote_spanned!(span=> #private::default_task_uuid_of_body)
}

/// `fn<T: DeserializeOwned>(&[u8]) -> Result<T, HandlerError>`.
pub(crate) fn decode(span: Span) -> TokenStream {
    let private = private(span);
    quote_spanned!(span=> #private::decode)
}

/// Runs an async handler's future on a blocking-pool thread.
pub(crate) fn block_on(span: Span) -> TokenStream {
    let private = private(span);
    quote_spanned!(span=> #private::block_on)
}

/// One of the conversions in `__private::output`, named by `conversion`.
pub(crate) fn output(conversion: &str, span: Span) -> TokenStream {
    let private = private(span);
    let conversion = syn::Ident::new(conversion, span);
    quote_spanned!(span=> #private::output::#conversion)
}

/// One of the conversions in `__private::batch`, named by `conversion`.
pub(crate) fn batch(conversion: &str, span: Span) -> TokenStream {
    let private = private(span);
    let conversion = syn::Ident::new(conversion, span);
    quote_spanned!(span=> #private::batch::#conversion)
}

/// `PreparedItem`, one decoded message of a batch handler.
pub(crate) fn prepared_item(span: Span) -> TokenStream {
    let private = private(span);
    quote_spanned!(span=> #private::PreparedItem)
}

/// `Item`, a batch handler's type-erased argument for one message.
pub(crate) fn item(span: Span) -> TokenStream {
    let private = private(span);
    quote_spanned!(span=> #private::Item)
}

/// `fn<T: 'static>(Vec<Item>) -> Result<Vec<T>, HandlerError>`.
pub(crate) fn downcast_items(span: Span) -> TokenStream {
    let private = private(span);
    quote_spanned!(span=> #private::downcast_items)
}

/// `BatchRun`, a batch handler call bound to its items.
pub(crate) fn batch_run(span: Span) -> TokenStream {
    let private = private(span);
    quote_spanned!(span=> #private::BatchRun)
}

/// The record that makes a handler a batch handler.
pub(crate) fn batch_spec(span: Span) -> TokenStream {
    let private = private(span);
    quote_spanned!(span=> #private::BatchSpec)
}

/// The `inventory` crate, re-exported so users need not depend on it.
pub(crate) fn inventory(span: Span) -> TokenStream {
    let private = private(span);
    quote_spanned!(span=> #private::inventory)
}

/// The registration record.
pub(crate) fn handler_spec(span: Span) -> TokenStream {
    let private = private(span);
    quote_spanned!(span=> #private::HandlerSpec)
}
