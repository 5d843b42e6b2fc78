//! Ebb VMM library.
