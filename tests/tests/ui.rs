//! Compile-time behaviour of `#[consumer]`: what expands and runs (`ui/pass`) and the errors
//! for what must not compile (`ui/fail`, with the expected output in the `.stderr` files).
//!
//! After changing the macro, regenerate and review the expected output with
//! `TRYBUILD=overwrite cargo test -p tests --test ui`.

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.pass("ui/pass/*.rs");
    t.compile_fail("ui/fail/*.rs");
}
