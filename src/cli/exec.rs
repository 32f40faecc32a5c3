//! `automaton exec [--provider KIND] -- CMD…`: runs one command through a compute provider (the agent's configured
//! one by default) with its timeout and output cap, the way the agent's `exec` tool does. For the operator and
//! scripts: it is not the agent acting, so the tool registry's policy does not apply.

use std::io::Write;

use clap::Args;
use serde::Serialize;

use super::ExitError;
use crate::compute::{self, ExecOutput, ExecRequest};
use crate::config::{env_overrides, Config, ConfigError, Override};
use crate::home::Home;

#[derive(Debug, Args)]
pub struct ExecArgs {
    /// Compute provider to use instead of compute.provider (local, ssh, conway)
    #[arg(long, value_name = "KIND")]
    provider: Option<String>,

    /// Run on this rented LNVPS VM (over SSH, its host key pinned from LNVPS; see `automaton vps list`)
    #[arg(long, value_name = "ID", conflicts_with = "provider")]
    vps: Option<u64>,

    /// Seconds before the command is killed [default: compute.exec_timeout_secs]
    #[arg(long, value_name = "SECS")]
    timeout: Option<u64>,

    /// Bytes kept of each of stdout and stderr (head and tail) [default: compute.output_cap_bytes]
    #[arg(long, value_name = "BYTES")]
    output_cap: Option<usize>,

    /// Print one JSON document (exit_code, signal, timed_out, stdout, stderr, …) instead of the two streams
    #[arg(long)]
    json: bool,

    /// The command; its words are joined with spaces and run by `sh -c` on the provider (as ssh does)
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    command: Vec<String>,
}

#[derive(Debug, Serialize)]
struct ExecReport<'a> {
    provider: &'static str,
    workdir: String,
    exit_code: Option<i32>,
    signal: Option<i32>,
    timed_out: bool,
    duration_ms: u64,
    stdout: &'a str,
    stderr: &'a str,
    stdout_truncated: bool,
    stderr_truncated: bool,
}

pub fn execute(home: &Home, overrides: &[Override], args: ExecArgs) -> anyhow::Result<()> {
    super::init_stderr_tracing();
    let mut config = match Config::load_with(home, &env_overrides(), overrides) {
        Ok(config) => config,
        Err(ConfigError::NotFound { .. }) => return Err(super::not_set_up(home)),
        Err(err) => return Err(err.into()),
    };
    if let Some(kind) = args.provider {
        config = config.with_override("compute.provider", &kind, "--provider")?;
        config.validate("--provider")?;
    }
    let timeout = args.timeout.unwrap_or(config.compute.exec_timeout_secs);
    if timeout == 0 {
        anyhow::bail!("--timeout must be at least 1 second");
    }
    let request = ExecRequest {
        command: args.command.join(" "),
        timeout: std::time::Duration::from_secs(timeout),
        output_cap: args.output_cap.unwrap_or(config.compute.output_cap_bytes),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (out, provider, workdir) = runtime.block_on(async {
        let compute: std::sync::Arc<dyn compute::ComputeProvider> = match args.vps {
            Some(id) => {
                let db = crate::state::Db::open(&home.db_path())?;
                let client = compute::lnvps::LnvpsClient::for_home(home, &config)?;
                let manager = compute::lnvps::VmManager::new(home, db, client);
                if manager.get(id).await?.is_none() {
                    anyhow::bail!("VM {id} is not one this agent rents (see `automaton vps list`)");
                }
                std::sync::Arc::new(manager.compute(id).await?)
            }
            None => compute::provider_from_config(home, &config)?,
        };
        let out = compute.exec(request).await?;
        Ok::<_, anyhow::Error>((out, compute.kind(), compute.workdir().display().to_string()))
    })?;

    if args.json {
        let report = ExecReport {
            provider,
            workdir,
            exit_code: out.exit_code,
            signal: out.signal,
            timed_out: out.timed_out,
            duration_ms: out.duration.as_millis() as u64,
            stdout: &out.stdout,
            stderr: &out.stderr,
            stdout_truncated: out.stdout_truncated,
            stderr_truncated: out.stderr_truncated,
        };
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        std::io::stdout().write_all(out.stdout.as_bytes())?;
        std::io::stdout().flush()?;
        std::io::stderr().write_all(out.stderr.as_bytes())?;
    }
    match failure(&out, timeout) {
        None => Ok(()),
        Some(message) => Err(ExitError { code: 1, message }.into()),
    }
}

/// Why the command did not succeed, if it did not. Its own status is not passed through as ours: exit codes 2
/// and 3 mean "refused by policy" and "payment failed" for every automaton command.
fn failure(out: &ExecOutput, timeout_secs: u64) -> Option<String> {
    if out.timed_out {
        return Some(format!(
            "the command timed out after {timeout_secs}s and was killed"
        ));
    }
    match (out.exit_code, out.signal) {
        (Some(0), _) => None,
        (Some(code), _) => Some(format!("the command exited with status {code}")),
        (None, Some(signal)) => Some(format!("the command was killed by signal {signal}")),
        (None, None) => Some("the command ended without an exit status".to_string()),
    }
}
