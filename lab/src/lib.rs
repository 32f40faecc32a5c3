//! The offline world for Automaton-LN: a regtest chain validated by Bitcoin Core's consensus engine, Lightning
//! peers (hub/LSP, creator, merchant) on ldk-node, a scripted OpenAI-compatible model and a Nostr relay.

pub mod chain;
pub mod conway;
pub mod l402;
pub mod lnvps;
pub mod model;
pub mod peers;
pub mod relay;
pub mod world;
