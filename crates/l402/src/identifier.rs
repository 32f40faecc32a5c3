//! The 66-byte L402 macaroon identifier: version (u16 BE, 0), payment hash, token id.

use sha2::{Digest, Sha256};

/// Length of a version-0 identifier.
pub const IDENTIFIER_LEN: usize = 66;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentifierError {
    #[error("the identifier is {0} bytes, not {IDENTIFIER_LEN}")]
    Length(usize),
    #[error("unknown identifier version {0}")]
    UnknownVersion(u16),
}

/// What an L402 macaroon's identifier says: which payment unlocks it and which user it belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Identifier {
    pub payment_hash: [u8; 32],
    /// Random; stays the same when a token is re-minted for the same user.
    pub token_id: [u8; 32],
}

impl Identifier {
    pub fn new(payment_hash: [u8; 32], token_id: [u8; 32]) -> Identifier {
        Identifier {
            payment_hash,
            token_id,
        }
    }

    /// A fresh identifier with a random token id.
    pub fn random(payment_hash: [u8; 32]) -> Identifier {
        Identifier::new(payment_hash, rand::random())
    }

    pub fn encode(&self) -> [u8; IDENTIFIER_LEN] {
        let mut out = [0u8; IDENTIFIER_LEN];
        // out[0..2] is the version, 0.
        out[2..34].copy_from_slice(&self.payment_hash);
        out[34..66].copy_from_slice(&self.token_id);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Identifier, IdentifierError> {
        if bytes.len() < 2 {
            return Err(IdentifierError::Length(bytes.len()));
        }
        let version = u16::from_be_bytes([bytes[0], bytes[1]]);
        if version != 0 {
            return Err(IdentifierError::UnknownVersion(version));
        }
        if bytes.len() != IDENTIFIER_LEN {
            return Err(IdentifierError::Length(bytes.len()));
        }
        let mut payment_hash = [0u8; 32];
        let mut token_id = [0u8; 32];
        payment_hash.copy_from_slice(&bytes[2..34]);
        token_id.copy_from_slice(&bytes[34..66]);
        Ok(Identifier::new(payment_hash, token_id))
    }

    /// Where the root key is stored: `sha256(identifier bytes)`.
    pub fn root_key_id(&self) -> [u8; 32] {
        root_key_id(&self.encode())
    }
}

/// `sha256(identifier)`: the root key store's key for any identifier bytes.
pub fn root_key_id(identifier: &[u8]) -> [u8; 32] {
    Sha256::digest(identifier).into()
}

/// `sha256(preimage) == payment_hash`.
pub fn preimage_matches(preimage: &[u8; 32], payment_hash: &[u8; 32]) -> bool {
    let hash: [u8; 32] = Sha256::digest(preimage).into();
    &hash == payment_hash
}
