//! The LNVPS double's catalogue and wire shapes: fixture templates, cost plans, images, the lab's fixed exchange
//! rate, and the JSON objects of the user API (`VmTemplate`, `VmOsImage`, `VmStatus`, `VmPayment`, …).

use chrono::{DateTime, TimeZone, Utc};
use serde::{Deserialize, Serialize};

/// The lab's fixed exchange rates: the price of one bitcoin in each fiat currency, in major units.
pub const LAB_RATES: [(&str, f64); 2] = [("EUR", 100_000.0), ("USD", 110_000.0)];

/// Currencies the API knows (`VmCostPlan.currency`).
pub const CURRENCIES: [&str; 8] = ["EUR", "BTC", "USD", "GBP", "CAD", "CHF", "AUD", "JPY"];

/// Price of one BTC in `currency` (major units), if the lab has a rate for it.
pub fn btc_price(currency: &str) -> Option<f64> {
    if currency == "BTC" {
        return Some(1.0);
    }
    LAB_RATES
        .iter()
        .find(|(c, _)| *c == currency)
        .map(|(_, r)| *r)
}

/// Converts an amount in `currency`'s smallest unit (cents, or msat for BTC) to msat at the lab rate.
pub fn to_msat(currency: &str, amount: u64) -> Option<u64> {
    if currency == "BTC" {
        return Some(amount);
    }
    let rate = btc_price(currency)?;
    // cents / 100 → major units; / rate → BTC; × 1e11 → msat.
    Some(((amount as f64) * 1e9 / rate).round() as u64)
}

/// Converts msat to `currency`'s smallest unit at the lab rate.
pub fn from_msat(currency: &str, msat: u64) -> Option<u64> {
    if currency == "BTC" {
        return Some(msat);
    }
    let rate = btc_price(currency)?;
    Some(((msat as f64) * rate / 1e9).round() as u64)
}

pub const GIB: u64 = 1024 * 1024 * 1024;

/// A cost plan of the fixture catalogue.
#[derive(Debug, Clone)]
pub struct Plan {
    pub id: u64,
    pub name: &'static str,
    pub currency: &'static str,
    /// Smallest unit of `currency` per interval.
    pub amount: u64,
}

/// A template of the fixture catalogue.
#[derive(Debug, Clone)]
pub struct Template {
    pub id: u64,
    pub name: &'static str,
    pub cpu: u16,
    pub memory: u64,
    pub disk_size: u64,
    pub plan: Plan,
}

/// The lab's templates. The cheapest renews for 1,500 sats (EUR 1.50 at the lab rate): payable under the default
/// budget by a freshly funded agent. One is priced in BTC, the others in EUR, so a client must convert to compare.
pub fn templates() -> Vec<Template> {
    vec![
        Template {
            id: 1,
            name: "lab-tiny",
            cpu: 1,
            memory: GIB,
            disk_size: 10 * GIB,
            plan: Plan {
                id: 1,
                name: "lab-tiny monthly",
                currency: "EUR",
                amount: 150,
            },
        },
        Template {
            id: 2,
            name: "lab-small",
            cpu: 2,
            memory: 2 * GIB,
            disk_size: 40 * GIB,
            plan: Plan {
                id: 2,
                name: "lab-small monthly (BTC)",
                currency: "BTC",
                amount: 4_000_000,
            },
        },
        Template {
            id: 3,
            name: "lab-medium",
            cpu: 4,
            memory: 8 * GIB,
            disk_size: 80 * GIB,
            plan: Plan {
                id: 3,
                name: "lab-medium monthly",
                currency: "EUR",
                amount: 900,
            },
        },
    ]
}

pub fn template(id: u64) -> Option<Template> {
    templates().into_iter().find(|t| t.id == id)
}

/// Monthly price of resources added by an upgrade, in msat per unit (vCPU, GiB of memory, GiB of disk).
pub const UPGRADE_MSAT_PER_CPU: u64 = 500_000;
pub const UPGRADE_MSAT_PER_GIB_MEMORY: u64 = 300_000;
pub const UPGRADE_MSAT_PER_GIB_DISK: u64 = 10_000;

/// An OS image of the fixture catalogue.
#[derive(Debug, Clone)]
pub struct Image {
    pub id: u64,
    pub distribution: &'static str,
    pub flavour: &'static str,
    pub version: &'static str,
    pub release_date: DateTime<Utc>,
    pub popularity: f32,
    /// Disabled images are not listed, and re-installing to one is refused.
    pub enabled: bool,
}

pub fn images() -> Vec<Image> {
    let date = |y, m, d| {
        Utc.with_ymd_and_hms(y, m, d, 0, 0, 0)
            .single()
            .unwrap_or_default()
    };
    vec![
        Image {
            id: 1,
            distribution: "debian",
            flavour: "server",
            version: "12",
            release_date: date(2023, 6, 10),
            popularity: 0.6,
            enabled: true,
        },
        Image {
            id: 2,
            distribution: "ubuntu",
            flavour: "server",
            version: "24.04",
            release_date: date(2024, 4, 25),
            popularity: 0.4,
            enabled: true,
        },
        Image {
            id: 3,
            distribution: "debian",
            flavour: "server",
            version: "11",
            release_date: date(2021, 8, 14),
            popularity: 0.0,
            enabled: false,
        },
    ]
}

pub fn image(id: u64) -> Option<Image> {
    images().into_iter().find(|i| i.id == id)
}

/// The CPU architecture the lab's machines have (the host's).
pub fn cpu_arch() -> &'static str {
    match std::env::consts::ARCH {
        "aarch64" => "arm64",
        "x86_64" => "x86_64",
        other => other,
    }
}

// ---- wire shapes ----

#[derive(Debug, Clone, Serialize)]
pub struct ApiPrice {
    pub currency: String,
    pub amount: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ApiCostPlan {
    pub id: u64,
    pub name: String,
    pub currency: String,
    pub amount: u64,
    pub other_price: Vec<ApiPrice>,
    pub interval_amount: u64,
    pub interval_type: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ApiRegion {
    pub id: u64,
    pub name: String,
    pub company_id: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ApiTemplate {
    pub id: u64,
    pub name: String,
    pub created: DateTime<Utc>,
    pub expires: Option<DateTime<Utc>>,
    pub cpu: u16,
    pub memory: u64,
    pub disk_size: u64,
    pub disk_type: String,
    pub disk_interface: String,
    pub cost_plan: ApiCostPlan,
    pub region: ApiRegion,
    pub cpu_arch: String,
    pub ip4_count: u16,
    pub ip6_count: u16,
}

impl ApiTemplate {
    /// `extra` = resources added by upgrades.
    pub fn of(t: &Template, created: DateTime<Utc>, extra: (u16, u64, u64)) -> ApiTemplate {
        let other_price = CURRENCIES
            .iter()
            .filter(|c| **c != t.plan.currency)
            .filter_map(|c| {
                let msat = to_msat(t.plan.currency, t.plan.amount)?;
                Some(ApiPrice {
                    currency: c.to_string(),
                    amount: from_msat(c, msat)?,
                })
            })
            .collect();
        ApiTemplate {
            id: t.id,
            name: t.name.to_string(),
            created,
            expires: None,
            cpu: t.cpu + extra.0,
            memory: t.memory + extra.1,
            disk_size: t.disk_size + extra.2,
            disk_type: "ssd".into(),
            disk_interface: "pcie".into(),
            cost_plan: ApiCostPlan {
                id: t.plan.id,
                name: t.plan.name.to_string(),
                currency: t.plan.currency.to_string(),
                amount: t.plan.amount,
                other_price,
                interval_amount: 1,
                interval_type: "month".into(),
            },
            region: ApiRegion {
                id: 1,
                name: "lab-loopback".into(),
                company_id: Some(1),
            },
            cpu_arch: cpu_arch().into(),
            ip4_count: 1,
            ip6_count: 0,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ApiImage {
    pub id: u64,
    pub distribution: String,
    pub flavour: String,
    pub version: String,
    pub release_date: DateTime<Utc>,
    pub cpu_arch: String,
    pub default_username: String,
    pub popularity: f32,
}

impl ApiImage {
    pub fn of(i: &Image, default_username: &str) -> ApiImage {
        ApiImage {
            id: i.id,
            distribution: i.distribution.into(),
            flavour: i.flavour.into(),
            version: i.version.into(),
            release_date: i.release_date,
            cpu_arch: cpu_arch().into(),
            default_username: default_username.into(),
            popularity: i.popularity,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ApiSshKey {
    pub id: u64,
    pub name: String,
    pub created: DateTime<Utc>,
    pub vms: Vec<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ApiIpAssignment {
    pub id: u64,
    pub ip: String,
    pub gateway: String,
    pub forward_dns: Option<String>,
    pub reverse_dns: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ApiRunningState {
    pub timestamp: u64,
    pub state: String,
    pub cpu_usage: f32,
    pub mem_usage: f32,
    pub uptime: u64,
    pub net_in: u64,
    pub net_out: u64,
    pub disk_write: u64,
    pub disk_read: u64,
}

/// One host key of a VM: algorithm, base64 blob (the `known_hosts` key field) and the `SHA256:` fingerprint
/// `ssh` prints.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HostKey {
    pub key_type: String,
    pub public_key: String,
    pub fingerprint_sha256: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ApiVmStatus {
    pub id: u64,
    pub created: DateTime<Utc>,
    pub expires: Option<DateTime<Utc>>,
    pub mac_address: String,
    pub image: ApiImage,
    pub template: ApiTemplate,
    pub ssh_key: ApiSshKey,
    pub ip_assignments: Vec<ApiIpAssignment>,
    pub status: ApiRunningState,
    pub auto_renewal_enabled: bool,
    pub deleting_on: Option<DateTime<Utc>>,
    pub subscription_id: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_sunset_date: Option<DateTime<Utc>>,
    pub max_prepay_days: u16,
    pub cpu_arch: String,
    pub host_ssh_keys: Vec<HostKey>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ApiPayment {
    pub id: String,
    pub vm_id: u64,
    pub created: DateTime<Utc>,
    pub expires: DateTime<Utc>,
    pub amount: u64,
    pub tax: u64,
    pub processing_fee: u64,
    pub currency: String,
    pub is_paid: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub paid_at: Option<DateTime<Utc>>,
    pub data: serde_json::Value,
    pub time: u64,
    pub is_upgrade: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upgrade_params: Option<String>,
    pub is_refund: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cheapest_template_renews_under_2000_sats() {
        let cheapest = templates()
            .into_iter()
            .map(|t| to_msat(t.plan.currency, t.plan.amount).unwrap())
            .min()
            .unwrap();
        assert!(cheapest < 2_000_000, "{cheapest} msat");
        assert_eq!(cheapest % 1000, 0, "whole sats");
    }

    #[test]
    fn conversions_round_trip_at_the_lab_rate() {
        assert_eq!(to_msat("EUR", 150), Some(1_500_000));
        assert_eq!(from_msat("EUR", 1_500_000), Some(150));
        assert_eq!(to_msat("BTC", 7), Some(7));
        assert_eq!(to_msat("GBP", 1), None);
    }
}
