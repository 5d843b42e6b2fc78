//! Ebb test host harness.
