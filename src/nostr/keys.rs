//! The agent's Nostr key: NIP-06 (`m/44'/1237'/0'/0/0`) from the same BIP-39 mnemonic (and passphrase) that
//! seeds its Lightning node, so the mnemonic alone restores both identities.

use ::nostr::nips::nip06::FromMnemonic;
use ::nostr::Keys;
use serde::Deserialize;

use super::NostrError;
use crate::home::Home;

/// The part of `wallet.json` the key needs. Other fields are the wallet's business.
#[derive(Deserialize)]
struct WalletFile {
    mnemonic: String,
    #[serde(default)]
    passphrase: Option<String>,
}

/// The agent's Nostr keys, derived from `wallet.json` in its home.
pub fn agent_keys(home: &Home) -> Result<Keys, NostrError> {
    let path = home.wallet_path();
    let shown = path.display().to_string();
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(NostrError::NoWallet { path: shown })
        }
        Err(e) => {
            return Err(NostrError::Key {
                path: shown,
                reason: e.to_string(),
            })
        }
    };
    // serde's message never quotes the mnemonic for a well-typed string field, but say nothing of the content
    // anyway: this error is printed.
    let wallet: WalletFile = serde_json::from_str(&text).map_err(|e| NostrError::Key {
        path: shown.clone(),
        reason: format!(
            "not a wallet file (line {}, column {})",
            e.line(),
            e.column()
        ),
    })?;
    keys_from_mnemonic(&wallet.mnemonic, wallet.passphrase.as_deref()).map_err(|reason| {
        NostrError::Key {
            path: shown,
            reason,
        }
    })
}

/// NIP-06 account 0 for a mnemonic and optional passphrase. The error never contains the words.
pub fn keys_from_mnemonic(mnemonic: &str, passphrase: Option<&str>) -> Result<Keys, String> {
    let passphrase = passphrase.filter(|p| !p.is_empty());
    Keys::from_mnemonic(mnemonic.trim(), passphrase)
        .map_err(|_| "the mnemonic is not a valid BIP-39 English mnemonic".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test vectors of NIP-06 itself.
    #[test]
    fn nip06_test_vectors() {
        let keys = keys_from_mnemonic(
            "leader monkey parrot ring guide accident before fence cannon height naive bean",
            None,
        )
        .unwrap();
        assert_eq!(
            keys.secret_key().to_secret_hex(),
            "7f7ff03d123792d6ac594bfa67bf6d0c0ab55b6b1fdb6249303fe861f1ccba9a"
        );
        assert_eq!(
            keys.public_key().to_hex(),
            "17162c921dc4d2518f9a101db33695df1afb56ab82f5ff3e5da6eec3ca5cd917"
        );
        let keys = keys_from_mnemonic(
            "what bleak badge arrange retreat wolf trade produce cricket blur garlic valid proud rude strong \
             choose busy staff weather area salt hollow arm fade",
            Some(""),
        )
        .unwrap();
        assert_eq!(
            keys.public_key().to_hex(),
            "d41b22899549e1f3d335a31002cfd382174006e166d3e658e3a5eecdb6463573"
        );
    }

    #[test]
    fn reads_the_wallet_file_and_hides_the_words_in_errors() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::at(dir.path());
        let err = agent_keys(&home).unwrap_err();
        assert!(matches!(err, NostrError::NoWallet { .. }), "{err}");

        std::fs::write(
            home.wallet_path(),
            r#"{"mnemonic": "leader monkey parrot ring guide accident before fence cannon height naive bean",
                "created_at": "2025-01-01T00:00:00Z"}"#,
        )
        .unwrap();
        assert_eq!(
            agent_keys(&home).unwrap().public_key().to_hex(),
            "17162c921dc4d2518f9a101db33695df1afb56ab82f5ff3e5da6eec3ca5cd917"
        );

        std::fs::write(
            home.wallet_path(),
            r#"{"mnemonic": "leader monkey parrot ring guide accident before fence cannon height naive naive"}"#,
        )
        .unwrap();
        let err = agent_keys(&home).unwrap_err().to_string();
        assert!(!err.contains("monkey"), "{err}");

        // A passphrase gives another key from the same words.
        std::fs::write(
            home.wallet_path(),
            r#"{"mnemonic": "leader monkey parrot ring guide accident before fence cannon height naive bean",
                "passphrase": "extra"}"#,
        )
        .unwrap();
        assert_ne!(
            agent_keys(&home).unwrap().public_key().to_hex(),
            "17162c921dc4d2518f9a101db33695df1afb56ab82f5ff3e5da6eec3ca5cd917"
        );
    }
}
