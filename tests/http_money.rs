//! Money over HTTP as a user meets it, against the lab (one world per test binary): the creator funds the agent
//! through its Lightning address, the agent logs in with LNURL-auth, buys L402 calls from the lab's paid API (and
//! refuses what it should refuse), and thinks on the lab's L402-paid model, paying per call.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use automaton_lab::world::{self, World};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// An agent home in a temp dir.
struct Agent {
    dir: tempfile::TempDir,
}

impl Agent {
    fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }

    /// `automaton --home HOME …` with no inherited overrides or log filter.
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

    /// Runs a command that must succeed and print JSON.
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

    /// Starts `automaton run` (with extra args) in its own process group; it dies with the test.
    fn start_with(&self, extra: &[&str]) -> RunningAgent {
        let log = std::fs::File::create(self.dir.path().join(format!(
            "run-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        )))
        .expect("run log");
        let mut cmd = self.command();
        cmd.args(extra)
            .arg("run")
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .process_group(0);
        RunningAgent(Some(cmd.spawn().expect("spawn automaton run")))
    }

    fn start(&self) -> RunningAgent {
        self.start_with(&[])
    }

    /// Waits until the running agent's node runs and reaches its LSP (the control socket waits up to 60 s).
    fn wait_ready(&self) {
        let out = self.run(&["wallet", "balance", "--json"]);
        assert!(
            out.status.success(),
            "the agent's node never became ready:\n{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
    }

    /// The captured output of every run (for failure messages).
    fn logs(&self) -> String {
        let mut text = String::new();
        for entry in std::fs::read_dir(self.dir.path()).unwrap().flatten() {
            if entry.path().extension().is_some_and(|x| x == "log") {
                let body = std::fs::read_to_string(entry.path()).unwrap_or_default();
                let tail: Vec<&str> = body.lines().rev().take(40).collect();
                text.push_str(&tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
            }
        }
        text
    }

    fn receipts(&self) -> Vec<Value> {
        self.json(&["wallet", "receipts", "--json", "--limit", "1000"])
            .as_array()
            .unwrap()
            .clone()
    }

    /// The Lightning address and the base URL of the agent's HTTP face.
    fn face(&self) -> (String, String) {
        let fund = self.json(&["fund", "--json"]);
        let address = fund["lightning_address"]
            .as_str()
            .expect("a Lightning address on regtest loopback")
            .to_string();
        let host = address.split_once('@').unwrap().1.to_string();
        (address, format!("http://{host}"))
    }
}

/// A running `automaton run`: killed with its process group when dropped, pass or fail.
struct RunningAgent(Option<Child>);

impl RunningAgent {
    /// SIGTERM, then waits for a clean exit.
    fn stop(mut self) {
        let mut child = self.0.take().expect("running");
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if child.try_wait().expect("wait").is_some() {
                return;
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

/// A new agent set up against the shared lab, with extra `setup` flags.
fn lab_agent(world: &World, name: &str, extra: &[&str]) -> Agent {
    let agent = Agent {
        dir: tempfile::tempdir().expect("temp dir"),
    };
    let lab = world.lab_json_path();
    let out = agent.run(
        &[
            &[
                "setup",
                "--yes",
                "--name",
                name,
                "--lab",
                lab.to_str().unwrap(),
            ][..],
            &[
                "--genesis-prompt",
                "You are a test agent. Keep notes, spend nothing.",
            ],
            extra,
        ]
        .concat(),
    );
    assert!(
        out.status.success(),
        "setup failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    agent
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

async fn lab_post_raw(world: &World, path: &str, body: Value) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .post(format!("{}{path}", world.control_url()))
        .json(&body)
        .timeout(Duration::from_secs(90))
        .send()
        .await
        .expect("lab control API");
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("lab JSON"))
}

async fn lab_post(world: &World, path: &str, body: Value) -> Value {
    let (status, value) = lab_post_raw(world, path, body.clone()).await;
    assert!(
        (200..300).contains(&status),
        "POST {path} {body}: {status} {value}"
    );
    value
}

async fn get_json(url: &str) -> Value {
    reqwest::Client::new()
        .get(url)
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
        .json()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: not JSON: {e}"))
}

/// Polls with backoff until `check` holds or `limit` passes.
fn eventually(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    let mut wait = Duration::from_millis(20);
    loop {
        if check() {
            return true;
        }
        if start.elapsed() > limit {
            return false;
        }
        std::thread::sleep(wait);
        wait = (wait * 2).min(Duration::from_millis(500));
    }
}

/// Pays the agent's Lightning address from the lab's creator and waits for the receipt; returns the creator's
/// answer and the receipt.
async fn fund_via_address(
    world: &World,
    agent: &Agent,
    target: &str,
    sats: u64,
    comment: &str,
) -> (Value, Value) {
    let paid = lab_post(
        world,
        "/lab/creator/pay-lnurl",
        json!({"target": target, "sats": sats, "comment": comment}),
    )
    .await;
    let hash = paid["payment_hash"].as_str().unwrap().to_string();
    let mut found = Value::Null;
    assert!(
        eventually(Duration::from_secs(60), || {
            found = agent
                .receipts()
                .into_iter()
                .find(|r| {
                    r["payment_hash"] == hash.as_str()
                        && r["direction"] == "in"
                        && r["status"] == "succeeded"
                })
                .unwrap_or(Value::Null);
            !found.is_null()
        }),
        "the Lightning-address payment never became a receipt:\n{}",
        agent.logs()
    );
    (paid, found)
}

fn l402_api_url(world: &World) -> Option<String> {
    world
        .lab_json()
        .extra
        .get("l402_api_url")
        .and_then(Value::as_str)
        .map(str::to_string)
}

fn l402_model_url(world: &World) -> Option<String> {
    world
        .lab_json()
        .extra
        .get("l402_model_url")
        .and_then(Value::as_str)
        .map(str::to_string)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_creator_funds_the_agent_through_its_lightning_address() {
    let world = world::shared();
    let agent = lab_agent(world, "Fund Me", &[]);
    let running = agent.start();
    agent.wait_ready();

    // `fund` prints the address, the LNURL and a QR code; --png writes the code as an image.
    let png = agent.dir.path().join("fund.png");
    let out = agent.run(&["fund", "--json", "--png", png.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let fund: Value = serde_json::from_slice(&out.stdout).expect("fund --json");
    let address = fund["lightning_address"].as_str().unwrap().to_string();
    assert!(address.starts_with("fund-me@127.0.0.1:"), "{address}");
    let lnurl = fund["lnurl"].as_str().unwrap().to_string();
    assert!(lnurl.starts_with("LNURL1"), "{lnurl}");
    assert!(fund.get("bolt11").is_none(), "no invoice without --sats");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains('█'),
        "the QR code goes to stderr with --json"
    );
    let image = std::fs::read(&png).expect("the PNG was written");
    assert_eq!(&image[..8], b"\x89PNG\r\n\x1a\n");
    let (_, base) = agent.face();

    // The pay request: LUD-06 with LUD-16 identifier and LUD-12 comments.
    let pay_request = get_json(&format!("{base}/.well-known/lnurlp/fund-me")).await;
    assert_eq!(pay_request["tag"], "payRequest");
    assert_eq!(pay_request["commentAllowed"], 140);
    let metadata: Value =
        serde_json::from_str(pay_request["metadata"].as_str().unwrap()).expect("metadata JSON");
    assert!(metadata
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e[0] == "text/identifier" && e[1] == address.as_str()));
    // Bad requests get LUD-01 errors, never an invoice.
    let callback = pay_request["callback"].as_str().unwrap();
    for query in ["amount=0", "amount=abc", "", "amount=1000000000000"] {
        let answer = get_json(&format!("{callback}?{query}")).await;
        assert_eq!(answer["status"], "ERROR", "{query}: {answer}");
    }
    let long = "x".repeat(141);
    let answer = get_json(&format!("{callback}?amount=10000000&comment={long}")).await;
    assert_eq!(answer["status"], "ERROR", "a too-long comment is refused");
    let unknown = get_json(&format!("{base}/.well-known/lnurlp/nobody")).await;
    assert_eq!(unknown["status"], "ERROR");

    // The creator pays the address; its side checks the description hash and amount before paying.
    let (paid, receipt) =
        fund_via_address(world, &agent, &address, 60_000, "for your first VPS").await;
    assert!(
        paid.get("warnings")
            .is_none_or(|w| w.as_array().is_some_and(|a| a.is_empty())),
        "the creator's wallet found nothing odd: {paid}"
    );
    let hash = paid["payment_hash"].as_str().unwrap();
    assert_eq!(
        sha256_hex(&hex::decode(paid["preimage"].as_str().unwrap()).unwrap()),
        hash
    );
    assert_eq!(receipt["comment"], "for your first VPS");
    assert_eq!(receipt["purpose"], "lnurl-pay");
    assert_eq!(receipt["preimage_sha256"], hash);
    assert!(
        receipt["signature"].is_string(),
        "incoming receipts are signed"
    );

    // LUD-21: the verify URL says settled, with a preimage that hashes to the payment hash.
    let verify = get_json(&format!("{base}/lnurlp/verify/{hash}")).await;
    assert_eq!(verify["status"], "OK");
    assert_eq!(verify["settled"], true);
    assert_eq!(
        sha256_hex(&hex::decode(verify["preimage"].as_str().unwrap()).unwrap()),
        hash
    );
    assert!(verify["pr"].as_str().unwrap().starts_with("lnbcrt"));
    let missing = get_json(&format!("{base}/lnurlp/verify/{}", "0".repeat(64))).await;
    assert_eq!(missing["status"], "ERROR");

    // The bech32 LNURL pays the same service (now over the channel the first payment opened).
    let (_, second) = fund_via_address(world, &agent, &lnurl, 5_000, "").await;
    assert_eq!(second["amount_msat"], 5_000_000);
    assert!(second["comment"].is_null());

    // automaton.json describes the funded agent.
    let card = get_json(&format!("{base}/.well-known/automaton.json")).await;
    let info = agent.json(&["wallet", "info", "--json"]);
    assert_eq!(card["name"], "Fund Me");
    assert_eq!(card["node_id"], info["node_id"]);
    assert_eq!(card["npub"], info["npub"]);
    assert_eq!(card["lightning_address"], address.as_str());
    assert!(card["services"].is_array());
    assert!(
        ["alive", "low", "critical", "dead"].contains(&card["status"].as_str().unwrap()),
        "{card}"
    );
    assert!(card["tier"].is_string());

    // `fund --sats N` asks the running node for an invoice.
    let invoice = agent.json(&["fund", "--sats", "1234", "--json"]);
    assert!(invoice["bolt11"]
        .as_str()
        .unwrap()
        .starts_with("lnbcrt12340n"));
    assert_eq!(invoice["lightning_address"], address.as_str());
    running.stop();
}

/// A LUD-04 service: issues k1 challenges and accepts each once, with a valid signature by the key given.
#[derive(Clone, Default)]
struct AuthService {
    issued: Arc<Mutex<Vec<String>>>,
    logins: Arc<Mutex<Vec<String>>>,
}

async fn auth_route(
    axum::extract::State(service): axum::extract::State<AuthService>,
    axum::extract::Query(q): axum::extract::Query<std::collections::HashMap<String, String>>,
) -> axum::Json<Value> {
    use bitcoin::secp256k1::{ecdsa::Signature, Message, PublicKey, Secp256k1};
    let error = |reason: &str| axum::Json(json!({"status": "ERROR", "reason": reason}));
    let (Some(k1), Some(sig), Some(key)) = (q.get("k1"), q.get("sig"), q.get("key")) else {
        return error("missing k1, sig or key");
    };
    let mut issued = service.issued.lock().unwrap();
    let Some(at) = issued.iter().position(|k| k == k1) else {
        return error("unknown or used k1");
    };
    let verified = (|| {
        let digest: [u8; 32] = hex::decode(k1).ok()?.try_into().ok()?;
        let sig = Signature::from_der(&hex::decode(sig).ok()?).ok()?;
        let key: PublicKey = key.parse().ok()?;
        Secp256k1::verification_only()
            .verify_ecdsa(&Message::from_digest(digest), &sig, &key)
            .ok()
    })();
    if verified.is_none() {
        return error("bad signature");
    }
    issued.remove(at);
    service.logins.lock().unwrap().push(key.clone());
    axum::Json(json!({"status": "OK"}))
}

#[tokio::test(flavor = "multi_thread")]
async fn lnurl_auth_logs_in_with_a_stable_per_domain_key() {
    let world = world::shared();
    let agent = lab_agent(world, "auth-agent", &[]);
    let service = AuthService::default();
    let app = axum::Router::new()
        .route("/auth", axum::routing::get(auth_route))
        .with_state(service.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let login = |host: &str| {
        let k1 = hex::encode(rand::random::<[u8; 32]>());
        service.issued.lock().unwrap().push(k1.clone());
        let url = format!("http://{host}:{port}/auth?tag=login&k1={k1}&action=login");
        let lnurl = automaton::lnurl::encode(&url);
        let agent = &agent;
        tokio::task::block_in_place(move || agent.run(&["lnurl-auth", &lnurl, "--json"]))
    };
    let first = login("127.0.0.1");
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let first: Value = serde_json::from_slice(&first.stdout).unwrap();
    assert_eq!(first["domain"], "127.0.0.1");
    assert_eq!(first["response"]["status"], "OK");
    let second: Value = serde_json::from_slice(&login("127.0.0.1").stdout).unwrap();
    assert_eq!(
        second["linking_key"], first["linking_key"],
        "the same key for the same domain"
    );
    let other: Value = serde_json::from_slice(&login("localhost").stdout).unwrap();
    assert_ne!(
        other["linking_key"], first["linking_key"],
        "another domain, another key"
    );
    assert_eq!(service.logins.lock().unwrap().len(), 3);

    // A used or unknown k1 is the service's error, reported as one.
    let replay = format!(
        "http://127.0.0.1:{port}/auth?tag=login&k1={}",
        hex::encode([7u8; 32])
    );
    let out = agent.run(&["lnurl-auth", &replay]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown or used k1"));
    // Plain http to a non-loopback host is refused before anything is signed or sent.
    let out = agent.run(&["lnurl-auth", "http://example.com/auth?tag=login&k1=00"]);
    assert!(!out.status.success());
    server.abort();
}

/// What the test seller does on its routes.
#[derive(Clone)]
struct Seller {
    control_url: String,
    /// Root keys by root-key id (an honest seller's store).
    root_keys: Arc<Mutex<std::collections::HashMap<[u8; 32], [u8; 32]>>>,
    /// The one challenge the scammer serves, minted on first use.
    scam: Arc<tokio::sync::Mutex<Option<(String, String)>>>,
    /// How many requests reached the paid content.
    served: Arc<Mutex<u32>>,
    /// Seconds an honest credential stays valid.
    validity_secs: u64,
}

impl Seller {
    /// A real invoice from the lab's merchant and a macaroon committing to its payment hash.
    async fn challenge(&self, sats: u64, service: &str) -> (String, String) {
        let invoice: Value = reqwest::Client::new()
            .post(format!("{}/lab/merchant/invoice", self.control_url))
            .json(&json!({"msat": sats * 1000, "memo": format!("test seller: {service}")}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let hash: [u8; 32] = hex::decode(invoice["payment_hash"].as_str().unwrap())
            .unwrap()
            .try_into()
            .unwrap();
        let services = [automaton_l402::Service::new(service, 0)];
        let valid_until = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + self.validity_secs;
        let minted = automaton_l402::mint(&automaton_l402::MintRequest {
            payment_hash: hash,
            services: &services,
            capabilities: &[],
            valid_until: Some(valid_until),
        });
        self.root_keys
            .lock()
            .unwrap()
            .insert(minted.root_key_id, minted.root_key);
        (
            minted.macaroon.to_base64(),
            invoice["bolt11"].as_str().unwrap().to_string(),
        )
    }
}

fn payment_required(headers: Vec<String>) -> axum::response::Response {
    use axum::response::IntoResponse;
    let mut response =
        (axum::http::StatusCode::PAYMENT_REQUIRED, "payment required").into_response();
    for value in headers {
        response.headers_mut().append(
            axum::http::header::WWW_AUTHENTICATE,
            axum::http::HeaderValue::from_str(&value).unwrap(),
        );
    }
    response
}

async fn seller_route(
    axum::extract::State(seller): axum::extract::State<Seller>,
    axum::extract::Path(kind): axum::extract::Path<String>,
    headers: axum::http::HeaderMap,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let kind = kind.split('/').next().unwrap_or_default().to_string();
    match kind.as_str() {
        "none" => payment_required(vec![]),
        "garbage" => payment_required(vec![
            "L402 macaroon=\"!!not base64!!\", invoice=\"lnbcrt1garbage\"".into(),
            "Basic realm=\"x\"".into(),
        ]),
        "mismatch" => {
            // A macaroon for one payment hash and an invoice for another.
            let (token, _) = seller.challenge(10, "mismatch").await;
            let (_, invoice) = seller.challenge(10, "mismatch").await;
            payment_required(vec![format!(
                "L402 macaroon=\"{token}\", invoice=\"{invoice}\""
            )])
        }
        "pricey" => {
            let (token, invoice) = seller.challenge(5_000, "pricey").await;
            payment_required(automaton_l402::challenge_headers(&token, &invoice).to_vec())
        }
        "scam" => {
            // Always the same challenge, whatever credential comes: it takes the money and never serves.
            let mut scam = seller.scam.lock().await;
            if scam.is_none() {
                *scam = Some(seller.challenge(21, "scam").await);
            }
            let (token, invoice) = scam.clone().unwrap();
            payment_required(vec![automaton_l402::format_challenge_v0(&token, &invoice)])
        }
        "honest" => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs();
            let credential = headers
                .get(axum::http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| automaton_l402::parse_authorization(v).ok());
            if let Some(credential) = credential {
                let keys = seller.root_keys.lock().unwrap().clone();
                let ctx = automaton_l402::VerifyContext {
                    service: "honest",
                    capability: None,
                    now_unix: now,
                };
                if automaton_l402::verify_credential(&credential, &ctx, |id| keys.get(id).copied())
                    .is_ok()
                {
                    *seller.served.lock().unwrap() += 1;
                    return axum::Json(json!({"paid": true, "answer": 42})).into_response();
                }
            }
            let (token, invoice) = seller.challenge(100, "honest").await;
            payment_required(automaton_l402::challenge_headers(&token, &invoice).to_vec())
        }
        _ => (axum::http::StatusCode::OK, "free content").into_response(),
    }
}

async fn start_seller(
    world: &World,
    validity_secs: u64,
) -> (String, Seller, tokio::task::JoinHandle<()>) {
    let seller = Seller {
        control_url: world.control_url().to_string(),
        root_keys: Default::default(),
        scam: Default::default(),
        served: Default::default(),
        validity_secs,
    };
    let app = axum::Router::new()
        .route("/{*kind}", axum::routing::any(seller_route))
        .with_state(seller.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (base, seller, task)
}

fn out_receipts(agent: &Agent) -> Vec<Value> {
    agent
        .receipts()
        .into_iter()
        .filter(|r| r["direction"] == "out")
        .collect()
}

/// `automaton l402 fetch … --json` off the async executor.
fn fetch(agent: &Agent, args: &[&str]) -> Output {
    tokio::task::block_in_place(|| agent.run(&[&["l402", "fetch"][..], args, &["--json"]].concat()))
}

fn fetch_json(agent: &Agent, args: &[&str]) -> Value {
    let out = fetch(agent, args);
    assert!(
        out.status.success(),
        "l402 fetch {args:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("l402 fetch --json")
}

#[tokio::test(flavor = "multi_thread")]
async fn the_l402_buyer_pays_once_caches_and_refuses_what_it_should() {
    let world = world::shared();
    let agent = lab_agent(world, "buyer", &[]);
    let _running = agent.start();
    agent.wait_ready();
    let (address, _) = agent.face();
    fund_via_address(world, &agent, &address, 60_000, "spending money").await;
    // Credentials live 12 s: long enough to pay and reuse one on a busy machine, short enough to see one expire.
    const VALIDITY_SECS: u64 = 12;
    let (base, seller, server) = start_seller(world, VALIDITY_SECS).await;

    // Hostile or malformed 402s never pay: exit 2, no payment receipt.
    for path in ["none", "garbage", "mismatch"] {
        let out = fetch(&agent, &[&format!("{base}/{path}")]);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{path}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stderr).contains("refused to pay"));
    }
    assert!(out_receipts(&agent).is_empty(), "nothing was paid");

    // A price above --max-sats is refused before paying.
    let out = fetch(&agent, &[&format!("{base}/pricey"), "--max-sats", "4999"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out_receipts(&agent).is_empty(), "nothing was paid");

    // An honest seller: paid once, then the cached credential serves the same path and below.
    let url = format!("{base}/honest/data");
    let bought_from = std::time::Instant::now();
    let first = fetch_json(&agent, &[&url]);
    assert_eq!(first["status"], 200);
    assert_eq!(first["paid_msat"], 100_000);
    assert_eq!(first["from_cache"], false);
    assert_eq!(first["body"]["answer"], 42, "JSON bodies are parsed");
    let hash = first["payment_hash"].as_str().unwrap().to_string();
    let again = fetch_json(&agent, &[&format!("{url}/deeper?x=1")]);
    assert_eq!(again["from_cache"], true);
    assert_eq!(again["paid_msat"], 0);
    assert!(again["payment_hash"].is_null());
    let paid: Vec<Value> = out_receipts(&agent);
    assert_eq!(paid.len(), 1, "one purchase, one receipt: {paid:?}");
    let receipt = &paid[0];
    assert_eq!(receipt["rail"], "l402");
    assert_eq!(receipt["status"], "succeeded");
    assert_eq!(receipt["payment_hash"], hash.as_str());
    assert_eq!(receipt["preimage_sha256"], hash.as_str());
    assert_eq!(receipt["meta"]["url"], url.as_str());
    assert_eq!(receipt["meta"]["http_status"], 200);
    assert_eq!(
        receipt["request_hash"],
        automaton::l402::client::request_hash("GET", &url, b"").as_str()
    );
    assert!(receipt["response_hash"].is_string());
    assert!(
        receipt["signature"].is_string(),
        "signed again after linking"
    );
    assert_eq!(*seller.served.lock().unwrap(), 2);
    let tokens = agent.json(&["l402", "tokens", "--json"]);
    assert_eq!(tokens.as_array().unwrap().len(), 1);
    assert!(!tokens.to_string().contains(&seller_secret_marker()));

    // After its valid_until the credential is not sent again: a new one is bought.
    let expired_at = bought_from + Duration::from_secs(VALIDITY_SECS + 1);
    std::thread::sleep(expired_at.saturating_duration_since(std::time::Instant::now()));
    let renewed = fetch_json(&agent, &[&url]);
    assert_eq!(renewed["from_cache"], false);
    assert_eq!(renewed["paid_msat"], 100_000);
    assert_eq!(out_receipts(&agent).len(), 2);

    // A scammer that never honours the credential: paid exactly once, however often it is asked.
    let scam = format!("{base}/scam");
    for _ in 0..2 {
        let out = fetch(&agent, &[&scam]);
        assert_eq!(
            out.status.code(),
            Some(3),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let scams: Vec<Value> = out_receipts(&agent)
        .into_iter()
        .filter(|r| r["amount_msat"] == 21_000)
        .collect();
    assert_eq!(scams.len(), 1, "the same invoice is never paid twice");
    server.abort();
}

/// Nothing secret shows in `l402 tokens`: a marker that never appears in the listing's field names.
fn seller_secret_marker() -> String {
    "preimage".to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_thinks_on_the_l402_paid_model_paying_per_call() {
    let world = world::shared();
    let model_url = l402_model_url(world).expect("lab.json lists l402_model_url");
    let agent = lab_agent(world, "thinker", &[]);
    {
        let running = agent.start();
        agent.wait_ready();
        let (address, _) = agent.face();
        fund_via_address(world, &agent, &address, 60_000, "for thinking").await;
        running.stop();
    }
    let count_calls = || -> (i64, i64) {
        agent
            .db()
            .call_blocking(|c| {
                c.query_row(
                    "SELECT COUNT(*), COUNT(error) FROM inference_calls",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
            })
            .unwrap()
    };
    // The funding run thought on the free model; only the calls after it are paid.
    let (free_calls, free_failed) = count_calls();
    let base_url = format!("inference.base_url={model_url}");
    let out = tokio::task::block_in_place(|| {
        agent.run(&[
            "-c",
            &base_url,
            "-c",
            "inference.auth=l402",
            "run",
            "--turns",
            "2",
        ])
    });
    assert!(
        out.status.success(),
        "run on the paid model failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (all_calls, all_failed) = count_calls();
    let (calls, failed) = (all_calls - free_calls, all_failed - free_failed);
    assert!(calls >= 2, "two turns think at least twice ({calls} calls)");
    assert_eq!(failed, 0, "every call was paid and answered");
    let paid: Vec<Value> = out_receipts(&agent)
        .into_iter()
        .filter(|r| r["rail"] == "l402" && r["status"] == "succeeded")
        .collect();
    assert_eq!(
        paid.len() as i64,
        calls,
        "one payment per model call: {paid:#?}"
    );
    for receipt in &paid {
        assert!(
            receipt["purpose"]
                .as_str()
                .unwrap()
                .starts_with("inference"),
            "counted as inference spend: {receipt}"
        );
        assert!(receipt["meta"]["url"]
            .as_str()
            .unwrap()
            .ends_with("/chat/completions"));
        assert!(receipt["request_hash"].is_string() && receipt["response_hash"].is_string());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_buys_from_the_lab_l402_api() {
    let world = world::shared();
    let api = l402_api_url(world).expect("lab.json lists l402_api_url");
    let base = api.trim_end_matches("/api").to_string();
    let agent = lab_agent(world, "api-buyer", &[]);
    let _running = agent.start();
    agent.wait_ready();
    let (address, _) = agent.face();
    fund_via_address(world, &agent, &address, 30_000, "api money").await;

    // Refused before paying: above the default cap, a challenge without an invoice, a macaroon for another hash.
    for (path, code) in [
        ("/test/expensive", 2),
        ("/test/malformed", 2),
        ("/test/mismatch", 2),
    ] {
        let out = fetch(&agent, &[&format!("{base}{path}")]);
        assert_eq!(
            out.status.code(),
            Some(code),
            "{path}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(out_receipts(&agent).is_empty(), "nothing was paid");

    // The round trip: paid once, then the credential serves the same service below the path it was bought for.
    let first = fetch_json(&agent, &[&api]);
    assert_eq!(first["status"], 200, "{first}");
    assert_eq!(first["paid_msat"], 10_000);
    assert!(
        first["body"].is_object(),
        "JSON answers are parsed: {first}"
    );
    for url in [api.clone(), format!("{api}/quote")] {
        let cached = fetch_json(&agent, &[&url]);
        assert_eq!(cached["from_cache"], true, "{url}: {cached}");
        assert_eq!(cached["paid_msat"], 0);
    }
    let echo = fetch_json(&agent, &[&format!("{api}/echo"), "-d", "hello lab"]);
    assert_eq!(echo["status"], 200, "{echo}");
    assert_eq!(echo["from_cache"], true);
    assert!(echo["body"].to_string().contains("hello lab"), "{echo}");
    let receipts: Vec<Value> = out_receipts(&agent);
    assert_eq!(receipts.len(), 1, "{receipts:#?}");
    assert_eq!(receipts[0]["rail"], "l402");
    assert_eq!(receipts[0]["meta"]["url"], api.as_str());
    assert_eq!(receipts[0]["counterparty"], "127.0.0.1");

    // The other challenge forms pay as well.
    for path in ["/test/token-form", "/test/lsat-only"] {
        let bought = fetch_json(&agent, &[&format!("{base}{path}")]);
        assert_eq!(bought["status"], 200, "{path}: {bought}");
        assert_eq!(bought["paid_msat"], 10_000, "{path}");
    }
    // A server that never accepts its own credential: exit 3, paid once.
    let out = fetch(&agent, &[&format!("{base}/test/always-402")]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out_receipts(&agent).len(), 4);
}

/// One GET to the agent's face, with an optional `Authorization` header: (status, WWW-Authenticate values, body).
async fn face_get(url: &str, authorization: Option<&str>) -> (u16, Vec<String>, Vec<u8>) {
    let mut request = reqwest::Client::new()
        .get(url)
        .timeout(Duration::from_secs(60));
    if let Some(value) = authorization {
        request = request.header("Authorization", value);
    }
    let resp = request
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = resp.status().as_u16();
    let challenges = resp
        .headers()
        .get_all("www-authenticate")
        .iter()
        .map(|v| v.to_str().unwrap_or_default().to_string())
        .collect();
    (status, challenges, resp.bytes().await.unwrap().to_vec())
}

/// A 402's L402 challenge: (macaroon base64, bolt11). Both the `LSAT` and the `L402` forms must be there.
fn l402_challenge(status: u16, headers: &[String]) -> (String, String) {
    assert_eq!(status, 402, "{headers:?}");
    assert!(
        headers.iter().any(|h| h.starts_with("LSAT ")),
        "{headers:?}"
    );
    assert!(
        headers.iter().any(|h| h.starts_with("L402 ")),
        "{headers:?}"
    );
    let challenges =
        automaton_l402::challenge::parse_challenges(headers.iter().map(String::as_str))
            .expect("a parseable challenge");
    let chosen = automaton_l402::challenge::preferred(&challenges).expect("an L402 challenge");
    let hash = chosen.payment_hash().expect("identifier");
    let invoice: lightning_invoice::Bolt11Invoice = chosen.invoice.parse().expect("bolt11");
    assert_eq!(
        hex::encode(hash),
        invoice.payment_hash().to_string(),
        "the macaroon commits to its invoice"
    );
    (chosen.token.clone(), chosen.invoice.clone())
}

/// The lab creator pays `bolt11`; the preimage it got back.
async fn creator_pays(world: &World, bolt11: &str) -> [u8; 32] {
    let paid = lab_post(world, "/lab/creator/pay", json!({ "bolt11": bolt11 })).await;
    hex::decode(paid["preimage"].as_str().expect("preimage"))
        .unwrap()
        .try_into()
        .unwrap()
}

/// Buys one token for `url`: the 402, the creator's payment, and the credential header that now passes.
async fn buy(world: &World, url: &str) -> (String, String, [u8; 32]) {
    let (status, headers, _) = face_get(url, None).await;
    let (macaroon, invoice) = l402_challenge(status, &headers);
    let preimage = creator_pays(world, &invoice).await;
    let authorization = automaton_l402::credential::format_authorization(&macaroon, &preimage);
    (authorization, macaroon, preimage)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_creator_buys_the_agents_paid_services_and_bad_credentials_get_a_fresh_402() {
    let world = world::shared();
    let services = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        services.path(),
        "http:\n  services:\n    - name: status-attestation\n      path: /l402/status\n      price_sats: 21\n      \
         kind: attestation\n      description: signed status\n    - name: fortune\n      path: /l402/fortune\n      \
         price_sats: 30\n      validity_secs: 15\n      kind: static\n      response: '{\"fortune\": \"sats flow to \
         the useful\"}'\n",
    )
    .unwrap();
    let agent = lab_agent(
        world,
        "vendor",
        &["--config-from", services.path().to_str().unwrap()],
    );
    let running = agent.start();
    agent.wait_ready();
    // Inbound capacity first: a fresh agent's first payment opens its JIT channel, which small sales cannot pay for.
    let (address, base) = agent.face();
    fund_via_address(world, &agent, &address, 50_000, "float").await;

    // automaton.json and the agent's node id, to check the attestation against.
    let card = get_json(&format!("{base}/.well-known/automaton.json")).await;
    let names: Vec<&str> = card["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["status-attestation", "fortune"], "{card}");
    assert_eq!(card["services"][0]["price_sats"], 21);
    let node_id = card["node_id"].as_str().unwrap().to_string();

    // A plain request pays, retries with the credential, and gets a node-signed attestation.
    let status_url = format!("{base}/l402/status?nonce=n-123");
    let (status_auth, status_macaroon, status_preimage) = buy(world, &status_url).await;
    let (code, _, body) = face_get(&status_url, Some(&status_auth)).await;
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    let document: Value = serde_json::from_slice(&body).unwrap();
    assert!(automaton::l402::server::verify_attestation(
        &document,
        Some(&node_id)
    ));
    assert_eq!(document["attestation"]["nonce"], "n-123");
    assert_eq!(document["attestation"]["name"], "vendor");
    let mut forged = document.clone();
    forged["attestation"]["tier"] = json!("high");
    assert!(!automaton::l402::server::verify_attestation(
        &forged,
        Some(&node_id)
    ));
    // The same token is good again (until its expiry) without paying twice.
    assert_eq!(face_get(&status_url, Some(&status_auth)).await.0, 200);
    // The sale arrives as a receipt in.
    let hash = sha256_hex(&status_preimage);
    assert!(
        eventually(Duration::from_secs(30), || agent.receipts().iter().any(
            |r| r["payment_hash"] == hash.as_str() && r["direction"] == "in"
        )),
        "no receipt for the sale:\n{}",
        agent.logs()
    );

    // Each bad credential gets a fresh 402 (a new invoice), never the service.
    let mut tampered =
        base64::Engine::decode(&base64::engine::general_purpose::STANDARD, &status_macaroon)
            .unwrap();
    let last = tampered.len() - 1;
    tampered[last] ^= 0x01;
    let tampered = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &tampered);
    let wrong_preimage = [7u8; 32];
    let bad = [
        automaton_l402::credential::format_authorization(&tampered, &status_preimage),
        automaton_l402::credential::format_authorization(&status_macaroon, &wrong_preimage),
        "L402 not-a-macaroon:00".to_string(),
    ];
    for authorization in &bad {
        let (code, headers, _) = face_get(&status_url, Some(authorization)).await;
        let (_, invoice) = l402_challenge(code, &headers);
        assert_ne!(invoice, "", "a fresh invoice for {authorization:.20}");
    }
    // A token bought for one service is refused by another.
    let fortune_url = format!("{base}/l402/fortune");
    let (code, headers, _) = face_get(&fortune_url, Some(&status_auth)).await;
    l402_challenge(code, &headers);

    // The short-lived service: good at once, refused with a fresh 402 once its validity passed.
    let (fortune_auth, _, _) = buy(world, &fortune_url).await;
    let (code, _, body) = face_get(&fortune_url, Some(&fortune_auth)).await;
    assert_eq!(code, 200);
    assert_eq!(
        serde_json::from_slice::<Value>(&body).unwrap()["fortune"],
        "sats flow to the useful"
    );
    let start = Instant::now();
    let mut expired = false;
    while start.elapsed() < Duration::from_secs(60) && !expired {
        expired = face_get(&fortune_url, Some(&fortune_auth)).await.0 == 402;
        if !expired {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    assert!(expired, "the fortune token never expired");

    // Tokens survive a restart: root keys live in the state DB.
    running.stop();
    let running = agent.start();
    agent.wait_ready();
    assert_eq!(face_get(&status_url, Some(&status_auth)).await.0, 200);

    // The seller's books, and revocation.
    let sold = agent.json(&["l402", "sold", "--json"]);
    let sold = sold.as_array().unwrap();
    assert_eq!(sold.len(), 2, "{sold:?}");
    let status_token = sold
        .iter()
        .find(|t| t["service"] == "status-attestation")
        .unwrap();
    assert_eq!(status_token["paid"], true);
    assert!(
        status_token["uses"].as_u64().unwrap() >= 3,
        "{status_token}"
    );
    assert_eq!(status_token["payment_hash"], hash.as_str());
    let text = serde_json::to_string(&sold).unwrap();
    assert!(!text.contains(&status_macaroon), "sold never shows a token");
    let revoked = agent.run(&["l402", "revoke", status_token["token_id"].as_str().unwrap()]);
    assert!(
        revoked.status.success(),
        "{}",
        String::from_utf8_lossy(&revoked.stderr)
    );
    let (code, headers, _) = face_get(&status_url, Some(&status_auth)).await;
    l402_challenge(code, &headers);
    let again = agent.run(&["l402", "revoke", status_token["token_id"].as_str().unwrap()]);
    assert!(
        !again.status.success(),
        "revoking twice says nothing matched"
    );

    // No bearer secret in the agent's logs.
    let logs = agent.logs();
    assert!(!logs.contains(&status_macaroon), "a macaroon in the logs");
    assert!(
        !logs.contains(&hex::encode(status_preimage)),
        "a preimage in the logs"
    );
    running.stop();
}
