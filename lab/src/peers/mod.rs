//! peers (being written).
