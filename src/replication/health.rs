//! How the parent sees its children: each check asks the child's HTTP face (`/.well-known/automaton.json`), its
//! `automaton status --json` over the provider (running, balance) and, when the child's HTTP face is silent, its
//! Nostr card. A child that answers is `alive`; one silent for `replication.unhealthy_after_secs` is
//! `unhealthy`, for `dead_after_secs` `dead` (as is one whose card says so). Also: stopping, funding more, and
//! cleaning up after a dead or failed child (its VM let go).

use std::time::Duration;

use chrono::{DateTime, Utc};
use nostr::{Filter, Kind};

use super::site;
use super::{set, transition, Child, ChildState, ReplicationError, FUND_PURPOSE};
use crate::compute::lnvps::{RentPayer, VmManager};
use crate::config::Config;
use crate::home::Home;
use crate::state::{now_rfc3339, Db};

const HTTP_TIMEOUT: Duration = Duration::from_secs(5);
const STATUS_TIMEOUT: Duration = Duration::from_secs(30);

/// What one look at a child found.
#[derive(Debug, Default)]
struct Observation {
    /// The child answered as running (its HTTP face, or `status` says `running`).
    seen: bool,
    balance_sats: Option<u64>,
    /// `alive`, `critical`, `dead`, … from automaton.json or its card.
    card_status: Option<String>,
}

/// Looks at one child and moves it along `funded → alive ⇄ unhealthy → dead`. Children still spawning, cleaned
/// up or failed are returned as they are.
pub async fn check(
    home: &Home,
    config: &Config,
    db: &Db,
    name: &str,
) -> Result<Child, ReplicationError> {
    let child = super::require(db, name).await?;
    if !matches!(
        child.state,
        ChildState::Funded | ChildState::Alive | ChildState::Unhealthy | ChildState::Dead
    ) {
        return Ok(child);
    }
    let seen = observe(home, config, db, &child).await;
    let now = Utc::now();
    if let Some(balance) = seen.balance_sats {
        set(db, name, "balance_sats", (balance as i64).into()).await?;
    }
    if let Some(status) = &seen.card_status {
        set(db, name, "card_status", status.clone().into()).await?;
    }
    if seen.seen {
        set(db, name, "last_seen_at", now_rfc3339().into()).await?;
    }
    let balance = seen.balance_sats.or(child.balance_sats);
    // A child that still runs but says it is dead (out of money) is alive to its parent, which may fund it.
    let next = if seen.card_status.as_deref() == Some("dead") && !seen.seen {
        ChildState::Dead
    } else if seen.seen {
        if child.state == ChildState::Funded && balance.unwrap_or(0) == 0 {
            ChildState::Funded
        } else {
            ChildState::Alive
        }
    } else {
        // Silent since it was last seen, or (never seen) since its last state change.
        let last_change = super::transitions(db, name)
            .await?
            .last()
            .map(|t| t.at.clone());
        let since = child
            .last_seen_at
            .clone()
            .or(last_change)
            .as_deref()
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .map(|t| (now - t.with_timezone(&Utc)).num_seconds().max(0) as u64)
            .unwrap_or(0);
        if since >= config.replication.dead_after_secs {
            ChildState::Dead
        } else if since >= config.replication.unhealthy_after_secs
            && child.state != ChildState::Dead
        {
            ChildState::Unhealthy
        } else {
            child.state
        }
    };
    if next != child.state && child.state.may_become(next) {
        let detail = match next {
            ChildState::Alive => Some(format!("balance {} sats", balance.unwrap_or(0))),
            ChildState::Dead if seen.card_status.as_deref() == Some("dead") => {
                Some("silent, and its card says dead".into())
            }
            ChildState::Unhealthy | ChildState::Dead => Some("silent".into()),
            _ => None,
        };
        transition(db, name, next, detail).await?;
    }
    super::require(db, name).await
}

async fn observe(home: &Home, config: &Config, db: &Db, child: &Child) -> Observation {
    let mut seen = Observation::default();
    if let Some(url) = &child.http_url {
        match crate::nostr::discover::fetch_description(url, HTTP_TIMEOUT).await {
            Ok(description) => {
                seen.seen = true;
                seen.card_status = description.status;
            }
            Err(e) => tracing::debug!(child = %child.name, error = %e, "child's HTTP face silent"),
        }
    }
    match site::open(home, config, db, child).await {
        Ok(site) => match site.automaton_json("status", STATUS_TIMEOUT).await {
            Ok(status) => {
                if status["running"] == true {
                    seen.seen = true;
                }
                seen.balance_sats = status["balance_sats"]
                    .as_u64()
                    .or(status["wallet"]["balance_sats"].as_u64());
            }
            Err(e) => tracing::debug!(child = %child.name, error = %e, "child's status unreadable"),
        },
        Err(e) => tracing::debug!(child = %child.name, error = %e, "child's machine unreachable"),
    }
    if seen.card_status.is_none() {
        seen.card_status = card_status(home, config, child).await;
    }
    seen
}

/// The status on the child's latest Nostr card, if a relay has one.
async fn card_status(home: &Home, config: &Config, child: &Child) -> Option<String> {
    latest_card(home, config, child)
        .await?
        .status
        .map(|s| s.as_str().to_string())
}

/// The child's latest card as a relay has it (for `child show`).
pub async fn latest_card(
    home: &Home,
    config: &Config,
    child: &Child,
) -> Option<crate::nostr::card::AgentCard> {
    let author = crate::nostr::parse_public_key(child.npub.as_deref()?).ok()?;
    let relays = crate::nostr::relays::RelaySet::from_config(config).ok()?;
    if relays.is_empty() {
        return None;
    }
    let keys = crate::nostr::keys::agent_keys(home).ok()?;
    let client = crate::nostr::relays::client(&keys, &relays).await.ok()?;
    crate::nostr::relays::wait_connected(&client, Duration::from_secs(3)).await;
    let filter = Filter::new()
        .kind(Kind::Custom(crate::nostr::CARD_KIND))
        .author(author)
        .limit(5);
    let events = crate::nostr::relays::fetch(&client, filter, Duration::from_secs(3))
        .await
        .ok()?;
    client.shutdown().await;
    events
        .iter()
        .filter_map(|e| crate::nostr::card::parse_card(e).ok())
        .max_by_key(|c| c.created_at)
}

/// Stops the child's agent (its supervisor too). The health check then sees it silent.
pub async fn stop(
    home: &Home,
    config: &Config,
    db: &Db,
    name: &str,
) -> Result<(), ReplicationError> {
    let child = super::require(db, name).await?;
    let site = site::open(home, config, db, &child).await?;
    site.stop().await
}

/// Sends `sats` more to a running child: an invoice from the child, paid through the budget gate (purpose
/// `replication.fund`). Returns the payment hash.
pub async fn fund(
    home: &Home,
    config: &Config,
    db: &Db,
    name: &str,
    sats: u64,
    payer: &dyn RentPayer,
) -> Result<String, ReplicationError> {
    let child = super::require(db, name).await?;
    if !matches!(
        child.state,
        ChildState::Funded | ChildState::Alive | ChildState::Unhealthy
    ) {
        return Err(ReplicationError::Refused(format!(
            "child {name} is {}: only a running child can be funded",
            child.state
        )));
    }
    let site = site::open(home, config, db, &child).await?;
    let invoice = site
        .automaton_json(
            &format!(
                "wallet invoice {sats} --memo {} --purpose replication.gift",
                crate::compute::ssh::quote(&format!("from {}", config.name))
            ),
            Duration::from_secs(120),
        )
        .await?;
    let bolt11 = invoice["bolt11"]
        .as_str()
        .ok_or_else(|| ReplicationError::Failed("the child's invoice has no bolt11".into()))?;
    let hash = payer
        .pay(bolt11, FUND_PURPOSE)
        .await
        .map_err(|e| ReplicationError::PaymentFailed(format!("not sent: {e}")))?;
    let total = child.funded_sats.unwrap_or(0) + sats;
    set(db, name, "funded_sats", (total as i64).into()).await?;
    Ok(hash)
}

/// Lets a dead or failed child go: its process stopped where the machine still answers, its VM let go (no more
/// rent), its state `cleaned_up`.
pub async fn clean_up(
    home: &Home,
    config: &Config,
    db: &Db,
    name: &str,
) -> Result<Child, ReplicationError> {
    let child = super::require(db, name).await?;
    if !matches!(child.state, ChildState::Dead | ChildState::Failed) {
        return Err(ReplicationError::Refused(format!(
            "child {name} is {}: only a dead or failed child can be pruned (stop it first with `automaton child \
             stop {name}` and wait until it is dead)",
            child.state
        )));
    }
    let stopped = match site::open(home, config, db, &child).await {
        Ok(site) => site.stop().await.map(|_| "stopped".to_string()),
        Err(e) => Err(e),
    };
    let mut detail = match stopped {
        Ok(s) => s,
        Err(e) => format!("not stopped ({e})"),
    };
    if let (Some(id), "lnvps") = (child.vm_id, child.provider.as_str()) {
        let manager = VmManager::for_home(home, config, db.clone())?;
        manager.release(id).await?;
        detail.push_str(&format!("; VM {id} let go"));
    }
    transition(db, name, ChildState::CleanedUp, Some(detail)).await?;
    super::require(db, name).await
}

/// The heartbeat's work for the family: resume unfinished spawns, give up on ones that failed too often and clean
/// them up, then check every running child. Returns one line per child.
pub async fn tick(
    home: &Home,
    config: &Config,
    db: &Db,
    payer: &dyn RentPayer,
) -> Result<Vec<String>, ReplicationError> {
    let mut lines = Vec::new();
    for child in super::list(db).await? {
        let name = child.name.clone();
        let line = if child.state.is_spawning() {
            let spawner = super::spawn::Spawner {
                home,
                config,
                db,
                payer,
                progress: &|step| tracing::info!(step, "resuming a spawn"),
            };
            match spawner.drive(&name).await {
                Ok(c) => format!("{name}: spawn resumed, now {}", c.state),
                Err(ReplicationError::Refused(why)) => format!("{name}: {why}"),
                Err(e) => format!("{name}: spawn attempt failed: {e}"),
            }
        } else if child.state == ChildState::Failed {
            match clean_up(home, config, db, &name).await {
                Ok(_) => format!("{name}: failed spawn cleaned up"),
                Err(e) => format!("{name}: failed spawn not cleaned up: {e}"),
            }
        } else if child.state == ChildState::CleanedUp {
            continue;
        } else {
            match check(home, config, db, &name).await {
                Ok(c) => format!(
                    "{name}: {}{}",
                    c.state,
                    c.balance_sats
                        .map(|b| format!(", {b} sats"))
                        .unwrap_or_default()
                ),
                Err(e) => format!("{name}: not checked: {e}"),
            }
        };
        lines.push(line);
    }
    Ok(lines)
}
