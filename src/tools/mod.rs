//! tools (being written).
