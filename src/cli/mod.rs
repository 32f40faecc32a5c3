//! The command line: clap definitions, one file per subcommand, exit codes and error printing.
//!
//! Conventions (shared/CONVENTIONS.md): `--json` prints exactly one JSON document on stdout and puts every human
//! note on stderr; exit 0 ok, 1 error, 2 refused by policy or budget, 3 a payment was attempted and failed.

mod approvals;
mod budget;
mod card;
mod children;
mod discover;
mod exec;
mod fund;
mod heartbeat;
mod l402;
mod lnurl_auth;
mod logs;
mod nwc;
mod revert;
mod run;
mod setup;
mod skills;
mod status;
mod vps;
mod wallet;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::Override;
use crate::home::{Home, HOME_ENV};

/// A sovereign autonomous AI agent that lives on its own Lightning wallet.
#[derive(Debug, Parser)]
#[command(
    name = "automaton",
    version,
    propagate_version = true,
    args_override_self = true
)]
pub struct Cli {
    /// The agent's home directory [default: $AUTOMATON_HOME, else ~/.automaton]
    #[arg(long, global = true, value_name = "DIR")]
    pub home: Option<PathBuf>,

    /// Override one config key for this command (repeatable), e.g. -c inference.model=gpt-4o
    #[arg(short = 'c', long = "config", global = true, value_name = "KEY=VALUE")]
    pub overrides: Vec<Override>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a new agent in the home (interactive, or fully scripted with --yes)
    Setup(Box<setup::SetupArgs>),
    /// Run the agent: think, act, sleep, wake, until stopped (or for --turns N)
    Run(run::RunArgs),
    /// Show the agent's identity, model, activity and money (works while the agent is stopped)
    Status(status::StatusArgs),
    /// Show recent turns and the tool calls they made
    Logs(logs::LogsArgs),
    /// The agent's Nostr card (NIP-89): show it, publish it
    Card(card::CardArgs),
    /// Find other agents on Nostr (verified cards), or describe one by its URL
    Discover(discover::DiscoverArgs),
    /// Run one command through the compute provider (the configured one, or --provider)
    Exec(exec::ExecArgs),
    /// Spending limits and what was spent against them; change them with `budget set`
    Budget(budget::BudgetArgs),
    /// Payments waiting for the creator's approval: list, approve, deny
    Approvals(approvals::ApprovalsArgs),
    /// The agent's schedule: list, add, remove, enable, disable or run heartbeat entries
    Heartbeat(heartbeat::HeartbeatArgs),
    /// Undo one change to the agent's definition (see `automaton logs --changes`)
    Revert(revert::RevertArgs),
    /// The agent's skills: list, show, enable, disable, install
    Skills(skills::SkillsArgs),
    /// The agent's Lightning wallet: balance, invoices, payments, receipts
    Wallet(wallet::WalletArgs),
    /// How to send this agent money: its Lightning address, LNURL and a QR code, or an invoice (--sats N)
    Fund(fund::FundArgs),
    /// Buy HTTP calls over Lightning (L402): fetch a paid URL, list cached credentials
    L402(l402::L402Args),
    /// Rent VPSes at LNVPS, paid over Lightning: templates, images, create, list, show, renew, stop, start, destroy
    Vps(vps::VpsArgs),
    /// Log in to a service with LNURL-auth, using this agent's per-domain linking key
    LnurlAuth(lnurl_auth::LnurlAuthArgs),
    /// Nostr Wallet Connect (NIP-47): connections other apps use to pay through this agent, each with its budget
    Nwc(nwc::NwcArgs),
    /// Create a funded child agent on another machine (an LNVPS VM by default) and start it
    Spawn(children::SpawnArgs),
    /// The children this agent spawned: state, node id, balance
    Children(children::ChildrenArgs),
    /// One child: show, message, fund, stop, prune
    Child(children::ChildArgs),
}

/// An error that carries the process exit code (anything else exits 1).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ExitError {
    pub code: u8,
    pub message: String,
}

/// Parses the command line, runs the command and maps its outcome to an exit code.
pub fn main() -> ExitCode {
    // clap exits 2 on a usage error, but 2 means "refused by policy" here: bad usage is an ordinary error.
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            let _ = err.print();
            return if err.use_stderr() {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let home = match &cli.home {
        Some(dir) => Home::at(dir),
        None => Home::from_env(),
    };
    let result = match cli.command {
        Command::Setup(args) => setup::execute(&home, &cli.overrides, *args),
        Command::Run(args) => run::execute(&home, &cli.overrides, args),
        Command::Status(args) => status::execute(&home, &cli.overrides, args),
        Command::Logs(args) => logs::execute(&home, args),
        Command::Card(args) => card::execute(&home, &cli.overrides, args),
        Command::Discover(args) => discover::execute(&home, &cli.overrides, args),
        Command::Exec(args) => exec::execute(&home, &cli.overrides, args),
        Command::Budget(args) => budget::execute(&home, &cli.overrides, args),
        Command::Approvals(args) => approvals::execute(&home, args),
        Command::Heartbeat(args) => heartbeat::execute(&home, args),
        Command::Revert(args) => revert::execute(&home, args),
        Command::Skills(args) => skills::execute(&home, args),
        Command::Wallet(args) => wallet::execute(&home, args),
        Command::Fund(args) => fund::execute(&home, &cli.overrides, args),
        Command::L402(args) => l402::execute(&home, args),
        Command::Vps(args) => vps::execute(&home, &cli.overrides, args),
        Command::LnurlAuth(args) => lnurl_auth::execute(&home, &cli.overrides, args),
        Command::Nwc(args) => nwc::execute(&home, &cli.overrides, args),
        Command::Spawn(args) => children::spawn(&home, &cli.overrides, args),
        Command::Children(args) => children::children(&home, args),
        Command::Child(args) => children::child(&home, &cli.overrides, args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let code = err.downcast_ref::<ExitError>().map(|e| e.code).unwrap_or(1);
            eprintln!("error: {err:#}");
            ExitCode::from(code)
        }
    }
}

/// Tracing for the short-lived commands: warnings and errors on stderr, `RUST_LOG` to see more.
/// A spinner on stderr for a long operation; on a non-terminal each new message is printed as a line instead.
pub(crate) fn spinner(message: &str) -> indicatif::ProgressBar {
    if std::io::stderr().is_terminal() {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.enable_steady_tick(std::time::Duration::from_millis(120));
        bar.set_message(message.to_string());
        bar
    } else {
        eprintln!("{message}");
        let bar =
            indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::hidden());
        bar.set_style(indicatif::ProgressStyle::with_template("{msg}").expect("a valid template"));
        bar
    }
}

/// `--json`: one document on stdout; otherwise one line per element of a list (or for the one value).
pub(crate) fn print_lines(
    json: bool,
    value: &serde_json::Value,
    line: impl Fn(&serde_json::Value) -> String,
) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(value)?);
        return Ok(());
    }
    match value.as_array() {
        Some(list) => list.iter().for_each(|v| println!("{}", line(v))),
        None => println!("{}", line(value)),
    }
    Ok(())
}

pub(crate) fn init_stderr_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init();
}

/// The error for a command that needs an agent in a home that has none.
pub(crate) fn not_set_up(home: &Home) -> anyhow::Error {
    anyhow::anyhow!(
        "no agent in {} (no automaton.yaml); run `automaton setup`, or point --home / ${HOME_ENV} at an agent's home",
        home.root().display()
    )
}
