//! Credential verification in Aperture's order: identifier, preimage ↔ payment hash, root key known,
//! HMAC chain, caveats (services, capabilities, expiry; attenuation only narrows). Whether the invoice was
//! settled is the caller's last step: it needs the node, which this crate does not know.

use std::collections::HashMap;

use crate::caveats::{self, CAPABILITIES_SUFFIX, PREIMAGE, SERVICES, VALID_UNTIL_SUFFIX};
use crate::credential::{parse_preimage, Credential};
use crate::identifier::{preimage_matches, Identifier, IdentifierError};
use crate::macaroon::{Macaroon, MacaroonError};

/// What the request is for.
#[derive(Debug, Clone, Copy)]
pub struct VerifyContext<'a> {
    /// The service the request is routed to; the macaroon's `services` caveat must list it.
    pub service: &'a str,
    /// A capability the request needs, checked against `<service>_capabilities` when present.
    pub capability: Option<&'a str>,
    /// Unix seconds; a `<service>_valid_until` must be later.
    pub now_unix: u64,
}

/// Why a credential was refused (each answers with a fresh 402).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("the macaroon identifier is invalid: {0}")]
    Identifier(#[from] IdentifierError),
    #[error("the preimage does not match the macaroon's payment hash")]
    PreimageMismatch,
    #[error("unknown root key (revoked or never minted here)")]
    UnknownRootKey,
    #[error("{0}")]
    Signature(#[from] MacaroonError),
    #[error("{0}")]
    InvalidCaveat(#[from] caveats::CaveatError),
    #[error("caveat {condition:?} widens an earlier one")]
    InvalidAttenuation { condition: String },
    #[error("the macaroon is not valid for service {service:?}")]
    ServiceNotAllowed { service: String },
    #[error("the macaroon does not grant capability {capability:?}")]
    CapabilityNotAllowed { capability: String },
    #[error("the macaroon expired at {valid_until} (unix)")]
    Expired { valid_until: u64 },
}

/// A macaroon that passed every stateless and root-key check. Settlement of `identifier.payment_hash` is next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub identifier: Identifier,
    /// Which of the credential's macaroons verified.
    pub macaroon_index: usize,
    /// `sha256(identifier)`: the root key's id (delete it to revoke).
    pub root_key_id: [u8; 32],
    /// The earliest `<service>_valid_until`, if any.
    pub valid_until: Option<u64>,
}

/// The root key ids a credential's macaroons need (prefetch them, then call [`verify_credential`]).
pub fn root_key_ids(credential: &Credential) -> Vec<[u8; 32]> {
    credential
        .macaroons
        .iter()
        .map(|m| crate::identifier::root_key_id(m.identifier()))
        .collect()
}

/// Verifies a credential: the first of its macaroons that passes wins. On failure, the error of the macaroon
/// that got furthest (so "expired" beats "unknown root key" for a two-token credential).
pub fn verify_credential(
    credential: &Credential,
    ctx: &VerifyContext<'_>,
    mut root_key: impl FnMut(&[u8; 32]) -> Option<[u8; 32]>,
) -> Result<Verified, VerifyError> {
    let mut best: Option<(u8, VerifyError)> = None;
    for (index, macaroon) in credential.macaroons.iter().enumerate() {
        match verify_macaroon(macaroon, &credential.preimage, ctx, &mut root_key) {
            Ok(mut verified) => {
                verified.macaroon_index = index;
                return Ok(verified);
            }
            Err(e) => {
                let stage = stage(&e);
                if best.as_ref().is_none_or(|(s, _)| stage > *s) {
                    best = Some((stage, e));
                }
            }
        }
    }
    Err(best.map_or(VerifyError::UnknownRootKey, |(_, e)| e))
}

/// Verifies one macaroon with a preimage, in Aperture's order.
pub fn verify_macaroon(
    macaroon: &Macaroon,
    preimage: &[u8; 32],
    ctx: &VerifyContext<'_>,
    mut root_key: impl FnMut(&[u8; 32]) -> Option<[u8; 32]>,
) -> Result<Verified, VerifyError> {
    let identifier = Identifier::decode(macaroon.identifier())?;
    if !preimage_matches(preimage, &identifier.payment_hash) {
        return Err(VerifyError::PreimageMismatch);
    }
    let root_key_id = identifier.root_key_id();
    let key = root_key(&root_key_id).ok_or(VerifyError::UnknownRootKey)?;
    macaroon.verify_signature(&key)?;
    let valid_until = check_caveats(macaroon, &identifier, ctx)?;
    Ok(Verified {
        identifier,
        macaroon_index: 0,
        root_key_id,
        valid_until,
    })
}

/// Convenience for a root key map (tests, small stores).
pub fn verify_with_keys(
    credential: &Credential,
    ctx: &VerifyContext<'_>,
    keys: &HashMap<[u8; 32], [u8; 32]>,
) -> Result<Verified, VerifyError> {
    verify_credential(credential, ctx, |id| keys.get(id).copied())
}

fn stage(e: &VerifyError) -> u8 {
    match e {
        VerifyError::Identifier(_) => 0,
        VerifyError::PreimageMismatch => 1,
        VerifyError::UnknownRootKey => 2,
        VerifyError::Signature(_) => 3,
        _ => 4,
    }
}

/// Runs the satisfiers. Returns the effective expiry for the service.
fn check_caveats(
    macaroon: &Macaroon,
    identifier: &Identifier,
    ctx: &VerifyContext<'_>,
) -> Result<Option<u64>, VerifyError> {
    let capabilities_condition = format!("{}{CAPABILITIES_SUFFIX}", ctx.service);
    let mut expiry_conditions = vec![format!("{}{VALID_UNTIL_SUFFIX}", ctx.service)];
    if let Some(capability) = ctx.capability {
        expiry_conditions.push(format!("{capability}{VALID_UNTIL_SUFFIX}"));
    }

    let mut services: Option<Vec<String>> = None;
    let mut capabilities: Option<Vec<String>> = None;
    let mut expiries: HashMap<&str, u64> = HashMap::new();
    let mut earliest: Option<u64> = None;

    for text in macaroon.first_party_caveats() {
        let (condition, value) = caveats::split(&text).ok_or_else(|| caveats::CaveatError {
            caveat: text.to_string(),
            reason: "not condition=value",
        })?;
        if condition == SERVICES {
            let names: Vec<String> = caveats::parse_services(value)?
                .into_iter()
                .map(|s| s.name)
                .collect();
            if let Some(previous) = &services {
                if !names.iter().all(|n| previous.contains(n)) {
                    return Err(VerifyError::InvalidAttenuation {
                        condition: condition.to_string(),
                    });
                }
            }
            services = Some(names);
        } else if condition == capabilities_condition {
            let list: Vec<String> = caveats::parse_list(value)
                .into_iter()
                .map(str::to_string)
                .collect();
            if let Some(previous) = &capabilities {
                if !list.iter().all(|c| previous.contains(c)) {
                    return Err(VerifyError::InvalidAttenuation {
                        condition: condition.to_string(),
                    });
                }
            }
            capabilities = Some(list);
        } else if let Some(known) = expiry_conditions.iter().find(|c| c.as_str() == condition) {
            let until: u64 = value.parse().map_err(|_| caveats::CaveatError {
                caveat: text.to_string(),
                reason: "valid_until is not unix seconds",
            })?;
            if let Some(previous) = expiries.get(known.as_str()) {
                if until > *previous {
                    return Err(VerifyError::InvalidAttenuation {
                        condition: condition.to_string(),
                    });
                }
            }
            expiries.insert(known.as_str(), until);
            earliest = Some(earliest.map_or(until, |e: u64| e.min(until)));
        } else if condition == PREIMAGE {
            let matches = parse_preimage(value)
                .is_some_and(|p| preimage_matches(&p, &identifier.payment_hash));
            if !matches {
                return Err(VerifyError::PreimageMismatch);
            }
        }
        // Anything else is someone else's caveat (another service's expiry, a constraint we do not know): skipped.
    }

    if let Some(services) = services {
        if !services.iter().any(|s| s == ctx.service) {
            return Err(VerifyError::ServiceNotAllowed {
                service: ctx.service.to_string(),
            });
        }
    }
    if let (Some(capability), Some(granted)) = (ctx.capability, &capabilities) {
        if !granted.iter().any(|c| c == capability) {
            return Err(VerifyError::CapabilityNotAllowed {
                capability: capability.to_string(),
            });
        }
    }
    if let Some(until) = expiries.values().min() {
        if *until <= ctx.now_unix {
            return Err(VerifyError::Expired {
                valid_until: *until,
            });
        }
    }
    Ok(earliest)
}
