//! The agent's Nostr presence against the lab (one world per test binary, its real relay): the card read back by
//! a plain websocket client, two agents discovering each other past forged and malformed cards, one distress
//! note when an agent is drained to critical, and an agent that keeps running while the relay is down and
//! publishes once it is back.
//!
//! Tests that need the relay up hold `RELAY` for reading; the one that stops it holds it for writing.
// Each test owns its runtime and thread, so a std lock held across `.await` only parks that test's thread: it is
// the point (tests that need the relay wait while one test has it down).
#![allow(clippy::await_holding_lock)]

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::RwLock;
use std::time::{Duration, Instant};

use automaton_lab::world::{self, World};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio_tungstenite::tungstenite::Message;

static RELAY: RwLock<()> = RwLock::new(());

fn relay_up() -> std::sync::RwLockReadGuard<'static, ()> {
    RELAY.read().unwrap_or_else(|e| e.into_inner())
}

/// An agent home in a temp dir.
struct Agent {
    dir: tempfile::TempDir,
}

impl Agent {
    fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_automaton"));
        cmd.arg("--home").arg(self.home());
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("AUTOMATON") {
                cmd.env_remove(key);
            }
        }
        cmd.env_remove("RUST_LOG")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .stdin(Stdio::null());
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command().args(args).output().expect("run automaton")
    }

    fn json(&self, args: &[&str]) -> Value {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "automaton {args:?} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "automaton {args:?} printed no JSON ({e}):\n{}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    fn db(&self) -> automaton::state::Db {
        automaton::state::Db::open(&self.home().join("state.db")).expect("state db")
    }

    fn start(&self) -> RunningAgent {
        let log = std::fs::File::create(self.dir.path().join("run.log")).expect("run log");
        let mut cmd = self.command();
        cmd.arg("run")
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .process_group(0);
        RunningAgent(Some(cmd.spawn().expect("spawn automaton run")))
    }

    fn run_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("run.log")).unwrap_or_default()
    }

    fn mnemonic(&self) -> String {
        let wallet: Value = serde_json::from_str(
            &std::fs::read_to_string(self.home().join("wallet.json")).unwrap(),
        )
        .unwrap();
        wallet["mnemonic"].as_str().unwrap().to_string()
    }

    fn pubkey_hex(&self) -> String {
        use nostr::nips::nip06::FromMnemonic;
        nostr::Keys::from_mnemonic(self.mnemonic(), None)
            .unwrap()
            .public_key()
            .to_hex()
    }

    fn turns(&self) -> i64 {
        self.db()
            .call_blocking(|c| c.query_row("SELECT count(*) FROM turns", [], |r| r.get(0)))
            .unwrap_or(0)
    }
}

/// A running `automaton run`, killed with its process group when dropped.
struct RunningAgent(Option<Child>);

impl RunningAgent {
    fn alive(&mut self) -> bool {
        matches!(self.0.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    fn stop(mut self) -> std::process::ExitStatus {
        let mut child = self.0.take().expect("running");
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            if Instant::now() > deadline {
                unsafe {
                    libc::kill(-(child.id() as i32), libc::SIGKILL);
                }
                let _ = child.wait();
                panic!("automaton run did not stop within 60 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            unsafe {
                libc::kill(-(child.id() as i32), libc::SIGKILL);
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn lab_agent(world: &World, name: &str) -> Agent {
    let agent = Agent {
        dir: tempfile::tempdir().expect("temp dir"),
    };
    let lab = world.lab_json_path();
    let out = agent.run(&[
        "setup",
        "--yes",
        "--name",
        name,
        "--lab",
        lab.to_str().unwrap(),
        "--genesis-prompt",
        "You are a test agent. Keep notes, spend nothing.",
    ]);
    assert!(
        out.status.success(),
        "setup failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    agent
}

fn relay_url(world: &World) -> String {
    world
        .lab_json()
        .relay_url
        .clone()
        .expect("lab.json has relay_url")
}

async fn lab_post(world: &World, path: &str, body: Value) -> Value {
    let resp = reqwest::Client::new()
        .post(format!("{}{path}", world.control_url()))
        .json(&body)
        .timeout(Duration::from_secs(90))
        .send()
        .await
        .expect("lab control API");
    let status = resp.status();
    let value: Value = resp.json().await.expect("lab JSON");
    assert!(status.is_success(), "POST {path} {body}: {status} {value}");
    value
}

/// A plain NIP-01 client: REQ with `filter`, every EVENT until EOSE.
async fn req(url: &str, filter: Value) -> Vec<Value> {
    let (mut ws, _) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async(url),
    )
    .await
    .expect("relay connect timeout")
    .expect("relay connect");
    ws.send(Message::Text(
        json!(["REQ", "test", filter]).to_string().into(),
    ))
    .await
    .expect("send REQ");
    let mut events = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let msg = tokio::time::timeout_at(deadline, ws.next())
            .await
            .expect("no EOSE within 10 s")
            .expect("relay closed")
            .expect("websocket error");
        let Message::Text(text) = msg else { continue };
        let v: Value = serde_json::from_str(&text).expect("relay JSON");
        match v[0].as_str() {
            Some("EVENT") => events.push(v[2].clone()),
            Some("EOSE") => break,
            Some("CLOSED") | Some("NOTICE") => panic!("relay refused the REQ: {v}"),
            _ => {}
        }
    }
    let _ = ws.close(None).await;
    events
}

/// NIP-01 id and BIP-340 signature, checked from the raw JSON with sha2 and secp256k1 (not the project's code).
fn verify_raw(event: &Value) -> bool {
    let serialized = json!([
        0,
        event["pubkey"],
        event["created_at"],
        event["kind"],
        event["tags"],
        event["content"]
    ])
    .to_string();
    let id = hex_encode(&Sha256::digest(serialized.as_bytes()));
    if event["id"].as_str() != Some(id.as_str()) {
        return false;
    }
    use nostr::secp256k1::{schnorr::Signature, Message as SecpMessage, XOnlyPublicKey};
    let (Ok(sig), Ok(pk), Ok(digest)) = (
        event["sig"]
            .as_str()
            .unwrap_or_default()
            .parse::<Signature>(),
        event["pubkey"]
            .as_str()
            .unwrap_or_default()
            .parse::<XOnlyPublicKey>(),
        hex_decode(&id),
    ) else {
        return false;
    };
    let msg = SecpMessage::from_digest_slice(&digest).expect("32 bytes");
    nostr::secp256k1::Secp256k1::verification_only()
        .verify_schnorr(&sig, &msg, &pk)
        .is_ok()
}

fn hex_encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn hex_decode(s: &str) -> Result<Vec<u8>, ()> {
    if !s.len().is_multiple_of(2) {
        return Err(());
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).map_err(|_| ()))
        .collect()
}

/// A well-formed card signed by `keys`, as raw JSON.
fn mallory_card(keys: &nostr::Keys, name: &str) -> Value {
    let content = json!({"name": name, "lud16": "mallory@evil.example", "status": "alive",
                         "version": "x", "updated_at": 1});
    let event = nostr::EventBuilder::new(nostr::Kind::Custom(31990), content.to_string())
        .tags([
            nostr::Tag::identifier("automaton-ln"),
            nostr::Tag::hashtag("automaton-ln"),
        ])
        .sign_with_keys(keys)
        .unwrap();
    serde_json::from_str(&nostr::JsonUtil::as_json(&event)).unwrap()
}

fn card_filter(pubkey: &str) -> Value {
    json!({"kinds": [31990], "authors": [pubkey], "#d": ["automaton-ln"]})
}

/// Polls with backoff until `check` holds or `limit` passes.
async fn eventually<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    let mut wait = Duration::from_millis(50);
    loop {
        if check().await {
            return true;
        }
        if start.elapsed() > limit {
            return false;
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_millis(1000));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_published_card_is_read_back_by_a_plain_client_and_names_the_agents_keys() {
    let world = world::shared();
    let _relay = relay_up();
    let agent = lab_agent(world, "carda");
    let relay = relay_url(world);

    let published = agent.json(&["card", "publish", "--json"]);
    let event_id = published["event_id"].as_str().unwrap().to_string();
    assert_eq!(published["accepted"], json!([relay]), "{published}");

    let pubkey = agent.pubkey_hex();
    let events = req(&relay, card_filter(&pubkey)).await;
    assert_eq!(events.len(), 1, "{events:?}");
    let card = &events[0];
    assert_eq!(card["id"], event_id.as_str());
    assert!(verify_raw(card), "signature must verify: {card}");
    assert_eq!(
        card["pubkey"],
        pubkey.as_str(),
        "the NIP-06 key of wallet.json"
    );
    let tags = card["tags"].as_array().unwrap();
    for tag in [json!(["d", "automaton-ln"]), json!(["t", "automaton-ln"])] {
        assert!(tags.contains(&tag), "{tag} missing: {tags:?}");
    }

    let content: Value = serde_json::from_str(card["content"].as_str().unwrap()).unwrap();
    let status = agent.json(&["status", "--json"]);
    let node_id = status["node_id"]
        .as_str()
        .expect("setup records the node id");
    assert_eq!(content["ln_node_pubkey"], node_id);
    assert_eq!(content["name"], "carda");
    let config = automaton::config::Config::load(&automaton::home::Home::at(agent.home())).unwrap();
    let public = reqwest::Url::parse(config.http.public_url.as_deref().unwrap()).unwrap();
    let lud16 = format!(
        "carda@{}:{}",
        public.host_str().unwrap(),
        public.port().unwrap()
    );
    assert_eq!(content["lud16"], lud16.as_str(), "{content}");
    assert_eq!(content["status"], "alive");
    assert_eq!(status["npub"], content_npub(&pubkey));

    // The same key and node really receive money: the running agent's node is the card's, and the lab's
    // creator pays it through the Lightning address on the card.
    let mut running = agent.start();
    let info = wait_for_wallet(&agent).await;
    assert_eq!(info["node_id"], node_id, "{info}");
    let paid = reqwest::Client::new()
        .post(format!("{}/lab/creator/pay-lnurl", world.control_url()))
        .json(&json!({"target": lud16, "sats": 20_000, "comment": "from the card"}))
        .timeout(Duration::from_secs(120))
        .send()
        .await
        .expect("lab control API");
    let status_code = paid.status();
    let paid: Value = paid.json().await.unwrap();
    assert!(
        status_code.is_success(),
        "paying the card's Lightning address failed: {paid}\n{}",
        agent.run_log()
    );
    let hash = paid["payment_hash"].as_str().unwrap().to_string();
    assert!(
        eventually(Duration::from_secs(60), || {
            let receipts = agent.json(&["wallet", "receipts", "--json"]);
            let hash = hash.clone();
            async move {
                receipts
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|r| r["payment_hash"] == hash.as_str() && r["status"] == "succeeded")
            }
        })
        .await,
        "the payment to the card's address never arrived"
    );
    assert!(running.alive());
    assert!(running.stop().success());
}

fn content_npub(pubkey_hex: &str) -> String {
    use nostr::ToBech32;
    nostr::PublicKey::from_hex(pubkey_hex)
        .unwrap()
        .to_bech32()
        .unwrap()
}

/// Waits until the running agent's node runs (`wallet balance` answers), then returns `wallet info`.
async fn wait_for_wallet(agent: &Agent) -> Value {
    let mut last = String::new();
    for _ in 0..240 {
        let out = agent.run(&["wallet", "balance", "--json"]);
        if out.status.success() {
            return agent.json(&["wallet", "info", "--json"]);
        }
        last = String::from_utf8_lossy(&out.stderr).to_string();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!(
        "the agent's wallet never answered: {last}\n{}",
        agent.run_log()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn two_agents_discover_each_other_and_forged_or_malformed_cards_are_ignored() {
    let world = world::shared();
    let _relay = relay_up();
    let alice = lab_agent(world, "alice");
    let bob = lab_agent(world, "bob");
    alice.json(&["card", "publish", "--json"]);
    bob.json(&["card", "publish", "--json"]);

    // A forged card: Carol's public key on a card Mallory signed (id recomputed, so only the signature tells),
    // and a malformed one correctly signed by Mallory. The lab relay plants what a real relay would refuse.
    let mallory = nostr::Keys::generate();
    let carol = nostr::Keys::generate();
    let mut forged = mallory_card(&mallory, "carol");
    forged["pubkey"] = json!(carol.public_key().to_hex());
    let serialized = json!([
        0,
        forged["pubkey"],
        forged["created_at"],
        forged["kind"],
        forged["tags"],
        forged["content"]
    ]);
    forged["id"] = json!(hex_encode(&Sha256::digest(
        serialized.to_string().as_bytes()
    )));
    assert!(!verify_raw(&forged));
    lab_post(world, "/lab/relay/inject", json!({"event": forged})).await;
    let malformed = nostr::EventBuilder::new(nostr::Kind::Custom(31990), "{not json")
        .tags([
            nostr::Tag::identifier("automaton-ln"),
            nostr::Tag::hashtag("automaton-ln"),
        ])
        .sign_with_keys(&mallory)
        .unwrap();
    let malformed: Value = serde_json::from_str(&nostr::JsonUtil::as_json(&malformed)).unwrap();
    lab_post(world, "/lab/relay/inject", json!({"event": malformed})).await;

    let found = alice.json(&["discover", "--json"]);
    let found = found.as_array().unwrap();
    let bob_entry = found
        .iter()
        .find(|a| a["pubkey"] == bob.pubkey_hex().as_str())
        .unwrap_or_else(|| panic!("alice does not see bob: {found:?}"));
    assert_eq!(bob_entry["name"], "bob");
    assert_ne!(bob_entry["lud16"], "mallory@evil.example");
    assert!(
        !found
            .iter()
            .any(|a| a["pubkey"] == carol.public_key().to_hex().as_str()),
        "the forged card is dropped: {found:?}"
    );
    assert!(
        !found
            .iter()
            .any(|a| a["pubkey"] == alice.pubkey_hex().as_str()),
        "an agent does not discover itself"
    );
    assert!(
        !found
            .iter()
            .any(|a| a["pubkey"] == mallory.public_key().to_hex().as_str()),
        "the malformed card is dropped: {found:?}"
    );
    assert!(!found.iter().any(|a| a["lud16"] == "mallory@evil.example"));

    let found = bob.json(&["discover", "--json"]);
    assert!(
        found
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["pubkey"] == alice.pubkey_hex().as_str() && a["name"] == "alice"),
        "bob sees alice: {found}"
    );

    // Discovery caches what it saw.
    let cached: i64 = alice
        .db()
        .call_blocking(|c| c.query_row("SELECT count(*) FROM nostr_agents", [], |r| r.get(0)))
        .unwrap();
    assert!(cached >= 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn with_the_relay_down_the_agent_keeps_running_and_publishes_when_it_is_back() {
    let world = world::shared();
    let _exclusive = RELAY.write().unwrap_or_else(|e| e.into_inner());
    let agent = lab_agent(world, "patient");
    let relay = relay_url(world);
    let pubkey = agent.pubkey_hex();

    lab_post(world, "/lab/relay/stop", json!({})).await;
    let refused = agent.run(&["card", "publish"]);
    assert_eq!(refused.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("no relay accepted the event"), "{stderr}");

    let mut running = agent.start();
    // The agent thinks on while no relay answers.
    assert!(
        eventually(Duration::from_secs(120), || {
            let turns = agent.turns();
            async move { turns >= 1 }
        })
        .await,
        "the agent stopped thinking while the relay was down:\n{}",
        agent.run_log()
    );
    assert!(running.alive());

    lab_post(world, "/lab/relay/start", json!({})).await;
    let published = eventually(Duration::from_secs(60), || {
        let relay = relay.clone();
        let filter = card_filter(&pubkey);
        async move { !req(&relay, filter).await.is_empty() }
    })
    .await;
    assert!(
        published,
        "the queued card never reached the relay once it was back:\n{}",
        agent.run_log()
    );
    let card = &req(&relay, card_filter(&pubkey)).await[0];
    assert!(verify_raw(card));
    let sent: i64 = agent
        .db()
        .call_blocking(|c| {
            c.query_row(
                "SELECT count(*) FROM nostr_outbox WHERE purpose = 'card' AND sent_at IS NOT NULL",
                [],
                |r| r.get(0),
            )
        })
        .unwrap();
    assert!(sent >= 1, "the outbox records the delivery");
    assert!(running.alive());
    assert!(running.stop().success());
}

async fn fund(world: &World, agent: &Agent, sats: u64) {
    let invoice = agent.json(&[
        "wallet",
        "invoice",
        &sats.to_string(),
        "--memo",
        "funding",
        "--json",
    ]);
    lab_post(
        world,
        "/lab/creator/pay",
        json!({"bolt11": invoice["bolt11"]}),
    )
    .await;
    let hash = invoice["payment_hash"].as_str().unwrap().to_string();
    let arrived = eventually(Duration::from_secs(60), || {
        let receipts = agent.json(&["wallet", "receipts", "--json"]);
        let hash = hash.clone();
        async move {
            receipts
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["payment_hash"] == hash.as_str() && r["status"] == "succeeded")
        }
    })
    .await;
    assert!(arrived, "the funding never arrived:\n{}", agent.run_log());
}

fn tier(agent: &Agent) -> Option<String> {
    agent.json(&["status", "--json"])["tier"]
        .as_str()
        .map(str::to_string)
}

async fn distress_notes(world: &World, pubkey: &str) -> Vec<Value> {
    req(
        &relay_url(world),
        json!({"kinds": [1], "authors": [pubkey], "#t": ["distress"]}),
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn draining_an_agent_to_critical_sends_exactly_one_distress_note_with_a_payable_address() {
    let world = world::shared();
    let _relay = relay_up();
    let creator = nostr::Keys::generate();
    let agent = Agent {
        dir: tempfile::tempdir().expect("temp dir"),
    };
    let lab = world.lab_json_path();
    let creator_npub = content_npub(&creator.public_key().to_hex());
    let out = agent.run(&[
        "setup",
        "--yes",
        "--name",
        "needy",
        "--lab",
        lab.to_str().unwrap(),
        "--creator",
        &creator_npub,
        "--genesis-prompt",
        "You are a test agent. Keep notes, spend nothing.",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pubkey = agent.pubkey_hex();

    let running = agent.start();
    wait_for_wallet(&agent).await;
    // A newborn is critical by definition but has no one to alarm yet.
    fund(world, &agent, 12_000).await;
    assert!(
        eventually(Duration::from_secs(60), || {
            let t = tier(&agent);
            async move { t.as_deref() == Some("low_compute") }
        })
        .await,
        "funded with 12,000 sats the agent should be low_compute, is {:?}",
        tier(&agent)
    );
    assert!(distress_notes(world, &pubkey).await.is_empty());

    // Spending most of it drains the agent to critical.
    let invoice = lab_post(
        world,
        "/lab/merchant/invoice",
        json!({"msat": 8_000_000, "memo": "an expensive habit"}),
    )
    .await;
    let paid = agent.run(&[
        "wallet",
        "pay",
        invoice["bolt11"].as_str().unwrap(),
        "--json",
    ]);
    assert!(
        paid.status.success(),
        "{}",
        String::from_utf8_lossy(&paid.stderr)
    );
    assert!(
        eventually(Duration::from_secs(60), || {
            let t = tier(&agent);
            async move { t.as_deref() == Some("critical") }
        })
        .await,
        "tier after draining: {:?}",
        tier(&agent)
    );

    let noted = eventually(Duration::from_secs(30), || {
        let pubkey = pubkey.clone();
        async move { !distress_notes(world, &pubkey).await.is_empty() }
    })
    .await;
    assert!(noted, "no distress note on the relay:\n{}", agent.run_log());
    let notes = distress_notes(world, &pubkey).await;
    assert_eq!(notes.len(), 1, "{notes:?}");
    let note = &notes[0];
    assert!(verify_raw(note));
    let text = note["content"].as_str().unwrap().to_string();
    let card_events = req(&relay_url(world), card_filter(&pubkey)).await;
    let card: Value = serde_json::from_str(card_events[0]["content"].as_str().unwrap()).unwrap();
    let lud16 = card["lud16"].as_str().unwrap().to_string();
    assert!(
        text.contains(&lud16),
        "the note names the Lightning address: {text}"
    );
    assert!(text.contains("critical"), "{text}");
    assert!(text.contains("sats buy it a day of runway"), "{text}");
    // The card says so too.
    assert!(
        eventually(Duration::from_secs(30), || {
            let relay = relay_url(world);
            let filter = card_filter(&pubkey);
            async move {
                let events = req(&relay, filter).await;
                events.first().is_some_and(|e| {
                    serde_json::from_str::<Value>(e["content"].as_str().unwrap()).unwrap()["status"]
                        == "critical"
                })
            }
        })
        .await
    );

    // The creator got it privately too (NIP-17 gift wrap to their key; its own outbox row, maybe one flush later).
    let wrap_filter = json!({"kinds": [1059], "#p": [creator.public_key().to_hex()]});
    assert!(
        eventually(Duration::from_secs(30), || {
            let (relay, filter) = (relay_url(world), wrap_filter.clone());
            async move { !req(&relay, filter).await.is_empty() }
        })
        .await,
        "the creator's private message never reached the relay"
    );
    let wraps = req(&relay_url(world), wrap_filter.clone()).await;
    assert_eq!(wraps.len(), 1, "{wraps:?}");
    let wrap: nostr::Event = nostr::JsonUtil::from_json(wraps[0].to_string()).unwrap();
    let unwrapped = nostr::nips::nip59::UnwrappedGift::from_gift_wrap(&creator, &wrap)
        .await
        .unwrap();
    assert_eq!(unwrapped.sender.to_hex(), pubkey);
    assert_eq!(unwrapped.rumor.content, text);

    // A restart while still critical is not news: the rate limit holds.
    let status = running.stop();
    assert!(status.success());
    let running = agent.start();
    let restarted_card = eventually(Duration::from_secs(60), || {
        let relay = relay_url(world);
        let filter = card_filter(&pubkey);
        let before = card_events[0]["created_at"].as_u64().unwrap();
        async move {
            req(&relay, filter)
                .await
                .first()
                .is_some_and(|e| e["created_at"].as_u64().unwrap() > before)
        }
    })
    .await;
    assert!(
        restarted_card,
        "the restarted agent republishes its card:\n{}",
        agent.run_log()
    );
    assert_eq!(distress_notes(world, &pubkey).await.len(), 1);

    // The address in the note is payable, and paying it lifts the agent out of critical.
    let paid = reqwest::Client::new()
        .post(format!("{}/lab/creator/pay-lnurl", world.control_url()))
        .json(&json!({"target": lud16, "sats": 30_000, "comment": "hang in there"}))
        .timeout(Duration::from_secs(120))
        .send()
        .await
        .unwrap();
    let code = paid.status();
    let body: Value = paid.json().await.unwrap();
    assert!(code.is_success(), "{body}\n{}", agent.run_log());
    assert!(
        eventually(Duration::from_secs(60), || {
            let t = tier(&agent);
            async move { t.as_deref() != Some("critical") }
        })
        .await
    );
    assert!(running.stop().success());
}
