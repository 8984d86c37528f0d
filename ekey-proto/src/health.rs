//! Host-side health tests of verified output (to be written).
