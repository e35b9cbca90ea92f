//! One node of a RaftMQ broker group: openraft node, state machine, client API.
//!
//! This crate is part of the layout set by issue #2 and is still empty: its
//! work is tracked in issue #3. See `ARCHITECTURE.md` for where it fits.
