//! The agent's home directory layout.
