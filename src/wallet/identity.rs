//! The agent's identity: one BIP39 mnemonic in `wallet.json` (mode 0600), and every key derived from it — the
//! Lightning node key (ldk-node's derivation), the Nostr key (NIP-06) and LNURL-auth linking keys (LUD-05).
//!
//! The node id and npub are derived here without starting a node, so `setup` can record them and `status` can
//! show them while the agent is stopped. ldk-node derives its keys from the same 64-byte BIP39 seed
//! (`Builder::set_entropy_bip39_mnemonic`), and a test checks the running node agrees with [`Identity::node_id`].

use std::fmt;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use bitcoin::bip32::{ChildNumber, DerivationPath, Xpriv};
use bitcoin::hashes::{hmac, sha256, Hash, HashEngine};
use bitcoin::secp256k1::{PublicKey, Secp256k1, SecretKey};
use bitcoin::NetworkKind;
use serde::{Deserialize, Serialize};

use super::WalletError;

/// NIP-06: the Nostr key of account 0.
const NOSTR_PATH: &str = "m/44'/1237'/0'/0/0";
/// LUD-05: the hashing key that turns a domain into a linking-key path.
const LNURL_HASHING_PATH: &str = "m/138'/0";

/// The contents of `wallet.json`. `Debug` never shows the mnemonic or passphrase.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WalletFile {
    pub mnemonic: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub passphrase: Option<String>,
    pub created_at: String,
}

impl fmt::Debug for WalletFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WalletFile")
            .field("mnemonic", &"[redacted]")
            .field(
                "passphrase",
                &self.passphrase.as_ref().map(|_| "[redacted]"),
            )
            .field("created_at", &self.created_at)
            .finish()
    }
}

/// The agent's keys, held in memory. `Debug` never shows a secret.
#[derive(Clone)]
pub struct Identity {
    mnemonic: bip39::Mnemonic,
    passphrase: Option<String>,
    created_at: String,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("node_id", &self.node_id().to_string())
            .field("created_at", &self.created_at)
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// A fresh 24-word mnemonic from the operating system's randomness.
    pub fn generate() -> Result<Identity, WalletError> {
        let mnemonic = bip39::Mnemonic::generate(24)
            .map_err(|e| WalletError::Identity(format!("cannot generate a mnemonic: {e}")))?;
        Ok(Identity {
            mnemonic,
            passphrase: None,
            created_at: crate::state::now_rfc3339(),
        })
    }

    /// An identity restored from words (any BIP39 length, English, checksum verified).
    pub fn from_phrase(phrase: &str, passphrase: Option<String>) -> Result<Identity, WalletError> {
        let normalized = phrase.split_whitespace().collect::<Vec<_>>().join(" ");
        let mnemonic = bip39::Mnemonic::parse_in_normalized(bip39::Language::English, &normalized)
            .map_err(|e| WalletError::Identity(format!("not a valid BIP39 mnemonic: {e}")))?;
        Ok(Identity {
            mnemonic,
            passphrase: passphrase.filter(|p| !p.is_empty()),
            created_at: crate::state::now_rfc3339(),
        })
    }

    /// Reads a restore file: either the bare words, or a `wallet.json` backup (`{mnemonic, passphrase?}`).
    pub fn from_restore_file(path: &Path) -> Result<Identity, WalletError> {
        let text = std::fs::read_to_string(path).map_err(|source| WalletError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let trimmed = text.trim();
        if trimmed.starts_with('{') {
            #[derive(Deserialize)]
            struct Backup {
                mnemonic: String,
                #[serde(default)]
                passphrase: Option<String>,
            }
            let backup: Backup = serde_json::from_str(trimmed).map_err(|e| {
                WalletError::Identity(format!(
                    "{} is neither a list of words nor a wallet.json backup: {e}",
                    path.display()
                ))
            })?;
            return Identity::from_phrase(&backup.mnemonic, backup.passphrase);
        }
        Identity::from_phrase(trimmed, None).map_err(|e| match e {
            WalletError::Identity(reason) => {
                WalletError::Identity(format!("{}: {reason}", path.display()))
            }
            other => other,
        })
    }

    /// Loads `wallet.json`, refusing a file that others can read.
    pub fn load(path: &Path) -> Result<Identity, WalletError> {
        let meta = std::fs::metadata(path).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => WalletError::NoWallet {
                path: path.to_path_buf(),
            },
            _ => WalletError::Io {
                path: path.to_path_buf(),
                source,
            },
        })?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(WalletError::Identity(format!(
                "{} has mode {mode:03o}; it holds the wallet's mnemonic and must be private (chmod 600 {})",
                path.display(),
                path.display()
            )));
        }
        let text = std::fs::read_to_string(path).map_err(|source| WalletError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let file: WalletFile = serde_json::from_str(&text).map_err(|e| {
            // serde's message names the field, never its value.
            WalletError::Identity(format!("{} is not a wallet file: {e}", path.display()))
        })?;
        let mut identity = Identity::from_phrase(&file.mnemonic, file.passphrase)
            .map_err(|e| WalletError::Identity(format!("{}: {e}", path.display())))?;
        identity.created_at = file.created_at;
        Ok(identity)
    }

    /// Writes `wallet.json` with mode 0600. Never replaces an existing file: losing a mnemonic loses the money.
    pub fn write_new(&self, path: &Path) -> Result<(), WalletError> {
        let file = WalletFile {
            mnemonic: self.mnemonic.to_string(),
            passphrase: self.passphrase.clone(),
            created_at: self.created_at.clone(),
        };
        let mut text = serde_json::to_string_pretty(&file)
            .map_err(|e| WalletError::Identity(format!("cannot encode the wallet file: {e}")))?;
        text.push('\n');
        let io_err = |source| WalletError::Io {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io_err)?;
        }
        let mut out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(io_err)?;
        // The umask could have narrowed the mode further, never widened it; set it exactly anyway.
        out.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(io_err)?;
        let written = out.write_all(text.as_bytes()).and_then(|_| out.sync_all());
        if let Err(source) = written {
            let _ = std::fs::remove_file(path);
            return Err(io_err(source));
        }
        Ok(())
    }

    /// The mnemonic words, for the one moment setup shows them on a terminal.
    pub fn phrase(&self) -> crate::config::Secret {
        crate::config::Secret::new(self.mnemonic.to_string())
    }

    pub fn mnemonic(&self) -> &bip39::Mnemonic {
        &self.mnemonic
    }

    pub fn passphrase(&self) -> Option<&str> {
        self.passphrase.as_deref()
    }

    pub fn created_at(&self) -> &str {
        &self.created_at
    }

    /// The 64-byte BIP39 seed (PBKDF2 of mnemonic and passphrase): the root of every key.
    fn seed(&self) -> [u8; 64] {
        self.mnemonic
            .to_seed(self.passphrase.as_deref().unwrap_or(""))
    }

    fn master(&self) -> Xpriv {
        // The network only matters when an extended key is serialised; keys are the same on every network.
        Xpriv::new_master(NetworkKind::Main, &self.seed())
            .expect("a 64-byte seed is always a valid BIP32 master seed")
    }

    /// The Lightning node secret exactly as ldk-node derives it: its KeysManager is seeded with the BIP32
    /// master's private key, and takes the node secret at `m/0'` of the master built from that seed.
    fn node_secret(&self) -> SecretKey {
        let secp = Secp256k1::signing_only();
        let ldk_seed = self.master().private_key.secret_bytes();
        let keys_master = Xpriv::new_master(NetworkKind::Test, &ldk_seed)
            .expect("32 bytes are a valid BIP32 master seed");
        keys_master
            .derive_priv(&secp, &[ChildNumber::Hardened { index: 0 }])
            .expect("hardened derivation from a valid key cannot fail")
            .private_key
    }

    /// The node id: the agent's identity on Lightning.
    pub fn node_id(&self) -> PublicKey {
        PublicKey::from_secret_key(&Secp256k1::signing_only(), &self.node_secret())
    }

    /// NIP-06 Nostr secret key (`m/44'/1237'/0'/0/0`).
    pub fn nostr_secret_key(&self) -> SecretKey {
        derive(&self.master(), NOSTR_PATH)
    }

    /// NIP-06 Nostr public key, x-only, hex.
    pub fn nostr_public_hex(&self) -> String {
        let secp = Secp256k1::signing_only();
        let (xonly, _) = self.nostr_secret_key().x_only_public_key(&secp);
        hex::encode(xonly.serialize())
    }

    /// NIP-19 `npub1…` of the Nostr key.
    pub fn npub(&self) -> String {
        let secp = Secp256k1::signing_only();
        let (xonly, _) = self.nostr_secret_key().x_only_public_key(&secp);
        npub_from_xonly(&xonly.serialize())
    }

    /// LUD-05 linking key for `domain` (the service's host name, without a trailing dot).
    pub fn lnurl_linking_key(&self, domain: &str) -> SecretKey {
        linking_key(&self.master(), domain)
    }
}

/// Derives the private key at a fixed path (the paths in this file are constants that always parse).
fn derive(master: &Xpriv, path: &str) -> SecretKey {
    let secp = Secp256k1::signing_only();
    let path = DerivationPath::from_str(path).expect("derivation path constants are valid");
    master
        .derive_priv(&secp, &path)
        .expect("derivation from a valid key cannot fail")
        .private_key
}

/// LUD-05: `HMAC-SHA256(hashingKey, domain)`; its first 16 bytes, as four big-endian u32 (each may be hardened),
/// extend `m/138'`.
fn linking_key(master: &Xpriv, domain: &str) -> SecretKey {
    let hashing_key = derive(master, LNURL_HASHING_PATH);
    let material = lnurl_derivation_material(&hashing_key.secret_bytes(), domain);
    let secp = Secp256k1::signing_only();
    let mut path = vec![ChildNumber::Hardened { index: 138 }];
    for chunk in material[..16].chunks(4) {
        let index = u32::from_be_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        path.push(ChildNumber::from(index));
    }
    master
        .derive_priv(&secp, &path)
        .expect("derivation from a valid key cannot fail")
        .private_key
}

fn lnurl_derivation_material(hashing_key: &[u8; 32], domain: &str) -> [u8; 32] {
    let mut engine = hmac::HmacEngine::<sha256::Hash>::new(hashing_key);
    engine.input(domain.trim_end_matches('.').as_bytes());
    hmac::Hmac::<sha256::Hash>::from_engine(engine).to_byte_array()
}

/// NIP-19 bech32 encoding of an x-only public key.
pub fn npub_from_xonly(xonly: &[u8; 32]) -> String {
    use bitcoin::bech32::{self, Bech32, Hrp};
    let hrp = Hrp::parse("npub").expect("`npub` is a valid human-readable part");
    bech32::encode::<Bech32>(hrp, xonly).expect("32 bytes always fit a bech32 string")
}

/// What setup did with the wallet.
#[derive(Clone, Debug)]
pub struct IdentitySetup {
    pub path: PathBuf,
    pub node_id: String,
    pub npub: String,
    /// A new `wallet.json` was written (generated or restored) in this run.
    pub created: bool,
    /// The words were generated here (not restored), so the user has never seen them.
    pub generated: bool,
    pub identity: Identity,
}

/// Makes sure the home has a wallet: keeps an existing `wallet.json` (a rerun of an interrupted setup, or
/// `--reconfigure`), else writes `restored` (from `--mnemonic-file`) or a newly generated mnemonic. Never
/// overwrites a wallet: a different restored mnemonic is refused.
pub fn ensure(
    wallet_path: &Path,
    restored: Option<Identity>,
) -> Result<IdentitySetup, WalletError> {
    if wallet_path.exists() {
        let existing = Identity::load(wallet_path)?;
        if let Some(restored) = &restored {
            if restored.node_id() != existing.node_id() {
                return Err(WalletError::Identity(format!(
                    "{} already holds a different wallet; refusing to replace it with the given mnemonic",
                    wallet_path.display(),
                )));
            }
        }
        return Ok(IdentitySetup {
            path: wallet_path.to_path_buf(),
            node_id: existing.node_id().to_string(),
            npub: existing.npub(),
            created: false,
            generated: false,
            identity: existing,
        });
    }
    let (identity, generated) = match restored {
        Some(identity) => (identity, false),
        None => (Identity::generate()?, true),
    };
    identity.write_new(wallet_path)?;
    Ok(IdentitySetup {
        path: wallet_path.to_path_buf(),
        node_id: identity.node_id().to_string(),
        npub: identity.npub(),
        created: true,
        generated,
        identity,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nip06_vectors() {
        let a = Identity::from_phrase(
            "leader monkey parrot ring guide accident before fence cannon height naive bean",
            None,
        )
        .unwrap();
        assert_eq!(
            hex::encode(a.nostr_secret_key().secret_bytes()),
            "7f7ff03d123792d6ac594bfa67bf6d0c0ab55b6b1fdb6249303fe861f1ccba9a"
        );
        assert_eq!(
            a.nostr_public_hex(),
            "17162c921dc4d2518f9a101db33695df1afb56ab82f5ff3e5da6eec3ca5cd917"
        );
        let b = Identity::from_phrase(
            "what bleak badge arrange retreat wolf trade produce cricket blur garlic valid proud rude strong \
             choose busy staff weather area salt hollow arm fade",
            None,
        )
        .unwrap();
        assert_eq!(
            hex::encode(b.nostr_secret_key().secret_bytes()),
            "c15d739894c81a2fcfd3a2df85a0d2c0dbc47a280d092799f144d73d7ae78add"
        );
        assert_eq!(
            b.nostr_public_hex(),
            "d41b22899549e1f3d335a31002cfd382174006e166d3e658e3a5eecdb6463573"
        );
    }

    #[test]
    fn npub_encoding_matches_nip19() {
        // NIP-19's own example.
        let pk = hex::decode("3bf0c63fcb93463407af97a5e5ee64fa883d107ef9e558472c4eb9aaaefa459d")
            .unwrap();
        let pk: [u8; 32] = pk.try_into().unwrap();
        assert_eq!(
            npub_from_xonly(&pk),
            "npub180cvv07tjdrrgpa0j7j7tmnyl2yr6yr7l8j4s3evf6u64th6gkwsyjh6w6"
        );
        let id = Identity::generate().unwrap();
        assert!(crate::config::validate_npub(&id.npub()).is_ok());
    }

    #[test]
    fn lud05_vector() {
        let key: [u8; 32] =
            hex::decode("7d417a6a5e9a6a4a879aeaba11a11838764c8fa2b959c242d43dea682b3e409b")
                .unwrap()
                .try_into()
                .unwrap();
        let material = lnurl_derivation_material(&key, "site.com");
        assert_eq!(
            hex::encode(material),
            "5eae68af9e81406202458433f68b7d7aa2cb9e1e88cd0a66d21d2594ffe64db4"
        );
        let suffix: Vec<u32> = material[..16]
            .chunks(4)
            .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert_eq!(suffix, vec![1588488367, 2659270754, 38110259, 4136336762]);
        let id = Identity::generate().unwrap();
        assert_ne!(
            id.lnurl_linking_key("site.com"),
            id.lnurl_linking_key("other.com")
        );
        assert_eq!(
            id.lnurl_linking_key("site.com."),
            id.lnurl_linking_key("site.com")
        );
    }

    #[test]
    fn node_id_matches_ldk_keys_manager() {
        use ldk_node::lightning::sign::{KeysManager, NodeSigner, Recipient};
        let id = Identity::generate().unwrap();
        let ldk_seed = id.master().private_key.secret_bytes();
        let keys = KeysManager::new(&ldk_seed, 1, 2, true);
        assert_eq!(keys.get_node_id(Recipient::Node).unwrap(), id.node_id());
    }

    #[test]
    fn passphrase_changes_every_key() {
        let words = Identity::generate().unwrap().phrase();
        let plain = Identity::from_phrase(words.expose(), None).unwrap();
        let salted = Identity::from_phrase(words.expose(), Some("extra".into())).unwrap();
        assert_ne!(plain.node_id(), salted.node_id());
        assert_ne!(plain.npub(), salted.npub());
    }

    #[test]
    fn wallet_file_is_private_never_replaced_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wallet.json");
        let first = ensure(&path, None).unwrap();
        assert!(first.created && first.generated);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let again = ensure(&path, None).unwrap();
        assert!(!again.created);
        assert_eq!(again.node_id, first.node_id);
        assert_eq!(again.identity.created_at(), first.identity.created_at());
        assert!(first.identity.write_new(&path).is_err());

        // A different restore file is refused rather than replacing the wallet.
        let other = dir.path().join("other.txt");
        std::fs::write(&other, Identity::generate().unwrap().phrase().expose()).unwrap();
        let other = Identity::from_restore_file(&other).unwrap();
        let err = ensure(&path, Some(other)).unwrap_err().to_string();
        assert!(err.contains("different wallet"), "{err}");

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = Identity::load(&path).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
    }

    #[test]
    fn restore_from_words_or_backup() {
        let dir = tempfile::tempdir().unwrap();
        let original = Identity::from_phrase(
            "leader monkey parrot ring guide accident before fence cannon height naive bean",
            Some("pw".into()),
        )
        .unwrap();
        let backup = dir.path().join("backup.json");
        original.write_new(&backup).unwrap();
        let words = dir.path().join("words.txt");
        std::fs::write(
            &words,
            "  leader monkey parrot ring guide accident\nbefore fence cannon height naive bean\n",
        )
        .unwrap();
        let from_backup = Identity::from_restore_file(&backup).unwrap();
        assert_eq!(from_backup.node_id(), original.node_id());
        let from_words = Identity::from_restore_file(&words).unwrap();
        assert_eq!(from_words.passphrase(), None);
        let bad = dir.path().join("bad.txt");
        std::fs::write(&bad, "leader monkey parrot").unwrap();
        let err = Identity::from_restore_file(&bad).unwrap_err().to_string();
        assert!(err.contains("bad.txt"), "{err}");
        assert!(!err.contains("leader"), "{err}");
    }

    #[test]
    fn debug_hides_secrets() {
        let id = Identity::generate().unwrap();
        let words = id.phrase();
        let first_word = words.expose().split(' ').next().unwrap().to_string();
        let debug = format!("{id:?}");
        assert!(!debug.contains(words.expose()));
        let file = WalletFile {
            mnemonic: words.expose().to_string(),
            passphrase: Some("pw-secret".into()),
            created_at: "now".into(),
        };
        let debug = format!("{file:?}");
        assert!(!debug.contains(&first_word) || !debug.contains(words.expose()));
        assert!(!debug.contains("pw-secret"));
        assert!(debug.contains("[redacted]"));
    }
}
