//! Automaton-LN: a sovereign autonomous agent that lives on its own Lightning wallet.
//!
//! `main.rs` only parses the command line; everything else lives here so tests can drive the real thing.

pub mod agent;
pub mod audit;
pub mod cli;
pub mod compute;
pub mod config;
pub mod control;
pub mod genesis;
pub mod heartbeat;
pub mod home;
pub mod http;
pub mod inference;
pub mod l402;
pub mod lnurl;
pub mod money;
pub mod nostr;
pub mod replication;
pub mod setup;
pub mod skills;
pub mod state;
pub mod tools;
pub mod wallet;
