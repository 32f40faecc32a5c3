//! The agent's configuration: built-in defaults → `automaton.yaml` → `AUTOMATON__SECTION__KEY` env → flags.
//!
//! Every layer is checked against the same typed `Config` with unknown keys denied, so a typo anywhere is an
//! error that names where it came from (file and line, env var, or flag) instead of a silently ignored setting.

pub mod keys;
mod secret;
pub mod services;
pub mod yaml;

use std::fmt;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::home::Home;
pub use secret::Secret;

/// Prefix of environment overrides: `AUTOMATON__INFERENCE__MODEL=gpt-4o` sets `inference.model`.
pub const ENV_PREFIX: &str = "AUTOMATON__";

/// Everything an agent is configured with. Secrets are not in here, only where to find them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub name: String,
    pub creator: CreatorConfig,
    pub inference: InferenceConfig,
    pub compute: ComputeConfig,
    pub agent: AgentConfig,
    pub limits: LimitsConfig,
    pub wallet: WalletConfig,
    pub http: HttpConfig,
    pub nostr: NostrConfig,
    /// Children this agent spawns, and (for a child) the VM it pays for itself.
    #[serde(skip_serializing_if = "ReplicationConfig::is_default")]
    pub replication: ReplicationConfig,
}

/// Who made this agent. The creator has full audit rights (constitution, law III).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CreatorConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Nostr public key (`npub1…`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub npub: Option<String>,
    /// Lightning node id (33-byte compressed public key, hex).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    /// A message shown to the agent on its first run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Which wire protocol the inference endpoint speaks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum InferenceKind {
    /// OpenAI chat completions: OpenAI, OpenRouter, ollama, llama.cpp, vLLM, Conway, the lab's scripted model.
    #[default]
    #[serde(rename = "openai")]
    OpenAi,
    /// Anthropic Messages API.
    #[serde(rename = "anthropic")]
    Anthropic,
}

impl InferenceKind {
    pub const ALL: [InferenceKind; 2] = [InferenceKind::OpenAi, InferenceKind::Anthropic];

    pub fn as_str(self) -> &'static str {
        match self {
            InferenceKind::OpenAi => "openai",
            InferenceKind::Anthropic => "anthropic",
        }
    }
}

impl fmt::Display for InferenceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for InferenceKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "openai" => Ok(InferenceKind::OpenAi),
            "anthropic" => Ok(InferenceKind::Anthropic),
            other => Err(format!(
                "unknown inference provider `{other}` (expected openai or anthropic)"
            )),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InferenceConfig {
    pub provider: InferenceKind,
    pub base_url: String,
    pub model: String,
    /// Name of the environment variable holding the API key (never the key itself).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_key_env: Option<String>,
    /// A file holding the API key; must be mode 0600. Relative paths are relative to the home.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_key_file: Option<PathBuf>,
    pub max_tokens: u32,
    pub timeout_secs: u64,
    pub max_retries: u32,
    /// First retry backoff in milliseconds (doubles per retry, with jitter). Owned by the inference module.
    pub retry_base_ms: u64,
    /// Longest backoff the runtime picks itself; a server's `Retry-After` is honoured up to `deadline_secs`.
    pub retry_max_ms: u64,
    /// Total time for one completion including all retries and waits.
    pub deadline_secs: u64,
    /// What the endpoint charges, so each call's cost can be recorded in sats.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub price: Option<Price>,
    /// A different model per survival tier (same endpoint and key); unset tiers fall back towards `model`.
    #[serde(skip_serializing_if = "TierModels::is_empty")]
    pub tier_models: TierModels,
    /// How calls are paid for: `api_key` (the key above, if any) or `l402` (each call paid over Lightning).
    #[serde(skip_serializing_if = "InferenceAuth::is_api_key")]
    pub auth: InferenceAuth,
    /// With `auth: l402`: the most one call may cost, in sats (its routing fee aside); dearer calls are refused.
    pub l402_max_sats: u64,
}

/// How inference calls are paid for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InferenceAuth {
    /// A bearer API key (or nothing, for a local server).
    #[default]
    ApiKey,
    /// Pay per call with L402 from the agent's wallet (through the budget gate; counted as inference spend).
    L402,
}

impl InferenceAuth {
    pub fn is_api_key(&self) -> bool {
        *self == InferenceAuth::ApiKey
    }
}

/// Model routing by survival tier (`inference.tier_models.low_compute: gpt-4o-mini`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TierModels {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub high: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub normal: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub low_compute: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub critical: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dead: Option<String>,
}

impl TierModels {
    pub fn is_empty(&self) -> bool {
        self == &TierModels::default()
    }
}

impl Default for InferenceConfig {
    fn default() -> Self {
        InferenceConfig {
            provider: InferenceKind::OpenAi,
            base_url: "https://api.openai.com/v1".to_string(),
            model: "gpt-4o-mini".to_string(),
            api_key_env: None,
            api_key_file: None,
            max_tokens: 4096,
            timeout_secs: 120,
            max_retries: 4,
            retry_base_ms: 1_000,
            retry_max_ms: 60_000,
            deadline_secs: 600,
            price: None,
            tier_models: TierModels::default(),
            auth: InferenceAuth::ApiKey,
            l402_max_sats: 1_000,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    pub input_msat_per_1k_tokens: u64,
    pub output_msat_per_1k_tokens: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ComputeConfig {
    /// `local`: act on this machine.
    pub provider: String,
    /// Working directory of the compute provider; defaults to the home's `workspace/`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workdir: Option<PathBuf>,
    pub exec_timeout_secs: u64,
    pub output_cap_bytes: usize,
    /// `provider: ssh`: the machine to act on.
    #[serde(skip_serializing_if = "SshConfig::is_default")]
    pub ssh: SshConfig,
    /// `provider: conway`: a Conway Cloud sandbox.
    #[serde(skip_serializing_if = "ConwayConfig::is_default")]
    pub conway: ConwayConfig,
    /// LNVPS: VPSes the agent rents and pays for over Lightning (`automaton vps`, `exec --vps`).
    #[serde(skip_serializing_if = "LnvpsConfig::is_default")]
    pub lnvps: LnvpsConfig,
}

/// LNVPS (`compute.lnvps`): where its API is, and when rented VMs are renewed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LnvpsConfig {
    pub api_url: String,
    /// Renew a VM this long before it expires (the heartbeat's `renew_vps` task).
    pub renew_lead_secs: u64,
    /// Renew automatically while the survival tier allows it (not in critical or dead).
    pub auto_renew: bool,
}

impl Default for LnvpsConfig {
    fn default() -> Self {
        LnvpsConfig {
            api_url: "https://api.lnvps.net".to_string(),
            renew_lead_secs: 86_400,
            auto_renew: true,
        }
    }
}

impl LnvpsConfig {
    pub fn is_default(&self) -> bool {
        self == &LnvpsConfig::default()
    }
}

impl Default for ComputeConfig {
    fn default() -> Self {
        ComputeConfig {
            provider: "local".to_string(),
            workdir: None,
            exec_timeout_secs: 60,
            output_cap_bytes: 16384,
            ssh: SshConfig::default(),
            conway: ConwayConfig::default(),
            lnvps: LnvpsConfig::default(),
        }
    }
}

/// A machine reached over SSH (`compute.provider: ssh`). Its host key must be in the home's `ssh/known_hosts`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SshConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    pub port: u16,
    pub user: String,
    /// Private key; relative paths are relative to the home.
    pub key_path: PathBuf,
    /// Remote working directory (absolute); unset = the remote user's home directory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workdir: Option<PathBuf>,
}

impl SshConfig {
    /// The private key's path, a relative one taken from the agent's home.
    pub fn key_path_in(&self, home: &Home) -> PathBuf {
        if self.key_path.is_relative() {
            home.root().join(&self.key_path)
        } else {
            self.key_path.clone()
        }
    }
}

impl Default for SshConfig {
    fn default() -> Self {
        SshConfig {
            host: None,
            port: 22,
            user: "root".to_string(),
            key_path: PathBuf::from("ssh/id_ed25519"),
            workdir: None,
        }
    }
}

impl SshConfig {
    pub fn is_default(&self) -> bool {
        self == &SshConfig::default()
    }
}

/// A Conway Cloud sandbox (`compute.provider: conway`), paid from credits the operator bought.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConwayConfig {
    pub api_url: String,
    /// Environment variable holding the API key (sent raw in `Authorization`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_key_env: Option<String>,
    /// Or a 0600 file holding it; relative paths are relative to the home.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_key_file: Option<PathBuf>,
    /// The sandbox to use; unset = the first running sandbox of the account.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sandbox_id: Option<String>,
    /// Working directory inside the sandbox; unset = its home directory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workdir: Option<PathBuf>,
}

impl Default for ConwayConfig {
    fn default() -> Self {
        ConwayConfig {
            api_url: "https://api.conway.tech".to_string(),
            api_key_env: None,
            api_key_file: None,
            sandbox_id: None,
            workdir: None,
        }
    }
}

impl ConwayConfig {
    pub fn is_default(&self) -> bool {
        self == &ConwayConfig::default()
    }
}

/// Turn-loop limits and the loop guards that keep the agent from spinning.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    pub max_tool_calls_per_turn: u32,
    pub max_turns_per_cycle: u32,
    /// Same tool pattern this many turns running → forced sleep.
    pub repeat_limit: u32,
    /// Maintenance-only turns in a row → forced sleep.
    pub maintenance_limit: u32,
    /// Failed turns in a row → sleep with backoff.
    pub error_limit: u32,
    pub context_token_budget: u32,
    pub recent_turns: u32,
    pub tool_result_cap_bytes: usize,
    pub default_sleep_secs: u64,
    pub max_sleep_secs: u64,
    pub backoff_base_secs: u64,
    pub backoff_max_secs: u64,
    /// Shortest time between two `update_genesis_prompt` calls (the agent rewriting its own purpose).
    pub genesis_update_interval_secs: u64,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            max_tool_calls_per_turn: 10,
            max_turns_per_cycle: 25,
            repeat_limit: 3,
            maintenance_limit: 3,
            error_limit: 5,
            context_token_budget: 100_000,
            recent_turns: 20,
            tool_result_cap_bytes: 10_000,
            default_sleep_secs: 60,
            max_sleep_secs: 86_400,
            backoff_base_secs: 60,
            backoff_max_secs: 3_600,
            genesis_update_interval_secs: 86_400,
        }
    }
}

/// Spending caps in sats, enforced by the money gate (`src/money/`), and the survival-tier thresholds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    pub per_payment_sats: u64,
    pub hourly_sats: u64,
    pub daily_sats: u64,
    /// Balance floor the agent never spends below.
    pub reserve_sats: u64,
    /// Rolling 24 h cap per counterparty (node id, or domain for L402/LNURL); unset = only the daily cap.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_counterparty_sats: Option<u64>,
    /// Rolling 24 h caps for particular counterparties or domains (a domain covers its subdomains).
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub counterparty_sats: std::collections::BTreeMap<String, u64>,
    /// Counterparties or domains that may be paid even in `default_deny` mode.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
    /// Counterparties or domains that are never paid.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<String>,
    /// Only counterparties in `allow` can be paid.
    pub default_deny: bool,
    /// Payments above this wait for the creator (`automaton approvals`); unset = never.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approval_above_sats: Option<u64>,
    /// Rolling 24 h cap on inference spend (priced calls and paid inference); `null` = no cap.
    pub inference_daily_sats: Option<u64>,
    /// Survival-tier thresholds.
    pub tiers: TierThresholds,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            per_payment_sats: 10_000,
            hourly_sats: 25_000,
            daily_sats: 100_000,
            reserve_sats: 1_000,
            per_counterparty_sats: None,
            counterparty_sats: Default::default(),
            allow: Vec::new(),
            deny: Vec::new(),
            default_deny: false,
            approval_above_sats: None,
            inference_daily_sats: Some(50_000),
            tiers: TierThresholds::default(),
        }
    }
}

/// Balance thresholds of the survival tiers (sats): `high` ≥ high_sats, `normal` ≥ normal_sats, `low_compute` ≥
/// low_compute_sats, `critical` above 0, `dead` after `dead_grace_secs` at 0.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TierThresholds {
    pub high_sats: u64,
    pub normal_sats: u64,
    pub low_compute_sats: u64,
    pub dead_grace_secs: u64,
}

impl Default for TierThresholds {
    fn default() -> Self {
        TierThresholds {
            high_sats: 1_000_000,
            normal_sats: 20_000,
            low_compute_sats: 5_000,
            dead_grace_secs: 3_600,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WalletConfig {
    /// `bitcoin`, `testnet`, `signet` or `regtest`.
    pub network: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub esplora_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lsp: Option<LspConfig>,
    /// `HOST:PORT` the node accepts Lightning peers on; unset = outbound only (it reaches the LSP itself).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    /// Most the LSP may take for opening a JIT channel, per million of the amount received…
    pub lsp_max_fee_ppm: u64,
    /// …but never less than this (an LSP's minimum opening fee).
    pub lsp_max_fee_min_sats: u64,
    /// Default routing-fee limit of a payment, per million of its amount…
    pub max_fee_ppm: u64,
    /// …but never less than this.
    pub max_fee_min_sats: u64,
    /// Fee reserved (and allowed) for an on-chain send.
    pub onchain_max_fee_sats: u64,
    pub invoice_expiry_secs: u32,
    /// How long `wallet pay` waits for a payment to end before reporting it still in flight.
    pub payment_timeout_secs: u64,
}

impl Default for WalletConfig {
    fn default() -> Self {
        WalletConfig {
            network: "bitcoin".to_string(),
            esplora_url: None,
            lsp: None,
            listen: None,
            lsp_max_fee_ppm: 20_000,
            lsp_max_fee_min_sats: 2_000,
            max_fee_ppm: 10_000,
            max_fee_min_sats: 10,
            onchain_max_fee_sats: 5_000,
            invoice_expiry_secs: 3_600,
            payment_timeout_secs: 90,
        }
    }
}

/// The Lightning service provider the wallet opens its channel through. `Debug` hides the token.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LspConfig {
    pub node_id: String,
    pub address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

impl fmt::Debug for LspConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LspConfig")
            .field("node_id", &self.node_id)
            .field("address", &self.address)
            .field("token", &self.token.as_ref().map(|_| "[redacted]"))
            .finish()
    }
}

/// The agent's HTTP face.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub public_url: Option<String>,
    /// The Lightning address / LNURL-pay service (`name@host` of `public_url`).
    #[serde(skip_serializing_if = "LnurlPayConfig::is_default")]
    pub lnurl: LnurlPayConfig,
    /// Paid services behind the L402 paywall (`crate::l402::server`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<services::ServiceConfig>,
}

/// The agent's LNURL-pay service (LUD-06/12/16/21): who pays it what, and how the invoices look.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LnurlPayConfig {
    /// The user part of the Lightning address; default: the agent's name, lower-cased, `a-z0-9-_.` only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The `text/plain` description payers' wallets show; default: "Fund <name>, an autonomous agent".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Smallest payment accepted (`minSendable`), in sats.
    pub min_sats: u64,
    /// Largest payment accepted (`maxSendable`), in sats.
    pub max_sats: u64,
    /// Longest payer's comment accepted (LUD-12 `commentAllowed`); 0 = none.
    pub comment_chars: u32,
    pub invoice_expiry_secs: u32,
}

impl Default for LnurlPayConfig {
    fn default() -> Self {
        LnurlPayConfig {
            name: None,
            description: None,
            min_sats: 1,
            max_sats: 1_000_000,
            comment_chars: 140,
            invoice_expiry_secs: 600,
        }
    }
}

impl LnurlPayConfig {
    pub fn is_default(&self) -> bool {
        self == &LnurlPayConfig::default()
    }
}

/// The agent's Nostr presence: relays, card and distress settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NostrConfig {
    /// Relay URLs (`wss://…`, or `ws://` for loopback); empty = no Nostr presence.
    pub relays: Vec<String>,
    /// The card's `about` line; a default sentence when unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub about: Option<String>,
    /// The parent agent's npub, for a child.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// Republish the card at least this often (it is also republished whenever it changes).
    pub card_interval_secs: u64,
    /// At most one distress note per tier in this window.
    pub distress_interval_secs: u64,
    /// The smallest amount a distress note asks for (a day of runway is at least this).
    pub distress_min_sats: u64,
    /// Also send the distress note as a private message (NIP-17) to `creator.npub`.
    pub distress_dm: bool,
}

impl Default for NostrConfig {
    fn default() -> Self {
        NostrConfig {
            relays: Vec::new(),
            about: None,
            parent: None,
            card_interval_secs: 6 * 3600,
            distress_interval_secs: 24 * 3600,
            distress_min_sats: 5_000,
            distress_dm: true,
        }
    }
}

/// Replication (`replication`): how many children, when a silent child counts as unhealthy or dead, and for a
/// child, the VM its parent rented for it, which it keeps paying for itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReplicationConfig {
    /// Most children alive (or being spawned) at once.
    pub max_children: u32,
    /// A child not seen for this long is `unhealthy`.
    pub unhealthy_after_secs: u64,
    /// A child not seen for this long is `dead` (its VM is no longer renewed).
    pub dead_after_secs: u64,
    /// The smallest funding a child may be spawned with.
    pub min_fund_sats: u64,
    /// For a child on a rented VM: the VM, topped up through its LNURL-pay endpoint by the `topup_vm` task.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub own_vm: Option<OwnVmConfig>,
}

impl Default for ReplicationConfig {
    fn default() -> Self {
        ReplicationConfig {
            max_children: 3,
            unhealthy_after_secs: 600,
            dead_after_secs: 3600,
            min_fund_sats: 10_000,
            own_vm: None,
        }
    }
}

impl ReplicationConfig {
    pub fn is_default(&self) -> bool {
        self == &ReplicationConfig::default()
    }
}

/// The VM a child lives on (`replication.own_vm`), written by its parent at spawn.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OwnVmConfig {
    /// The VM's id at LNVPS.
    pub id: u64,
    /// Its LNURL-pay top-up endpoint (`{api}/.well-known/lnurlp/{id}`): no account needed.
    pub lnurlp: String,
    /// Paid until (RFC 3339) when the parent handed it over; the child keeps the later dates in its DB.
    pub paid_until: String,
    /// What one top-up pays, and how long that buys.
    pub topup_sats: u64,
    pub topup_secs: u64,
    /// Top up when the VM expires within this long.
    pub lead_secs: u64,
}

/// Why the configuration could not be loaded, written, or a secret read.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("no agent configured at {}: run `automaton setup` first", path.display())]
    NotFound { path: PathBuf },
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid YAML or does not fit the schema (unknown key, wrong type).
    #[error("{}", describe_parse(path, *line, *column, key.as_deref(), message))]
    Parse {
        path: PathBuf,
        line: Option<usize>,
        column: Option<usize>,
        key: Option<String>,
        message: String,
    },
    /// An env var or flag override names an unknown key or carries a value of the wrong type.
    #[error("{origin}: {message}")]
    Override {
        origin: String,
        key: String,
        message: String,
    },
    #[error("{origin}: invalid `{key}`: {reason}")]
    Invalid {
        origin: String,
        key: String,
        reason: String,
    },
    #[error("environment variable {var} (named by inference.api_key_env) is not set")]
    MissingKeyEnv { var: String },
    #[error("cannot read API key file {}: {source}", path.display())]
    KeyFileRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "API key file {} has mode {mode:03o}; it must not be readable by group or others (chmod 600 {})",
        path.display(),
        path.display()
    )]
    KeyFileInsecure { path: PathBuf, mode: u32 },
    #[error("API key file {} is empty", path.display())]
    KeyFileEmpty { path: PathBuf },
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot serialise the config: {0}")]
    Serialize(String),
}

fn describe_parse(
    path: &Path,
    line: Option<usize>,
    column: Option<usize>,
    key: Option<&str>,
    message: &str,
) -> String {
    let mut out = path.display().to_string();
    if let Some(line) = line {
        out.push_str(&format!(":{line}"));
        if let Some(column) = column {
            out.push_str(&format!(":{column}"));
        }
    }
    match key {
        Some(key) if message.starts_with("unknown field") => {
            let expected = message
                .split_once(", ")
                .map(|(_, rest)| format!(" ({rest})"))
                .unwrap_or_default();
            out.push_str(&format!(": unknown key `{key}`{expected}"))
        }
        Some(key) => out.push_str(&format!(": key `{key}`: {message}")),
        None => out.push_str(&format!(": {message}")),
    }
    out
}

/// One `key=value` override from the command line (`-c inference.model=gpt-4o`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Override {
    pub key: String,
    pub value: String,
}

impl FromStr for Override {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (key, value) = s.split_once('=').ok_or_else(|| {
            format!("expected KEY=VALUE (like inference.model=gpt-4o), got `{s}`")
        })?;
        let key = key.trim();
        if key.is_empty() {
            return Err(format!("empty key in `{s}`"));
        }
        Ok(Override {
            key: key.to_string(),
            value: value.to_string(),
        })
    }
}

impl Config {
    /// Defaults → `automaton.yaml` → `AUTOMATON__…` environment. Flags are applied by the CLI on top.
    pub fn load(home: &Home) -> Result<Config, ConfigError> {
        Config::load_with(home, &env_overrides(), &[])
    }

    /// All layers, with the environment and flag overrides given explicitly (tests, the CLI).
    pub fn load_with(
        home: &Home,
        env: &[(String, String)],
        flags: &[Override],
    ) -> Result<Config, ConfigError> {
        let path = home.config_path();
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                return Err(ConfigError::NotFound { path })
            }
            Err(source) => return Err(ConfigError::Read { path, source }),
        };
        let mut config = Config::from_yaml(&text, &path)?;
        for (var, value) in env {
            let key = env_var_key(var);
            config = config.with_override(&key, value, &format!("environment variable {var}"))?;
        }
        for flag in flags {
            config = config.with_override(
                &flag.key,
                &flag.value,
                &format!("flag -c {}={}", flag.key, flag.value),
            )?;
        }
        config.resolve_paths(home);
        config.validate(&path.display().to_string())?;
        Ok(config)
    }

    /// Defaults with one YAML document on top; `origin` names the file in errors.
    pub fn from_yaml(text: &str, origin: &Path) -> Result<Config, ConfigError> {
        let layer = Config::yaml_layer(text, origin)?;
        Config::default().merged(layer, &origin.display().to_string())
    }

    /// Checks a YAML fragment against the schema and returns it as a value holding only the keys it sets,
    /// so it can be merged over another layer (`setup --config-from`).
    pub fn yaml_layer(text: &str, origin: &Path) -> Result<Value, ConfigError> {
        let parse_error = |err: yaml::YamlError| ConfigError::Parse {
            path: origin.to_path_buf(),
            line: err.line,
            column: err.column,
            key: err.key,
            message: err.message,
        };
        // The typed parse runs on the text itself so its errors carry line numbers.
        let _typed: Config = yaml::from_str(text).map_err(parse_error)?;
        let value = yaml::to_json_value(text).map_err(parse_error)?;
        if !value.is_object() {
            return Err(ConfigError::Parse {
                path: origin.to_path_buf(),
                line: Some(1),
                column: None,
                key: None,
                message: "expected a mapping of config sections".to_string(),
            });
        }
        Ok(value)
    }

    /// This config with `overlay`'s keys laid over it (objects merge key by key, everything else replaces).
    pub fn merged(&self, overlay: Value, origin: &str) -> Result<Config, ConfigError> {
        let mut base = to_json(self)?;
        merge_json(&mut base, overlay);
        from_json(base).map_err(|(key, message)| ConfigError::Override {
            origin: origin.to_string(),
            key,
            message,
        })
    }

    /// This config with one dotted `key` set from a raw string, typed as YAML would type it.
    pub fn with_override(&self, key: &str, raw: &str, origin: &str) -> Result<Config, ConfigError> {
        let path: Vec<&str> = key.split('.').filter(|s| !s.is_empty()).collect();
        if path.is_empty() {
            return Err(ConfigError::Override {
                origin: origin.to_string(),
                key: key.to_string(),
                message: "empty key".to_string(),
            });
        }
        let base = to_json(self)?;
        let mut first_error = None;
        // `5` should become a number for `max_tokens` but stay a string for `model: "5"`; try both readings.
        for candidate in [yaml::scalar_to_json(raw), Value::String(raw.to_string())] {
            let mut value = base.clone();
            if let Err(message) = set_path(&mut value, &path, candidate) {
                return Err(ConfigError::Override {
                    origin: origin.to_string(),
                    key: key.to_string(),
                    message,
                });
            }
            match from_json::<Config>(value) {
                Ok(config) => return Ok(config),
                Err(err) => {
                    first_error.get_or_insert(err);
                }
            }
        }
        let (err_key, message) = first_error.unwrap_or_default();
        let message = if message.starts_with("unknown field") {
            let expected = message
                .split_once(", ")
                .map(|(_, rest)| format!(" ({rest})"))
                .unwrap_or_default();
            format!("unknown key `{err_key}`{expected}")
        } else {
            format!("key `{err_key}`: {message}")
        };
        Err(ConfigError::Override {
            origin: origin.to_string(),
            key: key.to_string(),
            message,
        })
    }

    /// Relative paths in the config are relative to the home, not to wherever the binary was started.
    pub fn resolve_paths(&mut self, home: &Home) {
        if let Some(p) = &self.inference.api_key_file {
            if p.is_relative() {
                self.inference.api_key_file = Some(home.root().join(p));
            }
        }
        if let Some(p) = &self.compute.workdir {
            if p.is_relative() {
                self.compute.workdir = Some(home.root().join(p));
            }
        }
        if self.compute.ssh.key_path.is_relative() {
            self.compute.ssh.key_path = home.root().join(&self.compute.ssh.key_path);
        }
        if let Some(p) = &self.compute.conway.api_key_file {
            if p.is_relative() {
                self.compute.conway.api_key_file = Some(home.root().join(p));
            }
        }
    }

    /// Checks values the types cannot: required fields, URLs, names. `origin` names the file in errors.
    pub fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        match self.problems().into_iter().next() {
            None => Ok(()),
            Some((key, reason)) => Err(ConfigError::Invalid {
                origin: origin.to_string(),
                key: key.to_string(),
                reason,
            }),
        }
    }

    /// Every invalid value as (dotted key, reason), in file order.
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut problems: Vec<(&'static str, String)> = Vec::new();
        let mut check = |key: &'static str, result: Result<(), String>| {
            if let Err(reason) = result {
                problems.push((key, reason));
            }
        };
        let at_least_one = |v: u64| {
            if v == 0 {
                Err("must be at least 1".to_string())
            } else {
                Ok(())
            }
        };
        let not_empty = |s: &str| {
            if s.trim().is_empty() {
                Err("must not be empty".to_string())
            } else {
                Ok(())
            }
        };
        let not_above = |v: u64, max: u64, max_key: &str| {
            if v > max {
                Err(format!("is larger than {max_key} ({max})"))
            } else {
                Ok(())
            }
        };
        check("name", validate_name(&self.name));
        check(
            "inference.base_url",
            validate_http_url(&self.inference.base_url),
        );
        check("inference.model", not_empty(&self.inference.model));
        if let Some(var) = &self.inference.api_key_env {
            check("inference.api_key_env", validate_env_var_name(var));
        }
        check(
            "inference.max_tokens",
            at_least_one(self.inference.max_tokens.into()),
        );
        check(
            "inference.timeout_secs",
            at_least_one(self.inference.timeout_secs),
        );
        check("compute.provider", not_empty(&self.compute.provider));
        check(
            "compute.exec_timeout_secs",
            at_least_one(self.compute.exec_timeout_secs),
        );
        let known = crate::compute::backends();
        if !known.iter().any(|b| b.kind == self.compute.provider) {
            let names: Vec<&str> = known.iter().map(|b| b.kind).collect();
            check(
                "compute.provider",
                Err(format!("unknown provider (known: {})", names.join(", "))),
            );
        }
        if self.compute.provider == "ssh" {
            check(
                "compute.ssh.host",
                not_empty(self.compute.ssh.host.as_deref().unwrap_or_default()),
            );
            check("compute.ssh.user", not_empty(&self.compute.ssh.user));
            check(
                "compute.ssh.port",
                at_least_one(self.compute.ssh.port.into()),
            );
        }
        if let Some(w) = &self.compute.ssh.workdir {
            if w.is_relative() {
                check(
                    "compute.ssh.workdir",
                    Err("must be an absolute path on the remote machine".to_string()),
                );
            }
        }
        if self.compute.provider == "conway" {
            check(
                "compute.conway.api_url",
                validate_http_url(&self.compute.conway.api_url),
            );
        }
        check(
            "compute.lnvps.api_url",
            validate_http_url(&self.compute.lnvps.api_url),
        );
        if let Some(var) = &self.compute.conway.api_key_env {
            check("compute.conway.api_key_env", validate_env_var_name(var));
        }
        let a = &self.agent;
        check(
            "agent.max_tool_calls_per_turn",
            at_least_one(a.max_tool_calls_per_turn.into()),
        );
        check(
            "agent.max_turns_per_cycle",
            at_least_one(a.max_turns_per_cycle.into()),
        );
        check("agent.repeat_limit", at_least_one(a.repeat_limit.into()));
        check(
            "agent.maintenance_limit",
            at_least_one(a.maintenance_limit.into()),
        );
        check("agent.error_limit", at_least_one(a.error_limit.into()));
        check("agent.recent_turns", at_least_one(a.recent_turns.into()));
        check(
            "agent.default_sleep_secs",
            not_above(
                a.default_sleep_secs,
                a.max_sleep_secs,
                "agent.max_sleep_secs",
            ),
        );
        check(
            "agent.backoff_base_secs",
            not_above(
                a.backoff_base_secs,
                a.backoff_max_secs,
                "agent.backoff_max_secs",
            ),
        );
        let l = &self.limits;
        check(
            "limits.per_payment_sats",
            not_above(l.per_payment_sats, l.daily_sats, "limits.daily_sats"),
        );
        check(
            "limits.hourly_sats",
            not_above(l.hourly_sats, l.daily_sats, "limits.daily_sats"),
        );
        if let Some(v) = l.approval_above_sats {
            check("limits.approval_above_sats", at_least_one(v));
        }
        let listed = |names: &[String]| match names.iter().find(|n| n.trim().is_empty()) {
            Some(_) => Err("entries must not be empty".to_string()),
            None => Ok(()),
        };
        check("limits.allow", listed(&l.allow));
        check("limits.deny", listed(&l.deny));
        check(
            "limits.counterparty_sats",
            listed(&l.counterparty_sats.keys().cloned().collect::<Vec<_>>()),
        );
        let t = &l.tiers;
        check(
            "limits.tiers.low_compute_sats",
            at_least_one(t.low_compute_sats),
        );
        check(
            "limits.tiers.low_compute_sats",
            not_above(
                t.low_compute_sats,
                t.normal_sats,
                "limits.tiers.normal_sats",
            ),
        );
        check(
            "limits.tiers.normal_sats",
            not_above(t.normal_sats, t.high_sats, "limits.tiers.high_sats"),
        );
        let network = self.wallet.network.as_str();
        check(
            "wallet.network",
            if ["bitcoin", "testnet", "signet", "regtest"].contains(&network) {
                Ok(())
            } else {
                Err(format!(
                    "`{network}` is not one of bitcoin, testnet, signet, regtest"
                ))
            },
        );
        if let Some(url) = &self.wallet.esplora_url {
            check("wallet.esplora_url", validate_http_url(url));
        }
        if let Some(lsp) = &self.wallet.lsp {
            check("wallet.lsp.node_id", validate_node_id(&lsp.node_id));
            check("wallet.lsp.address", not_empty(&lsp.address));
        }
        if network == "regtest" && self.wallet.esplora_url.is_none() {
            check(
                "wallet.esplora_url",
                Err(
                    "regtest has no public chain source: set wallet.esplora_url (setup --lab does)"
                        .to_string(),
                ),
            );
        }
        if let Some(listen) = &self.wallet.listen {
            check("wallet.listen", not_empty(listen));
        }
        check(
            "wallet.invoice_expiry_secs",
            at_least_one(self.wallet.invoice_expiry_secs.into()),
        );
        check(
            "wallet.payment_timeout_secs",
            at_least_one(self.wallet.payment_timeout_secs),
        );
        if let Some(npub) = &self.creator.npub {
            check("creator.npub", validate_npub(npub));
        }
        if let Some(node_id) = &self.creator.node_id {
            check("creator.node_id", validate_node_id(node_id));
        }
        if let Some(url) = &self.http.public_url {
            check("http.public_url", validate_http_url(url));
        }
        if let Some(name) = &self.http.lnurl.name {
            check(
                "http.lnurl.name",
                if !name.is_empty()
                    && name
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c))
                {
                    Ok(())
                } else {
                    Err(format!(
                        "`{name}` may hold only a-z, 0-9, `-`, `_` and `.` (LUD-16)"
                    ))
                },
            );
        }
        check(
            "http.lnurl.min_sats",
            if self.http.lnurl.min_sats >= 1 && self.http.lnurl.min_sats <= self.http.lnurl.max_sats
            {
                Ok(())
            } else {
                Err("must be at least 1 and at most http.lnurl.max_sats".to_string())
            },
        );
        if let Some(listen) = &self.http.listen {
            check(
                "http.listen",
                listen
                    .parse::<std::net::SocketAddr>()
                    .map(|_| ())
                    .map_err(|_| format!("`{listen}` is not HOST:PORT")),
            );
        }
        for problem in services::problems(&self.http.services) {
            check("http.services", Err(problem));
        }
        for relay in &self.nostr.relays {
            check("nostr.relays", validate_relay_url(relay));
        }
        if let Some(parent) = &self.nostr.parent {
            check("nostr.parent", validate_npub(parent));
        }
        if self.nostr.card_interval_secs < 60 {
            check(
                "nostr.card_interval_secs",
                Err("must be at least 60".to_string()),
            );
        }
        problems
    }

    /// The config as it is written to `automaton.yaml`, with a header explaining the layers.
    pub fn to_yaml(&self) -> Result<String, ConfigError> {
        let body = yaml::to_string(self).map_err(|e| ConfigError::Serialize(e.message))?;
        Ok(format!(
            "# automaton.yaml: this agent's configuration (written by `automaton setup`).\n\
             # Unknown keys are an error. Any key can be overridden with an environment variable\n\
             # AUTOMATON__SECTION__KEY (e.g. AUTOMATON__INFERENCE__MODEL) or `automaton -c section.key=value`.\n\
             # Secrets never go in here: inference.api_key_env names the variable holding the API key.\n\
             {body}"
        ))
    }

    /// Writes `automaton.yaml` atomically (a crash leaves the old file or the new one, never half of either).
    pub fn write(&self, home: &Home) -> Result<(), ConfigError> {
        let text = self.to_yaml()?;
        write_atomic(&home.config_path(), text.as_bytes(), 0o600).map_err(|source| {
            ConfigError::Write {
                path: home.config_path(),
                source,
            }
        })
    }

    /// Reads the API key: the env var named by `api_key_env`, else `api_key_file` (which must be mode 0600).
    /// `Ok(None)` when the endpoint needs no key (a local model server).
    pub fn inference_api_key(&self) -> Result<Option<Secret>, ConfigError> {
        if let Some(var) = &self.inference.api_key_env {
            match std::env::var(var) {
                Ok(value) if !value.trim().is_empty() => {
                    return Ok(Some(Secret::new(value.trim())))
                }
                _ if self.inference.api_key_file.is_some() => {}
                _ => return Err(ConfigError::MissingKeyEnv { var: var.clone() }),
            }
        }
        if let Some(path) = &self.inference.api_key_file {
            return read_secret_file(path).map(Some);
        }
        Ok(None)
    }
}

/// Reads a secret from a file that only its owner can read.
pub fn read_secret_file(path: &Path) -> Result<Secret, ConfigError> {
    let meta = std::fs::metadata(path).map_err(|source| ConfigError::KeyFileRead {
        path: path.to_path_buf(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(ConfigError::KeyFileInsecure {
            path: path.to_path_buf(),
            mode,
        });
    }
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::KeyFileRead {
        path: path.to_path_buf(),
        source,
    })?;
    let key = text.trim();
    if key.is_empty() {
        return Err(ConfigError::KeyFileEmpty {
            path: path.to_path_buf(),
        });
    }
    Ok(Secret::new(key))
}

/// `AUTOMATON__SECTION__KEY` variables of this process, sorted so their order of application is stable.
pub fn env_overrides() -> Vec<(String, String)> {
    let mut vars: Vec<(String, String)> = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .filter(|(k, _)| k.starts_with(ENV_PREFIX) && k.len() > ENV_PREFIX.len())
        .collect();
    vars.sort();
    vars
}

/// `AUTOMATON__INFERENCE__API_KEY_ENV` → `inference.api_key_env`.
pub fn env_var_key(var: &str) -> String {
    var.strip_prefix(ENV_PREFIX)
        .unwrap_or(var)
        .split("__")
        .map(|s| s.to_ascii_lowercase())
        .collect::<Vec<_>>()
        .join(".")
}

/// Writes `path` via a temporary file in the same directory and a rename, with `mode` set before the rename.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    std::fs::create_dir_all(dir)?;
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".to_string());
    let tmp = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        file.write_all(contents)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

pub fn validate_name(name: &str) -> Result<(), String> {
    let trimmed = name.trim();
    if trimmed.is_empty() {
        return Err("the agent needs a name".to_string());
    }
    if trimmed != name {
        return Err("must not start or end with whitespace".to_string());
    }
    if name.chars().count() > 64 {
        return Err("must be at most 64 characters".to_string());
    }
    if name.chars().any(|c| c.is_control()) {
        return Err("must not contain control characters".to_string());
    }
    Ok(())
}

pub fn validate_http_url(url: &str) -> Result<(), String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("`{url}` is not a URL: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!("`{url}` must be an http:// or https:// URL"));
    }
    if parsed.host_str().is_none() {
        return Err(format!("`{url}` has no host"));
    }
    Ok(())
}

pub fn validate_env_var_name(var: &str) -> Result<(), String> {
    let ok = !var.is_empty()
        && !var.starts_with(|c: char| c.is_ascii_digit())
        && var.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{var}` is not an environment variable name (letters, digits and _; this is the variable's name, not the key)"
        ))
    }
}

/// A Nostr relay URL: `wss://`, or `ws://` (meant for loopback and private networks).
pub fn validate_relay_url(url: &str) -> Result<(), String> {
    let parsed =
        reqwest::Url::parse(url.trim()).map_err(|e| format!("`{url}` is not a URL: {e}"))?;
    if !matches!(parsed.scheme(), "ws" | "wss") || parsed.host_str().is_none() {
        return Err(format!("`{url}` must be a ws:// or wss:// relay URL"));
    }
    Ok(())
}

/// A Lightning node id: a 33-byte compressed secp256k1 public key in hex.
pub fn validate_node_id(id: &str) -> Result<(), String> {
    let ok = id.len() == 66
        && (id.starts_with("02") || id.starts_with("03"))
        && id.chars().all(|c| c.is_ascii_hexdigit());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{id}` is not a node id (66 hex characters starting with 02 or 03)"
        ))
    }
}

/// A Nostr public key in bech32 (`npub1` + 58 characters of the bech32 alphabet).
pub fn validate_npub(npub: &str) -> Result<(), String> {
    const BECH32: &str = "qpzry9x8gf2tvdw0s3jn54khce6mua7l";
    let ok = npub.len() == 63
        && npub.starts_with("npub1")
        && npub[5..].chars().all(|c| BECH32.contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{npub}` is not an npub (npub1 followed by 58 bech32 characters)"
        ))
    }
}

fn to_json<T: Serialize>(value: &T) -> Result<Value, ConfigError> {
    serde_json::to_value(value).map_err(|e| ConfigError::Serialize(e.to_string()))
}

/// Deserialises with the failing key path, so override errors can name it.
fn from_json<T: DeserializeOwned>(value: Value) -> Result<T, (String, String)> {
    serde_path_to_error::deserialize(value).map_err(|err| {
        let path = err.path().to_string();
        let message = err.into_inner().to_string();
        let unknown = message
            .strip_prefix("unknown field `")
            .and_then(|rest| rest.split('`').next())
            .map(str::to_string);
        let key = match (path.as_str(), unknown) {
            (".", Some(field)) => field,
            (parent, Some(field)) if !parent.ends_with(&field) => format!("{parent}.{field}"),
            (parent, _) => parent.to_string(),
        };
        (key, message)
    })
}

fn merge_json(base: &mut Value, overlay: Value) {
    match (base, overlay) {
        (Value::Object(base), Value::Object(overlay)) => {
            for (key, value) in overlay {
                match base.get_mut(&key) {
                    Some(existing) if existing.is_object() && value.is_object() => {
                        merge_json(existing, value)
                    }
                    _ => {
                        base.insert(key, value);
                    }
                }
            }
        }
        (base, overlay) => *base = overlay,
    }
}

fn set_path(root: &mut Value, path: &[&str], value: Value) -> Result<(), String> {
    let mut node = root;
    for (i, segment) in path.iter().enumerate() {
        if node.is_null() {
            *node = Value::Object(Default::default());
        }
        let Value::Object(map) = node else {
            return Err(format!(
                "`{}` is a value, not a section",
                path[..i].join(".")
            ));
        };
        if i + 1 == path.len() {
            map.insert(segment.to_string(), value);
            return Ok(());
        }
        node = map.entry(segment.to_string()).or_insert(Value::Null);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn home_with(yaml: &str) -> (tempfile::TempDir, Home) {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::at(dir.path());
        std::fs::write(home.config_path(), yaml).unwrap();
        (dir, home)
    }

    #[test]
    fn defaults_then_file_then_env_then_flags() {
        let (_d, home) =
            home_with("name: ada\ninference:\n  model: file-model\n  max_tokens: 100\n");
        let env = vec![(
            "AUTOMATON__INFERENCE__MAX_TOKENS".to_string(),
            "200".to_string(),
        )];
        let flags = vec!["agent.repeat_limit=7".parse::<Override>().unwrap()];
        let config = Config::load_with(&home, &env, &flags).unwrap();
        assert_eq!(config.name, "ada");
        assert_eq!(config.inference.model, "file-model");
        assert_eq!(config.inference.max_tokens, 200);
        assert_eq!(config.agent.repeat_limit, 7);
        assert_eq!(config.agent.error_limit, 5);
        assert_eq!(config.limits.daily_sats, 100_000);
    }

    #[test]
    fn env_string_that_looks_like_a_number_stays_a_string() {
        let (_d, home) = home_with("name: ada\n");
        let env = vec![("AUTOMATON__INFERENCE__MODEL".to_string(), "42".to_string())];
        let config = Config::load_with(&home, &env, &[]).unwrap();
        assert_eq!(config.inference.model, "42");
    }

    #[test]
    fn unknown_env_key_is_an_error_naming_the_variable() {
        let (_d, home) = home_with("name: ada\n");
        let env = vec![("AUTOMATON__INFERENCE__MODLE".to_string(), "x".to_string())];
        let err = Config::load_with(&home, &env, &[]).unwrap_err().to_string();
        assert!(err.contains("AUTOMATON__INFERENCE__MODLE"), "{err}");
        assert!(err.contains("inference.modle"), "{err}");
    }

    #[test]
    fn unknown_file_key_names_file_line_and_key() {
        let (_d, home) = home_with("name: ada\ninference:\n  model: m\n  modle: x\n");
        let err = Config::load_with(&home, &[], &[]).unwrap_err();
        match &err {
            ConfigError::Parse { line, key, .. } => {
                assert_eq!(*line, Some(4));
                assert_eq!(key.as_deref(), Some("inference.modle"));
            }
            other => panic!("unexpected {other:?}"),
        }
        let text = err.to_string();
        assert!(text.contains("automaton.yaml:4"), "{text}");
        assert!(text.contains("inference.modle"), "{text}");
    }

    #[test]
    fn missing_name_is_invalid() {
        let (_d, home) = home_with("inference:\n  model: m\n");
        let err = Config::load_with(&home, &[], &[]).unwrap_err().to_string();
        assert!(err.contains("`name`"), "{err}");
    }

    #[test]
    fn yaml_roundtrip() {
        let mut config = Config {
            name: "ada".into(),
            ..Config::default()
        };
        config.wallet.lsp = Some(LspConfig {
            node_id: format!("02{}", "a".repeat(64)),
            address: "127.0.0.1:9735".into(),
            token: None,
        });
        config.inference.price = Some(Price {
            input_msat_per_1k_tokens: 1,
            output_msat_per_1k_tokens: 2,
        });
        let text = config.to_yaml().unwrap();
        let back = Config::from_yaml(&text, Path::new("x.yaml")).unwrap();
        assert_eq!(back, config);
    }

    #[test]
    fn merge_keeps_unset_keys() {
        let base = Config {
            name: "ada".into(),
            ..Config::default()
        };
        let layer =
            Config::yaml_layer("inference:\n  model: other\n", Path::new("f.yaml")).unwrap();
        let merged = base.merged(layer, "f.yaml").unwrap();
        assert_eq!(merged.name, "ada");
        assert_eq!(merged.inference.model, "other");
        assert_eq!(
            merged.inference.base_url,
            InferenceConfig::default().base_url
        );
    }

    #[test]
    fn key_file_must_be_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, "sk-test\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let mut config = Config::default();
        config.inference.api_key_file = Some(path.clone());
        let err = config.inference_api_key().unwrap_err();
        assert!(
            matches!(err, ConfigError::KeyFileInsecure { mode: 0o640, .. }),
            "{err:?}"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let key = config.inference_api_key().unwrap().unwrap();
        assert_eq!(key.expose(), "sk-test");
    }

    #[test]
    fn lsp_token_is_not_in_debug_output() {
        let mut config = Config::default();
        config.wallet.lsp = Some(LspConfig {
            node_id: format!("02{}", "a".repeat(64)),
            address: "127.0.0.1:9735".into(),
            token: Some("lsp-secret-token".into()),
        });
        let debug = format!("{config:?}");
        assert!(!debug.contains("lsp-secret-token"), "{debug}");
        assert!(debug.contains("[redacted]"));
    }

    #[test]
    fn validators() {
        assert!(validate_node_id(&format!("03{}", "b".repeat(64))).is_ok());
        assert!(validate_node_id("03abc").is_err());
        assert!(validate_npub(&format!("npub1{}", "q".repeat(58))).is_ok());
        assert!(validate_npub("npub1xyz").is_err());
        assert!(validate_env_var_name("OPENAI_API_KEY").is_ok());
        assert!(validate_env_var_name("sk-123").is_err());
        assert!(validate_http_url("ftp://x").is_err());
        assert!(validate_http_url("http://127.0.0.1:8080/v1").is_ok());
    }
}
