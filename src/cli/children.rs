//! `automaton spawn`, `automaton children` and `automaton child …`: create a funded child on another machine and
//! look after the family. Spawning and funding pay through the running agent (its budget gate); listings work
//! while it is stopped.

use clap::{Args, Subcommand};
use serde_json::{json, Value};

use super::ExitError;
use crate::compute::lnvps::SocketPayer;
use crate::config::{env_overrides, Config, ConfigError, Override};
use crate::home::Home;
use crate::replication::spawn::{SpawnRequest, Spawner};
use crate::replication::{self, health, messages, ReplicationError};
use crate::state::Db;

#[derive(Debug, Args)]
pub struct SpawnArgs {
    /// The child's name (lowercase letters, digits, '-', '_'); spawning an unfinished child's name resumes it
    #[arg(long)]
    name: String,
    /// What the child is for (becomes part of its genesis prompt)
    #[arg(long)]
    specialization: String,
    /// Sats to give the child once it runs (paid over Lightning through the budget gate)
    #[arg(long)]
    fund_sats: u64,
    /// Where the child lives: a VM rented at LNVPS, the configured SSH host, another home on this machine, or
    /// the configured Conway sandbox
    #[arg(long, default_value = "lnvps", value_parser = ["lnvps", "ssh", "local", "conway"])]
    provider: String,
    /// LNVPS template id or name [default: the cheapest]
    #[arg(long)]
    template: Option<String>,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct ChildrenArgs {
    /// Also list children that were cleaned up
    #[arg(long)]
    all: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct ChildArgs {
    #[command(subcommand)]
    command: ChildCommand,
}

#[derive(Debug, Subcommand)]
enum ChildCommand {
    /// One child: its state, history, card and messages; checked now unless --cached
    Show(ShowArgs),
    /// Send the child a private message (Nostr, NIP-17); it reaches the child's agent loop
    Message(MessageArgs),
    /// Send the child more sats (an invoice from the child, paid through the budget gate)
    Fund(FundArgs),
    /// Stop the child's agent (the health check then finds it silent: unhealthy, then dead)
    Stop(NameArgs),
    /// Let a dead or failed child go: its process stopped, its VM let go, its state cleaned_up
    Prune(NameArgs),
}

#[derive(Debug, Args)]
struct ShowArgs {
    name: String,
    /// Show what was last recorded, without asking the child
    #[arg(long)]
    cached: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct MessageArgs {
    name: String,
    text: String,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct FundArgs {
    name: String,
    sats: u64,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct NameArgs {
    name: String,
    #[arg(long)]
    json: bool,
}

fn load(home: &Home, overrides: &[Override]) -> anyhow::Result<Config> {
    match Config::load_with(home, &env_overrides(), overrides) {
        Ok(config) => Ok(config),
        Err(ConfigError::NotFound { .. }) => Err(super::not_set_up(home)),
        Err(err) => Err(err.into()),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// Maps a replication error to its exit code: refused 2, payment failed 3 (or the control socket's code).
fn exit(e: ReplicationError, payer: Option<&SocketPayer>) -> anyhow::Error {
    // The control socket's code when it refused (2) or failed (3) a payment; "no agent running" stays an error.
    let socket = payer
        .and_then(|p| p.failure_code())
        .filter(|c| matches!(c, 2 | 3));
    let code = match &e {
        ReplicationError::Refused(_) => 2,
        ReplicationError::PaymentFailed(_) => socket.unwrap_or(3),
        _ => socket.unwrap_or(1),
    };
    ExitError {
        code,
        message: e.to_string(),
    }
    .into()
}

pub fn spawn(home: &Home, overrides: &[Override], args: SpawnArgs) -> anyhow::Result<()> {
    super::init_stderr_tracing();
    let config = load(home, overrides)?;
    runtime()?.block_on(async {
        let db = Db::open(&home.db_path())?;
        let request = SpawnRequest {
            name: args.name.clone(),
            specialization: args.specialization,
            fund_sats: args.fund_sats,
            provider: args.provider,
            template: args.template,
        };
        let child = replication::spawn::request(home, &config, &db, &request)
            .await
            .map_err(|e| exit(e, None))?;
        if child.state != replication::ChildState::Requested {
            eprintln!("resuming the spawn of {} (at {})", child.name, child.state);
        }
        let payer = SocketPayer::new(home);
        let spinner = super::spinner(&format!("spawning {}", child.name));
        let progress = {
            let spinner = spinner.clone();
            move |step: &str| spinner.set_message(step.to_string())
        };
        let spawner = Spawner {
            home,
            config: &config,
            db: &db,
            payer: &payer,
            progress: &progress,
        };
        let result = spawner.drive(&child.name).await;
        spinner.finish_and_clear();
        let funded = replication::get(&db, &args.name)
            .await
            .ok()
            .flatten()
            .is_some_and(|c| !c.state.is_spawning());
        let child = result.map_err(|e| {
            let resume = if funded {
                format!(
                    "{e}\n(the child is funded; the running agent keeps checking it: `automaton child show {}`)",
                    args.name
                )
            } else {
                format!(
                    "{e}\n(run the same `automaton spawn --name {}` again to resume; the running agent also resumes it)",
                    args.name
                )
            };
            exit(
                match e {
                    ReplicationError::Refused(m) => ReplicationError::Refused(m),
                    ReplicationError::PaymentFailed(_) => ReplicationError::PaymentFailed(resume),
                    _ => ReplicationError::Failed(resume),
                },
                Some(&payer),
            )
        })?;
        print_child(args.json, &serde_json::to_value(&child)?)
    })
}

pub fn children(home: &Home, args: ChildrenArgs) -> anyhow::Result<()> {
    if !home.is_set_up() {
        return Err(super::not_set_up(home));
    }
    runtime()?.block_on(async {
        let db = Db::open(&home.db_path())?;
        let list: Vec<_> = replication::list(&db)
            .await?
            .into_iter()
            .filter(|c| args.all || c.state != replication::ChildState::CleanedUp)
            .collect();
        if !args.json && list.is_empty() {
            eprintln!("no children (spawn one with `automaton spawn`)");
            return Ok(());
        }
        let value = serde_json::to_value(&list)?;
        super::print_lines(args.json, &value, line)
    })
}

pub fn child(home: &Home, overrides: &[Override], args: ChildArgs) -> anyhow::Result<()> {
    super::init_stderr_tracing();
    let config = load(home, overrides)?;
    runtime()?.block_on(async {
        let db = Db::open(&home.db_path())?;
        match args.command {
            ChildCommand::Show(a) => {
                let child = if a.cached {
                    replication::require(&db, &a.name).await
                } else {
                    health::check(home, &config, &db, &a.name).await
                }
                .map_err(|e| exit(e, None))?;
                let card = if a.cached {
                    None
                } else {
                    health::latest_card(home, &config, &child).await
                };
                let mut value = serde_json::to_value(&child)?;
                value["transitions"] =
                    serde_json::to_value(replication::transitions(&db, &a.name).await?)?;
                value["messages"] = Value::Array(
                    messages::history(&db, &format!("child:{}", a.name))
                        .await
                        .map_err(|e| exit(e, None))?,
                );
                value["card"] = serde_json::to_value(card)?;
                if a.json {
                    println!("{}", serde_json::to_string_pretty(&value)?);
                } else {
                    println!("{}", line(&value));
                    for t in value["transitions"].as_array().into_iter().flatten() {
                        println!(
                            "  {}  {} -> {}  {}",
                            t["at"].as_str().unwrap_or_default(),
                            t["from"].as_str().unwrap_or("-"),
                            t["to"].as_str().unwrap_or_default(),
                            t["detail"].as_str().unwrap_or_default()
                        );
                    }
                    if let Some(e) = value["last_error"].as_str() {
                        println!("  last error: {e}");
                    }
                }
                Ok(())
            }
            ChildCommand::Message(a) => {
                let child = replication::require(&db, &a.name)
                    .await
                    .map_err(|e| exit(e, None))?;
                let npub = child.npub.ok_or_else(|| {
                    anyhow::anyhow!("child {} has no npub yet (its setup has not run)", a.name)
                })?;
                let id = messages::send(
                    home,
                    &config,
                    &db,
                    &format!("child:{}", a.name),
                    &npub,
                    &a.text,
                )
                .await
                .map_err(|e| exit(e, None))?;
                super::print_lines(a.json, &json!({"child": a.name, "event_id": id}), |v| {
                    format!(
                        "sent to {} (event {})",
                        a.name,
                        v["event_id"].as_str().unwrap_or_default()
                    )
                })
            }
            ChildCommand::Fund(a) => {
                let payer = SocketPayer::new(home);
                let hash = health::fund(home, &config, &db, &a.name, a.sats, &payer)
                    .await
                    .map_err(|e| exit(e, Some(&payer)))?;
                super::print_lines(
                    a.json,
                    &json!({"child": a.name, "amount_sats": a.sats, "payment_hash": hash}),
                    |_| format!("sent {} sats to {} (payment {hash})", a.sats, a.name),
                )
            }
            ChildCommand::Stop(a) => {
                health::stop(home, &config, &db, &a.name)
                    .await
                    .map_err(|e| exit(e, None))?;
                super::print_lines(a.json, &json!({"child": a.name, "stopped": true}), |_| {
                    format!("{} stopped", a.name)
                })
            }
            ChildCommand::Prune(a) => {
                let child = health::clean_up(home, &config, &db, &a.name)
                    .await
                    .map_err(|e| exit(e, None))?;
                print_child(a.json, &serde_json::to_value(&child)?)
            }
        }
    })
}

fn line(v: &Value) -> String {
    format!(
        "{:<16} {:<11} {:<7} {} sats  node {}  {}",
        v["name"].as_str().unwrap_or_default(),
        v["state"].as_str().unwrap_or_default(),
        v["provider"].as_str().unwrap_or_default(),
        v["balance_sats"]
            .as_u64()
            .map(|b| b.to_string())
            .unwrap_or_else(|| "?".into()),
        v["node_id"]
            .as_str()
            .map(|n| n.chars().take(16).collect::<String>())
            .unwrap_or_else(|| "-".into()),
        v["vm_id"]
            .as_u64()
            .map(|id| format!("VM {id}"))
            .unwrap_or_default()
    )
}

fn print_child(json: bool, value: &Value) -> anyhow::Result<()> {
    super::print_lines(json, value, line)
}
