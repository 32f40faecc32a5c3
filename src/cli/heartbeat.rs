//! `automaton heartbeat`: show and change the agent's schedule (heartbeat.yaml), and run an entry by hand.
//!
//! Changes are written to heartbeat.yaml and committed to the home's history; a running agent picks them up
//! within a second, without a restart.

use std::io::Write;
use std::sync::Arc;

use anyhow::Context;
use chrono::Utc;
use clap::{Args, Subcommand};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::audit::Actor;
use crate::heartbeat::{
    self, store, Cadence, Edit, Entry, HeartbeatFile, RunOutcome, Scheduler, SystemClock,
    TaskRegistry,
};
use crate::home::Home;
use crate::state::Db;

#[derive(Debug, Args)]
pub struct HeartbeatArgs {
    #[command(subcommand)]
    command: HeartbeatCommand,
}

#[derive(Debug, Subcommand)]
enum HeartbeatCommand {
    /// Show every entry, its task and when it runs next (stretched by the survival tier)
    List {
        /// Print one JSON array on stdout
        #[arg(long)]
        json: bool,
    },
    /// Add an entry that runs TASK on a cron schedule or at an interval
    Add(AddArgs),
    /// Remove an entry
    Remove { name: String },
    /// Enable an entry
    Enable { name: String },
    /// Disable an entry (kept in the file, never run)
    Disable { name: String },
    /// Run an entry now, even if it is disabled or not due, and show how it went
    Run {
        name: String,
        /// Print the run as JSON on stdout
        #[arg(long)]
        json: bool,
    },
    /// List the tasks entries can run
    Tasks,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("cadence").required(true).args(["cron", "every"])))]
struct AddArgs {
    /// Entry name (letters, digits, '_', '-', '.')
    name: String,
    /// 5-field cron expression in UTC, e.g. "*/15 * * * *" (6 fields: leading seconds)
    #[arg(long, value_name = "EXPR")]
    cron: Option<String>,
    /// Interval, e.g. 30s, 5m, 1h, 1d
    #[arg(long, value_name = "DURATION")]
    every: Option<String>,
    /// The task to run (see `automaton heartbeat tasks`)
    #[arg(long)]
    task: String,
    /// A task parameter (repeatable), e.g. --param reason="look at the news"
    #[arg(long = "param", value_name = "KEY=VALUE")]
    params: Vec<String>,
    /// Longest a run may take [default: 30s]
    #[arg(long, value_name = "DURATION")]
    timeout: Option<String>,
    /// Add the entry disabled
    #[arg(long)]
    disabled: bool,
}

pub fn execute(home: &Home, args: HeartbeatArgs) -> anyhow::Result<()> {
    super::init_stderr_tracing();
    if !home.is_set_up() {
        return Err(super::not_set_up(home));
    }
    let tasks = TaskRegistry::builtin();
    match args.command {
        HeartbeatCommand::List { json } => list(home, &tasks, json),
        HeartbeatCommand::Add(add) => {
            let entry = entry_from_args(&tasks, add)?;
            apply(home, &tasks, Edit::Add(Box::new(entry)), "heartbeat add")
        }
        HeartbeatCommand::Remove { name } => {
            apply(home, &tasks, Edit::Remove(name), "heartbeat remove")
        }
        HeartbeatCommand::Enable { name } => {
            apply(home, &tasks, Edit::Enable(name), "heartbeat enable")
        }
        HeartbeatCommand::Disable { name } => {
            apply(home, &tasks, Edit::Disable(name), "heartbeat disable")
        }
        HeartbeatCommand::Run { name, json } => run_now(home, tasks, &name, json),
        HeartbeatCommand::Tasks => {
            let mut out = std::io::stdout().lock();
            for task in tasks.iter() {
                writeln!(out, "{:<16} {}", task.name(), task.description())?;
            }
            Ok(())
        }
    }
}

/// Builds an entry from `heartbeat add` flags, checked exactly as the file would be.
fn entry_from_args(tasks: &TaskRegistry, add: AddArgs) -> anyhow::Result<Entry> {
    let mut params = Map::new();
    for raw in &add.params {
        let (key, value) = raw
            .split_once('=')
            .with_context(|| format!("--param {raw:?}: expected KEY=VALUE"))?;
        params.insert(
            key.trim().to_string(),
            crate::config::yaml::scalar_to_json(value),
        );
    }
    Entry::build(
        tasks,
        &add.name,
        add.cron.as_deref(),
        add.every.as_deref(),
        &add.task,
        params,
        add.timeout.as_deref(),
        !add.disabled,
    )
    .map_err(|e| {
        anyhow::anyhow!(
            "{}",
            e.replacen("schedule:", "--cron:", 1)
                .replacen("every:", "--every:", 1)
        )
    })
}

fn apply(home: &Home, tasks: &TaskRegistry, edit: Edit, command: &str) -> anyhow::Result<()> {
    let outcome = heartbeat::edit(home, tasks, edit, &Actor::command(command))?;
    if outcome.unchanged {
        eprintln!("{}: already so; nothing changed", outcome.item);
        return Ok(());
    }
    match &outcome.change {
        Some(id) => println!("{} (change {})", outcome.item, crate::audit::short(id)),
        None => println!("{}", outcome.item),
    }
    if let Some(warning) = outcome.warning {
        eprintln!("warning: {warning}");
    }
    Ok(())
}

/// One row of `heartbeat list --json`.
#[derive(Debug, Serialize)]
struct ListedEntry {
    name: String,
    /// The cron expression, or `every DURATION`.
    schedule: String,
    task: String,
    enabled: bool,
    /// When the entry runs next (RFC 3339 UTC), already stretched by the tier; null when disabled.
    next_run: Option<String>,
    last_run: Option<String>,
    last_outcome: Option<String>,
    /// The survival tier and the multiplier it puts on this entry's interval.
    tier: String,
    multiplier: f64,
    /// For interval entries: the interval as written and as stretched, in seconds.
    every_secs: Option<f64>,
    effective_every_secs: Option<f64>,
    timeout_secs: u64,
    params: Map<String, Value>,
}

fn list(home: &Home, tasks: &TaskRegistry, json: bool) -> anyhow::Result<()> {
    let (file, _) = HeartbeatFile::load(&home.heartbeat_path(), tasks)?;
    let db = Db::open(&home.db_path())?;
    let (tier, rows, last_runs) = db.call_blocking(|c| {
        Ok((
            heartbeat::current_tier(c)?,
            store::plan_rows(c)?,
            store::last_runs(c)?,
        ))
    })?;
    let tier_m = heartbeat::tier_multiplier(&tier);
    let now = Utc::now();
    let listed: Vec<ListedEntry> = file
        .entries
        .iter()
        .map(|entry| {
            let m = heartbeat::multiplier_for(tasks, entry, tier_m);
            let row = rows.iter().find(|r| r.name == entry.name);
            let (_, next) = heartbeat::plan(entry, row, m, now);
            let last = last_runs
                .iter()
                .find(|r| r.entry.as_deref() == Some(&entry.name));
            let every = match &entry.cadence {
                Cadence::Every { interval, .. } => Some(interval.as_secs_f64()),
                Cadence::Cron { .. } => None,
            };
            ListedEntry {
                name: entry.name.clone(),
                schedule: entry.cadence.describe(),
                task: entry.task.clone(),
                enabled: entry.enabled,
                next_run: next.filter(|_| entry.enabled).map(heartbeat::timestamp),
                last_run: last.map(|r| r.started_at.clone()),
                last_outcome: last.map(|r| r.outcome.clone().unwrap_or_else(|| "running".into())),
                tier: tier.clone(),
                multiplier: m,
                every_secs: every,
                effective_every_secs: every.map(|e| e * m),
                timeout_secs: entry.timeout.as_secs(),
                params: entry.params.clone(),
            }
        })
        .collect();
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&listed)?)?;
        return Ok(());
    }
    if tier_m == 1.0 {
        writeln!(out, "tier: {tier} (schedule at normal pace)")?;
    } else {
        writeln!(
            out,
            "tier: {tier}: every interval is stretched x{tier_m} to save money"
        )?;
    }
    if listed.is_empty() {
        writeln!(
            out,
            "no entries in {}; add one with `automaton heartbeat add`",
            home.heartbeat_path().display()
        )?;
        return Ok(());
    }
    let rows: Vec<[String; 6]> = listed
        .iter()
        .map(|e| {
            let schedule = if e.multiplier != 1.0 {
                match e.effective_every_secs {
                    Some(secs) => format!(
                        "{} (x{} = {})",
                        e.schedule,
                        e.multiplier,
                        humantime::format_duration(std::time::Duration::from_secs_f64(secs))
                    ),
                    None => format!("{} (x{})", e.schedule, e.multiplier),
                }
            } else {
                e.schedule.clone()
            };
            let next = match &e.next_run {
                Some(t) => {
                    let due = heartbeat::parse_timestamp(t)
                        .map(|t| t - now)
                        .map(|d| {
                            if d.num_seconds() <= 0 {
                                "due now".to_string()
                            } else {
                                format!(
                                    "in {}",
                                    humantime::format_duration(std::time::Duration::from_secs(
                                        d.num_seconds() as u64
                                    ))
                                )
                            }
                        })
                        .unwrap_or_default();
                    format!("{} ({due})", &t[..t.len().min(19)])
                }
                None => "-".to_string(),
            };
            let last = match (&e.last_run, &e.last_outcome) {
                (Some(t), Some(o)) => format!("{} {o}", &t[..t.len().min(19)]),
                _ => "never".to_string(),
            };
            [
                e.name.clone(),
                schedule,
                e.task.clone(),
                if e.enabled { "yes" } else { "no" }.to_string(),
                next,
                last,
            ]
        })
        .collect();
    let header = [
        "NAME",
        "SCHEDULE",
        "TASK",
        "ENABLED",
        "NEXT RUN (UTC)",
        "LAST RUN",
    ];
    let widths: Vec<usize> = (0..6)
        .map(|i| {
            rows.iter()
                .map(|r| r[i].chars().count())
                .chain(std::iter::once(header[i].len()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: &[String]| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    writeln!(out, "{}", line(&header.map(str::to_string)))?;
    for row in &rows {
        writeln!(out, "{}", line(row))?;
    }
    Ok(())
}

fn run_now(home: &Home, tasks: TaskRegistry, name: &str, json: bool) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let record = runtime.block_on(async {
        let db = Db::open(&home.db_path())?;
        let scheduler = Scheduler::new(home.clone(), db, Arc::new(SystemClock), tasks);
        anyhow::Ok(scheduler.run_now(name).await?)
    })?;
    if json {
        println!("{}", serde_json::to_string_pretty(&record)?);
    } else {
        let detail = record
            .summary
            .clone()
            .or_else(|| record.error.clone())
            .unwrap_or_default();
        println!(
            "{} ({}): {} in {} ms: {detail}{}",
            record.entry,
            record.task,
            record.outcome.as_str(),
            (record.ended_at - record.started_at).num_milliseconds(),
            if record.woke { " (woke the agent)" } else { "" }
        );
    }
    if record.outcome != RunOutcome::Ok {
        return Err(super::ExitError {
            code: 1,
            message: format!(
                "heartbeat entry {} {}",
                record.entry,
                record.outcome.as_str()
            ),
        }
        .into());
    }
    Ok(())
}
