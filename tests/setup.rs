//! `automaton setup --yes`: what it writes, what it refuses, and that it never destroys an agent.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use assert_cmd::Command;
use predicates::prelude::*;

/// The binary with a clean environment: no inherited home, config overrides or git identity.
fn automaton(home: &Path) -> Command {
    let mut cmd = Command::cargo_bin("automaton").unwrap();
    cmd.arg("--home").arg(home);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("AUTOMATON") {
            cmd.env_remove(key);
        }
    }
    let user_home = home.parent().unwrap().join("user");
    std::fs::create_dir_all(&user_home).unwrap();
    cmd.env("HOME", user_home)
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env_remove("GIT_AUTHOR_NAME")
        .env_remove("GIT_AUTHOR_EMAIL")
        .env_remove("GIT_COMMITTER_NAME")
        .env_remove("GIT_COMMITTER_EMAIL")
        .env_remove("OPENAI_API_KEY")
        .timeout(Duration::from_secs(60));
    cmd
}

fn setup_yes(home: &Path) -> Command {
    let mut cmd = automaton(home);
    cmd.args([
        "setup",
        "--yes",
        "--name",
        "ada",
        "--inference-url",
        "http://127.0.0.1:9/v1",
        "--model",
        "test-model",
        "--api-key-env",
        "TEST_AUTOMATON_KEY",
    ]);
    cmd
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn yaml(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap();
    automaton::config::yaml::from_str(&text).unwrap()
}

/// Every file under `dir` (except .git internals) with its bytes.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.file_name().unwrap() == ".git" {
                continue;
            }
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                out.insert(
                    path.strip_prefix(root).unwrap().to_path_buf(),
                    std::fs::read(&path).unwrap(),
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

fn git(home: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new("git")
        .arg("-C")
        .arg(home)
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "git {args:?}: {:?}", out);
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn yes_writes_a_complete_home() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("agent");
    setup_yes(&home)
        .assert()
        .success()
        .stdout(predicate::str::contains("Set up ada"))
        .stderr(predicate::str::contains("TEST_AUTOMATON_KEY is not set"));

    let config = yaml(&home.join("automaton.yaml"));
    assert_eq!(config["name"], "ada");
    assert_eq!(config["inference"]["base_url"], "http://127.0.0.1:9/v1");
    assert_eq!(config["inference"]["model"], "test-model");
    assert_eq!(config["inference"]["api_key_env"], "TEST_AUTOMATON_KEY");
    assert_eq!(config["limits"]["per_payment_sats"], 10_000);
    let listen = config["http"]["listen"].as_str().unwrap();
    assert!(listen.starts_with("127.0.0.1:"), "{listen}");

    assert_eq!(mode(&home), 0o700);
    assert_eq!(mode(&home.join("automaton.yaml")), 0o600);
    assert_eq!(mode(&home.join("genesis/constitution.md")), 0o444);
    assert_eq!(mode(&home.join("state.db")), 0o600);
    let constitution = std::fs::read_to_string(home.join("genesis/constitution.md")).unwrap();
    assert!(constitution.contains("Never harm"));
    let prompt = std::fs::read_to_string(home.join("genesis/prompt.md")).unwrap();
    assert!(prompt.contains("Lightning"));
    let heartbeat = yaml(&home.join("heartbeat.yaml"));
    let tasks: Vec<&str> = heartbeat["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["task"].as_str().unwrap())
        .collect();
    assert!(
        tasks.contains(&"status_refresh") && tasks.contains(&"wake_agent"),
        "{tasks:?}"
    );
    for skill in [
        "earning-with-a-paid-service",
        "money-and-survival",
        "renting-compute",
        "summarise-text",
    ] {
        let text =
            std::fs::read_to_string(home.join("skills").join(skill).join("SKILL.md")).unwrap();
        assert!(text.starts_with("---\nname: "), "{skill}");
    }
    assert!(home.join("workspace").is_dir());
    assert!(home.join("logs").is_dir());

    // A git repo tracking exactly the agent's definition, committed as automaton with no user git identity.
    let tracked = git(&home, &["ls-files"]);
    let mut tracked: Vec<&str> = tracked.lines().collect();
    tracked.sort();
    assert_eq!(
        tracked,
        [
            ".gitignore",
            "automaton.yaml",
            "genesis/constitution.md",
            "genesis/prompt.md",
            "heartbeat.yaml",
            "skills/earning-with-a-paid-service/SKILL.md",
            "skills/money-and-survival/SKILL.md",
            "skills/renting-compute/SKILL.md",
            "skills/summarise-text/SKILL.md",
        ]
    );
    assert_eq!(
        git(&home, &["log", "--format=%an <%ae>|%cn <%ce>"]).trim(),
        "automaton <automaton@localhost>|automaton <automaton@localhost>"
    );
    // State written later stays untracked.
    std::fs::write(home.join("wallet.json"), "{}").unwrap();
    assert_eq!(git(&home, &["status", "--porcelain"]).trim(), "");
}

#[test]
fn setup_twice_refuses_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("agent");
    setup_yes(&home).assert().success();
    let before = snapshot(&home);
    let mut again = setup_yes(&home);
    again.args(["--model", "other"]);
    again
        .assert()
        .code(1)
        .stderr(predicate::str::contains("already set up"))
        .stderr(predicate::str::contains("--reconfigure"));
    assert_eq!(snapshot(&home), before);
    assert_eq!(git(&home, &["rev-list", "--count", "HEAD"]).trim(), "1");
}

#[test]
fn reconfigure_edits_in_place_and_keeps_genesis_and_state() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("agent");
    let mut first = setup_yes(&home);
    first.args(["--genesis-prompt", "Sell haiku for sats."]);
    first.assert().success();
    let db = automaton::state::Db::open(&home.join("state.db")).unwrap();
    db.call_blocking(|c| {
        c.execute(
            "INSERT INTO kv (key, value, updated_at) VALUES ('memory', 'kept', 'now')",
            [],
        )
    })
    .unwrap();
    drop(db);
    let listen_before = yaml(&home.join("automaton.yaml"))["http"]["listen"].clone();

    automaton(&home)
        .args(["setup", "--yes", "--reconfigure", "--model", "bigger-model"])
        .assert()
        .success()
        .stdout(predicate::str::contains("Reconfigured ada"));

    let config = yaml(&home.join("automaton.yaml"));
    assert_eq!(config["name"], "ada");
    assert_eq!(config["inference"]["model"], "bigger-model");
    assert_eq!(config["inference"]["base_url"], "http://127.0.0.1:9/v1");
    assert_eq!(config["http"]["listen"], listen_before);
    assert_eq!(
        std::fs::read_to_string(home.join("genesis/prompt.md")).unwrap(),
        "Sell haiku for sats.\n"
    );
    let db = automaton::state::Db::open(&home.join("state.db")).unwrap();
    let kept: String = db
        .call_blocking(|c| c.query_row("SELECT value FROM kv WHERE key='memory'", [], |r| r.get(0)))
        .unwrap();
    assert_eq!(kept, "kept");
    assert_eq!(git(&home, &["rev-list", "--count", "HEAD"]).trim(), "2");

    // Changing the genesis prompt is not what --reconfigure does.
    automaton(&home)
        .args(["setup", "--yes", "--reconfigure", "--genesis-prompt", "x"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("keeps the genesis prompt"));
}

#[test]
fn reconfigure_restores_a_missing_default_skill_but_keeps_edited_ones() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("agent");
    setup_yes(&home).assert().success();
    let edited = home.join("skills/money-and-survival/SKILL.md");
    std::fs::write(&edited, "my own version").unwrap();
    std::fs::remove_dir_all(home.join("skills/renting-compute")).unwrap();
    automaton(&home)
        .args(["setup", "--yes", "--reconfigure"])
        .assert()
        .success();
    assert_eq!(std::fs::read_to_string(&edited).unwrap(), "my own version");
    assert!(home.join("skills/renting-compute/SKILL.md").exists());
}

#[test]
fn reconfigure_without_an_agent_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("agent");
    automaton(&home)
        .args(["setup", "--yes", "--reconfigure", "--model", "m"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("no agent"));
    assert!(!home.join("automaton.yaml").exists());
}

#[test]
fn yes_names_every_missing_required_flag_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("agent");
    automaton(&home)
        .args(["setup", "--yes", "--model", "m"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("--name"))
        .stderr(predicate::str::contains("--inference-url"))
        .stderr(predicate::str::contains("nothing was written"));
    assert!(!home.exists());
}

#[test]
fn bad_values_are_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("agent");
    for (flag, value, expected) in [
        ("--inference-url", "not-a-url", "inference.base_url"),
        ("--api-key-env", "sk-live-123", "inference.api_key_env"),
        ("--creator", "npub1tooshort", "npub"),
        ("--provider", "llamas", "unknown inference provider"),
    ] {
        let mut cmd = setup_yes(&home);
        cmd.args([flag, value]);
        cmd.assert()
            .code(1)
            .stderr(predicate::str::contains(expected));
        assert!(!home.join("automaton.yaml").exists(), "{flag}");
    }
}

#[test]
fn genesis_from_text_or_file_and_creator_identity() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("genesis.md");
    std::fs::write(&file, "Run a translation service.\nlab-scenario: none\n").unwrap();
    let home = dir.path().join("a");
    let npub = format!("npub1{}", "q".repeat(58));
    let mut cmd = setup_yes(&home);
    cmd.arg("--genesis-file").arg(&file).args([
        "--creator",
        &npub,
        "--creator-message",
        "Be kind.",
    ]);
    cmd.assert().success();
    assert_eq!(
        std::fs::read_to_string(home.join("genesis/prompt.md")).unwrap(),
        "Run a translation service.\nlab-scenario: none\n"
    );
    let config = yaml(&home.join("automaton.yaml"));
    assert_eq!(config["creator"]["npub"], npub.as_str());
    assert_eq!(config["creator"]["message"], "Be kind.");

    let home_b = dir.path().join("b");
    let node = format!("03{}", "ab".repeat(32));
    let mut cmd = setup_yes(&home_b);
    cmd.args(["--genesis-prompt", "Answer questions.", "--creator", &node]);
    cmd.assert().success();
    assert_eq!(
        std::fs::read_to_string(home_b.join("genesis/prompt.md")).unwrap(),
        "Answer questions.\n"
    );
    assert_eq!(
        yaml(&home_b.join("automaton.yaml"))["creator"]["node_id"],
        node.as_str()
    );

    let mut both = setup_yes(&dir.path().join("c"));
    both.arg("--genesis-file")
        .arg(&file)
        .args(["--genesis-prompt", "x"]);
    both.assert().code(1);
}

#[test]
fn config_from_fragment_is_merged_and_flags_win() {
    let dir = tempfile::tempdir().unwrap();
    let fragment = dir.path().join("child.yaml");
    std::fs::write(
        &fragment,
        "name: child-1\n\
         inference:\n  base_url: http://127.0.0.1:7/v1\n  model: parent-model\n  api_key_env: CHILD_KEY\n\
         limits:\n  per_payment_sats: 500\n  daily_sats: 5000\n  hourly_sats: 1000\n\
         wallet:\n  network: regtest\n  esplora_url: http://127.0.0.1:3002\n",
    )
    .unwrap();
    let home = dir.path().join("agent");
    automaton(&home)
        .args(["setup", "--yes", "--config-from"])
        .arg(&fragment)
        .args(["--model", "flag-model"])
        .assert()
        .success();
    let config = yaml(&home.join("automaton.yaml"));
    assert_eq!(config["name"], "child-1");
    assert_eq!(config["inference"]["base_url"], "http://127.0.0.1:7/v1");
    assert_eq!(config["inference"]["model"], "flag-model");
    assert_eq!(config["inference"]["api_key_env"], "CHILD_KEY");
    assert_eq!(config["limits"]["per_payment_sats"], 500);
    assert_eq!(config["limits"]["reserve_sats"], 1_000);
    assert_eq!(config["wallet"]["network"], "regtest");
}

#[test]
fn config_from_with_unknown_key_names_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let fragment = dir.path().join("child.yaml");
    std::fs::write(
        &fragment,
        "name: child\ninference:\n  base_url: http://127.0.0.1:7/v1\n  model: m\nlimits:\n  per_paymnet_sats: 5\n",
    )
    .unwrap();
    let home = dir.path().join("agent");
    automaton(&home)
        .args(["setup", "--yes", "--config-from"])
        .arg(&fragment)
        .assert()
        .code(1)
        .stderr(predicate::str::contains(format!(
            "{}:6",
            fragment.display()
        )))
        .stderr(predicate::str::contains("limits.per_paymnet_sats"));
    assert!(!home.exists());
}

#[test]
fn lab_json_maps_every_known_key_and_ignores_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let lab_dir = dir.path().join("lab");
    std::fs::create_dir_all(&lab_dir).unwrap();
    let node_id = format!("02{}", "cd".repeat(32));
    std::fs::write(
        lab_dir.join("lab.json"),
        serde_json::json!({
            "network": "regtest",
            "esplora_url": "http://127.0.0.1:3002",
            "control_url": "http://127.0.0.1:3003",
            "model_url": "http://127.0.0.1:3004/v1",
            "lsp": {"node_id": node_id, "address": "127.0.0.1:9735", "token": "lsp-token"},
            "nodes": {"hub": {"node_id": "x", "address": "y"}},
            "relay_url": "ws://127.0.0.1:7777",
            "something_new": {"nested": true}
        })
        .to_string(),
    )
    .unwrap();
    for (name, lab_arg) in [("a", lab_dir.join("lab.json")), ("b", lab_dir.clone())] {
        let home = dir.path().join(name);
        automaton(&home)
            .args(["setup", "--yes", "--name", name, "--lab"])
            .arg(&lab_arg)
            .assert()
            .success();
        let config = yaml(&home.join("automaton.yaml"));
        assert_eq!(config["inference"]["base_url"], "http://127.0.0.1:3004/v1");
        assert_eq!(config["inference"]["model"], "scripted");
        assert_eq!(config["inference"]["provider"], "openai");
        assert!(config["inference"].get("api_key_env").is_none());
        assert_eq!(config["wallet"]["network"], "regtest");
        assert_eq!(config["wallet"]["esplora_url"], "http://127.0.0.1:3002");
        assert_eq!(config["wallet"]["lsp"]["node_id"], node_id.as_str());
        assert_eq!(config["wallet"]["lsp"]["address"], "127.0.0.1:9735");
        assert_eq!(config["wallet"]["lsp"]["token"], "lsp-token");
    }
    automaton(&dir.path().join("c"))
        .args(["setup", "--yes", "--name", "c", "--lab"])
        .arg(dir.path().join("nowhere/lab.json"))
        .assert()
        .code(1)
        .stderr(predicate::str::contains("automaton-lab up"));
}

#[test]
fn setup_never_contacts_the_inference_endpoint() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("agent");
    automaton(&home)
        .args([
            "setup",
            "--yes",
            "--name",
            "quiet",
            "--inference-url",
            &url,
            "--model",
            "m",
        ])
        .assert()
        .success();
    match listener.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("setup connected to the inference endpoint: {other:?}"),
    }
}

#[test]
fn works_without_git_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let empty_path = dir.path().join("bin");
    std::fs::create_dir_all(&empty_path).unwrap();
    let home = dir.path().join("agent");
    let mut cmd = setup_yes(&home);
    cmd.env("PATH", &empty_path);
    cmd.assert()
        .success()
        .stderr(predicate::str::contains("git is not installed"));
    assert!(home.join("automaton.yaml").exists());
    assert!(!home.join(".git").exists());
}

#[test]
fn readable_key_file_is_refused_at_setup() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    std::fs::write(&key, "sk-should-never-appear\n").unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let home = dir.path().join("agent");
    let mut cmd = automaton(&home);
    cmd.args([
        "setup",
        "--yes",
        "--name",
        "ada",
        "--inference-url",
        "http://127.0.0.1:9/v1",
        "--model",
        "m",
        "--api-key-file",
    ])
    .arg(&key);
    cmd.assert()
        .code(1)
        .stderr(predicate::str::contains("chmod 600"))
        .stderr(predicate::str::contains("sk-should-never-appear").not());
    assert!(!home.join("automaton.yaml").exists());
}

#[test]
fn interactive_setup_without_a_terminal_points_to_yes() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("agent");
    automaton(&home)
        .arg("setup")
        .write_stdin("")
        .assert()
        .code(1)
        .stderr(predicate::str::contains("--yes"));
    assert!(!home.join("automaton.yaml").exists());
}

#[test]
fn a_directory_holding_other_files_is_not_taken_over() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("projects");
    std::fs::create_dir_all(&home).unwrap();
    std::fs::write(home.join("thesis.tex"), "precious").unwrap();
    std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o755)).unwrap();
    setup_yes(&home)
        .assert()
        .code(1)
        .stderr(predicate::str::contains("thesis.tex"))
        .stderr(predicate::str::contains("nothing was written"));
    assert_eq!(mode(&home), 0o755);
    assert!(!home.join(".git").exists());
    assert!(!home.join("automaton.yaml").exists());

    // An empty directory, or the leftovers of an interrupted setup, are fine.
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(empty.join("genesis")).unwrap();
    setup_yes(&empty).assert().success();
}
