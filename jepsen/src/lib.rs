//! Fault injection, history checker and report for RaftMQ clusters.
//!
//! This crate is part of the layout set by issue #2 and is still empty: its
//! work is tracked in issue #4. See `ARCHITECTURE.md` for where it fits.
