//! L402's first-party caveats (`condition=value`): building them, reading them back, and the effective values a
//! buyer caches by (services, expiry).

use crate::macaroon::Macaroon;

/// `services=name:tier,…`
pub const SERVICES: &str = "services";
/// `<service>_capabilities=a,b`
pub const CAPABILITIES_SUFFIX: &str = "_capabilities";
/// `<service or capability>_valid_until=<unix seconds>`
pub const VALID_UNTIL_SUFFIX: &str = "_valid_until";
/// `preimage=<hex>`, added by a holder.
pub const PREIMAGE: &str = "preimage";

/// One entry of a `services` caveat.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Service {
    pub name: String,
    /// 0 is the base tier.
    pub tier: u8,
}

impl Service {
    pub fn new(name: impl Into<String>, tier: u8) -> Service {
        Service {
            name: name.into(),
            tier,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid caveat {caveat:?}: {reason}")]
pub struct CaveatError {
    pub caveat: String,
    pub reason: &'static str,
}

/// Splits `condition=value` at the first `=`, trimming both; `None` when either side is empty.
pub fn split(caveat: &str) -> Option<(&str, &str)> {
    let (condition, value) = caveat.split_once('=')?;
    let (condition, value) = (condition.trim(), value.trim());
    (!condition.is_empty() && !value.is_empty()).then_some((condition, value))
}

/// `services=a:0,b:1`.
pub fn services_caveat(services: &[Service]) -> String {
    let list: Vec<String> = services
        .iter()
        .map(|s| format!("{}:{}", s.name, s.tier))
        .collect();
    format!("{SERVICES}={}", list.join(","))
}

/// `<service>_valid_until=<unix>`.
pub fn valid_until_caveat(service: &str, unix_secs: u64) -> String {
    format!("{service}{VALID_UNTIL_SUFFIX}={unix_secs}")
}

/// `<service>_capabilities=a,b`.
pub fn capabilities_caveat(service: &str, capabilities: &[&str]) -> String {
    format!("{service}{CAPABILITIES_SUFFIX}={}", capabilities.join(","))
}

/// Parses the value of a `services` caveat. A name without `:tier` is tier 0.
pub fn parse_services(value: &str) -> Result<Vec<Service>, CaveatError> {
    let bad = |reason| CaveatError {
        caveat: format!("{SERVICES}={value}"),
        reason,
    };
    let mut out = Vec::new();
    for entry in value.split(',').map(str::trim) {
        if entry.is_empty() {
            return Err(bad("empty service entry"));
        }
        let (name, tier) = match entry.split_once(':') {
            Some((name, tier)) => (
                name.trim(),
                tier.trim()
                    .parse::<u8>()
                    .map_err(|_| bad("tier is not a u8"))?,
            ),
            None => (entry, 0),
        };
        if name.is_empty() {
            return Err(bad("empty service name"));
        }
        out.push(Service::new(name, tier));
    }
    Ok(out)
}

/// Comma-separated list, trimmed, empty entries dropped.
pub fn parse_list(value: &str) -> Vec<&str> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect()
}

/// The services the macaroon is restricted to: the last `services` caveat (attenuation only narrows), or
/// `None` when it has none (unrestricted) or it does not parse.
pub fn services(macaroon: &Macaroon) -> Option<Vec<Service>> {
    let last = macaroon
        .first_party_caveats()
        .filter_map(|c| {
            split(&c)
                .filter(|(k, _)| *k == SERVICES)
                .map(|(_, v)| v.to_string())
        })
        .last()?;
    parse_services(&last).ok()
}

/// The earliest `<name>_valid_until` on the macaroon, for one service or capability name.
pub fn valid_until(macaroon: &Macaroon, name: &str) -> Option<u64> {
    let condition = format!("{name}{VALID_UNTIL_SUFFIX}");
    macaroon
        .first_party_caveats()
        .filter_map(|c| {
            let (k, v) = split(&c)?;
            (k == condition).then(|| v.parse::<u64>().ok()).flatten()
        })
        .min()
}

/// The earliest `*_valid_until` of any name: when a buyer should stop sending the token.
pub fn earliest_expiry(macaroon: &Macaroon) -> Option<u64> {
    macaroon
        .first_party_caveats()
        .filter_map(|c| {
            let (k, v) = split(&c)?;
            k.ends_with(VALID_UNTIL_SUFFIX)
                .then(|| v.parse::<u64>().ok())
                .flatten()
        })
        .min()
}
