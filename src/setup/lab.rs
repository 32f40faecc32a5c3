//! Maps the offline world's `lab.json` onto an agent's config (`automaton setup --lab DIR/lab.json`).

use std::path::Path;

use serde::Deserialize;
use serde_json::{json, Map, Value};

/// The keys of `lab.json` that have a place in the agent's config. Other keys are ignored: the file grows as
/// the lab grows, and an older binary must still read a newer world.
#[derive(Debug, Deserialize)]
struct LabJson {
    network: Option<String>,
    esplora_url: Option<String>,
    model_url: Option<String>,
    lsp: Option<LabLsp>,
    /// The lab's Nostr relay (`ws://127.0.0.1:PORT`).
    relay_url: Option<String>,
    conway_url: Option<String>,
    conway_api_key: Option<String>,
    l402_model_url: Option<String>,
    /// The lab's LNVPS double.
    lnvps_url: Option<String>,
}

#[derive(Debug, Deserialize)]
struct LabLsp {
    node_id: String,
    address: String,
    token: Option<String>,
}

/// Where setup keeps the lab's Conway API key, relative to the home (0600; never in `automaton.yaml`).
pub const CONWAY_KEY_FILE: &str = "conway_api_key";

/// Name of the lab's free scripted model; the lab serves whatever model name it is asked for.
pub const LAB_MODEL: &str = "scripted";

/// Reads `lab.json` and returns the config layer it implies.
pub fn overlay(path: &Path) -> anyhow::Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        anyhow::anyhow!(
            "cannot read {}: {e} (is `automaton-lab up` running?)",
            path.display()
        )
    })?;
    let lab: LabJson = serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{} is not a lab.json: {e}", path.display()))?;
    Ok(lab_layer(lab))
}

/// Writes the secrets `lab.json` hands out into the home (0600 files the config points at): the Conway API key.
pub fn write_secrets(home: &crate::home::Home, path: &Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    let lab: LabJson = serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{} is not a lab.json: {e}", path.display()))?;
    if let Some(key) = lab.conway_api_key.filter(|k| !k.trim().is_empty()) {
        let file = home.root().join(CONWAY_KEY_FILE);
        crate::config::write_atomic(&file, format!("{}\n", key.trim()).as_bytes(), 0o600)
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", file.display()))?;
    }
    Ok(())
}

/// The lab's L402-paid model is opt-in: with `inference.auth: l402` (e.g. `-c inference.auth=l402`) and the lab's
/// free model as the endpoint, setup points the agent at `l402_model_url` instead.
pub fn apply_paid_model(config: &mut crate::config::Config, path: &Path) -> anyhow::Result<()> {
    if config.inference.auth != crate::config::InferenceAuth::L402 {
        return Ok(());
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    let lab: LabJson = serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{} is not a lab.json: {e}", path.display()))?;
    match (lab.l402_model_url, lab.model_url) {
        (Some(paid), Some(free)) if config.inference.base_url == free => {
            config.inference.base_url = paid;
            Ok(())
        }
        (None, _) => Err(anyhow::anyhow!(
            "inference.auth is l402 but {} lists no l402_model_url; nothing was written",
            path.display()
        )),
        _ => Ok(()),
    }
}

fn lab_layer(lab: LabJson) -> Value {
    let mut root = Map::new();
    let mut wallet = Map::new();
    if let Some(network) = lab.network {
        wallet.insert("network".into(), json!(network));
    }
    if let Some(url) = lab.esplora_url {
        wallet.insert("esplora_url".into(), json!(url));
    }
    if let Some(lsp) = lab.lsp {
        wallet.insert(
            "lsp".into(),
            json!({"node_id": lsp.node_id, "address": lsp.address, "token": lsp.token}),
        );
    }
    if !wallet.is_empty() {
        root.insert("wallet".into(), Value::Object(wallet));
    }
    // The lab's Conway double: its endpoint, and its key through a file setup writes (`write_secrets`). The
    // provider stays as it was; `compute.provider: conway` opts in.
    let mut conway = Map::new();
    if let Some(url) = lab.conway_url {
        conway.insert("api_url".into(), json!(url));
    }
    if lab.conway_api_key.is_some_and(|k| !k.trim().is_empty()) {
        conway.insert("api_key_env".into(), Value::Null);
        conway.insert("api_key_file".into(), json!(CONWAY_KEY_FILE));
    }
    let mut compute = Map::new();
    if !conway.is_empty() {
        compute.insert("conway".into(), Value::Object(conway));
    }
    if let Some(url) = lab.lnvps_url {
        compute.insert("lnvps".into(), json!({ "api_url": url }));
    }
    if !compute.is_empty() {
        root.insert("compute".into(), Value::Object(compute));
    }
    if let Some(url) = lab.model_url {
        // The lab's free model needs no key; clearing any key setting keeps a stale one from being sent there.
        root.insert(
            "inference".into(),
            json!({"provider": "openai", "base_url": url, "model": LAB_MODEL,
                   "api_key_env": null, "api_key_file": null}),
        );
    }
    if let Some(url) = lab.relay_url {
        root.insert("nostr".into(), json!({"relays": [url]}));
    }
    Value::Object(root)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn conway_endpoint_and_key_file_are_mapped_but_the_key_stays_out_of_the_config() {
        let lab: LabJson = serde_json::from_value(json!({
            "conway_url": "http://127.0.0.1:3010",
            "conway_api_key": "cnwy_k_lab"
        }))
        .unwrap();
        let layer = lab_layer(lab);
        assert!(!layer.to_string().contains("cnwy_k_lab"));
        let config = Config::default().merged(layer, "lab.json").unwrap();
        assert_eq!(config.compute.conway.api_url, "http://127.0.0.1:3010");
        assert_eq!(
            config.compute.conway.api_key_file.as_deref(),
            Some(Path::new(CONWAY_KEY_FILE))
        );
        assert_eq!(config.compute.provider, "local");

        let dir = tempfile::tempdir().unwrap();
        let lab_json = dir.path().join("lab.json");
        std::fs::write(&lab_json, r#"{"conway_api_key": "cnwy_k_lab"}"#).unwrap();
        let home = crate::home::Home::at(dir.path().join("home"));
        write_secrets(&home, &lab_json).unwrap();
        let file = home.root().join(CONWAY_KEY_FILE);
        assert_eq!(
            crate::config::read_secret_file(&file).unwrap().expose(),
            "cnwy_k_lab"
        );
    }

    #[test]
    fn the_paid_model_is_opt_in() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lab.json");
        std::fs::write(
            &path,
            r#"{"model_url": "http://127.0.0.1:1/v1", "l402_model_url": "http://127.0.0.1:2/v1"}"#,
        )
        .unwrap();
        let mut config = Config::default()
            .merged(overlay(&path).unwrap(), "lab")
            .unwrap();
        apply_paid_model(&mut config, &path).unwrap();
        assert_eq!(
            config.inference.base_url, "http://127.0.0.1:1/v1",
            "free by default"
        );
        config.inference.auth = crate::config::InferenceAuth::L402;
        apply_paid_model(&mut config, &path).unwrap();
        assert_eq!(config.inference.base_url, "http://127.0.0.1:2/v1");
        std::fs::write(&path, r#"{"model_url": "http://127.0.0.1:1/v1"}"#).unwrap();
        let mut config = Config::default()
            .merged(overlay(&path).unwrap(), "lab")
            .unwrap();
        config.inference.auth = crate::config::InferenceAuth::L402;
        assert!(apply_paid_model(&mut config, &path).is_err());
    }

    #[test]
    fn maps_known_keys_and_ignores_the_rest() {
        let lab: LabJson = serde_json::from_value(json!({
            "network": "regtest",
            "esplora_url": "http://127.0.0.1:3002",
            "control_url": "http://127.0.0.1:3003",
            "model_url": "http://127.0.0.1:3004/v1",
            "lsp": {"node_id": format!("02{}", "c".repeat(64)), "address": "127.0.0.1:9735", "token": "t"},
            "relay_url": "ws://127.0.0.1:7000"
        }))
        .unwrap();
        let mut base = Config::default();
        base.inference.api_key_env = Some("OPENAI_API_KEY".into());
        let config = base.merged(lab_layer(lab), "lab.json").unwrap();
        assert_eq!(config.wallet.network, "regtest");
        assert_eq!(
            config.wallet.esplora_url.as_deref(),
            Some("http://127.0.0.1:3002")
        );
        assert_eq!(
            config.wallet.lsp.as_ref().unwrap().token.as_deref(),
            Some("t")
        );
        assert_eq!(config.inference.base_url, "http://127.0.0.1:3004/v1");
        assert_eq!(config.inference.model, LAB_MODEL);
        assert_eq!(config.inference.api_key_env, None);
        assert_eq!(config.nostr.relays, vec!["ws://127.0.0.1:7000".to_string()]);
    }
}
