//! The control socket: how every command other than `run` talks to the running agent. A Unix socket in the home
//! (`control.sock`, mode 0600), one JSON object per line each way:
//! `{"method": "...", "params": {...}}` → `{"ok": true, "result": …}` or `{"ok": false, "error": "...", "code": 1|2|3}`.
//!
//! `automaton run` serves it (it holds the agent lock, so it alone owns the node); the methods live in one match in
//! `methods.rs`. A socket path longer than a Unix socket allows (over 100 bytes) moves to a private directory
//! under the runtime dir, and the home records where (`control.sock.path`).

pub mod methods;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::home::{AgentLock, Home};
pub use methods::ControlContext;

/// Longest socket path used as is; `sun_path` holds 108 bytes on Linux, 104 on macOS.
const MAX_SOCKET_PATH: usize = 100;
/// How long `connect` looks for an agent that may just be starting before saying none runs.
const NO_AGENT_GRACE: Duration = Duration::from_millis(1500);
/// Longest request line accepted (an invoice is a few hundred bytes; a receipt a few KB).
const MAX_LINE: usize = 1 << 20;

/// A request on the socket.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Request {
    pub method: String,
    #[serde(default)]
    pub params: Value,
}

/// A failed request, with the process exit code the CLI should use (CONVENTIONS.md: 1 error, 2 refused by policy,
/// 3 a payment was attempted and failed).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ControlError {
    pub code: u8,
    pub message: String,
    /// A machine-readable name (`not_ready`, `over_hourly`, …) when there is one.
    pub kind: Option<String>,
}

impl ControlError {
    pub fn new(code: u8, message: impl Into<String>) -> ControlError {
        ControlError {
            code,
            message: message.into(),
            kind: None,
        }
    }

    pub fn with_kind(mut self, kind: &str) -> ControlError {
        self.kind = Some(kind.to_string());
        self
    }

    pub fn bad_request(message: impl Into<String>) -> ControlError {
        ControlError::new(1, message).with_kind("bad_request")
    }
}

impl From<crate::wallet::WalletError> for ControlError {
    fn from(e: crate::wallet::WalletError) -> Self {
        ControlError::new(e.exit_code(), e.to_string()).with_kind(e.kind())
    }
}

impl From<crate::money::MoneyError> for ControlError {
    fn from(e: crate::money::MoneyError) -> Self {
        ControlError::new(1, e.to_string())
    }
}

impl From<crate::money::BudgetError> for ControlError {
    fn from(e: crate::money::BudgetError) -> Self {
        ControlError::new(e.exit_code(), e.to_string()).with_kind(e.kind())
    }
}

impl From<crate::state::StateError> for ControlError {
    fn from(e: crate::state::StateError) -> Self {
        ControlError::new(1, e.to_string())
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Response {
    ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    result: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    code: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kind: Option<String>,
}

/// The file in the home that records a relocated socket path.
fn record_path(home: &Home) -> PathBuf {
    home.root().join("control.sock.path")
}

/// Where the socket lives: `control.sock` in the home, or, when that path is too long for a Unix socket, a
/// name derived from the home in a private runtime directory.
pub fn socket_path(home: &Home) -> PathBuf {
    let direct = home.root().join("control.sock");
    if direct.as_os_str().len() <= MAX_SOCKET_PATH {
        return direct;
    }
    let digest = Sha256::digest(home.root().as_os_str().as_encoded_bytes());
    let name = format!("automaton-{}.sock", &hex::encode(digest)[..16]);
    short_socket_dir().join(name)
}

fn short_socket_dir() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(format!(
            "/tmp/automaton-{}",
            rustix::process::getuid().as_raw()
        )),
    }
}

/// Makes the relocated socket's directory private (a shared /tmp must not let others place a socket there).
fn prepare_dir(path: &Path) -> std::io::Result<()> {
    let Some(dir) = path.parent() else {
        return Ok(());
    };
    if dir.exists() {
        let meta = std::fs::symlink_metadata(dir)?;
        use std::os::unix::fs::MetadataExt;
        if meta.file_type().is_symlink() || meta.uid() != rustix::process::getuid().as_raw() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!("{} is not a directory owned by this user", dir.display()),
            ));
        }
        return Ok(());
    }
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Serves the socket until `cancel`. The caller holds the agent lock, so a socket file left by a crashed run is
/// stale and replaced.
pub async fn serve(
    home: &Home,
    ctx: Arc<ControlContext>,
    cancel: CancellationToken,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let path = socket_path(home);
    prepare_dir(&path)?;
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = tokio::net::UnixListener::bind(&path)?;
    // The home (or the private runtime dir) is 0700 already; the socket itself is owner-only too.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    if path.parent() != Some(home.root()) {
        crate::config::write_atomic(&record_path(home), path.to_string_lossy().as_bytes(), 0o600)?;
    }
    tracing::info!(socket = %path.display(), "control socket listening");
    let task = tokio::spawn(async move {
        let mut connections = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let ctx = Arc::clone(&ctx);
                        let cancel = cancel.clone();
                        connections.spawn(async move { connection(stream, ctx, cancel).await });
                    }
                    Err(error) => {
                        tracing::warn!(%error, "control socket accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
        connections.abort_all();
        let _ = std::fs::remove_file(&path);
    });
    Ok(task)
}

async fn connection(
    stream: tokio::net::UnixStream,
    ctx: Arc<ControlContext>,
    cancel: CancellationToken,
) {
    let (read, mut write) = stream.into_split();
    let mut lines = tokio::io::BufReader::new(read);
    let mut line = String::new();
    loop {
        line.clear();
        let mut limited = (&mut lines).take(MAX_LINE as u64 + 1);
        let read = tokio::select! {
            _ = cancel.cancelled() => return,
            read = limited.read_line(&mut line) => read,
        };
        match read {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let response = if line.len() > MAX_LINE {
            failure(ControlError::bad_request("request line too long"))
        } else if line.trim().is_empty() {
            continue;
        } else {
            match serde_json::from_str::<Request>(&line) {
                Ok(request) => {
                    let method = request.method.clone();
                    let outcome = tokio::select! {
                        _ = cancel.cancelled() => Err(ControlError::new(1, "the agent is stopping")),
                        outcome = methods::dispatch(&ctx, request) => outcome,
                    };
                    if let Err(e) = &outcome {
                        tracing::info!(%method, code = e.code, error = %e.message, "control request failed");
                    }
                    match outcome {
                        Ok(result) => Response {
                            ok: true,
                            result: Some(result),
                            error: None,
                            code: None,
                            kind: None,
                        },
                        Err(e) => failure(e),
                    }
                }
                Err(e) => failure(ControlError::bad_request(format!(
                    "not a request (expected {{\"method\": …, \"params\": …}}): {e}"
                ))),
            }
        };
        let mut text = serde_json::to_string(&response).unwrap_or_else(|_| {
            r#"{"ok":false,"error":"cannot encode the answer","code":1}"#.to_string()
        });
        text.push('\n');
        if write.write_all(text.as_bytes()).await.is_err() {
            return;
        }
    }
}

fn failure(e: ControlError) -> Response {
    Response {
        ok: false,
        result: None,
        error: Some(e.message),
        code: Some(e.code),
        kind: e.kind,
    }
}

/// A connection to the running agent (blocking: CLI commands have no async runtime).
pub struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// When the caller's patience (the `wait` given to `connect`) runs out; requests tell the agent how long it
    /// may wait for the node.
    deadline: Instant,
}

impl Client {
    /// Connects to the agent of `home`, waiting up to `wait` for `automaton run` to open its socket. Fails at once
    /// when no agent runs there.
    pub fn connect(home: &Home, wait: Duration) -> Result<Client, ControlError> {
        let started = Instant::now();
        let deadline = started + wait;
        let mut pause = Duration::from_millis(20);
        loop {
            let path = recorded_socket_path(home);
            match UnixStream::connect(&path) {
                Ok(stream) => {
                    let writer = stream
                        .try_clone()
                        .map_err(|e| ControlError::new(1, format!("control socket: {e}")))?;
                    return Ok(Client {
                        reader: BufReader::new(stream),
                        writer,
                        deadline,
                    });
                }
                Err(error) => {
                    let running = AgentLock::holder(home).ok().flatten().is_some();
                    // An agent started a moment ago may not hold its lock yet: a short grace before "none".
                    if !running && started.elapsed() >= NO_AGENT_GRACE {
                        return Err(ControlError::new(
                            1,
                            format!(
                                "no agent is running in {} (start it with `automaton --home {} run`)",
                                home.root().display(),
                                home.root().display()
                            ),
                        )
                        .with_kind("not_running"));
                    }
                    if Instant::now() >= deadline {
                        return Err(ControlError::new(
                            1,
                            format!(
                                "the agent in {} is running but its control socket {} did not answer within {} s: {error}",
                                home.root().display(),
                                path.display(),
                                wait.as_secs()
                            ),
                        )
                        .with_kind("not_ready"));
                    }
                }
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(500));
        }
    }

    /// Sends one request and waits for its answer. `params.wait_secs` (how long the agent may wait for its node)
    /// is filled from what is left of the connect wait, unless given.
    pub fn request(&mut self, method: &str, params: Value) -> Result<Value, ControlError> {
        let mut params = match params {
            Value::Null => Value::Object(Default::default()),
            other => other,
        };
        if let Value::Object(map) = &mut params {
            let left = self.deadline.saturating_duration_since(Instant::now());
            map.entry("wait_secs")
                .or_insert(Value::from(left.as_secs().max(1)));
        }
        let request = Request {
            method: method.to_string(),
            params,
        };
        let mut line = serde_json::to_string(&request)
            .map_err(|e| ControlError::new(1, format!("cannot encode the request: {e}")))?;
        line.push('\n');
        let io = |e: std::io::Error| {
            ControlError::new(1, format!("lost the connection to the agent: {e}"))
        };
        self.writer.write_all(line.as_bytes()).map_err(io)?;
        let mut answer = String::new();
        let n = self.reader.read_line(&mut answer).map_err(io)?;
        if n == 0 {
            return Err(ControlError::new(
                1,
                "the agent closed the connection (it may be stopping)",
            ));
        }
        let response: Response = serde_json::from_str(&answer)
            .map_err(|e| ControlError::new(1, format!("unreadable answer from the agent: {e}")))?;
        if response.ok {
            Ok(response.result.unwrap_or(Value::Null))
        } else {
            Err(ControlError {
                code: response.code.unwrap_or(1),
                message: response
                    .error
                    .unwrap_or_else(|| "the agent refused the request".into()),
                kind: response.kind,
            })
        }
    }
}

/// The socket path, preferring what the running agent recorded.
fn recorded_socket_path(home: &Home) -> PathBuf {
    let computed = socket_path(home);
    if computed.parent() == Some(home.root()) {
        return computed;
    }
    std::fs::read_to_string(record_path(home))
        .ok()
        .map(|s| PathBuf::from(s.trim()))
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(computed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_homes_get_a_short_private_socket() {
        let short = Home::at("/tmp/agent");
        assert_eq!(
            socket_path(&short),
            PathBuf::from("/tmp/agent/control.sock")
        );
        let long = Home::at(format!("/tmp/{}", "x".repeat(120)));
        let path = socket_path(&long);
        assert!(
            path.as_os_str().len() <= MAX_SOCKET_PATH,
            "{}",
            path.display()
        );
        assert_eq!(socket_path(&long), path, "deterministic");
        assert_ne!(
            socket_path(&Home::at(format!("/tmp/{}", "y".repeat(120)))),
            path
        );
    }
}
