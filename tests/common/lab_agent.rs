//! An agent against the shared lab world, driven through the built binary: set up with `--lab`, `automaton run`
//! in its own process group (killed with the test), funded by the lab's creator through its Lightning address.

#![allow(dead_code)] // each test binary uses a different part of the harness

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use automaton_lab::world::World;
use serde_json::{json, Value};

pub struct LabAgent {
    pub dir: tempfile::TempDir,
}

impl LabAgent {
    /// A new agent set up against `world`, with extra `setup` flags.
    pub fn set_up(world: &World, name: &str, extra: &[&str]) -> LabAgent {
        LabAgent::set_up_with_genesis(
            world,
            name,
            "You are a test agent. Keep notes, spend nothing.",
            extra,
        )
    }

    /// The same, with its own genesis prompt (`lab-scenario:` lines steer the lab's scripted model).
    pub fn set_up_with_genesis(
        world: &World,
        name: &str,
        genesis: &str,
        extra: &[&str],
    ) -> LabAgent {
        let agent = LabAgent {
            dir: tempfile::tempdir().expect("temp dir"),
        };
        let lab = world.lab_json_path();
        let mut args = vec![
            "setup",
            "--yes",
            "--name",
            name,
            "--lab",
            lab.to_str().unwrap(),
        ];
        args.extend_from_slice(&["--genesis-prompt", genesis]);
        args.extend_from_slice(extra);
        let out = agent.run(&args);
        assert!(
            out.status.success(),
            "setup failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        agent
    }

    /// The agent's state DB (opened beside the running agent, as the CLI does).
    pub fn db(&self) -> automaton::state::Db {
        automaton::state::Db::open(&automaton::home::Home::at(self.home()).db_path())
            .expect("open state db")
    }

    pub fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }

    /// `automaton --home HOME …` with no inherited overrides or log filter.
    pub fn command(&self) -> Command {
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

    pub fn run(&self, args: &[&str]) -> Output {
        self.command().args(args).output().expect("run automaton")
    }

    /// Runs a command that must succeed and print JSON.
    pub fn json(&self, args: &[&str]) -> Value {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "automaton {args:?} failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "automaton {args:?} printed no JSON ({e}):\n{}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// Starts `automaton run` in its own process group; it dies with the test.
    pub fn start(&self) -> RunningAgent {
        self.start_with_env(&[])
    }

    /// `automaton run` with extra environment variables.
    pub fn start_with_env(&self, env: &[(&str, &str)]) -> RunningAgent {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let log = std::fs::File::create(self.dir.path().join(format!("run-{stamp}.log")))
            .expect("run log");
        let mut cmd = self.command();
        cmd.envs(env.iter().copied());
        cmd.arg("run")
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .process_group(0);
        // Killed with the test's thread even when the test dies without unwinding.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        RunningAgent(Some(cmd.spawn().expect("spawn automaton run")))
    }

    /// Waits until the running agent's node runs and reaches its LSP (the control socket waits up to 60 s).
    pub fn wait_ready(&self) {
        let out = self.run(&["wallet", "balance", "--json"]);
        assert!(
            out.status.success(),
            "the agent's node never became ready:\n{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
    }

    /// The tail of every run's output (for failure messages).
    pub fn logs(&self) -> String {
        let mut text = String::new();
        for entry in std::fs::read_dir(self.dir.path()).unwrap().flatten() {
            if entry.path().extension().is_some_and(|x| x == "log") {
                let body = std::fs::read_to_string(entry.path()).unwrap_or_default();
                let tail: Vec<&str> = body.lines().rev().take(40).collect();
                text.push_str(&tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
            }
        }
        // The node's own log: warnings and channel closures (a force close explains much).
        let node_log = self.home().join("logs").join("ldk-node.log");
        let node = std::fs::read_to_string(node_log).unwrap_or_default();
        let notable: Vec<&str> = node
            .lines()
            .filter(|l| {
                l.contains("WARN")
                    || l.contains("ERROR")
                    || l.contains("stale")
                    || l.contains("losing")
            })
            .collect();
        if !notable.is_empty() {
            text.push_str("\n--- ldk-node.log (warnings, errors, closures) ---\n");
            text.push_str(&notable[notable.len().saturating_sub(30)..].join("\n"));
        }
        text
    }

    pub fn receipts(&self) -> Vec<Value> {
        self.json(&["wallet", "receipts", "--json", "--limit", "1000"])
            .as_array()
            .unwrap()
            .clone()
    }

    /// The lab's creator pays `sats` to the agent's Lightning address; waits for the receipt.
    pub async fn fund(&self, world: &World, sats: u64) {
        let fund = self.json(&["fund", "--json"]);
        let address = fund["lightning_address"]
            .as_str()
            .expect("a Lightning address")
            .to_string();
        let paid = lab_post(
            world,
            "/lab/creator/pay-lnurl",
            json!({"target": address, "sats": sats}),
        )
        .await;
        let hash = paid["payment_hash"].as_str().unwrap().to_string();
        assert!(
            eventually(Duration::from_secs(60), || self.receipts().iter().any(
                |r| r["payment_hash"] == hash.as_str() && r["status"] == "succeeded"
            )),
            "the funding never became a receipt:\n{}",
            self.logs()
        );
    }
}

/// A running `automaton run`: killed with its process group when dropped, pass or fail.
pub struct RunningAgent(Option<Child>);

impl RunningAgent {
    /// SIGTERM, then waits for a clean exit.
    pub fn stop(mut self) {
        let mut child = self.0.take().expect("running");
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let limit = Instant::now() + Duration::from_secs(60);
        while child.try_wait().expect("wait").is_none() {
            if Instant::now() > limit {
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

/// POST to the lab's control API; the answer must be a success.
pub async fn lab_post(world: &World, path: &str, body: Value) -> Value {
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

pub async fn lab_get(world: &World, path: &str) -> Value {
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

/// Polls with backoff until `check` holds or `limit` passes.
pub fn eventually(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
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
