//! Macaroons: the V2 binary codec (plus V1 decoding), libmacaroons-compatible signing and first-party caveats.
//!
//! Why not the `macaroon` crate: it pulls `sodiumoxide`, an archived libsodium binding. L402 only needs
//! HMAC-SHA256 chains over first-party caveats, so this is a small codec on `hmac`/`sha2`, byte-compatible with
//! libmacaroons and Go's `gopkg.in/macaroon.v2` (which Aperture uses): the same serialisation and the same key
//! derivation, `HMAC-SHA256(key = "macaroons-key-generator", root_key)`.

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

/// The key libmacaroons derives every root key with (zero-padded to 32 bytes there; HMAC pads it the same way).
const KEY_GENERATOR: &[u8] = b"macaroons-key-generator";

/// A decoded token is refused above this size: challenges and credentials travel in HTTP headers.
pub const MAX_MACAROON_BYTES: usize = 16 * 1024;

const FIELD_EOS: u8 = 0;
const FIELD_LOCATION: u8 = 1;
const FIELD_IDENTIFIER: u8 = 2;
const FIELD_VID: u8 = 4;
const FIELD_SIGNATURE: u8 = 6;

/// Why a token could not be decoded or verified.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MacaroonError {
    #[error("the token is not base64")]
    Base64,
    #[error("the macaroon is empty")]
    Empty,
    #[error("the macaroon is larger than {MAX_MACAROON_BYTES} bytes")]
    TooLarge,
    #[error("unsupported macaroon version byte {0:#04x}")]
    UnknownVersion(u8),
    #[error("malformed macaroon: {0}")]
    Malformed(&'static str),
    #[error("the macaroon signature does not verify")]
    BadSignature,
    #[error("the macaroon has a third-party caveat, which this verifier cannot discharge")]
    ThirdPartyCaveat,
}

/// One caveat. First-party caveats carry only `id` (`condition=value` for L402); third-party ones also a
/// verification id and usually a location. Decoded so a token round-trips; only first-party ones verify.
#[derive(Clone, PartialEq, Eq)]
pub struct Caveat {
    pub id: Vec<u8>,
    pub verification_id: Option<Vec<u8>>,
    pub location: Option<String>,
}

impl Caveat {
    pub fn first_party(condition: impl Into<Vec<u8>>) -> Caveat {
        Caveat {
            id: condition.into(),
            verification_id: None,
            location: None,
        }
    }

    pub fn is_first_party(&self) -> bool {
        self.verification_id.is_none()
    }

    /// The caveat as text, when it is UTF-8.
    pub fn as_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.id).ok()
    }
}

impl std::fmt::Debug for Caveat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // `preimage=` caveats carry a secret; everything else is shown.
        match self.as_str() {
            Some(s) if s.trim_start().starts_with("preimage") => {
                f.write_str("Caveat(preimage=[redacted])")
            }
            Some(s) => write!(f, "Caveat({s:?})"),
            None => write!(f, "Caveat(0x{})", hex::encode(&self.id)),
        }
    }
}

/// A macaroon: location, identifier, caveats and the HMAC chain's final signature.
#[derive(Clone, PartialEq, Eq)]
pub struct Macaroon {
    location: Option<String>,
    identifier: Vec<u8>,
    caveats: Vec<Caveat>,
    signature: [u8; 32],
}

/// Macaroons are bearer credentials: Debug never shows the signature.
impl std::fmt::Debug for Macaroon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Macaroon")
            .field("location", &self.location)
            .field("identifier", &hex::encode(&self.identifier))
            .field("caveats", &self.caveats)
            .field("signature", &"[redacted]")
            .finish()
    }
}

/// `HMAC-SHA256(key, data)`.
pub fn hmac_sha256(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac =
        <HmacSha256 as Mac>::new_from_slice(key).expect("HMAC accepts keys of any length");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// libmacaroons' derivation of the signing key from a root key.
pub fn derive_key(root_key: &[u8]) -> [u8; 32] {
    hmac_sha256(KEY_GENERATOR, root_key)
}

impl Macaroon {
    /// Mints a macaroon: `sig = HMAC(derive_key(root_key), identifier)`.
    pub fn new(
        root_key: &[u8],
        identifier: impl Into<Vec<u8>>,
        location: Option<&str>,
    ) -> Macaroon {
        let identifier = identifier.into();
        let signature = hmac_sha256(&derive_key(root_key), &identifier);
        Macaroon {
            location: location.filter(|l| !l.is_empty()).map(str::to_string),
            identifier,
            caveats: Vec::new(),
            signature,
        }
    }

    /// Appends a first-party caveat (`condition=value` for L402); anyone holding the macaroon can do this.
    pub fn add_first_party_caveat(&mut self, condition: impl Into<Vec<u8>>) {
        let caveat = Caveat::first_party(condition);
        self.signature = hmac_sha256(&self.signature, &caveat.id);
        self.caveats.push(caveat);
    }

    pub fn location(&self) -> Option<&str> {
        self.location.as_deref()
    }

    pub fn identifier(&self) -> &[u8] {
        &self.identifier
    }

    pub fn caveats(&self) -> &[Caveat] {
        &self.caveats
    }

    pub fn signature(&self) -> &[u8; 32] {
        &self.signature
    }

    /// First-party caveats as text, in order (non-UTF-8 ones as lossy text, so a verifier still sees them).
    pub fn first_party_caveats(&self) -> impl Iterator<Item = std::borrow::Cow<'_, str>> {
        self.caveats
            .iter()
            .filter(|c| c.is_first_party())
            .map(|c| String::from_utf8_lossy(&c.id))
    }

    /// Recomputes the HMAC chain from `root_key` and compares it with the signature in constant time.
    /// Caveats are not interpreted here (see [`crate::verify`]); a third-party caveat is refused.
    pub fn verify_signature(&self, root_key: &[u8]) -> Result<(), MacaroonError> {
        if self.caveats.iter().any(|c| !c.is_first_party()) {
            return Err(MacaroonError::ThirdPartyCaveat);
        }
        let mut sig = hmac_sha256(&derive_key(root_key), &self.identifier);
        for caveat in &self.caveats {
            sig = hmac_sha256(&sig, &caveat.id);
        }
        if bool::from(sig.ct_eq(&self.signature)) {
            Ok(())
        } else {
            Err(MacaroonError::BadSignature)
        }
    }

    /// The V2 binary serialisation (what libmacaroons and Go's macaroon.v2 write).
    pub fn to_binary(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.identifier.len() + self.caveats.len() * 40);
        out.push(2);
        if let Some(location) = &self.location {
            put_field(&mut out, FIELD_LOCATION, location.as_bytes());
        }
        put_field(&mut out, FIELD_IDENTIFIER, &self.identifier);
        out.push(FIELD_EOS);
        for caveat in &self.caveats {
            if let Some(location) = caveat.location.as_deref().filter(|l| !l.is_empty()) {
                put_field(&mut out, FIELD_LOCATION, location.as_bytes());
            }
            put_field(&mut out, FIELD_IDENTIFIER, &caveat.id);
            if let Some(vid) = caveat.verification_id.as_deref().filter(|v| !v.is_empty()) {
                put_field(&mut out, FIELD_VID, vid);
            }
            out.push(FIELD_EOS);
        }
        out.push(FIELD_EOS);
        put_field(&mut out, FIELD_SIGNATURE, &self.signature);
        out
    }

    /// Standard padded base64 of the V2 binary form: what goes into challenges and credentials.
    pub fn to_base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.to_binary())
    }

    /// Decodes a binary macaroon: V2 (first byte 0x02) or the older V1 packet format (first byte a hex digit).
    pub fn from_binary(bytes: &[u8]) -> Result<Macaroon, MacaroonError> {
        match bytes.first() {
            None => Err(MacaroonError::Empty),
            _ if bytes.len() > MAX_MACAROON_BYTES => Err(MacaroonError::TooLarge),
            Some(2) => decode_v2(bytes),
            Some(b) if b.is_ascii_hexdigit() => decode_v1(bytes),
            Some(&b) => Err(MacaroonError::UnknownVersion(b)),
        }
    }

    /// Decodes base64 leniently (standard or URL-safe alphabet, padded or not, surrounding whitespace), then the
    /// binary macaroon.
    pub fn from_base64(text: &str) -> Result<Macaroon, MacaroonError> {
        let bytes = decode_base64_lenient(text).ok_or(MacaroonError::Base64)?;
        Macaroon::from_binary(&bytes)
    }
}

/// Standard or URL-safe base64, with or without padding. `None` when it is neither.
pub fn decode_base64_lenient(text: &str) -> Option<Vec<u8>> {
    use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
    let text = text.trim();
    if text.len() > MAX_MACAROON_BYTES * 2 {
        return None;
    }
    let unpadded = text.trim_end_matches('=');
    if unpadded.contains(['-', '_']) {
        URL_SAFE_NO_PAD.decode(unpadded).ok()
    } else {
        STANDARD_NO_PAD.decode(unpadded).ok()
    }
}

fn put_field(out: &mut Vec<u8>, kind: u8, data: &[u8]) {
    out.push(kind);
    let mut len = data.len() as u64;
    loop {
        let byte = (len & 0x7f) as u8;
        len >>= 7;
        if len == 0 {
            out.push(byte);
            break;
        }
        out.push(byte | 0x80);
    }
    out.extend_from_slice(data);
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    fn byte(&mut self) -> Result<u8, MacaroonError> {
        let b = self.peek().ok_or(MacaroonError::Malformed("truncated"))?;
        self.pos += 1;
        Ok(b)
    }

    fn uvarint(&mut self) -> Result<usize, MacaroonError> {
        let mut value: u64 = 0;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            value |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return usize::try_from(value)
                    .map_err(|_| MacaroonError::Malformed("field length overflows"));
            }
        }
        Err(MacaroonError::Malformed("field length overflows"))
    }

    fn take(&mut self, len: usize) -> Result<&'a [u8], MacaroonError> {
        let end = self
            .pos
            .checked_add(len)
            .ok_or(MacaroonError::Malformed("truncated"))?;
        let slice = self
            .bytes
            .get(self.pos..end)
            .ok_or(MacaroonError::Malformed("truncated"))?;
        self.pos = end;
        Ok(slice)
    }

    /// Reads one `type, length, data` field, or `None` at an end-of-section marker.
    fn field(&mut self) -> Result<Option<(u8, &'a [u8])>, MacaroonError> {
        let kind = self.byte()?;
        if kind == FIELD_EOS {
            return Ok(None);
        }
        let len = self.uvarint()?;
        Ok(Some((kind, self.take(len)?)))
    }
}

/// One section of a V2 macaroon: `[location] identifier [vid] EOS`, fields in increasing type order.
struct Section<'a> {
    location: Option<&'a [u8]>,
    identifier: &'a [u8],
    vid: Option<&'a [u8]>,
}

fn read_section<'a>(r: &mut Reader<'a>, allow_vid: bool) -> Result<Section<'a>, MacaroonError> {
    let mut location = None;
    let mut identifier = None;
    let mut vid = None;
    let mut last = 0u8;
    while let Some((kind, data)) = r.field()? {
        if kind <= last {
            return Err(MacaroonError::Malformed("fields out of order or repeated"));
        }
        last = kind;
        match kind {
            FIELD_LOCATION => location = Some(data),
            FIELD_IDENTIFIER => identifier = Some(data),
            FIELD_VID if allow_vid => vid = Some(data),
            _ => return Err(MacaroonError::Malformed("unexpected field")),
        }
    }
    let identifier = identifier.ok_or(MacaroonError::Malformed("section without identifier"))?;
    Ok(Section {
        location,
        identifier,
        vid,
    })
}

fn utf8(bytes: &[u8], what: &'static str) -> Result<String, MacaroonError> {
    String::from_utf8(bytes.to_vec()).map_err(|_| MacaroonError::Malformed(what))
}

fn decode_v2(bytes: &[u8]) -> Result<Macaroon, MacaroonError> {
    let mut r = Reader { bytes, pos: 1 };
    let head = read_section(&mut r, false)?;
    let location = head
        .location
        .map(|l| utf8(l, "location is not UTF-8"))
        .transpose()?;
    let identifier = head.identifier.to_vec();
    let mut caveats = Vec::new();
    loop {
        if r.peek() == Some(FIELD_EOS) {
            r.pos += 1;
            break;
        }
        let section = read_section(&mut r, true)?;
        caveats.push(Caveat {
            id: section.identifier.to_vec(),
            verification_id: section.vid.map(<[u8]>::to_vec),
            location: section
                .location
                .map(|l| utf8(l, "caveat location is not UTF-8"))
                .transpose()?,
        });
    }
    let (kind, sig) = r
        .field()?
        .ok_or(MacaroonError::Malformed("missing signature"))?;
    if kind != FIELD_SIGNATURE {
        return Err(MacaroonError::Malformed("missing signature"));
    }
    let signature: [u8; 32] = sig
        .try_into()
        .map_err(|_| MacaroonError::Malformed("signature is not 32 bytes"))?;
    if r.pos != bytes.len() {
        return Err(MacaroonError::Malformed(
            "trailing bytes after the signature",
        ));
    }
    Ok(Macaroon {
        location,
        identifier,
        caveats,
        signature,
    })
}

/// V1: packets of `4 hex digits length` + `key value\n`, keys location/identifier/cid/vid/cl/signature.
/// `vid` is binary and `signature` is 32 raw bytes.
fn decode_v1(bytes: &[u8]) -> Result<Macaroon, MacaroonError> {
    let mut pos = 0;
    let mut packets: Vec<(&[u8], &[u8])> = Vec::new();
    while pos < bytes.len() {
        let head = bytes
            .get(pos..pos + 4)
            .ok_or(MacaroonError::Malformed("truncated V1 packet"))?;
        let head = std::str::from_utf8(head)
            .map_err(|_| MacaroonError::Malformed("bad V1 packet length"))?;
        let len = usize::from_str_radix(head, 16)
            .map_err(|_| MacaroonError::Malformed("bad V1 packet length"))?;
        if len < 6 {
            return Err(MacaroonError::Malformed("bad V1 packet length"));
        }
        let packet = bytes
            .get(pos + 4..pos + len)
            .ok_or(MacaroonError::Malformed("truncated V1 packet"))?;
        let packet = packet
            .strip_suffix(b"\n")
            .ok_or(MacaroonError::Malformed("V1 packet without newline"))?;
        let space = packet
            .iter()
            .position(|&b| b == b' ')
            .ok_or(MacaroonError::Malformed("V1 packet without key"))?;
        packets.push((&packet[..space], &packet[space + 1..]));
        pos += len;
    }
    let mut it = packets.into_iter().peekable();
    let mut location = None;
    if let Some((b"location", value)) = it.peek().copied() {
        location = Some(utf8(value, "location is not UTF-8")?).filter(|l| !l.is_empty());
        it.next();
    }
    let identifier = match it.next() {
        Some((b"identifier", value)) => value.to_vec(),
        _ => return Err(MacaroonError::Malformed("V1 macaroon without identifier")),
    };
    let mut caveats: Vec<Caveat> = Vec::new();
    for (key, value) in it.by_ref() {
        match key {
            b"cid" => caveats.push(Caveat::first_party(value)),
            b"vid" | b"cl" => {
                let caveat = caveats
                    .last_mut()
                    .ok_or(MacaroonError::Malformed("V1 vid/cl before cid"))?;
                if key == b"vid" {
                    caveat.verification_id = Some(value.to_vec());
                } else {
                    caveat.location = Some(utf8(value, "caveat location is not UTF-8")?);
                }
            }
            b"signature" => {
                let signature: [u8; 32] = value
                    .try_into()
                    .map_err(|_| MacaroonError::Malformed("signature is not 32 bytes"))?;
                return Ok(Macaroon {
                    location,
                    identifier,
                    caveats,
                    signature,
                });
            }
            _ => return Err(MacaroonError::Malformed("unknown V1 packet")),
        }
    }
    Err(MacaroonError::Malformed("missing signature"))
}
