//! L402 (and its older name LSAT) for Automaton-LN: buying and selling HTTP calls with Lightning payments.
//!
//! - [`macaroon`]: a macaroon V2 binary codec on `hmac`/`sha2`, libmacaroons-compatible. We do not use the
//!   `macaroon` crate: it pulls `sodiumoxide`, an archived libsodium binding.
//! - [`identifier`]: the 66-byte L402 identifier (version, payment hash, token id).
//! - [`challenge`]: `WWW-Authenticate` parsing (every form in the spec, leniently, never panicking) and formatting.
//! - [`credential`]: `Authorization: L402 <macaroon>:<preimage>` parsing and formatting.
//! - [`caveats`]: `services=`, `<svc>_valid_until=`, `<svc>_capabilities=`.
//! - [`verify`]: server-side verification in Aperture's order; settlement is the caller's last check.
//! - [`mint`]: a new challenge's macaroon for an invoice.

pub mod caveats;
pub mod challenge;
pub mod credential;
#[doc(hidden)]
pub mod fuzzing;
pub mod identifier;
pub mod macaroon;
pub mod mint;
pub mod verify;

pub use caveats::Service;
pub use challenge::{
    challenge_headers, format_challenge, format_challenge_v0, parse_challenges, preferred,
    Challenge, ChallengeError, Scheme, TokenParam,
};
pub use credential::{
    credentials_in, format_authorization, parse_authorization, parse_macaroon_header, Credential,
    CredentialError,
};
pub use identifier::{Identifier, IDENTIFIER_LEN};
pub use macaroon::{Caveat, Macaroon, MacaroonError};
pub use mint::{mint, MintRequest, Minted, LOCATION};
pub use verify::{verify_credential, verify_macaroon, Verified, VerifyContext, VerifyError};
