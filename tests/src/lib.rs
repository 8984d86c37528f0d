//! End-to-end tests for the Entropy Key workspace live in `tests/` of this
//! package; they run `ekey-host` (built here as `ekey-host-e2e`, the same
//! one-line `main`) against software keys on Unix sockets and ptys.
