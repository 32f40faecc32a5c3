//! Compute: where the agent's commands run and its files live. The `ComputeProvider` trait and its backends
//! (`local.rs` now; ssh, LNVPS and Conway in later issues).
//!
//! Providers do not decide what is allowed: the tool registry checks policy and protected paths before calling
//! them, and hands them absolute paths.

pub mod local;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::config::keys::ConfigKey;
use crate::config::Config;
use crate::home::Home;

/// One command to run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExecRequest {
    /// A shell command line (`sh -c`).
    pub command: String,
    pub timeout: Duration,
    /// Bytes kept from each of stdout and stderr (half from the start, half from the end); the middle is drained
    /// and dropped.
    pub output_cap: usize,
}

/// What a command did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExecOutput {
    /// The exit code, when the command exited on its own.
    pub exit_code: Option<i32>,
    /// The signal that ended it, if any (e.g. 9 after a timeout).
    pub signal: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    pub timed_out: bool,
    pub duration: Duration,
}

/// The head of a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileContent {
    pub bytes: Vec<u8>,
    /// The file's full size; larger than `bytes.len()` when it was cut.
    pub size: u64,
}

/// Failures of a compute backend. All of them are reported to the model as the tool's result: a missing file or
/// an unspawnable shell is something the agent can reason about.
#[derive(Debug, thiserror::Error)]
pub enum ComputeError {
    #[error("{path}: no such file or directory")]
    NotFound { path: PathBuf },
    #[error("{path}: permission denied")]
    PermissionDenied { path: PathBuf },
    #[error("{path} is a directory (use exec with `ls` to list it)")]
    IsDirectory { path: PathBuf },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("could not start the command: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("the {provider} compute provider does not support {what}")]
    Unsupported {
        provider: &'static str,
        what: &'static str,
    },
    #[error("nothing is listening on port {0}")]
    PortClosed(u16),
    #[error("unknown compute provider {0:?} (known: local)")]
    UnknownProvider(String),
}

impl ComputeError {
    /// Maps an I/O error on `path` to the variant the model understands best.
    pub fn io(op: &'static str, path: &Path, source: std::io::Error) -> ComputeError {
        match source.kind() {
            std::io::ErrorKind::NotFound => ComputeError::NotFound {
                path: path.to_path_buf(),
            },
            std::io::ErrorKind::PermissionDenied => ComputeError::PermissionDenied {
                path: path.to_path_buf(),
            },
            _ if source.raw_os_error() == Some(libc::EISDIR) => ComputeError::IsDirectory {
                path: path.to_path_buf(),
            },
            _ => ComputeError::Io {
                op,
                path: path.to_path_buf(),
                source,
            },
        }
    }
}

/// A place to run commands and keep files.
#[async_trait]
pub trait ComputeProvider: Send + Sync {
    /// The value of `compute.provider` for this backend.
    fn kind(&self) -> &'static str;

    /// Directory that relative paths and commands start from.
    fn workdir(&self) -> &Path;

    /// True when paths name files on the machine that runs the agent, so the home's protected paths apply.
    fn shares_agent_filesystem(&self) -> bool;

    /// Runs a shell command with a timeout and an output cap.
    async fn exec(&self, request: ExecRequest) -> Result<ExecOutput, ComputeError>;

    /// Reads at most `max_bytes` from the start of an absolute path.
    async fn read_file(&self, path: &Path, max_bytes: usize) -> Result<FileContent, ComputeError>;

    /// Writes (creates or truncates) an absolute path, creating parent directories.
    async fn write_file(&self, path: &Path, content: &[u8]) -> Result<(), ComputeError>;

    /// Makes a port reachable from outside and returns its URL. Backends without a notion of ports say so.
    async fn expose_port(&self, port: u16) -> Result<String, ComputeError> {
        let _ = port;
        Err(ComputeError::Unsupported {
            provider: self.kind(),
            what: "exposing ports",
        })
    }
}

/// Description of one compute backend for the setup wizard.
#[derive(Clone, Debug)]
pub struct BackendInfo {
    /// The value of `compute.provider`.
    pub kind: &'static str,
    pub label: &'static str,
    pub keys: &'static [ConfigKey],
}

/// Every compute backend this binary can use.
pub fn backends() -> Vec<BackendInfo> {
    vec![BackendInfo {
        kind: local::KIND,
        label: "This machine (commands run as the agent's user, in its workspace directory)",
        keys: local::config_keys(),
    }]
}

/// Builds the configured compute backend.
pub fn provider_from_config(
    home: &Home,
    config: &Config,
) -> Result<Arc<dyn ComputeProvider>, ComputeError> {
    match config.compute.provider.as_str() {
        local::KIND => {
            let workdir = config
                .compute
                .workdir
                .clone()
                .unwrap_or_else(|| home.workspace_dir());
            let mut extra_secret_vars = Vec::new();
            if let Some(var) = &config.inference.api_key_env {
                extra_secret_vars.push(var.clone());
            }
            Ok(Arc::new(local::LocalCompute::new(
                workdir,
                &extra_secret_vars,
            )?))
        }
        other => Err(ComputeError::UnknownProvider(other.to_string())),
    }
}

/// The behaviour every compute backend must show, as a test module. Instantiate it in a backend's tests with
/// `crate::compute::compute_conformance!(|workdir: &std::path::Path| -> Backend { … })`; the tests only use paths
/// under the provider's own `workdir()` and check effects through the provider itself, so remote backends can run
/// the same suite.
#[cfg(test)]
macro_rules! compute_conformance {
    ($make:expr) => {
        mod conformance {
            use std::time::Duration;

            // The backend's constructor expression is written in the caller's scope.
            #[allow(unused_imports)]
            use super::*;

            use $crate::compute::{ComputeError, ComputeProvider, ExecRequest};

            fn provider(dir: &std::path::Path) -> impl ComputeProvider {
                let make = $make;
                make(dir)
            }

            fn req(command: &str, timeout_secs: u64, output_cap: usize) -> ExecRequest {
                ExecRequest {
                    command: command.into(),
                    timeout: Duration::from_secs(timeout_secs),
                    output_cap,
                }
            }

            #[tokio::test]
            async fn exec_reports_exit_code_streams_and_workdir() {
                let dir = tempfile::tempdir().expect("tmp");
                let c = provider(dir.path());
                let out = c
                    .exec(req("pwd; echo oops >&2; exit 3", 30, 4096))
                    .await
                    .expect("exec");
                assert_eq!(out.exit_code, Some(3));
                assert_eq!(out.stderr.trim(), "oops");
                assert!(!out.timed_out);
                let pwd = c.exec(req("pwd -P", 30, 4096)).await.expect("exec").stdout;
                let workdir = c
                    .exec(req(
                        &format!("cd '{}' && pwd -P", c.workdir().display()),
                        30,
                        4096,
                    ))
                    .await
                    .expect("exec")
                    .stdout;
                assert_eq!(pwd, workdir);
            }

            #[tokio::test]
            async fn exec_timeout_kills_everything_the_command_started() {
                let dir = tempfile::tempdir().expect("tmp");
                let c = provider(dir.path());
                let out = c
                    .exec(req("sleep 60 & echo $! > bg.pid; sleep 60", 1, 4096))
                    .await
                    .expect("exec");
                assert!(out.timed_out);
                assert_eq!(out.exit_code, None);
                let mut dead = false;
                for _ in 0..50 {
                    let probe = c
                        .exec(req(
                            "kill -0 $(cat bg.pid) 2>/dev/null && echo alive || echo dead",
                            30,
                            4096,
                        ))
                        .await
                        .expect("probe");
                    if probe.stdout.trim() == "dead" {
                        dead = true;
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                assert!(dead, "the background child outlived the timeout");
            }

            #[tokio::test]
            async fn exec_output_keeps_head_and_tail_within_the_cap() {
                let dir = tempfile::tempdir().expect("tmp");
                let c = provider(dir.path());
                let out = c
                    .exec(req(
                        "echo start; head -c 100000 /dev/zero | tr '\\0' a; echo; echo the end",
                        30,
                        1024,
                    ))
                    .await
                    .expect("exec");
                assert_eq!(out.exit_code, Some(0));
                assert!(out.stdout_truncated);
                assert!(out.stdout.starts_with("start\naaa"));
                assert!(out.stdout.ends_with("aaa\nthe end\n"));
                assert!(out.stdout.contains("bytes cut"));
                assert!(out.stdout.len() < 1100);
            }

            #[tokio::test]
            async fn files_round_trip_with_clear_errors() {
                let dir = tempfile::tempdir().expect("tmp");
                let c = provider(dir.path());
                let path = c.workdir().join("a/b/note.txt");
                c.write_file(&path, b"hello").await.expect("write");
                let head = c.read_file(&path, 3).await.expect("read");
                assert_eq!(head.bytes, b"hel");
                assert_eq!(head.size, 5);
                c.write_file(&path, b"hi").await.expect("overwrite");
                assert_eq!(c.read_file(&path, 100).await.expect("read").bytes, b"hi");
                let seen = c
                    .exec(req("cat a/b/note.txt", 30, 4096))
                    .await
                    .expect("exec");
                assert_eq!(seen.stdout, "hi");
                assert!(matches!(
                    c.read_file(&c.workdir().join("missing"), 10).await,
                    Err(ComputeError::NotFound { .. })
                ));
                assert!(matches!(
                    c.read_file(c.workdir(), 10).await,
                    Err(ComputeError::IsDirectory { .. })
                ));
            }
        }
    };
}

#[cfg(test)]
pub(crate) use compute_conformance;
