//! End-to-end test support for the Entropy Key workspace.
