//! Compute: where the agent's commands run and its files live. The `ComputeProvider` trait and its backends
//! (`local.rs`, `ssh.rs`, `conway.rs`; LNVPS machines are reached through the SSH backend).
//!
//! Providers do not decide what is allowed: the tool registry checks policy and protected paths before calling
//! them, and hands them absolute paths.

mod capture;
pub mod conway;
pub mod lnvps;
pub mod local;
pub mod ssh;

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
    #[error("unknown compute provider {0:?} (known: local, ssh, conway)")]
    UnknownProvider(String),
    /// A setting is missing or wrong (no host, no key, no API key).
    #[error("{0}")]
    Config(String),
    #[error("cannot connect to {target}: {reason}")]
    Connect { target: String, reason: String },
    /// The machine presents a different host key than the one recorded: possibly someone in the middle.
    #[error(
        "the host key of {host} differs from the one recorded in {known_hosts}; refusing to connect. If the machine \
         was really reinstalled or replaced, remove its old entry from that file first"
    )]
    HostKeyChanged { host: String, known_hosts: PathBuf },
    #[error("no host key for {host} in {known_hosts}; refusing to connect to an unknown machine (add its key first)")]
    HostKeyUnknown { host: String, known_hosts: PathBuf },
    /// The connection broke while a command ran; it may still be running (bounded by its timeout).
    #[error("the connection to {target} dropped ({detail}); the command may have run")]
    Disconnected { target: String, detail: String },
    /// The provider's API or the remote machine answered with an error.
    #[error("{provider}: {message}")]
    Remote {
        provider: &'static str,
        message: String,
    },
    /// The provider refused the credentials; nothing is ever run locally instead.
    #[error("{provider} refused the API key: {message}")]
    Auth {
        provider: &'static str,
        message: String,
    },
    #[error("{provider}: not enough credits{}", credits_detail(.required_cents, .balance_cents))]
    InsufficientCredits {
        provider: &'static str,
        required_cents: Option<u64>,
        balance_cents: Option<u64>,
    },
    /// Too many recent failures: calls fail fast until the provider has had time to recover.
    #[error("{provider} is unavailable ({reason}); try again later")]
    Unavailable {
        provider: &'static str,
        reason: String,
    },
}

fn credits_detail(required: &Option<u64>, balance: &Option<u64>) -> String {
    match (required, balance) {
        (Some(r), Some(b)) => format!(" ({r} cents needed, {b} available)"),
        (Some(r), None) => format!(" ({r} cents needed)"),
        (None, Some(b)) => format!(" ({b} cents available)"),
        (None, None) => String::new(),
    }
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
    vec![
        BackendInfo {
            kind: local::KIND,
            label: "This machine (commands run as the agent's user, in its workspace directory)",
            keys: local::config_keys(),
        },
        BackendInfo {
            kind: ssh::KIND,
            label: "A machine reached over SSH (the agent's key, host keys pinned in its home)",
            keys: ssh::config_keys(),
        },
        BackendInfo {
            kind: conway::KIND,
            label: "A Conway Cloud sandbox (paid with credits the operator bought)",
            keys: conway::config_keys(),
        },
    ]
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
        ssh::KIND => {
            let c = &config.compute.ssh;
            let host = c
                .host
                .clone()
                .filter(|h| !h.trim().is_empty())
                .ok_or_else(|| {
                    ComputeError::Config(
                        "compute.provider is ssh but compute.ssh.host is not set".to_string(),
                    )
                })?;
            let key_path = c.key_path_in(home);
            let target = ssh::SshTarget {
                host,
                port: c.port,
                user: c.user.clone(),
                key_path,
                known_hosts: home.ssh_dir().join("known_hosts"),
            };
            let options = ssh::SshOptions {
                workdir: c.workdir.clone(),
                ..Default::default()
            };
            Ok(Arc::new(ssh::SshCompute::new(target, options)?))
        }
        conway::KIND => Ok(Arc::new(conway::ConwayCompute::from_config(home, config)?)),
        other => Err(ComputeError::UnknownProvider(other.to_string())),
    }
}

/// The behaviour every compute backend must show, as a test module. Instantiate it in a backend's tests with
/// `automaton::compute_conformance!(|workdir: &std::path::Path| -> Backend { … })`, or with
/// `compute_conformance!(async |workdir: std::path::PathBuf| async move { … })` when building the backend needs
/// to await. The tests only use paths under the provider's own `workdir()` and check effects through the provider
/// itself, so remote backends run the same suite. Exported (hidden) so integration tests can run it against
/// backends that need real servers (sshd, the lab's doubles).
#[doc(hidden)]
#[macro_export]
macro_rules! compute_conformance {
    (async $make:expr) => {
        mod conformance {
            // The backend's constructor expression is written in the caller's scope.
            #[allow(unused_imports)]
            use super::*;

            async fn provider(dir: &std::path::Path) -> impl $crate::compute::ComputeProvider {
                let make = $make;
                make(dir.to_path_buf()).await
            }

            $crate::compute_conformance!(@tests);
        }
    };
    (@tests) => {
            use std::time::Duration;

            use $crate::compute::{ComputeError, ComputeProvider, ExecRequest};

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
                let c = provider(dir.path()).await;
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
                let c = provider(dir.path()).await;
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
                let c = provider(dir.path()).await;
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
                let c = provider(dir.path()).await;
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

            #[tokio::test]
            async fn exit_codes_and_stderr_come_back_exactly() {
                let dir = tempfile::tempdir().expect("tmp");
                let c = provider(dir.path()).await;
                for code in [0, 1, 42, 127, 255] {
                    let out = c
                        .exec(req(&format!("echo out; echo err-{code} >&2; exit {code}"), 30, 4096))
                        .await
                        .expect("exec");
                    assert_eq!(out.exit_code, Some(code), "{out:?}");
                    assert_eq!(out.signal, None);
                    assert_eq!(out.stdout, "out\n");
                    assert_eq!(out.stderr, format!("err-{code}\n"));
                }
                let missing = c
                    .exec(req("no-such-command-here", 30, 4096))
                    .await
                    .expect("exec");
                assert_eq!(missing.exit_code, Some(127));
                assert!(!missing.stderr.is_empty());
            }

            #[tokio::test]
            async fn a_timeout_kills_the_command_itself_and_keeps_partial_output() {
                let dir = tempfile::tempdir().expect("tmp");
                let c = provider(dir.path()).await;
                let out = c
                    .exec(req(
                        "echo before; sh -c 'echo $$ > fg.pid; exec sleep 60'",
                        1,
                        4096,
                    ))
                    .await
                    .expect("exec");
                assert!(out.timed_out);
                assert_eq!(out.exit_code, None);
                assert_eq!(out.stdout, "before\n");
                let mut dead = false;
                for _ in 0..50 {
                    let probe = c
                        .exec(req(
                            "kill -0 $(cat fg.pid) 2>/dev/null && echo alive || echo dead",
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
                assert!(dead, "the command outlived its timeout");
            }

            #[tokio::test]
            async fn large_stderr_is_capped_too() {
                let dir = tempfile::tempdir().expect("tmp");
                let c = provider(dir.path()).await;
                let out = c
                    .exec(req(
                        "echo first >&2; head -c 200000 /dev/zero | tr '\\0' e >&2; echo >&2; echo last >&2; echo ok",
                        30,
                        2048,
                    ))
                    .await
                    .expect("exec");
                assert_eq!(out.exit_code, Some(0));
                assert_eq!(out.stdout, "ok\n");
                assert!(!out.stdout_truncated);
                assert!(out.stderr_truncated);
                assert!(out.stderr.starts_with("first\neee"));
                assert!(out.stderr.ends_with("eee\nlast\n"), "{}", &out.stderr[out.stderr.len() - 40..]);
                assert!(out.stderr.len() < 2200);
            }

            #[tokio::test]
            async fn files_are_binary_safe() {
                let dir = tempfile::tempdir().expect("tmp");
                let c = provider(dir.path()).await;
                let mut content: Vec<u8> = (0..=255u8).collect();
                content.extend_from_slice(b"\xff\xfe\x00\n\r\n'\"$(echo no)`x`");
                content.extend((0..70_000u32).map(|i| (i.wrapping_mul(2654435761) >> 24) as u8));
                let path = c.workdir().join("bin/blob.dat");
                c.write_file(&path, &content).await.expect("write");
                let back = c.read_file(&path, content.len() + 10).await.expect("read");
                assert_eq!(back.size, content.len() as u64);
                assert!(back.bytes == content, "the bytes changed on the way");
                let head = c.read_file(&path, 300).await.expect("read head");
                assert_eq!(head.bytes, &content[..300]);
                let size = c.exec(req("wc -c < bin/blob.dat", 30, 4096)).await.expect("exec");
                assert_eq!(size.stdout.trim(), content.len().to_string());
                let odd = c.workdir().join("it's a \"name\" with $(spaces)");
                c.write_file(&odd, b"quoted").await.expect("write odd name");
                assert_eq!(c.read_file(&odd, 100).await.expect("read odd").bytes, b"quoted");
                c.write_file(&path, b"").await.expect("truncate");
                let empty = c.read_file(&path, 100).await.expect("read empty");
                assert_eq!((empty.bytes.len(), empty.size), (0, 0));
            }

            #[tokio::test]
            async fn missing_files_and_directories_are_reported_as_such() {
                let dir = tempfile::tempdir().expect("tmp");
                let c = provider(dir.path()).await;
                let missing = c.workdir().join("nope/deeper/file.txt");
                match c.read_file(&missing, 10).await {
                    Err(ComputeError::NotFound { path }) => assert_eq!(path, missing),
                    other => panic!("expected NotFound, got {other:?}"),
                }
                c.write_file(&c.workdir().join("d/inner.txt"), b"x").await.expect("write");
                assert!(matches!(
                    c.read_file(&c.workdir().join("d"), 10).await,
                    Err(ComputeError::IsDirectory { .. })
                ));
                assert!(c.write_file(&c.workdir().join("d"), b"x").await.is_err());
            }

            #[tokio::test]
            async fn concurrent_execs_keep_their_own_output() {
                let dir = tempfile::tempdir().expect("tmp");
                let c = provider(dir.path()).await;
                let runs = (0..12).map(|i| {
                    let c = &c;
                    async move {
                        let out = c
                            .exec(req(&format!("sleep 0.2; echo run-{i}; echo err-{i} >&2; exit {i}"), 30, 4096))
                            .await
                            .expect("exec");
                        (i, out)
                    }
                });
                for (i, out) in futures::future::join_all(runs).await {
                    assert_eq!(out.exit_code, Some(i));
                    assert_eq!(out.stdout, format!("run-{i}\n"));
                    assert_eq!(out.stderr, format!("err-{i}\n"));
                }
            }
    };
    ($make:expr) => {
        mod conformance {
            // The backend's constructor expression is written in the caller's scope.
            #[allow(unused_imports)]
            use super::*;

            async fn provider(dir: &std::path::Path) -> impl $crate::compute::ComputeProvider {
                let make = $make;
                make(dir)
            }

            $crate::compute_conformance!(@tests);
        }
    };
}

#[cfg(test)]
pub(crate) use crate::compute_conformance;
