//! `automaton status`: who the agent is and what it has been doing, read from its config and DB.

use clap::Args;
use serde::Serialize;

use crate::config::{env_overrides, Config, ConfigError, Override};
use crate::home::{AgentLock, Home};
use rusqlite::OptionalExtension;

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
    /// The Lightning node id: the agent's identity (recorded at setup; no node needed).
    node_id: Option<String>,
    npub: Option<String>,
    /// Last known spendable balance (Lightning + on-chain), as the running wallet last recorded it.
    balance_sats: Option<u64>,
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
    /// `ready` (wallet.json present) or `not_set_up`.
    status: &'static str,
    network: String,
    node_id: Option<String>,
    npub: Option<String>,
    balance_sats: Option<u64>,
    /// When the balance was last recorded.
    balance_at: Option<String>,
    frozen: bool,
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

    let money = if home.db_path().exists() {
        let db = Db::open(&home.db_path())?;
        db.call_blocking(read_money)?
    } else {
        MoneyFacts::default()
    };
    let has_wallet = home.wallet_path().exists();
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
        node_id: money.node_id.clone(),
        npub: money.npub.clone(),
        balance_sats: money.balance_sats,
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
        tier: has_wallet.then(|| money.tier.clone()),
        wallet: WalletStatus {
            status: if has_wallet { "ready" } else { "not_set_up" },
            network: config.wallet.network.clone(),
            node_id: money.node_id,
            npub: money.npub,
            balance_sats: money.balance_sats,
            balance_at: money.balance_at,
            frozen: money.frozen,
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
    match (r.wallet.status, &r.wallet.node_id) {
        ("ready", Some(node_id)) => {
            line("node id", format!("{node_id} ({})", r.wallet.network));
            if let Some(npub) = &r.wallet.npub {
                line("npub", npub.clone());
            }
            let mut balance = match (r.wallet.balance_sats, &r.wallet.balance_at) {
                (Some(sats), Some(at)) => format!("{sats} sats (as of {at})"),
                (Some(sats), None) => format!("{sats} sats"),
                _ => "unknown (the node has not reported one yet)".to_string(),
            };
            if r.wallet.frozen {
                balance.push_str("; FROZEN: every payment is refused");
            }
            line("balance", balance);
            line("tier", r.tier.clone().unwrap_or_else(|| "normal".into()));
        }
        _ => {
            line("wallet", format!("not set up ({})", r.wallet.network));
            line("tier", "unknown (no wallet yet)".to_string());
        }
    }
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

/// What the state DB knows about the wallet and its money.
#[derive(Debug, Default)]
struct MoneyFacts {
    node_id: Option<String>,
    npub: Option<String>,
    balance_sats: Option<u64>,
    balance_at: Option<String>,
    tier: String,
    frozen: bool,
}

fn read_money(conn: &mut rusqlite::Connection) -> rusqlite::Result<MoneyFacts> {
    use crate::money::tiers;
    let balance: Option<(String, String)> = conn
        .query_row(
            "SELECT value, updated_at FROM kv WHERE key = ?1",
            [tiers::BALANCE_KEY],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    Ok(MoneyFacts {
        node_id: history::kv_get(conn, crate::wallet::NODE_ID_KEY)?,
        npub: history::kv_get(conn, crate::wallet::NPUB_KEY)?,
        balance_sats: balance.as_ref().and_then(|(v, _)| v.parse().ok()),
        balance_at: balance.map(|(_, at)| at),
        tier: tiers::tier_of(conn)?.as_str().to_string(),
        frozen: crate::money::frozen_state(conn)?.is_some(),
    })
}
