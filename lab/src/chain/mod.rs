//! chain (being written).
