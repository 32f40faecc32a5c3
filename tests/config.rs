//! Config layers through the binary: broken files, env and flag overrides, and how secrets are read.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use assert_cmd::Command;
use predicates::prelude::*;

fn automaton(home: &Path) -> Command {
    let mut cmd = Command::cargo_bin("automaton").unwrap();
    cmd.arg("--home").arg(home);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("AUTOMATON") {
            cmd.env_remove(key);
        }
    }
    cmd.env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env_remove("TEST_AUTOMATON_KEY")
        .timeout(Duration::from_secs(60));
    cmd
}

/// A set-up home whose config names the key variable `TEST_AUTOMATON_KEY`.
fn set_up(dir: &Path) -> std::path::PathBuf {
    let home = dir.join("agent");
    automaton(&home)
        .args([
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
        ])
        .assert()
        .success();
    home
}

fn status_json(cmd: &mut Command) -> serde_json::Value {
    let out = cmd.args(["status", "--json"]).assert().success();
    serde_json::from_slice(&out.get_output().stdout)
        .expect("status --json prints one JSON document")
}

/// Rewrites `automaton.yaml` by replacing `from` with `to`; returns the 1-based line where `to` starts.
fn break_config(home: &Path, from: &str, to: &str) -> (String, usize) {
    let path = home.join("automaton.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let at = text
        .find(from)
        .unwrap_or_else(|| panic!("{from:?} not in {text}"));
    let broken = text.replacen(from, to, 1);
    std::fs::write(&path, &broken).unwrap();
    let line =
        text[..at].lines().count() + 1 + to.lines().take_while(|l| !l.contains("#BAD")).count();
    (broken, line)
}

#[test]
fn unknown_key_names_file_line_and_key_and_nothing_is_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let home = set_up(dir.path());
    let path = home.join("automaton.yaml");
    let (broken, line) = break_config(
        &home,
        "  model: test-model\n",
        "  model: test-model\n  modle: typo #BAD\n",
    );
    let location = format!("{}:{line}", path.display());

    for args in [
        vec!["status"],
        vec!["status", "--json"],
        vec!["run", "--turns", "1"],
        vec!["setup", "--yes", "--reconfigure", "--model", "other"],
    ] {
        automaton(&home)
            .args(&args)
            .assert()
            .code(1)
            .stdout(predicate::str::is_empty())
            .stderr(predicate::str::contains(location.as_str()))
            .stderr(predicate::str::contains("inference.modle"));
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            broken,
            "{args:?} touched the file"
        );
    }
    // `run` gave up before starting: no turn was recorded.
    let db = automaton::state::Db::open(&home.join("state.db")).unwrap();
    let turns: i64 = db
        .call_blocking(|c| c.query_row("SELECT count(*) FROM turns", [], |r| r.get(0)))
        .unwrap();
    assert_eq!(turns, 0);
}

#[test]
fn wrong_type_and_bad_syntax_name_their_line() {
    let dir = tempfile::tempdir().unwrap();
    let home = set_up(dir.path());
    let path = home.join("automaton.yaml");
    let original = std::fs::read_to_string(&path).unwrap();

    let (_, line) = break_config(&home, "  max_tokens: 4096\n", "  max_tokens: lots #BAD\n");
    automaton(&home)
        .arg("status")
        .assert()
        .code(1)
        .stderr(predicate::str::contains(format!(
            "{}:{line}",
            path.display()
        )))
        .stderr(predicate::str::contains("inference.max_tokens"));

    std::fs::write(&path, &original).unwrap();
    let (_, line) = break_config(&home, "  model: test-model\n", "  model: [unclosed #BAD\n");
    automaton(&home)
        .arg("status")
        .assert()
        .code(1)
        .stderr(predicate::str::contains(format!("{}:", path.display())))
        .stderr(
            predicate::str::contains(format!(":{line}"))
                .or(predicate::str::contains(format!(":{}", line + 1))),
        );

    std::fs::write(&path, &original).unwrap();
    break_config(&home, "name: ada\n", "name: ''\n");
    automaton(&home)
        .arg("status")
        .assert()
        .code(1)
        .stderr(predicate::str::contains("`name`"));
}

#[test]
fn env_overrides_the_file_and_flags_override_env() {
    let dir = tempfile::tempdir().unwrap();
    let home = set_up(dir.path());

    let report = status_json(automaton(&home).env("AUTOMATON__INFERENCE__MODEL", "env-model"));
    assert_eq!(report["inference"]["model"], "env-model");

    let report = status_json(
        automaton(&home)
            .env("AUTOMATON__INFERENCE__MODEL", "env-model")
            .env("AUTOMATON__LIMITS__RESERVE_SATS", "2500")
            .args(["-c", "inference.model=flag-model"]),
    );
    assert_eq!(report["inference"]["model"], "flag-model");
    assert_eq!(report["limits"]["reserve_sats"], 2500);

    // The file itself is untouched by overrides.
    let text = std::fs::read_to_string(home.join("automaton.yaml")).unwrap();
    assert!(text.contains("model: test-model"));

    automaton(&home)
        .env("AUTOMATON__INFERENCE__MODLE", "x")
        .arg("status")
        .assert()
        .code(1)
        .stderr(predicate::str::contains("AUTOMATON__INFERENCE__MODLE"))
        .stderr(predicate::str::contains("inference.modle"));
    automaton(&home)
        .env("AUTOMATON__LIMITS__DAILY_SATS", "plenty")
        .arg("status")
        .assert()
        .code(1)
        .stderr(predicate::str::contains("AUTOMATON__LIMITS__DAILY_SATS"))
        .stderr(predicate::str::contains("limits.daily_sats"));
    automaton(&home)
        .args(["-c", "agent.nonsense=1", "status"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("agent.nonsense"));
}

#[test]
fn api_key_from_env_is_used_but_never_printed() {
    let dir = tempfile::tempdir().unwrap();
    let home = set_up(dir.path());
    let secret = "sk-test-0123456789-do-not-print";

    let report = status_json(automaton(&home).env("TEST_AUTOMATON_KEY", secret));
    assert_eq!(report["inference"]["api_key"], "set");
    assert_eq!(
        report["inference"]["api_key_source"],
        "env:TEST_AUTOMATON_KEY"
    );
    automaton(&home)
        .env("TEST_AUTOMATON_KEY", secret)
        .arg("status")
        .assert()
        .success()
        .stdout(predicate::str::contains(secret).not())
        .stderr(predicate::str::contains(secret).not());

    let report = status_json(&mut automaton(&home));
    assert_eq!(report["inference"]["api_key"], "unavailable");
    assert!(report["inference"]["api_key_error"]
        .as_str()
        .unwrap()
        .contains("TEST_AUTOMATON_KEY"));
    // `run` refuses at once rather than failing every turn.
    automaton(&home)
        .args(["run", "--turns", "1"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("TEST_AUTOMATON_KEY"));
}

#[test]
fn key_file_must_be_0600() {
    let dir = tempfile::tempdir().unwrap();
    let home = set_up(dir.path());
    let secret = "sk-file-secret-do-not-print";
    let key = home.join("inference.key");
    std::fs::write(&key, format!("{secret}\n")).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    // Relative to the home, and the env var unset so the file is what counts.
    let flags = [
        "-c",
        "inference.api_key_env=",
        "-c",
        "inference.api_key_file=inference.key",
    ];

    let report = status_json(automaton(&home).args(flags));
    assert_eq!(report["inference"]["api_key"], "unavailable");
    let error = report["inference"]["api_key_error"].as_str().unwrap();
    assert!(
        error.contains("644") && error.contains("chmod 600"),
        "{error}"
    );

    let run = automaton(&home)
        .args(flags)
        .args(["run", "--turns", "1"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("chmod 600"));
    let output = run.get_output();
    assert!(!String::from_utf8_lossy(&output.stderr).contains(secret));
    assert!(!String::from_utf8_lossy(&output.stdout).contains(secret));

    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let report = status_json(automaton(&home).args(flags));
    assert_eq!(report["inference"]["api_key"], "set");
    assert_eq!(
        report["inference"]["api_key_source"],
        format!("file:{}", key.display()).as_str()
    );
    assert!(!report.to_string().contains(secret));
}
