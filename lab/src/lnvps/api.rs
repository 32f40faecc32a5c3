//! The LNVPS user API routes: `{"data": …}` envelope, `{"error": …}` errors with the real statuses and messages,
//! axum's own plain-text rejections for malformed input, NIP-98 on every owner route, the public catalogue, the
//! exchange rate and the per-VM LNURL top-up.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, Path, Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{from_fn, from_fn_with_state, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, patch, post};
use axum::{Json, Router};
use base64::Engine;
use chrono::Utc;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::auth::Nip98;
use super::machine::PowerState;
use super::model::{self, ApiImage, ApiPayment, ApiPrice, ApiSshKey, ApiTemplate, ApiVmStatus};
use super::{lock, Inner, MachineAction, PaymentKind, PaymentRecord, SshKey, Store, VmRecord};
use crate::peers::merchant::{self, InvoiceDescription};

/// Renewals may be bought this many intervals at once.
pub const MAX_INTERVALS: u32 = 120;
/// LNURL top-up bounds (msat), as the real server advertises them.
pub const LNURL_MIN_SENDABLE: u64 = 100_000;
pub const LNURL_MAX_SENDABLE: u64 = 1_000_000_000;

pub fn router(inner: Arc<Inner>) -> Router {
    Router::new()
        .route("/api/v1/account", get(get_account).patch(patch_account))
        .route("/api/v1/ssh-key", get(list_ssh_keys).post(add_ssh_key))
        .route("/api/v1/ssh-key/{id}", delete(delete_ssh_key))
        .route("/api/v1/vm/templates", get(list_templates))
        .route("/api/v1/image", get(list_images))
        .route("/api/v1/vm", get(list_vms).post(create_vm))
        .route("/api/v1/vm/{id}", get(get_vm).patch(patch_vm))
        .route("/api/v1/vm/{id}/renew", get(renew))
        .route("/api/v1/vm/{id}/renew/quote", get(renew_quote))
        .route("/api/v1/vm/{id}/payments", get(vm_payments))
        .route("/api/v1/vm/{id}/start", patch(start_vm))
        .route("/api/v1/vm/{id}/stop", patch(stop_vm))
        .route("/api/v1/vm/{id}/restart", patch(restart_vm))
        .route("/api/v1/vm/{id}/re-install", patch(reinstall_vm))
        .route("/api/v1/vm/{id}/upgrade/quote", post(upgrade_quote))
        .route("/api/v1/vm/{id}/upgrade", post(upgrade))
        .route("/api/v1/payment/methods", get(payment_methods))
        .route("/api/v1/payment/{id}", get(get_payment))
        .route("/api/v1/exchange-rate", get(exchange_rate))
        .route("/.well-known/lnurlp/{id}", get(lnurlp))
        .route("/api/v1/vm/{id}/renew-lnurlp", get(renew_lnurlp))
        .layer(from_fn(super::auth::payload_layer))
        .layer(from_fn_with_state(Arc::clone(&inner), rate_limit))
        .layer(from_fn_with_state(Arc::clone(&inner), inject_faults))
        .with_state(inner)
}

/// An API error: `{"error": message}` with its status. 500s never say more than the real server does.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }
    fn bad(message: impl Into<String>) -> ApiError {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
    fn forbidden(message: impl Into<String>) -> ApiError {
        Self::new(StatusCode::FORBIDDEN, message)
    }
    fn missing() -> ApiError {
        Self::new(StatusCode::NOT_FOUND, "Resource not found")
    }
    fn internal(cause: impl std::fmt::Display) -> ApiError {
        tracing::error!(error = %cause, "LNVPS double internal error");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, INTERNAL_ERROR)
    }
}

const INTERNAL_ERROR: &str = "An internal error occurred";

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({ "error": self.message }))).into_response()
    }
}

type ApiResult = Result<Json<Value>, ApiError>;

fn data<T: Serialize>(value: T) -> ApiResult {
    Ok(Json(json!({ "data": value })))
}

// ---- middleware ----

async fn rate_limit(
    State(inner): State<Arc<Inner>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
    next: Next,
) -> Response {
    if !inner.admit(peer.ip()) {
        let retry = inner.retry_after(peer.ip());
        let mut resp = (StatusCode::TOO_MANY_REQUESTS, "Too many requests").into_response();
        if let Ok(v) = HeaderValue::from_str(&retry.to_string()) {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
        return resp;
    }
    next.run(req).await
}

async fn inject_faults(State(inner): State<Arc<Inner>>, req: Request, next: Next) -> Response {
    enum Fault {
        Error(u16),
        Drop,
    }
    let (fault, delay) = {
        let mut f = lock(&inner.faults);
        let delay = if f.delay_count > 0 {
            f.delay_count -= 1;
            Some(Duration::from_millis(f.delay_ms))
        } else {
            None
        };
        let fault = if f.error_count > 0 {
            f.error_count -= 1;
            Some(Fault::Error(f.error_status.unwrap_or(500)))
        } else if f.drop_count > 0 {
            f.drop_count -= 1;
            Some(Fault::Drop)
        } else {
            None
        };
        (fault, delay)
    };
    if let Some(d) = delay {
        tokio::time::sleep(d).await;
    }
    match fault {
        None => next.run(req).await,
        Some(Fault::Error(code)) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut resp = if status.is_server_error() {
                (status, Json(json!({ "error": INTERNAL_ERROR }))).into_response()
            } else if status == StatusCode::TOO_MANY_REQUESTS {
                (status, "Too many requests").into_response()
            } else {
                (status, Json(json!({ "error": "Injected fault" }))).into_response()
            };
            if status == StatusCode::TOO_MANY_REQUESTS {
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            resp
        }
        Some(Fault::Drop) => {
            // Headers go out, then the body fails: the connection is cut mid-response.
            let body = Body::from_stream(futures::stream::once(async {
                Err::<axum::body::Bytes, std::io::Error>(std::io::Error::other(
                    "lab fault: dropped",
                ))
            }));
            Response::builder()
                .status(StatusCode::OK)
                .header(header::CONTENT_TYPE, "application/json")
                .body(body)
                .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
        }
    }
}

// ---- rendering ----

impl Inner {
    fn api_ssh_key(&self, store: &Store, key: &SshKey) -> ApiSshKey {
        ApiSshKey {
            id: key.id,
            name: key.name.clone(),
            created: key.created,
            vms: store
                .vms
                .values()
                .filter(|v| v.ssh_key_id == key.id && !v.deleted)
                .map(|v| v.id)
                .collect(),
        }
    }

    fn api_vm(&self, store: &Store, vm: &VmRecord) -> Result<ApiVmStatus, ApiError> {
        let template = model::template(vm.template_id).ok_or_else(ApiError::missing)?;
        let image = model::image(vm.image_id).ok_or_else(ApiError::missing)?;
        let key = store
            .ssh_keys
            .get(&vm.ssh_key_id)
            .ok_or_else(ApiError::missing)?;
        let now = Utc::now();
        let snapshot = self.slot(vm.id).and_then(|s| s.snapshot());
        let status = match (vm.provisioned, snapshot) {
            (true, Some(s)) => model::ApiRunningState {
                timestamp: s.since.timestamp().max(0) as u64,
                state: s.state.as_str().into(),
                cpu_usage: 0.0,
                mem_usage: 0.0,
                uptime: match (s.state, s.started_at) {
                    (PowerState::Running, Some(t)) => (now - t).num_seconds().max(0) as u64,
                    _ => 0,
                },
                net_in: 0,
                net_out: 0,
                disk_write: 0,
                disk_read: 0,
            },
            (true, None) => running_state("creating"),
            (false, _) => running_state("unknown"),
        };
        Ok(ApiVmStatus {
            id: vm.id,
            created: vm.created,
            expires: vm.expires,
            mac_address: format!(
                "bc:24:11:{:02x}:{:02x}:{:02x}",
                (vm.id >> 16) as u8,
                (vm.id >> 8) as u8,
                vm.id as u8
            ),
            image: ApiImage::of(&image, &self.default_username),
            template: ApiTemplate::of(
                &template,
                self.started,
                (vm.extra_cpu, vm.extra_memory, vm.extra_disk),
            ),
            ssh_key: self.api_ssh_key(store, key),
            ip_assignments: vec![model::ApiIpAssignment {
                id: vm.id,
                ip: format!("127.0.0.{}/8", vm.ip_octet),
                gateway: "127.0.0.1".into(),
                forward_dns: None,
                reverse_dns: vm.reverse_dns.clone(),
            }],
            status,
            auto_renewal_enabled: vm.auto_renewal_enabled,
            deleting_on: self.deleting_on(vm),
            subscription_id: Some(vm.id),
            host_sunset_date: vm.host_sunset,
            max_prepay_days: self.settings.max_prepay_days,
            cpu_arch: model::cpu_arch().into(),
            host_ssh_keys: vm.host_keys.clone(),
        })
    }

    /// Renewal price of one interval, msat.
    fn renewal_msat(&self, vm: &VmRecord) -> Result<u64, ApiError> {
        let t = model::template(vm.template_id).ok_or_else(ApiError::missing)?;
        let base = model::to_msat(t.plan.currency, t.plan.amount)
            .ok_or_else(|| ApiError::internal("no lab rate for a template currency"))?;
        Ok(base + vm.extra_msat)
    }
}

fn running_state(state: &str) -> model::ApiRunningState {
    model::ApiRunningState {
        timestamp: 0,
        state: state.into(),
        cpu_usage: 0.0,
        mem_usage: 0.0,
        uptime: 0,
        net_in: 0,
        net_out: 0,
        disk_write: 0,
        disk_read: 0,
    }
}

fn api_payment(p: &PaymentRecord) -> ApiPayment {
    ApiPayment {
        id: p.id.clone(),
        vm_id: p.vm_id,
        created: p.created,
        expires: p.expires,
        amount: p.amount,
        tax: p.tax,
        processing_fee: 0,
        currency: "BTC".into(),
        is_paid: p.is_paid,
        paid_at: p.paid_at,
        data: json!({ "lightning": p.bolt11 }),
        time: p.time,
        is_upgrade: matches!(p.kind, PaymentKind::Upgrade { .. }),
        upgrade_params: p.upgrade_params.clone(),
        is_refund: false,
    }
}

/// The caller's VM: unknown → 404 `Resource not found`; someone else's → 403 (checked before deletion); deleted
/// → 404 `VM not found` unless `allow_deleted` (the upgrade routes skip that check).
fn owned_vm(store: &Store, uid: u64, id: u64, allow_deleted: bool) -> Result<&VmRecord, ApiError> {
    let vm = store.vms.get(&id).ok_or_else(ApiError::missing)?;
    if vm.user_id != uid {
        return Err(ApiError::forbidden("VM does not belong to you"));
    }
    if vm.deleted && !allow_deleted {
        return Err(ApiError::new(StatusCode::NOT_FOUND, "VM not found"));
    }
    Ok(vm)
}

// ---- account ----

fn double_option<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// `PATCH /api/v1/account`: strings absent = keep, `null` = clear; the two contact flags are required.
#[derive(Deserialize)]
struct AccountPatch {
    #[serde(default, deserialize_with = "double_option")]
    email: Option<Option<String>>,
    contact_nip17: bool,
    contact_email: bool,
    #[serde(default)]
    contact_telegram: Option<bool>,
    #[serde(default)]
    contact_whatsapp: Option<bool>,
    #[serde(default, deserialize_with = "double_option")]
    whatsapp_number: Option<Option<String>>,
    #[serde(default, deserialize_with = "double_option")]
    country_code: Option<Option<String>>,
    #[serde(default, deserialize_with = "double_option")]
    name: Option<Option<String>>,
    #[serde(default, deserialize_with = "double_option")]
    address_1: Option<Option<String>>,
    #[serde(default, deserialize_with = "double_option")]
    address_2: Option<Option<String>>,
    #[serde(default, deserialize_with = "double_option")]
    state: Option<Option<String>>,
    #[serde(default, deserialize_with = "double_option")]
    city: Option<Option<String>>,
    #[serde(default, deserialize_with = "double_option")]
    postcode: Option<Option<String>>,
    #[serde(default, deserialize_with = "double_option")]
    tax_id: Option<Option<String>>,
}

fn account_json(a: &super::Account) -> Value {
    json!({
        "email": a.email,
        "email_verified": false,
        "account_type": "nostr",
        "contact_nip17": a.contact_nip17,
        "contact_email": a.contact_email,
        "contact_telegram": a.contact_telegram,
        "contact_whatsapp": a.contact_whatsapp,
        "telegram_linked": false,
        "whatsapp_number": a.whatsapp_number,
        "whatsapp_verified": false,
        "country_code": a.country_code,
        "name": a.name,
        "address_1": a.address_1,
        "address_2": a.address_2,
        "state": a.state,
        "city": a.city,
        "postcode": a.postcode,
        "tax_id": a.tax_id,
        "tax": [],
    })
}

async fn get_account(auth: Nip98, State(inner): State<Arc<Inner>>) -> ApiResult {
    let mut store = lock(&inner.store);
    store.upsert_user(&auth.pubkey);
    let account = store
        .users
        .get(&auth.pubkey)
        .map(|u| account_json(&u.account));
    inner.save(&store);
    data(account)
}

async fn patch_account(
    auth: Nip98,
    State(inner): State<Arc<Inner>>,
    Json(req): Json<AccountPatch>,
) -> ApiResult {
    let mut store = lock(&inner.store);
    store.upsert_user(&auth.pubkey);
    let Some(user) = store.users.get_mut(&auth.pubkey) else {
        return Err(ApiError::internal("user vanished"));
    };
    let a = &mut user.account;
    let set = |field: &mut Option<String>, value: Option<Option<String>>| {
        if let Some(v) = value {
            *field = v;
        }
    };
    set(&mut a.email, req.email);
    a.contact_nip17 = req.contact_nip17;
    a.contact_email = req.contact_email;
    if let Some(v) = req.contact_telegram {
        a.contact_telegram = v;
    }
    if let Some(v) = req.contact_whatsapp {
        a.contact_whatsapp = v;
    }
    set(&mut a.whatsapp_number, req.whatsapp_number);
    // Like the real server, a country code that is not ISO alpha-3 is dropped rather than refused.
    set(
        &mut a.country_code,
        req.country_code.map(|c| {
            c.map(|c| c.trim().to_ascii_uppercase())
                .filter(|c| c.len() == 3 && c.chars().all(|ch| ch.is_ascii_uppercase()))
        }),
    );
    set(&mut a.name, req.name);
    set(&mut a.address_1, req.address_1);
    set(&mut a.address_2, req.address_2);
    set(&mut a.state, req.state);
    set(&mut a.city, req.city);
    set(&mut a.postcode, req.postcode);
    set(&mut a.tax_id, req.tax_id);
    inner.save(&store);
    data(json!({}))
}

// ---- ssh keys ----

/// Key types the lab accepts (what OpenSSH offers today).
const SSH_KEY_TYPES: [&str; 7] = [
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
];

/// Parses an OpenSSH public key line: `type base64-blob [comment]`, where the blob must decode and start with the
/// same type name. Returns the normalised line and the comment.
pub fn parse_ssh_public_key(line: &str) -> Option<(String, String)> {
    let mut fields = line.split_whitespace();
    let key_type = fields.next()?;
    let blob = fields.next()?;
    let comment = fields.collect::<Vec<_>>().join(" ");
    if !SSH_KEY_TYPES.contains(&key_type) {
        return None;
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(blob)
        .ok()?;
    let len = u32::from_be_bytes(raw.get(..4)?.try_into().ok()?) as usize;
    if raw.get(4..4 + len)? != key_type.as_bytes() || raw.len() <= 4 + len {
        return None;
    }
    let normalised = if comment.is_empty() {
        format!("{key_type} {blob}")
    } else {
        format!("{key_type} {blob} {comment}")
    };
    Some((normalised, comment))
}

async fn list_ssh_keys(auth: Nip98, State(inner): State<Arc<Inner>>) -> ApiResult {
    let mut store = lock(&inner.store);
    let uid = store.upsert_user(&auth.pubkey);
    let keys: Vec<ApiSshKey> = store
        .ssh_keys
        .values()
        .filter(|k| k.user_id == uid)
        .map(|k| inner.api_ssh_key(&store, k))
        .collect();
    inner.save(&store);
    data(keys)
}

#[derive(Deserialize)]
struct CreateSshKey {
    name: String,
    key_data: String,
}

async fn add_ssh_key(
    auth: Nip98,
    State(inner): State<Arc<Inner>>,
    Json(req): Json<CreateSshKey>,
) -> ApiResult {
    let mut store = lock(&inner.store);
    let uid = store.upsert_user(&auth.pubkey);
    let Some((key_data, comment)) = parse_ssh_public_key(&req.key_data) else {
        inner.save(&store);
        return Err(ApiError::bad("Invalid SSH public key format"));
    };
    store.next_ssh_key_id += 1;
    let key = SshKey {
        id: store.next_ssh_key_id,
        user_id: uid,
        name: if req.name.trim().is_empty() {
            comment
        } else {
            req.name
        },
        key_data,
        created: Utc::now(),
    };
    let api = inner.api_ssh_key(&store, &key);
    store.ssh_keys.insert(key.id, key);
    inner.save(&store);
    data(api)
}

async fn delete_ssh_key(
    auth: Nip98,
    State(inner): State<Arc<Inner>>,
    Path(id): Path<u64>,
) -> ApiResult {
    let mut store = lock(&inner.store);
    let uid = store.upsert_user(&auth.pubkey);
    let key = store.ssh_keys.get(&id).ok_or_else(ApiError::missing)?;
    if key.user_id != uid {
        return Err(ApiError::forbidden("SSH key doesnt belong to you"));
    }
    if store.vms.values().any(|v| v.ssh_key_id == id && !v.deleted) {
        return Err(ApiError::bad("SSH key is in use by a VM"));
    }
    store.ssh_keys.remove(&id);
    inner.save(&store);
    data(Value::Null)
}

// ---- catalogue ----

async fn list_templates(State(inner): State<Arc<Inner>>) -> ApiResult {
    let templates: Vec<ApiTemplate> = model::templates()
        .iter()
        .map(|t| ApiTemplate::of(t, inner.started, (0, 0, 0)))
        .collect();
    data(json!({ "templates": templates }))
}

#[derive(Deserialize)]
struct ImageQuery {
    arch: Option<String>,
}

async fn list_images(State(inner): State<Arc<Inner>>, Query(q): Query<ImageQuery>) -> ApiResult {
    let arch = match q.arch.as_deref() {
        None => None,
        Some("x86_64" | "amd64") => Some("x86_64"),
        Some("arm64" | "aarch64") => Some("arm64"),
        Some(other) => return Err(ApiError::bad(format!("Unknown CPU architecture: {other}"))),
    };
    if arch.is_some_and(|a| a != model::cpu_arch()) {
        return data(Vec::<ApiImage>::new());
    }
    let images: Vec<ApiImage> = model::images()
        .iter()
        .filter(|i| i.enabled)
        .map(|i| ApiImage::of(i, &inner.default_username))
        .collect();
    data(images)
}

async fn payment_methods() -> ApiResult {
    data(json!([{ "name": "lightning", "currencies": ["BTC"], "metadata": {} }]))
}

#[derive(Deserialize)]
struct RateQuery {
    base: Option<String>,
}

/// `GET /api/v1/exchange-rate[?base=BTC]`: the lab's fixed rates, `[{base, quote, rate}]` (rate = price of one
/// `base` in `quote`, major units). Not in the spec's route table: the lab's own, documented in lab/README.md.
async fn exchange_rate(Query(q): Query<RateQuery>) -> ApiResult {
    let base = q.base.unwrap_or_else(|| "BTC".into()).to_ascii_uppercase();
    let Some(base_price) = model::btc_price(&base) else {
        return Err(ApiError::bad("Invalid currency"));
    };
    let mut rates = Vec::new();
    for quote in std::iter::once("BTC").chain(model::LAB_RATES.iter().map(|(c, _)| *c)) {
        if quote == base {
            continue;
        }
        if let Some(p) = model::btc_price(quote) {
            rates.push(json!({ "base": base, "quote": quote, "rate": p / base_price }));
        }
    }
    data(rates)
}

// ---- VMs ----

async fn list_vms(auth: Nip98, State(inner): State<Arc<Inner>>) -> ApiResult {
    let mut store = lock(&inner.store);
    let uid = store.upsert_user(&auth.pubkey);
    let vms = store
        .vms
        .values()
        .filter(|v| v.user_id == uid && !v.deleted)
        .map(|v| inner.api_vm(&store, v))
        .collect::<Result<Vec<_>, _>>()?;
    inner.save(&store);
    data(vms)
}

async fn get_vm(auth: Nip98, State(inner): State<Arc<Inner>>, Path(id): Path<u64>) -> ApiResult {
    let mut store = lock(&inner.store);
    let uid = store.upsert_user(&auth.pubkey);
    let vm = owned_vm(&store, uid, id, false)?;
    data(inner.api_vm(&store, vm)?)
}

#[derive(Deserialize)]
struct CreateVm {
    template_id: u64,
    image_id: u64,
    ssh_key_id: u64,
    #[serde(default)]
    ref_code: Option<String>,
}

async fn create_vm(
    auth: Nip98,
    State(inner): State<Arc<Inner>>,
    Json(req): Json<CreateVm>,
) -> ApiResult {
    let (vm_id, key_data) = {
        let mut store = lock(&inner.store);
        let uid = store.upsert_user(&auth.pubkey);
        inner.save(&store);
        model::template(req.template_id).ok_or_else(ApiError::missing)?;
        let image = model::image(req.image_id).ok_or_else(ApiError::missing)?;
        if !image.enabled {
            return Err(ApiError::forbidden("OS image is not available"));
        }
        let key = store
            .ssh_keys
            .get(&req.ssh_key_id)
            .ok_or_else(ApiError::missing)?;
        if key.user_id != uid {
            return Err(ApiError::forbidden("SSH key doesnt belong to you"));
        }
        let key_data = key.key_data.clone();
        store.next_vm_id += 1;
        let id = store.next_vm_id;
        store.vms.insert(
            id,
            VmRecord {
                id,
                user_id: uid,
                template_id: req.template_id,
                image_id: req.image_id,
                ssh_key_id: req.ssh_key_id,
                created: Utc::now(),
                expires: None,
                first_paid: None,
                // Set once the machine has its address.
                ip_octet: 0,
                auto_renewal_enabled: false,
                reverse_dns: None,
                ref_code: req.ref_code,
                deleted: false,
                provisioned: false,
                power_on: false,
                stopped_for_expiry: false,
                extra_cpu: 0,
                extra_memory: 0,
                extra_disk: 0,
                extra_msat: 0,
                host_sunset: None,
                host_keys: Vec::new(),
            },
        );
        inner.save(&store);
        (id, key_data)
    };
    match inner.create_machine(vm_id, None, key_data).await {
        Ok((octet, keys)) => {
            let mut store = lock(&inner.store);
            let vm = store.vms.get_mut(&vm_id).ok_or_else(ApiError::missing)?;
            vm.ip_octet = octet;
            vm.host_keys = keys;
            let vm = vm.clone();
            inner.save(&store);
            data(inner.api_vm(&store, &vm)?)
        }
        Err(e) => {
            let mut store = lock(&inner.store);
            store.vms.remove(&vm_id);
            inner.save(&store);
            Err(ApiError::internal(e))
        }
    }
}

#[derive(Deserialize)]
struct PatchVm {
    #[serde(default)]
    ssh_key_id: Option<u64>,
    #[serde(default)]
    reverse_dns: Option<String>,
    #[serde(default)]
    auto_renewal_enabled: Option<bool>,
}

async fn patch_vm(
    auth: Nip98,
    State(inner): State<Arc<Inner>>,
    Path(id): Path<u64>,
    Json(req): Json<PatchVm>,
) -> ApiResult {
    let new_key = {
        let mut store = lock(&inner.store);
        let uid = store.upsert_user(&auth.pubkey);
        owned_vm(&store, uid, id, false)?;
        let new_key = match req.ssh_key_id {
            Some(k) => {
                let key = store.ssh_keys.get(&k).ok_or_else(ApiError::missing)?;
                if key.user_id != uid {
                    return Err(ApiError::forbidden("SSH key doesnt belong to you"));
                }
                Some((k, key.key_data.clone()))
            }
            None => None,
        };
        let Some(vm) = store.vms.get_mut(&id) else {
            return Err(ApiError::missing());
        };
        if let Some((k, _)) = &new_key {
            vm.ssh_key_id = *k;
        }
        if let Some(ptr) = req.reverse_dns {
            vm.reverse_dns = Some(ptr);
        }
        if let Some(auto) = req.auto_renewal_enabled {
            vm.auto_renewal_enabled = auto;
        }
        inner.save(&store);
        new_key
    };
    if let Some((_, key_data)) = new_key {
        if let Some(slot) = inner.slot(id) {
            let done = tokio::task::spawn_blocking(move || match lock(&slot.machine).as_ref() {
                Some(m) => m.set_authorized_key(&key_data).map_err(|e| e.to_string()),
                None => Ok(()),
            })
            .await;
            match done {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(ApiError::internal(e)),
                Err(e) => return Err(ApiError::internal(e)),
            }
        }
    }
    data(Value::Null)
}

#[derive(Deserialize)]
struct PaymentQuery {
    method: Option<String>,
    intervals: Option<u32>,
    code: Option<String>,
    #[allow(dead_code)]
    payment_method_id: Option<u64>,
}

/// The lab takes Lightning only. Unknown method names fall back to Lightning, as on the real server.
fn check_method(method: Option<&str>) -> Result<(), ApiError> {
    match method {
        Some("nwc" | "saved") => Err(ApiError::bad("No NWC payment method configured")),
        Some(m @ ("onchain" | "revolut" | "paypal" | "stripe")) => Err(ApiError::bad(format!(
            "Payment method {m} is not available"
        ))),
        _ => Ok(()),
    }
}

struct RenewalTerms {
    amount: u64,
    time: u64,
}

impl Inner {
    /// Price and time of `intervals` renewals, after the interval, discount, prepay and sunset rules.
    fn renewal_terms(&self, vm: &VmRecord, q: &PaymentQuery) -> Result<RenewalTerms, ApiError> {
        check_method(q.method.as_deref())?;
        let intervals = q.intervals.unwrap_or(1);
        if !(1..=MAX_INTERVALS).contains(&intervals) {
            return Err(ApiError::bad(format!(
                "intervals must be between 1 and {MAX_INTERVALS}"
            )));
        }
        if let Some(code) = q.code.as_deref().filter(|c| !c.is_empty()) {
            return Err(ApiError::bad(format!("Discount code {code} is not valid")));
        }
        let per_interval = self.renewal_msat(vm)?;
        let time = self.settings.month_secs * intervals as u64;
        let now = Utc::now();
        let base = vm.expires.map_or(now, |e| e.max(now));
        let new_expiry = base + chrono::Duration::seconds(time as i64);
        let limit = now
            + chrono::Duration::seconds(
                (self.settings.max_prepay_days as u64 * self.settings.day_secs()) as i64,
            );
        if new_expiry > limit {
            return Err(ApiError::bad(format!(
                "Cannot renew past the maximum prepay period of {} days",
                self.settings.max_prepay_days
            )));
        }
        if let Some(sunset) = vm.host_sunset {
            if new_expiry > sunset {
                return Err(ApiError::bad(format!(
                    "Cannot renew past the host sunset date {}",
                    sunset.to_rfc3339()
                )));
            }
        }
        // Lightning invoices are for whole sats.
        let amount = (per_interval * intervals as u64).div_ceil(1000) * 1000;
        Ok(RenewalTerms { amount, time })
    }

    /// Creates a merchant invoice and records the payment.
    async fn new_payment(
        &self,
        vm_id: u64,
        amount: u64,
        description: InvoiceDescription,
        time: u64,
        kind: PaymentKind,
        upgrade_params: Option<String>,
    ) -> Result<PaymentRecord, ApiError> {
        let expiry = self.settings.invoice_expiry_secs;
        let invoice =
            merchant::create_invoice(&self.peers.merchant, amount, description, Some(expiry))
                .await
                .map_err(ApiError::internal)?;
        let now = Utc::now();
        let payment = PaymentRecord {
            id: invoice.payment_hash.clone(),
            vm_id,
            created: now,
            expires: now + chrono::Duration::seconds(expiry as i64),
            amount,
            tax: 0,
            bolt11: invoice.bolt11,
            time,
            is_paid: false,
            paid_at: None,
            kind,
            upgrade_params,
        };
        let mut store = lock(&self.store);
        store.payments.insert(payment.id.clone(), payment.clone());
        self.save(&store);
        Ok(payment)
    }
}

async fn renew(
    auth: Nip98,
    State(inner): State<Arc<Inner>>,
    Path(id): Path<u64>,
    Query(q): Query<PaymentQuery>,
) -> ApiResult {
    let terms = {
        let mut store = lock(&inner.store);
        let uid = store.upsert_user(&auth.pubkey);
        let vm = owned_vm(&store, uid, id, false)?;
        inner.renewal_terms(vm, &q)?
    };
    let payment = inner
        .new_payment(
            id,
            terms.amount,
            InvoiceDescription::Memo(format!("LNVPS lab: renew VM {id}")),
            terms.time,
            PaymentKind::Renewal,
            None,
        )
        .await?;
    data(api_payment(&payment))
}

async fn renew_quote(
    auth: Nip98,
    State(inner): State<Arc<Inner>>,
    Path(id): Path<u64>,
    Query(q): Query<PaymentQuery>,
) -> ApiResult {
    let mut store = lock(&inner.store);
    let uid = store.upsert_user(&auth.pubkey);
    let vm = owned_vm(&store, uid, id, false)?;
    let terms = inner.renewal_terms(vm, &q)?;
    data(json!({
        "amount": terms.amount,
        "tax": 0,
        "processing_fee": 0,
        "currency": "BTC",
        "time": terms.time,
    }))
}

async fn get_payment(
    auth: Nip98,
    State(inner): State<Arc<Inner>>,
    Path(id): Path<String>,
) -> ApiResult {
    if hex::decode(&id).is_err() {
        return Err(ApiError::bad("Invalid payment id"));
    }
    let id = id.to_ascii_lowercase();
    let pending = {
        let mut store = lock(&inner.store);
        let uid = store.upsert_user(&auth.pubkey);
        let payment = store.payments.get(&id).ok_or_else(ApiError::missing)?;
        let owner = store.vms.get(&payment.vm_id).map(|v| v.user_id);
        if owner != Some(uid) {
            return Err(ApiError::forbidden("Payment does not belong to you"));
        }
        !payment.is_paid && payment.expires > Utc::now()
    };
    // Answer with the merchant's latest word, not the last tick's.
    if pending && merchant::invoice_status(&inner.peers.merchant, &id).is_ok_and(|s| s.paid) {
        let actions = inner.apply_payment(&id);
        inner.run_actions(actions);
    }
    let store = lock(&inner.store);
    let payment = store.payments.get(&id).ok_or_else(ApiError::missing)?;
    data(api_payment(payment))
}

#[derive(Deserialize)]
struct PageQuery {
    limit: Option<u64>,
    offset: Option<u64>,
}

async fn vm_payments(
    auth: Nip98,
    State(inner): State<Arc<Inner>>,
    Path(id): Path<u64>,
    Query(q): Query<PageQuery>,
) -> Result<Json<Value>, ApiError> {
    let mut store = lock(&inner.store);
    let uid = store.upsert_user(&auth.pubkey);
    owned_vm(&store, uid, id, false)?;
    let limit = q.limit.unwrap_or(50).min(100);
    let offset = q.offset.unwrap_or(0);
    let mut all: Vec<&PaymentRecord> = store.payments.values().filter(|p| p.vm_id == id).collect();
    all.sort_by_key(|p| std::cmp::Reverse(p.created));
    let total = all.len() as u64;
    let page: Vec<ApiPayment> = all
        .into_iter()
        .skip(offset as usize)
        .take(limit as usize)
        .map(api_payment)
        .collect();
    Ok(Json(
        json!({ "data": page, "total": total, "limit": limit, "offset": offset }),
    ))
}

/// Start/stop/restart: the change happens in the background, so `status.state` follows shortly after the answer.
async fn power(
    auth: Nip98,
    inner: Arc<Inner>,
    id: u64,
    action: fn(u64) -> MachineAction,
    power_on: bool,
) -> ApiResult {
    {
        let mut store = lock(&inner.store);
        let uid = store.upsert_user(&auth.pubkey);
        let vm = owned_vm(&store, uid, id, false)?;
        if !vm.provisioned {
            return Err(ApiError::bad(
                "VM is not provisioned yet, please renew it first",
            ));
        }
        if let Some(vm) = store.vms.get_mut(&id) {
            vm.power_on = power_on;
        }
        inner.save(&store);
    }
    inner.run_actions(vec![action(id)]);
    data(Value::Null)
}

async fn start_vm(auth: Nip98, State(inner): State<Arc<Inner>>, Path(id): Path<u64>) -> ApiResult {
    power(auth, inner, id, MachineAction::Start, true).await
}

async fn stop_vm(auth: Nip98, State(inner): State<Arc<Inner>>, Path(id): Path<u64>) -> ApiResult {
    power(auth, inner, id, MachineAction::Stop, false).await
}

async fn restart_vm(
    auth: Nip98,
    State(inner): State<Arc<Inner>>,
    Path(id): Path<u64>,
) -> ApiResult {
    power(auth, inner, id, MachineAction::Restart, true).await
}

#[derive(Deserialize)]
struct ReinstallRequest {
    #[serde(default)]
    image_id: Option<u64>,
}

async fn reinstall_vm(
    auth: Nip98,
    State(inner): State<Arc<Inner>>,
    Path(id): Path<u64>,
    body: Option<Json<ReinstallRequest>>,
) -> ApiResult {
    let start_after = {
        let mut store = lock(&inner.store);
        let uid = store.upsert_user(&auth.pubkey);
        let vm = owned_vm(&store, uid, id, false)?;
        if vm.expires.is_none_or(|e| e <= Utc::now()) {
            return Err(ApiError::new(
                StatusCode::PAYMENT_REQUIRED,
                "Cannot re-install an expired VM, please renew it first",
            ));
        }
        let image_id = body.and_then(|Json(b)| b.image_id);
        if let Some(image_id) = image_id {
            let image = model::image(image_id).ok_or_else(ApiError::missing)?;
            if !image.enabled {
                return Err(ApiError::forbidden("OS image is not available"));
            }
        }
        let Some(vm) = store.vms.get_mut(&id) else {
            return Err(ApiError::missing());
        };
        if let Some(image_id) = image_id {
            vm.image_id = image_id;
        }
        let start_after = vm.provisioned && vm.power_on;
        inner.save(&store);
        start_after
    };
    let inner2 = Arc::clone(&inner);
    tokio::spawn(async move { inner2.reinstall(id, start_after).await });
    data(Value::Null)
}

impl Inner {
    /// A fresh OS and host key; started again if it was running.
    async fn reinstall(self: Arc<Self>, id: u64, start_after: bool) {
        let Some(slot) = self.slot(id) else { return };
        let done = tokio::task::spawn_blocking(move || {
            let mut guard = lock(&slot.machine);
            let Some(m) = guard.as_mut() else {
                return Ok(Vec::new());
            };
            let result = m.reinstall().map(|()| m.host_keys());
            *lock(&slot.snapshot) = m.status.clone();
            result
        })
        .await;
        match done {
            Ok(Ok(keys)) => {
                let mut store = lock(&self.store);
                if let Some(vm) = store.vms.get_mut(&id) {
                    vm.host_keys = keys;
                }
                self.save(&store);
            }
            Ok(Err(e)) => tracing::error!(vm = id, error = %e, "re-install failed"),
            Err(e) => tracing::error!(vm = id, error = %e, "re-install panicked"),
        }
        if start_after {
            self.machine_action(MachineAction::Start(id)).await;
        }
    }
}

#[derive(Deserialize)]
struct UpgradeRequest {
    #[serde(default)]
    cpu: Option<u16>,
    #[serde(default)]
    memory: Option<u64>,
    #[serde(default)]
    disk: Option<u64>,
}

#[derive(Deserialize)]
struct MethodQuery {
    method: Option<String>,
}

struct UpgradeTerms {
    cpu: u16,
    memory: u64,
    disk: u64,
    extra_msat: u64,
    cost_difference: u64,
    new_renewal: u64,
}

impl Inner {
    /// New resources (every one ≥ current, one strictly greater), their monthly price and the prorated
    /// difference for the time left.
    fn upgrade_terms(&self, vm: &VmRecord, req: &UpgradeRequest) -> Result<UpgradeTerms, ApiError> {
        let t = model::template(vm.template_id).ok_or_else(ApiError::missing)?;
        let (cpu, memory, disk) = (
            t.cpu + vm.extra_cpu,
            t.memory + vm.extra_memory,
            t.disk_size + vm.extra_disk,
        );
        let new = (
            req.cpu.unwrap_or(cpu),
            req.memory.unwrap_or(memory),
            req.disk.unwrap_or(disk),
        );
        if new.0 < cpu || new.1 < memory || new.2 < disk {
            return Err(ApiError::bad("Upgrade cannot reduce CPU, memory or disk"));
        }
        if new == (cpu, memory, disk) {
            return Err(ApiError::bad(
                "Upgrade must increase at least one of CPU, memory or disk",
            ));
        }
        let now = Utc::now();
        let expires = match vm.expires {
            Some(e) if e > now => e,
            _ => {
                return Err(ApiError::bad(
                    "Cannot upgrade an expired VM, please renew it first",
                ))
            }
        };
        let extra_msat = (new.0 - t.cpu) as u64 * model::UPGRADE_MSAT_PER_CPU
            + (new.1 - t.memory).div_ceil(model::GIB) * model::UPGRADE_MSAT_PER_GIB_MEMORY
            + (new.2 - t.disk_size).div_ceil(model::GIB) * model::UPGRADE_MSAT_PER_GIB_DISK;
        let base = self.renewal_msat(vm)? - vm.extra_msat;
        let remaining = (expires - now).num_seconds().max(0) as u128;
        let added = extra_msat.saturating_sub(vm.extra_msat) as u128;
        let prorated = (added * remaining / self.settings.month_secs.max(1) as u128) as u64;
        Ok(UpgradeTerms {
            cpu: new.0,
            memory: new.1,
            disk: new.2,
            extra_msat,
            // At least one sat: an invoice cannot be for nothing.
            cost_difference: prorated.div_ceil(1000).max(1) * 1000,
            new_renewal: base + extra_msat,
        })
    }
}

fn btc(amount: u64) -> ApiPrice {
    ApiPrice {
        currency: "BTC".into(),
        amount,
    }
}

async fn upgrade_quote(
    auth: Nip98,
    State(inner): State<Arc<Inner>>,
    Path(id): Path<u64>,
    Query(q): Query<MethodQuery>,
    Json(req): Json<UpgradeRequest>,
) -> ApiResult {
    check_method(q.method.as_deref())?;
    let mut store = lock(&inner.store);
    let uid = store.upsert_user(&auth.pubkey);
    let vm = owned_vm(&store, uid, id, true)?;
    let terms = inner.upgrade_terms(vm, &req)?;
    data(json!({
        "cost_difference": btc(terms.cost_difference),
        "new_renewal_cost": btc(terms.new_renewal),
        "discount": btc(0),
        "tax": btc(0),
        "processing_fee": btc(0),
    }))
}

async fn upgrade(
    auth: Nip98,
    State(inner): State<Arc<Inner>>,
    Path(id): Path<u64>,
    Query(q): Query<MethodQuery>,
    Json(req): Json<UpgradeRequest>,
) -> ApiResult {
    check_method(q.method.as_deref())?;
    let terms = {
        let mut store = lock(&inner.store);
        let uid = store.upsert_user(&auth.pubkey);
        let vm = owned_vm(&store, uid, id, true)?;
        inner.upgrade_terms(vm, &req)?
    };
    let params =
        json!({ "cpu": terms.cpu, "memory": terms.memory, "disk": terms.disk }).to_string();
    let payment = inner
        .new_payment(
            id,
            terms.cost_difference,
            InvoiceDescription::Memo(format!("LNVPS lab: upgrade VM {id}")),
            0,
            PaymentKind::Upgrade {
                cpu: terms.cpu,
                memory: terms.memory,
                disk: terms.disk,
                extra_msat: terms.extra_msat,
            },
            Some(params),
        )
        .await?;
    data(api_payment(&payment))
}

// ---- LNURL top-up (no auth, bare shapes) ----

fn lnurl_metadata(id: u64) -> String {
    serde_json::to_string(&[["text/plain".to_string(), format!("Extend VM {id}")]])
        .unwrap_or_default()
}

fn live_vm(inner: &Inner, id: u64) -> Option<VmRecord> {
    lock(&inner.store)
        .vms
        .get(&id)
        .filter(|v| !v.deleted)
        .cloned()
}

/// `GET /.well-known/lnurlp/{vm_id}`: LUD-06 step 1. An unknown VM is the plain text `VM not found` (with the
/// 200 the real server's plain-string error gives).
async fn lnurlp(State(inner): State<Arc<Inner>>, Path(id): Path<u64>) -> Response {
    if live_vm(&inner, id).is_none() {
        return "VM not found".into_response();
    }
    Json(json!({
        "callback": format!("{}/api/v1/vm/{id}/renew-lnurlp", inner.public_url),
        "maxSendable": LNURL_MAX_SENDABLE,
        "minSendable": LNURL_MIN_SENDABLE,
        "tag": "payRequest",
        "metadata": lnurl_metadata(id),
    }))
    .into_response()
}

#[derive(Deserialize)]
struct AmountQuery {
    amount: u64,
}

fn lnurl_error(reason: &str) -> Response {
    Json(json!({ "status": "ERROR", "reason": reason })).into_response()
}

/// `GET /api/v1/vm/{id}/renew-lnurlp?amount=<msat>`: an invoice for exactly `amount`, description hash =
/// sha256(metadata); once paid it extends the VM by the time that amount buys.
async fn renew_lnurlp(
    State(inner): State<Arc<Inner>>,
    Path(id): Path<u64>,
    Query(q): Query<AmountQuery>,
) -> Response {
    let Some(vm) = live_vm(&inner, id) else {
        return lnurl_error("VM not found");
    };
    if q.amount < 1000 {
        return lnurl_error("Amount must be greater than 1000");
    }
    let Ok(per_month) = inner.renewal_msat(&vm) else {
        return lnurl_error("Error generating invoice");
    };
    let time =
        (q.amount as u128 * inner.settings.month_secs as u128 / per_month.max(1) as u128) as u64;
    let hash: [u8; 32] = Sha256::digest(lnurl_metadata(id).as_bytes()).into();
    match inner
        .new_payment(
            id,
            q.amount,
            InvoiceDescription::Hash(hash),
            time,
            PaymentKind::TopUp,
            None,
        )
        .await
    {
        Ok(p) => Json(json!({ "pr": p.bolt11, "routes": [] })).into_response(),
        Err(_) => lnurl_error("Error generating invoice"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssh_keys_must_be_well_formed() {
        let good = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPPwF2Oob18mTOudLjiJ00REIcI781xZ3NRLqiebcAHO me@host";
        let (line, comment) = parse_ssh_public_key(good).unwrap();
        assert_eq!(line, good);
        assert_eq!(comment, "me@host");
        assert!(parse_ssh_public_key("ssh-ed25519").is_none());
        assert!(parse_ssh_public_key("ssh-ed25519 not-base64!").is_none());
        // The blob says ed25519; the type says rsa.
        assert!(parse_ssh_public_key(
            "ssh-rsa AAAAC3NzaC1lZDI1NTE5AAAAIPPwF2Oob18mTOudLjiJ00REIcI781xZ3NRLqiebcAHO"
        )
        .is_none());
        assert!(parse_ssh_public_key("ssh-dss AAAA").is_none());
    }

    #[test]
    fn metadata_is_the_documented_string() {
        assert_eq!(lnurl_metadata(7), r#"[["text/plain","Extend VM 7"]]"#);
    }
}
