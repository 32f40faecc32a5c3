//! The agent's Lightning wallet: the only module that imports `ldk_node`. It owns the identity (one mnemonic →
//! node key, Nostr key, LNURL-auth keys), the embedded node's lifecycle, the event pump that turns payments into
//! receipts, and the pay functions, which accept only a `money::Permit`.
//!
//! `automaton run` opens the wallet and starts its node in the background: the agent loop never waits for it.
//! When the chain source is unreachable, `Node::start` fails (it blocks on a fee-rate fetch); the lifecycle task
//! retries with backoff while the agent keeps thinking, and everything that needs the node answers `NotReady`.

mod events;
pub mod identity;
mod node;
mod ops;
mod pay;
pub mod proof;
pub mod receive;
pub mod spend;
mod tier;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use ldk_node::Node;
use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::home::Home;
use crate::money::BudgetPolicy;
use crate::state::{Db, StateError};

pub use identity::{Identity, IdentitySetup};
pub use node::{default_esplora_url, NODE_LOG_FILE};
pub use ops::{
    invoice_commitment, invoice_expires_at, payment_hash_of, Balance, ChannelInfo, CreatedInvoice,
    InvoiceSummary, WalletInfo,
};
pub use pay::{OnchainSent, Paid};

/// kv keys written at setup so `status` can show the identity without starting a node.
pub const NODE_ID_KEY: &str = "wallet.node_id";
pub const NPUB_KEY: &str = "wallet.npub";
pub const NETWORK_KEY: &str = "wallet.network";

/// Longest wait between two attempts to start the node.
const MAX_START_BACKOFF: Duration = Duration::from_secs(60);

/// Everything that can go wrong in the wallet. `exit_code` maps it to the CLI's conventions.
#[derive(Debug, thiserror::Error)]
pub enum WalletError {
    #[error("no wallet at {} (run `automaton setup`)", path.display())]
    NoWallet { path: std::path::PathBuf },
    #[error("{0}")]
    Identity(String),
    #[error("{}: {source}", path.display())]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("wallet config: {0}")]
    Config(String),
    #[error("cannot build the Lightning node: {0}")]
    Build(String),
    /// The node is not running yet (starting, or its chain source is unreachable) or no longer.
    #[error("the Lightning node is not ready: {reason}")]
    NotReady { reason: String },
    #[error("the Lightning node failed to {op}: {reason}")]
    Node { op: &'static str, reason: String },
    #[error("{0}")]
    BadRequest(String),
    #[error("not enough inbound liquidity: {0}")]
    NoLiquidity(String),
    /// ldk-node refuses to pay the same invoice twice.
    #[error("invoice {payment_hash} was already paid or is being paid")]
    DuplicatePayment { payment_hash: String },
    /// A payment was attempted and failed (nothing was lost).
    #[error("payment {payment_hash} failed: {reason}")]
    PaymentFailed {
        payment_hash: String,
        reason: String,
    },
    /// A payment was attempted and has not ended yet; its permit stays reserved until it does.
    #[error("payment {payment_hash} is still in flight after {secs} s; its reservation stays until it ends")]
    PaymentPending { payment_hash: String, secs: u64 },
    #[error(transparent)]
    Budget(#[from] crate::money::BudgetError),
    #[error(transparent)]
    Money(#[from] crate::money::MoneyError),
    #[error(transparent)]
    State(#[from] StateError),
}

impl WalletError {
    /// CONVENTIONS.md: 2 refused by policy (nothing paid), 3 a payment was attempted and failed, else 1.
    pub fn exit_code(&self) -> u8 {
        match self {
            WalletError::Budget(e) => e.exit_code(),
            WalletError::PaymentFailed { .. } | WalletError::PaymentPending { .. } => 3,
            _ => 1,
        }
    }

    /// A short machine-readable name for JSON answers.
    pub fn kind(&self) -> &'static str {
        match self {
            WalletError::NoWallet { .. } => "no_wallet",
            WalletError::Identity(_) => "identity",
            WalletError::Io { .. } => "io",
            WalletError::Config(_) => "config",
            WalletError::Build(_) => "build",
            WalletError::NotReady { .. } => "not_ready",
            WalletError::Node { .. } => "node",
            WalletError::BadRequest(_) => "bad_request",
            WalletError::NoLiquidity(_) => "no_liquidity",
            WalletError::DuplicatePayment { .. } => "duplicate_payment",
            WalletError::PaymentFailed { .. } => "payment_failed",
            WalletError::PaymentPending { .. } => "payment_pending",
            WalletError::Budget(e) => e.kind(),
            WalletError::Money(_) => "money",
            WalletError::State(_) => "state",
        }
    }
}

/// Where the node is in its life, for `wallet info` and for callers waiting on it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum NodeState {
    /// Building or starting; `last_error` says why the previous attempt failed (chain unreachable…).
    Starting {
        attempts: u32,
        last_error: Option<String>,
    },
    Running {
        since: String,
    },
    /// A problem no retry can fix (a config mistake, storage of another network).
    Failed {
        error: String,
    },
    Stopped,
}

impl NodeState {
    /// One line for people: what the node is doing (and why it is not running).
    pub fn describe(&self) -> String {
        match self {
            NodeState::Starting {
                attempts,
                last_error: Some(error),
            } => format!("starting (attempt {attempts} failed: {error}; retrying)"),
            NodeState::Starting { .. } => "starting".to_string(),
            NodeState::Running { .. } => "running".to_string(),
            NodeState::Failed { error } => format!("failed: {error}"),
            NodeState::Stopped => "stopped".to_string(),
        }
    }
}

/// The running wallet: a cheap handle shared by the control socket, the tools and the lifecycle task.
#[derive(Clone)]
pub struct Wallet {
    inner: Arc<Inner>,
}

struct Inner {
    home: Home,
    config: Arc<Config>,
    db: Db,
    budget: BudgetPolicy,
    identity: Identity,
    node_id: String,
    settings: Result<node::NodeSettings, String>,
    node: OnceLock<Arc<Node>>,
    state: watch::Sender<NodeState>,
}

impl std::fmt::Debug for Wallet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wallet")
            .field("node_id", &self.inner.node_id)
            .field("state", &*self.inner.state.borrow())
            .finish()
    }
}

impl Wallet {
    /// Loads the identity from `wallet.json`. Nothing touches the network or the node storage yet.
    pub fn open(
        home: &Home,
        config: &Config,
        db: Db,
        budget: BudgetPolicy,
    ) -> Result<Wallet, WalletError> {
        let identity = Identity::load(&home.wallet_path())?;
        let settings = node::NodeSettings::from_config(config).map_err(|e| e.to_string());
        let (state, _) = watch::channel(NodeState::Starting {
            attempts: 0,
            last_error: None,
        });
        Ok(Wallet {
            inner: Arc::new(Inner {
                home: home.clone(),
                config: Arc::new(config.clone()),
                db,
                budget,
                node_id: identity.node_id().to_string(),
                identity,
                settings,
                node: OnceLock::new(),
                state,
            }),
        })
    }

    pub fn node_id(&self) -> &str {
        &self.inner.node_id
    }

    pub fn npub(&self) -> String {
        self.inner.identity.npub()
    }

    pub fn identity(&self) -> &Identity {
        &self.inner.identity
    }

    pub fn budget(&self) -> &BudgetPolicy {
        &self.inner.budget
    }

    pub fn db(&self) -> &Db {
        &self.inner.db
    }

    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    pub fn state(&self) -> NodeState {
        self.inner.state.borrow().clone()
    }

    /// The running node, or why there is none.
    fn node(&self) -> Result<&Arc<Node>, WalletError> {
        match self.inner.node.get() {
            Some(node) if matches!(*self.inner.state.borrow(), NodeState::Running { .. }) => {
                Ok(node)
            }
            _ => Err(WalletError::NotReady {
                reason: self.inner.state.borrow().describe(),
            }),
        }
    }

    /// Waits until the node runs (and, with an LSP configured, is connected to it), at most `timeout`.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<(), WalletError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut rx = self.inner.state.subscribe();
        loop {
            let state = rx.borrow_and_update().clone();
            match &state {
                NodeState::Running { .. } => {
                    if self.lsp_connected() && self.channels_reestablished() {
                        return Ok(());
                    }
                }
                NodeState::Failed { .. } | NodeState::Stopped => {
                    return Err(WalletError::NotReady {
                        reason: state.describe(),
                    })
                }
                NodeState::Starting { .. } => {}
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                let reason = match state {
                    NodeState::Running { .. } if !self.lsp_connected() => {
                        "running, but not connected to the LSP yet".to_string()
                    }
                    NodeState::Running { .. } => {
                        "running, but its channels are still being re-established with their peers"
                            .to_string()
                    }
                    other => other.describe(),
                };
                return Err(WalletError::NotReady { reason });
            }
            // The LSP connection has no event of its own: poll it while running.
            let pause = (deadline - now).min(Duration::from_millis(200));
            let _ = tokio::time::timeout(pause, rx.changed()).await;
        }
    }

    /// False while a ready channel is not yet usable: after a (re)start its peer is still reconnecting, and
    /// until then the balance reads as zero and payments would fail for no real reason.
    fn channels_reestablished(&self) -> bool {
        let Some(node) = self.inner.node.get() else {
            return false;
        };
        let connected: Vec<_> = node
            .list_peers()
            .into_iter()
            .filter(|p| p.is_connected)
            .map(|p| p.node_id)
            .collect();
        // A channel holding our money (outbound capacity) counts once it is usable: after a restart, and right
        // after a JIT open, it may not even report `is_channel_ready` until the peer has re-established it.
        node.list_channels().iter().all(|c| {
            c.is_usable
                || !connected.contains(&c.counterparty_node_id)
                || (!c.is_channel_ready && c.outbound_capacity_msat == 0)
        })
    }

    /// True when no LSP is configured, or the node is connected to it.
    fn lsp_connected(&self) -> bool {
        let Ok(settings) = &self.inner.settings else {
            return false;
        };
        let Some(lsp) = &settings.lsp else {
            return true;
        };
        self.inner.node.get().is_some_and(|node| {
            node.list_peers()
                .iter()
                .any(|p| p.node_id == lsp.node_id && p.is_connected)
        })
    }

    /// Starts the node in the background and keeps it running until `cancel`; then stops it cleanly. The
    /// returned task ends once the node is stopped.
    pub fn spawn(&self, cancel: CancellationToken) -> tokio::task::JoinHandle<()> {
        let wallet = self.clone();
        tokio::spawn(async move { wallet.lifecycle(cancel).await })
    }

    async fn lifecycle(self, cancel: CancellationToken) {
        let settings = match &self.inner.settings {
            Ok(settings) => settings.clone(),
            Err(error) => {
                tracing::error!(%error, "the Lightning node cannot start");
                self.set_state(NodeState::Failed {
                    error: error.clone(),
                });
                return;
            }
        };
        let Some(node) = self.build_and_start(&settings, &cancel).await else {
            self.set_state(NodeState::Stopped);
            return;
        };
        let _ = self.inner.node.set(Arc::clone(&node));
        self.set_state(NodeState::Running {
            since: crate::state::now_rfc3339(),
        });
        tracing::info!(
            node_id = %self.inner.node_id,
            network = %settings.network,
            esplora = %settings.esplora_url,
            "Lightning node running"
        );

        // Payments a crash left in flight are settled or released before anything new is paid.
        if let Err(error) = self.reconcile().await {
            tracing::error!(%error, "could not reconcile payments left by the last run");
        }
        let pump = tokio::spawn(events::pump(self.clone(), cancel.clone()));
        let upkeep = tokio::spawn(self.clone().upkeep(settings.clone(), cancel.clone()));

        cancel.cancelled().await;
        let _ = pump.await;
        let _ = upkeep.await;
        let stopping = Arc::clone(&node);
        match tokio::task::spawn_blocking(move || stopping.stop()).await {
            Ok(Ok(())) | Ok(Err(ldk_node::NodeError::NotRunning)) => {
                tracing::info!("Lightning node stopped")
            }
            Ok(Err(error)) => tracing::warn!(%error, "stopping the Lightning node failed"),
            Err(error) => tracing::warn!(%error, "stopping the Lightning node panicked"),
        }
        self.set_state(NodeState::Stopped);
    }

    /// Builds the node and starts it, retrying with backoff while the chain source is unreachable. `None` when
    /// cancelled first or when the node cannot be built at all.
    async fn build_and_start(
        &self,
        settings: &node::NodeSettings,
        cancel: &CancellationToken,
    ) -> Option<Arc<Node>> {
        let (home, s, identity) = (
            self.inner.home.clone(),
            settings.clone(),
            self.inner.identity.clone(),
        );
        let built = tokio::task::spawn_blocking(move || node::build(&home, &s, &identity)).await;
        let node = match built {
            Ok(Ok(node)) => node,
            Ok(Err(error)) => {
                tracing::error!(%error, "the Lightning node cannot be built");
                self.set_state(NodeState::Failed {
                    error: error.to_string(),
                });
                cancel.cancelled().await;
                return None;
            }
            Err(error) => {
                self.set_state(NodeState::Failed {
                    error: format!("building the node panicked: {error}"),
                });
                cancel.cancelled().await;
                return None;
            }
        };
        let mut attempts = 0u32;
        let mut backoff = Duration::from_secs(1);
        loop {
            if cancel.is_cancelled() {
                return None;
            }
            attempts += 1;
            let starting = Arc::clone(&node);
            // `start` blocks on a fee-rate fetch from the chain source (≤ 10 s); the agent never waits for it.
            let result = tokio::task::spawn_blocking(move || starting.start()).await;
            let error = match result {
                Ok(Ok(())) => return Some(node),
                Ok(Err(ldk_node::NodeError::AlreadyRunning)) => return Some(node),
                Ok(Err(e)) => e.to_string(),
                Err(e) => format!("start panicked: {e}"),
            };
            tracing::warn!(
                attempt = attempts,
                %error,
                esplora = %settings.esplora_url,
                retry_in_secs = backoff.as_secs(),
                "the Lightning node could not start (is the chain source reachable?); the agent goes on without it"
            );
            self.set_state(NodeState::Starting {
                attempts,
                last_error: Some(error),
            });
            // Without a chain the balance is unknown, which counts as `normal`: the agent thinks on.
            if let Err(error) = self.update_tier().await {
                tracing::warn!(%error, "could not update the survival tier");
            }
            tokio::select! {
                _ = cancel.cancelled() => return None,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(MAX_START_BACKOFF);
        }
    }

    /// While running: keeps the LSP connected and the survival tier current.
    async fn upkeep(self, settings: node::NodeSettings, cancel: CancellationToken) {
        let mut interval = tokio::time::interval(Duration::from_secs(30));
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = interval.tick() => {}
            }
            if let Some(lsp) = &settings.lsp {
                if !self.lsp_connected() {
                    self.connect_lsp(lsp).await;
                }
            }
            if let Err(error) = self.update_tier().await {
                tracing::warn!(%error, "could not update the survival tier");
            }
        }
    }

    /// Connects to the LSP and remembers it (`persist`), so ldk-node reconnects on its own after a restart.
    async fn connect_lsp(&self, lsp: &node::Lsp) {
        let Ok(node) = self.node() else { return };
        let (node, id, address) = (Arc::clone(node), lsp.node_id, lsp.address.clone());
        let shown = address.to_string();
        match tokio::task::spawn_blocking(move || node.connect(id, address, true)).await {
            Ok(Ok(())) => tracing::info!(lsp = %id, address = %shown, "connected to the LSP"),
            Ok(Err(error)) => {
                tracing::warn!(lsp = %id, address = %shown, %error, "cannot connect to the LSP; retrying")
            }
            Err(error) => tracing::warn!(%error, "connecting to the LSP panicked"),
        }
    }

    fn set_state(&self, state: NodeState) {
        self.inner.state.send_replace(state);
    }

    /// Runs a node call off the async executor and hands back ldk-node's own error (for callers that branch on it).
    async fn call_raw<T, F>(
        &self,
        op: &'static str,
        f: F,
    ) -> Result<Result<T, ldk_node::NodeError>, WalletError>
    where
        T: Send + 'static,
        F: FnOnce(&Node) -> Result<T, ldk_node::NodeError> + Send + 'static,
    {
        let node = Arc::clone(self.node()?);
        let result = tokio::task::spawn_blocking(move || f(&node))
            .await
            .map_err(|e| WalletError::Node {
                op,
                reason: format!("panicked: {e}"),
            })?;
        if let Err(e) = &result {
            tracing::warn!(op, error = %e, "node call failed");
        }
        Ok(result)
    }

    /// Runs a (possibly blocking) node call off the async executor, mapping ldk-node's context-free error.
    async fn call<T, F>(&self, op: &'static str, f: F) -> Result<T, WalletError>
    where
        T: Send + 'static,
        F: FnOnce(&Node) -> Result<T, ldk_node::NodeError> + Send + 'static,
    {
        let node = Arc::clone(self.node()?);
        tokio::task::spawn_blocking(move || f(&node))
            .await
            .map_err(|e| WalletError::Node {
                op,
                reason: format!("panicked: {e}"),
            })?
            .map_err(|e| {
                tracing::warn!(op, error = %e, "node call failed");
                WalletError::Node {
                    op,
                    reason: e.to_string(),
                }
            })
    }
}

/// The identity facts `status` shows without a running node, written at setup (and refreshed by `run`).
pub fn record_identity(
    db: &Db,
    node_id: &str,
    npub: &str,
    network: &str,
) -> Result<(), StateError> {
    let (node_id, npub, network) = (node_id.to_string(), npub.to_string(), network.to_string());
    db.call_blocking(move |c| {
        let now = crate::state::now_rfc3339();
        for (key, value) in [(NODE_ID_KEY, &node_id), (NPUB_KEY, &npub), (NETWORK_KEY, &network)] {
            c.execute(
                "INSERT INTO kv (key, value, updated_at) VALUES (?1, ?2, ?3) \
                 ON CONFLICT(key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
                rusqlite::params![key, value, now],
            )?;
        }
        Ok(())
    })
}
