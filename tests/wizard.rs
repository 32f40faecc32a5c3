//! The interactive setup wizard, driven through a real pseudo-terminal the way a person would answer it.

use std::path::Path;
use std::time::Duration;

use expectrl::{Eof, Session};

const ENTER: &str = "\r";
const DOWN: &str = "\x1b[B";

fn wizard(home: &Path, extra: &[&str]) -> Session {
    let mut cmd = std::process::Command::new(assert_cmd::cargo::cargo_bin("automaton"));
    cmd.arg("--home").arg(home).arg("setup").args(extra);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("AUTOMATON") {
            cmd.env_remove(key);
        }
    }
    cmd.env("TERM", "xterm-256color")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env_remove("WIZ_KEY")
        .env_remove("OPENAI_API_KEY");
    let mut session = Session::spawn(cmd).expect("spawn in a pty");
    session.set_expect_timeout(Some(Duration::from_secs(30)));
    session
}

/// Waits for `prompt`, then types `answer` and Enter.
fn answer(session: &mut Session, prompt: &str, answer: &str) {
    session
        .expect(prompt)
        .unwrap_or_else(|e| panic!("waiting for {prompt:?}: {e}"));
    session.send(answer).unwrap();
    session.send(ENTER).unwrap();
}

fn exit_code(session: &mut Session) -> String {
    session.expect(Eof).expect("the wizard exits");
    format!("{:?}", session.get_process().wait().unwrap())
}

fn yaml(path: &Path) -> serde_json::Value {
    automaton::config::yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn wizard_answers_every_prompt_and_writes_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("agent");
    let node_id = format!("02{}", "1f".repeat(32));
    let mut s = wizard(&home, &[]);

    answer(&mut s, "Agent name", "ada-wizard");
    answer(
        &mut s,
        "Genesis prompt",
        "Write poems and sell them for sats.",
    );
    answer(&mut s, "Your name", "Grace");
    // A malformed identity is refused in place and asked again.
    answer(&mut s, "npub or Lightning node id", "not-a-key");
    s.expect("expected npub1").unwrap();
    for _ in 0.."not-a-key".len() {
        s.send("\x7f").unwrap();
    }
    s.send(&node_id).unwrap();
    s.send(ENTER).unwrap();

    // Inference backend: the first entry (OpenAI-compatible); then the keys it declares.
    answer(&mut s, "Inference backend", "");
    answer(&mut s, "endpoint", "nope");
    s.expect("not a URL").unwrap();
    for _ in 0.."nope".len() {
        s.send("\x7f").unwrap();
    }
    s.send("http://127.0.0.1:9/v1").unwrap();
    s.send(ENTER).unwrap();
    answer(&mut s, "Model", "wizard-model");
    answer(&mut s, "API key", "WIZ_KEY");
    s.expect("WIZ_KEY is not set").unwrap();

    answer(&mut s, "Compute", "");
    answer(&mut s, "Working directory", "");
    answer(&mut s, "timeout", "90");

    answer(&mut s, "Largest single payment", "5000");
    answer(&mut s, "Most spent in any hour", "");
    answer(&mut s, "Most spent in any day", "");
    answer(&mut s, "Reserve", "2000");

    s.expect("ada-wizard").unwrap();
    s.expect("Write this agent to").unwrap();
    s.send("y").unwrap();
    s.expect("Set up ada-wizard").unwrap();
    let code = exit_code(&mut s);
    assert!(code.ends_with(", 0)"), "{code}");

    let config = yaml(&home.join("automaton.yaml"));
    assert_eq!(config["name"], "ada-wizard");
    assert_eq!(config["creator"]["name"], "Grace");
    assert_eq!(config["creator"]["node_id"], node_id.as_str());
    assert_eq!(config["inference"]["provider"], "openai");
    assert_eq!(config["inference"]["base_url"], "http://127.0.0.1:9/v1");
    assert_eq!(config["inference"]["model"], "wizard-model");
    assert_eq!(config["inference"]["api_key_env"], "WIZ_KEY");
    assert_eq!(config["compute"]["provider"], "local");
    assert_eq!(config["compute"]["exec_timeout_secs"], 90);
    assert!(config["compute"].get("workdir").is_none());
    assert_eq!(config["limits"]["per_payment_sats"], 5000);
    assert_eq!(config["limits"]["hourly_sats"], 25_000);
    assert_eq!(config["limits"]["reserve_sats"], 2000);
    assert_eq!(
        std::fs::read_to_string(home.join("genesis/prompt.md")).unwrap(),
        "Write poems and sell them for sats.\n"
    );
    assert!(home.join("genesis/constitution.md").exists());
    assert!(home.join("skills/money-and-survival/SKILL.md").exists());
}

#[test]
fn reconfigure_offers_current_values_and_switching_backend_offers_its_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("agent");
    let status = std::process::Command::new(assert_cmd::cargo::cargo_bin("automaton"))
        .arg("--home")
        .arg(&home)
        .args([
            "setup",
            "--yes",
            "--name",
            "keeper",
            "--inference-url",
            "http://127.0.0.1:9/v1",
            "--model",
            "old-model",
            "--genesis-prompt",
            "Keep this purpose.",
        ])
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .output()
        .unwrap();
    assert!(status.status.success(), "{status:?}");

    let mut s = wizard(&home, &["--reconfigure"]);
    answer(&mut s, "Agent name", ""); // keeps "keeper"
    s.expect("genesis prompt is kept").unwrap();
    answer(&mut s, "Your name", "");
    answer(&mut s, "npub or Lightning node id", "");
    // Switch to the second backend (Anthropic): its own endpoint and model become the defaults.
    answer(&mut s, "Inference backend", DOWN);
    answer(&mut s, "endpoint", "");
    answer(&mut s, "Model", "");
    // The Anthropic default key variable is offered; "-" clears it.
    answer(&mut s, "API key", "-");
    answer(&mut s, "Compute", "");
    answer(&mut s, "Working directory", "");
    answer(&mut s, "timeout", "");
    for prompt in [
        "Largest single payment",
        "Most spent in any hour",
        "Most spent in any day",
        "Reserve",
    ] {
        answer(&mut s, prompt, "");
    }
    s.expect("Write this agent to").unwrap();
    s.send("y").unwrap();
    s.expect("Reconfigured keeper").unwrap();
    let code = exit_code(&mut s);
    assert!(code.ends_with(", 0)"), "{code}");

    let config = yaml(&home.join("automaton.yaml"));
    assert_eq!(config["name"], "keeper");
    assert_eq!(config["inference"]["provider"], "anthropic");
    let anthropic = automaton::inference::backends()
        .into_iter()
        .find(|b| b.kind == "anthropic")
        .unwrap();
    assert_eq!(config["inference"]["base_url"], anthropic.default_base_url);
    assert_eq!(config["inference"]["model"], anthropic.default_model);
    assert!(config["inference"].get("api_key_env").is_none());
    assert_eq!(
        std::fs::read_to_string(home.join("genesis/prompt.md")).unwrap(),
        "Keep this purpose.\n"
    );
}

#[test]
fn declining_at_the_end_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("agent");
    let mut s = wizard(&home, &[]);
    answer(&mut s, "Agent name", "undecided");
    answer(&mut s, "Genesis prompt", "");
    answer(&mut s, "Your name", "");
    answer(&mut s, "npub or Lightning node id", "");
    answer(&mut s, "Inference backend", "");
    answer(&mut s, "endpoint", "http://127.0.0.1:9/v1");
    answer(&mut s, "Model", "");
    // A model server on this machine: no key is offered by default.
    s.expect("API key").unwrap();
    s.expect("(empty for none)").unwrap();
    s.send(ENTER).unwrap();
    answer(&mut s, "Compute", "");
    answer(&mut s, "Working directory", "");
    answer(&mut s, "timeout", "");
    for prompt in [
        "Largest single payment",
        "Most spent in any hour",
        "Most spent in any day",
        "Reserve",
    ] {
        answer(&mut s, prompt, "");
    }
    s.expect("no API key").unwrap();
    s.expect("Write this agent to").unwrap();
    s.send("n").unwrap();
    s.expect("nothing was written").unwrap();
    let code = exit_code(&mut s);
    assert!(code.ends_with(", 1)"), "{code}");
    assert!(!home.join("automaton.yaml").exists());
}

#[test]
fn ctrl_c_cancels_without_writing() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("agent");
    let mut s = wizard(&home, &[]);
    answer(&mut s, "Agent name", "quitter");
    s.expect("Genesis prompt").unwrap();
    s.send("\x03").unwrap();
    s.expect("setup cancelled; nothing was written").unwrap();
    let code = exit_code(&mut s);
    assert!(!code.ends_with(", 0)"), "{code}");
    assert!(!home.join("automaton.yaml").exists());
}
