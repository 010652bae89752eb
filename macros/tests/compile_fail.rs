//! Each case in tests/compile_fail is one mistake a user makes in a TOML; `trainer!` must turn
//! it into a compile error that points at the line (snapshots in the `.stderr` files).
//! Regenerate snapshots after an intended message change with `TRYBUILD=overwrite`.

#[test]
fn config_mistakes_are_compile_errors_pointing_into_the_toml() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/compile_fail/*.rs");
}
