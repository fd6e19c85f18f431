//! Integration tests live in `tests/tests/`; see `tests/tests/common/mod.rs`.
