//! The bench's one error type: any error, boxed, reported by `main` (or, in a child, on its
//! stderr, which the parent passes through).

/// Any error, reported by `main`.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// What the bench's fallible fns return.
pub(crate) type Res<T> = Result<T, BoxError>;
