//! The agent's Nostr presence: its key (NIP-06 from the wallet mnemonic), its NIP-89 agent card, discovery of
//! other agents, distress notes, the persistent outbox every publication goes through, the NIP-98 HTTP signer
//! and the NIP-47 wallet service.
//!
//! Relays are never on the critical path: everything the agent publishes is first written to the outbox in the
//! state DB and then sent with a bounded timeout, so a relay that is down or slow delays a note, never a turn
//! or a heartbeat.

pub mod card;
pub mod discover;
pub mod distress;
pub mod keys;
pub mod nip98;
pub mod nwc;
pub mod outbox;
pub mod presence;
pub mod relays;
pub mod tasks;

use std::time::Duration;

pub use ::nostr::{Event, Keys, PublicKey};

pub use card::{AgentCard, CardContent, CardService, CardStatus};
pub use keys::agent_keys;
pub use relays::RelaySet;

/// NIP-89 handler information: the agent card.
pub const CARD_KIND: u16 = 31990;
/// The card's `d` tag: constant, so each publish replaces the previous card on every relay.
pub const CARD_D_TAG: &str = "automaton-ln";
/// The card's `t` tag that discovery filters on.
pub const CARD_T_TAG: &str = "automaton-ln";
/// NIP-32 namespace of the survival-status label.
pub const STATUS_NAMESPACE: &str = "automaton-ln.status";

/// How long one relay gets to accept an event before the attempt counts as failed.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a Nostr operation failed.
#[derive(Debug, thiserror::Error)]
pub enum NostrError {
    /// `nostr.relays` is empty.
    #[error("no Nostr relays configured: set nostr.relays in automaton.yaml (or -c nostr.relays=[wss://…])")]
    NoRelays,
    /// A configured relay URL does not parse.
    #[error("invalid relay URL `{url}`: {reason}")]
    BadRelayUrl { url: String, reason: String },
    /// The agent has no wallet yet, so it has no Nostr key.
    #[error("no wallet at {path}: the Nostr key is derived from the wallet's mnemonic (run `automaton setup`)")]
    NoWallet { path: String },
    /// The wallet file exists but its mnemonic cannot give a key.
    #[error("cannot derive the Nostr key from {path}: {reason}")]
    Key { path: String, reason: String },
    /// No relay accepted the event (each relay's answer is listed).
    #[error("no relay accepted the event: {}", describe_failures(.failures))]
    NotAccepted { failures: Vec<(String, String)> },
    /// The relay client failed before anything was sent.
    #[error("relay client: {0}")]
    Client(String),
    /// An npub (or hex public key) that is not one.
    #[error("invalid Nostr public key `{value}`: {reason}")]
    BadPublicKey { value: String, reason: String },
    /// Building or signing an event failed.
    #[error("cannot build the event: {0}")]
    Event(String),
    /// Fetching an agent description over HTTP failed.
    #[error("{url}: {reason}")]
    Http { url: String, reason: String },
    #[error(transparent)]
    State(#[from] crate::state::StateError),
}

fn describe_failures(failures: &[(String, String)]) -> String {
    if failures.is_empty() {
        return "no relay answered".to_string();
    }
    failures
        .iter()
        .map(|(url, why)| format!("{url}: {why}"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Parses an `npub1…` or a 64-character hex public key.
pub fn parse_public_key(value: &str) -> Result<PublicKey, NostrError> {
    PublicKey::parse(value.trim()).map_err(|e| NostrError::BadPublicKey {
        value: value.to_string(),
        reason: e.to_string(),
    })
}

/// The `npub1…` form of a public key.
pub fn npub(public_key: &PublicKey) -> String {
    use ::nostr::nips::nip19::ToBech32;
    // Encoding 32 bytes as bech32 cannot fail; the hex form is a readable fallback all the same.
    public_key
        .to_bech32()
        .unwrap_or_else(|_| public_key.to_hex())
}
