//! `automaton status`: who the agent is and what it has been doing, read from its config and DB.

use clap::Args;
use serde::Serialize;

use crate::config::{env_overrides, Config, ConfigError, Override};
use crate::home::{AgentLock, Home};
use crate::state::{history, Db};

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print one JSON document on stdout
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct StatusReport {
    name: String,
    home: String,
    running: bool,
    pid: Option<u32>,
    /// While the agent sleeps: until when (RFC 3339) and why.
    sleeping_until: Option<String>,
    sleep_reason: Option<String>,
    inference: InferenceStatus,
    compute_provider: String,
    creator: crate::config::CreatorConfig,
    http: crate::config::HttpConfig,
    /// Survival tier: unknown until the agent has a wallet to measure.
    tier: Option<String>,
    wallet: WalletStatus,
    limits: crate::config::LimitsConfig,
    totals: history::Totals,
    last_turn: Option<LastTurn>,
    pending_wake_events: i64,
}

#[derive(Debug, Serialize)]
struct InferenceStatus {
    provider: String,
    base_url: String,
    model: String,
    /// `set`, `not_needed` (no key configured) or `unavailable` (see `api_key_error`).
    api_key: &'static str,
    /// Where the key is read from (`env:VAR` or `file:PATH`), never the key.
    api_key_source: Option<String>,
    api_key_error: Option<String>,
}

#[derive(Debug, Serialize)]
struct WalletStatus {
    status: &'static str,
    network: String,
}

#[derive(Debug, Serialize)]
struct LastTurn {
    id: String,
    started_at: String,
    ended_at: Option<String>,
    input_source: String,
    outcome: String,
    tool_calls: i64,
}

pub fn execute(home: &Home, overrides: &[Override], args: StatusArgs) -> anyhow::Result<()> {
    super::init_stderr_tracing();
    let config = match Config::load_with(home, &env_overrides(), overrides) {
        Ok(config) => config,
        Err(ConfigError::NotFound { .. }) => return Err(super::not_set_up(home)),
        Err(err) => return Err(err.into()),
    };
    let pid = AgentLock::holder(home)?;

    let (totals, last_turn, pending_wake_events, sleep) = if home.db_path().exists() {
        let db = Db::open(&home.db_path())?;
        db.call_blocking(|conn| {
            let totals = history::totals(conn)?;
            let last = history::last_turn(conn)?;
            let last = match last {
                Some(turn) => {
                    let calls: i64 = conn.query_row(
                        "SELECT count(*) FROM tool_calls WHERE turn_id = ?1",
                        [&turn.id],
                        |r| r.get(0),
                    )?;
                    Some(LastTurn {
                        id: turn.id,
                        started_at: turn.started_at,
                        ended_at: turn.ended_at,
                        input_source: turn.input_source,
                        outcome: turn.outcome,
                        tool_calls: calls,
                    })
                }
                None => None,
            };
            let sleep = (
                history::kv_get(conn, "agent.sleeping_until")?,
                history::kv_get(conn, "agent.sleep_reason")?,
            );
            Ok((totals, last, history::pending_wake_events(conn)?, sleep))
        })?
    } else {
        (history::Totals::default(), None, 0, (None, None))
    };
    // A stopped agent's last sleep note is stale: it is not sleeping, it is not running.
    let (sleeping_until, sleep_reason) = if pid.is_some() { sleep } else { (None, None) };

    let (api_key, api_key_error) = match config.inference_api_key() {
        Ok(Some(_)) => ("set", None),
        Ok(None) => ("not_needed", None),
        Err(err) => ("unavailable", Some(err.to_string())),
    };
    let api_key_source = match (
        &config.inference.api_key_env,
        &config.inference.api_key_file,
    ) {
        (Some(var), _) => Some(format!("env:{var}")),
        (None, Some(file)) => Some(format!("file:{}", file.display())),
        (None, None) => None,
    };

    let report = StatusReport {
        name: config.name.clone(),
        home: home.root().display().to_string(),
        running: pid.is_some(),
        pid: pid.flatten(),
        sleeping_until,
        sleep_reason,
        inference: InferenceStatus {
            provider: config.inference.provider.to_string(),
            base_url: config.inference.base_url.clone(),
            model: config.inference.model.clone(),
            api_key,
            api_key_source,
            api_key_error,
        },
        compute_provider: config.compute.provider.clone(),
        creator: config.creator.clone(),
        http: config.http.clone(),
        tier: None,
        wallet: WalletStatus {
            status: "not_set_up",
            network: config.wallet.network.clone(),
        },
        limits: config.limits.clone(),
        totals,
        last_turn,
        pending_wake_events,
    };

    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", human(&report));
    }
    Ok(())
}

fn human(r: &StatusReport) -> String {
    let mut out = String::new();
    let mut line = |label: &str, value: String| out.push_str(&format!("{label:<12} {value}\n"));
    line("name", r.name.clone());
    line("home", r.home.clone());
    let mut agent = match (r.running, r.pid) {
        (true, Some(pid)) => format!("running (pid {pid})"),
        (true, None) => "running".to_string(),
        (false, _) => "stopped".to_string(),
    };
    if let Some(until) = &r.sleeping_until {
        agent.push_str(&format!(", asleep until {until}"));
        if let Some(reason) = &r.sleep_reason {
            agent.push_str(&format!(": {reason}"));
        }
    }
    line("agent", agent);
    let key = match (r.inference.api_key, &r.inference.api_key_source) {
        ("set", Some(source)) => format!("API key from {source}"),
        ("not_needed", _) => "no API key".to_string(),
        (_, _) => format!(
            "API key UNAVAILABLE: {}",
            r.inference.api_key_error.as_deref().unwrap_or("unknown")
        ),
    };
    line(
        "model",
        format!(
            "{} via {} at {} ({key})",
            r.inference.model, r.inference.provider, r.inference.base_url
        ),
    );
    line("compute", r.compute_provider.clone());
    if let Some(url) = &r.http.public_url {
        line("http", url.clone());
    }
    let creator = [
        r.creator.name.as_deref(),
        r.creator.npub.as_deref(),
        r.creator.node_id.as_deref(),
    ]
    .into_iter()
    .flatten()
    .collect::<Vec<_>>()
    .join(", ");
    if !creator.is_empty() {
        line("creator", creator);
    }
    let t = &r.totals;
    line(
        "turns",
        format!(
            "{} ({} tool calls; {} inference calls, {} failed; {} prompt + {} completion tokens{})",
            t.turns,
            t.tool_calls,
            t.inference_calls,
            t.inference_errors,
            t.prompt_tokens,
            t.completion_tokens,
            if t.inference_cost_sats > 0 {
                format!("; {} sats", t.inference_cost_sats)
            } else {
                String::new()
            }
        ),
    );
    line(
        "last turn",
        match &r.last_turn {
            Some(turn) => format!(
                "{} from {}: {} ({} tool calls)",
                turn.started_at, turn.input_source, turn.outcome, turn.tool_calls
            ),
            None => "none yet".to_string(),
        },
    );
    if r.pending_wake_events > 0 {
        line("wake events", format!("{} pending", r.pending_wake_events));
    }
    line("wallet", format!("not set up ({})", r.wallet.network));
    line("tier", "unknown (no wallet yet)".to_string());
    let l = &r.limits;
    line(
        "limits",
        format!(
            "{} sats per payment, {} per hour, {} per day, reserve {}",
            l.per_payment_sats, l.hourly_sats, l.daily_sats, l.reserve_sats
        ),
    );
    out
}
