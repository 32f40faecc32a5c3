//! The wallet as a user meets it, against the lab (one world per test binary): a fresh agent funded by its
//! creator through a JIT channel, paying the merchant, the budget gate under real payments, a kill -9 in the
//! middle of a payment, and what works without a running agent.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
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

    /// Starts `automaton run` in its own process group; it dies with the test.
    fn start(&self) -> RunningAgent {
        let log = std::fs::File::create(self.dir.path().join(format!(
            "run-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        )))
        .expect("run log");
        let mut cmd = self.command();
        cmd.arg("run")
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .process_group(0);
        let running = RunningAgent(Some(cmd.spawn().expect("spawn automaton run")));
        let socket = self.home().join("control.sock");
        assert!(
            eventually(Duration::from_secs(60), || socket.exists()),
            "automaton run never opened its control socket"
        );
        running
    }

    /// Every log the run wrote: the agent's JSON log, the node's log, and the captured stdout/stderr.
    fn all_logs(&self) -> String {
        let mut text = String::new();
        let mut files: Vec<PathBuf> = std::fs::read_dir(self.home().join("logs"))
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
            .unwrap_or_default();
        files.extend(
            std::fs::read_dir(self.dir.path())
                .unwrap()
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "log")),
        );
        for f in files {
            text.push_str(&std::fs::read_to_string(&f).unwrap_or_default());
        }
        text
    }

    fn mnemonic(&self) -> String {
        let wallet: Value = serde_json::from_str(
            &std::fs::read_to_string(self.home().join("wallet.json")).unwrap(),
        )
        .unwrap();
        wallet["mnemonic"].as_str().unwrap().to_string()
    }
}

/// A running `automaton run`: killed with its process group when dropped, pass or fail.
struct RunningAgent(Option<Child>);

impl RunningAgent {
    fn pid(&self) -> i32 {
        self.0.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    /// SIGKILL, as a crash would.
    fn kill9(mut self) {
        self.kill();
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.0.take() {
            unsafe {
                libc::kill(-(child.id() as i32), libc::SIGKILL);
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits for a clean exit.
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
        self.kill();
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

async fn merchant_invoice(world: &World, sats: u64, memo: &str) -> (String, String) {
    let v = lab_post(
        world,
        "/lab/merchant/invoice",
        json!({"msat": sats * 1000, "memo": memo}),
    )
    .await;
    (
        v["bolt11"].as_str().unwrap().to_string(),
        v["payment_hash"].as_str().unwrap().to_string(),
    )
}

async fn merchant_paid(world: &World, hash: &str) -> bool {
    lab_get(world, &format!("/lab/merchant/invoice/{hash}")).await["paid"] == true
}

/// Whether the merchant records `hash` as paid within 10 s: its node writes the claim a moment after releasing the
/// preimage, so the payer can see success first.
async fn merchant_settles(world: &World, hash: &str) -> bool {
    let start = Instant::now();
    let mut wait = Duration::from_millis(20);
    loop {
        if merchant_paid(world, hash).await {
            return true;
        }
        if start.elapsed() > Duration::from_secs(10) {
            return false;
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_millis(500));
    }
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

/// Funds a running agent: its invoice (a JIT channel from the hub) paid by the lab's creator. Returns the
/// creator's answer (with the preimage) and the invoice.
async fn fund(world: &World, agent: &Agent, sats: u64) -> (Value, Value) {
    let invoice = agent.json(&[
        "wallet",
        "invoice",
        &sats.to_string(),
        "--memo",
        "funding from the creator",
        "--json",
    ]);
    let paid = lab_post(
        world,
        "/lab/creator/pay",
        json!({"bolt11": invoice["bolt11"]}),
    )
    .await;
    let hash = invoice["payment_hash"].as_str().unwrap().to_string();
    assert!(
        eventually(Duration::from_secs(60), || {
            agent
                .json(&["wallet", "receipts", "--json"])
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["payment_hash"] == hash.as_str() && r["status"] == "succeeded")
        }),
        "the incoming payment never became a receipt"
    );
    (paid, invoice)
}

fn receipts(agent: &Agent) -> Vec<Value> {
    agent
        .json(&["wallet", "receipts", "--json", "--limit", "1000"])
        .as_array()
        .unwrap()
        .clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fresh_agent_is_funded_over_a_jit_channel_and_pays_the_merchant() {
    let world = world::shared();
    let agent = lab_agent(world, "funded", &[]);

    // Identity: wallet.json is private, and status shows the node id and npub without a node.
    let wallet = agent.home().join("wallet.json");
    assert_eq!(
        std::fs::metadata(&wallet).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let status = agent.json(&["status", "--json"]);
    let node_id = status["node_id"].as_str().expect("node id").to_string();
    assert_eq!(node_id.len(), 66);
    assert!(status["npub"].as_str().unwrap().starts_with("npub1"));
    assert!(status["balance_sats"].is_null());

    let running = agent.start();
    let info = agent.json(&["wallet", "info", "--json"]);
    assert_eq!(
        info["node_id"],
        node_id.as_str(),
        "the node runs the identity setup recorded"
    );

    // The creator pays a fresh agent's invoice: the hub opens a JIT channel.
    let (paid, invoice) = fund(world, &agent, 100_000).await;
    assert_eq!(invoice["jit_channel"], true);
    let hash = invoice["payment_hash"].as_str().unwrap();
    let preimage = hex::decode(paid["preimage"].as_str().unwrap()).unwrap();
    assert_eq!(sha256_hex(&preimage), hash);

    let balance = agent.json(&["wallet", "balance", "--json"]);
    let balance_sats = balance["balance_sats"].as_u64().unwrap();
    assert!(
        (90_000..100_000).contains(&balance_sats),
        "balance after a 100k funding minus the LSP fee: {balance}"
    );
    let channels = agent.json(&["wallet", "channels", "--json"]);
    assert_eq!(channels.as_array().unwrap().len(), 1);
    assert_eq!(
        channels[0]["counterparty_node_id"],
        world.lab_json().lsp.node_id.as_str()
    );
    // A JIT channel is usable a moment after the payment that opened it.
    assert!(
        eventually(Duration::from_secs(10), || {
            agent.json(&["wallet", "channels", "--json"])[0]["is_usable"] == true
        }),
        "the JIT channel never became usable: {channels}"
    );

    let incoming = receipts(&agent)
        .into_iter()
        .find(|r| r["payment_hash"] == hash)
        .expect("incoming receipt");
    assert_eq!(incoming["direction"], "in");
    assert_eq!(incoming["status"], "succeeded");
    assert_eq!(incoming["preimage_sha256"], hash, "proof of payment");
    assert_eq!(incoming["purpose"], "funding from the creator");
    assert!(incoming["amount_msat"].as_u64().unwrap() >= 99_000_000);
    assert!(incoming.get("preimage").is_none());

    // The receipt is signed by the node key; a tampered copy is not.
    let file = agent.dir.path().join("receipt.json");
    std::fs::write(&file, incoming.to_string()).unwrap();
    let out = agent.run(&["wallet", "verify-receipt", file.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let mut forged = incoming.clone();
    forged["amount_msat"] = json!(999_000_000u64);
    std::fs::write(&file, forged.to_string()).unwrap();
    let out = agent.run(&["wallet", "verify-receipt", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "a tampered receipt fails");

    // The agent pays the merchant.
    let (bolt11, merchant_hash) = merchant_invoice(world, 8_000, "lab api call").await;
    let out = agent.json(&[
        "wallet",
        "pay",
        &bolt11,
        "--purpose",
        "lab api call",
        "--json",
    ]);
    assert_eq!(out["payment_hash"], merchant_hash.as_str());
    assert_eq!(out["preimage_sha256"], merchant_hash.as_str());
    assert!(merchant_settles(world, &merchant_hash).await);
    let merchant = lab_get(world, &format!("/lab/merchant/invoice/{merchant_hash}")).await;
    let merchant_preimage = merchant["preimage"].as_str().unwrap().to_string();

    // Paying the same invoice again pays nothing.
    let again = agent.run(&["wallet", "pay", &bolt11]);
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already paid"));
    let outgoing: Vec<Value> = receipts(&agent)
        .into_iter()
        .filter(|r| r["direction"] == "out")
        .collect();
    assert_eq!(outgoing.len(), 1);
    assert_eq!(outgoing[0]["status"], "succeeded");
    assert_eq!(outgoing[0]["amount_msat"], 8_000_000);
    assert_eq!(outgoing[0]["purpose"], "lab api call");

    // status reads the last balance and tier without asking the node.
    // (Recorded by the running agent a moment after the payment.)
    let recorded = || {
        let status = agent.json(&["status", "--json"]);
        let last = status["balance_sats"].as_u64().unwrap_or(0);
        (80_000..92_000).contains(&last) && status["tier"] == "normal"
    };
    assert!(
        eventually(Duration::from_secs(10), recorded),
        "{}",
        agent.json(&["status", "--json"])
    );

    // The agent pays through its own tool too (the scripted model pays what its prompt asks, once).
    let stopped = running.stop();
    assert!(stopped.success(), "run stops cleanly on SIGTERM: {stopped}");
    let (tool_bolt11, tool_hash) = merchant_invoice(world, 2_000, "paid by the agent").await;
    let prompt = agent.home().join("genesis").join("prompt.md");
    std::fs::write(
        &prompt,
        format!("You are a test agent.\nlab-scenario: spend {tool_bolt11}\n"),
    )
    .unwrap();
    let out = agent.run(&["run", "--turns", "1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let by_tool = receipts(&agent)
        .into_iter()
        .find(|r| r["payment_hash"] == tool_hash.as_str())
        .expect("the agent's pay_invoice wrote a receipt");
    assert_eq!(by_tool["status"], "succeeded");
    assert!(merchant_settles(world, &tool_hash).await);

    // No secret reached any log.
    let logs = agent.all_logs();
    assert!(logs.contains("Lightning node running"), "the run logged");
    let mnemonic = agent.mnemonic();
    assert!(!logs.contains(&mnemonic), "the mnemonic is in a log");
    let words: Vec<&str> = mnemonic.split(' ').collect();
    assert!(
        !logs.contains(&words[..4].join(" ")),
        "mnemonic words are in a log"
    );
    for secret in [paid["preimage"].as_str().unwrap(), &merchant_preimage] {
        assert!(!logs.contains(secret), "a preimage is in a log");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_budget_gate_holds_under_real_payments() {
    let world = world::shared();
    let agent = lab_agent(world, "budgeted", &[]);
    let _running = agent.start();
    fund(world, &agent, 100_000).await;

    // A frozen wallet pays nothing.
    let (bolt11, hash) = merchant_invoice(world, 1_000, "frozen").await;
    assert!(agent
        .run(&["wallet", "freeze", "--reason", "test"])
        .status
        .success());
    let out = agent.run(&["wallet", "pay", &bolt11]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("frozen"));
    assert!(agent.run(&["wallet", "unfreeze"]).status.success());
    assert!(!merchant_paid(world, &hash).await);

    // The reserve floor holds: a payment that would leave less than the reserve is refused.
    let balance = agent.json(&["wallet", "balance", "--json"])["balance_sats"]
        .as_u64()
        .unwrap();
    let reserve = (balance - 500).to_string();
    assert!(agent
        .run(&["budget", "set", "--reserve-sats", &reserve])
        .status
        .success());
    let out = agent.run(&["wallet", "pay", &bolt11]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("reserve"));
    assert!(agent
        .run(&["budget", "set", "--reserve-sats", "1000"])
        .status
        .success());
    assert!(!merchant_paid(world, &hash).await);

    // Above the approval threshold a payment waits for the creator, then goes through.
    assert!(agent
        .run(&["budget", "set", "--approval-above-sats", "2000"])
        .status
        .success());
    let (big, big_hash) = merchant_invoice(world, 3_000, "needs approval").await;
    let mut waiting = agent.command();
    waiting
        .args(["wallet", "pay", &big, "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let waiting = waiting.spawn().expect("pay");
    let mut approval = None;
    assert!(
        eventually(Duration::from_secs(30), || {
            let list = agent.json(&["approvals", "list", "--json"]);
            approval = list
                .as_array()
                .and_then(|a| a.first())
                .and_then(|a| a["id"].as_str())
                .map(str::to_string);
            approval.is_some()
        }),
        "the payment never asked for approval"
    );
    assert!(
        !merchant_paid(world, &big_hash).await,
        "nothing paid before approval"
    );
    assert!(agent
        .run(&["approvals", "approve", approval.as_deref().unwrap()])
        .status
        .success());
    let out = waiting.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the approved payment went through: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(merchant_settles(world, &big_hash).await);
    assert!(agent
        .run(&["budget", "set", "--approval-above-sats", "off"])
        .status
        .success());

    // 100 concurrent payments whose sum (100,000 sats) is four times the hourly cap never overshoot it.
    let mut invoices = Vec::new();
    for i in 0..100 {
        invoices.push(merchant_invoice(world, 1_000, &format!("burst {i}")).await);
    }
    let children: Vec<Child> = invoices
        .iter()
        .map(|(bolt11, _)| {
            let mut cmd = agent.command();
            cmd.args(["wallet", "pay", bolt11])
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            cmd.spawn().expect("pay")
        })
        .collect();
    let mut codes = Vec::new();
    for mut child in children {
        codes.push(child.wait().expect("wait").code());
    }
    let ok = codes.iter().filter(|c| **c == Some(0)).count();
    let refused = codes.iter().filter(|c| **c == Some(2)).count();
    assert!(
        ok > 0 && refused > 0,
        "some paid, the rest refused: {codes:?}"
    );
    assert_eq!(
        ok + refused,
        100,
        "every attempt paid or was refused: {codes:?}"
    );

    // The books: receipts, the merchant's view (the payee's node) and the cap agree.
    // (The merchant's node records a claim a moment after the payer sees success: counted again for up to 10 s.)
    let start = Instant::now();
    let paid_by_merchant = loop {
        let mut paid = 0;
        for (_, hash) in &invoices {
            if merchant_paid(world, hash).await {
                paid += 1;
            }
        }
        if paid == ok || start.elapsed() > Duration::from_secs(10) {
            break paid;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(paid_by_merchant, ok);
    let out_receipts: Vec<Value> = receipts(&agent)
        .into_iter()
        .filter(|r| r["direction"] == "out" && r["status"] == "succeeded")
        .collect();
    let spent_msat: u64 = out_receipts
        .iter()
        .map(|r| r["amount_msat"].as_u64().unwrap() + r["fee_msat"].as_u64().unwrap())
        .sum();
    assert!(
        spent_msat <= 25_000_000,
        "the hourly cap of 25,000 sats held: {spent_msat} msat spent"
    );
    assert_eq!(
        out_receipts.len(),
        ok + 1,
        "one receipt per payment (plus the approved one)"
    );
    let open: i64 = agent
        .db()
        .call_blocking(|c| {
            c.query_row(
                "SELECT count(*) FROM money_permits WHERE state = 'reserved'",
                [],
                |r| r.get(0),
            )
        })
        .unwrap();
    assert_eq!(open, 0, "no reservation is left open");
}

// A kill -9 can land between LDK's monitor write and its ChannelManager write; LDK then force-closes the channel on
// the restart ("ChannelManager is stale compared to the current ChannelMonitor"). Each round accepts either outcome
// and checks what must hold in both: the books agree with the merchant, nothing is paid twice, and money in a closed
// channel is accounted as closing.
#[tokio::test(flavor = "multi_thread")]
async fn kill_9_in_the_middle_of_a_payment_never_pays_twice() {
    let world = world::shared();
    let agent = lab_agent(world, "crashy", &[]);
    let mut running = agent.start();
    fund(world, &agent, 60_000).await;

    // The agent dies at different moments after the permit was reserved and the pending receipt written: before
    // the payment left, while it is in flight, or just as it settles.
    for (round, delay_ms) in [0u64, 40, 120, 300].into_iter().enumerate() {
        let (bolt11, hash) = merchant_invoice(world, 2_000, &format!("interrupted {round}")).await;
        let mut pay = agent.command();
        pay.args(["wallet", "pay", &bolt11])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut pay = pay.spawn().expect("pay");
        let db = agent.db();
        let h = hash.clone();
        assert!(
            eventually(Duration::from_secs(60), || {
                let h = h.clone();
                db.call_blocking(move |c| {
                    c.query_row(
                        "SELECT count(*) FROM receipts WHERE payment_hash = ?1 AND direction = 'out'",
                        [h],
                        |r| r.get::<_, i64>(0),
                    )
                })
                .unwrap()
                    > 0
            }),
            "the payment never started"
        );
        std::thread::sleep(Duration::from_millis(delay_ms));
        let pid = running.pid();
        running.kill9();
        let _ = pay.wait();
        assert!(!automaton_alive(pid));

        // Restarted, the agent reconciles with its node: the books match what really happened. A kill -9 between
        // LDK's two writes (a ChannelMonitor update is saved at once, the ChannelManager a moment later) leaves a
        // ChannelManager on disk older than its monitor, and LDK force-closes that channel on the restart. Its money
        // is then accounted as closing, and a payment caught in it stays in flight until it resolves on-chain.
        running = agent.start();
        let closing = || {
            agent.json(&["wallet", "balance", "--json"])["closing_sats"]
                .as_u64()
                .unwrap_or(0)
        };
        let receipt_of = || {
            receipts(&agent)
                .into_iter()
                .find(|r| r["payment_hash"] == hash.as_str())
                .unwrap()
        };
        // Reconciled: the receipt left `pending`, or its channel closed (money shown as closing in three reads in a
        // row: while the node restarts, a channel's balance can show as closing for a moment).
        let deadline = Instant::now() + Duration::from_secs(90);
        let mut closing_reads = 0;
        let (receipt, closed) = loop {
            let receipt = receipt_of();
            if receipt["status"] != "pending" {
                break (receipt, closing() > 0);
            }
            closing_reads = if closing() > 0 { closing_reads + 1 } else { 0 };
            if closing_reads >= 3 {
                break (receipt, true);
            }
            assert!(
                Instant::now() < deadline,
                "the interrupted payment was not reconciled:\n{}",
                node_notes(&agent)
            );
            std::thread::sleep(Duration::from_millis(300));
        };
        let paid = if receipt["status"] == "succeeded" {
            merchant_settles(world, &hash).await
        } else {
            merchant_paid(world, &hash).await
        };
        eprintln!(
            "killed {delay_ms} ms after the permit: receipt {}, merchant paid: {paid}, channel force-closed: {closed}",
            receipt["status"]
        );
        let in_flight = receipt["status"] == "pending";
        if in_flight {
            assert!(
                closed,
                "only a payment caught in a closed channel stays in flight"
            );
        } else if !closed {
            assert_eq!(
                receipt["status"] == "succeeded",
                paid,
                "receipt {receipt} and merchant (paid: {paid}) agree"
            );
        } else {
            // In a closed channel the node may still hold the HTLC (LDK rebuilds it from the monitor): it ends
            // on-chain, and a late success is counted then.
            assert!(receipt["status"] != "succeeded" || paid, "{receipt}");
        }
        assert_books_balance(&agent);

        // Paying the same invoice again never pays it twice.
        let again = agent.run(&["wallet", "pay", &bolt11]);
        if paid || in_flight {
            assert!(!again.status.success(), "no double payment");
        }
        if closed {
            // Nothing spendable until the closed channel's money is back on-chain: funded again (a new JIT
            // channel), the agent goes on. The unpaid invoice is paid now, unless the node still holds its HTLC in
            // the closed channel (then it refuses: that payment ends on-chain).
            refund(world, &agent).await;
            if !paid && !in_flight {
                let again = agent.run(&["wallet", "pay", &bolt11]);
                eprintln!(
                    "  paid again after the close: {} {}",
                    again.status,
                    String::from_utf8_lossy(&again.stderr).trim()
                );
                if again.status.success() {
                    assert!(
                        merchant_settles(world, &hash).await,
                        "paid again, but the merchant never saw it"
                    );
                } else {
                    // LDK rebuilt the first attempt's HTLC from the channel monitor: the node refuses a second
                    // payment, and the first ends with the closed channel (the merchant may yet be paid by it). Or
                    // the new attempt itself is caught behind it, still in flight with its reservation held.
                    let stderr = String::from_utf8_lossy(&again.stderr);
                    assert!(
                        stderr.contains("already paid or is being paid")
                            || stderr.contains("still in flight"),
                        "{stderr}"
                    );
                }
            }
        } else if !paid {
            assert!(
                again.status.success(),
                "{}\n{}",
                String::from_utf8_lossy(&again.stderr),
                node_notes(&agent)
            );
            assert!(merchant_settles(world, &hash).await);
        }
        assert_books_balance(&agent);
    }
}

/// Funds the agent again after a force close: a small JIT channel from the hub, the creator's payment retried
/// while the hub's view of the lab's channels catches up (a busy lab can answer RouteNotFound for a moment).
async fn refund(world: &World, agent: &Agent) {
    for attempt in 1..=5 {
        let invoice = agent.json(&[
            "wallet",
            "invoice",
            "10000",
            "--memo",
            "funding again after a force close",
            "--json",
        ]);
        let resp = reqwest::Client::new()
            .post(format!("{}/lab/creator/pay", world.control_url()))
            .json(&json!({"bolt11": invoice["bolt11"]}))
            .timeout(Duration::from_secs(90))
            .send()
            .await
            .expect("lab control API");
        if resp.status().is_success() {
            let hash = invoice["payment_hash"].as_str().unwrap().to_string();
            assert!(
                eventually(Duration::from_secs(60), || receipts(agent).iter().any(
                    |r| r["payment_hash"] == hash.as_str() && r["status"] == "succeeded"
                )),
                "the new funding never became a receipt"
            );
            return;
        }
        eprintln!(
            "  funding attempt {attempt} failed: {}",
            resp.text().await.unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_secs(2 * attempt)).await;
    }
    panic!("the creator could not fund the agent again after the force close");
}

/// The books' invariants: one settled permit of 2,000 sats per succeeded outgoing receipt, one reserved permit per
/// outgoing receipt still pending, nothing else held. Receipts and permits are read in one transaction: a payment
/// settling in the running agent between two reads would otherwise look like a broken book.
fn assert_books_balance(agent: &Agent) {
    type Books = (Vec<(String, String)>, Vec<(String, i64)>);
    let (out, permits): Books = agent
        .db()
        .call_blocking(|c| {
            let tx = c.transaction()?;
            let out = {
                let mut stmt = tx.prepare(
                    "SELECT purpose, status FROM receipts WHERE direction = 'out' ORDER BY created_at",
                )?;
                let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
                rows.collect::<Result<Vec<_>, _>>()?
            };
            let permits = {
                let mut stmt = tx.prepare(
                    "SELECT state, COALESCE(paid_msat, 0) FROM money_permits \
                     WHERE state IN ('settled', 'reserved')",
                )?;
                let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
                rows.collect::<Result<Vec<_>, _>>()?
            };
            tx.commit()?;
            Ok((out, permits))
        })
        .unwrap();
    let count = |status: &str| out.iter().filter(|(_, s)| s == status).count();
    let settled: Vec<i64> = permits
        .iter()
        .filter(|(s, _)| s == "settled")
        .map(|(_, paid)| *paid)
        .collect();
    let reserved = permits.iter().filter(|(s, _)| s == "reserved").count();
    assert_eq!(
        settled.len(),
        count("succeeded"),
        "the budget counts each payment once: {out:?} {permits:?}"
    );
    assert!(settled.iter().all(|paid| *paid == 2_000_000), "{settled:?}");
    assert_eq!(
        reserved,
        count("pending"),
        "a reservation is held exactly while its payment is in flight: {out:?} {permits:?}"
    );
}

/// Warnings, errors and channel closures from the agent's node log and its run logs (for failure messages).
fn node_notes(agent: &Agent) -> String {
    let mut notes = Vec::new();
    let mut files = vec![agent.home().join("logs").join("ldk-node.log")];
    for entry in std::fs::read_dir(agent.dir.path())
        .into_iter()
        .flatten()
        .flatten()
    {
        if entry.path().extension().is_some_and(|x| x == "log") {
            files.push(entry.path());
        }
    }
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        notes.extend(
            text.lines()
                .filter(|l| {
                    l.contains("WARN")
                        || l.contains("ERROR")
                        || l.contains("stale")
                        || l.contains("clos")
                })
                .map(str::to_string),
        );
    }
    notes[notes.len().saturating_sub(40)..].join("\n")
}

fn automaton_alive(pid: i32) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    !status.is_empty()
        && !status
            .lines()
            .any(|l| l.starts_with("State:") && l.contains('Z'))
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_chain_the_agent_thinks_on_and_commands_say_why() {
    let world = world::shared();
    // A chain source nobody listens on: the node cannot start, the agent must not wait for it.
    let agent = lab_agent(
        world,
        "offline",
        &["-c", "wallet.esplora_url=http://127.0.0.1:9"],
    );
    let out = agent.run(&["run", "--turns", "2"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = agent.json(&["status", "--json"]);
    assert_eq!(status["totals"]["turns"], 2);
    assert_eq!(
        status["tier"], "normal",
        "an unknown balance counts as normal"
    );
    let logs = agent.all_logs();
    assert!(
        logs.contains("could not start"),
        "the node's failure is visible"
    );

    // With no agent running, node commands fail at once and say so; receipts work offline.
    let started = Instant::now();
    let out = agent.run(&["wallet", "balance"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no agent is running"));
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(agent.json(&["wallet", "receipts", "--json"]), json!([]));

    // A running agent whose node cannot start answers info, and says why balance is unavailable.
    let _running = agent.start();
    assert!(eventually(Duration::from_secs(30), || {
        let out = agent.run(&["wallet", "info", "--json"]);
        out.status.success()
            && serde_json::from_slice::<Value>(&out.stdout)
                .map(|v| v["node"]["state"] == "starting" && !v["node"]["last_error"].is_null())
                .unwrap_or(false)
    }));
}

#[test]
fn setup_restores_a_wallet_from_its_words_and_never_replaces_one() {
    let dir = tempfile::tempdir().unwrap();
    let first = Agent {
        dir: tempfile::tempdir().unwrap(),
    };
    let setup = |agent: &Agent, extra: &[&str]| {
        agent.run(
            &[
                &["setup", "--yes", "--name", "restored", "--inference-url"][..],
                &["http://127.0.0.1:9/v1", "--model", "m"],
                extra,
            ]
            .concat(),
        )
    };
    let out = setup(&first, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mnemonic = first.mnemonic();
    assert!(
        !stdout.contains(&mnemonic),
        "setup --yes never prints the mnemonic"
    );
    assert!(
        stdout.contains("wallet.json"),
        "it says where the wallet is"
    );
    let node_id = first.json(&["status", "--json"])["node_id"].clone();

    // The words alone restore the same identity in a new home.
    let words = dir.path().join("words.txt");
    std::fs::write(&words, format!("{mnemonic}\n")).unwrap();
    let second = Agent {
        dir: tempfile::tempdir().unwrap(),
    };
    let out = setup(&second, &["--mnemonic-file", words.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(second.json(&["status", "--json"])["node_id"], node_id);
    assert_eq!(second.mnemonic(), mnemonic);

    // Another mnemonic over an existing wallet is refused and changes nothing.
    let other = dir.path().join("other.txt");
    std::fs::write(
        &other,
        "leader monkey parrot ring guide accident before fence cannon height naive bean",
    )
    .unwrap();
    let out = second.run(&[
        "setup",
        "--reconfigure",
        "--yes",
        "--mnemonic-file",
        other.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("different wallet"));
    assert_eq!(second.mnemonic(), mnemonic);

    // Bad words are refused before anything is written.
    let bad = dir.path().join("bad.txt");
    std::fs::write(&bad, "not a mnemonic at all").unwrap();
    let third = Agent {
        dir: tempfile::tempdir().unwrap(),
    };
    let out = setup(&third, &["--mnemonic-file", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(!third.home().join("automaton.yaml").exists());
    assert!(!third.home().join("wallet.json").exists());
}
