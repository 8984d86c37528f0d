//! `ekey-host feed`: keep a guest kernel fed from an EGD server (to be written).
