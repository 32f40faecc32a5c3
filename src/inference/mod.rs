//! inference (being written).
