//! The creator's LNURL-pay client (LUD-01/06/09/12/16/17): resolves an LNURL or Lightning address, fetches an
//! invoice and checks it as a wallet must (description hash over the raw metadata, amount, network, expiry).

use std::net::IpAddr;
use std::str::FromStr;
use std::time::Duration;

use ldk_node::bitcoin::bech32::primitives::decode::CheckedHrpstring;
use ldk_node::bitcoin::bech32::Checksum;
use ldk_node::bitcoin::hashes::{sha256, Hash};
use ldk_node::lightning_invoice::{Bolt11Invoice, Bolt11InvoiceDescriptionRef, Currency};
use reqwest::Url;
use serde_json::Value;

/// Why an LNURL payment could not get as far as paying. Each variant is a reason a wallet must refuse.
#[derive(Debug, thiserror::Error)]
pub enum LnurlError {
    #[error("not an LNURL, Lightning address or LNURL-pay URL: {0}")]
    InvalidTarget(String),
    #[error("{0} is refused: only https://, or http:// for loopback and .onion hosts")]
    InsecureUrl(String),
    #[error("request to {url} failed: {reason}")]
    Http { url: String, reason: String },
    #[error("the LNURL service answered with an error: {0}")]
    Service(String),
    #[error("the LNURL service sent an invalid response: {0}")]
    InvalidResponse(String),
    #[error("{msat} msat is outside the service's range {min}..={max} msat")]
    AmountOutOfRange { msat: u64, min: u64, max: u64 },
    #[error("the comment is {len} characters; the service allows {allowed}")]
    CommentTooLong { len: usize, allowed: u64 },
    #[error("the invoice's description hash does not match the service's metadata")]
    DescriptionHashMismatch,
    #[error("the invoice asks for {invoice_msat:?} msat but {requested_msat} msat were requested")]
    AmountMismatch {
        requested_msat: u64,
        invoice_msat: Option<u64>,
    },
    #[error("the invoice is for {0:?}, not regtest")]
    WrongNetwork(Currency),
    #[error("the invoice has expired")]
    Expired,
    #[error("unsupported successAction tag {0:?}")]
    UnsupportedSuccessAction(String),
}

/// An invoice fetched through LNURL-pay that passed every check.
#[derive(Debug, Clone)]
pub struct LnurlInvoice {
    pub invoice: Bolt11Invoice,
    /// LUD-09/10 success action, passed through to the caller untouched.
    pub success_action: Option<Value>,
    /// Things a wallet would show the user but that do not stop the payment (callback on another host, a
    /// Lightning address whose metadata names someone else).
    pub warnings: Vec<String>,
}

/// Bech32 with no length limit: LUD-01 says LNURLs are decoded without bech32's 90-character limit.
enum LnurlBech32 {}

impl Checksum for LnurlBech32 {
    type MidstateRepr = u32;
    const CODE_LENGTH: usize = usize::MAX;
    const CHECKSUM_LENGTH: usize = 6;
    const GENERATOR_SH: [u32; 5] = ldk_node::bitcoin::bech32::Bech32::GENERATOR_SH;
    const TARGET_RESIDUE: u32 = ldk_node::bitcoin::bech32::Bech32::TARGET_RESIDUE;
}

/// Decodes a bech32 LNURL (LUD-01) into its URL string.
pub fn decode_lnurl(lnurl: &str) -> Result<String, LnurlError> {
    let invalid = || LnurlError::InvalidTarget(lnurl.to_string());
    let checked = CheckedHrpstring::new::<LnurlBech32>(lnurl).map_err(|_| invalid())?;
    if checked.hrp().to_lowercase() != "lnurl" {
        return Err(invalid());
    }
    String::from_utf8(checked.byte_iter().collect()).map_err(|_| invalid())
}

/// Where a pay flow starts, and the Lightning address typed (if any) to compare with the metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub url: Url,
    pub address: Option<String>,
}

/// Turns `lnurl1…`, `lightning:lnurl1…`, `lnurlp://…`, `https://…` or `name@host[:port]` into the first URL.
pub fn resolve(target: &str) -> Result<Resolved, LnurlError> {
    let target = target.trim();
    let stripped = strip_prefix_ci(target, "lightning:").unwrap_or(target);
    if stripped.len() > 6 && stripped[..6].eq_ignore_ascii_case("lnurl1") {
        let url = decode_lnurl(stripped)?;
        return Ok(Resolved {
            url: checked_url(&url)?,
            address: None,
        });
    }
    if let Some(rest) = strip_prefix_ci(stripped, "lnurlp://") {
        // LUD-17: the scheme stands for https (http for onion and, in the lab, loopback hosts).
        let host = rest.split(['/', '?']).next().unwrap_or_default();
        let scheme = if insecure_allowed(host_only(host)) {
            "http"
        } else {
            "https"
        };
        return Ok(Resolved {
            url: checked_url(&format!("{scheme}://{rest}"))?,
            address: None,
        });
    }
    if strip_prefix_ci(stripped, "https://").is_some()
        || strip_prefix_ci(stripped, "http://").is_some()
    {
        return Ok(Resolved {
            url: checked_url(stripped)?,
            address: None,
        });
    }
    if let Some((user, host)) = stripped.split_once('@') {
        let user = user.to_ascii_lowercase();
        let valid_user = !user.is_empty()
            && user
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.+".contains(c));
        if !valid_user || host.is_empty() || host.contains(['/', '?', '#', '@']) {
            return Err(LnurlError::InvalidTarget(target.to_string()));
        }
        let scheme = if insecure_allowed(host_only(host)) {
            "http"
        } else {
            "https"
        };
        let url = checked_url(&format!("{scheme}://{host}/.well-known/lnurlp/{user}"))?;
        return Ok(Resolved {
            url,
            address: Some(format!("{user}@{host}")),
        });
    }
    Err(LnurlError::InvalidTarget(target.to_string()))
}

/// Runs LUD-06 steps 1 and 2 and checks the invoice. `comment` follows LUD-12.
pub async fn fetch_invoice(
    http: &reqwest::Client,
    target: &str,
    amount_msat: u64,
    comment: Option<&str>,
) -> Result<LnurlInvoice, LnurlError> {
    let resolved = resolve(target)?;
    let first = get_json(http, resolved.url.clone()).await?;
    let mut warnings = Vec::new();

    let tag = first.get("tag").and_then(Value::as_str).unwrap_or_default();
    if tag != "payRequest" {
        return Err(LnurlError::InvalidResponse(format!(
            "expected tag payRequest, got {tag:?}"
        )));
    }
    let callback = first
        .get("callback")
        .and_then(Value::as_str)
        .ok_or_else(|| LnurlError::InvalidResponse("missing callback".into()))?;
    let callback = checked_url(callback)?;
    let min = msat_field(&first, "minSendable")?;
    let max = msat_field(&first, "maxSendable")?;
    if min < 1 || min > max {
        return Err(LnurlError::InvalidResponse(format!(
            "minSendable {min} / maxSendable {max} make no range"
        )));
    }
    // The metadata string is hashed exactly as received; it is parsed only to read the identifier.
    let metadata = first
        .get("metadata")
        .and_then(Value::as_str)
        .ok_or_else(|| LnurlError::InvalidResponse("missing metadata string".into()))?
        .to_string();
    let entries: Vec<Value> = serde_json::from_str(&metadata)
        .map_err(|e| LnurlError::InvalidResponse(format!("metadata is not a JSON array: {e}")))?;
    let plain_count = entries
        .iter()
        .filter(|e| e.get(0).and_then(Value::as_str) == Some("text/plain"))
        .count();
    if plain_count != 1 {
        return Err(LnurlError::InvalidResponse(format!(
            "metadata must hold exactly one text/plain entry, found {plain_count}"
        )));
    }
    if let Some(address) = &resolved.address {
        let named = entries
            .iter()
            .find_map(|e| match e.get(0).and_then(Value::as_str) {
                Some("text/identifier") | Some("text/email") => e.get(1).and_then(Value::as_str),
                _ => None,
            });
        match named {
            Some(named) if !named.eq_ignore_ascii_case(address) => warnings.push(format!(
                "the service's metadata names {named}, not {address}"
            )),
            None => warnings.push(format!("the service's metadata does not name {address}")),
            _ => {}
        }
    }
    if amount_msat < min || amount_msat > max {
        return Err(LnurlError::AmountOutOfRange {
            msat: amount_msat,
            min,
            max,
        });
    }
    let comment_allowed = first
        .get("commentAllowed")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    if let Some(comment) = comment.filter(|c| !c.is_empty()) {
        let len = comment.chars().count();
        if len as u64 > comment_allowed {
            return Err(LnurlError::CommentTooLong {
                len,
                allowed: comment_allowed,
            });
        }
    }
    if callback.host_str() != resolved.url.host_str() {
        warnings.push(format!(
            "the callback host {} differs from {}",
            callback.host_str().unwrap_or_default(),
            resolved.url.host_str().unwrap_or_default()
        ));
    }

    let mut callback_url = callback.clone();
    callback_url
        .query_pairs_mut()
        .append_pair("amount", &amount_msat.to_string());
    if let Some(comment) = comment.filter(|c| !c.is_empty()) {
        callback_url
            .query_pairs_mut()
            .append_pair("comment", comment);
    }
    let second = get_json(http, callback_url).await?;
    let pr = second
        .get("pr")
        .and_then(Value::as_str)
        .ok_or_else(|| LnurlError::InvalidResponse("missing pr".into()))?;
    let invoice = Bolt11Invoice::from_str(pr.trim())
        .map_err(|e| LnurlError::InvalidResponse(format!("pr is not a BOLT11 invoice: {e}")))?;

    let expected = sha256::Hash::hash(metadata.as_bytes());
    match invoice.description() {
        Bolt11InvoiceDescriptionRef::Hash(h) if h.0 == expected => {}
        _ => return Err(LnurlError::DescriptionHashMismatch),
    }
    if invoice.amount_milli_satoshis() != Some(amount_msat) {
        return Err(LnurlError::AmountMismatch {
            requested_msat: amount_msat,
            invoice_msat: invoice.amount_milli_satoshis(),
        });
    }
    if invoice.currency() != Currency::Regtest {
        return Err(LnurlError::WrongNetwork(invoice.currency()));
    }
    if invoice.is_expired() {
        return Err(LnurlError::Expired);
    }
    let success_action = second
        .get("successAction")
        .filter(|v| !v.is_null())
        .cloned();
    if let Some(action) = &success_action {
        let tag = action
            .get("tag")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if !matches!(tag, "message" | "url" | "aes") {
            return Err(LnurlError::UnsupportedSuccessAction(tag.to_string()));
        }
    }
    Ok(LnurlInvoice {
        invoice,
        success_action,
        warnings,
    })
}

/// GETs a URL and parses the body as JSON whatever the HTTP status (LUD-01: status codes carry no meaning).
async fn get_json(http: &reqwest::Client, url: Url) -> Result<Value, LnurlError> {
    let shown = url.to_string();
    let http_err = |reason: String| LnurlError::Http {
        url: shown.clone(),
        reason,
    };
    let resp = http
        .get(url)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .map_err(|e| http_err(e.to_string()))?;
    let status = resp.status();
    let body = resp.bytes().await.map_err(|e| http_err(e.to_string()))?;
    let value: Value = serde_json::from_slice(&body).map_err(|_| {
        LnurlError::InvalidResponse(format!("HTTP {status} with a body that is not JSON"))
    })?;
    if value
        .get("status")
        .and_then(Value::as_str)
        .is_some_and(|s| s.eq_ignore_ascii_case("ERROR"))
    {
        let reason = value
            .get("reason")
            .and_then(Value::as_str)
            .unwrap_or("no reason given");
        return Err(LnurlError::Service(reason.to_string()));
    }
    Ok(value)
}

fn msat_field(v: &Value, key: &str) -> Result<u64, LnurlError> {
    v.get(key).and_then(Value::as_u64).ok_or_else(|| {
        LnurlError::InvalidResponse(format!("{key} is missing or not a positive integer"))
    })
}

/// Parses a URL and enforces LUD-01 transport rules, relaxed for loopback hosts (the lab is regtest-only).
fn checked_url(s: &str) -> Result<Url, LnurlError> {
    let url = Url::parse(s).map_err(|_| LnurlError::InvalidTarget(s.to_string()))?;
    match url.scheme() {
        "https" => Ok(url),
        "http" if url.host_str().is_some_and(insecure_allowed) => Ok(url),
        "http" => Err(LnurlError::InsecureUrl(s.to_string())),
        _ => Err(LnurlError::InvalidTarget(s.to_string())),
    }
}

/// `host:port` → `host` (IPv6 literals keep their brackets off).
fn host_only(host_port: &str) -> &str {
    if let Some(rest) = host_port.strip_prefix('[') {
        return rest.split(']').next().unwrap_or_default();
    }
    host_port
        .rsplit_once(':')
        .map(|(h, _)| h)
        .unwrap_or(host_port)
}

fn insecure_allowed(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.eq_ignore_ascii_case("localhost") || host.to_ascii_lowercase().ends_with(".onion") {
        return true;
    }
    host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    if s.len() >= prefix.len()
        && s.is_char_boundary(prefix.len())
        && s[..prefix.len()].eq_ignore_ascii_case(prefix)
    {
        Some(&s[prefix.len()..])
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lud01_vector_decodes() {
        let lnurl = "LNURL1DP68GURN8GHJ7UM9WFMXJCM99E3K7MF0V9CXJ0M385EKVCENXC6R2C35XVUKXEFCV5MKVV34X5EKZD3EV56NYD3HXQURZEPEXEJXXEPNXSCRVWFNV9NXZCN9XQ6XYEFHVGCXXCMYXYMNSERXFQ5FNS";
        assert_eq!(
            decode_lnurl(lnurl).unwrap(),
            "https://service.com/api?q=3fc3645b439ce8e7f2553a69e5267081d96dcd340693afabe04be7b0ccd178df"
        );
        assert_eq!(
            decode_lnurl(&lnurl.to_lowercase()).unwrap(),
            decode_lnurl(lnurl).unwrap()
        );
        // A flipped character breaks the checksum.
        assert!(decode_lnurl(&lnurl.replace("DP68", "DP69")).is_err());
    }

    #[test]
    fn addresses_resolve_with_http_only_for_loopback() {
        let r = resolve("alice@127.0.0.1:8080").unwrap();
        assert_eq!(
            r.url.as_str(),
            "http://127.0.0.1:8080/.well-known/lnurlp/alice"
        );
        assert_eq!(r.address.as_deref(), Some("alice@127.0.0.1:8080"));
        let r = resolve("Bob@example.com").unwrap();
        assert_eq!(r.url.as_str(), "https://example.com/.well-known/lnurlp/bob");
        assert!(matches!(
            resolve("http://example.com/lnurlp"),
            Err(LnurlError::InsecureUrl(_))
        ));
        assert!(resolve("http://localhost:9/x").is_ok());
        assert_eq!(
            resolve("lnurlp://127.0.0.1:9/p").unwrap().url.as_str(),
            "http://127.0.0.1:9/p"
        );
        assert_eq!(
            resolve("lnurlp://example.com/p").unwrap().url.as_str(),
            "https://example.com/p"
        );
        assert!(matches!(
            resolve("not a target"),
            Err(LnurlError::InvalidTarget(_))
        ));
        assert!(matches!(
            resolve("a b@host"),
            Err(LnurlError::InvalidTarget(_))
        ));
    }
}
