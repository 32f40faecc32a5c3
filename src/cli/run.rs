//! `automaton run`: lock the home, start logging and the runtime, and hand over to the agent loop.

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use tokio_util::sync::CancellationToken;

use crate::agent::{self, RunOptions, Services};
use crate::config::{env_overrides, Config, ConfigError, Override};
use crate::control::{self, ControlContext};
use crate::home::{AgentLock, Home, LockError};
use crate::money::BudgetPolicy;
use crate::state::Db;
use crate::wallet::{Wallet, WalletError};

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
    let result = runtime.block_on(run_agent(home, config, args, overrides));
    // Blocking tasks (a command still running at cancel) must not keep the process alive for long.
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    result
}

async fn run_agent(
    home: &Home,
    config: Config,
    args: RunArgs,
    overrides: &[Override],
) -> anyhow::Result<()> {
    let db = Db::open(&home.db_path())?;
    // Altered laws stop the agent before it thinks once (or starts its node).
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
    let budget = BudgetPolicy::from_home(db.clone(), &config, home, overrides.to_vec());
    let wallet = open_wallet(home, &config, &db, &budget)?;
    // The node and the control socket outlive the agent loop's last step, then stop after it.
    let services_cancel = CancellationToken::new();
    let wallet_task = wallet.as_ref().map(|w| w.spawn(services_cancel.clone()));
    let control = Arc::new(ControlContext {
        home: home.clone(),
        config: Arc::new(config.clone()),
        db: db.clone(),
        budget,
        wallet: wallet.clone(),
    });
    let control_task = match control::serve(home, control, services_cancel.clone()).await {
        Ok(task) => Some(task),
        Err(error) => {
            tracing::error!(%error, "cannot serve the control socket; `automaton wallet` cannot reach this agent");
            None
        }
    };
    // The HTTP face (Lightning address, automaton.json, paid services) lives as long as the node.
    // The L402 seller's paid services (`http.services`) ride on the face; without a wallet there is nothing to sell.
    let seller = wallet.as_ref().map(|w| {
        crate::l402::server::Seller::new(home, &config, db.clone(), w.clone(), overrides.to_vec())
    });
    let http_task = match crate::http::serve(
        home,
        Arc::new(config.clone()),
        db.clone(),
        wallet.clone(),
        seller.as_ref().map(|s| s.router()),
        services_cancel.clone(),
    )
    .await
    {
        Ok(running) => Some(running.task),
        Err(error) => {
            tracing::error!(%error, "cannot serve the HTTP face; the agent runs without it");
            None
        }
    };
    // The heartbeat runs beside the agent loop and stops with the other services after it.
    let heartbeat_task = tokio::spawn(
        crate::heartbeat::Scheduler::new(
            home.clone(),
            db.clone(),
            Arc::new(crate::heartbeat::SystemClock),
            crate::heartbeat::TaskRegistry::builtin(),
        )
        .run(services_cancel.clone()),
    );
    // The Nostr presence (card, distress notes, outbox) runs beside the agent and never blocks it.
    let presence = crate::nostr::presence::spawn(home, &config, db.clone(), cancel.clone());
    // The NIP-47 wallet service answers the NWC connections' requests beside it, through the same money gate.
    let nwc = wallet.as_ref().and_then(|w| {
        crate::nostr::nwc::spawn(home, &config, db.clone(), w.clone(), cancel.clone())
    });
    let options = RunOptions { turns: args.turns };
    let services = Services { wallet };
    let outcome = agent::run_with_services(home, &config, db, services, options, cancel).await;
    // No NWC request may start a payment once the node is stopping.
    if let Some(nwc) = nwc {
        nwc.stop().await;
    }
    services_cancel.cancel();
    let _ = heartbeat_task.await;
    if let Some(task) = control_task {
        let _ = task.await;
    }
    if let Some(task) = http_task {
        let _ = task.await;
    }
    if let Some(task) = wallet_task {
        let _ = task.await;
    }
    let summary = outcome?;
    if let Some(presence) = presence {
        presence.stop().await;
    }
    tracing::info!(
        turns = summary.turns,
        tool_calls = summary.tool_calls,
        elapsed_secs = started.elapsed().as_secs(),
        "automaton run finished"
    );
    Ok(())
}

/// The wallet of the home. A home set up before wallets existed runs without one (and says how to add it); an
/// unreadable or exposed `wallet.json` stops the run: the agent must not run with its keys in doubt.
fn open_wallet(
    home: &Home,
    config: &Config,
    db: &Db,
    budget: &BudgetPolicy,
) -> anyhow::Result<Option<Wallet>> {
    match Wallet::open(home, config, db.clone(), budget.clone()) {
        Ok(wallet) => {
            crate::wallet::record_identity(
                db,
                wallet.node_id(),
                &wallet.npub(),
                &config.wallet.network,
            )?;
            tracing::info!(node_id = %wallet.node_id(), npub = %wallet.npub(), "wallet opened");
            Ok(Some(wallet))
        }
        Err(WalletError::NoWallet { path }) => {
            tracing::warn!(
                path = %path.display(),
                "this agent has no wallet; `automaton setup --reconfigure` creates one"
            );
            Ok(None)
        }
        Err(error) => Err(error.into()),
    }
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
