//! The NIP-47 Nostr Wallet Connect wallet service: connections (a client key, the methods it may call, its own
//! budget per period) kept in the state DB, and the running service that answers their requests on the relays.
//!
//! The service key is the agent's NIP-06 key; each connection has its own random client secret, of which only
//! the public key is stored (the secret is in the URI, shown once). Every request is recorded by event id
//! before it is acted on, so a replayed request gets the stored reply and never a second payment. Payments go
//! through the one money gate (`wallet::spend`) with purpose `nwc:<name>`, after a reservation against the
//! connection's budget that is settled when the payment succeeds and released when it does not.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use ::nostr::nips::nip47::{
    ErrorCode, GetBalanceResponse, GetInfoResponse, ListTransactionsRequest, LookupInvoiceRequest,
    LookupInvoiceResponse, MakeInvoiceRequest, MakeInvoiceResponse, Method, NIP47Error,
    NostrWalletConnectURI, PayInvoiceRequest, PayInvoiceResponse, Request, RequestParams, Response,
    ResponseResult, TransactionState, TransactionType,
};
use ::nostr::nips::{nip04, nip44};
use ::nostr::{
    Event, EventBuilder, Filter, JsonUtil, Keys, Kind, PublicKey, SubscriptionId, Tag, TagKind,
    Timestamp,
};
use chrono::{DateTime, Datelike, TimeZone, Utc};
use rusqlite::{params, Connection as Sql, OptionalExtension, Row};
use serde::Serialize;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::outbox::{self, Purpose};
use super::relays::{self, RelaySet};
use super::NostrError;
use crate::config::Config;
use crate::home::Home;
use crate::money::receipts::{self, Direction, Receipt, ReceiptFilter, ReceiptStatus};
use crate::money::{BudgetError, Rail};
use crate::state::{new_id, now_rfc3339, Db};
use crate::wallet::spend::{self, ApprovalWait};
use crate::wallet::{Wallet, WalletError};

/// The methods this service implements, in the order `get_info` and the info event list them.
pub const SUPPORTED_METHODS: [Method; 6] = [
    Method::GetInfo,
    Method::GetBalance,
    Method::PayInvoice,
    Method::MakeInvoice,
    Method::LookupInvoice,
    Method::ListTransactions,
];

/// How often the service checks its relay subscriptions and its info event.
const TICK: Duration = Duration::from_secs(3);
/// How long a request waits for a node that is still starting.
const READY_WAIT: Duration = Duration::from_secs(20);
/// The subscription id on every relay.
const SUBSCRIPTION: &str = "automaton-nwc";
/// Most transactions one `list_transactions` answer carries.
const MAX_TRANSACTIONS: usize = 500;

/// Why a connection operation failed.
#[derive(Debug, thiserror::Error)]
pub enum NwcError {
    #[error("{0}")]
    Invalid(String),
    #[error("no NWC connection `{0}` (see `automaton nwc list`)")]
    NotFound(String),
    #[error("NWC connection `{0}` is already revoked")]
    AlreadyRevoked(String),
    #[error(transparent)]
    Nostr(#[from] NostrError),
    #[error(transparent)]
    State(#[from] crate::state::StateError),
}

/// How often a connection's budget starts afresh (calendar periods, UTC).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Period {
    Daily,
    Weekly,
    Monthly,
    Yearly,
    /// One budget for the connection's whole life.
    Never,
}

impl Period {
    pub fn as_str(self) -> &'static str {
        match self {
            Period::Daily => "daily",
            Period::Weekly => "weekly",
            Period::Monthly => "monthly",
            Period::Yearly => "yearly",
            Period::Never => "never",
        }
    }

    pub fn parse(text: &str) -> Option<Period> {
        Some(match text {
            "daily" => Period::Daily,
            "weekly" => Period::Weekly,
            "monthly" => Period::Monthly,
            "yearly" => Period::Yearly,
            "never" => Period::Never,
            _ => return None,
        })
    }

    /// When the period containing `now` began (`None`: the budget never renews).
    pub fn start(self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let day = now.date_naive();
        let first = match self {
            Period::Daily => day,
            Period::Weekly => {
                day - chrono::Duration::days(i64::from(day.weekday().num_days_from_monday()))
            }
            Period::Monthly => day.with_day(1)?,
            Period::Yearly => day.with_day(1)?.with_month(1)?,
            Period::Never => return None,
        };
        Utc.from_local_datetime(&first.and_hms_opt(0, 0, 0)?)
            .single()
    }
}

/// One connection, as `nwc list` shows it (never its secret, which is not stored).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NwcConnection {
    pub id: String,
    pub name: String,
    pub client_pubkey: String,
    pub service_pubkey: String,
    pub relays: Vec<String>,
    pub methods: Vec<String>,
    pub budget_sats: u64,
    pub period: Period,
    /// Spent or reserved in the current period, in msat.
    pub spent_msat: u64,
    pub created_at: String,
    pub revoked_at: Option<String>,
}

impl NwcConnection {
    pub fn is_active(&self) -> bool {
        self.revoked_at.is_none()
    }

    fn budget_msat(&self) -> u64 {
        self.budget_sats.saturating_mul(1000)
    }

    fn allows(&self, method: Method) -> bool {
        self.methods.iter().any(|m| m == method.as_str())
    }

    fn purpose(&self) -> String {
        format!("nwc:{}", self.name)
    }
}

/// What `nwc create` asks for.
#[derive(Clone, Debug)]
pub struct NewConnection {
    pub name: Option<String>,
    pub budget_sats: u64,
    pub period: Period,
    /// Empty: every supported method.
    pub methods: Vec<String>,
}

/// A new connection and its URI. The URI holds the client secret: show it once, never log it.
pub struct Created {
    pub connection: NwcConnection,
    pub uri: NostrWalletConnectURI,
}

impl std::fmt::Debug for Created {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Created")
            .field("connection", &self.connection)
            .field("uri", &"[redacted]")
            .finish()
    }
}

/// Creates a connection served by `service` on `relays`, with a fresh random client secret.
pub fn create(
    db: &Db,
    service: &PublicKey,
    relays: &RelaySet,
    new: NewConnection,
) -> Result<Created, NwcError> {
    relays.require()?;
    let methods = parse_methods(&new.methods)?;
    if new.budget_sats == 0 && methods.contains(&Method::PayInvoice) {
        return Err(NwcError::Invalid(
            "--budget-sats must be at least 1 when the connection may pay_invoice".into(),
        ));
    }
    let id = new_id();
    let name = match new.name.map(|n| n.trim().to_string()) {
        Some(n) if !n.is_empty() => n,
        _ => format!("nwc-{}", id[id.len() - 6..].to_ascii_lowercase()),
    };
    let client = Keys::generate();
    let relay_strings: Vec<String> = relays
        .urls()
        .iter()
        .map(|u| u.as_str_without_trailing_slash().to_string())
        .collect();
    let method_names: Vec<String> = methods.iter().map(|m| m.as_str().to_string()).collect();
    let created_at = now_rfc3339();
    let row = (
        id.clone(),
        name.clone(),
        client.public_key().to_hex(),
        service.to_hex(),
        serde_json::to_string(&relay_strings).unwrap_or_else(|_| "[]".into()),
        method_names.join(" "),
        new.budget_sats.saturating_mul(1000) as i64,
        new.period.as_str(),
        created_at.clone(),
    );
    db.call_blocking(move |c| {
        c.execute(
            "INSERT INTO nwc_connections (id, name, client_pubkey, service_pubkey, relays, methods, budget_msat, \
             period, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![row.0, row.1, row.2, row.3, row.4, row.5, row.6, row.7, row.8],
        )
    })?;
    let uri = NostrWalletConnectURI::new(
        *service,
        relays.urls().to_vec(),
        client.secret_key().clone(),
        None,
    );
    Ok(Created {
        connection: NwcConnection {
            id,
            name,
            client_pubkey: client.public_key().to_hex(),
            service_pubkey: service.to_hex(),
            relays: relay_strings,
            methods: method_names,
            budget_sats: new.budget_sats,
            period: new.period,
            spent_msat: 0,
            created_at,
            revoked_at: None,
        },
        uri,
    })
}

fn parse_methods(given: &[String]) -> Result<Vec<Method>, NwcError> {
    let names: Vec<&str> = given
        .iter()
        .flat_map(|m| m.split([',', ' ']))
        .map(str::trim)
        .filter(|m| !m.is_empty())
        .collect();
    if names.is_empty() {
        return Ok(SUPPORTED_METHODS.to_vec());
    }
    let mut out = Vec::new();
    for name in names {
        let method = Method::from_str(name)
            .ok()
            .filter(|m| SUPPORTED_METHODS.contains(m))
            .ok_or_else(|| {
                NwcError::Invalid(format!(
                    "unknown or unsupported method `{name}` (supported: {})",
                    SUPPORTED_METHODS.map(|m| m.as_str().to_string()).join(", ")
                ))
            })?;
        if !out.contains(&method) {
            out.push(method);
        }
    }
    Ok(out)
}

const CONNECTION_COLUMNS: &str =
    "id, name, client_pubkey, service_pubkey, relays, methods, budget_msat, period, created_at, revoked_at";

fn connection_from_row(r: &Row<'_>) -> rusqlite::Result<NwcConnection> {
    let relays: String = r.get(4)?;
    let methods: String = r.get(5)?;
    let period: String = r.get(7)?;
    Ok(NwcConnection {
        id: r.get(0)?,
        name: r.get(1)?,
        client_pubkey: r.get(2)?,
        service_pubkey: r.get(3)?,
        relays: serde_json::from_str(&relays).unwrap_or_default(),
        methods: methods.split_whitespace().map(str::to_string).collect(),
        budget_sats: (r.get::<_, i64>(6)?.max(0) as u64) / 1000,
        period: Period::parse(&period).unwrap_or(Period::Monthly),
        spent_msat: 0,
        created_at: r.get(8)?,
        revoked_at: r.get(9)?,
    })
}

/// What `connection` spent or holds reserved in the period containing now.
fn spent_in_period(c: &Sql, connection: &NwcConnection) -> rusqlite::Result<u64> {
    let since = connection
        .period
        .start(Utc::now())
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default();
    let spent: i64 = c.query_row(
        "SELECT COALESCE(SUM(amount_msat), 0) FROM nwc_spends \
         WHERE connection_id = ?1 AND status IN ('reserved', 'settled') AND created_at >= ?2",
        params![connection.id, since],
        |r| r.get(0),
    )?;
    Ok(spent.max(0) as u64)
}

fn with_spent(c: &Sql, mut connection: NwcConnection) -> rusqlite::Result<NwcConnection> {
    connection.spent_msat = spent_in_period(c, &connection)?;
    Ok(connection)
}

/// Every connection, newest first, with what each spent in its current period.
pub fn list(db: &Db) -> Result<Vec<NwcConnection>, NwcError> {
    Ok(db.call_blocking(|c| {
        let mut stmt = c.prepare(&format!(
            "SELECT {CONNECTION_COLUMNS} FROM nwc_connections ORDER BY created_at DESC, id DESC"
        ))?;
        let rows = stmt
            .query_map([], connection_from_row)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        rows.into_iter().map(|r| with_spent(c, r)).collect()
    })?)
}

fn find(c: &Sql, id_or_name: &str) -> rusqlite::Result<Vec<NwcConnection>> {
    let mut stmt = c.prepare(&format!(
        "SELECT {CONNECTION_COLUMNS} FROM nwc_connections WHERE id = ?1 OR lower(id) = lower(?1) OR name = ?1"
    ))?;
    let rows = stmt.query_map([id_or_name], connection_from_row)?;
    rows.collect()
}

/// Revokes a connection by id (or by name, when exactly one active connection has it). Its requests are
/// refused from now on, in flight ones included before they pay.
pub fn revoke(db: &Db, id_or_name: &str) -> Result<NwcConnection, NwcError> {
    let key = id_or_name.trim().to_string();
    let found = db.call_blocking({
        let key = key.clone();
        move |c| find(c, &key)
    })?;
    let target = match found.as_slice() {
        [] => return Err(NwcError::NotFound(key)),
        [one] => one.clone(),
        many => {
            let active: Vec<_> = many.iter().filter(|c| c.is_active()).collect();
            match active.as_slice() {
                [one] => (*one).clone(),
                _ => {
                    return Err(NwcError::Invalid(format!(
                        "several connections are named `{key}`: revoke by id"
                    )))
                }
            }
        }
    };
    if !target.is_active() {
        return Err(NwcError::AlreadyRevoked(target.id));
    }
    let now = now_rfc3339();
    let id = target.id.clone();
    db.call_blocking(move |c| {
        c.execute(
            "UPDATE nwc_connections SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL",
            params![id, now],
        )?;
        let row = c.query_row(
            &format!("SELECT {CONNECTION_COLUMNS} FROM nwc_connections WHERE id = ?1"),
            [&id],
            connection_from_row,
        )?;
        with_spent(c, row)
    })
    .map_err(Into::into)
}

// ---------------------------------------------------------------------------------------------------------------
// The running service.

/// The running wallet service; [`WalletService::stop`] ends it.
pub struct WalletService {
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl WalletService {
    pub async fn stop(self) {
        self.cancel.cancel();
        let _ = self.task.await;
    }
}

struct Service {
    db: Db,
    wallet: Wallet,
    keys: Keys,
    relays: RelaySet,
    client: nostr_sdk::Client,
    alias: String,
}

/// Starts answering NWC requests in the background. `None` (after saying why) without relays or key.
pub fn spawn(
    home: &Home,
    config: &Config,
    db: Db,
    wallet: Wallet,
    cancel: CancellationToken,
) -> Option<WalletService> {
    let relays = match RelaySet::from_config(config) {
        Ok(relays) if relays.is_empty() => return None,
        Ok(relays) => relays,
        Err(e) => {
            tracing::warn!(error = %e, "no NWC wallet service");
            return None;
        }
    };
    let keys = match super::agent_keys(home) {
        Ok(keys) => keys,
        Err(e) => {
            tracing::warn!(error = %e, "no NWC wallet service");
            return None;
        }
    };
    let alias = config.name.clone();
    let own = cancel.child_token();
    let task = tokio::spawn({
        let cancel = own.clone();
        async move {
            let span = tracing::info_span!("nwc");
            tracing::Instrument::instrument(serve(db, wallet, keys, relays, alias, cancel), span)
                .await;
        }
    });
    Some(WalletService { cancel: own, task })
}

async fn serve(
    db: Db,
    wallet: Wallet,
    keys: Keys,
    relays: RelaySet,
    alias: String,
    cancel: CancellationToken,
) {
    let client = match relays::client(&keys, &relays).await {
        Ok(client) => client,
        Err(e) => {
            tracing::warn!(error = %e, "cannot start the relay client: no NWC wallet service");
            return;
        }
    };
    let service = Arc::new(Service {
        db,
        wallet,
        keys,
        relays,
        client,
        alias,
    });
    let mut notifications = service.client.notifications();
    // Requests are ephemeral: only live ones matter, plus a little slack for clock skew.
    let filter = Filter::new()
        .kind(Kind::WalletConnectRequest)
        .pubkey(service.keys.public_key())
        .since(Timestamp::now() - Duration::from_secs(60));
    let subscription = SubscriptionId::new(SUBSCRIPTION);
    let mut info_queued = false;
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tracing::info!("NWC wallet service started");
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = ticker.tick() => {
                ensure_subscribed(&service.client, &subscription, &filter).await;
                if !info_queued {
                    match queue_info(&service).await {
                        Ok(queued) => info_queued = queued,
                        Err(e) => tracing::warn!(error = %e, "cannot queue the NWC info event"),
                    }
                }
            }
            received = notifications.recv() => match received {
                Ok(nostr_sdk::RelayPoolNotification::Event { event, .. })
                    if event.kind == Kind::WalletConnectRequest =>
                {
                    let service = Arc::clone(&service);
                    tokio::spawn(async move {
                        let id = event.id;
                        if let Err(e) = handle(&service, *event).await {
                            tracing::warn!(request = %id, error = %e, "NWC request not answered");
                        }
                    });
                }
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::warn!(missed, "NWC service fell behind the relay notifications");
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                    tracing::warn!("relay notifications closed: NWC wallet service stops");
                    break;
                }
            }
        }
    }
    service.client.shutdown().await;
    tracing::info!("NWC wallet service stopped");
}

/// Subscribes on every connected relay that does not have the subscription yet (a relay that was down at start,
/// or came back with a fresh session). Never waits for a relay that is down.
async fn ensure_subscribed(client: &nostr_sdk::Client, id: &SubscriptionId, filter: &Filter) {
    for (url, relay) in client.relays().await {
        if !relay.is_connected() || relay.subscription(id).await.is_some() {
            continue;
        }
        match relay
            .subscribe_with_id(id.clone(), filter.clone(), Default::default())
            .await
        {
            Ok(()) => tracing::info!(relay = %url, "listening for NWC requests"),
            Err(e) => tracing::debug!(relay = %url, error = %e, "cannot subscribe yet"),
        }
    }
}

/// Queues the kind 13194 info event once there is a connection to serve. `Ok(true)` once queued.
async fn queue_info(service: &Service) -> Result<bool, NostrError> {
    let any: i64 = service
        .db
        .call(|c| c.query_row("SELECT count(*) FROM nwc_connections", [], |r| r.get(0)))
        .await?;
    if any == 0 {
        return Ok(false);
    }
    let content = SUPPORTED_METHODS.map(|m| m.as_str().to_string()).join(" ");
    let event = EventBuilder::new(Kind::WalletConnectInfo, content)
        .tag(Tag::custom(
            TagKind::custom("encryption"),
            ["nip44_v2 nip04"],
        ))
        .sign_with_keys(&service.keys)
        .map_err(|e| NostrError::Event(e.to_string()))?;
    outbox::enqueue(&service.db, &event, &service.relays, Purpose::WalletInfo).await?;
    tracing::info!(event_id = %event.id, "NWC info event queued");
    Ok(true)
}

/// How a request was encrypted; the reply uses the same.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Encryption {
    Nip04,
    Nip44,
}

fn encryption_of(event: &Event) -> Result<Encryption, String> {
    let tag = event
        .tags
        .iter()
        .find(|t| t.kind() == TagKind::custom("encryption"));
    let Some(value) = tag.and_then(|t| t.content()) else {
        return Ok(Encryption::Nip04);
    };
    let schemes: Vec<&str> = value.split_whitespace().collect();
    if schemes.contains(&"nip44_v2") {
        Ok(Encryption::Nip44)
    } else if schemes.contains(&"nip04") || schemes.is_empty() {
        Ok(Encryption::Nip04)
    } else {
        Err(value.to_string())
    }
}

/// Answers one request event (at most once).
async fn handle(service: &Service, event: Event) -> Result<(), NostrError> {
    if event.verify().is_err() {
        tracing::debug!(request = %event.id, "bad signature: ignored");
        return Ok(());
    }
    if event.is_expired() {
        tracing::info!(request = %event.id, "expired NWC request ignored");
        return Ok(());
    }
    let request_id = event.id.to_hex();
    // Claim the request before anything else: a replay finds the row and gets the stored reply (or nothing, when
    // the first delivery is still being answered).
    let claimed = {
        let request_id = request_id.clone();
        service
            .db
            .call(move |c| {
                let inserted = c.execute(
                    "INSERT OR IGNORE INTO nwc_requests (event_id, received_at) VALUES (?1, ?2)",
                    params![request_id, now_rfc3339()],
                )?;
                if inserted == 1 {
                    return Ok(None);
                }
                let reply: Option<String> = c
                    .query_row(
                        "SELECT reply_json FROM nwc_requests WHERE event_id = ?1",
                        [&request_id],
                        |r| r.get(0),
                    )
                    .optional()?
                    .flatten();
                Ok(Some(reply))
            })
            .await?
    };
    if let Some(stored) = claimed {
        if let Some(reply) = stored.and_then(|json| Event::from_json(json).ok()) {
            tracing::info!(request = %event.id, "replayed NWC request: sending the stored reply");
            send(service, &reply).await;
        } else {
            tracing::info!(request = %event.id, "replayed NWC request still being answered: ignored");
        }
        return Ok(());
    }

    let encryption = match encryption_of(&event) {
        Ok(e) => e,
        Err(unsupported) => {
            let body = json!({
                "result_type": Value::Null,
                "error": {"code": "UNSUPPORTED_ENCRYPTION",
                          "message": format!("encryption `{unsupported}` is not supported: use nip44_v2 or nip04")},
                "result": Value::Null,
            });
            return reply(
                service,
                &event,
                Encryption::Nip04,
                None,
                None,
                body.to_string(),
            )
            .await;
        }
    };
    let secret = service.keys.secret_key();
    let plain = match encryption {
        Encryption::Nip04 => {
            nip04::decrypt(secret, &event.pubkey, &event.content).map_err(|e| e.to_string())
        }
        Encryption::Nip44 => {
            nip44::decrypt(secret, &event.pubkey, &event.content).map_err(|e| e.to_string())
        }
    };
    let plain = match plain {
        Ok(p) => p,
        Err(e) => {
            tracing::info!(request = %event.id, error = %e, "undecryptable NWC request ignored");
            return Ok(());
        }
    };
    let value: Value = serde_json::from_str(&plain).unwrap_or(Value::Null);
    let method_name = value["method"].as_str().unwrap_or_default().to_string();

    let client = event.pubkey.to_hex();
    let connection = service
        .db
        .call(move |c| {
            let found = c
                .query_row(
                    &format!(
                        "SELECT {CONNECTION_COLUMNS} FROM nwc_connections WHERE client_pubkey = ?1"
                    ),
                    [&client],
                    connection_from_row,
                )
                .optional()?;
            found.map(|f| with_spent(c, f)).transpose()
        })
        .await?;

    let method = Method::from_str(&method_name).ok();
    let Some(method) = method else {
        // Not a NIP-47 method name the typed response can carry: answer by hand.
        let code = if connection.as_ref().is_some_and(NwcConnection::is_active) {
            "NOT_IMPLEMENTED"
        } else {
            "UNAUTHORIZED"
        };
        let body = json!({
            "result_type": method_name,
            "error": {"code": code, "message": format!("unknown method `{method_name}`")},
            "result": Value::Null,
        });
        let id = connection.as_ref().map(|c| c.id.clone());
        return reply(
            service,
            &event,
            encryption,
            id,
            Some(method_name),
            body.to_string(),
        )
        .await;
    };

    let outcome = match &connection {
        None => Err(error(
            ErrorCode::Unauthorized,
            "no wallet is connected to this key",
        )),
        Some(c) if !c.is_active() => Err(error(
            ErrorCode::Unauthorized,
            "this connection was revoked",
        )),
        Some(_) if !SUPPORTED_METHODS.contains(&method) => Err(error(
            ErrorCode::NotImplemented,
            format!("this wallet offers get_info, get_balance, pay_invoice, make_invoice, lookup_invoice and list_transactions, not `{method}`"),
        )),
        Some(c) if !c.allows(method) => Err(error(
            ErrorCode::Restricted,
            format!("this connection may not call `{method}`"),
        )),
        Some(c) => match Request::from_value(value) {
            Err(e) => Err(error(ErrorCode::Other, format!("invalid request: {e}"))),
            Ok(request) => dispatch(service, c, &request_id, request).await,
        },
    };
    if let Err(e) = &outcome {
        tracing::info!(request = %event.id, %method, code = ?e.code, reason = %e.message, "NWC request refused");
    }
    let (result, err) = match outcome {
        Ok(result) => (Some(result), None),
        Err(e) => (None, Some(e)),
    };
    let response = Response {
        result_type: method,
        error: err,
        result,
    };
    let body = serde_json::to_string(&response)
        .map_err(|e| NostrError::Event(format!("encoding the NWC response: {e}")))?;
    let id = connection.as_ref().map(|c| c.id.clone());
    reply(service, &event, encryption, id, Some(method_name), body).await
}

fn error(code: ErrorCode, message: impl Into<String>) -> NIP47Error {
    NIP47Error {
        code,
        message: message.into(),
    }
}

/// Encrypts `body` for the requester, signs the kind 23195 reply, stores it with the request and sends it.
async fn reply(
    service: &Service,
    request: &Event,
    encryption: Encryption,
    connection_id: Option<String>,
    method: Option<String>,
    body: String,
) -> Result<(), NostrError> {
    let secret = service.keys.secret_key();
    let content = match encryption {
        Encryption::Nip04 => {
            nip04::encrypt(secret, &request.pubkey, body).map_err(|e| e.to_string())
        }
        Encryption::Nip44 => nip44::encrypt(secret, &request.pubkey, body, nip44::Version::V2)
            .map_err(|e| e.to_string()),
    }
    .map_err(NostrError::Event)?;
    let mut tags = vec![Tag::public_key(request.pubkey), Tag::event(request.id)];
    if encryption == Encryption::Nip44 {
        tags.push(Tag::custom(TagKind::custom("encryption"), ["nip44_v2"]));
    }
    let event = EventBuilder::new(Kind::WalletConnectResponse, content)
        .tags(tags)
        .sign_with_keys(&service.keys)
        .map_err(|e| NostrError::Event(e.to_string()))?;
    let request_id = request.id.to_hex();
    let json = event.as_json();
    service
        .db
        .call(move |c| {
            c.execute(
                "UPDATE nwc_requests SET connection_id = ?2, method = ?3, reply_json = ?4, replied_at = ?5 \
                 WHERE event_id = ?1",
                params![request_id, connection_id, method, json, now_rfc3339()],
            )
        })
        .await?;
    send(service, &event).await;
    Ok(())
}

/// Sends a reply to every relay (bounded per relay); replies are ephemeral, so no outbox.
async fn send(service: &Service, event: &Event) {
    let results = relays::send_to(&service.client, event, service.relays.urls()).await;
    let accepted = results.iter().filter(|(_, r)| r.is_ok()).count();
    if accepted == 0 {
        tracing::warn!(event_id = %event.id, failures = ?results, "no relay took the NWC reply");
    }
}

async fn dispatch(
    service: &Service,
    connection: &NwcConnection,
    request_id: &str,
    request: Request,
) -> Result<ResponseResult, NIP47Error> {
    match request.params {
        RequestParams::GetInfo => get_info(service, connection).map(ResponseResult::GetInfo),
        RequestParams::GetBalance => get_balance(service).await.map(ResponseResult::GetBalance),
        RequestParams::PayInvoice(p) => pay_invoice(service, connection, request_id, p)
            .await
            .map(ResponseResult::PayInvoice),
        RequestParams::MakeInvoice(p) => make_invoice(service, connection, p)
            .await
            .map(ResponseResult::MakeInvoice),
        RequestParams::LookupInvoice(p) => lookup_invoice(service, p)
            .await
            .map(ResponseResult::LookupInvoice),
        RequestParams::ListTransactions(p) => list_transactions(service, p)
            .await
            .map(ResponseResult::ListTransactions),
        _ => Err(error(
            ErrorCode::NotImplemented,
            format!("this wallet offers get_info, get_balance, pay_invoice, make_invoice, lookup_invoice and list_transactions, not `{}`", request.method),
        )),
    }
}

fn get_info(service: &Service, connection: &NwcConnection) -> Result<GetInfoResponse, NIP47Error> {
    let info = service.wallet.info();
    Ok(GetInfoResponse {
        alias: Some(service.alias.clone()),
        color: None,
        pubkey: Some(info.node_id),
        network: Some(info.network),
        block_height: info.best_block_height,
        block_hash: None,
        methods: connection
            .methods
            .iter()
            .filter_map(|m| Method::from_str(m).ok())
            .collect(),
        notifications: Vec::new(),
    })
}

async fn ready(service: &Service) -> Result<(), NIP47Error> {
    service
        .wallet
        .wait_ready(READY_WAIT)
        .await
        .map_err(|e| error(ErrorCode::Internal, e.to_string()))
}

async fn get_balance(service: &Service) -> Result<GetBalanceResponse, NIP47Error> {
    ready(service).await?;
    let balance = service
        .wallet
        .balance()
        .map_err(|e| error(ErrorCode::Internal, e.to_string()))?;
    Ok(GetBalanceResponse {
        balance: balance.spendable_lightning_sats.saturating_mul(1000),
    })
}

/// Why a reservation against a connection's budget was refused.
enum Reservation {
    Made(String),
    OverBudget { spent_msat: u64 },
    Revoked,
}

async fn reserve(
    db: &Db,
    connection: &NwcConnection,
    request_id: &str,
    payment_hash: &str,
    amount_msat: u64,
) -> Result<Reservation, NIP47Error> {
    let connection = connection.clone();
    let request_id = request_id.to_string();
    let payment_hash = payment_hash.to_string();
    db.call(move |c| {
        // One transaction on the agent's one connection: two requests cannot both see the same headroom.
        let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let revoked: Option<String> = tx.query_row(
            "SELECT revoked_at FROM nwc_connections WHERE id = ?1",
            [&connection.id],
            |r| r.get(0),
        )?;
        if revoked.is_some() {
            return Ok(Reservation::Revoked);
        }
        let spent_msat = spent_in_period(&tx, &connection)?;
        if spent_msat.saturating_add(amount_msat) > connection.budget_msat() {
            return Ok(Reservation::OverBudget { spent_msat });
        }
        let id = new_id();
        let now = now_rfc3339();
        tx.execute(
            "INSERT INTO nwc_spends (id, connection_id, request_id, payment_hash, amount_msat, status, created_at, \
             updated_at) VALUES (?1, ?2, ?3, ?4, ?5, 'reserved', ?6, ?6)",
            params![id, connection.id, request_id, payment_hash, amount_msat as i64, now],
        )?;
        tx.commit()?;
        Ok(Reservation::Made(id))
    })
    .await
    .map_err(|e| error(ErrorCode::Internal, e.to_string()))
}

/// Settles (with what was really paid) or releases a reservation.
async fn finish_reservation(db: &Db, id: &str, paid_msat: Option<u64>) {
    let id = id.to_string();
    let result = db
        .call(move |c| match paid_msat {
            Some(amount) => c.execute(
                "UPDATE nwc_spends SET status = 'settled', amount_msat = ?2, updated_at = ?3 WHERE id = ?1",
                params![id, amount as i64, now_rfc3339()],
            ),
            None => c.execute(
                "UPDATE nwc_spends SET status = 'released', updated_at = ?2 WHERE id = ?1",
                params![id, now_rfc3339()],
            ),
        })
        .await;
    if let Err(e) = result {
        tracing::error!(error = %e, "cannot update an NWC budget reservation");
    }
}

async fn pay_invoice(
    service: &Service,
    connection: &NwcConnection,
    request_id: &str,
    params: PayInvoiceRequest,
) -> Result<PayInvoiceResponse, NIP47Error> {
    ready(service).await?;
    let wallet = &service.wallet;
    let invoice = wallet
        .decode_invoice(&params.invoice)
        .map_err(|e| error(ErrorCode::Other, e.to_string()))?;
    let amount_msat = match (invoice.amount_msat, params.amount) {
        (Some(a), _) => a,
        (None, Some(b)) if b > 0 => b,
        (None, _) => {
            return Err(error(
                ErrorCode::Other,
                "the invoice has no amount: give `amount` in msat",
            ))
        }
    };
    let max_fee_msat = spend::default_max_fee_msat(wallet, amount_msat);
    // The connection's budget covers the worst case (amount and the fee limit); settling keeps what was paid.
    let hold_msat = amount_msat.saturating_add(max_fee_msat);
    let reservation = match reserve(
        &service.db,
        connection,
        request_id,
        &invoice.payment_hash,
        hold_msat,
    )
    .await?
    {
        Reservation::Made(id) => id,
        Reservation::Revoked => {
            return Err(error(ErrorCode::Unauthorized, "this connection was revoked"))
        }
        Reservation::OverBudget { spent_msat } => {
            return Err(error(
                ErrorCode::QuotaExceeded,
                format!(
                    "{} sats (with up to {} sats of fees) would exceed this connection's budget of {} sats {} \
                     ({} sats spent or reserved)",
                    amount_msat / 1000,
                    max_fee_msat.div_ceil(1000),
                    connection.budget_sats,
                    period_phrase(connection.period),
                    spent_msat.div_ceil(1000),
                ),
            ))
        }
    };
    let paid = spend::pay_invoice(
        wallet,
        &params.invoice,
        invoice.amount_msat.is_none().then_some(amount_msat),
        Some(max_fee_msat),
        &connection.purpose(),
        ApprovalWait(None),
    )
    .await;
    match paid {
        Ok(paid) => {
            finish_reservation(
                &service.db,
                &reservation,
                Some(paid.amount_msat.saturating_add(paid.fee_msat)),
            )
            .await;
            let receipt = receipts::get_by_hash(&service.db, &paid.payment_hash, Direction::Out)
                .await
                .map_err(|e| error(ErrorCode::Internal, e.to_string()))?;
            let preimage = receipt
                .and_then(|r| r.preimage)
                .map(|p| hex::encode(p.bytes()))
                .ok_or_else(|| {
                    error(
                        ErrorCode::Internal,
                        "paid, but the preimage is not on the receipt",
                    )
                })?;
            tracing::info!(connection = %connection.name, payment_hash = %paid.payment_hash,
                amount_msat = paid.amount_msat, fee_msat = paid.fee_msat, "NWC payment sent");
            Ok(PayInvoiceResponse {
                preimage,
                fees_paid: Some(paid.fee_msat),
            })
        }
        // Still in flight: its reservation stays until the payment ends (it may yet succeed).
        Err(e @ WalletError::PaymentPending { .. }) => Err(error(ErrorCode::Other, e.to_string())),
        Err(e) => {
            finish_reservation(&service.db, &reservation, None).await;
            Err(payment_error(e))
        }
    }
}

fn period_phrase(period: Period) -> &'static str {
    match period {
        Period::Daily => "per day",
        Period::Weekly => "per week",
        Period::Monthly => "per month",
        Period::Yearly => "per year",
        Period::Never => "in all",
    }
}

/// The NIP-47 code for a payment the wallet did not make.
fn payment_error(e: WalletError) -> NIP47Error {
    let code = match &e {
        WalletError::Budget(b) => match b {
            BudgetError::OverPerPayment { .. }
            | BudgetError::OverCounterparty { .. }
            | BudgetError::OverHourly { .. }
            | BudgetError::OverDaily { .. }
            | BudgetError::OverInferenceDaily { .. }
            | BudgetError::BelowReserve { .. } => ErrorCode::QuotaExceeded,
            _ => ErrorCode::Restricted,
        },
        WalletError::PaymentFailed { .. } | WalletError::DuplicatePayment { .. } => {
            ErrorCode::PaymentFailed
        }
        WalletError::NoLiquidity(_) => ErrorCode::InsufficientBalance,
        WalletError::BadRequest(_) => ErrorCode::Other,
        _ => ErrorCode::Internal,
    };
    let message = match &e {
        WalletError::Budget(b) => format!("refused by the agent's budget (nothing was paid): {b}"),
        other => other.to_string(),
    };
    error(code, message)
}

async fn make_invoice(
    service: &Service,
    connection: &NwcConnection,
    params: MakeInvoiceRequest,
) -> Result<MakeInvoiceResponse, NIP47Error> {
    ready(service).await?;
    let wallet = &service.wallet;
    let expiry = params.expiry.map(|e| e.clamp(60, 604_800) as u32);
    let purpose = connection.purpose();
    let created = match &params.description_hash {
        Some(hash) => {
            let bytes: [u8; 32] = hex::decode(hash.trim())
                .ok()
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| {
                    error(
                        ErrorCode::Other,
                        "description_hash must be 64 hex characters",
                    )
                })?;
            wallet
                .create_invoice_with_description_hash(
                    params.amount,
                    bytes,
                    expiry.unwrap_or(wallet.config().wallet.invoice_expiry_secs),
                    Some(&purpose),
                    params.description.as_deref(),
                )
                .await
        }
        None => {
            wallet
                .create_invoice_with_expiry(
                    params.amount,
                    params.description.as_deref(),
                    Some(&purpose),
                    expiry,
                )
                .await
        }
    }
    .map_err(|e| match e {
        WalletError::BadRequest(m) => error(ErrorCode::Other, m),
        WalletError::NoLiquidity(m) => error(ErrorCode::Other, m),
        other => error(ErrorCode::Internal, other.to_string()),
    })?;
    Ok(MakeInvoiceResponse {
        invoice: created.bolt11,
        payment_hash: Some(created.payment_hash),
        description: params.description,
        description_hash: params.description_hash,
        preimage: None,
        amount: Some(created.amount_msat),
        created_at: Some(Timestamp::now()),
        expires_at: timestamp(&created.expires_at),
    })
}

async fn lookup_invoice(
    service: &Service,
    params: LookupInvoiceRequest,
) -> Result<LookupInvoiceResponse, NIP47Error> {
    let hash = match (&params.payment_hash, &params.invoice) {
        (Some(hash), _) => hash.trim().to_ascii_lowercase(),
        (None, Some(invoice)) => crate::wallet::payment_hash_of(invoice)
            .map_err(|e| error(ErrorCode::Other, e.to_string()))?,
        (None, None) => return Err(error(ErrorCode::Other, "give payment_hash or invoice")),
    };
    for direction in [Direction::In, Direction::Out] {
        let found = receipts::get_by_hash(&service.db, &hash, direction)
            .await
            .map_err(|e| error(ErrorCode::Other, e.to_string()))?;
        if let Some(receipt) = found.filter(|r| r.rail != Rail::Onchain) {
            let mut tx = transaction(&receipt);
            tx.invoice = params.invoice.clone();
            return Ok(tx);
        }
    }
    Err(error(
        ErrorCode::NotFound,
        format!("no payment with hash {hash}"),
    ))
}

async fn list_transactions(
    service: &Service,
    params: ListTransactionsRequest,
) -> Result<Vec<LookupInvoiceResponse>, NIP47Error> {
    let direction = params.transaction_type.map(|t| match t {
        TransactionType::Incoming => Direction::In,
        TransactionType::Outgoing => Direction::Out,
    });
    let all = receipts::list(
        &service.db,
        ReceiptFilter {
            limit: None,
            direction,
            status: None,
        },
    )
    .await
    .map_err(|e| error(ErrorCode::Internal, e.to_string()))?;
    let unpaid = params.unpaid.unwrap_or(false);
    let offset = params.offset.unwrap_or(0) as usize;
    let limit = params
        .limit
        .map(|l| l as usize)
        .unwrap_or(MAX_TRANSACTIONS)
        .min(MAX_TRANSACTIONS);
    Ok(all
        .iter()
        .filter(|r| r.rail != Rail::Onchain)
        .filter(|r| unpaid || r.status == ReceiptStatus::Succeeded)
        .map(transaction)
        .filter(|tx| params.from.is_none_or(|from| tx.created_at >= from))
        .filter(|tx| params.until.is_none_or(|until| tx.created_at <= until))
        .skip(offset)
        .take(limit)
        .collect())
}

/// A receipt as a NIP-47 transaction.
fn transaction(receipt: &Receipt) -> LookupInvoiceResponse {
    let settled = receipt.status == ReceiptStatus::Succeeded;
    LookupInvoiceResponse {
        transaction_type: Some(match receipt.direction {
            Direction::In => TransactionType::Incoming,
            Direction::Out => TransactionType::Outgoing,
        }),
        state: Some(match receipt.status {
            ReceiptStatus::Pending => TransactionState::Pending,
            ReceiptStatus::Succeeded => TransactionState::Settled,
            ReceiptStatus::Failed => TransactionState::Failed,
        }),
        invoice: None,
        description: receipt.comment.clone().or_else(|| receipt.purpose.clone()),
        description_hash: None,
        preimage: receipt
            .preimage
            .filter(|_| settled)
            .map(|p| hex::encode(p.bytes())),
        payment_hash: receipt.payment_hash.clone(),
        amount: receipt.amount_msat,
        fees_paid: receipt.fee_msat,
        created_at: timestamp(&receipt.created_at).unwrap_or_else(|| Timestamp::from(0)),
        expires_at: None,
        settled_at: receipt.settled_at.as_deref().and_then(timestamp),
        metadata: None,
    }
}

fn timestamp(rfc3339: &str) -> Option<Timestamp> {
    DateTime::parse_from_rfc3339(rfc3339)
        .ok()
        .map(|t| Timestamp::from(t.timestamp().max(0) as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_start_at_calendar_boundaries() {
        let now = Utc.with_ymd_and_hms(2025, 3, 19, 15, 4, 5).unwrap();
        assert_eq!(
            Period::Monthly.start(now),
            Some(Utc.with_ymd_and_hms(2025, 3, 1, 0, 0, 0).unwrap())
        );
        assert_eq!(
            Period::Weekly.start(now),
            Some(Utc.with_ymd_and_hms(2025, 3, 17, 0, 0, 0).unwrap())
        );
        assert_eq!(
            Period::Daily.start(now),
            Some(Utc.with_ymd_and_hms(2025, 3, 19, 0, 0, 0).unwrap())
        );
        assert_eq!(
            Period::Yearly.start(now),
            Some(Utc.with_ymd_and_hms(2025, 1, 1, 0, 0, 0).unwrap())
        );
        assert_eq!(Period::Never.start(now), None);
    }

    #[test]
    fn create_list_revoke_and_the_uri() {
        let db = Db::open_in_memory().unwrap();
        let service = Keys::generate().public_key();
        let relays = RelaySet::parse(&["ws://127.0.0.1:7777"]).unwrap();
        let created = create(
            &db,
            &service,
            &relays,
            NewConnection {
                name: Some("vps".into()),
                budget_sats: 5000,
                period: Period::Monthly,
                methods: vec!["get_info,pay_invoice".into()],
            },
        )
        .unwrap();
        let uri = NostrWalletConnectURI::parse(created.uri.to_string()).unwrap();
        assert_eq!(uri.public_key, service);
        assert_eq!(
            Keys::new(uri.secret.clone()).public_key().to_hex(),
            created.connection.client_pubkey
        );
        assert!(!format!("{created:?}").contains(&uri.secret.to_secret_hex()));
        assert_eq!(created.connection.methods, ["get_info", "pay_invoice"]);

        let listed = list(&db).unwrap();
        assert_eq!(listed, vec![created.connection.clone()]);
        assert!(parse_methods(&["pay_keysend".into()]).is_err());

        let revoked = revoke(&db, "vps").unwrap();
        assert!(revoked.revoked_at.is_some());
        assert!(matches!(
            revoke(&db, &revoked.id),
            Err(NwcError::AlreadyRevoked(_))
        ));
        assert!(matches!(revoke(&db, "nope"), Err(NwcError::NotFound(_))));
    }

    #[tokio::test]
    async fn reservations_never_overshoot_the_budget() {
        let db = Db::open_in_memory().unwrap();
        let created = create(
            &db,
            &Keys::generate().public_key(),
            &RelaySet::parse(&["ws://127.0.0.1:7777"]).unwrap(),
            NewConnection {
                name: None,
                budget_sats: 1000,
                period: Period::Daily,
                methods: Vec::new(),
            },
        )
        .unwrap();
        let c = created.connection;
        let Ok(Reservation::Made(first)) = reserve(&db, &c, "r1", "h1", 600_000).await else {
            panic!("first reservation")
        };
        assert!(matches!(
            reserve(&db, &c, "r2", "h2", 600_000).await,
            Ok(Reservation::OverBudget {
                spent_msat: 600_000
            })
        ));
        // A failed payment gives its reservation back.
        finish_reservation(&db, &first, None).await;
        let Ok(Reservation::Made(second)) = reserve(&db, &c, "r3", "h3", 600_000).await else {
            panic!("after release")
        };
        finish_reservation(&db, &second, Some(500_000)).await;
        assert!(matches!(
            reserve(&db, &c, "r4", "h4", 500_000).await,
            Ok(Reservation::Made(_))
        ));
        revoke(&db, &c.id).unwrap();
        assert!(matches!(
            reserve(&db, &c, "r5", "h5", 1).await,
            Ok(Reservation::Revoked)
        ));
    }
}
