//! The lab's Lightning peers, ldk-node instances in this process: `hub` (LSPS2 JIT-channel provider and router),
//! `creator` (the human's wallet) and `merchant` (sells lab services), plus their control routes.

pub mod control;
pub mod creator;
pub mod lnurl;
pub mod merchant;
mod node;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ldk_node::bitcoin::secp256k1::PublicKey;
use ldk_node::liquidity::LSPS2ServiceConfig;
use serde::Serialize;

pub use control::{router, ControlState};
pub use node::{LabNode, Role, PAYMENT_TIMEOUT};

/// The hub's LSPS2 terms. A fresh agent must be able to live on them:
/// - 1% opening fee with a 500-sat minimum;
/// - the JIT channel is three times the forwarded amount (200% over-provisioning), so the agent also gets inbound
///   capacity for later payments and the hub keeps enough balance above its reserve and anchor outputs to forward
///   small first payments;
/// - payments from 2,000 sats (smaller ones could not pay the fee and still leave a usable channel) to 5,000,000
///   sats (the resulting 14.85M-sat channel stays under the 16,777,215-sat non-wumbo limit).
pub mod lsp_terms {
    pub const OPENING_FEE_PPM: u32 = 10_000;
    pub const MIN_OPENING_FEE_MSAT: u64 = 500_000;
    pub const OVER_PROVISIONING_PPM: u32 = 2_000_000;
    pub const MIN_PAYMENT_SIZE_MSAT: u64 = 2_000_000;
    pub const MAX_PAYMENT_SIZE_MSAT: u64 = 5_000_000_000;
    pub const MIN_CHANNEL_LIFETIME_BLOCKS: u32 = 1008;
    pub const MAX_CLIENT_TO_SELF_DELAY: u32 = 2016;
}

/// Errors of the peers and their control API. Callers branch on the variant (the control API maps each to a status).
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("building the {role} node failed: {reason}")]
    Build { role: &'static str, reason: String },
    #[error("{role}: {op} failed: {source}")]
    Node {
        role: &'static str,
        op: &'static str,
        #[source]
        source: ldk_node::NodeError,
    },
    #[error("payment {payment_hash} failed: {reason}")]
    PaymentFailed {
        payment_hash: String,
        reason: String,
    },
    #[error("payment {payment_hash} did not settle within {secs} s; it may still complete or fail later")]
    PaymentTimeout { payment_hash: String, secs: u64 },
    #[error(transparent)]
    Lnurl(#[from] lnurl::LnurlError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Timeout(String),
}

/// Where the peers live and which ports they listen on.
#[derive(Debug, Clone)]
pub struct PeersConfig {
    /// The lab directory; each peer keeps its storage in `DIR/peers/<name>/` and logs to `DIR/logs/<name>.log`.
    pub dir: PathBuf,
    pub esplora_url: String,
    pub hub_port: u16,
    pub creator_port: u16,
    pub merchant_port: u16,
    /// Token clients must present to the hub's LSPS2 service.
    pub lsp_token: String,
}

/// The LSP as a client configures it.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct LspInfo {
    pub node_id: String,
    pub address: String,
    pub token: String,
}

/// The three running peers.
pub struct Peers {
    pub hub: LabNode,
    pub creator: LabNode,
    pub merchant: LabNode,
    lsp_token: String,
    http: reqwest::Client,
}

impl Peers {
    /// Builds and starts hub, creator and merchant (resuming their storage if it exists).
    pub async fn start(config: PeersConfig) -> Result<Peers, PeerError> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(15))
            .build()
            .map_err(|e| PeerError::Build {
                role: "http client",
                reason: e.to_string(),
            })?;
        let spec = |role: Role, port: u16| node::NodeSpec {
            role,
            storage_dir: config.dir.join("peers").join(role.name()),
            log_file: config.dir.join("logs").join(format!("{}.log", role.name())),
            listen_port: port,
            esplora_url: config.esplora_url.clone(),
            lsps2_service: None,
            trusted_no_reserve: Vec::new(),
        };
        let mut hub_spec = spec(Role::Hub, config.hub_port);
        hub_spec.lsps2_service = Some(LSPS2ServiceConfig {
            require_token: Some(config.lsp_token.clone()),
            advertise_service: false,
            channel_opening_fee_ppm: lsp_terms::OPENING_FEE_PPM,
            channel_over_provisioning_ppm: lsp_terms::OVER_PROVISIONING_PPM,
            min_channel_opening_fee_msat: lsp_terms::MIN_OPENING_FEE_MSAT,
            min_channel_lifetime: lsp_terms::MIN_CHANNEL_LIFETIME_BLOCKS,
            max_client_to_self_delay: lsp_terms::MAX_CLIENT_TO_SELF_DELAY,
            min_payment_size_msat: lsp_terms::MIN_PAYMENT_SIZE_MSAT,
            max_payment_size_msat: lsp_terms::MAX_PAYMENT_SIZE_MSAT,
            // LSP-trusts-client: the funding transaction is broadcast at once, so the client may claim at once.
            client_trusts_lsp: false,
        });
        let hub = LabNode::start(hub_spec, http.clone()).await?;
        let mut creator_spec = spec(Role::Creator, config.creator_port);
        creator_spec.trusted_no_reserve = vec![hub.node_id()];
        let mut merchant_spec = spec(Role::Merchant, config.merchant_port);
        merchant_spec.trusted_no_reserve = vec![hub.node_id()];
        let (creator, merchant) = tokio::join!(
            LabNode::start(creator_spec, http.clone()),
            LabNode::start(merchant_spec, http.clone())
        );
        let (creator, merchant) = match (creator, merchant) {
            (Ok(c), Ok(m)) => (c, m),
            (Err(e), Ok(m)) => {
                m.stop().await;
                hub.stop().await;
                return Err(e);
            }
            (Ok(c), Err(e)) => {
                c.stop().await;
                hub.stop().await;
                return Err(e);
            }
            (Err(e), Err(_)) => {
                hub.stop().await;
                return Err(e);
            }
        };
        Ok(Peers {
            hub,
            creator,
            merchant,
            lsp_token: config.lsp_token,
            http,
        })
    }

    pub fn all(&self) -> [&LabNode; 3] {
        [&self.hub, &self.creator, &self.merchant]
    }

    pub fn get(&self, role: Role) -> &LabNode {
        match role {
            Role::Hub => &self.hub,
            Role::Creator => &self.creator,
            Role::Merchant => &self.merchant,
        }
    }

    pub fn lsp(&self) -> LspInfo {
        LspInfo {
            node_id: self.hub.node_id().to_string(),
            address: self.hub.address().to_string(),
            token: self.lsp_token.clone(),
        }
    }

    pub(crate) fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// Syncs all three nodes against the chain, concurrently.
    pub async fn sync_all(&self) -> Result<(), PeerError> {
        let (a, b, c) = tokio::join!(self.hub.sync(), self.creator.sync(), self.merchant.sync());
        a.and(b).and(c)
    }

    /// Stops all three nodes.
    pub async fn stop(&self) {
        tokio::join!(self.hub.stop(), self.creator.stop(), self.merchant.stop());
    }

    /// Heights, balances and channels of every peer.
    pub fn status(&self) -> Vec<NodeStatus> {
        self.all().iter().map(|n| NodeStatus::of(n)).collect()
    }
}

/// Opens an unannounced channel `from` → `to` unless one already exists (open or pending), and waits for the
/// `ChannelPending` stage (funding broadcast). Returns whether a channel was opened.
pub async fn ensure_channel(from: &LabNode, to: &LabNode, sats: u64) -> Result<bool, PeerError> {
    let peer = to.node_id();
    if from
        .node()
        .list_channels()
        .iter()
        .any(|c| c.counterparty_node_id == peer)
    {
        return Ok(false);
    }
    let address = to.socket_address();
    from.call("open_channel", move |n| {
        n.open_channel(peer, address, sats, None, None)
    })
    .await?;
    // The funding transaction exists once the channel has a funding outpoint.
    wait_until(Duration::from_secs(30), "channel funding", || {
        from.node()
            .list_channels()
            .iter()
            .any(|c| c.counterparty_node_id == peer && c.funding_txo.is_some())
    })
    .await?;
    Ok(true)
}

/// Polls `done` with backoff until it holds or `limit` passes.
pub async fn wait_until(
    limit: Duration,
    what: &str,
    mut done: impl FnMut() -> bool,
) -> Result<(), PeerError> {
    let started = Instant::now();
    let mut delay = Duration::from_millis(20);
    loop {
        if done() {
            return Ok(());
        }
        if started.elapsed() >= limit {
            return Err(PeerError::Timeout(format!(
                "{what} did not happen within {} s",
                limit.as_secs()
            )));
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(500));
    }
}

/// One peer as `/lab/status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct NodeStatus {
    pub name: &'static str,
    pub node_id: String,
    pub address: String,
    pub best_block_height: u32,
    pub onchain_sats: u64,
    pub spendable_onchain_sats: u64,
    pub lightning_sats: u64,
    pub channels: Vec<ChannelStatus>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChannelStatus {
    pub channel_id: String,
    pub counterparty_node_id: String,
    pub funding_txid: Option<String>,
    pub capacity_sats: u64,
    pub outbound_msat: u64,
    pub inbound_msat: u64,
    pub confirmations: Option<u32>,
    pub is_outbound: bool,
    pub is_ready: bool,
    pub is_usable: bool,
}

impl NodeStatus {
    fn of(n: &LabNode) -> NodeStatus {
        let node = n.node();
        let balances = node.list_balances();
        NodeStatus {
            name: n.role().name(),
            node_id: n.node_id().to_string(),
            address: n.address().to_string(),
            best_block_height: node.status().current_best_block.height,
            onchain_sats: balances.total_onchain_balance_sats,
            spendable_onchain_sats: balances.spendable_onchain_balance_sats,
            lightning_sats: balances.total_lightning_balance_sats,
            channels: node
                .list_channels()
                .into_iter()
                .map(|c| ChannelStatus {
                    channel_id: c.channel_id.to_string(),
                    counterparty_node_id: c.counterparty_node_id.to_string(),
                    funding_txid: c.funding_txo.map(|o| o.txid.to_string()),
                    capacity_sats: c.channel_value_sats,
                    outbound_msat: c.outbound_capacity_msat,
                    inbound_msat: c.inbound_capacity_msat,
                    confirmations: c.confirmations,
                    is_outbound: c.is_outbound,
                    is_ready: c.is_channel_ready,
                    is_usable: c.is_usable,
                })
                .collect(),
        }
    }
}

/// True when `node` has a usable channel with `peer`.
pub fn has_usable_channel(node: &LabNode, peer: &PublicKey) -> bool {
    node.node()
        .list_channels()
        .iter()
        .any(|c| &c.counterparty_node_id == peer && c.is_usable)
}

/// `DIR/peers/<name>` — where a peer's ldk-node storage (and seed) lives.
pub fn storage_dir(dir: &Path, role: Role) -> PathBuf {
    dir.join("peers").join(role.name())
}
