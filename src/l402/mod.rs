//! L402 in the agent: the buyer (`client`: pay for HTTP calls, token cache, receipts) and the seller (`server`:
//! the agent's paid services behind its HTTP face). The protocol itself (macaroons, challenges, credentials,
//! verification) is the `automaton-l402` crate.

pub mod client;
pub mod server;
