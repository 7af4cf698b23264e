//! Checks on the annotated fn's signature. Every problem is collected (see [`Errors`]) so the
//! user sees all of them in one build.

use std::fmt::Display;

use proc_macro2::Span;
use quote::ToTokens;
use syn::{FnArg, ItemFn, ReturnType, Type};

/// An accumulator of compile errors, combined into one [`syn::Error`] at the end.
#[derive(Default)]
pub(crate) struct Errors(Option<syn::Error>);

impl Errors {
    /// Adds `error` (which may itself hold several errors).
    pub(crate) fn push(&mut self, error: syn::Error) {
        match &mut self.0 {
            Some(all) => all.combine(error),
            None => self.0 = Some(error),
        }
    }

    /// Adds an error spanned at `span`.
    pub(crate) fn at(&mut self, span: Span, message: impl Display) {
        self.push(syn::Error::new(span, message));
    }

    /// Adds an error spanned over the first to the last token of `tokens`.
    pub(crate) fn spanned(&mut self, tokens: impl ToTokens, message: impl Display) {
        self.push(syn::Error::new_spanned(tokens, message));
    }

    /// `Err` with every collected error, or `Ok` when there are none.
    pub(crate) fn finish(self) -> syn::Result<()> {
        self.0.map_or(Ok(()), Err)
    }
}

/// The parts of a valid handler signature the expansion needs.
pub(crate) struct Handler<'a> {
    /// The fn's name, used to call it.
    pub(crate) ident: &'a syn::Ident,
    /// `async fn` (as opposed to a plain fn with `blocking = true`).
    pub(crate) is_async: bool,
    /// The type of the single argument: the message body.
    pub(crate) arg_ty: &'a Type,
    /// The declared return type.
    pub(crate) output: &'a ReturnType,
}

const ONE_ARGUMENT: &str = "#[consumer] handlers take exactly one argument: the message body \
                            (`serde_json::Value` or any `T: DeserializeOwned`)";

/// Checks `item` against what a handler may be. `blocking` is the attribute's `blocking` key,
/// `None` when its value was invalid (and reported). Returns the handler's parts when the
/// signature is usable, even if other errors were found.
pub(crate) fn handler<'a>(
    item: &'a ItemFn,
    blocking: Option<bool>,
    errors: &mut Errors,
) -> Option<Handler<'a>> {
    let sig = &item.sig;
    if let Some(constness) = &sig.constness {
        errors.at(constness.span, "#[consumer] handlers cannot be `const fn`");
    }
    if sig.asyncness.is_none() && blocking == Some(false) {
        errors.at(
            sig.fn_token.span,
            "#[consumer] handlers must be `async fn`; to run a synchronous (CPU-bound) fn on the \
             blocking thread pool, add `blocking = true`",
        );
    }
    if let Some(unsafety) = &sig.unsafety {
        errors.at(unsafety.span, "#[consumer] handlers cannot be `unsafe fn`");
    }
    if let Some(abi) = &sig.abi {
        errors.spanned(abi, "#[consumer] handlers cannot be `extern` fns");
    }
    if !sig.generics.params.is_empty() {
        errors.spanned(&sig.generics, "#[consumer] handlers cannot be generic");
    }
    if let Some(variadic) = &sig.variadic {
        errors.spanned(variadic, "#[consumer] handlers cannot be variadic");
    }

    let mut receiver = false;
    let mut typed = Vec::new();
    for input in &sig.inputs {
        match input {
            FnArg::Receiver(self_arg) => {
                receiver = true;
                errors.spanned(
                    self_arg,
                    "#[consumer] handlers must be free functions, not methods",
                );
            }
            FnArg::Typed(arg) => typed.push(arg),
        }
    }
    let arg_ty = match typed.as_slice() {
        [arg] => Some(&*arg.ty),
        // A method was reported above; its argument count would only add noise.
        _ if receiver => None,
        [] => {
            errors.at(sig.paren_token.span.join(), ONE_ARGUMENT);
            None
        }
        [..] => {
            errors.spanned(&sig.inputs, ONE_ARGUMENT);
            None
        }
    };
    if let Some(ty) = arg_ty {
        check_argument_type(ty, errors);
    }

    Some(Handler {
        ident: &sig.ident,
        is_async: sig.asyncness.is_some(),
        arg_ty: arg_ty?,
        output: &sig.output,
    })
}

/// The body is decoded into an owned value that the handler call takes by move.
fn check_argument_type(ty: &Type, errors: &mut Errors) {
    match strip(ty) {
        Type::Reference(_) => errors.spanned(
            ty,
            "the message body argument must be an owned type such as `String` or \
             `serde_json::Value` (it must implement `DeserializeOwned`), not a reference",
        ),
        Type::ImplTrait(_) => errors.spanned(
            ty,
            "#[consumer] handlers cannot be generic: the argument type must be a concrete type, \
             not `impl Trait`",
        ),
        Type::Infer(_) => errors.spanned(ty, "the message body argument needs a concrete type"),
        _ => {}
    }
}

/// Removes parentheses and invisible groups (`$ty` from a `macro_rules!`) around a type.
pub(crate) fn strip(mut ty: &Type) -> &Type {
    loop {
        match ty {
            Type::Paren(inner) => ty = &inner.elem,
            Type::Group(inner) => ty = &inner.elem,
            _ => return ty,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(item: &str, blocking: Option<bool>) -> Vec<String> {
        let item: ItemFn = syn::parse_str(item).unwrap();
        let mut errors = Errors::default();
        let _ = handler(&item, blocking, &mut errors);
        errors
            .finish()
            .err()
            .map(|e| e.into_iter().map(|e| e.to_string()).collect())
            .unwrap_or_default()
    }

    #[test]
    fn a_plain_async_fn_is_valid() {
        assert!(check("async fn h(v: Value) -> u32 { 1 }", Some(false)).is_empty());
        assert!(check("pub async fn h(Task { a, .. }: Task) {}", Some(false)).is_empty());
    }

    #[test]
    fn a_sync_fn_needs_blocking() {
        assert_eq!(check("fn h(v: Value) {}", Some(false)).len(), 1);
        assert!(check("fn h(v: Value) {}", Some(true)).is_empty());
        assert!(check("async fn h(v: Value) {}", Some(true)).is_empty());
        assert!(
            check("fn h(v: Value) {}", None).is_empty(),
            "blocking's error is enough"
        );
    }

    #[test]
    fn every_problem_is_reported() {
        let errors = check(
            "const unsafe extern \"C\" fn h<T>(a: T, b: T) {}",
            Some(false),
        );
        assert_eq!(errors.len(), 6, "{errors:#?}");
    }

    #[test]
    fn methods_report_only_the_receiver() {
        let errors = check("async fn h(&self, a: Value, b: Value) {}", Some(false));
        assert_eq!(errors.len(), 1, "{errors:#?}");
        assert!(errors[0].contains("free functions"));
    }

    #[test]
    fn borrowed_and_impl_trait_arguments_are_rejected() {
        assert_eq!(check("async fn h(v: &str) {}", Some(false)).len(), 1);
        assert_eq!(check("async fn h(v: impl Sized) {}", Some(false)).len(), 1);
    }
}
