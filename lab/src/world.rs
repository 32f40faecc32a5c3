//! The whole lab world: chain + peers (+ the scripted model) + control server, brought to "ready" (initial chain
//! mined, peers funded, channels usable), `lab.json`, `automaton-lab up`, and the shared test harness.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use bitcoin::Address;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::chain::Chain;
use crate::conway::Conway;
use crate::lnvps::{Lnvps, LnvpsSettings};
use crate::peers::{self, LabNode, LspInfo, Peers, PeersConfig};
use crate::relay::Relay;

/// Height the initial chain is mined to: coinbase maturity (100) plus enough mature coinbases for the faucet.
pub const INITIAL_HEIGHT: u32 = 110;
/// Confirmations mined after the lab's channels are opened (LDK's default minimum depth is 6).
pub const CHANNEL_CONFIRMATIONS: u32 = 6;
/// The hub's coins: this many UTXOs of `HUB_UTXO_SATS` each, so concurrent JIT opens have coins to pick from.
pub const HUB_UTXOS: usize = 25;
pub const HUB_UTXO_SATS: u64 = 20_000_000;
/// The creator's channel to the hub.
pub const CREATOR_CHANNEL_SATS: u64 = 10_000_000;
/// The hub's channel to the merchant (the merchant's inbound capacity).
pub const MERCHANT_CHANNEL_SATS: u64 = 10_000_000;
/// On-chain coins of the creator (the channel comes out of them) and of the merchant.
pub const CREATOR_UTXOS_SATS: [u64; 2] = [12_000_000, 8_000_000];
pub const MERCHANT_UTXOS_SATS: [u64; 1] = [2_000_000];
/// How long the world may take to become ready before `start` gives up.
const READY_TIMEOUT: Duration = Duration::from_secs(180);

/// `DIR/lab.json`: how everything else finds the lab. Keys of later issues land in `extra` and are kept.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LabJson {
    pub network: String,
    pub esplora_url: String,
    pub control_url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_url: Option<String>,
    /// The lab's Nostr relay, `ws://127.0.0.1:PORT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay_url: Option<String>,
    /// The LNVPS double's API base URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lnvps_url: Option<String>,
    /// The Conway double's API base URL and the API key it accepts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conway_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conway_api_key: Option<String>,
    pub lsp: LspInfo,
    pub nodes: BTreeMap<String, NodeInfo>,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// A lab peer as clients reach it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeInfo {
    pub node_id: String,
    pub address: String,
}

impl LabJson {
    /// Reads a `lab.json`.
    pub fn read(path: &Path) -> anyhow::Result<LabJson> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))
    }

    /// Writes `lab.json` atomically (temporary file, fsync, rename), so readers never see half a file.
    pub fn write_atomic(&self, path: &Path) -> anyhow::Result<()> {
        let tmp = path.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(self)?;
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)
                .with_context(|| format!("creating {}", tmp.display()))?;
            f.write_all(&bytes)?;
            f.write_all(b"\n")?;
            f.sync_all()?;
        }
        set_private(&tmp)?;
        std::fs::rename(&tmp, path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
        Ok(())
    }
}

/// What the lab remembers across `up`s besides the chain and node storage: its ports (so a resumed lab keeps its
/// URLs when they are free) and the LSP token.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct WorldState {
    #[serde(default)]
    ports: BTreeMap<String, u16>,
    #[serde(default)]
    lsp_token: String,
}

impl WorldState {
    fn path(dir: &Path) -> PathBuf {
        dir.join("world.json")
    }

    fn load(dir: &Path) -> WorldState {
        std::fs::read(Self::path(dir))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn save(&self, dir: &Path) -> anyhow::Result<()> {
        let path = Self::path(dir);
        let tmp = dir.join("world.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        set_private(&tmp)?;
        std::fs::rename(&tmp, &path)?;
        Ok(())
    }
}

/// A running lab: chain, peers, control server (and model server when present).
pub struct World {
    dir: PathBuf,
    chain: Chain,
    peers: Arc<Peers>,
    relay: Relay,
    lnvps: Lnvps,
    conway: Conway,
    lab_json: LabJson,
    servers: CancellationToken,
    /// The control server, model server and tip follower; awaited on shutdown so nothing holds the chain after.
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    stopped: AtomicBool,
    /// Set for `start_temp`: the directory is removed when the world is dropped.
    temp: Mutex<Option<tempfile::TempDir>>,
}

impl World {
    /// Starts (or resumes) the world in `dir` and returns once it is ready and `dir/lab.json` is written.
    pub async fn start(dir: &Path) -> anyhow::Result<World> {
        Self::start_with_progress(dir, &|_| {}).await
    }

    /// Like [`World::start`], reporting each stage to `progress`.
    pub async fn start_with_progress(
        dir: &Path,
        progress: &(dyn Fn(&str) + Sync),
    ) -> anyhow::Result<World> {
        match tokio::time::timeout(READY_TIMEOUT, Self::start_inner(dir, progress)).await {
            Ok(world) => world,
            Err(_) => anyhow::bail!("the lab was not ready within {} s", READY_TIMEOUT.as_secs()),
        }
    }

    /// A fresh world in a temporary directory on random ports; the directory goes away with the world.
    pub async fn start_temp() -> anyhow::Result<World> {
        let temp = tempfile::Builder::new()
            .prefix("automaton-lab-")
            .tempdir()?;
        let world = Self::start(temp.path()).await?;
        if let Ok(mut slot) = world.temp.lock() {
            *slot = Some(temp);
        }
        Ok(world)
    }

    async fn start_inner(dir: &Path, progress: &(dyn Fn(&str) + Sync)) -> anyhow::Result<World> {
        let started = Instant::now();
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let dir = dir.canonicalize()?;
        let lab_json_path = dir.join("lab.json");
        // Whoever waits for lab.json must not pick up the previous run's URLs.
        match std::fs::remove_file(&lab_json_path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("removing stale {}", lab_json_path.display()))
            }
        }

        let mut state = WorldState::load(&dir);
        if state.lsp_token.is_empty() {
            state.lsp_token = random_token();
        }
        let esplora_listener = bind_tcp(&mut state, "esplora").await?;
        let control_listener = bind_tcp(&mut state, "control").await?;
        let model_listener = bind_tcp(&mut state, "model").await?;
        let relay_listener = bind_tcp(&mut state, "relay").await?;
        let l402_api_listener = bind_tcp(&mut state, "l402_api").await?;
        let l402_model_listener = bind_tcp(&mut state, "l402_model").await?;
        let lnvps_listener = bind_tcp(&mut state, "lnvps").await?;
        let conway_listener = bind_tcp(&mut state, "conway").await?;
        let hub_port = free_port(&mut state, "hub")?;
        let creator_port = free_port(&mut state, "creator")?;
        let merchant_port = free_port(&mut state, "merchant")?;
        state.save(&dir)?;

        progress("starting the chain");
        let chain = start_chain(&dir.join("chain"), esplora_listener).await?;
        let esplora_url = chain.esplora_url();
        let tip = chain.tip_height();
        if tip < INITIAL_HEIGHT {
            progress("mining the initial chain");
            chain.mine(INITIAL_HEIGHT - tip, None).await?;
        }

        progress("starting the Nostr relay");
        let relay = Relay::start(&dir.join("relay"), relay_listener).await?;

        progress("starting the Lightning peers");
        let peers = Peers::start(PeersConfig {
            dir: dir.clone(),
            esplora_url: esplora_url.clone(),
            hub_port,
            creator_port,
            merchant_port,
            lsp_token: state.lsp_token.clone(),
        })
        .await?;
        let peers = Arc::new(peers);

        progress("starting the LNVPS double");
        let lnvps = Lnvps::start(
            &dir.join("lnvps"),
            lnvps_listener,
            Arc::clone(&peers),
            LnvpsSettings::from_env(),
        )
        .await?;
        progress("starting the Conway double");
        let conway = Conway::start(&dir.join("conway"), conway_listener).await?;

        let servers = CancellationToken::new();
        let control_url = format!("http://{}", control_listener.local_addr()?);
        let height_chain = chain.clone();
        let control = chain
            .control_router()
            .merge(peers::router(peers::ControlState {
                peers: Arc::clone(&peers),
                chain_height: Arc::new(move || height_chain.tip_height()),
            }))
            .merge(relay.control_router())
            .merge(lnvps.control_router())
            .merge(conway.control_router());
        let mut tasks = vec![
            serve(control_listener, control, servers.clone(), "control"),
            follow_tip(chain.clone(), Arc::clone(&peers), servers.clone()),
        ];
        let model_url = Some(format!("http://{}/v1", model_listener.local_addr()?));
        let relay_url = Some(relay.url());
        let lnvps_url = Some(lnvps.url());
        let conway_url = Some(conway.url());
        let conway_api_key = Some(conway.api_key());
        tasks.push(serve(
            model_listener,
            crate::model::router(),
            servers.clone(),
            "model",
        ));
        // The L402 sellers (paid to the merchant): listed in lab.json as l402_api_url / l402_model_url.
        let (l402_api_url, l402_model_url, l402_tasks) = crate::l402::serve(
            Arc::clone(&peers),
            l402_api_listener,
            l402_model_listener,
            servers.clone(),
        )?;
        tasks.extend(l402_tasks);
        let mut lab_extra = serde_json::Map::new();
        lab_extra.insert("l402_api_url".into(), l402_api_url.into());
        lab_extra.insert("l402_model_url".into(), l402_model_url.into());

        // From here on a failure still stops what was started (World's drop).
        let mut world = World {
            dir: dir.clone(),
            chain,
            peers,
            relay,
            lnvps,
            conway,
            lab_json: LabJson {
                network: "regtest".into(),
                esplora_url,
                control_url,
                model_url,
                relay_url,
                lnvps_url,
                conway_url,
                conway_api_key,
                lsp: LspInfo {
                    node_id: String::new(),
                    address: String::new(),
                    token: String::new(),
                },
                nodes: BTreeMap::new(),
                extra: lab_extra,
            },
            servers,
            tasks: Mutex::new(tasks),
            stopped: AtomicBool::new(false),
            temp: Mutex::new(None),
        };
        world.bring_up(progress).await?;
        world.lab_json.lsp = world.peers.lsp();
        world.lab_json.nodes = world
            .peers
            .all()
            .iter()
            .map(|n| {
                (
                    n.role().name().to_string(),
                    NodeInfo {
                        node_id: n.node_id().to_string(),
                        address: n.address().into(),
                    },
                )
            })
            .collect();
        world.lab_json.write_atomic(&lab_json_path)?;
        tracing::info!(dir = %dir.display(), secs = started.elapsed().as_secs_f32(), "lab ready");
        Ok(world)
    }

    /// Funds the peers and opens the lab's channels unless a previous run already did, then waits until every
    /// channel is usable.
    async fn bring_up(&self, progress: &(dyn Fn(&str) + Sync)) -> anyhow::Result<()> {
        let peers = &self.peers;
        progress("syncing the peers");
        peers.sync_all().await?;

        let mut outputs: Vec<(Address, u64)> = Vec::new();
        let plan: [(&LabNode, Vec<u64>); 3] = [
            (&peers.hub, vec![HUB_UTXO_SATS; HUB_UTXOS]),
            (&peers.creator, CREATOR_UTXOS_SATS.to_vec()),
            (&peers.merchant, MERCHANT_UTXOS_SATS.to_vec()),
        ];
        for (node, amounts) in &plan {
            if never_funded(node) {
                for sats in amounts {
                    let address = node.node().onchain_payment().new_address()?;
                    outputs.push((address, *sats));
                }
            }
        }
        if !outputs.is_empty() {
            progress("funding the peers");
            // One transaction, one block: the hub gets its 20+ UTXOs without a block per output.
            self.chain.faucet_many(&outputs, true).await?;
            peers.sync_all().await?;
        }

        progress("opening channels");
        // Peers reconnect by themselves on resume, but the hub may have moved port if its old one was taken.
        reconnect(&peers.creator, &peers.hub).await;
        reconnect(&peers.merchant, &peers.hub).await;
        let (a, b) = tokio::join!(
            peers::ensure_channel(&peers.creator, &peers.hub, CREATOR_CHANNEL_SATS),
            peers::ensure_channel(&peers.hub, &peers.merchant, MERCHANT_CHANNEL_SATS)
        );
        let opened = a? | b?;
        let lab_channels = [(&peers.creator, &peers.hub), (&peers.hub, &peers.merchant)];
        let unconfirmed = lab_channels.iter().any(|(from, to)| {
            from.node().list_channels().iter().any(|c| {
                c.counterparty_node_id == to.node_id()
                    && c.confirmations.unwrap_or(0) < CHANNEL_CONFIRMATIONS
            })
        });
        if opened || unconfirmed {
            for (from, to) in lab_channels {
                for txid in funding_txids(from, to) {
                    wait_for_tx(&self.lab_json.esplora_url, &txid).await?;
                }
            }
            progress("confirming channels");
            self.chain.mine(CHANNEL_CONFIRMATIONS, None).await?;
        }

        progress("waiting for channels to be usable");
        let started = Instant::now();
        let mut last_sync = None::<Instant>;
        let mut delay = Duration::from_millis(50);
        loop {
            let ready = lab_channels.iter().all(|(from, to)| {
                peers::has_usable_channel(from, &to.node_id())
                    && peers::has_usable_channel(to, &from.node_id())
            });
            if ready {
                return Ok(());
            }
            if started.elapsed() > Duration::from_secs(90) {
                anyhow::bail!("the lab's channels did not become usable within 90 s");
            }
            if last_sync.is_none_or(|t| t.elapsed() > Duration::from_secs(2)) {
                peers.sync_all().await?;
                last_sync = Some(Instant::now());
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(500));
        }
    }

    /// The lab directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn chain(&self) -> &Chain {
        &self.chain
    }

    pub fn peers(&self) -> &Arc<Peers> {
        &self.peers
    }

    /// What was written to `lab.json`.
    pub fn lab_json(&self) -> &LabJson {
        &self.lab_json
    }

    pub fn lab_json_path(&self) -> PathBuf {
        self.dir.join("lab.json")
    }

    pub fn esplora_url(&self) -> &str {
        &self.lab_json.esplora_url
    }

    pub fn control_url(&self) -> &str {
        &self.lab_json.control_url
    }

    /// The lab's Nostr relay (its URL, stop/start for "relay down" tests).
    pub fn relay(&self) -> &Relay {
        &self.relay
    }

    /// The LNVPS double (its URL, settings).
    pub fn lnvps(&self) -> &Lnvps {
        &self.lnvps
    }

    /// The Conway double (its URL, API key, sandbox directories).
    pub fn conway(&self) -> &Conway {
        &self.conway
    }

    /// The hub as an LSPS2 client configures it.
    pub fn lsp(&self) -> LspInfo {
        self.peers.lsp()
    }

    /// Stops the servers, the peers and the chain. Idempotent.
    pub async fn shutdown(&self) {
        if self.stopped.swap(true, Ordering::SeqCst) {
            return;
        }
        self.servers.cancel();
        let tasks = self
            .tasks
            .lock()
            .map(|mut t| std::mem::take(&mut *t))
            .unwrap_or_default();
        for task in tasks {
            // A request in flight (a payment waits up to 45 s) must not hold the shutdown up.
            let abort = task.abort_handle();
            if tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
        self.lnvps.shutdown().await;
        self.conway.shutdown().await;
        self.relay.shutdown().await;
        self.peers.stop().await;
        self.chain.shutdown().await;
    }

    /// A short human summary of the running world.
    pub fn summary(&self, ready_in: Option<Duration>) -> String {
        let j = &self.lab_json;
        let mut out = String::new();
        match ready_in {
            Some(d) => out.push_str(&format!(
                "lab ready in {:.1} s  ({})\n",
                d.as_secs_f32(),
                self.dir.display()
            )),
            None => out.push_str(&format!("lab ready  ({})\n", self.dir.display())),
        }
        out.push_str(&format!(
            "  chain     regtest, height {}\n",
            self.chain.tip_height()
        ));
        out.push_str(&format!("  esplora   {}\n", j.esplora_url));
        out.push_str(&format!("  control   {}\n", j.control_url));
        if let Some(model) = &j.model_url {
            out.push_str(&format!("  model     {model}\n"));
        }
        if let Some(relay) = &j.relay_url {
            out.push_str(&format!("  relay     {relay}\n"));
        }
        if let Some(conway) = &j.conway_url {
            out.push_str(&format!("  conway    {conway}  (API key in lab.json)\n"));
        }
        if let Some(lnvps) = &j.lnvps_url {
            out.push_str(&format!(
                "  lnvps     {lnvps}  (a month = {} s)\n",
                self.lnvps.settings().month_secs
            ));
        }
        out.push_str(&format!(
            "  lsp       {}@{} (token in lab.json)\n",
            j.lsp.node_id, j.lsp.address
        ));
        for status in self.peers.status() {
            let channels: u64 = status.channels.iter().map(|c| c.capacity_sats).sum();
            out.push_str(&format!(
                "  {:<9} {}  on-chain {} sats, {} channel(s) {} sats\n",
                status.name,
                status.address,
                status.onchain_sats,
                status.channels.len(),
                channels
            ));
        }
        out.push_str(&format!("  lab.json  {}\n", self.lab_json_path().display()));
        out
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.servers.cancel();
        if let Ok(mut tasks) = self.tasks.lock() {
            for task in tasks.drain(..) {
                task.abort();
            }
        }
        if !self.stopped.swap(true, Ordering::SeqCst) {
            self.lnvps.halt();
            self.conway.halt();
            self.relay.halt();
            // The control server's router holds the peers too, so stop them here rather than wait for the last
            // reference to go.
            for node in self.peers.all() {
                node.halt();
            }
            let chain = self.chain.clone();
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn(async move { chain.shutdown().await });
            }
        }
    }
}

/// The world shared by all tests of one test binary: started once on its own runtime (so it outlives each
/// `#[tokio::test]`'s runtime), in a temporary directory removed when the process exits.
pub fn shared() -> &'static World {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let start = || {
            let runtime = RUNTIME.get_or_init(|| {
                tokio::runtime::Builder::new_multi_thread()
                    .enable_all()
                    .thread_name("lab-world")
                    .build()
                    .expect("a tokio runtime for the shared lab world")
            });
            let world = runtime
                .block_on(World::start_temp())
                .expect("the shared lab world failed to start");
            if let Ok(mut slot) = world.temp.lock() {
                // AUTOMATON_LAB_KEEP=1 keeps the directory (logs, node storage) for a post-mortem.
                if std::env::var_os("AUTOMATON_LAB_KEEP").is_some() {
                    if let Some(temp) = slot.take() {
                        eprintln!("lab world kept in {}", temp.keep().display());
                    }
                } else if let Some(temp) = slot.as_ref() {
                    remove_at_exit(temp.path());
                }
            }
            world
        };
        // A test calls this from inside its own runtime, where `block_on` is forbidden: start on a plain thread.
        let on_thread =
            || std::thread::scope(|s| s.spawn(start).join()).expect("the lab world start panicked");
        match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(on_thread)
            }
            _ => on_thread(),
        }
    })
}

/// `automaton-lab up --dir DIR`: starts the world with a spinner on stderr, prints the summary, and runs until
/// Ctrl-C or SIGTERM, then stops everything cleanly.
pub async fn run_up(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    init_file_logging(dir);
    let spinner = indicatif::ProgressBar::new_spinner();
    spinner.set_draw_target(indicatif::ProgressDrawTarget::stderr());
    spinner.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );
    spinner.enable_steady_tick(Duration::from_millis(100));
    let started = Instant::now();
    let set_message = |msg: &str| spinner.set_message(msg.to_string());
    let world = tokio::select! {
        world = World::start_with_progress(dir, &set_message) => world,
        _ = stop_signal() => {
            spinner.finish_and_clear();
            anyhow::bail!("interrupted while starting");
        }
    };
    let world = match world {
        Ok(world) => world,
        Err(e) => {
            spinner.finish_and_clear();
            return Err(e.context(format!("starting the lab in {}", dir.display())));
        }
    };
    spinner.finish_and_clear();
    print!("{}", world.summary(Some(started.elapsed())));
    eprintln!("Ctrl-C to stop.");
    stop_signal().await;
    eprintln!("stopping the lab…");
    world.shutdown().await;
    eprintln!("stopped.");
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM.
async fn stop_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// Sends the lab's own tracing to `DIR/logs/lab.log` (stderr belongs to the spinner and the summary). Does
/// nothing if the binary already installed a subscriber.
fn init_file_logging(dir: &Path) {
    let logs = dir.join("logs");
    if std::fs::create_dir_all(&logs).is_err() {
        return;
    }
    let Ok(file) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(logs.join("lab.log"))
    else {
        return;
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("AUTOMATON_LAB_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(Mutex::new(file))
        .try_init();
}

fn serve(
    listener: TcpListener,
    app: axum::Router,
    cancel: CancellationToken,
    name: &'static str,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(cancel.cancelled_owned())
            .await;
        if let Err(e) = served {
            tracing::error!(server = name, error = %e, "server stopped");
        }
    })
}

/// Opens the chain. A world of this process that is still shutting down may hold the kernel's chainstate for a
/// moment (its Esplora server drains connections), so opening is retried briefly.
async fn start_chain(dir: &Path, listener: TcpListener) -> anyhow::Result<Chain> {
    let std_listener = listener.into_std()?;
    let started = Instant::now();
    loop {
        let listener = TcpListener::from_std(std_listener.try_clone()?)?;
        match Chain::start(dir, listener).await {
            Ok(chain) => return Ok(chain),
            Err(e) if started.elapsed() < Duration::from_secs(5) => {
                tracing::debug!(error = %e, "chain not ready to open yet; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Re-syncs the peers whenever the chain tip moves. Background sync runs only every 10 s; a peer that lags after
/// a burst of mined blocks would put stale CLTV expiries on its HTLCs, and the hub force-closes a channel whose
/// HTLC it sees expire.
fn follow_tip(
    chain: Chain,
    peers: Arc<Peers>,
    cancel: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut seen = chain.tip_height();
        let mut interval = tokio::time::interval(Duration::from_millis(200));
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = interval.tick() => {}
            }
            let tip = chain.tip_height();
            if tip == seen {
                continue;
            }
            seen = tip;
            let started = Instant::now();
            match peers.sync_all().await {
                Ok(()) => tracing::debug!(
                    tip,
                    ms = started.elapsed().as_millis() as u64,
                    "peers synced"
                ),
                Err(e) => {
                    tracing::warn!(tip, error = %e, "syncing the peers to the new tip failed")
                }
            }
        }
    })
}

/// Binds a loopback listener on the port this lab used before, or a random one.
async fn bind_tcp(state: &mut WorldState, name: &str) -> anyhow::Result<TcpListener> {
    if let Some(port) = state.ports.get(name).copied() {
        if let Ok(listener) = TcpListener::bind(("127.0.0.1", port)).await {
            return Ok(listener);
        }
    }
    let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
    state
        .ports
        .insert(name.to_string(), listener.local_addr()?.port());
    Ok(listener)
}

/// A port for an ldk-node listener (ldk-node binds it itself): the previous one if still free, else a random one.
fn free_port(state: &mut WorldState, name: &str) -> anyhow::Result<u16> {
    if let Some(port) = state.ports.get(name).copied() {
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    let port = std::net::TcpListener::bind(("127.0.0.1", 0))?
        .local_addr()?
        .port();
    state.ports.insert(name.to_string(), port);
    Ok(port)
}

/// A node that has never held coins (fresh storage): no balance of any kind and no channels.
fn never_funded(node: &LabNode) -> bool {
    let b = node.node().list_balances();
    b.total_onchain_balance_sats == 0
        && b.total_lightning_balance_sats == 0
        && node.node().list_channels().is_empty()
}

async fn reconnect(from: &LabNode, to: &LabNode) {
    let peer = to.node_id();
    if from
        .node()
        .list_peers()
        .iter()
        .any(|p| p.node_id == peer && p.is_connected)
    {
        return;
    }
    let address = to.socket_address();
    if let Err(e) = from
        .call("connect", move |n| n.connect(peer, address, true))
        .await
    {
        tracing::warn!(error = %e, "reconnecting lab peers failed");
    }
}

fn funding_txids(from: &LabNode, to: &LabNode) -> Vec<String> {
    from.node()
        .list_channels()
        .iter()
        .filter(|c| c.counterparty_node_id == to.node_id())
        .filter_map(|c| c.funding_txo.map(|o| o.txid.to_string()))
        .collect()
}

/// Waits until the chain knows a transaction (mempool or block), so mining includes it.
async fn wait_for_tx(esplora_url: &str, txid: &str) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let url = format!("{esplora_url}/tx/{txid}/status");
    let started = Instant::now();
    let mut delay = Duration::from_millis(20);
    loop {
        if let Ok(resp) = client.get(&url).send().await {
            if resp.status().is_success() {
                return Ok(());
            }
        }
        if started.elapsed() > Duration::from_secs(20) {
            anyhow::bail!("funding transaction {txid} never reached the chain");
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(500));
    }
}

fn random_token() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

fn set_private(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// Removes the shared world's temporary directory when the test process exits (statics are never dropped).
fn remove_at_exit(path: &Path) {
    static PATHS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
    static REGISTERED: OnceLock<()> = OnceLock::new();
    if let Ok(mut paths) = PATHS.lock() {
        paths.push(path.to_path_buf());
    }
    extern "C" fn cleanup() {
        if let Ok(paths) = PATHS.lock() {
            for p in paths.iter() {
                let _ = std::fs::remove_dir_all(p);
            }
        }
    }
    REGISTERED.get_or_init(|| {
        // SAFETY: `cleanup` is a plain `extern "C" fn` with no arguments, as `atexit` requires.
        unsafe {
            libc::atexit(cleanup);
        }
    });
}
