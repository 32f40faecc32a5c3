//! setup (being written).
