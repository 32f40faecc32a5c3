//! The local compute backend: commands run on this machine in their own process group (killed as a whole on
//! timeout or when the agent stops waiting), with an environment scrubbed of secrets, in the agent's workspace.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::{ComputeError, ComputeProvider, ExecOutput, ExecRequest, FileContent};
use crate::config::keys::ConfigKey;

pub const KIND: &str = "local";

const KEYS: &[ConfigKey] = &[
    ConfigKey {
        name: "compute.workdir",
        prompt: "Working directory for the agent's commands (empty: the home's workspace/)",
        default: None,
        secret: false,
    },
    ConfigKey {
        name: "compute.exec_timeout_secs",
        prompt: "Default timeout for one command, in seconds",
        default: Some("60"),
        secret: false,
    },
];

/// The config keys the setup wizard asks for this backend.
pub fn config_keys() -> &'static [ConfigKey] {
    KEYS
}

/// Substrings that mark an environment variable as a secret the agent's commands must not inherit.
const SECRET_MARKERS: &[&str] = &["KEY", "TOKEN", "SECRET", "PASSWORD", "MNEMONIC", "MACAROON"];

/// How long to keep reading a finished command's output while its background children hold the pipes open.
const OUTPUT_GRACE: Duration = Duration::from_millis(200);

/// Whether a variable of this name is kept in the commands' environment.
pub fn is_secret_var(name: &str, extra: &[String]) -> bool {
    let upper = name.to_ascii_uppercase();
    SECRET_MARKERS.iter().any(|m| upper.contains(m)) || extra.iter().any(|e| e == name)
}

/// Runs commands on this machine.
#[derive(Debug)]
pub struct LocalCompute {
    workdir: PathBuf,
    env: Vec<(OsString, OsString)>,
}

impl LocalCompute {
    /// `extra_secret_vars`: variable names to drop besides the ones that look secret (the API key's variable).
    pub fn new(
        workdir: PathBuf,
        extra_secret_vars: &[String],
    ) -> Result<LocalCompute, ComputeError> {
        std::fs::create_dir_all(&workdir).map_err(|e| ComputeError::io("create", &workdir, e))?;
        let env = std::env::vars_os()
            .filter(|(name, _)| !is_secret_var(&name.to_string_lossy(), extra_secret_vars))
            .collect();
        Ok(LocalCompute { workdir, env })
    }

    /// The environment commands get (for tests and `system_synopsis`).
    pub fn environment(&self) -> &[(OsString, OsString)] {
        &self.env
    }
}

/// Kills a whole process group when dropped, unless disarmed: a cancelled turn must not leave a command running.
struct GroupKiller {
    pgid: Option<i32>,
}

impl GroupKiller {
    fn kill(&mut self) {
        if let Some(pgid) = self.pgid.take() {
            // SAFETY: kill(2) with a negative pid signals the process group we created for this command; it has
            // no memory-safety preconditions.
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
        }
    }

    fn disarm(&mut self) {
        self.pgid = None;
    }
}

impl Drop for GroupKiller {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Reads a stream to its end (or until `stop`), keeping the first and the last `cap / 2` bytes: the start of an
/// output says what ran, the end usually says how it failed. Returns the kept text and whether anything was cut.
async fn read_capped<R: AsyncRead + Unpin>(
    mut reader: R,
    cap: usize,
    stop: CancellationToken,
) -> (Vec<u8>, bool) {
    let head_cap = cap / 2;
    let tail_cap = cap - head_cap;
    let mut head = Vec::new();
    let mut tail: VecDeque<u8> = VecDeque::new();
    let mut dropped = 0usize;
    let mut chunk = vec![0u8; 8192];
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            n = reader.read(&mut chunk) => match n {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let mut bytes = &chunk[..n];
                    let to_head = head_cap.saturating_sub(head.len()).min(bytes.len());
                    head.extend_from_slice(&bytes[..to_head]);
                    bytes = &bytes[to_head..];
                    tail.extend(bytes);
                    if tail.len() > tail_cap {
                        let excess = tail.len() - tail_cap;
                        tail.drain(..excess);
                        dropped += excess;
                    }
                }
            },
        }
    }
    if dropped > 0 {
        head.extend_from_slice(format!("\n[… {dropped} bytes cut …]\n").as_bytes());
    }
    head.extend(tail);
    (head, dropped > 0)
}

#[async_trait]
impl ComputeProvider for LocalCompute {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn workdir(&self) -> &Path {
        &self.workdir
    }

    fn shares_agent_filesystem(&self) -> bool {
        true
    }

    async fn exec(&self, request: ExecRequest) -> Result<ExecOutput, ComputeError> {
        let started = Instant::now();
        let mut command = tokio::process::Command::new("/bin/sh");
        command
            .arg("-c")
            .arg(&request.command)
            .current_dir(&self.workdir)
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own group, so a timeout kills the shell and everything it started.
            .process_group(0)
            .kill_on_drop(true);
        let mut child = command.spawn().map_err(ComputeError::Spawn)?;
        let mut killer = GroupKiller {
            pgid: child.id().and_then(|id| i32::try_from(id).ok()),
        };
        let stop = CancellationToken::new();
        let stdout = child
            .stdout
            .take()
            .map(|r| tokio::spawn(read_capped(r, request.output_cap, stop.clone())));
        let stderr = child
            .stderr
            .take()
            .map(|r| tokio::spawn(read_capped(r, request.output_cap, stop.clone())));

        let (status, timed_out) = match tokio::time::timeout(request.timeout, child.wait()).await {
            Ok(status) => (status.map_err(ComputeError::Spawn)?, false),
            Err(_) => {
                killer.kill();
                (child.wait().await.map_err(ComputeError::Spawn)?, true)
            }
        };
        // The command is done; background jobs it started on purpose (`server &`) may live on.
        killer.disarm();

        let collect = async {
            let out = match stdout {
                Some(h) => h.await.unwrap_or_default(),
                None => Default::default(),
            };
            let err = match stderr {
                Some(h) => h.await.unwrap_or_default(),
                None => Default::default(),
            };
            (out, err)
        };
        tokio::pin!(collect);
        let ((out, out_cut), (err, err_cut)) =
            match tokio::time::timeout(OUTPUT_GRACE, &mut collect).await {
                Ok(v) => v,
                Err(_) => {
                    stop.cancel();
                    collect.await
                }
            };
        Ok(ExecOutput {
            exit_code: status.code(),
            signal: status.signal(),
            stdout: String::from_utf8_lossy(&out).into_owned(),
            stderr: String::from_utf8_lossy(&err).into_owned(),
            stdout_truncated: out_cut,
            stderr_truncated: err_cut,
            timed_out,
            duration: started.elapsed(),
        })
    }

    async fn read_file(&self, path: &Path, max_bytes: usize) -> Result<FileContent, ComputeError> {
        let file = tokio::fs::File::open(path)
            .await
            .map_err(|e| ComputeError::io("open", path, e))?;
        let meta = file
            .metadata()
            .await
            .map_err(|e| ComputeError::io("stat", path, e))?;
        if meta.is_dir() {
            return Err(ComputeError::IsDirectory {
                path: path.to_path_buf(),
            });
        }
        let mut bytes = Vec::new();
        file.take(max_bytes as u64)
            .read_to_end(&mut bytes)
            .await
            .map_err(|e| ComputeError::io("read", path, e))?;
        Ok(FileContent {
            bytes,
            size: meta.len(),
        })
    }

    async fn write_file(&self, path: &Path, content: &[u8]) -> Result<(), ComputeError> {
        if let Some(parent) = path.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|e| ComputeError::io("create directory", parent, e))?;
        }
        // O_NOFOLLOW: the registry resolved the path; a symlink swapped in since then is refused, not followed.
        let mut file = tokio::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .await
            .map_err(|e| {
                if e.raw_os_error() == Some(libc::ELOOP) {
                    ComputeError::PermissionDenied {
                        path: path.to_path_buf(),
                    }
                } else {
                    ComputeError::io("open", path, e)
                }
            })?;
        file.write_all(content)
            .await
            .map_err(|e| ComputeError::io("write", path, e))?;
        file.flush()
            .await
            .map_err(|e| ComputeError::io("write", path, e))?;
        Ok(())
    }

    async fn expose_port(&self, port: u16) -> Result<String, ComputeError> {
        // Local ports are already reachable on loopback; say so only if something is actually listening.
        match tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
            Ok(_) => Ok(format!("http://127.0.0.1:{port}")),
            Err(_) => Err(ComputeError::PortClosed(port)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    crate::compute::compute_conformance!(|dir: &Path| {
        LocalCompute::new(dir.to_path_buf(), &[]).expect("local compute")
    });

    #[test]
    fn secret_names() {
        for name in [
            "OPENAI_API_KEY",
            "github_token",
            "DB_PASSWORD",
            "LND_MACAROON",
            "WALLET_MNEMONIC",
            "X_SECRET",
        ] {
            assert!(is_secret_var(name, &[]), "{name}");
        }
        assert!(is_secret_var(
            "MY_MODEL_CREDS",
            &["MY_MODEL_CREDS".to_string()]
        ));
        assert!(!is_secret_var("PATH", &[]));
        assert!(!is_secret_var("HOME", &[]));
    }

    #[test]
    fn the_environment_is_scrubbed_at_construction() {
        let dir = tempfile::tempdir().expect("tmp");
        let c =
            LocalCompute::new(dir.path().to_path_buf(), &["PATH".to_string()]).expect("compute");
        let names: Vec<String> = c
            .environment()
            .iter()
            .map(|(k, _)| k.to_string_lossy().into_owned())
            .collect();
        assert!(
            !names.iter().any(|n| n == "PATH"),
            "the configured key variable is dropped"
        );
        assert!(!names.iter().any(|n| is_secret_var(n, &[])));
    }

    #[tokio::test]
    async fn writes_do_not_follow_a_symlink_at_the_target() {
        let dir = tempfile::tempdir().expect("tmp");
        let c = LocalCompute::new(dir.path().to_path_buf(), &[]).expect("compute");
        let target = dir.path().join("target");
        std::fs::write(&target, "keep").expect("write");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&target, &link).expect("symlink");
        assert!(matches!(
            c.write_file(&link, b"changed").await,
            Err(ComputeError::PermissionDenied { .. })
        ));
        assert_eq!(std::fs::read_to_string(&target).expect("read"), "keep");
    }

    #[tokio::test]
    async fn exposing_a_port_needs_a_listener() {
        let dir = tempfile::tempdir().expect("tmp");
        let c = LocalCompute::new(dir.path().to_path_buf(), &[]).expect("compute");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        assert_eq!(
            c.expose_port(port).await.expect("url"),
            format!("http://127.0.0.1:{port}")
        );
        drop(listener);
        assert!(matches!(c.expose_port(port).await, Err(ComputeError::PortClosed(p)) if p == port));
    }
}
