//! LNVPS: a VPS rented with no account and no KYC, paid over Lightning. Every API request is authenticated with a
//! fresh NIP-98 event signed by the agent's Nostr key (the key is the account). The API client parses leniently
//! (fields drift between server versions, see `shared/specs/lnvps-api.md` §9), retries 429 and 5xx with backoff,
//! and surfaces every other error with the server's own message.
//!
//! The VM manager rents: SSH key registered → VM created → renewal invoice paid through the agent's budget gate
//! (purpose `compute.rent`) → payment polled until settled → VM `running` with an IP → host keys pinned in the
//! home's `ssh/known_hosts` → SSH in as the image's default user. Exec and files then go through the SSH provider.
//! Rented VMs are remembered in the state DB (`lnvps_vms`), with the invoice being paid stored before it is paid,
//! so an interrupted rent or renewal resumes with the same invoice (the node never pays one twice).

use std::path::PathBuf;
use std::time::Duration;

use ::nostr::Keys;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use reqwest::Method;
use rusqlite::{params, OptionalExtension};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use super::ssh::{SshCompute, SshOptions, SshTarget};
use super::ComputeError;
use crate::home::Home;
use crate::state::Db;

pub const KIND: &str = "lnvps";
/// Purpose of every rent and renewal payment (budget rules and receipts match on it).
pub const RENT_PURPOSE: &str = "compute.rent";
/// Attempts for a request that fails with 429, 5xx or a network error.
const ATTEMPTS: u32 = 4;
/// Longest `Retry-After` honoured before giving up with the server's message.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);
/// How long a rent waits for the payment to be seen and the VM to run.
const READY_TIMEOUT: Duration = Duration::from_secs(180);

/// One VM template (size, price, region).
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct Template {
    pub id: u64,
    pub name: String,
    pub cpu: u64,
    pub memory: u64,
    pub disk_size: u64,
    pub cost_plan: CostPlan,
    pub region: Region,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct CostPlan {
    pub currency: String,
    /// Smallest unit (cents, or msat for BTC); a float here is the pre-2026-02 major-unit format.
    #[serde(deserialize_with = "lenient_amount")]
    pub amount: u64,
    pub interval_amount: u64,
    pub interval_type: String,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct Region {
    pub id: u64,
    pub name: String,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct Image {
    pub id: u64,
    pub distribution: String,
    pub flavour: String,
    pub version: String,
    pub default_username: String,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct SshKey {
    pub id: u64,
    pub name: String,
}

/// A VM as the API reports it.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct VmStatus {
    pub id: u64,
    /// `None`: never paid.
    pub expires: Option<String>,
    pub image: Option<Image>,
    pub template: Option<Template>,
    pub ip_assignments: Vec<IpAssignment>,
    pub status: RunningState,
    pub auto_renewal_enabled: bool,
    pub deleting_on: Option<String>,
    pub host_ssh_keys: Vec<HostKey>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct IpAssignment {
    /// `a.b.c.d/prefix`.
    pub ip: String,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct RunningState {
    pub state: String,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct HostKey {
    pub key_type: String,
    pub public_key: String,
}

impl VmStatus {
    /// The first IPv4 address, without its prefix length.
    pub fn ip(&self) -> Option<String> {
        self.ip_assignments
            .iter()
            .map(|a| a.ip.split('/').next().unwrap_or_default().to_string())
            .find(|ip| ip.parse::<std::net::Ipv4Addr>().is_ok())
    }

    /// Host key lines (`ssh-ed25519 AAAA…`) to pin in `known_hosts`.
    pub fn host_key_lines(&self) -> Vec<String> {
        self.host_ssh_keys
            .iter()
            .filter(|k| !k.key_type.is_empty() && !k.public_key.is_empty())
            .map(|k| {
                // Some versions send the whole line, others the base64 blob alone.
                if k.public_key.starts_with(&k.key_type) {
                    k.public_key.clone()
                } else {
                    format!("{} {}", k.key_type, k.public_key)
                }
            })
            .collect()
    }
}

/// A renewal payment (`VmPayment`).
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct Payment {
    /// Hex payment hash for Lightning.
    pub id: String,
    pub vm_id: u64,
    pub expires: Option<String>,
    #[serde(deserialize_with = "lenient_amount")]
    pub amount: u64,
    #[serde(deserialize_with = "lenient_amount")]
    pub tax: u64,
    pub currency: String,
    pub is_paid: bool,
    /// Seconds the payment adds to the VM's expiry.
    pub time: u64,
    pub data: Value,
}

impl Payment {
    /// The BOLT 11 invoice of a Lightning payment.
    pub fn bolt11(&self) -> Option<String> {
        self.data
            .get("lightning")
            .and_then(Value::as_str)
            .map(str::to_string)
    }
}

/// Money fields: `u64` smallest units, or a float in major units from servers before 2026-02-18.
fn lenient_amount<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::Number(n) => match (n.as_u64(), n.as_f64()) {
            (Some(v), _) => v,
            (None, Some(f)) if f >= 0.0 => (f * 100.0).round() as u64,
            _ => 0,
        },
        Value::String(s) => s.trim().parse().unwrap_or(0),
        _ => 0,
    })
}

/// The LNVPS user API.
pub struct LnvpsClient {
    base: String,
    http: reqwest::Client,
    keys: Keys,
}

impl std::fmt::Debug for LnvpsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LnvpsClient")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl LnvpsClient {
    /// A client of the API at `api_url`, signing as `keys` (the agent's Nostr key).
    pub fn new(api_url: &str, keys: Keys) -> Result<LnvpsClient, ComputeError> {
        let base = api_url.trim().trim_end_matches('/').to_string();
        if !(base.starts_with("https://") || base.starts_with("http://")) {
            return Err(ComputeError::Config(format!(
                "compute.lnvps.api_url must be an http(s) URL, not `{base}`"
            )));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| ComputeError::Config(format!("cannot build an HTTP client: {e}")))?;
        Ok(LnvpsClient { base, http, keys })
    }

    /// The client for `home`'s agent, from `compute.lnvps`.
    pub fn for_home(
        home: &Home,
        config: &crate::config::Config,
    ) -> Result<LnvpsClient, ComputeError> {
        let keys = crate::nostr::keys::agent_keys(home)
            .map_err(|e| ComputeError::Config(format!("the agent's Nostr key: {e}")))?;
        LnvpsClient::new(&config.compute.lnvps.api_url, keys)
    }

    /// One request: a fresh NIP-98 event for every attempt, the envelope's `data` on success.
    async fn call(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<&Value>,
        auth: bool,
    ) -> Result<Value, ComputeError> {
        let url = format!("{}{}", self.base, path_and_query);
        let body_bytes = body.map(|b| b.to_string().into_bytes());
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let mut request = self.http.request(method.clone(), &url);
            if auth {
                let header = crate::nostr::nip98::sign(
                    &self.keys,
                    &url,
                    method.as_str(),
                    body_bytes.as_deref(),
                )
                .map_err(|e| ComputeError::Config(format!("cannot sign the NIP-98 event: {e}")))?;
                request = request.header(AUTHORIZATION, header);
            }
            if let Some(bytes) = &body_bytes {
                request = request
                    .header(CONTENT_TYPE, "application/json")
                    .body(bytes.clone());
            }
            let (retry, wait, message) = match request.send().await {
                Err(e) => (true, None, format!("network error: {}", e.without_url())),
                Ok(response) => {
                    let status = response.status();
                    let retry_after = response
                        .headers()
                        .get(RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .map(Duration::from_secs);
                    let text = response.text().await.unwrap_or_default();
                    let parsed: Option<Value> = serde_json::from_str(&text).ok();
                    if status.is_success() {
                        let Some(parsed) = parsed else {
                            return Err(remote(format!(
                                "{method} {path_and_query}: the answer is not JSON"
                            )));
                        };
                        // The envelope is `{"data": …}`; a bare answer (LNURL routes, old servers) is taken as is.
                        return Ok(match parsed {
                            Value::Object(mut o) if o.contains_key("data") => {
                                o.remove("data").unwrap_or(Value::Null)
                            }
                            other => other,
                        });
                    }
                    let message = parsed
                        .as_ref()
                        .and_then(|v| v.get("error"))
                        .and_then(Value::as_str)
                        .map(str::to_string)
                        .unwrap_or_else(|| text.trim().chars().take(300).collect());
                    let message = format!("{} {}", status.as_u16(), message);
                    match status.as_u16() {
                        401 | 403 => {
                            return Err(ComputeError::Auth {
                                provider: KIND,
                                message,
                            })
                        }
                        429 => (true, retry_after, message),
                        s if s >= 500 => (true, retry_after, message),
                        _ => return Err(remote(format!("{method} {path_and_query}: {message}"))),
                    }
                }
            };
            let wait = wait.unwrap_or(Duration::from_millis(250 * 2u64.pow(attempt)));
            if !retry || attempt >= ATTEMPTS || wait > MAX_RETRY_AFTER {
                return Err(remote(format!(
                    "{method} {path_and_query}: {message} (after {attempt} attempts)"
                )));
            }
            tracing::debug!(%message, attempt, wait_ms = wait.as_millis() as u64, "LNVPS request retried");
            tokio::time::sleep(wait).await;
        }
    }

    async fn get<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        auth: bool,
    ) -> Result<T, ComputeError> {
        let value = self.call(Method::GET, path, None, auth).await?;
        decode(path, value)
    }

    pub async fn templates(&self) -> Result<Vec<Template>, ComputeError> {
        let value = self
            .call(Method::GET, "/api/v1/vm/templates", None, false)
            .await?;
        // `{templates: […]}` today; a bare list on some versions.
        let list = value.get("templates").cloned().unwrap_or(value);
        decode("/api/v1/vm/templates", list)
    }

    pub async fn images(&self) -> Result<Vec<Image>, ComputeError> {
        self.get("/api/v1/image", false).await
    }

    /// The price of one BTC in `currency` (major units), from `/api/v1/exchange-rate`.
    pub async fn btc_price(&self, currency: &str) -> Result<Option<f64>, ComputeError> {
        let rates: Value = self.get("/api/v1/exchange-rate", false).await?;
        Ok(rates.as_array().and_then(|list| {
            list.iter().find_map(|r| {
                let base = r.get("base").and_then(Value::as_str)?;
                let quote = r.get("quote").and_then(Value::as_str)?;
                let rate = r.get("rate").and_then(Value::as_f64)?;
                if base.eq_ignore_ascii_case("BTC") && quote.eq_ignore_ascii_case(currency) {
                    Some(rate)
                } else if quote.eq_ignore_ascii_case("BTC")
                    && base.eq_ignore_ascii_case(currency)
                    && rate > 0.0
                {
                    Some(1.0 / rate)
                } else {
                    None
                }
            })
        }))
    }

    pub async fn ssh_keys(&self) -> Result<Vec<SshKey>, ComputeError> {
        self.get("/api/v1/ssh-key", true).await
    }

    pub async fn add_ssh_key(&self, name: &str, key_data: &str) -> Result<SshKey, ComputeError> {
        let body = serde_json::json!({"name": name, "key_data": key_data});
        let value = self
            .call(Method::POST, "/api/v1/ssh-key", Some(&body), true)
            .await?;
        decode("/api/v1/ssh-key", value)
    }

    pub async fn create_vm(
        &self,
        template_id: u64,
        image_id: u64,
        ssh_key_id: u64,
    ) -> Result<VmStatus, ComputeError> {
        let body = serde_json::json!({"template_id": template_id, "image_id": image_id, "ssh_key_id": ssh_key_id});
        let value = self
            .call(Method::POST, "/api/v1/vm", Some(&body), true)
            .await?;
        decode("/api/v1/vm", value)
    }

    pub async fn vms(&self) -> Result<Vec<VmStatus>, ComputeError> {
        self.get("/api/v1/vm", true).await
    }

    pub async fn vm(&self, id: u64) -> Result<VmStatus, ComputeError> {
        self.get(&format!("/api/v1/vm/{id}"), true).await
    }

    /// A Lightning invoice that extends the VM by `intervals` billing intervals.
    pub async fn renew(&self, id: u64, intervals: u32) -> Result<Payment, ComputeError> {
        self.get(
            &format!("/api/v1/vm/{id}/renew?method=lightning&intervals={intervals}"),
            true,
        )
        .await
    }

    pub async fn payment(&self, id: &str) -> Result<Payment, ComputeError> {
        self.get(&format!("/api/v1/payment/{id}"), true).await
    }

    /// `start`, `stop` or `restart`.
    pub async fn power(&self, id: u64, action: &str) -> Result<(), ComputeError> {
        self.call(
            Method::PATCH,
            &format!("/api/v1/vm/{id}/{action}"),
            None,
            true,
        )
        .await
        .map(|_| ())
    }

    /// A fresh OS on VM `id` (optionally another image): its disk is wiped and its host key changes.
    pub async fn reinstall(&self, id: u64, image_id: Option<u64>) -> Result<(), ComputeError> {
        let body = match image_id {
            Some(image) => serde_json::json!({ "image_id": image }),
            None => serde_json::json!({}),
        };
        self.call(
            Method::PATCH,
            &format!("/api/v1/vm/{id}/re-install"),
            Some(&body),
            true,
        )
        .await
        .map(|_| ())
    }

    /// What an upgrade to `spec` (`{cpu?, memory?, disk?}`, bytes) would cost; creates nothing.
    pub async fn upgrade_quote(&self, id: u64, spec: &Value) -> Result<Value, ComputeError> {
        self.call(
            Method::POST,
            &format!("/api/v1/vm/{id}/upgrade/quote?method=lightning"),
            Some(spec),
            true,
        )
        .await
    }

    /// An invoice for the upgrade to `spec`; applied once paid.
    pub async fn upgrade(&self, id: u64, spec: &Value) -> Result<Payment, ComputeError> {
        let value = self
            .call(
                Method::POST,
                &format!("/api/v1/vm/{id}/upgrade?method=lightning"),
                Some(spec),
                true,
            )
            .await?;
        decode("upgrade", value)
    }

    pub async fn set_auto_renewal(&self, id: u64, enabled: bool) -> Result<(), ComputeError> {
        let body = serde_json::json!({"auto_renewal_enabled": enabled});
        self.call(
            Method::PATCH,
            &format!("/api/v1/vm/{id}"),
            Some(&body),
            true,
        )
        .await
        .map(|_| ())
    }
}

fn remote(message: String) -> ComputeError {
    ComputeError::Remote {
        provider: KIND,
        message,
    }
}

fn decode<T: serde::de::DeserializeOwned>(what: &str, value: Value) -> Result<T, ComputeError> {
    serde_json::from_value(value).map_err(|e| remote(format!("{what}: unexpected answer: {e}")))
}

/// A template's price per renewal in sats: BTC plans directly, fiat ones at the server's exchange rate.
pub async fn price_sats(
    client: &LnvpsClient,
    plan: &CostPlan,
) -> Result<Option<u64>, ComputeError> {
    if plan.currency.eq_ignore_ascii_case("BTC") {
        return Ok(Some(plan.amount.div_ceil(1000)));
    }
    Ok(client.btc_price(&plan.currency).await?.map(|price| {
        // amount is in cents: major units / price of a BTC = BTC, × 1e8 = sats.
        ((plan.amount as f64 / 100.0) / price * 100_000_000.0).ceil() as u64
    }))
}

/// Pays a renewal invoice through the agent's budget gate; returns the payment hash. Implemented by the running
/// agent's wallet (tools, heartbeat) and by the control socket (CLI).
#[async_trait::async_trait]
pub trait RentPayer: Send + Sync {
    async fn pay(&self, bolt11: &str, purpose: &str) -> Result<String, String>;
}

/// Pays through the running agent's control socket (the same budget gate and receipts as every payment): for the
/// CLI, and for heartbeat tasks, which run inside the agent but hold no wallet handle.
pub struct SocketPayer {
    home: Home,
    /// The exit code of a refused (2) or failed (3) payment, for a command to exit with.
    code: std::sync::Mutex<Option<u8>>,
}

impl SocketPayer {
    pub fn new(home: &Home) -> SocketPayer {
        SocketPayer {
            home: home.clone(),
            code: std::sync::Mutex::new(None),
        }
    }

    /// The control socket's exit code for the last refused or failed payment.
    pub fn failure_code(&self) -> Option<u8> {
        *self.code.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait::async_trait]
impl RentPayer for SocketPayer {
    async fn pay(&self, bolt11: &str, purpose: &str) -> Result<String, String> {
        let home = self.home.clone();
        let params = serde_json::json!({"bolt11": bolt11, "purpose": purpose});
        let answer = tokio::task::spawn_blocking(move || {
            let mut client = crate::control::Client::connect(&home, Duration::from_secs(60))?;
            client.request("wallet.pay", params)
        })
        .await
        .map_err(|e| format!("payment task failed: {e}"))?;
        match answer {
            Ok(paid) => Ok(paid["payment_hash"]
                .as_str()
                .unwrap_or_default()
                .to_string()),
            Err(e) => {
                *self.code.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.code);
                Err(e.message)
            }
        }
    }
}

/// Pays with the agent's own wallet handle (its tools), through the budget gate.
pub struct WalletPayer<'a>(pub &'a crate::wallet::Wallet);

#[async_trait::async_trait]
impl RentPayer for WalletPayer<'_> {
    async fn pay(&self, bolt11: &str, purpose: &str) -> Result<String, String> {
        crate::wallet::spend::pay_invoice(
            self.0,
            bolt11,
            None,
            None,
            purpose,
            crate::wallet::spend::ApprovalWait(None),
        )
        .await
        .map(|paid| paid.payment_hash)
        .map_err(|e| e.to_string())
    }
}

/// Renews every rented VM that expires within `compute.lnvps.renew_lead_secs`, unless the survival tier says the
/// agent cannot afford it (critical, dead): those VMs are let go cleanly instead of half-paid. Used by the
/// heartbeat task `renew_vps`; returns one line per VM.
pub async fn renew_due(
    home: &Home,
    db: &Db,
    config: &crate::config::Config,
    payer: &dyn RentPayer,
) -> Result<Vec<String>, ComputeError> {
    let manager = VmManager::new(home, db.clone(), LnvpsClient::for_home(home, config)?);
    let due = manager
        .due(Duration::from_secs(config.compute.lnvps.renew_lead_secs))
        .await?;
    let tier = crate::money::tiers::load_tier(db)
        .await
        .unwrap_or(crate::money::tiers::SurvivalTier::Normal);
    let afford = config.compute.lnvps.auto_renew
        && !matches!(
            tier,
            crate::money::tiers::SurvivalTier::Critical | crate::money::tiers::SurvivalTier::Dead
        );
    // A child's VM is the child's to pay for (through its LNURL top-up); the parent never renews it.
    let children_vms: Vec<u64> = db
        .call(|c| {
            let mut stmt = c.prepare("SELECT vm_id FROM children WHERE vm_id IS NOT NULL")?;
            let rows = stmt.query_map([], |r| r.get::<_, i64>(0))?;
            rows.map(|r| r.map(|id| id.max(0) as u64)).collect()
        })
        .await
        .map_err(state_error)?;
    let mut lines = Vec::new();
    // A VM never paid for (a rent interrupted before paying) is not renewed: it lapses on its own.
    for vm in due
        .into_iter()
        .filter(|vm| !children_vms.contains(&vm.id) && !vm.payments.is_empty())
    {
        if !afford {
            manager.release(vm.id).await?;
            lines.push(format!(
                "VM {} let go (tier {}, auto_renew {})",
                vm.id,
                tier.as_str(),
                config.compute.lnvps.auto_renew
            ));
            continue;
        }
        match manager.pay_renewal(vm.id, 1, payer, &|_| {}).await {
            Ok(p) => lines.push(format!("VM {} renewed (+{} s)", vm.id, p.time)),
            Err(e) => lines.push(format!("VM {} not renewed: {e}", vm.id)),
        }
    }
    Ok(lines)
}

/// A VM this agent rented, as remembered in the state DB.
#[derive(Clone, Debug, Serialize)]
pub struct RentedVm {
    pub id: u64,
    pub state: String,
    pub ip: Option<String>,
    pub user: String,
    pub expires: Option<String>,
    pub template: String,
    pub image: String,
    pub price_sats: Option<u64>,
    pub created_at: String,
    /// Payment hashes paid for it (rent, renewals, upgrades): its `compute.rent` receipts.
    pub payments: Vec<String>,
}

/// What a rent should pick; `None` = the cheapest template and a Debian (else Ubuntu) image.
#[derive(Clone, Debug, Default)]
pub struct RentRequest {
    /// A template id or name.
    pub template: Option<String>,
    /// An image id or distribution name (`debian`, `ubuntu`, …).
    pub image: Option<String>,
    /// Billing intervals to pay for at once (0 = 1).
    pub intervals: u32,
}

/// Rents, renews and lets go of VMs for one agent home.
pub struct VmManager {
    home: Home,
    db: Db,
    client: LnvpsClient,
}

impl VmManager {
    pub fn new(home: &Home, db: Db, client: LnvpsClient) -> VmManager {
        VmManager {
            home: home.clone(),
            db,
            client,
        }
    }

    /// The manager of `home`'s VMs, with an API client from its config.
    pub fn for_home(
        home: &Home,
        config: &crate::config::Config,
        db: Db,
    ) -> Result<VmManager, ComputeError> {
        Ok(VmManager::new(
            home,
            db,
            LnvpsClient::for_home(home, config)?,
        ))
    }

    pub fn client(&self) -> &LnvpsClient {
        &self.client
    }

    /// The agent's SSH key (made on first use) and its id at LNVPS (registered on first use, under a name made
    /// from the agent's Nostr key: the API returns no key data to compare).
    async fn ssh_key_id(&self) -> Result<u64, ComputeError> {
        let key_path = self.key_path();
        let home = self.home.clone();
        let public = tokio::task::spawn_blocking(move || {
            super::ssh::ensure_keypair(&key_path, &format!("automaton@{}", home.root().display()))
        })
        .await
        .map_err(|e| ComputeError::Config(format!("key task failed: {e}")))??;
        let name = format!(
            "automaton-{}",
            &crate::nostr::keys::agent_keys(&self.home)
                .map(|k| k.public_key().to_hex())
                .unwrap_or_default()
                .chars()
                .take(12)
                .collect::<String>()
        );
        for key in self.client.ssh_keys().await? {
            if key.name == name {
                return Ok(key.id);
            }
        }
        Ok(self.client.add_ssh_key(&name, &public).await?.id)
    }

    fn key_path(&self) -> PathBuf {
        self.home.root().join("ssh").join("id_ed25519")
    }

    fn known_hosts(&self) -> PathBuf {
        self.home.root().join("ssh").join("known_hosts")
    }

    /// Rents a VM and waits until it runs and answers over SSH. `progress` hears each step.
    pub async fn rent(
        &self,
        request: &RentRequest,
        payer: &dyn RentPayer,
        progress: &(dyn Fn(&str) + Send + Sync),
    ) -> Result<RentedVm, ComputeError> {
        let id = self.create(request, progress).await?;
        self.pay_renewal(id, request.intervals, payer, progress)
            .await?;
        self.wait_running(id, progress).await
    }

    /// Whether a payment for VM `id` is recorded. A payment made but not recorded yet (a crash in between) is
    /// found by `pay_renewal` through the stored invoice, and settled without paying again.
    pub async fn is_paid(&self, id: u64) -> Result<bool, ComputeError> {
        let recorded = self
            .db
            .call(move |c| {
                c.query_row(
                    "SELECT count(*) FROM lnvps_payments WHERE vm_id = ?1",
                    [id as i64],
                    |r| r.get::<_, i64>(0),
                )
            })
            .await
            .map_err(state_error)?;
        Ok(recorded > 0)
    }

    /// Creates a VM (unpaid) and records it; returns its id. `rent` pays for it next; a caller that must survive
    /// a crash in between (a spawn) records the id first.
    pub async fn create(
        &self,
        request: &RentRequest,
        progress: &(dyn Fn(&str) + Send + Sync),
    ) -> Result<u64, ComputeError> {
        progress("reading templates and images");
        let templates = self.client.templates().await?;
        let (template, price) = match &request.template {
            Some(wanted) => {
                let t = templates
                    .into_iter()
                    .find(|t| t.id.to_string() == *wanted || t.name.eq_ignore_ascii_case(wanted))
                    .ok_or_else(|| {
                        remote(format!(
                            "no template {wanted} (see `automaton vps templates`)"
                        ))
                    })?;
                let price = price_sats(&self.client, &t.cost_plan).await?;
                (t, price)
            }
            None => {
                let mut best: Option<(Template, u64)> = None;
                for t in templates {
                    if let Some(p) = price_sats(&self.client, &t.cost_plan).await? {
                        if best.as_ref().is_none_or(|(_, b)| p < *b) {
                            best = Some((t, p));
                        }
                    }
                }
                let (t, p) =
                    best.ok_or_else(|| remote("no template has a price in sats".into()))?;
                (t, Some(p))
            }
        };
        let images = self.client.images().await?;
        let image = match &request.image {
            Some(wanted) => images.into_iter().find(|i| {
                i.id.to_string() == *wanted || i.distribution.eq_ignore_ascii_case(wanted)
            }),
            None => ["debian", "ubuntu"].iter().find_map(|d| {
                images
                    .iter()
                    .find(|i| i.distribution.eq_ignore_ascii_case(d))
                    .cloned()
            }),
        }
        .ok_or_else(|| remote("no such image (and no Debian or Ubuntu image)".into()))?;
        progress(&format!(
            "template {} ({}), image {} {}, {} sats per renewal",
            template.name,
            template.region.name,
            image.distribution,
            image.version,
            price.map(|p| p.to_string()).unwrap_or_else(|| "?".into())
        ));
        let key_id = self.ssh_key_id().await?;
        let vm = self.client.create_vm(template.id, image.id, key_id).await?;
        progress(&format!("VM {} created; paying its first period", vm.id));
        let record = RentedVm {
            id: vm.id,
            state: "unpaid".into(),
            ip: None,
            user: image.default_username.clone(),
            expires: None,
            template: template.name.clone(),
            image: format!("{} {}", image.distribution, image.version),
            price_sats: price,
            created_at: crate::state::now_rfc3339(),
            payments: Vec::new(),
        };
        self.remember(&record).await?;
        Ok(vm.id)
    }

    /// Pays `intervals` billing intervals of VM `id` (0 = 1); a stored unpaid invoice is paid first, so an
    /// interrupted renewal pays the same one.
    pub async fn pay_renewal(
        &self,
        id: u64,
        intervals: u32,
        payer: &dyn RentPayer,
        progress: &(dyn Fn(&str) + Send + Sync),
    ) -> Result<Payment, ComputeError> {
        let pending = self
            .db
            .call(move |c| {
                c.query_row(
                    "SELECT pending_payment FROM lnvps_vms WHERE id = ?1",
                    [id as i64],
                    |r| r.get::<_, Option<String>>(0),
                )
                .optional()
                .map(Option::flatten)
            })
            .await
            .map_err(state_error)?;
        let payment = match pending {
            // A stored invoice that was paid already (the process died before recording it) is settled, not
            // paid again; an unpaid one is paid unless it expired.
            Some(pid) => match self.client.payment(&pid).await {
                Ok(p) if p.is_paid || !invoice_expired(&p) => p,
                // Expired: a new invoice, unless our payment of the old one is still in flight (it may yet
                // succeed; paying a second invoice then would pay twice).
                _ if self.in_flight(&pid).await? => {
                    return Err(remote(format!(
                        "the payment of VM {id}'s invoice {pid} is still in flight; asking again later settles it"
                    )))
                }
                _ => self.client.renew(id, intervals.max(1)).await?,
            },
            None => self.client.renew(id, intervals.max(1)).await?,
        };
        let pid = payment.id.clone();
        self.db
            .call(move |c| {
                c.execute(
                    "UPDATE lnvps_vms SET pending_payment = ?2 WHERE id = ?1",
                    params![id as i64, pid],
                )
            })
            .await
            .map_err(state_error)?;
        progress(&format!(
            "paying {} sats for VM {id} (+{} days)",
            (payment.amount + payment.tax).div_ceil(1000),
            payment.time / 86_400
        ));
        let payment = self.settle(id, payment, "renew", payer).await?;
        self.db
            .call(move |c| {
                c.execute(
                    "UPDATE lnvps_vms SET pending_payment = NULL WHERE id = ?1",
                    [id as i64],
                )
            })
            .await
            .map_err(state_error)?;
        progress(&format!("LNVPS confirmed payment of VM {id}"));
        Ok(payment)
    }

    /// Whether this agent's payment with hash `hash` is pending in its books.
    async fn in_flight(&self, hash: &str) -> Result<bool, ComputeError> {
        let hash = hash.to_string();
        let pending = self
            .db
            .call(move |c| {
                c.query_row(
                    "SELECT count(*) FROM receipts WHERE payment_hash = ?1 AND direction = 'out' AND status = 'pending'",
                    [hash],
                    |r| r.get::<_, i64>(0),
                )
            })
            .await
            .map_err(state_error)?;
        Ok(pending > 0)
    }

    /// Upgrades VM `id` to `spec` (`{cpu?, memory?, disk?}`): pays the difference through the gate.
    pub async fn upgrade(
        &self,
        id: u64,
        spec: &Value,
        payer: &dyn RentPayer,
    ) -> Result<Payment, ComputeError> {
        let payment = self.client.upgrade(id, spec).await?;
        self.settle(id, payment, "upgrade", payer).await
    }

    /// Pays `payment`'s invoice (purpose `compute.rent`), links it to VM `id`, and waits until LNVPS sees it.
    async fn settle(
        &self,
        id: u64,
        mut payment: Payment,
        kind: &'static str,
        payer: &dyn RentPayer,
    ) -> Result<Payment, ComputeError> {
        let bolt11 = payment.bolt11().ok_or_else(|| {
            remote(format!(
                "the {kind} payment of VM {id} has no Lightning invoice"
            ))
        })?;
        if !payment.is_paid {
            payer
                .pay(&bolt11, RENT_PURPOSE)
                .await
                .map_err(|e| remote(format!("the {kind} payment of VM {id} was not made: {e}")))?;
        }
        let (hash, amount, seconds) = (
            payment.id.clone(),
            payment.amount + payment.tax,
            payment.time,
        );
        let now = crate::state::now_rfc3339();
        self.db
            .call(move |c| {
                c.execute(
                    "INSERT OR IGNORE INTO lnvps_payments (payment_hash, vm_id, kind, amount_msat, seconds, paid_at) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    params![hash, id as i64, kind, amount as i64, seconds as i64, now],
                )
            })
            .await
            .map_err(state_error)?;
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        while !payment.is_paid {
            if tokio::time::Instant::now() > deadline {
                return Err(remote(format!(
                    "paid, but LNVPS has not seen payment {} of VM {id} yet; asking again resumes",
                    payment.id
                )));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            payment = self.client.payment(&payment.id).await?;
        }
        Ok(payment)
    }

    /// Waits until VM `id` runs with an IP, pins its host keys and checks SSH; records what it learnt.
    pub async fn wait_running(
        &self,
        id: u64,
        progress: &(dyn Fn(&str) + Send + Sync),
    ) -> Result<RentedVm, ComputeError> {
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        let vm = loop {
            let vm = self.client.vm(id).await?;
            if vm.status.state == "running" && vm.ip().is_some() {
                break vm;
            }
            if tokio::time::Instant::now() > deadline {
                return Err(remote(format!(
                    "VM {id} is {} after {} s",
                    vm.status.state,
                    READY_TIMEOUT.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        progress(&format!(
            "VM {id} is running at {}",
            vm.ip().unwrap_or_default()
        ));
        self.update_from(&vm).await?;
        let compute = self.ssh_in(&vm, None).await?;
        compute.check().await?;
        progress(&format!("SSH into VM {id} works"));
        self.get(id)
            .await?
            .ok_or_else(|| remote(format!("VM {id} is not recorded")))
    }

    /// An SSH provider for VM `id` (its host keys pinned from the API), in the remote user's home.
    pub async fn compute(&self, id: u64) -> Result<SshCompute, ComputeError> {
        self.compute_in(id, None).await
    }

    /// The same, working in `workdir` on the VM.
    pub async fn compute_in(
        &self,
        id: u64,
        workdir: Option<PathBuf>,
    ) -> Result<SshCompute, ComputeError> {
        let vm = self.client.vm(id).await?;
        self.update_from(&vm).await?;
        self.ssh_in(&vm, workdir).await
    }

    async fn ssh_in(
        &self,
        vm: &VmStatus,
        workdir: Option<PathBuf>,
    ) -> Result<SshCompute, ComputeError> {
        let ip = vm
            .ip()
            .ok_or_else(|| remote(format!("VM {} has no IP address yet", vm.id)))?;
        let user = vm
            .image
            .as_ref()
            .map(|i| i.default_username.clone())
            .filter(|u| !u.is_empty())
            .or(self.get(vm.id).await?.map(|r| r.user))
            .unwrap_or_else(|| "root".into());
        let target = SshTarget {
            host: ip,
            port: 22,
            user,
            key_path: self.key_path(),
            known_hosts: self.known_hosts(),
        };
        let options = SshOptions {
            workdir,
            ..SshOptions::default()
        };
        SshCompute::connect(target, &vm.host_key_lines(), options).await
    }

    async fn remember(&self, vm: &RentedVm) -> Result<(), ComputeError> {
        let vm = vm.clone();
        self.db
            .call(move |c| {
                c.execute(
                    "INSERT INTO lnvps_vms (id, state, ip, user, expires, template, image, price_sats, created_at) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) ON CONFLICT(id) DO NOTHING",
                    params![
                        vm.id as i64,
                        vm.state,
                        vm.ip,
                        vm.user,
                        vm.expires,
                        vm.template,
                        vm.image,
                        vm.price_sats.map(|p| p as i64),
                        vm.created_at
                    ],
                )
            })
            .await
            .map_err(state_error)
            .map(|_| ())
    }

    async fn update_from(&self, vm: &VmStatus) -> Result<(), ComputeError> {
        let (id, state, ip, expires) = (
            vm.id as i64,
            vm.status.state.clone(),
            vm.ip(),
            vm.expires.clone(),
        );
        let user = vm
            .image
            .as_ref()
            .map(|i| i.default_username.clone())
            .filter(|u| !u.is_empty());
        self.db
            .call(move |c| {
                c.execute(
                    "UPDATE lnvps_vms SET state = ?2, ip = COALESCE(?3, ip), expires = COALESCE(?4, expires), \
                     user = COALESCE(?5, user) WHERE id = ?1",
                    params![id, state, ip, expires, user],
                )
            })
            .await
            .map_err(state_error)
            .map(|_| ())
    }

    /// Every VM this agent rented and has not let go, refreshed from the API where it answers.
    pub async fn list(&self, refresh: bool) -> Result<Vec<RentedVm>, ComputeError> {
        if refresh {
            for vm in self.client.vms().await? {
                self.update_from(&vm).await?;
            }
        }
        self.db
            .call(|c| {
                let mut stmt = c.prepare(
                    "SELECT id, state, ip, user, expires, template, image, price_sats, created_at, \
                     (SELECT group_concat(payment_hash) FROM lnvps_payments p WHERE p.vm_id = v.id) \
                     FROM lnvps_vms v WHERE released_at IS NULL ORDER BY created_at",
                )?;
                let rows = stmt.query_map([], row_to_vm)?;
                rows.collect()
            })
            .await
            .map_err(state_error)
    }

    pub async fn get(&self, id: u64) -> Result<Option<RentedVm>, ComputeError> {
        self.db
            .call(move |c| {
                c.query_row(
                    "SELECT id, state, ip, user, expires, template, image, price_sats, created_at, \
                     (SELECT group_concat(payment_hash) FROM lnvps_payments p WHERE p.vm_id = v.id) \
                     FROM lnvps_vms v WHERE id = ?1 AND released_at IS NULL",
                    [id as i64],
                    row_to_vm,
                )
                .optional()
            })
            .await
            .map_err(state_error)
    }

    /// Lets VM `id` go: auto-renewal off, stopped, its host key forgotten, no longer listed. (The API has no
    /// delete: an unpaid VM lapses at expiry.)
    pub async fn release(&self, id: u64) -> Result<(), ComputeError> {
        let record = self.get(id).await?;
        if let Err(e) = self.client.set_auto_renewal(id, false).await {
            tracing::warn!(error = %e, vm = id, "cannot turn off auto-renewal");
        }
        if let Err(e) = self.client.power(id, "stop").await {
            tracing::warn!(error = %e, vm = id, "cannot stop the VM");
        }
        if let Some(ip) = record.and_then(|r| r.ip) {
            let _ = super::ssh::remove_known_host(&self.known_hosts(), &ip, 22);
        }
        let now = crate::state::now_rfc3339();
        self.db
            .call(move |c| {
                c.execute(
                    "UPDATE lnvps_vms SET released_at = ?2 WHERE id = ?1",
                    params![id as i64, now],
                )
            })
            .await
            .map_err(state_error)
            .map(|_| ())
    }

    /// VMs that expire within `lead` and are not let go: the renewal task pays for these.
    pub async fn due(&self, lead: Duration) -> Result<Vec<RentedVm>, ComputeError> {
        // No VM rented: nothing to ask LNVPS about.
        if self.list(false).await?.is_empty() {
            return Ok(Vec::new());
        }
        let horizon = chrono::Utc::now() + chrono::Duration::from_std(lead).unwrap_or_default();
        Ok(self
            .list(true)
            .await?
            .into_iter()
            .filter(|vm| {
                vm.expires
                    .as_deref()
                    .and_then(|e| chrono::DateTime::parse_from_rfc3339(e).ok())
                    .is_some_and(|e| e <= horizon)
            })
            .collect())
    }
}

fn invoice_expired(p: &Payment) -> bool {
    p.expires
        .as_deref()
        .and_then(|e| chrono::DateTime::parse_from_rfc3339(e).ok())
        .is_some_and(|e| e <= chrono::Utc::now() + chrono::Duration::seconds(30))
}

fn row_to_vm(r: &rusqlite::Row<'_>) -> rusqlite::Result<RentedVm> {
    Ok(RentedVm {
        id: r.get::<_, i64>(0)?.max(0) as u64,
        state: r.get(1)?,
        ip: r.get(2)?,
        user: r.get(3)?,
        expires: r.get(4)?,
        template: r.get(5)?,
        image: r.get(6)?,
        price_sats: r.get::<_, Option<i64>>(7)?.map(|p| p.max(0) as u64),
        created_at: r.get(8)?,
        payments: r
            .get::<_, Option<String>>(9)?
            .map(|list| list.split(',').map(str::to_string).collect())
            .unwrap_or_default(),
    })
}

fn state_error(e: crate::state::StateError) -> ComputeError {
    ComputeError::Config(format!("the state database failed: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drifting_fields_parse_leniently() {
        let old: Payment = serde_json::from_value(serde_json::json!({
            "id": "ab", "amount": 1.5, "tax": null, "currency": "EUR", "is_paid": false,
            "data": {"lightning": "lnbcrt1"}, "unknown": 7
        }))
        .unwrap();
        assert_eq!(old.amount, 150);
        assert_eq!(old.tax, 0);
        assert_eq!(old.bolt11().as_deref(), Some("lnbcrt1"));
        let vm: VmStatus = serde_json::from_value(serde_json::json!({
            "id": 3, "expires": null, "ip_assignments": [{"ip": "10.0.0.5/24"}, {"ip": "2001:db8::1/64"}],
            "status": {"state": "running"},
            "host_ssh_keys": [{"key_type": "ssh-ed25519", "public_key": "AAAAC3Nz"}]
        }))
        .unwrap();
        assert_eq!(vm.ip().as_deref(), Some("10.0.0.5"));
        assert_eq!(vm.host_key_lines(), ["ssh-ed25519 AAAAC3Nz"]);
        assert!(vm.expires.is_none());
    }
}
