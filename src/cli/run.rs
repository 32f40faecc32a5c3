//! `automaton run`: lock the home, start logging and the runtime, and hand over to the agent loop.

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use tokio_util::sync::CancellationToken;

use crate::agent::{self, RunOptions};
use crate::config::{env_overrides, Config, ConfigError, Override};
use crate::home::{AgentLock, Home, LockError};
use crate::state::Db;

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Run N turns back to back, starting now, then exit 0 (a sleep or a text-only answer ends a turn, not the run)
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    turns: Option<u32>,
}

pub fn execute(home: &Home, overrides: &[Override], args: RunArgs) -> anyhow::Result<()> {
    if !home.is_set_up() {
        super::init_stderr_tracing();
        return Err(super::not_set_up(home));
    }
    // The lock comes first: nothing (not even the log file) is touched while another run owns the home.
    let _lock = match AgentLock::acquire(home) {
        Ok(lock) => lock,
        Err(err @ LockError::Held { .. }) => {
            super::init_stderr_tracing();
            return Err(err.into());
        }
        Err(err) => return Err(err.into()),
    };
    let config = match Config::load_with(home, &env_overrides(), overrides) {
        Ok(config) => config,
        Err(ConfigError::NotFound { .. }) => return Err(super::not_set_up(home)),
        Err(err) => return Err(err.into()),
    };
    // A missing or exposed key is a setup problem: say so now rather than after the first turn's retries.
    config.inference_api_key()?;
    let _log_guard = init_run_tracing(home)?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("automaton")
        .build()
        .context("cannot start the async runtime")?;
    let result = runtime.block_on(run_agent(home, config, args));
    // Blocking tasks (a command still running at cancel) must not keep the process alive for long.
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    result
}

async fn run_agent(home: &Home, config: Config, args: RunArgs) -> anyhow::Result<()> {
    let db = Db::open(&home.db_path())?;
    // Altered laws stop the agent before it thinks once.
    crate::genesis::check_constitution(home, &db)?;
    if let Err(error) = crate::audit::record_hand_edits(home) {
        tracing::debug!(%error, "hand edits not recorded");
    }
    let cancel = CancellationToken::new();
    spawn_signal_handler(cancel.clone())?;
    let started = Instant::now();
    tracing::info!(
        home = %home.root().display(),
        pid = std::process::id(),
        "automaton run holds the home"
    );
    // The heartbeat runs beside the agent loop and stops after it.
    let heartbeat_cancel = CancellationToken::new();
    let heartbeat_task = tokio::spawn(
        crate::heartbeat::Scheduler::new(
            home.clone(),
            db.clone(),
            Arc::new(crate::heartbeat::SystemClock),
            crate::heartbeat::TaskRegistry::builtin(),
        )
        .run(heartbeat_cancel.clone()),
    );
    let options = RunOptions { turns: args.turns };
    let outcome = agent::run(home, &config, db, options, cancel).await;
    heartbeat_cancel.cancel();
    let _ = heartbeat_task.await;
    let summary = outcome?;
    tracing::info!(
        turns = summary.turns,
        tool_calls = summary.tool_calls,
        elapsed_secs = started.elapsed().as_secs(),
        "automaton run finished"
    );
    Ok(())
}

/// SIGINT/SIGTERM cancel the agent, which finishes its current step and returns; a second signal exits at once.
fn spawn_signal_handler(cancel: CancellationToken) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    let mut terminate = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    tokio::spawn(async move {
        let mut received = 0;
        loop {
            let name = tokio::select! {
                _ = interrupt.recv() => "SIGINT",
                _ = terminate.recv() => "SIGTERM",
            };
            received += 1;
            if received == 1 {
                tracing::info!(
                    signal = name,
                    "stopping: finishing the current step (signal again to exit now)"
                );
                cancel.cancel();
            } else {
                tracing::warn!(signal = name, "second signal: exiting now");
                std::process::exit(130);
            }
        }
    });
    Ok(())
}

/// JSON lines to `logs/automaton.log` and readable lines on stderr; `RUST_LOG` tunes both.
fn init_run_tracing(home: &Home) -> anyhow::Result<tracing_appender::non_blocking::WorkerGuard> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{fmt, EnvFilter};

    let dir = home.logs_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let appender = tracing_appender::rolling::never(&dir, "automaton.log");
    let (file_writer, guard) = tracing_appender::non_blocking(appender);
    let filter = || {
        EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| EnvFilter::new("info,hyper=warn,reqwest=warn"))
    };
    use tracing_subscriber::Layer;
    tracing_subscriber::registry()
        .with(
            fmt::layer()
                .json()
                .with_current_span(true)
                .with_span_list(false)
                .with_writer(file_writer)
                .with_filter(filter()),
        )
        .with(
            fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::stderr().is_terminal())
                .with_target(false)
                .with_filter(filter()),
        )
        .try_init()
        .context("cannot install the logger")?;
    Ok(guard)
}
