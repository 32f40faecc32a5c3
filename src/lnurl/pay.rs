//! The LNURL-pay client (LUD-06): ask a service for an invoice of an exact amount and check, before anything is
//! paid, that the invoice is for that amount and commits to the service's metadata (`sha256(metadata)` as its
//! description hash). Paying it is the wallet's business, through the budget gate.

use std::time::Duration;

use reqwest::Url;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::{checked_url, parse_body, redacted, LnurlError};

const TIMEOUT: Duration = Duration::from_secs(20);
const MAX_BODY: usize = 64 * 1024;

/// A service's pay request (the first LNURL-pay response).
#[derive(Clone, Debug)]
pub struct PayRequest {
    pub callback: Url,
    pub min_sendable_msat: u64,
    pub max_sendable_msat: u64,
    pub metadata: String,
}

/// GETs `url` (no redirects, bounded body) and reads it with the LNURL rules every flow shares (`parse_body`:
/// JSON, `{"status": "ERROR"}` as the service's refusal). Errors name the URL without its query.
async fn get_json(url: &Url) -> Result<Value, LnurlError> {
    let err = |reason: String| LnurlError::Http {
        url: redacted(url),
        reason,
    };
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(TIMEOUT)
        .build()
        .map_err(|e| LnurlError::Invalid(format!("HTTP client: {e}")))?;
    let mut response = client
        .get(url.clone())
        .send()
        .await
        .map_err(|e| err(e.without_url().to_string()))?;
    let status = response.status();
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| err(e.without_url().to_string()))?
    {
        body.extend_from_slice(&chunk);
        if body.len() > MAX_BODY {
            return Err(err(format!("answer larger than {MAX_BODY} bytes")));
        }
    }
    let value = parse_body(url, status, &body)?;
    if !status.is_success() {
        return Err(err(format!("HTTP {status}")));
    }
    Ok(value)
}

/// Reads the pay request at `url` (already resolved from an LNURL or Lightning address).
pub async fn pay_request(url: &str, network: &str) -> Result<PayRequest, LnurlError> {
    let url = checked_url(url, network)?;
    let v = get_json(&url).await?;
    let invalid = |reason: &str| LnurlError::InvalidResponse {
        url: redacted(&url),
        reason: reason.to_string(),
    };
    if v["tag"] != "payRequest" {
        return Err(invalid("not a payRequest"));
    }
    let callback = checked_url(
        v["callback"]
            .as_str()
            .ok_or_else(|| invalid("no callback"))?,
        network,
    )?;
    let number = |key: &str| {
        v[key]
            .as_u64()
            .or_else(|| v[key].as_str().and_then(|s| s.parse().ok()))
    };
    let min = number("minSendable").ok_or_else(|| invalid("no minSendable"))?;
    let max = number("maxSendable").ok_or_else(|| invalid("no maxSendable"))?;
    if min > max {
        return Err(invalid("minSendable is above maxSendable"));
    }
    let metadata = v["metadata"]
        .as_str()
        .ok_or_else(|| invalid("no metadata"))?
        .to_string();
    Ok(PayRequest {
        callback,
        min_sendable_msat: min,
        max_sendable_msat: max,
        metadata,
    })
}

/// Asks for an invoice of exactly `amount_msat` and checks it (amount, description hash) before returning it.
pub async fn invoice(request: &PayRequest, amount_msat: u64) -> Result<String, LnurlError> {
    if amount_msat < request.min_sendable_msat || amount_msat > request.max_sendable_msat {
        return Err(LnurlError::Invalid(format!(
            "{amount_msat} msat is outside what the service accepts ({}–{} msat)",
            request.min_sendable_msat, request.max_sendable_msat
        )));
    }
    let mut url = request.callback.clone();
    url.query_pairs_mut()
        .append_pair("amount", &amount_msat.to_string());
    let v = get_json(&url).await?;
    let invalid = |reason: String| LnurlError::InvalidResponse {
        url: redacted(&request.callback),
        reason,
    };
    let pr = v["pr"]
        .as_str()
        .ok_or_else(|| invalid("no invoice (`pr`)".into()))?
        .to_string();
    let (amount, hash) = crate::wallet::invoice_commitment(&pr)
        .ok_or_else(|| invalid("`pr` is not a BOLT 11 invoice".into()))?;
    if amount != Some(amount_msat) {
        return Err(invalid(format!(
            "the invoice is for {} msat, not the {amount_msat} msat asked for",
            amount
                .map(|a| a.to_string())
                .unwrap_or_else(|| "an open amount of".into())
        )));
    }
    let expected = hex::encode(Sha256::digest(request.metadata.as_bytes()));
    if hash.as_deref() != Some(expected.as_str()) {
        return Err(invalid(
            "the invoice's description hash is not sha256(metadata)".into(),
        ));
    }
    Ok(pr)
}
