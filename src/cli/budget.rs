//! `automaton budget show|set`: the creator's spending limits (in `automaton.yaml`) and what has been spent against
//! them (in the state DB). Works with or without a running agent; a running agent picks up `set` at once.

use anyhow::Context;
use clap::{Args, Subcommand};

use crate::config::{env_overrides, Config, ConfigError, LimitsConfig, Override};
use crate::home::Home;
use crate::money::{self, BudgetSnapshot};
use crate::state::Db;

#[derive(Debug, Args)]
pub struct BudgetArgs {
    #[command(subcommand)]
    command: BudgetCommand,
}

#[derive(Debug, Subcommand)]
enum BudgetCommand {
    /// The limits, what was spent in the last hour and day, payments in flight, approvals waiting
    Show(ShowArgs),
    /// Change limits (written to automaton.yaml; a running agent applies them at once)
    Set(SetArgs),
}

#[derive(Debug, Args)]
struct ShowArgs {
    /// Print one JSON document on stdout
    #[arg(long)]
    json: bool,
}

/// A limit in sats, or `off` where a limit can be switched off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Limit {
    Sats(u64),
    Off,
}

fn parse_limit(raw: &str) -> Result<Limit, String> {
    let text = raw.trim().replace(['_', ','], "");
    match text.to_ascii_lowercase().as_str() {
        "off" | "none" => Ok(Limit::Off),
        n => n
            .parse::<u64>()
            .map(Limit::Sats)
            .map_err(|_| format!("`{raw}` is not a whole number of sats (or `off`)")),
    }
}

fn parse_sats(raw: &str) -> Result<u64, String> {
    match parse_limit(raw)? {
        Limit::Sats(n) => Ok(n),
        Limit::Off => Err("this limit cannot be switched off; give a number of sats".into()),
    }
}

#[derive(Debug, Args)]
struct SetArgs {
    /// Most one payment may take (amount plus routing fee)
    #[arg(long, value_name = "SATS", value_parser = parse_sats)]
    per_payment_sats: Option<u64>,
    /// Most spent in any rolling hour
    #[arg(long, value_name = "SATS", value_parser = parse_sats)]
    hourly_sats: Option<u64>,
    /// Most spent in any rolling 24 hours
    #[arg(long, value_name = "SATS", value_parser = parse_sats)]
    daily_sats: Option<u64>,
    /// Balance floor the agent can never spend below
    #[arg(long, value_name = "SATS", value_parser = parse_sats)]
    reserve_sats: Option<u64>,
    /// Payments above this wait for your approval (`automaton approvals`); `off` for never
    #[arg(long, value_name = "SATS|off", value_parser = parse_limit)]
    approval_above_sats: Option<Limit>,
    /// Most paid to any one counterparty in 24 hours; `off` for no such cap
    #[arg(long, value_name = "SATS|off", value_parser = parse_limit)]
    per_counterparty_sats: Option<Limit>,
    /// Most spent on inference in 24 hours; `off` for no cap
    #[arg(long, value_name = "SATS|off", value_parser = parse_limit)]
    inference_daily_sats: Option<Limit>,
    /// Print one JSON document on stdout
    #[arg(long)]
    json: bool,
}

impl SetArgs {
    fn is_empty(&self) -> bool {
        self.per_payment_sats.is_none()
            && self.hourly_sats.is_none()
            && self.daily_sats.is_none()
            && self.reserve_sats.is_none()
            && self.approval_above_sats.is_none()
            && self.per_counterparty_sats.is_none()
            && self.inference_daily_sats.is_none()
    }

    fn apply(&self, limits: &mut LimitsConfig) {
        let opt = |l: Limit| match l {
            Limit::Sats(n) => Some(n),
            Limit::Off => None,
        };
        if let Some(v) = self.per_payment_sats {
            limits.per_payment_sats = v;
        }
        if let Some(v) = self.hourly_sats {
            limits.hourly_sats = v;
        }
        if let Some(v) = self.daily_sats {
            limits.daily_sats = v;
        }
        if let Some(v) = self.reserve_sats {
            limits.reserve_sats = v;
        }
        if let Some(v) = self.approval_above_sats {
            limits.approval_above_sats = opt(v);
        }
        if let Some(v) = self.per_counterparty_sats {
            limits.per_counterparty_sats = opt(v);
        }
        if let Some(v) = self.inference_daily_sats {
            limits.inference_daily_sats = opt(v);
        }
    }
}

pub fn execute(home: &Home, overrides: &[Override], args: BudgetArgs) -> anyhow::Result<()> {
    super::init_stderr_tracing();
    match args.command {
        BudgetCommand::Show(a) => {
            let config = load(home, overrides)?;
            let snapshot = snapshot(home, &config.limits)?;
            print(a.json, &snapshot)
        }
        BudgetCommand::Set(a) => set(home, overrides, a),
    }
}

fn load(home: &Home, overrides: &[Override]) -> anyhow::Result<Config> {
    match Config::load_with(home, &env_overrides(), overrides) {
        Ok(config) => Ok(config),
        Err(ConfigError::NotFound { .. }) => Err(super::not_set_up(home)),
        Err(err) => Err(err.into()),
    }
}

fn snapshot(home: &Home, limits: &LimitsConfig) -> anyhow::Result<BudgetSnapshot> {
    let db = Db::open(&home.db_path())?;
    let limits = limits.clone();
    Ok(db.call_blocking(move |conn| money::snapshot_of(conn, &limits))?)
}

fn set(home: &Home, overrides: &[Override], args: SetArgs) -> anyhow::Result<()> {
    if args.is_empty() {
        anyhow::bail!(
            "nothing to set: give at least one of --per-payment-sats, --hourly-sats, --daily-sats, --reserve-sats, \
             --approval-above-sats, --per-counterparty-sats, --inference-daily-sats"
        );
    }
    let path = home.config_path();
    // Hold the home's edit lock so a running agent's own config edits and this one never interleave.
    let lock = crate::audit::lock(home);
    if let Err(err) = &lock {
        tracing::warn!(error = %err, "cannot take the home's edit lock; writing anyway");
    }
    // Only the file's own settings are written back: environment and -c overrides stay where they are.
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            return Err(super::not_set_up(home))
        }
        Err(err) => return Err(err).with_context(|| format!("cannot read {}", path.display())),
    };
    let mut file_config = Config::from_yaml(&text, &path)?;
    let before = file_config.limits.clone();
    args.apply(&mut file_config.limits);
    let origin = "automaton budget set";
    file_config
        .validate(origin)
        .map_err(|e| anyhow::anyhow!("{e}; nothing was written"))?;
    if file_config.limits != before {
        file_config.write(home)?;
        let item = describe_change(&before, &file_config.limits);
        match crate::audit::record(home, &crate::audit::Actor::command("budget set"), &item) {
            Ok(_) => {}
            Err(err) => {
                tracing::warn!(error = %err, "the change was written but not committed to the home's history")
            }
        }
    }
    drop(lock);
    // What is in force now includes env and -c overrides on top of the file.
    let config = load(home, overrides)?;
    let snapshot = snapshot(home, &config.limits)?;
    if !args.json {
        if file_config.limits == before {
            eprintln!("nothing changed: the limits already had these values");
        } else {
            eprintln!("budget updated in {}", path.display());
        }
    }
    print(args.json, &snapshot)
}

fn describe_change(before: &LimitsConfig, after: &LimitsConfig) -> String {
    let show = |v: Option<u64>| v.map(|n| n.to_string()).unwrap_or_else(|| "off".into());
    let mut parts = Vec::new();
    let mut diff = |name: &str, a: Option<u64>, b: Option<u64>| {
        if a != b {
            parts.push(format!("{name} {} → {}", show(a), show(b)));
        }
    };
    diff(
        "per_payment_sats",
        Some(before.per_payment_sats),
        Some(after.per_payment_sats),
    );
    diff(
        "hourly_sats",
        Some(before.hourly_sats),
        Some(after.hourly_sats),
    );
    diff(
        "daily_sats",
        Some(before.daily_sats),
        Some(after.daily_sats),
    );
    diff(
        "reserve_sats",
        Some(before.reserve_sats),
        Some(after.reserve_sats),
    );
    diff(
        "approval_above_sats",
        before.approval_above_sats,
        after.approval_above_sats,
    );
    diff(
        "per_counterparty_sats",
        before.per_counterparty_sats,
        after.per_counterparty_sats,
    );
    diff(
        "inference_daily_sats",
        before.inference_daily_sats,
        after.inference_daily_sats,
    );
    format!("budget: {}", parts.join(", "))
}

fn print(json: bool, snapshot: &BudgetSnapshot) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(snapshot)?);
    } else {
        print!("{}", human(snapshot));
    }
    Ok(())
}

fn sats(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn human(s: &BudgetSnapshot) -> String {
    let opt = |v: Option<u64>| v.map(sats).unwrap_or_else(|| "off".into());
    let mut out = String::new();
    out.push_str(&format!(
        "{:<26}{:>12}{:>12}{:>12}\n",
        "budget (sats)", "limit", "spent", "left"
    ));
    out.push_str(&format!(
        "{:<26}{:>12}\n",
        "per payment",
        sats(s.per_payment_sats)
    ));
    out.push_str(&format!(
        "{:<26}{:>12}{:>12}{:>12}\n",
        "last hour",
        sats(s.hourly_sats),
        sats(s.spent_hour_sats),
        sats(s.remaining_hour_sats)
    ));
    out.push_str(&format!(
        "{:<26}{:>12}{:>12}{:>12}\n",
        "last 24 h",
        sats(s.daily_sats),
        sats(s.spent_day_sats),
        sats(s.remaining_day_sats)
    ));
    out.push_str(&format!(
        "{:<26}{:>12}{:>12}\n",
        "inference, last 24 h",
        opt(s.inference_daily_sats),
        sats(s.inference_day_sats)
    ));
    out.push_str(&format!(
        "{:<26}{:>12}\n",
        "reserve floor",
        sats(s.reserve_sats)
    ));
    out.push_str(&format!(
        "{:<26}{:>12}\n",
        "approval above",
        opt(s.approval_above_sats)
    ));
    out.push_str(&format!(
        "{:<26}{:>12}\n",
        "per counterparty, 24 h",
        opt(s.per_counterparty_sats)
    ));
    for (name, cap) in &s.counterparty_sats {
        out.push_str(&format!("{:<26}{:>12}\n", format!("  {name}"), sats(*cap)));
    }
    if !s.allow.is_empty() {
        out.push_str(&format!("allow: {}\n", s.allow.join(", ")));
    }
    if !s.deny.is_empty() {
        out.push_str(&format!("deny: {}\n", s.deny.join(", ")));
    }
    if s.default_deny {
        out.push_str("default deny: only the allow list can be paid\n");
    }
    out.push_str(&format!("in flight: {} sats\n", sats(s.in_flight_sats)));
    if s.frozen {
        out.push_str(&format!(
            "FROZEN since {}{}: nothing can be paid (`automaton wallet unfreeze`)\n",
            s.frozen_since.as_deref().unwrap_or("?"),
            s.frozen_reason
                .as_deref()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default()
        ));
    }
    if s.pending_approvals > 0 {
        out.push_str(&format!(
            "approvals waiting: {} (`automaton approvals list`)\n",
            s.pending_approvals
        ));
    }
    out.push_str(&format!(
        "tier: {}{}\n",
        s.tier,
        s.balance_sats
            .map(|b| format!(" (last balance {} sats)", sats(b)))
            .unwrap_or_default()
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_parse_numbers_and_off() {
        assert_eq!(parse_limit("1_000"), Ok(Limit::Sats(1000)));
        assert_eq!(parse_limit("25,000"), Ok(Limit::Sats(25000)));
        assert_eq!(parse_limit("OFF"), Ok(Limit::Off));
        assert!(parse_limit("-5").is_err());
        assert!(parse_sats("off").is_err());
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(sats(0), "0");
        assert_eq!(sats(999), "999");
        assert_eq!(sats(1000), "1,000");
        assert_eq!(sats(1234567), "1,234,567");
    }
}
