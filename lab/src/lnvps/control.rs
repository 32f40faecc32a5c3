//! Lab-only control routes of the LNVPS double (on the control server): inspect VMs and their machines, move a
//! VM's expiry or host sunset (the "controllable clock" of spec §8), and inject faults.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use chrono::Utc;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{lock, Faults, Inner, VmRecord};

pub fn router(inner: Arc<Inner>) -> Router {
    Router::new()
        .route("/lab/lnvps", get(overview))
        .route("/lab/lnvps/vm/{id}", get(vm).post(adjust_vm))
        .route("/lab/lnvps/faults", get(get_faults).post(set_faults))
        .with_state(inner)
}

struct ControlError(StatusCode, String, &'static str);

impl IntoResponse for ControlError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1, "kind": self.2 }))).into_response()
    }
}

fn bad(message: impl Into<String>) -> ControlError {
    ControlError(StatusCode::BAD_REQUEST, message.into(), "bad_request")
}

fn body<T>(payload: Result<Json<T>, JsonRejection>) -> Result<T, ControlError> {
    payload.map(|Json(v)| v).map_err(|e| bad(e.body_text()))
}

impl Inner {
    fn vm_summary(&self, vm: &VmRecord) -> Value {
        let owner = lock(&self.store)
            .users
            .iter()
            .find(|(_, u)| u.id == vm.user_id)
            .map(|(pk, _)| pk.clone());
        let snapshot = self.slot(vm.id).and_then(|s| s.snapshot());
        let dir = self.vm_dir(vm.id);
        json!({
            "id": vm.id,
            "owner_pubkey": owner,
            "ip": format!("127.0.0.{}", vm.ip_octet),
            "expires": vm.expires,
            "deleting_on": self.deleting_on(vm),
            "deleted": vm.deleted,
            "provisioned": vm.provisioned,
            "power_on": vm.power_on,
            "state": snapshot.as_ref().map(|s| s.state.as_str()),
            "sshd_pid": snapshot.as_ref().and_then(|s| s.sshd_pid),
            "last_error": snapshot.as_ref().and_then(|s| s.last_error.clone()),
            "dir": dir,
            "home": dir.join("home"),
        })
    }
}

async fn overview(State(inner): State<Arc<Inner>>) -> Json<Value> {
    let vms: Vec<VmRecord> = lock(&inner.store).vms.values().cloned().collect();
    let vms: Vec<Value> = vms.iter().map(|v| inner.vm_summary(v)).collect();
    Json(json!({
        "url": inner.public_url,
        "settings": inner.settings,
        "day_secs": inner.settings.day_secs(),
        "vms": vms,
    }))
}

async fn vm(
    State(inner): State<Arc<Inner>>,
    Path(id): Path<u64>,
) -> Result<Json<Value>, ControlError> {
    let vm = lock(&inner.store).vms.get(&id).cloned();
    let vm =
        vm.ok_or_else(|| ControlError(StatusCode::NOT_FOUND, format!("no VM {id}"), "not_found"))?;
    Ok(Json(inner.vm_summary(&vm)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Adjust {
    /// Sets `expires` to now + this (negative: in the past). Only for a VM paid at least once.
    #[serde(default)]
    expires_in_secs: Option<i64>,
    /// Sets the host's sunset date to now + this; `null` clears it.
    #[serde(default, deserialize_with = "double_option")]
    host_sunset_in_secs: Option<Option<i64>>,
}

fn double_option<'de, D>(d: D) -> Result<Option<Option<i64>>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    Option::<i64>::deserialize(d).map(Some)
}

async fn adjust_vm(
    State(inner): State<Arc<Inner>>,
    Path(id): Path<u64>,
    payload: Result<Json<Adjust>, JsonRejection>,
) -> Result<Json<Value>, ControlError> {
    let req = body(payload)?;
    let now = Utc::now();
    let vm = {
        let mut store = lock(&inner.store);
        let vm = store.vms.get_mut(&id).ok_or_else(|| {
            ControlError(StatusCode::NOT_FOUND, format!("no VM {id}"), "not_found")
        })?;
        if vm.deleted {
            return Err(bad(format!("VM {id} is deleted")));
        }
        if let Some(secs) = req.expires_in_secs {
            if vm.expires.is_none() {
                return Err(bad(format!(
                    "VM {id} was never paid: it has no expiry to move"
                )));
            }
            let expires = now + chrono::Duration::seconds(secs);
            vm.expires = Some(expires);
            if expires > now {
                // A later lapse stops it again.
                vm.stopped_for_expiry = false;
            }
        }
        if let Some(sunset) = req.host_sunset_in_secs {
            vm.host_sunset = sunset.map(|s| now + chrono::Duration::seconds(s));
        }
        let vm = vm.clone();
        inner.save(&store);
        vm
    };
    // Apply at once rather than on the next tick, so a test sees the consequence right after.
    let actions = inner.expire(Utc::now());
    inner.run_actions(actions);
    Ok(Json(inner.vm_summary(&vm)))
}

async fn get_faults(State(inner): State<Arc<Inner>>) -> Json<Faults> {
    Json(lock(&inner.faults).clone())
}

async fn set_faults(
    State(inner): State<Arc<Inner>>,
    payload: Result<Json<Faults>, JsonRejection>,
) -> Result<Json<Faults>, ControlError> {
    let faults = body(payload)?;
    if let Some(s) = faults.error_status {
        if !(400..=599).contains(&s) {
            return Err(bad("error_status must be a 4xx or 5xx status"));
        }
    }
    *lock(&inner.faults) = faults.clone();
    Ok(Json(faults))
}
