//! The offline world for Automaton-LN: a regtest chain validated by Bitcoin Core's consensus engine, Lightning
//! peers (hub/LSP, creator, merchant) on ldk-node, and a scripted OpenAI-compatible model.

pub mod chain;
pub mod model;
pub mod peers;
pub mod world;
