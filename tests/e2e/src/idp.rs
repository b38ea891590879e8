//! Identity provider harness (in progress).
