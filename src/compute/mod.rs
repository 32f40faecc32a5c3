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
