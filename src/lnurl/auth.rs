//! LNURL-auth client (LUD-04) with per-domain linking keys derived from the wallet's mnemonic (LUD-05): the agent
//! logs in to a service by signing the service's one-time `k1` with the key for that service's domain, so each
//! service sees a stable account id that no other service can link to it.

use std::time::Duration;

use bitcoin::secp256k1::{Message, PublicKey, Secp256k1};
use reqwest::Url;
use serde::Serialize;

use super::{parse_body, redacted, resolve, LnurlError};
use crate::wallet::Identity;

/// How long the service may take to answer.
const TIMEOUT: Duration = Duration::from_secs(20);

/// A parsed `tag=login` request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthRequest {
    pub url: Url,
    /// The host the linking key is derived for (LUD-05: the FQDN, no trailing dot).
    pub domain: String,
    pub k1: [u8; 32],
    /// `register`, `login`, `link` or `auth` (LUD-04); absent means login.
    pub action: Option<String>,
}

/// What logging in did.
#[derive(Clone, Debug, Serialize)]
pub struct AuthOutcome {
    pub domain: String,
    pub action: String,
    /// The linking public key the service now knows this agent by (hex, compressed).
    pub linking_key: String,
    /// The service's answer (`{"status":"OK"}`, possibly with extra fields).
    pub response: serde_json::Value,
}

/// Parses an LNURL-auth target (`lnurl1…`, `keyauth://…` or a URL) and checks it asks for a login.
pub fn parse_request(target: &str, network: &str) -> Result<AuthRequest, LnurlError> {
    let url = resolve(target, network)?;
    let pairs: Vec<(String, String)> = url
        .query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let get = |key: &str| pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
    match get("tag").as_deref() {
        Some("login") => {}
        Some(other) => {
            return Err(LnurlError::Invalid(format!(
                "{} is an LNURL of tag `{other}`, not an LNURL-auth login (tag=login)",
                redacted(&url)
            )))
        }
        None => {
            return Err(LnurlError::Invalid(format!(
                "{} has no tag=login: not an LNURL-auth request",
                redacted(&url)
            )))
        }
    }
    let k1_text = get("k1")
        .ok_or_else(|| LnurlError::Invalid(format!("{} has no k1 challenge", redacted(&url))))?;
    let k1: [u8; 32] = hex::decode(k1_text.trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| {
            LnurlError::Invalid("k1 must be 32 bytes of hex (64 characters)".to_string())
        })?;
    if pairs.iter().any(|(k, _)| k == "sig" || k == "key") {
        return Err(LnurlError::Invalid(
            "the URL already carries sig/key parameters: refusing to sign a pre-signed request"
                .into(),
        ));
    }
    let action = get("action").map(|a| a.to_ascii_lowercase());
    if let Some(a) = &action {
        if !matches!(a.as_str(), "register" | "login" | "link" | "auth") {
            return Err(LnurlError::Invalid(format!(
                "unknown LNURL-auth action `{a}` (expected register, login, link or auth)"
            )));
        }
    }
    let domain = url
        .host_str()
        .map(|h| h.trim_end_matches('.').to_ascii_lowercase())
        .filter(|h| !h.is_empty())
        .ok_or_else(|| LnurlError::Invalid(format!("{} has no host", redacted(&url))))?;
    Ok(AuthRequest {
        url,
        domain,
        k1,
        action,
    })
}

/// The signed callback URL for `request`: `<url>&sig=<DER hex>&key=<linking pubkey hex>`. LUD-04 signs the raw
/// 32-byte k1 as the digest, with no further hashing.
pub fn signed_url(identity: &Identity, request: &AuthRequest) -> (Url, PublicKey) {
    let secp = Secp256k1::new();
    let key = identity.lnurl_linking_key(&request.domain);
    let public = PublicKey::from_secret_key(&secp, &key);
    let signature = secp.sign_ecdsa(&Message::from_digest(request.k1), &key);
    let mut url = request.url.clone();
    url.query_pairs_mut()
        .append_pair("sig", &hex::encode(signature.serialize_der()))
        .append_pair("key", &public.to_string());
    (url, public)
}

/// Logs in to the service behind `target`. Follows no redirects: the signature is for this URL's service only.
pub async fn login(
    identity: &Identity,
    target: &str,
    network: &str,
) -> Result<AuthOutcome, LnurlError> {
    let request = parse_request(target, network)?;
    let (url, public) = signed_url(identity, &request);
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(TIMEOUT)
        .user_agent(concat!("automaton/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| LnurlError::Invalid(format!("HTTP client: {e}")))?;
    let http_err = |reason: String| LnurlError::Http {
        url: redacted(&request.url),
        reason,
    };
    let response = http
        .get(url)
        .send()
        .await
        .map_err(|e| http_err(e.without_url().to_string()))?;
    let status = response.status();
    let body = response
        .bytes()
        .await
        .map_err(|e| http_err(e.without_url().to_string()))?;
    let value = parse_body(&request.url, status, &body)?;
    let ok = value
        .get("status")
        .and_then(serde_json::Value::as_str)
        .is_some_and(|s| s.eq_ignore_ascii_case("OK"));
    if !ok {
        return Err(LnurlError::InvalidResponse {
            url: redacted(&request.url),
            reason: "the answer has no {\"status\":\"OK\"}".into(),
        });
    }
    tracing::info!(domain = %request.domain, key = %public, "logged in with LNURL-auth");
    Ok(AuthOutcome {
        domain: request.domain,
        action: request.action.unwrap_or_else(|| "login".into()),
        linking_key: public.to_string(),
        response: value,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitcoin::secp256k1::ecdsa::Signature;

    const K1: &str = "e2af6254a8df433264fa23f67eb8188635d15ce883e8fc020989d5f82ae6f11e";

    fn identity() -> Identity {
        Identity::from_phrase(
            "abandon abandon abandon abandon abandon abandon abandon abandon abandon abandon abandon about",
            None,
        )
        .unwrap()
    }

    #[test]
    fn signs_k1_as_the_digest_with_the_domain_key() {
        let target = format!("https://site.com/auth?tag=login&k1={K1}&action=register");
        let request = parse_request(&target, "bitcoin").unwrap();
        assert_eq!(request.domain, "site.com");
        assert_eq!(request.action.as_deref(), Some("register"));
        let (url, public) = signed_url(&identity(), &request);
        let pairs: std::collections::HashMap<String, String> =
            url.query_pairs().into_owned().collect();
        assert_eq!(pairs["k1"], K1);
        assert_eq!(pairs["key"], public.to_string());
        let sig = Signature::from_der(&hex::decode(&pairs["sig"]).unwrap()).unwrap();
        let digest = Message::from_digest(hex::decode(K1).unwrap().try_into().unwrap());
        Secp256k1::verification_only()
            .verify_ecdsa(&digest, &sig, &public)
            .expect("a service verifies the signature with the linking key");

        let other = parse_request(
            &format!("https://other.com/auth?tag=login&k1={K1}"),
            "bitcoin",
        )
        .unwrap();
        assert_ne!(
            signed_url(&identity(), &other).1,
            public,
            "one key per domain"
        );
    }

    #[test]
    fn refuses_what_is_not_a_login() {
        for bad in [
            format!("https://site.com/auth?k1={K1}"),
            format!("https://site.com/auth?tag=withdrawRequest&k1={K1}"),
            "https://site.com/auth?tag=login&k1=abcd".to_string(),
            "https://site.com/auth?tag=login".to_string(),
            format!("https://site.com/auth?tag=login&k1={K1}&action=steal"),
            format!("https://site.com/auth?tag=login&k1={K1}&sig=00&key=02"),
            format!("http://site.com/auth?tag=login&k1={K1}"),
        ] {
            assert!(parse_request(&bad, "regtest").is_err(), "{bad}");
        }
        let lab = format!("http://127.0.0.1:4000/auth?tag=login&k1={K1}");
        assert!(parse_request(&lab, "regtest").is_ok());
        assert!(parse_request(&lab, "bitcoin").is_err());
    }
}
