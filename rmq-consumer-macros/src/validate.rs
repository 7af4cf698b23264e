//! Checks on the annotated fn's signature. Every problem is collected (see [`Errors`]) so the
//! user sees all of them in one build.

use std::fmt::Display;

use proc_macro2::Span;
use quote::ToTokens;
use syn::{FnArg, GenericArgument, ItemFn, PathArguments, ReturnType, Type, spanned::Spanned};

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
    /// `Some` for a batch handler (`batch = N`).
    pub(crate) batch: Option<Batch<'a>>,
}

/// The parts of a valid batch handler signature (`async fn h(items: Vec<T>) -> Vec<R>`).
pub(crate) struct Batch<'a> {
    /// `T`, the type of one message's item.
    pub(crate) item_ty: &'a Type,
    /// The shape of one item's result (`R` of `Vec<R>`).
    pub(crate) shape: Shape,
    /// The return type is `Result<Vec<_>, E>`: an `Err` fails every item.
    pub(crate) fallible: bool,
    /// The declared return type, to report the bounds on `E` of `Result<Vec<_>, E>` at.
    pub(crate) output_span: Span,
    /// The type of one item's result (`X` of `Vec<X>`), to report its trait bounds at.
    pub(crate) item_output_span: Span,
}

/// A supported return shape (of a handler, or of one item of a batch handler), read from how
/// the type is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shape {
    /// `()`
    Unit,
    /// `R`
    Value,
    /// `Option<R>`
    Option,
    /// `Result<R, E>`
    Result,
    /// `Result<(), E>`
    ResultUnit,
    /// `Result<Option<R>, E>`
    ResultOption,
}

impl Shape {
    /// The shape of `ty`, syntactically: a one-argument alias such as `Result<R>` is a
    /// `Result`, an alias under another name is a plain `R`.
    pub(crate) fn of(ty: &Type) -> Self {
        match strip(ty) {
            Type::Tuple(tuple) if tuple.elems.is_empty() => Self::Unit,
            ty => match generic_of(ty)
                .as_ref()
                .map(|(name, args)| (*name, args.as_slice()))
            {
                Some(("Option", [_])) => Self::Option,
                Some(("Result", [ok] | [ok, _])) => match strip(ok) {
                    Type::Tuple(tuple) if tuple.elems.is_empty() => Self::ResultUnit,
                    ok if generic_of(ok)
                        .is_some_and(|(name, args)| name == "Option" && args.len() == 1) =>
                    {
                        Self::ResultOption
                    }
                    _ => Self::Result,
                },
                _ => Self::Value,
            },
        }
    }

    /// The name of its conversion in `__private::output` (`__private::batch` prefixes
    /// `vec_`).
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Unit => "unit",
            Self::Value => "value",
            Self::Option => "option",
            Self::Result => "result",
            Self::ResultUnit => "result_unit",
            Self::ResultOption => "result_option",
        }
    }
}

const BATCH_ARGUMENT: &str = "a batch handler (`batch = N`) takes the items of one batch at once: \
                              the argument must be a `Vec<T>`, each item `T` being \
                              `serde_json::Value` or any `DeserializeOwned` type";

const BATCH_RETURN: &str = "a batch handler (`batch = N`) returns one result per item, in the \
                            order of its argument: `Vec<R>`, `Vec<Option<R>>`, \
                            `Vec<Result<R, E>>` or `Vec<Result<Option<R>, E>>` (`R` may be \
                            `()`), or one of them inside `Result<_, E>` to fail the whole batch";

const ONE_ARGUMENT: &str = "#[consumer] handlers take exactly one argument: the message body \
                            (`serde_json::Value` or any `T: DeserializeOwned`)";

/// Checks `item` against what a handler may be. `blocking` is the attribute's `blocking` key,
/// `None` when its value was invalid (and reported); `batched`: the attribute has a `batch`
/// key. Returns the handler's parts when the signature is usable, even if other errors were
/// found.
pub(crate) fn handler<'a>(
    item: &'a ItemFn,
    blocking: Option<bool>,
    batched: bool,
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
    let batch = if batched {
        let item_ty = arg_ty.and_then(|ty| batch_item(ty, errors));
        let output = batch_output(&sig.output, sig.paren_token.span.close(), errors);
        match (item_ty, output) {
            (Some(item_ty), Some(output)) => Some(Batch {
                item_ty,
                shape: output.shape,
                fallible: output.fallible,
                output_span: output.span,
                item_output_span: output.item_span,
            }),
            // Reported; no registration is generated.
            _ => return None,
        }
    } else {
        if let Some(ty) = arg_ty {
            check_argument_type(ty, errors);
        }
        None
    };

    Some(Handler {
        ident: &sig.ident,
        is_async: sig.asyncness.is_some(),
        arg_ty: arg_ty?,
        output: &sig.output,
        batch,
    })
}

/// `T` of a batch handler's `Vec<T>` argument, checked as a handler's argument type.
fn batch_item<'a>(ty: &'a Type, errors: &mut Errors) -> Option<&'a Type> {
    match generic_of(strip(ty))
        .as_ref()
        .map(|(name, args)| (*name, args.as_slice()))
    {
        Some(("Vec", [item])) => check_argument_type(item, errors).then_some(*item),
        _ => {
            errors.spanned(ty, BATCH_ARGUMENT);
            None
        }
    }
}

/// A batch handler's return type, read.
struct BatchOutput {
    shape: Shape,
    fallible: bool,
    span: Span,
    item_span: Span,
}

/// The shape of one item's result and whether the whole is in a `Result`, or an error at the
/// return type (at `close`, the `)` of the arguments, when there is none).
fn batch_output(output: &ReturnType, close: Span, errors: &mut Errors) -> Option<BatchOutput> {
    let ReturnType::Type(_, ty) = output else {
        errors.at(
            close,
            "a batch handler (`batch = N`) returns one result per item: add a return type, \
             e.g. `-> Vec<Result<R, HandlerError>>`, or `-> Vec<()>` to publish nothing",
        );
        return None;
    };
    let vec_of = |ty: &Type| match generic_of(strip(ty))
        .as_ref()
        .map(|(name, args)| (*name, args.as_slice()))
    {
        Some(("Vec", [item])) => Some((Shape::of(item), item.span())),
        _ => None,
    };
    let read = |(shape, item_span), fallible| BatchOutput {
        shape,
        fallible,
        span: ty.span(),
        item_span,
    };
    if let Some(item) = vec_of(ty) {
        return Some(read(item, false));
    }
    match generic_of(strip(ty))
        .as_ref()
        .map(|(name, args)| (*name, args.as_slice()))
    {
        Some(("Result", [ok] | [ok, _])) => match vec_of(ok) {
            Some(item) => Some(read(item, true)),
            None => {
                errors.spanned(ok, BATCH_RETURN);
                None
            }
        },
        _ => {
            errors.spanned(ty, BATCH_RETURN);
            None
        }
    }
}

/// The body is decoded into an owned value that the handler call takes by move. `false` when
/// an error was reported.
fn check_argument_type(ty: &Type, errors: &mut Errors) -> bool {
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
        _ => return true,
    }
    false
}

/// For a path type like `a::Result<X, Y>`: `("Result", [X, Y])` (type arguments only), for
/// `Option`, `Result` and `Vec`.
pub(crate) fn generic_of(ty: &Type) -> Option<(&'static str, Vec<&Type>)> {
    let Type::Path(path) = ty else {
        return None;
    };
    let last = path.path.segments.last()?;
    let name = ["Option", "Result", "Vec"]
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
        check_as(item, blocking, false)
    }

    fn check_batch(item: &str) -> Vec<String> {
        check_as(item, Some(false), true)
    }

    fn check_as(item: &str, blocking: Option<bool>, batched: bool) -> Vec<String> {
        let item: ItemFn = syn::parse_str(item).unwrap();
        let mut errors = Errors::default();
        let _ = handler(&item, blocking, batched, &mut errors);
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

    fn batch_of(item: &str) -> (String, Shape, bool) {
        let item: ItemFn = syn::parse_str(item).unwrap();
        let mut errors = Errors::default();
        let handler = handler(&item, Some(false), true, &mut errors).unwrap();
        assert!(errors.finish().is_ok());
        let batch = handler.batch.unwrap();
        (
            batch.item_ty.to_token_stream().to_string(),
            batch.shape,
            batch.fallible,
        )
    }

    #[test]
    fn batch_shapes() {
        let cases = [
            ("Vec<R>", Shape::Value, false),
            ("Vec<()>", Shape::Unit, false),
            ("Vec<Option<R>>", Shape::Option, false),
            ("Vec<Result<R, E>>", Shape::Result, false),
            ("std::vec::Vec<Result<(), E>>", Shape::ResultUnit, false),
            ("Vec<Result<Option<R>, E>>", Shape::ResultOption, false),
            ("Vec<app::Result<R>>", Shape::Result, false),
            ("Result<Vec<R>, E>", Shape::Value, true),
            ("Result<Vec<Result<R, E>>, E>", Shape::Result, true),
            ("anyhow::Result<Vec<()>>", Shape::Unit, true),
            ("(Vec<Option<R>>)", Shape::Option, false),
        ];
        for (output, shape, fallible) in cases {
            let item = format!("async fn h(items: Vec<Task>) -> {output} {{ todo!() }}");
            assert_eq!(
                batch_of(&item),
                ("Task".to_owned(), shape, fallible),
                "{output}"
            );
        }
        let (item, _, _) =
            batch_of("async fn h(v: std::vec::Vec<serde_json::Value>) -> Vec<()> {}");
        assert_eq!(item, "serde_json :: Value");
    }

    #[test]
    fn batch_arguments_are_vecs() {
        let errors = check_batch("async fn h(item: Task) -> Vec<()> {}");
        assert_eq!(errors.len(), 1, "{errors:#?}");
        assert!(errors[0].contains("must be a `Vec<T>`"), "{}", errors[0]);
        assert_eq!(
            check_batch("async fn h(items: &[Task]) -> Vec<()> {}").len(),
            1
        );
        assert_eq!(
            check_batch("async fn h(items: Vec<&str>) -> Vec<()> {}").len(),
            1
        );
        assert_eq!(
            check_batch("async fn h(items: Vec<_>) -> Vec<()> {}").len(),
            1
        );
        assert_eq!(
            check_batch("async fn h(items: Vec<Task>) -> Vec<()> {}").len(),
            0
        );
        // Without `batch`, a `Vec` is one message's body.
        assert!(check("async fn h(items: Vec<Task>) {}", Some(false)).is_empty());
    }

    #[test]
    fn batch_returns_are_vecs() {
        for output in [
            "Completion",
            "()",
            "Option<Vec<R>>",
            "Result<Completion, E>",
            "impl Serialize",
            "Batch",
        ] {
            let errors = check_batch(&format!("async fn h(items: Vec<Task>) -> {output} {{}}"));
            assert_eq!(errors.len(), 1, "{output}: {errors:#?}");
            assert!(
                errors[0].contains("returns one result per item"),
                "{}",
                errors[0]
            );
        }
        let errors = check_batch("async fn h(items: Vec<Task>) {}");
        assert_eq!(errors.len(), 1, "{errors:#?}");
        assert!(errors[0].contains("add a return type"), "{}", errors[0]);
    }

    #[test]
    fn batch_argument_and_return_errors_are_both_reported() {
        assert_eq!(
            check_batch("async fn h(item: Task) -> Completion {}").len(),
            2
        );
        assert_eq!(check_batch("async fn h() -> Completion {}").len(), 2);
        assert_eq!(check_batch("fn h(item: Task) {}").len(), 3);
    }
}
