//! Shared harness for lab tests: an external ldk-node configured the way the agent configures its wallet, the
//! control API over HTTP, and waits that poll with backoff.

#![allow(dead_code)]

use std::future::Future;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use automaton_lab::world::World;
use ldk_node::bitcoin::secp256k1::PublicKey;
use ldk_node::bitcoin::Network;
use ldk_node::config::{Config, EsploraSyncConfig};
use ldk_node::lightning::ln::msgs::SocketAddress;
use ldk_node::{Builder, Event, Node};
use serde_json::Value;

/// Chain-moving tests (mining many blocks, reorgs) take this so they do not confirm or unconfirm each other's
/// transactions halfway through.
pub static CHAIN_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// An ldk-node as the agent runs it: LSPS2 client of the hub (with the token), the hub trusted for anchor
/// reserves, no listening socket, syncing only when asked.
pub struct Agent {
    pub node: Arc<Node>,
    pub dir: tempfile::TempDir,
}

impl Agent {
    pub fn start(world: &World) -> Agent {
        Self::start_with(world, true)
    }

    /// With `trust_hub == false` the node keeps its own anchor reserve (it needs on-chain coins before it can
    /// accept the JIT channel) and closes channels on its own; ldk-node leaves broadcasting a force close of a
    /// channel with a trusted peer to that peer.
    pub fn start_with(world: &World, trust_hub: bool) -> Agent {
        let dir = tempfile::tempdir().expect("agent temp dir");
        let lsp = world.lsp();
        let hub = PublicKey::from_str(&lsp.node_id).expect("hub node id");
        let mut config = Config {
            network: Network::Regtest,
            storage_dir_path: dir.path().join("ldk").to_string_lossy().into_owned(),
            ..Config::default()
        };
        if trust_hub {
            config
                .anchor_channels_config
                .as_mut()
                .expect("anchors are on by default")
                .trusted_peers_no_reserve
                .push(hub);
        }
        let mut builder = Builder::from_config(config);
        builder.set_chain_source_esplora(
            world.esplora_url().to_string(),
            Some(EsploraSyncConfig {
                background_sync_config: None,
            }),
        );
        builder.set_liquidity_source_lsps2(
            hub,
            SocketAddress::from_str(&lsp.address).expect("hub address"),
            Some(lsp.token.clone()),
        );
        builder.set_filesystem_logger(
            Some(dir.path().join("agent.log").to_string_lossy().into_owned()),
            None,
        );
        let node = builder.build().expect("agent node builds");
        node.start().expect("agent node starts");
        Agent {
            node: Arc::new(node),
            dir,
        }
    }

    pub fn sync(&self) {
        self.node.sync_wallets().expect("agent sync");
    }

    /// Waits for an event matching `pred`, acknowledging every event on the way.
    pub async fn expect_event(&self, what: &str, pred: impl Fn(&Event) -> bool) -> Event {
        let node = Arc::clone(&self.node);
        let wait = async move {
            loop {
                let event = node.next_event_async().await;
                node.event_handled().expect("event handled");
                if pred(&event) {
                    return event;
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(60), wait)
            .await
            .unwrap_or_else(|_| panic!("no {what} event within 60 s"))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.node.stop();
    }
}

/// The lab's control API.
pub struct Control {
    pub url: String,
    pub http: reqwest::Client,
}

impl Control {
    pub fn new(world: &World) -> Control {
        Control {
            url: world.control_url().to_string(),
            http: reqwest::Client::new(),
        }
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let resp = self
            .http
            .post(format!("{}{path}", self.url))
            .json(&body)
            .send()
            .await
            .expect("control POST");
        let status = resp.status().as_u16();
        (status, resp.json().await.expect("control answers JSON"))
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let resp = self
            .http
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .expect("control GET");
        let status = resp.status().as_u16();
        (status, resp.json().await.expect("control answers JSON"))
    }

    /// POST that must succeed; returns the JSON body.
    pub async fn ok(&self, path: &str, body: Value) -> Value {
        let (status, value) = self.post(path, body).await;
        assert_eq!(status, 200, "{path} failed: {value}");
        value
    }

    pub async fn mine(&self, blocks: u32) {
        self.ok("/lab/mine", serde_json::json!({ "blocks": blocks }))
            .await;
    }
}

/// Polls `check` with backoff until it returns `Some`, or panics after `limit`.
pub async fn poll<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let started = Instant::now();
    let mut delay = Duration::from_millis(20);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            started.elapsed() < limit,
            "{what}: not within {} s",
            limit.as_secs()
        );
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(500));
    }
}
