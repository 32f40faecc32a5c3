//! Replication end to end in the lab, through the built binaries: a funded parent spawns a child on an LNVPS VM it
//! rents and pays over Lightning; the child is installed over SSH (a copy of the parent's binary), set up
//! non-interactively, started under a supervisor, funded through the parent's budget gate, and comes alive with
//! its own node id and balance. The parent is killed in the middle of the spawn and restarted: the spawn resumes
//! with no second VM and no second funding. The child tops up its own VM through the VM's LNURL-pay endpoint from
//! its own wallet, and reads a private message from its parent in its loop. Stopping the child makes the parent mark
//! it unhealthy, then dead. `max_children` refuses.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use automaton_lab::world;
use common::lab_agent::{eventually, lab_get, LabAgent, RunningAgent};
use serde_json::Value;

fn child_named(agent: &LabAgent, name: &str) -> Option<Value> {
    agent
        .json(&["children", "--json"])
        .as_array()
        .and_then(|list| list.iter().find(|c| c["name"] == name).cloned())
}

fn state_of(agent: &LabAgent, name: &str) -> String {
    child_named(agent, name)
        .and_then(|c| c["state"].as_str().map(str::to_string))
        .unwrap_or_default()
}

/// `automaton --home HOME ARGS` for the child, whose home is inside its VM's directory on this machine.
fn child_json(child_home: &std::path::Path, args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_automaton"))
        .arg("--home")
        .arg(child_home)
        .args(args)
        .env_remove("AUTOMATON_HOME")
        .stdin(Stdio::null())
        .output()
        .expect("run the child's automaton");
    assert!(
        out.status.success(),
        "child {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON")
}

/// Limits that let a parent rent and fund a child.
const PARENT_LIMITS: &str =
    "limits:\n  per_payment_sats: 60000\n  hourly_sats: 200000\n  daily_sats: 400000\n";

/// A parent set up against the lab with `PARENT_LIMITS` and `extra` (YAML) layered over its config.
fn parent_with(world: &world::World, name: &str, extra: &str) -> LabAgent {
    let layer = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(layer.path(), format!("{PARENT_LIMITS}{extra}")).unwrap();
    LabAgent::set_up(
        world,
        name,
        &["--config-from", layer.path().to_str().unwrap()],
    )
}

/// Starts `parent`, funds it with `sats` and waits until its tier allows spawning.
async fn start_funded(world: &world::World, parent: &LabAgent, sats: u64) -> RunningAgent {
    let running = parent.start();
    parent.wait_ready();
    parent.fund(world, sats).await;
    assert!(
        eventually(Duration::from_secs(30), || {
            matches!(
                parent.json(&["status", "--json"])["tier"].as_str(),
                Some("normal" | "high")
            )
        }),
        "the funded parent's tier never rose to normal"
    );
    running
}

#[tokio::test(flavor = "multi_thread")]
async fn a_parent_spawns_a_funded_child_on_a_rented_vps_and_watches_it_live_and_die() {
    let world = world::shared();
    // Limits that let it rent and fund a child, quick health verdicts, one child at most; the child tops up its VM
    // as soon as it runs (a lab "month" is 600 s).
    let parent = parent_with(
        world,
        "parent",
        "replication:\n  max_children: 1\n  unhealthy_after_secs: 15\n  dead_after_secs: 30\n\
         compute:\n  lnvps:\n    renew_lead_secs: 600\n",
    );
    let heartbeat_path = parent.home().join("heartbeat.yaml");
    let heartbeat = std::fs::read_to_string(&heartbeat_path).unwrap().replace(
        "  - name: child_health\n    every: 30s",
        "  - name: child_health\n    every: 3s",
    );
    assert!(heartbeat.contains("every: 3s"));
    std::fs::write(&heartbeat_path, heartbeat).unwrap();

    let running = start_funded(world, &parent, 150_000).await;

    // Spawn from the CLI; kill the parent (and the spawn) once the child's VM is rented and paid (while its binary
    // is being copied). A kill during the funding payment itself can make LDK force-close the parent's channel on
    // restart (see the wallet tests); the payment then stays in flight until it resolves on-chain.
    let mut spawn = parent
        .command()
        .args([
            "spawn",
            "--name",
            "kid",
            "--specialization",
            "Translate short texts between English and French, for sats.",
            "--fund-sats",
            "20000",
            "--json",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    assert!(
        eventually(Duration::from_secs(240), || {
            matches!(
                state_of(&parent, "kid").as_str(),
                "provisioned" | "installed" | "configured" | "started" | "funded" | "alive"
            ) || spawn.try_wait().unwrap().is_some()
        }),
        "the spawn never rented the child's VM:\n{}",
        parent.logs()
    );
    let early = state_of(&parent, "kid");
    let _ = spawn.kill();
    let spawn_out = spawn.wait_with_output().unwrap();
    drop(running); // SIGKILL to the whole `automaton run` process group
    eprintln!(
        "killed the parent at state {early}; spawn said: {}",
        String::from_utf8_lossy(&spawn_out.stderr)
    );

    // Restarted, the parent's heartbeat resumes the spawn.
    let running = parent.start();
    parent.wait_ready();
    if !eventually(Duration::from_secs(300), || {
        state_of(&parent, "kid") == "alive"
    }) {
        let fund_receipts: Vec<Value> = parent
            .receipts()
            .into_iter()
            .filter(|r| r["purpose"] == "replication.fund")
            .collect();
        panic!(
            "the child never came alive: {}\nfunding receipts: {fund_receipts:?}\nbalance: {}\n{}",
            parent.json(&["child", "show", "kid", "--cached", "--json"]),
            parent.json(&["wallet", "balance", "--json"]),
            parent.logs()
        );
    }
    let kid = child_named(&parent, "kid").unwrap();
    let node_id = kid["node_id"]
        .as_str()
        .expect("the child's node id")
        .to_string();
    assert_eq!(node_id.len(), 66, "{kid}");
    assert!(kid["npub"].as_str().unwrap().starts_with("npub1"), "{kid}");
    assert!(kid["balance_sats"].as_u64().unwrap() > 10_000, "{kid}");
    let vm_id = kid["vm_id"].as_u64().expect("the child's VM");

    // One VM rented and one funding payment, whatever the kill interrupted.
    let receipts = parent.receipts();
    let rent: Vec<_> = receipts
        .iter()
        .filter(|r| r["purpose"] == "compute.rent" && r["direction"] == "out")
        .collect();
    assert_eq!(rent.len(), 1, "{rent:?}");
    let funding: Vec<_> = receipts
        .iter()
        .filter(|r| r["purpose"] == "replication.fund")
        .collect();
    assert_eq!(funding.len(), 1, "{funding:?}");
    assert_eq!(funding[0]["status"], "succeeded");
    assert_eq!(funding[0]["amount_msat"], 20_000_000, "{:?}", funding[0]);
    assert_eq!(kid["fund_payment_hash"], funding[0]["payment_hash"]);
    let vms = parent.json(&["vps", "list", "--json"]);
    assert_eq!(vms.as_array().unwrap().len(), 1, "{vms}");

    // The child, on its VM: its own identity matches, its card names its parent.
    let lab_vm = lab_get(world, &format!("/lab/lnvps/vm/{vm_id}")).await;
    let base_dir = kid["base_dir"]
        .as_str()
        .expect("the child's directory")
        .to_string();
    assert!(
        base_dir.starts_with(lab_vm["dir"].as_str().unwrap()),
        "the child lives in its VM: {base_dir} vs {lab_vm}"
    );
    let child_home = std::path::Path::new(&base_dir).join("home");
    let status = child_json(&child_home, &["status", "--json"]);
    assert_eq!(status["node_id"], node_id.as_str(), "{status}");
    assert_eq!(status["running"], true, "{status}");
    let parent_npub = parent.json(&["status", "--json"])["npub"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(status["creator"]["npub"], parent_npub.as_str(), "{status}");
    let show = parent.json(&["child", "show", "kid", "--json"]);
    assert!(
        eventually(Duration::from_secs(60), || {
            parent.json(&["child", "show", "kid", "--json"])["card"]["parent"]
                == parent_npub.as_str()
        }),
        "the child's card does not name its parent: {show}"
    );

    // The child pays for its own VM: a compute.rent receipt in its books, the expiry extended at LNVPS.
    let expires_before = lab_vm["expires"].as_str().unwrap_or_default().to_string();
    assert!(
        eventually(Duration::from_secs(120), || {
            child_json(&child_home, &["wallet", "receipts", "--json"])
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["purpose"] == "compute.rent" && r["status"] == "succeeded")
        }),
        "the child never topped up its VM"
    );
    // The double extended the VM by the top-up: paid until well past the one period (600 s in the lab) the
    // parent's rent bought.
    let rent_at =
        chrono::DateTime::parse_from_rfc3339(rent[0]["created_at"].as_str().unwrap()).unwrap();
    // (The double sees the payment through its own node a moment after the child's receipt.)
    let mut expires = String::new();
    for _ in 0..60 {
        let later = lab_get(world, &format!("/lab/lnvps/vm/{vm_id}")).await;
        expires = later["expires"].as_str().unwrap_or_default().to_string();
        let until = chrono::DateTime::parse_from_rfc3339(&expires).unwrap();
        if (until - rent_at).num_seconds() > 900 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let until = chrono::DateTime::parse_from_rfc3339(&expires).unwrap();
    assert!(
        (until - rent_at).num_seconds() > 900,
        "rented at {rent_at}, paid until {expires} (before the child's top-up: {expires_before}); child: {}",
        child_json(&child_home, &["wallet", "receipts", "--json"])
    );

    // A private message from the parent reaches the child's loop, from `parent`, not as its creator.
    let out = parent.run(&[
        "child",
        "message",
        "kid",
        "Hello from your parent: translate more.",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        eventually(Duration::from_secs(120), || {
            child_json(&child_home, &["logs", "--json", "--limit", "50"])
                .as_array()
                .unwrap()
                .iter()
                .any(|t| {
                    t["input_source"] == "parent"
                        && t["input"]
                            .as_str()
                            .is_some_and(|i| i.contains("Hello from your parent"))
                })
        }),
        "the parent's message never reached the child's loop"
    );

    // max_children = 1: a second child is refused (exit 2) with the reason.
    let out = parent.run(&[
        "spawn",
        "--name",
        "second",
        "--specialization",
        "anything",
        "--fund-sats",
        "20000",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("max_children"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Stopped, the child goes silent: unhealthy, then dead.
    let out = parent.run(&["child", "stop", "kid"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let start = Instant::now();
    let mut seen_unhealthy = false;
    while start.elapsed() < Duration::from_secs(180) {
        match state_of(&parent, "kid").as_str() {
            "unhealthy" => seen_unhealthy = true,
            "dead" => break,
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(state_of(&parent, "kid"), "dead", "{}", parent.logs());
    let history = parent.json(&["child", "show", "kid", "--cached", "--json"]);
    let states: Vec<&str> = history["transitions"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["to"].as_str())
        .collect();
    assert!(
        seen_unhealthy || states.contains(&"unhealthy"),
        "{states:?}"
    );
    assert!(
        states.starts_with(&["requested", "provisioned", "installed"]),
        "{states:?}"
    );

    // Pruned: the VM is let go.
    let out = parent.run(&["child", "prune", "kid"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(state_of(&parent, "kid"), "");
    running.stop();
}

/// Kills a local child's supervisor group (from its pid file) when the test ends, pass or fail.
struct LocalChild(std::path::PathBuf);

impl Drop for LocalChild {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(self.0.join("run.pid")) {
            if let Ok(pid) = pid.trim().parse::<i32>() {
                unsafe {
                    libc::kill(-pid, libc::SIGKILL);
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_child_can_live_in_another_home_on_the_same_machine() {
    let world = world::shared();
    let parent = parent_with(world, "homebody", "");
    let running = start_funded(world, &parent, 80_000).await;
    let base = parent.home().join("children").join("local-kid");
    let _guard = LocalChild(base.clone());
    // A supervised process with a pid file (no systemd user session in a test).
    let out = parent
        .command()
        .env("AUTOMATON_SUPERVISOR", "pidfile")
        .args([
            "spawn",
            "--provider",
            "local",
            "--name",
            "local-kid",
            "--specialization",
            "Keep the parent's notes tidy.",
            "--fund-sats",
            "15000",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        parent.logs()
    );
    let kid: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(kid["state"], "alive", "{kid}");
    assert_eq!(kid["base_dir"], base.to_str().unwrap());
    let status = child_json(&base.join("home"), &["status", "--json"]);
    assert_eq!(status["node_id"], kid["node_id"], "{status}");
    assert_eq!(status["running"], true);
    assert!(
        status["balance_sats"].as_u64().unwrap() > 10_000,
        "{status}"
    );
    // No VM: nothing was rented, one funding payment.
    let receipts = parent.receipts();
    assert!(!receipts.iter().any(|r| r["purpose"] == "compute.rent"));
    assert_eq!(
        receipts
            .iter()
            .filter(|r| r["purpose"] == "replication.fund" && r["status"] == "succeeded")
            .count(),
        1
    );
    // A name in use is refused.
    let out = parent.run(&[
        "spawn",
        "--provider",
        "local",
        "--name",
        "local-kid",
        "--specialization",
        "again",
        "--fund-sats",
        "15000",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already a child named local-kid"));
    let out = parent.run(&["child", "stop", "local-kid"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        child_json(&base.join("home"), &["status", "--json"])["running"],
        false
    );
    running.stop();
}

/// One tool call: the parent's own loop (the lab model, steered by its genesis) calls `spawn_child` in its first
/// turns, while it is being funded. Whether the call lands before the money (the spawn then waits for it to pay the
/// child) or is refused by the tier gate and made again after the funding wakes the loop, exactly one spawn is
/// accepted and runs in the background until the child is alive.
#[tokio::test(flavor = "multi_thread")]
async fn the_agent_loop_spawns_a_child_with_one_tool_call() {
    let world = world::shared();
    let layer = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(layer.path(), PARENT_LIMITS).unwrap();
    let parent = LabAgent::set_up_with_genesis(
        world,
        "raiser",
        "You are a test agent that raises helpers.\n\
         lab-scenario: spawn loop-kid 15000 provider=local Keep the parent's notes tidy.",
        &["--config-from", layer.path().to_str().unwrap()],
    );
    let base = parent.home().join("children").join("loop-kid");
    let _guard = LocalChild(base.clone());
    // A supervised process with a pid file (no systemd user session in a test).
    let running = parent.start_with_env(&[("AUTOMATON_SUPERVISOR", "pidfile")]);
    parent.wait_ready();
    parent.fund(world, 80_000).await;
    assert!(
        eventually(Duration::from_secs(240), || state_of(&parent, "loop-kid")
            == "alive"),
        "the child never came alive: {:?}\n{}",
        child_named(&parent, "loop-kid"),
        parent.logs()
    );
    let kid = child_named(&parent, "loop-kid").unwrap();
    assert_eq!(kid["provider"], "local", "{kid}");
    let status = child_json(&base.join("home"), &["status", "--json"]);
    assert_eq!(status["node_id"], kid["node_id"], "{status}");
    // The loop made the call, and accepted it once.
    let calls = parent.db().call_blocking(|c| {
        let mut stmt =
            c.prepare("SELECT is_error FROM tool_calls WHERE name = 'spawn_child' ORDER BY rowid")?;
        let rows = stmt.query_map([], |r| r.get::<_, bool>(0))?;
        rows.collect::<Result<Vec<_>, _>>()
    });
    let calls = calls.unwrap();
    eprintln!("spawn_child calls (is_error): {calls:?}");
    assert_eq!(calls.last(), Some(&false), "{calls:?}");
    assert_eq!(calls.iter().filter(|e| !**e).count(), 1, "{calls:?}");
    assert_eq!(
        parent
            .receipts()
            .iter()
            .filter(|r| r["purpose"] == "replication.fund" && r["status"] == "succeeded")
            .count(),
        1
    );
    running.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_child_can_live_on_a_machine_reached_over_ssh() {
    let world = world::shared();
    let parent = parent_with(world, "sshparent", "");
    let running = start_funded(world, &parent, 100_000).await;
    // A machine the parent can SSH into (its host key pinned): here a VM it rents itself.
    let vm = parent.json(&["vps", "create", "--json"]);
    let (ip, user) = (
        vm["ip"].as_str().unwrap().to_string(),
        vm["user"].as_str().unwrap().to_string(),
    );
    let kid = parent.json(&[
        "-c",
        &format!("compute.ssh.host={ip}"),
        "-c",
        &format!("compute.ssh.user={user}"),
        "spawn",
        "--provider",
        "ssh",
        "--name",
        "ssh-kid",
        "--specialization",
        "Watch the lab's chain.",
        "--fund-sats",
        "15000",
        "--json",
    ]);
    assert_eq!(kid["state"], "alive", "{kid}");
    let base = kid["base_dir"].as_str().unwrap().to_string();
    assert!(base.ends_with("/automaton-children/ssh-kid"), "{base}");
    let status = child_json(
        &std::path::Path::new(&base).join("home"),
        &["status", "--json"],
    );
    assert_eq!(status["node_id"], kid["node_id"], "{status}");
    assert_eq!(status["running"], true);
    // The child keeps its machine: without the -c flags, the parent still reaches it.
    let shown = parent.json(&["child", "show", "ssh-kid", "--json"]);
    assert_eq!(shown["state"], "alive", "{shown}");
    let out = parent.run(&["child", "stop", "ssh-kid"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        child_json(
            &std::path::Path::new(&base).join("home"),
            &["status", "--json"]
        )["running"],
        false
    );
    running.stop();
}
