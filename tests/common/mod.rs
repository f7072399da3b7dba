//! The integration tests' fixtures live in the shared test kit (testkit/, `loopcsi-testkit`);
//! this module re-exports it so every test keeps writing `common::...`.

#![allow(unused_imports)]

pub use loopcsi_testkit::process;
pub use loopcsi_testkit::*;
