//! Minting a new L402 macaroon for an invoice, as Aperture does: random token id and root key, location `lsat`,
//! caveats `services`, `<svc>_capabilities`, `<svc>_valid_until`.

use crate::caveats::{self, Service};
use crate::identifier::Identifier;
use crate::macaroon::Macaroon;

/// Aperture's macaroon location.
pub const LOCATION: &str = "lsat";

/// What a new macaroon should say.
#[derive(Debug, Clone)]
pub struct MintRequest<'a> {
    pub payment_hash: [u8; 32],
    pub services: &'a [Service],
    /// Per service (by name): capabilities granted; absent = all.
    pub capabilities: &'a [(&'a str, &'a [&'a str])],
    /// Unix seconds; written as `<svc>_valid_until` for every service.
    pub valid_until: Option<u64>,
}

/// A freshly minted macaroon and the root key to store under `root_key_id` (deleting it revokes the token).
pub struct Minted {
    pub macaroon: Macaroon,
    pub identifier: Identifier,
    pub root_key: [u8; 32],
    pub root_key_id: [u8; 32],
}

/// Root keys are secrets: Debug never shows them.
impl std::fmt::Debug for Minted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Minted")
            .field("macaroon", &self.macaroon)
            .field("identifier", &self.identifier)
            .field("root_key", &"[redacted]")
            .field("root_key_id", &hex::encode(self.root_key_id))
            .finish()
    }
}

/// Mints with a random root key and token id.
pub fn mint(request: &MintRequest<'_>) -> Minted {
    mint_with(request, rand::random(), rand::random())
}

/// Mints with the given root key and token id (deterministic; tests and re-mints for the same user).
pub fn mint_with(request: &MintRequest<'_>, root_key: [u8; 32], token_id: [u8; 32]) -> Minted {
    let identifier = Identifier::new(request.payment_hash, token_id);
    let mut macaroon = Macaroon::new(&root_key, identifier.encode(), Some(LOCATION));
    if !request.services.is_empty() {
        macaroon.add_first_party_caveat(caveats::services_caveat(request.services));
    }
    for (service, capabilities) in request.capabilities {
        macaroon.add_first_party_caveat(caveats::capabilities_caveat(service, capabilities));
    }
    if let Some(until) = request.valid_until {
        for service in request.services {
            macaroon.add_first_party_caveat(caveats::valid_until_caveat(&service.name, until));
        }
    }
    Minted {
        root_key_id: identifier.root_key_id(),
        macaroon,
        identifier,
        root_key,
    }
}
