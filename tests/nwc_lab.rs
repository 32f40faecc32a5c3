//! The NIP-47 wallet service against the lab (its real relay, merchant and creator): an independent NWC client
//! (the `nwc` crate) with the URI `automaton nwc create` printed reads the balance, pays a merchant invoice
//! within the connection's budget (the payment goes through the agent's money gate and leaves a receipt), is
//! refused past that budget with QUOTA_EXCEEDED, and gets nothing paid once the connection is revoked.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use automaton_lab::world::{self, World};
use nostr::nips::nip47::{ErrorCode, NostrWalletConnectURI, PayInvoiceRequest};
use serde_json::{json, Value};

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

    fn receipts(&self) -> Vec<Value> {
        self.json(&["wallet", "receipts", "--json"])
            .as_array()
            .cloned()
            .unwrap_or_default()
    }
}

/// A running `automaton run`, killed with its process group when dropped.
struct RunningAgent(Option<Child>);

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

async fn lab_post(world: &World, path: &str, body: Value) -> Value {
    let resp = reqwest::Client::new()
        .post(format!("{}{path}", world.control_url()))
        .json(&body)
        .timeout(Duration::from_secs(120))
        .send()
        .await
        .expect("lab control API");
    let status = resp.status();
    let value: Value = resp.json().await.expect("lab JSON");
    assert!(status.is_success(), "POST {path} {body}: {status} {value}");
    value
}

async fn lab_get(world: &World, path: &str) -> Value {
    reqwest::Client::new()
        .get(format!("{}{path}", world.control_url()))
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .expect("lab control API")
        .json()
        .await
        .expect("lab JSON")
}

/// A fresh merchant invoice: (bolt11, payment hash).
async fn merchant_invoice(world: &World, sats: u64, memo: &str) -> (String, String) {
    let invoice = lab_post(
        world,
        "/lab/merchant/invoice",
        json!({"msat": sats * 1000, "memo": memo}),
    )
    .await;
    (
        invoice["bolt11"].as_str().unwrap().to_string(),
        invoice["payment_hash"].as_str().unwrap().to_string(),
    )
}

async fn merchant_paid(world: &World, hash: &str) -> bool {
    lab_get(world, &format!("/lab/merchant/invoice/{hash}")).await["paid"] == true
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

fn nip47_code(error: &nwc::Error) -> Option<ErrorCode> {
    match error {
        nwc::Error::NIP47(nostr::nips::nip47::Error::ErrorCode(e)) => Some(e.code),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_nwc_client_pays_within_the_connection_budget_and_is_refused_past_it_or_once_revoked() {
    let world = world::shared();
    let agent = Agent {
        dir: tempfile::tempdir().expect("temp dir"),
    };
    let lab = world.lab_json_path();
    let out = agent.run(&[
        "setup",
        "--yes",
        "--name",
        "nwcagent",
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

    // The connection is made while the agent is stopped: the CLI only touches the state DB.
    let created = agent.json(&[
        "nwc",
        "create",
        "--budget-sats",
        "1500",
        "--period",
        "monthly",
        "--name",
        "vps",
        "--json",
    ]);
    let uri_text = created["uri"].as_str().expect("the URI").to_string();
    assert!(uri_text.starts_with("nostr+walletconnect://"), "{uri_text}");
    let uri = NostrWalletConnectURI::parse(&uri_text).expect("a NIP-47 URI");
    let relay = world.lab_json().relay_url.clone().expect("lab relay");
    assert_eq!(
        uri.relays
            .iter()
            .map(|r| r.as_str_without_trailing_slash().to_string())
            .collect::<Vec<_>>(),
        vec![relay.trim_end_matches('/').to_string()]
    );
    let id = created["id"].as_str().unwrap().to_string();
    let listed = agent.json(&["nwc", "list", "--json"]);
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed[0]["budget_sats"], 1500);
    assert!(
        !listed.to_string().contains(&uri.secret.to_secret_hex()),
        "`nwc list` must not show the secret: {listed}"
    );

    let _running = agent.start();
    let mut ready = false;
    for _ in 0..240 {
        if agent.run(&["wallet", "balance", "--json"]).status.success() {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        ready,
        "the agent's node never started:\n{}",
        agent.run_log()
    );

    // Fund the agent through its Lightning address.
    let config = automaton::config::Config::load(&automaton::home::Home::at(agent.home())).unwrap();
    let public = reqwest::Url::parse(config.http.public_url.as_deref().unwrap()).unwrap();
    let lud16 = format!(
        "nwcagent@{}:{}",
        public.host_str().unwrap(),
        public.port().unwrap()
    );
    let paid = lab_post(
        world,
        "/lab/creator/pay-lnurl",
        json!({"target": lud16, "sats": 20_000, "comment": "nwc test"}),
    )
    .await;
    let funding_hash = paid["payment_hash"].as_str().unwrap().to_string();
    assert!(
        eventually(Duration::from_secs(60), || {
            let found = agent
                .receipts()
                .iter()
                .any(|r| r["payment_hash"] == funding_hash.as_str() && r["status"] == "succeeded");
            async move { found }
        })
        .await,
        "the funding never arrived:\n{}",
        agent.run_log()
    );

    let client = nwc::NWC::with_opts(
        uri.clone(),
        nwc::NostrWalletConnectOptions::new().timeout(Duration::from_secs(20)),
    );

    // get_balance (retried while the client and the service find the relay).
    let mut balance = None;
    let mut last = String::new();
    for _ in 0..12 {
        match client.get_balance().await {
            Ok(msat) => {
                balance = Some(msat);
                break;
            }
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let balance = balance
        .unwrap_or_else(|| panic!("get_balance never answered: {last}\n{}", agent.run_log()));
    assert!(balance >= 10_000_000, "balance {balance} msat");
    let info = client.get_info().await.expect("get_info");
    assert!(
        info.methods
            .contains(&nostr::nips::nip47::Method::PayInvoice),
        "{info:?}"
    );

    // Within the connection's budget: paid, the merchant sees it, the receipt says nwc.
    let (bolt11, hash) = merchant_invoice(world, 1000, "nwc first").await;
    let paid = client
        .pay_invoice(PayInvoiceRequest::new(bolt11))
        .await
        .unwrap_or_else(|e| panic!("pay_invoice: {e}\n{}", agent.run_log()));
    assert_eq!(paid.preimage.len(), 64, "{paid:?}");
    assert!(
        merchant_paid(world, &hash).await,
        "the merchant was not paid"
    );
    let receipt = agent
        .receipts()
        .into_iter()
        .find(|r| r["payment_hash"] == hash.as_str())
        .expect("a receipt for the NWC payment");
    assert_eq!(receipt["direction"], "out");
    assert_eq!(receipt["status"], "succeeded");
    assert_eq!(receipt["purpose"], "nwc:vps", "{receipt}");
    assert_eq!(receipt["preimage_sha256"], hash.as_str());

    // Past the connection's budget (1,000 sats spent of 1,500): refused, nothing paid.
    let (bolt11, hash) = merchant_invoice(world, 1000, "nwc over budget").await;
    let refused = client
        .pay_invoice(PayInvoiceRequest::new(bolt11))
        .await
        .expect_err("over the connection's budget");
    assert_eq!(
        nip47_code(&refused),
        Some(ErrorCode::QuotaExceeded),
        "{refused}"
    );
    assert!(!merchant_paid(world, &hash).await);
    let listed = agent.json(&["nwc", "list", "--json"]);
    let spent = listed[0]["spent_sats"].as_u64().unwrap();
    assert!((1000..1500).contains(&spent), "{listed}");

    // Revoked: refused (or unanswered), and the invoice stays unpaid.
    let revoked = agent.json(&["nwc", "revoke", &id, "--json"]);
    assert_eq!(revoked["active"], false, "{revoked}");
    let (bolt11, hash) = merchant_invoice(world, 100, "nwc revoked").await;
    match client.pay_invoice(PayInvoiceRequest::new(bolt11)).await {
        Ok(paid) => panic!("a revoked connection paid: {paid:?}"),
        Err(e) => {
            let code = nip47_code(&e);
            assert!(
                code.is_none() || code == Some(ErrorCode::Unauthorized),
                "{e}"
            );
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!merchant_paid(world, &hash).await);
    let outgoing = agent
        .receipts()
        .into_iter()
        .filter(|r| r["direction"] == "out" && r["purpose"] == "nwc:vps")
        .count();
    assert_eq!(outgoing, 1, "exactly one NWC payment left the wallet");
    client.shutdown().await;
}
