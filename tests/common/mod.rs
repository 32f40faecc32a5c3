//! Shared test harness: a scripted model server (OpenAI-compatible or Anthropic) on wiremock that records every
//! request body, plus helpers to set up a home and run the built `automaton` binary against it.
//!
//! The server runs on wiremock's own thread, so tests may block on the binary while it answers.

#![allow(dead_code)] // each test binary uses a different part of the harness

pub mod lab_agent;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

/// The environment variable the test agents read their API key from.
pub const KEY_VAR: &str = "AUTOMATON_TEST_MODEL_KEY";
pub const KEY_VALUE: &str = "sk-test-not-a-real-key";

/// One request the model server received.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub body: Value,
    pub authorization: Option<String>,
    pub api_key_header: Option<String>,
    pub at: Instant,
}

impl Recorded {
    pub fn messages(&self) -> &Vec<Value> {
        self.body["messages"].as_array().expect("messages array")
    }

    /// The system prompt (OpenAI: the first message; Anthropic: the `system` field).
    pub fn system(&self) -> String {
        if let Some(s) = self.body["system"].as_str() {
            return s.to_string();
        }
        let first = &self.messages()[0];
        assert_eq!(
            first["role"], "system",
            "first message is the system prompt"
        );
        first["content"].as_str().expect("system text").to_string()
    }

    /// The last message with role `user`, as text.
    pub fn last_user_text(&self) -> String {
        self.messages()
            .iter()
            .rev()
            .find(|m| m["role"] == "user")
            .and_then(|m| m["content"].as_str())
            .unwrap_or_default()
            .to_string()
    }

    /// Tool results at the end of the conversation (after the last assistant message), in order.
    pub fn trailing_tool_results(&self) -> Vec<(String, String)> {
        let msgs = self.messages();
        let mut out = Vec::new();
        for m in msgs.iter().rev() {
            if m["role"] != "tool" {
                break;
            }
            out.push((
                m["tool_call_id"].as_str().unwrap_or_default().to_string(),
                m["content"].as_str().unwrap_or_default().to_string(),
            ));
        }
        out.reverse();
        out
    }

    pub fn tool_names(&self) -> Vec<String> {
        self.body["tools"]
            .as_array()
            .map(|tools| {
                tools
                    .iter()
                    .map(|t| {
                        t["function"]["name"]
                            .as_str()
                            .or_else(|| t["name"].as_str())
                            .unwrap_or_default()
                            .to_string()
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

type Script = dyn Fn(usize, &Value) -> ResponseTemplate + Send + Sync;

struct Scripted {
    log: Arc<Mutex<Vec<Recorded>>>,
    script: Box<Script>,
}

impl Respond for Scripted {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let body: Value = serde_json::from_slice(&request.body).unwrap_or(Value::Null);
        let header = |name: &str| {
            request
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let index = {
            let mut log = self.log.lock().expect("log");
            log.push(Recorded {
                body: body.clone(),
                authorization: header("authorization"),
                api_key_header: header("x-api-key"),
                at: Instant::now(),
            });
            log.len() - 1
        };
        (self.script)(index, &body)
    }
}

/// A model server whose answers come from a script: `script(n, body)` answers the n-th request (0-based).
pub struct ModelServer {
    server: MockServer,
    log: Arc<Mutex<Vec<Recorded>>>,
}

impl ModelServer {
    async fn start(
        route: &str,
        script: impl Fn(usize, &Value) -> ResponseTemplate + Send + Sync + 'static,
    ) -> ModelServer {
        let server = MockServer::start().await;
        let log = Arc::new(Mutex::new(Vec::new()));
        Mock::given(method("POST"))
            .and(path(route))
            .respond_with(Scripted {
                log: log.clone(),
                script: Box::new(script),
            })
            .mount(&server)
            .await;
        ModelServer { server, log }
    }

    /// An OpenAI-compatible chat-completions endpoint at `{uri}/v1`.
    pub async fn openai(
        script: impl Fn(usize, &Value) -> ResponseTemplate + Send + Sync + 'static,
    ) -> ModelServer {
        ModelServer::start("/v1/chat/completions", script).await
    }

    /// An Anthropic Messages endpoint at `{uri}/v1`.
    pub async fn anthropic(
        script: impl Fn(usize, &Value) -> ResponseTemplate + Send + Sync + 'static,
    ) -> ModelServer {
        ModelServer::start("/v1/messages", script).await
    }

    pub fn base_url(&self) -> String {
        format!("{}/v1", self.server.uri())
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.log.lock().expect("log").clone()
    }
}

static CALL_COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A chat completion as OpenAI sends it.
pub fn completion(message: Value, finish_reason: &str) -> Value {
    json!({
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": 1_700_000_000u32,
        "model": "scripted-test-model",
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
        "usage": {"prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 110}
    })
}

/// An answer that calls the given tools, each with a fresh id.
pub fn tool_calls(calls: &[(&str, Value)]) -> ResponseTemplate {
    let calls: Vec<Value> = calls
        .iter()
        .map(|(name, args)| {
            let n = CALL_COUNTER.fetch_add(1, Ordering::Relaxed);
            json!({
                "id": format!("call_{n}"),
                "type": "function",
                "function": {"name": name, "arguments": args.to_string()}
            })
        })
        .collect();
    ResponseTemplate::new(200).set_body_json(completion(
        json!({"role": "assistant", "content": null, "tool_calls": calls}),
        "tool_calls",
    ))
}

/// An answer that calls one tool.
pub fn tool_call(name: &str, args: Value) -> ResponseTemplate {
    tool_calls(&[(name, args)])
}

/// A text-only answer.
pub fn text(content: &str) -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_json(completion(
        json!({"role": "assistant", "content": content}),
        "stop",
    ))
}

/// An OpenAI-style error.
pub fn error(status: u16, message: &str) -> ResponseTemplate {
    ResponseTemplate::new(status).set_body_json(json!({
        "error": {"message": message, "type": "server_error", "code": null}
    }))
}

/// The ids of the tool calls in a scripted answer (to match against the results the runtime feeds back).
pub fn call_ids_in(response_body: &Value) -> Vec<String> {
    response_body["choices"][0]["message"]["tool_calls"]
        .as_array()
        .map(|calls| {
            calls
                .iter()
                .map(|c| c["id"].as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// A temporary home for one agent.
pub struct TestHome {
    pub dir: tempfile::TempDir,
}

impl TestHome {
    pub fn new() -> TestHome {
        TestHome {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().join("home")
    }

    pub fn home(&self) -> automaton::home::Home {
        automaton::home::Home::at(self.root())
    }

    pub fn workspace(&self) -> PathBuf {
        self.home().workspace_dir()
    }

    /// The built `automaton` with this home, the test API key, and no inherited log filter or config overrides.
    pub fn command(&self) -> std::process::Command {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_automaton"));
        cmd.env("AUTOMATON_HOME", self.root())
            .env(KEY_VAR, KEY_VALUE)
            .env_remove("RUST_LOG");
        for (var, _) in std::env::vars() {
            if var.starts_with("AUTOMATON__") {
                cmd.env_remove(var);
            }
        }
        cmd
    }

    /// `command()` for assertions, killed if it runs for more than two minutes.
    pub fn automaton(&self) -> assert_cmd::Command {
        let mut cmd = assert_cmd::Command::from_std(self.command());
        cmd.timeout(Duration::from_secs(120));
        cmd
    }

    /// `automaton setup --yes` against a model server.
    pub fn setup(&self, model_url: &str, genesis: &str) {
        self.setup_with(model_url, genesis, &[]);
    }

    /// `automaton setup --yes` with extra flags.
    pub fn setup_with(&self, model_url: &str, genesis: &str, extra: &[&str]) {
        self.automaton()
            .args([
                "setup",
                "--yes",
                "--name",
                "tester",
                "--inference-url",
                model_url,
                "--model",
                "scripted-test-model",
                "--api-key-env",
                KEY_VAR,
                "--genesis-prompt",
                genesis,
            ])
            .args(extra)
            .assert()
            .success();
    }

    /// `automaton run --turns N` with extra environment (config overrides), asserting exit 0.
    pub fn run_turns(&self, turns: u32, env: &[(&str, &str)]) -> std::process::Output {
        let mut cmd = self.automaton();
        cmd.args(["run", "--turns", &turns.to_string()]);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let output = cmd.output().expect("run automaton");
        assert!(
            output.status.success(),
            "automaton run failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        output
    }

    pub fn db(&self) -> automaton::state::Db {
        automaton::state::Db::open(&self.home().db_path()).expect("open state db")
    }

    /// `(outcome, input_source)` of every turn, oldest first.
    pub fn turn_outcomes(&self) -> Vec<String> {
        self.db()
            .call_blocking(|c| {
                let mut stmt = c.prepare("SELECT outcome FROM turns ORDER BY rowid")?;
                let rows = stmt.query_map([], |r| r.get(0))?;
                rows.collect()
            })
            .expect("turns")
    }

    /// `(name, arguments, result, is_error)` of every tool call, in order.
    pub fn tool_call_rows(&self) -> Vec<(String, String, String, bool)> {
        self.db()
            .call_blocking(|c| {
                let mut stmt = c.prepare(
                    "SELECT c.name, c.arguments, c.result, c.is_error FROM tool_calls c \
                     JOIN turns t ON t.id = c.turn_id ORDER BY t.rowid, c.seq",
                )?;
                let rows =
                    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?;
                rows.collect()
            })
            .expect("tool calls")
    }
}

impl Default for TestHome {
    fn default() -> Self {
        TestHome::new()
    }
}

/// Polls `check` with backoff until it is true or `limit` passes.
pub fn eventually(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    let mut wait = Duration::from_millis(10);
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

/// Whether a process id is alive (and not a zombie).
pub fn process_alive(pid: i32) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    if status.is_empty() {
        return false;
    }
    !status
        .lines()
        .any(|l| l.starts_with("State:") && l.contains('Z'))
}

pub fn read(path: impl AsRef<Path>) -> String {
    std::fs::read_to_string(path.as_ref())
        .unwrap_or_else(|e| panic!("read {}: {e}", path.as_ref().display()))
}
