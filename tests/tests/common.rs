#![allow(dead_code, reason = "each test file uses a subset")]
pub use lb_tests::harness::*;
