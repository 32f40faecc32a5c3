//! The LNVPS double: LNVPS's user API (`../shared/specs/lnvps-api.md`) with NIP-98 auth, renewals paid over
//! Lightning to the lab merchant, and VMs that are real machines (an `sshd` each on 127.0.0.x:22). Lab time: a
//! "month" is [`LnvpsSettings::month_secs`] and every day-based rule scales with it.

pub mod api;
mod auth;
pub mod control;
pub mod machine;
pub mod model;
pub mod procs;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::peers::{merchant, Peers};
use machine::{Machine, MachineStatus, PowerState};
use model::HostKey;

/// Lab time and limits of the double. `automaton-lab up` reads them from the environment (see
/// [`LnvpsSettings::from_env`]).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LnvpsSettings {
    /// Length of the billing "month" in seconds (real: 30 days). A lab day is a thirtieth of it.
    pub month_secs: u64,
    /// An order never paid is deleted after this many seconds (real: one hour).
    pub unpaid_order_secs: u64,
    /// How far ahead (in lab days) a VM may be prepaid.
    pub max_prepay_days: u16,
    /// Grace (lab days) before deleting a lapsed VM whose subscription is older than 180 lab days.
    pub delete_after_days: u64,
    /// Requests per minute per client IP before 429.
    pub rate_limit_per_min: u32,
    /// Expiry of renewal and top-up invoices.
    pub invoice_expiry_secs: u32,
}

impl Default for LnvpsSettings {
    fn default() -> Self {
        LnvpsSettings {
            month_secs: 600,
            unpaid_order_secs: 600,
            max_prepay_days: 365,
            delete_after_days: 30,
            rate_limit_per_min: 600,
            invoice_expiry_secs: 600,
        }
    }
}

impl LnvpsSettings {
    /// Defaults, overridden by `AUTOMATON_LAB_LNVPS_MONTH_SECS`, `AUTOMATON_LAB_LNVPS_UNPAID_SECS` and
    /// `AUTOMATON_LAB_LNVPS_RATE_LIMIT` when set to a positive integer.
    pub fn from_env() -> LnvpsSettings {
        let var = |name: &str| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .filter(|v| *v > 0)
        };
        let mut s = LnvpsSettings::default();
        if let Some(v) = var("AUTOMATON_LAB_LNVPS_MONTH_SECS") {
            s.month_secs = v;
        }
        if let Some(v) = var("AUTOMATON_LAB_LNVPS_UNPAID_SECS") {
            s.unpaid_order_secs = v;
        }
        if let Some(v) = var("AUTOMATON_LAB_LNVPS_RATE_LIMIT") {
            s.rate_limit_per_min = v.min(u32::MAX as u64) as u32;
        }
        s
    }

    /// A lab day in seconds.
    pub fn day_secs(&self) -> u64 {
        (self.month_secs / 30).max(1)
    }

    /// Grace between expiry and deletion for a subscription `age_secs` old at expiry (spec §5).
    pub fn grace_secs(&self, age_secs: i64) -> u64 {
        let day = self.day_secs() as i64;
        let days = match age_secs {
            a if a <= day => 1,
            a if a <= 7 * day => 2,
            a if a <= 28 * day => 7,
            a if a <= 180 * day => 14,
            _ => self.delete_after_days as i64,
        };
        (days * day) as u64
    }
}

/// Fault injection on the double's HTTP face.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Faults {
    /// Answer the next `error_count` requests with this status (429 carries `Retry-After: 1`; 5xx the sanitised
    /// `An internal error occurred`).
    #[serde(default)]
    pub error_status: Option<u16>,
    #[serde(default)]
    pub error_count: u32,
    /// Delay the next `delay_count` requests by `delay_ms`.
    #[serde(default)]
    pub delay_ms: u64,
    #[serde(default)]
    pub delay_count: u32,
    /// Drop the connection of the next `drop_count` requests after the status line (the body never arrives).
    #[serde(default)]
    pub drop_count: u32,
}

/// Everything the double remembers across `up`s (`DIR/lnvps/state.json`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Store {
    next_user_id: u64,
    next_vm_id: u64,
    next_ssh_key_id: u64,
    /// By public key (hex).
    users: BTreeMap<String, User>,
    ssh_keys: BTreeMap<u64, SshKey>,
    vms: BTreeMap<u64, VmRecord>,
    /// By payment hash (hex).
    payments: BTreeMap<String, PaymentRecord>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Account {
    email: Option<String>,
    contact_nip17: bool,
    contact_email: bool,
    contact_telegram: bool,
    contact_whatsapp: bool,
    whatsapp_number: Option<String>,
    country_code: Option<String>,
    name: Option<String>,
    address_1: Option<String>,
    address_2: Option<String>,
    state: Option<String>,
    city: Option<String>,
    postcode: Option<String>,
    tax_id: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct User {
    id: u64,
    created: DateTime<Utc>,
    account: Account,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct SshKey {
    id: u64,
    user_id: u64,
    name: String,
    key_data: String,
    created: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct VmRecord {
    id: u64,
    user_id: u64,
    template_id: u64,
    image_id: u64,
    ssh_key_id: u64,
    created: DateTime<Utc>,
    /// `None` until the first payment.
    expires: Option<DateTime<Utc>>,
    first_paid: Option<DateTime<Utc>>,
    ip_octet: u8,
    auto_renewal_enabled: bool,
    reverse_dns: Option<String>,
    ref_code: Option<String>,
    deleted: bool,
    /// Paid at least once: the machine exists for the API.
    provisioned: bool,
    /// The owner wants it running (false after stop or the expiry stop).
    power_on: bool,
    /// The expiry stop happened (it happens once per lapse).
    stopped_for_expiry: bool,
    extra_cpu: u16,
    extra_memory: u64,
    extra_disk: u64,
    /// Monthly price of the upgrades, msat.
    extra_msat: u64,
    host_sunset: Option<DateTime<Utc>>,
    host_keys: Vec<HostKey>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
enum PaymentKind {
    Renewal,
    TopUp,
    Upgrade {
        cpu: u16,
        memory: u64,
        disk: u64,
        extra_msat: u64,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct PaymentRecord {
    id: String,
    vm_id: u64,
    created: DateTime<Utc>,
    expires: DateTime<Utc>,
    amount: u64,
    tax: u64,
    bolt11: String,
    time: u64,
    is_paid: bool,
    paid_at: Option<DateTime<Utc>>,
    kind: PaymentKind,
    upgrade_params: Option<String>,
}

/// A VM's machine as the rest of the double holds it: the machine behind a lock taken only on blocking threads,
/// and the last status it reported, readable at any time.
struct MachineSlot {
    machine: Mutex<Option<Machine>>,
    snapshot: Mutex<MachineStatus>,
}

impl MachineSlot {
    fn snapshot(&self) -> Option<MachineStatus> {
        self.snapshot.lock().ok().map(|s| s.clone())
    }
}

/// Requests per client IP in the last minute.
#[derive(Default)]
struct RateWindow {
    hits: HashMap<IpAddr, VecDeque<Instant>>,
}

impl RateWindow {
    /// Counts a request from `ip` at `now`; false (and not counted) when `limit` requests already came from it
    /// within the minute before.
    fn admit(&mut self, ip: IpAddr, limit: u32, now: Instant) -> bool {
        let window = self.hits.entry(ip).or_default();
        while window
            .front()
            .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(60))
        {
            window.pop_front();
        }
        if window.len() >= limit as usize {
            return false;
        }
        window.push_back(now);
        true
    }
}

/// The double's shared state.
pub struct Inner {
    settings: LnvpsSettings,
    dir: PathBuf,
    public_url: String,
    peers: Arc<Peers>,
    store: Mutex<Store>,
    machines: Mutex<HashMap<u64, Arc<MachineSlot>>>,
    replay: auth::ReplayGuard,
    rate: Mutex<RateWindow>,
    faults: Mutex<Faults>,
    /// When the catalogue was "created" (the fixture templates' `created`).
    started: DateTime<Utc>,
    default_username: String,
    stopping: AtomicBool,
}

#[derive(Debug, thiserror::Error)]
pub enum LnvpsError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("reading {path}: {source}")]
    State {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// The running double: its server, the settlement/expiry loop and the machines.
pub struct Lnvps {
    inner: Arc<Inner>,
    addr: SocketAddr,
    cancel: CancellationToken,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Lnvps {
    /// Opens (or resumes) the double stored under `dir`, serves it on `listener`, and restarts the machines of
    /// VMs that were running.
    pub async fn start(
        dir: &Path,
        listener: TcpListener,
        peers: Arc<Peers>,
        settings: LnvpsSettings,
    ) -> Result<Lnvps, LnvpsError> {
        std::fs::create_dir_all(dir.join("vms")).map_err(|source| LnvpsError::Io {
            what: format!("creating {}", dir.display()),
            source,
        })?;
        let addr = listener.local_addr().map_err(|source| LnvpsError::Io {
            what: "reading the LNVPS listener's address".into(),
            source,
        })?;
        let store_path = dir.join("state.json");
        let store: Store = match std::fs::read(&store_path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| LnvpsError::State {
                path: store_path.clone(),
                source,
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Store::default(),
            Err(source) => {
                return Err(LnvpsError::Io {
                    what: format!("reading {}", store_path.display()),
                    source,
                })
            }
        };
        procs::ensure_reaper();
        let inner = Arc::new(Inner {
            settings,
            dir: dir.to_path_buf(),
            public_url: format!("http://{addr}"),
            peers,
            store: Mutex::new(store),
            machines: Mutex::new(HashMap::new()),
            replay: auth::ReplayGuard::default(),
            rate: Mutex::new(RateWindow::default()),
            faults: Mutex::new(Faults::default()),
            started: Utc::now(),
            default_username: procs::current_user(),
            stopping: AtomicBool::new(false),
        });
        inner.resume_machines().await;

        let cancel = CancellationToken::new();
        let app = api::router(Arc::clone(&inner));
        let server_cancel = cancel.clone();
        let server = tokio::spawn(async move {
            let served = axum::serve(
                listener,
                app.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .with_graceful_shutdown(server_cancel.cancelled_owned())
            .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "LNVPS double server stopped");
            }
        });
        let ticker = tokio::spawn(Arc::clone(&inner).run_loop(cancel.clone()));
        Ok(Lnvps {
            inner,
            addr,
            cancel,
            tasks: Mutex::new(vec![server, ticker]),
        })
    }

    /// The API base URL, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn settings(&self) -> &LnvpsSettings {
        &self.inner.settings
    }

    /// `/lab/lnvps/*` control routes (for the control server).
    pub fn control_router(&self) -> axum::Router {
        control::router(Arc::clone(&self.inner))
    }

    /// Stops the server and the loop, then every machine (their processes die). Idempotent.
    pub async fn shutdown(&self) {
        self.inner.stopping.store(true, Ordering::SeqCst);
        self.cancel.cancel();
        let tasks = self
            .tasks
            .lock()
            .map(|mut t| std::mem::take(&mut *t))
            .unwrap_or_default();
        for task in tasks {
            let abort = task.abort_handle();
            if tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
        let inner = Arc::clone(&self.inner);
        let _ = tokio::task::spawn_blocking(move || inner.stop_all_machines()).await;
    }

    /// Synchronous stop for `Drop` paths: kills every machine's processes now.
    pub fn halt(&self) {
        self.inner.stopping.store(true, Ordering::SeqCst);
        self.cancel.cancel();
        if let Ok(mut tasks) = self.tasks.lock() {
            for t in tasks.drain(..) {
                t.abort();
            }
        }
        self.inner.stop_all_machines();
    }
}

impl Drop for Lnvps {
    fn drop(&mut self) {
        self.halt();
    }
}

/// What to do with a machine once the store lock is released.
#[derive(Debug, Clone, Copy)]
enum MachineAction {
    Start(u64),
    Stop(u64),
    Restart(u64),
    Destroy(u64),
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind: keep serving.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Inner {
    fn save(&self, store: &Store) {
        let path = self.dir.join("state.json");
        let tmp = self.dir.join("state.json.tmp");
        let result = serde_json::to_vec_pretty(store)
            .map_err(std::io::Error::other)
            .and_then(|bytes| std::fs::write(&tmp, bytes))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = result {
            tracing::error!(error = %e, path = %path.display(), "saving the LNVPS double's state failed");
        }
    }

    fn vm_dir(&self, vm_id: u64) -> PathBuf {
        self.dir.join("vms").join(vm_id.to_string())
    }

    fn slot(&self, vm_id: u64) -> Option<Arc<MachineSlot>> {
        lock(&self.machines).get(&vm_id).cloned()
    }

    fn taken_octets(&self) -> HashSet<u8> {
        let store = lock(&self.store);
        store
            .vms
            .values()
            .filter(|v| !v.deleted)
            .map(|v| v.ip_octet)
            .collect()
    }

    /// Creates the machine of a new (or resumed) VM; returns its address octet and host keys.
    async fn create_machine(
        self: &Arc<Self>,
        vm_id: u64,
        preferred: Option<u8>,
        authorized_key: String,
    ) -> Result<(u8, Vec<HostKey>), machine::MachineError> {
        let mut taken = self.taken_octets();
        if let Some(p) = preferred {
            taken.remove(&p);
        }
        let dir = self.vm_dir(vm_id);
        let created = tokio::task::spawn_blocking(move || {
            Machine::create(vm_id, &dir, preferred, &taken, &authorized_key)
        })
        .await
        .map_err(|e| machine::MachineError::Io {
            what: "creating a machine".into(),
            source: std::io::Error::other(e),
        })??;
        let octet = created.octet();
        let keys = created.host_keys();
        let slot = Arc::new(MachineSlot {
            snapshot: Mutex::new(created.status.clone()),
            machine: Mutex::new(Some(created)),
        });
        lock(&self.machines).insert(vm_id, slot);
        Ok((octet, keys))
    }

    /// On start: recreates the machines of existing VMs and starts those that were running.
    async fn resume_machines(self: &Arc<Self>) {
        let vms: Vec<(u64, u8, String, bool)> = {
            let store = lock(&self.store);
            store
                .vms
                .values()
                .filter(|v| !v.deleted)
                .map(|v| {
                    let key = store
                        .ssh_keys
                        .get(&v.ssh_key_id)
                        .map(|k| k.key_data.clone())
                        .unwrap_or_default();
                    (v.id, v.ip_octet, key, v.provisioned && v.power_on)
                })
                .collect()
        };
        for (id, octet, key, running) in vms {
            match self.create_machine(id, Some(octet), key).await {
                Ok((new_octet, keys)) => {
                    let mut store = lock(&self.store);
                    if let Some(vm) = store.vms.get_mut(&id) {
                        if new_octet != octet {
                            tracing::warn!(
                                vm = id,
                                old = octet,
                                new = new_octet,
                                "a resumed VM's address was taken; it moved"
                            );
                        }
                        vm.ip_octet = new_octet;
                        vm.host_keys = keys;
                    }
                    self.save(&store);
                }
                Err(e) => {
                    tracing::error!(vm = id, error = %e, "recreating a VM's machine failed");
                    continue;
                }
            }
            if running {
                self.machine_action(MachineAction::Start(id)).await;
            }
        }
    }

    /// Runs a machine action on a blocking thread and records the resulting status.
    async fn machine_action(self: &Arc<Self>, action: MachineAction) {
        let (MachineAction::Start(id)
        | MachineAction::Stop(id)
        | MachineAction::Restart(id)
        | MachineAction::Destroy(id)) = action;
        let Some(slot) = self.slot(id) else {
            return;
        };
        if self.stopping.load(Ordering::SeqCst)
            && !matches!(action, MachineAction::Stop(_) | MachineAction::Destroy(_))
        {
            return;
        }
        if let MachineAction::Destroy(_) = action {
            lock(&self.machines).remove(&id);
        }
        let slot2 = Arc::clone(&slot);
        let done = tokio::task::spawn_blocking(move || {
            let mut guard = lock(&slot2.machine);
            let result = match (action, guard.as_mut()) {
                (MachineAction::Start(_), Some(m)) => m.start().map_err(|e| e.to_string()),
                (MachineAction::Stop(_), Some(m)) => {
                    m.stop();
                    Ok(())
                }
                (MachineAction::Restart(_), Some(m)) => {
                    m.stop();
                    m.start().map_err(|e| e.to_string())
                }
                (MachineAction::Destroy(_), Some(_)) => {
                    if let Some(m) = guard.take() {
                        m.destroy();
                    }
                    Ok(())
                }
                (_, None) => Ok(()),
            };
            if let Some(m) = guard.as_ref() {
                *lock(&slot2.snapshot) = m.status.clone();
            }
            result
        })
        .await;
        match done {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(vm = id, error = %e, "VM machine action failed"),
            Err(e) => tracing::error!(vm = id, error = %e, "VM machine action panicked"),
        }
    }

    fn run_actions(self: &Arc<Self>, actions: Vec<MachineAction>) {
        for action in actions {
            let inner = Arc::clone(self);
            tokio::spawn(async move { inner.machine_action(action).await });
        }
    }

    fn stop_all_machines(&self) {
        let slots: Vec<Arc<MachineSlot>> = lock(&self.machines).values().cloned().collect();
        for slot in slots {
            let mut guard = lock(&slot.machine);
            if let Some(m) = guard.as_mut() {
                m.stop();
                *lock(&slot.snapshot) = m.status.clone();
            }
        }
    }

    /// Settlement, expiry and machine health, four times a second.
    async fn run_loop(self: Arc<Self>, cancel: CancellationToken) {
        let mut interval = tokio::time::interval(Duration::from_millis(250));
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = interval.tick() => {}
            }
            let actions = self.settle_paid();
            self.run_actions(actions);
            let actions = self.expire(Utc::now());
            self.run_actions(actions);
            self.refresh_machines();
        }
    }

    /// Checks pending, unexpired payments with the merchant and applies those it saw paid.
    fn settle_paid(self: &Arc<Self>) -> Vec<MachineAction> {
        let now = Utc::now();
        let pending: Vec<String> = {
            let store = lock(&self.store);
            store
                .payments
                .values()
                .filter(|p| !p.is_paid && p.expires > now)
                .map(|p| p.id.clone())
                .collect()
        };
        let mut actions = Vec::new();
        for id in pending {
            let paid = merchant::invoice_status(&self.peers.merchant, &id)
                .map(|s| s.paid)
                .unwrap_or(false);
            if paid {
                actions.extend(self.apply_payment(&id));
            }
        }
        actions
    }

    /// Marks `payment_id` paid and applies it to its VM. Idempotent.
    fn apply_payment(self: &Arc<Self>, payment_id: &str) -> Vec<MachineAction> {
        let now = Utc::now();
        let mut store = lock(&self.store);
        let Some(payment) = store.payments.get_mut(payment_id) else {
            return Vec::new();
        };
        if payment.is_paid {
            return Vec::new();
        }
        payment.is_paid = true;
        payment.paid_at = Some(now);
        let payment = payment.clone();
        let mut actions = Vec::new();
        if let Some(vm) = store.vms.get_mut(&payment.vm_id) {
            match &payment.kind {
                PaymentKind::Renewal | PaymentKind::TopUp => {
                    // A lapsed VM is extended from now: the paid time is never spent while it was off.
                    let base = vm.expires.map_or(now, |e| e.max(now));
                    vm.expires = Some(base + chrono::Duration::seconds(payment.time as i64));
                    if vm.first_paid.is_none() {
                        vm.first_paid = Some(now);
                    }
                    if !vm.deleted {
                        if !vm.provisioned {
                            vm.provisioned = true;
                            vm.power_on = true;
                            actions.push(MachineAction::Start(vm.id));
                        } else if vm.stopped_for_expiry {
                            vm.stopped_for_expiry = false;
                            vm.power_on = true;
                            actions.push(MachineAction::Start(vm.id));
                        }
                    }
                }
                PaymentKind::Upgrade {
                    cpu,
                    memory,
                    disk,
                    extra_msat,
                } => {
                    if let Some(t) = model::template(vm.template_id) {
                        vm.extra_cpu = cpu.saturating_sub(t.cpu);
                        vm.extra_memory = memory.saturating_sub(t.memory);
                        vm.extra_disk = disk.saturating_sub(t.disk_size);
                    }
                    vm.extra_msat = *extra_msat;
                    // A running VM is stopped and started again to apply the new resources.
                    if vm.provisioned && vm.power_on && !vm.deleted {
                        actions.push(MachineAction::Restart(vm.id));
                    }
                }
            }
        }
        tracing::info!(payment = %payment.id, vm = payment.vm_id, "LNVPS payment settled");
        self.save(&store);
        actions
    }

    /// Stops VMs at expiry (once), deletes them after their grace, and reaps orders never paid.
    fn expire(self: &Arc<Self>, now: DateTime<Utc>) -> Vec<MachineAction> {
        let mut store = lock(&self.store);
        let mut actions = Vec::new();
        let mut changed = false;
        for vm in store.vms.values_mut().filter(|v| !v.deleted) {
            match vm.expires {
                None => {
                    let age = now - vm.created;
                    if age.num_seconds() >= self.settings.unpaid_order_secs as i64 {
                        vm.deleted = true;
                        changed = true;
                        actions.push(MachineAction::Destroy(vm.id));
                        tracing::info!(vm = vm.id, "unpaid LNVPS order deleted");
                    }
                }
                Some(expires) => {
                    if let Some(deleting_on) = self.deleting_on(vm) {
                        if now >= deleting_on {
                            vm.deleted = true;
                            vm.power_on = false;
                            changed = true;
                            actions.push(MachineAction::Destroy(vm.id));
                            tracing::info!(vm = vm.id, "lapsed LNVPS VM deleted");
                            continue;
                        }
                    }
                    if now >= expires && !vm.stopped_for_expiry {
                        vm.stopped_for_expiry = true;
                        vm.power_on = false;
                        changed = true;
                        actions.push(MachineAction::Stop(vm.id));
                        tracing::info!(vm = vm.id, "LNVPS VM expired: stopped");
                    }
                }
            }
        }
        if changed {
            self.save(&store);
        }
        actions
    }

    fn deleting_on(&self, vm: &VmRecord) -> Option<DateTime<Utc>> {
        let expires = vm.expires?;
        let first = vm.first_paid.unwrap_or(vm.created);
        let age = (expires - first).num_seconds();
        Some(expires + chrono::Duration::seconds(self.settings.grace_secs(age) as i64))
    }

    /// Notices machines whose sshd died on its own.
    fn refresh_machines(&self) {
        let slots: Vec<Arc<MachineSlot>> = lock(&self.machines).values().cloned().collect();
        for slot in slots {
            let Ok(mut guard) = slot.machine.try_lock() else {
                continue;
            };
            if let Some(m) = guard.as_mut() {
                if m.status.state == PowerState::Running {
                    m.refresh();
                    *lock(&slot.snapshot) = m.status.clone();
                }
            }
        }
    }

    /// Counts a request from `ip`; false when it is over the per-minute limit.
    fn admit(&self, ip: IpAddr) -> bool {
        lock(&self.rate).admit(ip, self.settings.rate_limit_per_min, Instant::now())
    }

    /// Seconds until `ip` may send again (the oldest request leaves the window).
    fn retry_after(&self, ip: IpAddr) -> u64 {
        let rate = lock(&self.rate);
        rate.hits
            .get(&ip)
            .and_then(|w| w.front())
            .map(|t| 60u64.saturating_sub(t.elapsed().as_secs()).max(1))
            .unwrap_or(1)
    }
}

impl Store {
    /// The user of `pubkey`, created on first sight (as the real server does on every authenticated call).
    fn upsert_user(&mut self, pubkey: &str) -> u64 {
        if let Some(u) = self.users.get(pubkey) {
            return u.id;
        }
        self.next_user_id += 1;
        let id = self.next_user_id;
        self.users.insert(
            pubkey.to_string(),
            User {
                id,
                created: Utc::now(),
                account: Account::default(),
            },
        );
        id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_is_per_ip_per_minute() {
        let mut w = RateWindow::default();
        let a: IpAddr = [127, 0, 0, 1].into();
        let b: IpAddr = [127, 0, 0, 2].into();
        let t0 = Instant::now();
        assert!(w.admit(a, 2, t0));
        assert!(w.admit(a, 2, t0));
        assert!(!w.admit(a, 2, t0 + Duration::from_secs(59)));
        assert!(w.admit(b, 2, t0));
        assert!(w.admit(a, 2, t0 + Duration::from_secs(60)));
    }

    #[test]
    fn grace_follows_the_spec_table_in_lab_days() {
        let s = LnvpsSettings {
            month_secs: 3000,
            ..LnvpsSettings::default()
        };
        let day = s.day_secs() as i64;
        assert_eq!(day, 100);
        assert_eq!(s.grace_secs(day), 100);
        assert_eq!(s.grace_secs(day + 1), 200);
        assert_eq!(s.grace_secs(7 * day + 1), 700);
        assert_eq!(s.grace_secs(28 * day + 1), 1400);
        assert_eq!(s.grace_secs(181 * day), 3000);
    }
}
