//! compute (being written).
