//! `automaton approvals list|approve|deny`: payments above `limits.approval_above_sats` wait here for the creator.
//! Approvals are state-DB rows, so they work whether or not the agent runs; a waiting payment goes through the
//! next time the agent asks for it after `approve`.

use clap::{Args, Subcommand};
use serde_json::json;

use crate::home::Home;
use crate::money::approvals::{self, Approval, ApprovalStatus};
use crate::state::Db;

#[derive(Debug, Args)]
pub struct ApprovalsArgs {
    #[command(subcommand)]
    command: ApprovalsCommand,
}

#[derive(Debug, Subcommand)]
enum ApprovalsCommand {
    /// Payments waiting for your decision (newest first)
    List(ListArgs),
    /// Let a waiting payment go through (once)
    Approve(DecideArgs),
    /// Refuse a waiting payment (the same payment is refused for 24 h)
    Deny(DecideArgs),
}

#[derive(Debug, Args)]
struct ListArgs {
    /// Also show decided, used and expired requests
    #[arg(long)]
    all: bool,
    /// Print one JSON document on stdout
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct DecideArgs {
    /// The request's id (or a unique prefix of it), from `automaton approvals list`
    id: String,
    /// A note kept with the decision (the agent sees a denial's note)
    #[arg(long)]
    note: Option<String>,
    /// Print one JSON document on stdout
    #[arg(long)]
    json: bool,
}

pub fn execute(home: &Home, args: ApprovalsArgs) -> anyhow::Result<()> {
    super::init_stderr_tracing();
    if !home.config_path().exists() {
        return Err(super::not_set_up(home));
    }
    let db = Db::open(&home.db_path())?;
    match args.command {
        ApprovalsCommand::List(a) => {
            let list = approvals::list(&db, a.all)?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else if list.is_empty() {
                eprintln!(
                    "{}",
                    if a.all {
                        "no approval requests yet"
                    } else {
                        "no payments are waiting for approval"
                    }
                );
            } else {
                print!("{}", table(&list));
            }
            Ok(())
        }
        ApprovalsCommand::Approve(a) => decide(&db, a, true),
        ApprovalsCommand::Deny(a) => decide(&db, a, false),
    }
}

fn decide(db: &Db, args: DecideArgs, approve: bool) -> anyhow::Result<()> {
    let result = if approve {
        approvals::approve(db, &args.id, args.note.as_deref())
    } else {
        approvals::deny(db, &args.id, args.note.as_deref())
    };
    let approval = result?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&json!(approval))?);
    } else {
        let what = describe(&approval);
        match approval.status {
            ApprovalStatus::Approved => println!(
                "approved {}: {what}; it goes through the next time the agent pays it (until {})",
                approval.id, approval.expires_at
            ),
            _ => println!("denied {}: {what}", approval.id),
        }
    }
    Ok(())
}

fn describe(a: &Approval) -> String {
    let fee = if a.max_fee_msat > 0 {
        format!(" + up to {} fee", msat(a.max_fee_msat))
    } else {
        String::new()
    };
    format!(
        "{}{fee} via {}{} for \"{}\"",
        msat(a.amount_msat),
        a.rail,
        a.counterparty
            .as_deref()
            .map(|c| format!(" to {c}"))
            .unwrap_or_default(),
        a.purpose
    )
}

fn msat(v: u64) -> String {
    if v.is_multiple_of(1000) {
        format!("{} sats", v / 1000)
    } else {
        format!("{}.{:03} sats", v / 1000, v % 1000)
    }
}

fn table(list: &[Approval]) -> String {
    let mut out = format!(
        "{:<26}  {:<9}  {:<24}  {}\n",
        "ID", "STATUS", "REQUESTED", "PAYMENT"
    );
    for a in list {
        out.push_str(&format!(
            "{:<26}  {:<9}  {:<24}  {}\n",
            a.id,
            a.status.as_str(),
            a.created_at,
            describe(a)
        ));
    }
    out
}
