//! LNURL: the bech32 encoding (LUD-01), the transport rules every LNURL flow shares (https, or http for loopback
//! hosts on regtest and for .onion), and the LNURL-auth client (LUD-04/05) in `auth`. The LNURL-pay *service* (the
//! agent's Lightning address) lives in `crate::http::lnurlp`.

pub mod auth;
pub mod pay;

use std::net::IpAddr;

use bitcoin::bech32::primitives::decode::CheckedHrpstring;
use bitcoin::bech32::{Checksum, Hrp};
use reqwest::Url;

/// Why an LNURL could not be used.
#[derive(Debug, thiserror::Error)]
pub enum LnurlError {
    #[error("`{0}` is not an LNURL (bech32 `lnurl1…`, `keyauth://…`, or an https URL)")]
    NotAnLnurl(String),
    #[error("{url} is refused: LNURL needs https:// (http:// only for loopback hosts on regtest, or .onion)")]
    InsecureTransport { url: String },
    #[error("the LNURL service at {url} failed: {reason}")]
    Http { url: String, reason: String },
    #[error("the LNURL service at {url} answered ERROR: {reason}")]
    Service { url: String, reason: String },
    #[error("the LNURL service at {url} sent something unexpected: {reason}")]
    InvalidResponse { url: String, reason: String },
    #[error("{0}")]
    Invalid(String),
}

/// BIP-173 bech32 without the 90-character limit (LUD-01: LNURLs are often longer).
enum LnurlBech32 {}

impl Checksum for LnurlBech32 {
    type MidstateRepr = u32;
    const CODE_LENGTH: usize = usize::MAX;
    const CHECKSUM_LENGTH: usize = 6;
    const GENERATOR_SH: [u32; 5] = bitcoin::bech32::Bech32::GENERATOR_SH;
    const TARGET_RESIDUE: u32 = bitcoin::bech32::Bech32::TARGET_RESIDUE;
}

/// Encodes a URL as a bech32 LNURL, upper case (what QR codes and wallets expect).
pub fn encode(url: &str) -> String {
    let hrp = Hrp::parse_unchecked("lnurl");
    // Cannot fail: the checksum has no length limit and the HRP is valid.
    bitcoin::bech32::encode_upper::<LnurlBech32>(hrp, url.as_bytes()).unwrap_or_default()
}

/// Decodes a bech32 LNURL (either case, with or without a `lightning:` prefix) into its URL string.
pub fn decode(lnurl: &str) -> Result<String, LnurlError> {
    let text = lnurl.trim();
    let text = strip_prefix_ci(text, "lightning:").unwrap_or(text);
    let invalid = || LnurlError::NotAnLnurl(lnurl.trim().to_string());
    let checked = CheckedHrpstring::new::<LnurlBech32>(text).map_err(|_| invalid())?;
    if !checked.hrp().to_lowercase().eq("lnurl") {
        return Err(invalid());
    }
    String::from_utf8(checked.byte_iter().collect()).map_err(|_| invalid())
}

/// Turns what a user typed (`lnurl1…`, `lightning:lnurl1…`, a LUD-17 scheme such as `keyauth://…` or
/// `lnurlp://…`, or a plain URL) into the URL it stands for, checked against the transport rules.
pub fn resolve(target: &str, network: &str) -> Result<Url, LnurlError> {
    let text = target.trim();
    let text = strip_prefix_ci(text, "lightning:").unwrap_or(text);
    if text.len() > 6 && text[..6].eq_ignore_ascii_case("lnurl1") {
        return checked_url(&decode(text)?, network);
    }
    for scheme in ["keyauth://", "lnurlp://", "lnurlw://", "lnurlc://"] {
        if let Some(rest) = strip_prefix_ci(text, scheme) {
            let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
            let plain = insecure_allowed(host_only(host), network);
            let scheme = if plain { "http" } else { "https" };
            return checked_url(&format!("{scheme}://{rest}"), network);
        }
    }
    if strip_prefix_ci(text, "https://").is_some() || strip_prefix_ci(text, "http://").is_some() {
        let url = checked_url(text, network)?;
        // LUD-01 fallback: `https://host/…?lightning=LNURL1…` carries the real LNURL.
        if let Some((_, inner)) = url.query_pairs().find(|(k, _)| k == "lightning") {
            return checked_url(&decode(&inner)?, network);
        }
        return Ok(url);
    }
    Err(LnurlError::NotAnLnurl(text.to_string()))
}

/// Parses a URL and applies LUD-01's transport rule, relaxed for the lab: https, or http for .onion hosts and,
/// on regtest only, loopback hosts.
pub fn checked_url(text: &str, network: &str) -> Result<Url, LnurlError> {
    let url = Url::parse(text.trim())
        .map_err(|e| LnurlError::Invalid(format!("`{}` is not a URL: {e}", text.trim())))?;
    let host = url.host_str().unwrap_or_default().to_string();
    match url.scheme() {
        "https" if !host.is_empty() => Ok(url),
        "http" if insecure_allowed(&host, network) => Ok(url),
        _ => Err(LnurlError::InsecureTransport {
            url: url.to_string(),
        }),
    }
}

/// Whether plain http is acceptable for `host`: .onion anywhere, loopback on regtest.
pub fn insecure_allowed(host: &str, network: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.to_ascii_lowercase().ends_with(".onion") {
        return true;
    }
    network == "regtest" && is_loopback(host)
}

/// `localhost`, 127.0.0.0/8 or ::1.
pub fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// `host` of `host:port` (IPv6 in brackets kept whole).
fn host_only(host_port: &str) -> &str {
    if host_port.starts_with('[') {
        return host_port
            .split_once(']')
            .map(|(h, _)| &h[1..])
            .unwrap_or(host_port);
    }
    host_port.split(':').next().unwrap_or(host_port)
}

pub(crate) fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    if s.len() >= prefix.len()
        && s.is_char_boundary(prefix.len())
        && s[..prefix.len()].eq_ignore_ascii_case(prefix)
    {
        Some(&s[prefix.len()..])
    } else {
        None
    }
}

/// Reads a LUD-01 body: JSON whatever the HTTP status, and `{"status":"ERROR","reason":…}` as the service's error.
pub(crate) fn parse_body(
    url: &Url,
    status: reqwest::StatusCode,
    body: &[u8],
) -> Result<serde_json::Value, LnurlError> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|_| LnurlError::InvalidResponse {
            url: redacted(url),
            reason: format!("HTTP {status} with a body that is not JSON"),
        })?;
    let is_error = value
        .get("status")
        .and_then(serde_json::Value::as_str)
        .is_some_and(|s| s.eq_ignore_ascii_case("ERROR"));
    if is_error {
        let reason = value
            .get("reason")
            .and_then(serde_json::Value::as_str)
            .unwrap_or("no reason given")
            .chars()
            .take(300)
            .collect();
        return Err(LnurlError::Service {
            url: redacted(url),
            reason,
        });
    }
    Ok(value)
}

/// A URL for messages: scheme, host and path only (query strings carry k1, signatures, amounts).
pub(crate) fn redacted(url: &Url) -> String {
    let mut shown = url.clone();
    shown.set_query(None);
    shown.set_fragment(None);
    shown.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const VECTOR_URL: &str =
        "https://service.com/api?q=3fc3645b439ce8e7f2553a69e5267081d96dcd340693afabe04be7b0ccd178df";
    const VECTOR_LNURL: &str = "LNURL1DP68GURN8GHJ7UM9WFMXJCM99E3K7MF0V9CXJ0M385EKVCENXC6R2C35XVUKXEFCV5MKVV34X5EKZD3EV56NYD3HXQURZEPEXEJXXEPNXSCRVWFNV9NXZCN9XQ6XYEFHVGCXXCMYXYMNSERXFQ5FNS";

    #[test]
    fn lud01_vector_round_trips() {
        assert_eq!(encode(VECTOR_URL), VECTOR_LNURL);
        assert_eq!(decode(VECTOR_LNURL).unwrap(), VECTOR_URL);
        assert_eq!(
            decode(&VECTOR_LNURL.to_lowercase()).unwrap(),
            VECTOR_URL,
            "lower case decodes too"
        );
        assert_eq!(
            decode(&format!("lightning:{VECTOR_LNURL}")).unwrap(),
            VECTOR_URL
        );
    }

    #[test]
    fn long_urls_exceed_the_bech32_limit_and_still_round_trip() {
        let url = format!("https://example.com/{}", "a".repeat(500));
        let lnurl = encode(&url);
        assert!(lnurl.len() > 90);
        assert_eq!(decode(&lnurl).unwrap(), url);
    }

    #[test]
    fn mixed_case_and_bad_checksums_are_refused() {
        let mut mixed = VECTOR_LNURL.to_string();
        mixed.replace_range(6..7, &mixed[6..7].to_lowercase());
        assert!(decode(&mixed).is_err());
        let mut broken = VECTOR_LNURL.to_string();
        broken.pop();
        broken.push('Q');
        assert!(decode(&broken).is_err());
        assert!(decode("bc1qar0srrr7xfkvy5l643lydnw9re59gtzzwf5mdq").is_err());
    }

    #[test]
    fn http_is_only_for_loopback_on_regtest_and_onion() {
        assert!(checked_url("http://127.0.0.1:8080/x", "regtest").is_ok());
        assert!(checked_url("http://localhost/x", "regtest").is_ok());
        assert!(checked_url("http://[::1]:9/x", "regtest").is_ok());
        assert!(checked_url("http://127.0.0.1:8080/x", "bitcoin").is_err());
        assert!(checked_url("http://example.com/x", "regtest").is_err());
        assert!(checked_url("http://abc.onion/x", "bitcoin").is_ok());
        assert!(checked_url("https://example.com/x", "bitcoin").is_ok());
        assert!(checked_url("ftp://example.com/x", "regtest").is_err());
    }

    #[test]
    fn resolves_every_form() {
        let url = resolve(VECTOR_LNURL, "bitcoin").unwrap();
        assert_eq!(url.as_str(), VECTOR_URL);
        let url = resolve("keyauth://site.com/auth?tag=login&k1=00", "bitcoin").unwrap();
        assert_eq!(url.scheme(), "https");
        let url = resolve("keyauth://127.0.0.1:5000/auth?tag=login", "regtest").unwrap();
        assert_eq!(url.scheme(), "http");
        let wrapped = format!("https://wallet.example/?lightning={VECTOR_LNURL}");
        assert_eq!(resolve(&wrapped, "bitcoin").unwrap().as_str(), VECTOR_URL);
        assert!(resolve("not an lnurl", "bitcoin").is_err());
        let insecure = encode("http://example.com/auth");
        assert!(matches!(
            resolve(&insecure, "bitcoin"),
            Err(LnurlError::InsecureTransport { .. })
        ));
    }
}
