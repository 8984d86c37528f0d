//! The wire format: frames, packets, info items and host commands.
//!
//! Everything here only parses and emits. No function in this module panics
//! on any input: lengths are checked once when a view is made, and every
//! malformed input is an error value.

pub mod command;
pub mod deframe;
pub mod info;
pub mod packet;
