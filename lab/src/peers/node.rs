//! One lab Lightning node: building an ldk-node instance with its own storage and log file, its event loop task,
//! and the waits (payment settled, channel usable) the control API and the world need.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ldk_node::bitcoin::secp256k1::PublicKey;
use ldk_node::bitcoin::Network;
use ldk_node::config::{BackgroundSyncConfig, Config, EsploraSyncConfig};
use ldk_node::lightning::ln::channelmanager::PaymentId;
use ldk_node::lightning::ln::msgs::SocketAddress;
use ldk_node::liquidity::LSPS2ServiceConfig;
use ldk_node::logger::LogLevel;
use ldk_node::payment::{PaymentKind, PaymentStatus};
use ldk_node::{Builder, Event, Node};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::PeerError;

/// How long a payment call waits for the payment to settle before answering with an error.
pub const PAYMENT_TIMEOUT: Duration = Duration::from_secs(45);

/// The three peers the lab runs. A closed set, so an enum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Hub,
    Creator,
    Merchant,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Hub => "hub",
            Role::Creator => "creator",
            Role::Merchant => "merchant",
        }
    }
}

/// What a node needs to be built.
pub(crate) struct NodeSpec {
    pub role: Role,
    /// Storage directory of this node (seed file, SQLite store).
    pub storage_dir: PathBuf,
    pub log_file: PathBuf,
    pub listen_port: u16,
    pub esplora_url: String,
    pub lsps2_service: Option<LSPS2ServiceConfig>,
    /// Peers this node accepts inbound anchor channels from without holding an on-chain reserve.
    pub trusted_no_reserve: Vec<PublicKey>,
}

/// A settled outgoing payment.
#[derive(Debug, Clone)]
pub struct Settled {
    pub payment_hash: [u8; 32],
    pub preimage: [u8; 32],
    pub fee_msat: u64,
}

/// A running ldk-node with its event loop.
pub struct LabNode {
    role: Role,
    node: Arc<Node>,
    address: String,
    /// Failure reasons seen by the event loop, so a failed payment can say why.
    failures: Arc<Mutex<HashMap<PaymentId, String>>>,
    cancel: CancellationToken,
    event_task: Mutex<Option<JoinHandle<()>>>,
}

impl LabNode {
    /// Builds and starts the node, then spawns its event loop. The storage dir keeps the seed (`keys_seed`, written
    /// by ldk-node with 0400 permissions) so a restarted lab comes back with the same identity.
    pub(crate) async fn start(
        spec: NodeSpec,
        esplora: reqwest::Client,
    ) -> Result<LabNode, PeerError> {
        let role = spec.role;
        std::fs::create_dir_all(&spec.storage_dir).map_err(|source| PeerError::Io {
            path: spec.storage_dir.clone(),
            source,
        })?;
        // The storage holds the seed and channel state: owner only.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&spec.storage_dir, std::fs::Permissions::from_mode(0o700))
                .map_err(|source| PeerError::Io {
                    path: spec.storage_dir.clone(),
                    source,
                })?;
        }
        if let Some(parent) = spec.log_file.parent() {
            std::fs::create_dir_all(parent).map_err(|source| PeerError::Io {
                path: parent.to_path_buf(),
                source,
            })?;
        }
        let address = format!("127.0.0.1:{}", spec.listen_port);
        let socket_address = SocketAddress::from_str(&address)
            .map_err(|_| PeerError::BadRequest(format!("invalid listening address {address}")))?;

        let mut config = Config {
            network: Network::Regtest,
            storage_dir_path: path_string(&spec.storage_dir),
            listening_addresses: Some(vec![socket_address]),
            ..Config::default()
        };
        if let Some(anchors) = config.anchor_channels_config.as_mut() {
            anchors.trusted_peers_no_reserve = spec.trusted_no_reserve.clone();
        }

        let mut builder = Builder::from_config(config);
        builder.set_runtime(tokio::runtime::Handle::current());
        // Background sync keeps the peers following the chain while the lab runs (10 s is ldk-node's minimum);
        // whoever needs fresh state right now calls `sync()`.
        let sync = BackgroundSyncConfig {
            onchain_wallet_sync_interval_secs: 10,
            lightning_wallet_sync_interval_secs: 10,
            fee_rate_cache_update_interval_secs: 60,
        };
        builder.set_chain_source_esplora(
            spec.esplora_url.clone(),
            Some(EsploraSyncConfig {
                background_sync_config: Some(sync),
            }),
        );
        builder.set_filesystem_logger(Some(path_string(&spec.log_file)), Some(log_level()));
        builder
            .set_node_alias(format!("lab-{}", role.name()))
            .map_err(|e| PeerError::Build {
                role: role.name(),
                reason: e.to_string(),
            })?;
        if let Some(service) = spec.lsps2_service {
            builder.set_liquidity_provider_lsps2(service);
        }
        let node = builder.build().map_err(|e| PeerError::Build {
            role: role.name(),
            reason: e.to_string(),
        })?;
        let node = Arc::new(node);
        blocking(&node, role, "start", |n| n.start()).await?;

        let failures = Arc::new(Mutex::new(HashMap::new()));
        let cancel = CancellationToken::new();
        let event_task = tokio::spawn(event_loop(
            role,
            Arc::clone(&node),
            Arc::clone(&failures),
            cancel.clone(),
            EsploraProbe {
                client: esplora,
                base: spec.esplora_url,
            },
        ));
        Ok(LabNode {
            role,
            node,
            address,
            failures,
            cancel,
            event_task: Mutex::new(Some(event_task)),
        })
    }

    pub fn role(&self) -> Role {
        self.role
    }

    /// The underlying ldk-node, for tests and status.
    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }

    pub fn node_id(&self) -> PublicKey {
        self.node.node_id()
    }

    /// `127.0.0.1:PORT` the node listens on for Lightning peers.
    pub fn address(&self) -> &str {
        &self.address
    }

    pub fn socket_address(&self) -> SocketAddress {
        // The address was parsed successfully when the node was built.
        SocketAddress::from_str(&self.address).unwrap_or(SocketAddress::TcpIpV4 {
            addr: [127, 0, 0, 1],
            port: 0,
        })
    }

    /// Syncs the on-chain and Lightning wallets against the chain now.
    pub async fn sync(&self) -> Result<(), PeerError> {
        blocking(&self.node, self.role, "sync_wallets", |n| n.sync_wallets()).await
    }

    /// Runs a (possibly blocking) ldk-node call off the async executor.
    pub(crate) async fn call<T, F>(&self, op: &'static str, f: F) -> Result<T, PeerError>
    where
        T: Send + 'static,
        F: FnOnce(&Node) -> Result<T, ldk_node::NodeError> + Send + 'static,
    {
        blocking(&self.node, self.role, op, f).await
    }

    /// Waits until the outgoing payment `id` settles or fails, at most [`PAYMENT_TIMEOUT`] after `started`.
    pub(crate) async fn wait_settled(
        &self,
        id: PaymentId,
        payment_hash: [u8; 32],
        started: Instant,
    ) -> Result<Settled, PeerError> {
        let mut delay = Duration::from_millis(20);
        loop {
            if let Some(details) = self.node.payment(&id) {
                match details.status {
                    PaymentStatus::Succeeded => {
                        let preimage = match details.kind {
                            PaymentKind::Bolt11 { preimage, .. }
                            | PaymentKind::Bolt11Jit { preimage, .. }
                            | PaymentKind::Spontaneous { preimage, .. } => preimage,
                            _ => None,
                        };
                        // ldk-node records the preimage before it reports success.
                        let preimage =
                            preimage
                                .map(|p| p.0)
                                .ok_or_else(|| PeerError::PaymentFailed {
                                    payment_hash: hex::encode(payment_hash),
                                    reason: "settled without a preimage".into(),
                                })?;
                        return Ok(Settled {
                            payment_hash,
                            preimage,
                            fee_msat: details.fee_paid_msat.unwrap_or(0),
                        });
                    }
                    PaymentStatus::Failed => {
                        let reason = self
                            .failures
                            .lock()
                            .ok()
                            .and_then(|f| f.get(&id).cloned())
                            .unwrap_or_else(|| "no route or the recipient rejected it".into());
                        return Err(PeerError::PaymentFailed {
                            payment_hash: hex::encode(payment_hash),
                            reason,
                        });
                    }
                    PaymentStatus::Pending => {}
                }
            }
            if started.elapsed() >= PAYMENT_TIMEOUT {
                return Err(PeerError::PaymentTimeout {
                    payment_hash: hex::encode(payment_hash),
                    secs: PAYMENT_TIMEOUT.as_secs(),
                });
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(250));
        }
    }

    /// Stops the event loop and the node. Safe to call twice.
    pub async fn stop(&self) {
        self.cancel.cancel();
        let task = self.event_task.lock().ok().and_then(|mut t| t.take());
        if let Some(task) = task {
            let _ = task.await;
        }
        match blocking(&self.node, self.role, "stop", |n| n.stop()).await {
            Ok(())
            | Err(PeerError::Node {
                source: ldk_node::NodeError::NotRunning,
                ..
            }) => {}
            Err(e) => tracing::warn!(role = self.role.name(), error = %e, "stopping node failed"),
        }
    }
}

impl LabNode {
    /// Stops the node synchronously, for drops: a node dropped without `stop()` (a test panicked, the world was
    /// dropped) still stops its background tasks, so nothing keeps running against a chain that is gone.
    pub fn halt(&self) {
        self.cancel.cancel();
        // ldk-node's stop blocks in place, which a current-thread runtime forbids; skip it there rather than
        // panic inside a drop.
        let current_thread = tokio::runtime::Handle::try_current()
            .map(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread)
            .unwrap_or(false);
        if self.node.status().is_running && !current_thread {
            let node = Arc::clone(&self.node);
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || node.stop()));
        }
    }
}

impl Drop for LabNode {
    fn drop(&mut self) {
        self.halt();
    }
}

async fn blocking<T, F>(
    node: &Arc<Node>,
    role: Role,
    op: &'static str,
    f: F,
) -> Result<T, PeerError>
where
    T: Send + 'static,
    F: FnOnce(&Node) -> Result<T, ldk_node::NodeError> + Send + 'static,
{
    let node = Arc::clone(node);
    tokio::task::spawn_blocking(move || f(&node))
        .await
        .map_err(|e| PeerError::Build {
            role: role.name(),
            reason: format!("{op} panicked: {e}"),
        })?
        .map_err(|source| PeerError::Node {
            role: role.name(),
            op,
            source,
        })
}

/// Asks the chain whether a transaction reached its mempool or a block.
struct EsploraProbe {
    client: reqwest::Client,
    base: String,
}

impl EsploraProbe {
    async fn wait_for_tx(&self, txid: &str) -> bool {
        let url = format!("{}/tx/{txid}/status", self.base);
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut delay = Duration::from_millis(20);
        while Instant::now() < deadline {
            if let Ok(resp) = self.client.get(&url).send().await {
                if resp.status().is_success() {
                    return true;
                }
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(500));
        }
        false
    }
}

async fn event_loop(
    role: Role,
    node: Arc<Node>,
    failures: Arc<Mutex<HashMap<PaymentId, String>>>,
    cancel: CancellationToken,
    esplora: EsploraProbe,
) {
    loop {
        let event = tokio::select! {
            _ = cancel.cancelled() => break,
            event = node.next_event_async() => event,
        };
        tracing::info!(role = role.name(), event = %describe(&event), "ldk event");
        match &event {
            Event::PaymentFailed {
                payment_id: Some(id),
                reason,
                ..
            } => {
                if let Ok(mut f) = failures.lock() {
                    f.insert(
                        *id,
                        reason
                            .map(|r| format!("{r:?}"))
                            .unwrap_or_else(|| "unknown".into()),
                    );
                }
            }
            Event::ChannelPending {
                funding_txo,
                channel_id,
                ..
            } if role == Role::Hub && funded_by_us(&node, channel_id) => {
                // The hub funds JIT channels from its on-chain wallet. BDK does not mark coins spent by a funding
                // transaction until it sees it on chain, so wait until the broadcast reached the mempool and re-sync:
                // otherwise two JIT opens in a row could pick the same coins and the second would be a double spend.
                let txid = funding_txo.txid.to_string();
                if !esplora.wait_for_tx(&txid).await {
                    tracing::warn!(role = role.name(), %txid, "funding transaction not seen in the mempool");
                }
                let sync_node = Arc::clone(&node);
                match tokio::task::spawn_blocking(move || sync_node.sync_wallets()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::warn!(role = role.name(), error = %e, "re-sync after funding failed")
                    }
                    Err(e) => tracing::warn!(role = role.name(), error = %e, "re-sync task failed"),
                }
            }
            _ => {}
        }
        if let Err(e) = node.event_handled() {
            tracing::warn!(role = role.name(), error = %e, "could not mark event handled");
        }
    }
}

/// Whether this node funded the channel (only then did its on-chain coins move).
fn funded_by_us(node: &Node, channel_id: &ldk_node::lightning::ln::types::ChannelId) -> bool {
    node.list_channels()
        .iter()
        .any(|c| &c.channel_id == channel_id && c.is_outbound)
}

/// A one-line description of an event that never includes a preimage.
fn describe(event: &Event) -> String {
    match event {
        Event::PaymentSuccessful {
            payment_hash,
            fee_paid_msat,
            ..
        } => {
            format!(
                "payment_successful hash={payment_hash} fee_msat={}",
                fee_paid_msat.unwrap_or(0)
            )
        }
        Event::PaymentFailed {
            payment_hash,
            reason,
            ..
        } => format!(
            "payment_failed hash={} reason={reason:?}",
            payment_hash.map(|h| h.to_string()).unwrap_or_default()
        ),
        Event::PaymentReceived {
            payment_hash,
            amount_msat,
            ..
        } => {
            format!("payment_received hash={payment_hash} amount_msat={amount_msat}")
        }
        Event::PaymentClaimable {
            payment_hash,
            claimable_amount_msat,
            ..
        } => {
            format!("payment_claimable hash={payment_hash} amount_msat={claimable_amount_msat}")
        }
        Event::PaymentForwarded {
            total_fee_earned_msat,
            outbound_amount_forwarded_msat,
            ..
        } => format!(
            "payment_forwarded amount_msat={} fee_msat={}",
            outbound_amount_forwarded_msat.unwrap_or(0),
            total_fee_earned_msat.unwrap_or(0)
        ),
        Event::ChannelPending {
            channel_id,
            counterparty_node_id,
            funding_txo,
            ..
        } => {
            format!(
                "channel_pending id={channel_id} peer={counterparty_node_id} funding={funding_txo}"
            )
        }
        Event::ChannelReady {
            channel_id,
            counterparty_node_id,
            ..
        } => format!(
            "channel_ready id={channel_id} peer={}",
            counterparty_node_id
                .map(|p| p.to_string())
                .unwrap_or_default()
        ),
        Event::ChannelClosed {
            channel_id,
            counterparty_node_id,
            reason,
            ..
        } => format!(
            "channel_closed id={channel_id} peer={} reason={}",
            counterparty_node_id
                .map(|p| p.to_string())
                .unwrap_or_default(),
            reason.as_ref().map(|r| r.to_string()).unwrap_or_default()
        ),
        Event::SplicePending { channel_id, .. } => format!("splice_pending id={channel_id}"),
        Event::SpliceFailed { channel_id, .. } => format!("splice_failed id={channel_id}"),
    }
}

/// ldk-node's own log level; `AUTOMATON_LAB_LDK_LOG=trace|debug|info|warn|error` overrides the default `info`.
/// Info keeps preimages out of the files (LDK mentions them only in trace output).
fn log_level() -> LogLevel {
    match std::env::var("AUTOMATON_LAB_LDK_LOG")
        .unwrap_or_default()
        .to_ascii_lowercase()
        .as_str()
    {
        "gossip" => LogLevel::Gossip,
        "trace" => LogLevel::Trace,
        "debug" => LogLevel::Debug,
        "warn" => LogLevel::Warn,
        "error" => LogLevel::Error,
        _ => LogLevel::Info,
    }
}

fn path_string(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}
