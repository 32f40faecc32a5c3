//! `Authorization: L402 <macaroon>[,<macaroon>…]:<hex preimage>`: parsing (lenient, as a seller should be) and
//! the one form a buyer sends.

use crate::challenge::Scheme;
use crate::macaroon::{Macaroon, MacaroonError};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    #[error("not an L402 or LSAT credential")]
    NotL402,
    #[error("the credential has no ':' before the preimage")]
    MissingPreimage,
    #[error("the preimage is not 32 bytes of hex")]
    BadPreimage,
    #[error("the credential carries no macaroon")]
    MissingMacaroon,
    #[error("no macaroon in the credential decodes: {0}")]
    BadMacaroon(MacaroonError),
    #[error("the macaroon header carries no preimage= caveat")]
    NoPreimageCaveat,
}

/// A parsed credential: the macaroons offered (any one may verify) and the preimage proving payment.
#[derive(Clone, PartialEq, Eq)]
pub struct Credential {
    pub scheme: Scheme,
    pub macaroons: Vec<Macaroon>,
    pub preimage: [u8; 32],
}

/// Debug never shows the preimage or the macaroon signatures.
impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential")
            .field("scheme", &self.scheme)
            .field("macaroons", &self.macaroons)
            .field("preimage", &"[redacted]")
            .finish()
    }
}

/// `L402 <base64 macaroon>:<lowercase hex preimage>`: single space, one token, what Aperture's strict parser
/// accepts.
pub fn format_authorization(macaroon_base64: &str, preimage: &[u8; 32]) -> String {
    format!("L402 {macaroon_base64}:{}", hex::encode(preimage))
}

/// Parses one `Authorization` value. Accepts `L402`/`LSAT` in any case, any whitespace after it,
/// several comma-separated tokens (those that do not decode are dropped), upper- or lowercase hex.
pub fn parse_authorization(value: &str) -> Result<Credential, CredentialError> {
    let value = value.trim();
    if value.len() > crate::challenge::MAX_HEADER_LEN {
        return Err(CredentialError::NotL402);
    }
    let split = value
        .find(char::is_whitespace)
        .ok_or(CredentialError::NotL402)?;
    let scheme = Scheme::parse(&value[..split]).ok_or(CredentialError::NotL402)?;
    let rest = value[split..].trim();
    let colon = rest.rfind(':').ok_or(CredentialError::MissingPreimage)?;
    let preimage = parse_preimage(&rest[colon + 1..]).ok_or(CredentialError::BadPreimage)?;
    let mut macaroons = Vec::new();
    let mut last_error = None;
    for token in rest[..colon]
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
    {
        match Macaroon::from_base64(token) {
            Ok(m) => macaroons.push(m),
            Err(e) => last_error = Some(e),
        }
    }
    if macaroons.is_empty() {
        return Err(last_error.map_or(
            CredentialError::MissingMacaroon,
            CredentialError::BadMacaroon,
        ));
    }
    Ok(Credential {
        scheme,
        macaroons,
        preimage,
    })
}

/// Aperture's other form: `Macaroon: <hex macaroon>` (or `Grpc-Metadata-Macaroon`) whose last `preimage=<hex>`
/// caveat, added by the holder, carries the proof.
pub fn parse_macaroon_header(value: &str) -> Result<Credential, CredentialError> {
    let bytes = hex::decode(value.trim()).map_err(|_| {
        CredentialError::BadMacaroon(MacaroonError::Malformed("the macaroon header is not hex"))
    })?;
    let macaroon = Macaroon::from_binary(&bytes).map_err(CredentialError::BadMacaroon)?;
    let preimage = macaroon
        .first_party_caveats()
        .filter_map(|c| {
            let (key, value) = c.split_once('=')?;
            (key.trim() == "preimage").then(|| parse_preimage(value))
        })
        .last()
        .ok_or(CredentialError::NoPreimageCaveat)?
        .ok_or(CredentialError::BadPreimage)?;
    Ok(Credential {
        scheme: Scheme::L402,
        macaroons: vec![macaroon],
        preimage,
    })
}

/// 64 hex digits, either case.
pub fn parse_preimage(text: &str) -> Option<[u8; 32]> {
    let text = text.trim();
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(text, &mut out).ok()?;
    Some(out)
}

/// Every credential a request carries, from its headers as `(lower-case name, value)` pairs: `Authorization:
/// L402|LSAT …` first (each may hold several tokens), then Aperture's `Macaroon` / `Grpc-Metadata-Macaroon` with a
/// `preimage=` caveat. Unparseable values are skipped: the caller answers a fresh challenge.
pub fn credentials_in<'a>(
    headers: impl IntoIterator<Item = (&'a str, &'a str)> + Clone,
) -> Vec<Credential> {
    let authorization = headers
        .clone()
        .into_iter()
        .filter(|(name, _)| *name == "authorization")
        .filter_map(|(_, value)| parse_authorization(value).ok());
    let macaroon = headers
        .into_iter()
        .filter(|(name, _)| *name == "macaroon" || *name == "grpc-metadata-macaroon")
        .filter_map(|(_, value)| parse_macaroon_header(value).ok());
    authorization.chain(macaroon).collect()
}
