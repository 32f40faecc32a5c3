//! Building the embedded ldk-node from the agent's config: network, chain source, storage, LSP, logging.

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use ldk_node::bitcoin::secp256k1::PublicKey;
use ldk_node::bitcoin::Network;
use ldk_node::config::{BackgroundSyncConfig, Config as LdkConfig, EsploraSyncConfig};
use ldk_node::lightning::ln::msgs::SocketAddress;
use ldk_node::logger::LogLevel;
use ldk_node::{Builder, Node};

use super::identity::Identity;
use super::WalletError;
use crate::config::Config;
use crate::home::Home;

/// File the node's own log goes to, inside the home's `logs/`. Info level: LDK names preimages only in traces.
pub const NODE_LOG_FILE: &str = "ldk-node.log";

/// The Lightning service provider as ldk-node needs it.
#[derive(Clone, Debug)]
pub struct Lsp {
    pub node_id: PublicKey,
    pub address: SocketAddress,
    /// Never logged.
    token: Option<String>,
}

/// The parts of the config the node is built from, checked once so a mistake is reported before anything runs.
#[derive(Clone, Debug)]
pub struct NodeSettings {
    pub network: Network,
    pub esplora_url: String,
    pub listen: Option<SocketAddress>,
    pub lsp: Option<Lsp>,
}

/// The chain source used when the config names none. Regtest has no public one.
pub fn default_esplora_url(network: Network) -> Option<&'static str> {
    match network {
        Network::Bitcoin => Some("https://blockstream.info/api"),
        Network::Testnet => Some("https://blockstream.info/testnet/api"),
        Network::Signet => Some("https://mempool.space/signet/api"),
        _ => None,
    }
}

pub fn parse_network(name: &str) -> Result<Network, WalletError> {
    match name {
        "bitcoin" | "mainnet" => Ok(Network::Bitcoin),
        "testnet" => Ok(Network::Testnet),
        "signet" => Ok(Network::Signet),
        "regtest" => Ok(Network::Regtest),
        other => Err(WalletError::Config(format!(
            "wallet.network `{other}` is not one of bitcoin, testnet, signet, regtest"
        ))),
    }
}

impl NodeSettings {
    pub fn from_config(config: &Config) -> Result<NodeSettings, WalletError> {
        let network = parse_network(&config.wallet.network)?;
        let esplora_url = match &config.wallet.esplora_url {
            Some(url) => url.trim_end_matches('/').to_string(),
            None => default_esplora_url(network)
                .ok_or_else(|| {
                    WalletError::Config(format!(
                        "wallet.esplora_url is required on {} (there is no public chain source); \
                         `automaton setup --lab DIR/lab.json` sets it for the lab",
                        config.wallet.network
                    ))
                })?
                .to_string(),
        };
        let listen = config
            .wallet
            .listen
            .as_deref()
            .map(|addr| {
                SocketAddress::from_str(addr).map_err(|_| {
                    WalletError::Config(format!("wallet.listen `{addr}` is not HOST:PORT"))
                })
            })
            .transpose()?;
        let lsp = config
            .wallet
            .lsp
            .as_ref()
            .map(|lsp| -> Result<Lsp, WalletError> {
                let node_id = PublicKey::from_str(&lsp.node_id).map_err(|_| {
                    WalletError::Config(format!(
                        "wallet.lsp.node_id `{}` is not a node id",
                        lsp.node_id
                    ))
                })?;
                let address = SocketAddress::from_str(&lsp.address).map_err(|_| {
                    WalletError::Config(format!(
                        "wallet.lsp.address `{}` is not HOST:PORT",
                        lsp.address
                    ))
                })?;
                Ok(Lsp {
                    node_id,
                    address,
                    token: lsp.token.clone(),
                })
            })
            .transpose()?;
        Ok(NodeSettings {
            network,
            esplora_url,
            listen,
            lsp,
        })
    }
}

/// Builds the node (no network access: that happens in `start`). Must run on the multi-thread runtime.
pub fn build(
    home: &Home,
    settings: &NodeSettings,
    identity: &Identity,
) -> Result<Arc<Node>, WalletError> {
    let storage = home.node_dir();
    create_private_dir(&storage)?;
    let log_path = home.logs_dir().join(NODE_LOG_FILE);
    if let Some(dir) = log_path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| WalletError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
    }

    let mut ldk_config = LdkConfig {
        network: settings.network,
        storage_dir_path: storage.to_string_lossy().into_owned(),
        listening_addresses: settings.listen.clone().map(|a| vec![a]),
        ..LdkConfig::default()
    };
    if let (Some(anchors), Some(lsp)) = (ldk_config.anchor_channels_config.as_mut(), &settings.lsp)
    {
        // A fresh agent has no on-chain coins for an anchor reserve; without this ldk-node refuses the LSP's
        // JIT channel. The LSP is trusted to publish a force close (it already is for 0-conf).
        anchors.trusted_peers_no_reserve.push(lsp.node_id);
    }

    let mut builder = Builder::from_config(ldk_config);
    builder.set_runtime(tokio::runtime::Handle::current());
    builder.set_entropy_bip39_mnemonic(
        identity.mnemonic().clone(),
        identity.passphrase().map(str::to_string),
    );
    // On regtest blocks come in bursts from tests and demos; follow them quickly. Elsewhere the defaults suit.
    let sync = if settings.network == Network::Regtest {
        BackgroundSyncConfig {
            onchain_wallet_sync_interval_secs: 10,
            lightning_wallet_sync_interval_secs: 10,
            fee_rate_cache_update_interval_secs: 60,
        }
    } else {
        BackgroundSyncConfig::default()
    };
    builder.set_chain_source_esplora(
        settings.esplora_url.clone(),
        Some(EsploraSyncConfig {
            background_sync_config: Some(sync),
        }),
    );
    builder.set_filesystem_logger(
        Some(log_path.to_string_lossy().into_owned()),
        Some(LogLevel::Info),
    );
    if let Some(lsp) = &settings.lsp {
        builder.set_liquidity_source_lsps2(lsp.node_id, lsp.address.clone(), lsp.token.clone());
    }
    let node = builder.build().map_err(|e| match e {
        ldk_node::BuildError::NetworkMismatch => WalletError::Config(format!(
            "the node storage in {} belongs to another network than wallet.network `{}`",
            storage.display(),
            settings.network
        )),
        other => WalletError::Build(other.to_string()),
    })?;
    Ok(Arc::new(node))
}

fn create_private_dir(dir: &Path) -> Result<(), WalletError> {
    use std::os::unix::fs::PermissionsExt;
    let io_err = |source| WalletError::Io {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io_err)?;
    // Channel state and keys material: owner only.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_need_a_chain_source_on_regtest() {
        let mut config = Config::default();
        config.wallet.network = "regtest".into();
        let err = NodeSettings::from_config(&config).unwrap_err().to_string();
        assert!(err.contains("esplora_url"), "{err}");
        config.wallet.esplora_url = Some("http://127.0.0.1:3002/".into());
        let s = NodeSettings::from_config(&config).unwrap();
        assert_eq!(s.esplora_url, "http://127.0.0.1:3002");
        let main = NodeSettings::from_config(&Config::default()).unwrap();
        assert_eq!(main.network, Network::Bitcoin);
        assert!(main.esplora_url.starts_with("https://"));
    }
}
