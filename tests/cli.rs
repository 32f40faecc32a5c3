//! The command line as a user meets it: help, status, logs, and `run`'s lock, log file and signals.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use assert_cmd::Command;
use predicates::prelude::*;
use serde_json::{json, Value};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

fn automaton(home: &Path) -> Command {
    let mut cmd = Command::cargo_bin("automaton").unwrap();
    cmd.arg("--home").arg(home);
    clean_env(cmd.env("GIT_CONFIG_GLOBAL", "/dev/null"));
    cmd.timeout(Duration::from_secs(60));
    cmd
}

fn clean_env<C: EnvRemove>(cmd: &mut C) {
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("AUTOMATON") {
            cmd.remove(key);
        }
    }
}

trait EnvRemove {
    fn remove(&mut self, key: std::ffi::OsString);
}
impl EnvRemove for Command {
    fn remove(&mut self, key: std::ffi::OsString) {
        self.env_remove(key);
    }
}
impl EnvRemove for std::process::Command {
    fn remove(&mut self, key: std::ffi::OsString) {
        self.env_remove(key);
    }
}

/// A spawned `automaton` that is killed (with its process group) when the test ends, pass or fail.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = rustix::process::kill_process_group(
            rustix::process::Pid::from_raw(self.0.id() as i32).unwrap(),
            rustix::process::Signal::KILL,
        );
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(home: &Path, args: &[&str]) -> Running {
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new(assert_cmd::cargo::cargo_bin("automaton"));
    cmd.arg("--home").arg(home).args(args);
    clean_env(&mut cmd);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    Running(cmd.spawn().unwrap())
}

fn set_up(dir: &Path, url: &str) -> PathBuf {
    let home = dir.join("agent");
    automaton(&home)
        .args([
            "setup",
            "--yes",
            "--name",
            "ada",
            "--inference-url",
            url,
            "--model",
            "test-model",
        ])
        .assert()
        .success();
    home
}

fn status_json(home: &Path) -> Value {
    let out = automaton(home)
        .args(["status", "--json"])
        .assert()
        .success();
    serde_json::from_slice(&out.get_output().stdout).unwrap()
}

/// Polls `check` with backoff until it returns Some, or panics after `limit`.
fn wait_for<T>(what: &str, limit: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    let mut delay = Duration::from_millis(20);
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(delay);
        delay = (delay * 2).min(Duration::from_millis(500));
    }
}

fn insert_turn(home: &Path, id: &str, tools: &[(&str, &str, bool)]) {
    let db = automaton::state::Db::open(&home.join("state.db")).unwrap();
    let id = id.to_string();
    let tools: Vec<(String, String, bool)> = tools
        .iter()
        .map(|(n, r, e)| (n.to_string(), r.to_string(), *e))
        .collect();
    db.call_blocking(move |c| {
        let tx = c.transaction()?;
        tx.execute(
            "INSERT INTO turns (id, started_at, ended_at, input, input_source, thinking, outcome, \
             prompt_tokens, completion_tokens) VALUES (?1, '2026-01-01T00:00:00Z', '2026-01-01T00:00:02Z', \
             'wake up', 'self', 'I should look around', 'sleep', 120, 30)",
            [&id],
        )?;
        for (seq, (name, result, is_error)) in tools.iter().enumerate() {
            tx.execute(
                "INSERT INTO tool_calls (id, turn_id, seq, name, arguments, result, is_error, duration_ms, created_at) \
                 VALUES (?1, ?2, ?3, ?4, '{\"command\":\"ls\"}', ?5, ?6, 7, '2026-01-01T00:00:01Z')",
                rusqlite::params![format!("{id}-{seq}"), id, seq as i64, name, result, *is_error as i64],
            )?;
        }
        tx.commit()
    })
    .unwrap();
}

#[test]
fn version_and_help_for_every_command() {
    let dir = tempfile::tempdir().unwrap();
    automaton(dir.path())
        .arg("--version")
        .assert()
        .success()
        .stdout(predicate::str::starts_with(format!(
            "automaton {}",
            env!("CARGO_PKG_VERSION")
        )));
    for (command, flag) in [
        ("setup", "--inference-url"),
        ("run", "--turns"),
        ("status", "--json"),
        ("logs", "--follow"),
    ] {
        automaton(dir.path())
            .args([command, "--help"])
            .assert()
            .success()
            .stdout(predicate::str::contains(flag))
            .stdout(predicate::str::contains("--home"));
    }
    // Usage errors exit 1: exit 2 is reserved for refusals by policy or budget.
    automaton(dir.path()).arg("fly").assert().code(1);
    automaton(dir.path())
        .args(["run", "--turns", "0"])
        .assert()
        .code(1);
}

#[test]
fn commands_on_an_empty_home_explain_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("nothing-here");
    for args in [
        vec!["status"],
        vec!["status", "--json"],
        vec!["logs"],
        vec!["run"],
    ] {
        automaton(&home)
            .args(&args)
            .assert()
            .code(1)
            .stdout(predicate::str::is_empty())
            .stderr(predicate::str::contains("no agent"))
            .stderr(predicate::str::contains("automaton setup"));
    }
    assert!(!home.exists(), "a read-only command created the home");
}

#[test]
fn home_comes_from_the_environment_when_no_flag_is_given() {
    let dir = tempfile::tempdir().unwrap();
    let home = set_up(dir.path(), "http://127.0.0.1:9/v1");
    let mut cmd = Command::cargo_bin("automaton").unwrap();
    clean_env(&mut cmd);
    let out = cmd
        .env("AUTOMATON_HOME", &home)
        .args(["status", "--json"])
        .assert()
        .success();
    let report: Value = serde_json::from_slice(&out.get_output().stdout).unwrap();
    assert_eq!(report["home"], home.display().to_string().as_str());
}

#[test]
fn status_reports_honestly_before_any_turn() {
    let dir = tempfile::tempdir().unwrap();
    let home = set_up(dir.path(), "http://127.0.0.1:9/v1");
    let report = status_json(&home);
    assert_eq!(report["name"], "ada");
    assert_eq!(report["home"], home.display().to_string().as_str());
    assert_eq!(report["running"], false);
    assert_eq!(report["pid"], Value::Null);
    assert_eq!(report["inference"]["model"], "test-model");
    assert_eq!(report["inference"]["api_key"], "not_needed");
    // Setup made the wallet: the tier is measured from it (no balance seen yet: normal).
    assert_eq!(report["tier"], "normal");
    assert_eq!(report["wallet"]["status"], "ready");
    assert_eq!(report["totals"]["turns"], 0);
    assert_eq!(report["last_turn"], Value::Null);

    // Without a wallet there is nothing to measure: no tier, and status says so.
    std::fs::remove_file(home.join("wallet.json")).unwrap();
    let report = status_json(&home);
    assert_eq!(report["tier"], Value::Null, "no tier without a wallet");
    assert_eq!(report["wallet"]["status"], "not_set_up");
    automaton(&home)
        .arg("status")
        .assert()
        .success()
        .stdout(predicate::str::contains("wallet"))
        .stdout(predicate::str::contains("not set up"))
        .stdout(predicate::str::contains("tier         unknown"))
        .stdout(predicate::str::contains("stopped"))
        .stdout(predicate::str::contains("normal").not());
}

#[test]
fn logs_and_status_show_turns_and_tool_calls() {
    let dir = tempfile::tempdir().unwrap();
    let home = set_up(dir.path(), "http://127.0.0.1:9/v1");
    automaton(&home)
        .arg("logs")
        .assert()
        .success()
        .stdout(predicate::str::is_empty())
        .stderr(predicate::str::contains("no turns yet"));
    automaton(&home)
        .args(["logs", "--json"])
        .assert()
        .success()
        .stdout(predicate::str::diff("[]\n"));

    insert_turn(&home, "01A", &[("exec", "file.txt", false)]);
    insert_turn(
        &home,
        "01B",
        &[
            ("read_file", "no such file", true),
            ("sleep", "sleeping 60 s", false),
        ],
    );

    let out = automaton(&home).args(["logs", "--json"]).assert().success();
    let turns: Value = serde_json::from_slice(&out.get_output().stdout).unwrap();
    let turns = turns.as_array().unwrap();
    assert_eq!(turns.len(), 2);
    assert_eq!(turns[0]["id"], "01A");
    assert_eq!(turns[1]["tool_calls"][0]["name"], "read_file");
    assert_eq!(turns[1]["tool_calls"][0]["is_error"], true);
    assert_eq!(turns[1]["tool_calls"][1]["seq"], 1);
    assert_eq!(turns[1]["prompt_tokens"], 120);

    let out = automaton(&home)
        .args(["logs", "--json", "--limit", "1"])
        .assert()
        .success();
    let turns: Value = serde_json::from_slice(&out.get_output().stdout).unwrap();
    assert_eq!(turns.as_array().unwrap().len(), 1);
    assert_eq!(turns[0]["id"], "01B");

    automaton(&home)
        .arg("logs")
        .assert()
        .success()
        .stdout(predicate::str::contains("turn 01A"))
        .stdout(predicate::str::contains("1. exec"))
        .stdout(predicate::str::contains("1. read_file"))
        .stdout(predicate::str::contains("-> error"))
        .stdout(predicate::str::contains("thinking: I should look around"));

    let report = status_json(&home);
    assert_eq!(report["totals"]["turns"], 2);
    assert_eq!(report["totals"]["tool_calls"], 3);
    assert_eq!(report["last_turn"]["id"], "01B");
    assert_eq!(report["last_turn"]["tool_calls"], 2);
    assert_eq!(report["last_turn"]["outcome"], "sleep");
}

#[test]
fn logs_follow_prints_turns_as_they_land() {
    let dir = tempfile::tempdir().unwrap();
    let home = set_up(dir.path(), "http://127.0.0.1:9/v1");
    insert_turn(&home, "01OLD", &[]);
    let mut follower = spawn(&home, &["logs", "--follow", "--json", "--limit", "5"]);
    let stdout = follower.0.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if tx.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    let first: Value =
        serde_json::from_str(&rx.recv_timeout(Duration::from_secs(30)).unwrap()).unwrap();
    assert_eq!(first["id"], "01OLD");
    insert_turn(&home, "01NEW", &[("exec", "ok", false)]);
    let next: Value =
        serde_json::from_str(&rx.recv_timeout(Duration::from_secs(30)).unwrap()).unwrap();
    assert_eq!(next["id"], "01NEW");
    assert_eq!(next["tool_calls"][0]["name"], "exec");
}

#[test]
fn a_second_run_is_refused_naming_the_holder() {
    let dir = tempfile::tempdir().unwrap();
    let home = set_up(dir.path(), "http://127.0.0.1:9/v1");
    let lock = automaton::home::AgentLock::acquire(&automaton::home::Home::at(&home)).unwrap();
    let pid = std::process::id();
    automaton(&home)
        .args(["run", "--turns", "1"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains(format!("pid {pid}")))
        .stderr(predicate::str::contains("agent.lock"));
    let report = status_json(&home);
    assert_eq!(report["running"], true);
    assert_eq!(report["pid"], pid);
    drop(lock);
    assert_eq!(status_json(&home)["running"], false);
}

fn chat_response(message: Value, finish: &str) -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_json(json!({
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": 1,
        "model": "test-model",
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": {"prompt_tokens": 50, "completion_tokens": 5, "total_tokens": 55}
    }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_turns_then_exits_and_logs_json_lines() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/chat/completions"))
        .respond_with(chat_response(
            json!({"role": "assistant", "content": "Nothing worth doing yet."}),
            "stop",
        ))
        .mount(&server)
        .await;
    let dir = tempfile::tempdir().unwrap();
    let url = format!("{}/v1", server.uri());
    let home = tokio::task::spawn_blocking({
        let dir = dir.path().to_path_buf();
        move || set_up(&dir, &url)
    })
    .await
    .unwrap();

    let home2 = home.clone();
    tokio::task::spawn_blocking(move || {
        automaton(&home2)
            .args(["run", "--turns", "2"])
            .assert()
            .success();
    })
    .await
    .unwrap();

    let log = std::fs::read_to_string(home.join("logs/automaton.log")).unwrap();
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).expect("every log line is JSON"))
        .collect();
    assert!(lines
        .iter()
        .any(|l| l["fields"]["message"] == "automaton run holds the home"));
    assert!(lines
        .iter()
        .all(|l| l["level"].is_string() && l["timestamp"].is_string()));

    let home2 = home.clone();
    let report = tokio::task::spawn_blocking(move || status_json(&home2))
        .await
        .unwrap();
    assert_eq!(report["totals"]["turns"], 2);
    assert_eq!(report["running"], false);
    assert_eq!(server.received_requests().await.unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_a_sleeping_agent_cleanly() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/chat/completions"))
        .respond_with(chat_response(
            json!({"role": "assistant", "content": null, "tool_calls": [{
                "id": "call_1", "type": "function",
                "function": {"name": "sleep", "arguments": "{\"seconds\": 3600, \"reason\": \"nothing to do\"}"}
            }]}),
            "tool_calls",
        ))
        .mount(&server)
        .await;
    let dir = tempfile::tempdir().unwrap();
    let url = format!("{}/v1", server.uri());
    let dir_path = dir.path().to_path_buf();
    tokio::task::spawn_blocking(move || {
        let home = set_up(&dir_path, &url);
        let mut agent = spawn(&home, &["run"]);
        let pid = agent.0.id();
        // Running, holding the lock under its own pid, and asleep after its first turn.
        let report = wait_for("the agent's first turn", Duration::from_secs(60), || {
            let report = status_json(&home);
            (report["pid"] == pid
                && report["totals"]["turns"] == 1
                && report["sleeping_until"].is_string())
            .then_some(report)
        });
        assert_eq!(report["sleep_reason"], "nothing to do");
        automaton(&home)
            .arg("status")
            .assert()
            .success()
            .stdout(predicate::str::contains(format!(
                "running (pid {pid}), asleep until"
            )));
        rustix::process::kill_process(
            rustix::process::Pid::from_raw(pid as i32).unwrap(),
            rustix::process::Signal::TERM,
        )
        .unwrap();
        let status = wait_for("the agent to exit", Duration::from_secs(30), || {
            agent.0.try_wait().unwrap()
        });
        assert!(status.success(), "exit status {status:?}");
        let report = status_json(&home);
        assert_eq!(report["running"], false);
        assert_eq!(report["sleeping_until"], Value::Null);
    })
    .await
    .unwrap();
}
