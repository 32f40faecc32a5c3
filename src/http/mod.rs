//! The agent's HTTP face, started by `automaton run` on `http.listen`: its Lightning address (LNURL-pay, in
//! `lnurlp`), `/.well-known/automaton.json` describing the agent, and the L402 seller's paid routes.
//!
//! What the face advertises (`Advertised`) is derived from `http.public_url` alone, so `automaton fund` prints the
//! same Lightning address and LNURL while the agent is stopped. LUD-01 wants https; plain http is accepted only
//! for loopback hosts on regtest (the lab) and for .onion, and otherwise no Lightning address is advertised.

pub mod lnurlp;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use reqwest::Url;
use serde::Serialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::home::Home;
use crate::money::tiers;
use crate::state::Db;
use crate::wallet::Wallet;

/// Why the HTTP face could not start.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("http.listen `{0}` is not HOST:PORT")]
    BadListen(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

/// How the agent is reached from outside, as far as its config says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Advertised {
    /// The base URL others use (no trailing slash).
    pub public_url: String,
    /// The Lightning address user part.
    pub name: String,
    /// `name@host[:port]`, when LNURL may be served on this URL (https; http only for loopback on regtest).
    pub lightning_address: Option<String>,
    /// The bech32 LNURL of the LNURL-pay endpoint (same condition).
    pub lnurl: Option<String>,
    /// Why there is no Lightning address, when there is none.
    pub lnurl_unavailable: Option<String>,
}

impl Advertised {
    /// What `config` advertises. `bound` is the address the face actually listens on, used when neither
    /// `http.public_url` nor `http.listen` says (the face then took a free loopback port).
    pub fn from_config(config: &Config, bound: Option<SocketAddr>) -> Advertised {
        let public_url = config
            .http
            .public_url
            .clone()
            .or_else(|| {
                config
                    .http
                    .listen
                    .as_ref()
                    .map(|listen| format!("http://{listen}"))
            })
            .or_else(|| bound.map(|addr| format!("http://{addr}")))
            .unwrap_or_else(|| "http://127.0.0.1".to_string());
        let public_url = public_url.trim().trim_end_matches('/').to_string();
        let name = lightning_name(config);
        let network = config.wallet.network.as_str();
        let (lightning_address, lnurl, lnurl_unavailable) = match Url::parse(&public_url) {
            Ok(url) => {
                let host = url.host_str().unwrap_or_default().to_string();
                let usable = match url.scheme() {
                    "https" => !host.is_empty(),
                    "http" => crate::lnurl::insecure_allowed(&host, network),
                    _ => false,
                };
                if usable {
                    let authority = match url.port() {
                        Some(port) => format!("{host}:{port}"),
                        None => host,
                    };
                    let endpoint = format!("{public_url}/.well-known/lnurlp/{name}");
                    (
                        Some(format!("{name}@{authority}")),
                        Some(crate::lnurl::encode(&endpoint)),
                        None,
                    )
                } else {
                    (
                        None,
                        None,
                        Some(format!(
                            "http.public_url {public_url} is not https (plain http is accepted only for loopback \
                             hosts on regtest): set http.public_url to the https URL that reaches this agent"
                        )),
                    )
                }
            }
            Err(e) => (
                None,
                None,
                Some(format!("http.public_url {public_url} is not a URL: {e}")),
            ),
        };
        Advertised {
            public_url,
            name,
            lightning_address,
            lnurl,
            lnurl_unavailable,
        }
    }
}

/// The Lightning address user part: `http.lnurl.name`, else the agent's name reduced to LUD-16's alphabet.
pub fn lightning_name(config: &Config) -> String {
    if let Some(name) = &config.http.lnurl.name {
        return name.clone();
    }
    let mut name: String = config
        .name
        .trim()
        .to_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    name = name.trim_matches(['-', '.']).to_string();
    if name.is_empty() {
        "agent".to_string()
    } else {
        name
    }
}

/// What the routes can reach.
pub struct FaceState {
    pub home: Home,
    pub config: Arc<Config>,
    pub db: Db,
    /// `None` for a home set up before wallets existed: the face then serves only `automaton.json`.
    pub wallet: Option<Wallet>,
    pub advertised: Advertised,
    /// The LNURL-pay metadata string, built once so it is served byte-for-byte the same every time.
    pub metadata: String,
    /// When recent LNURL-pay invoices were issued (anyone can ask for one: this bounds how fast).
    pub recent_invoices: std::sync::Mutex<std::collections::VecDeque<std::time::Instant>>,
}

/// The face's routes: LNURL-pay and `automaton.json`, plus whatever `extra` adds (the L402 seller's routes).
pub fn router(state: Arc<FaceState>, extra: Option<Router>) -> Router {
    let face = Router::new()
        .route("/.well-known/automaton.json", get(automaton_json))
        .route("/.well-known/lnurlp/{name}", get(lnurlp::pay_request))
        .route("/lnurlp/cb/{name}", get(lnurlp::callback))
        .route("/lnurlp/verify/{hash}", get(lnurlp::verify))
        .with_state(state);
    match extra {
        Some(extra) => face.merge(extra),
        None => face,
    }
}

/// A running face: where it listens and the task serving it (ends after `cancel`).
pub struct Running {
    pub addr: SocketAddr,
    pub advertised: Advertised,
    pub task: tokio::task::JoinHandle<()>,
}

/// Binds `http.listen` (a free loopback port when unset) and serves the face until `cancel`.
pub async fn serve(
    home: &Home,
    config: Arc<Config>,
    db: Db,
    wallet: Option<Wallet>,
    extra: Option<Router>,
    cancel: CancellationToken,
) -> Result<Running, HttpError> {
    let listen = config
        .http
        .listen
        .clone()
        .unwrap_or_else(|| "127.0.0.1:0".to_string());
    let addr: SocketAddr = listen
        .parse()
        .map_err(|_| HttpError::BadListen(listen.clone()))?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| HttpError::Bind {
            addr: listen.clone(),
            source,
        })?;
    let bound = listener.local_addr().map_err(|source| HttpError::Bind {
        addr: listen.clone(),
        source,
    })?;
    let advertised = Advertised::from_config(&config, Some(bound));
    let metadata = lnurlp::metadata(&config, &advertised);
    let state = Arc::new(FaceState {
        home: home.clone(),
        config,
        db,
        wallet,
        advertised: advertised.clone(),
        metadata,
        recent_invoices: Default::default(),
    });
    let app = router(state, extra);
    tracing::info!(
        listen = %bound,
        public_url = %advertised.public_url,
        lightning_address = advertised.lightning_address.as_deref().unwrap_or("-"),
        "HTTP face listening"
    );
    if let Some(why) = &advertised.lnurl_unavailable {
        tracing::warn!(reason = %why, "no Lightning address is served");
    }
    let task = tokio::spawn(async move {
        let shutdown = async move { cancel.cancelled().await };
        if let Err(error) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::error!(%error, "the HTTP face stopped");
        }
    });
    Ok(Running {
        addr: bound,
        advertised,
        task,
    })
}

/// `GET /.well-known/automaton.json`: who this agent is and what it sells.
async fn automaton_json(State(state): State<Arc<FaceState>>) -> Response {
    let tier = tiers::load_tier(&state.db)
        .await
        .unwrap_or(tiers::SurvivalTier::Normal);
    let node_id = state.wallet.as_ref().map(|w| w.node_id().to_string());
    let npub = state.wallet.as_ref().map(|w| w.npub());
    let services = advertised_services(&state.config);
    let body = json!({
        "name": state.config.name,
        "node_id": node_id,
        "npub": npub,
        "lightning_address": state.advertised.lightning_address,
        "lnurl": state.advertised.lnurl,
        "url": state.advertised.public_url,
        "services": services,
        "status": tiers::card_status(tier),
        "tier": tier,
        "version": env!("CARGO_PKG_VERSION"),
    });
    (
        [(axum::http::header::CACHE_CONTROL, "no-cache")],
        Json(body),
    )
        .into_response()
}

/// The paid services listed in `automaton.json`: `{name, path, price_sats, description}` of each.
fn advertised_services(config: &Config) -> Vec<serde_json::Value> {
    crate::l402::server::advertised(&config.http.services)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(name: &str, public_url: Option<&str>, network: &str) -> Config {
        let mut c = Config {
            name: name.to_string(),
            ..Config::default()
        };
        c.http.public_url = public_url.map(str::to_string);
        c.wallet.network = network.to_string();
        c
    }

    #[test]
    fn names_follow_lud16() {
        assert_eq!(
            lightning_name(&config("Demo Agent!", None, "regtest")),
            "demo-agent"
        );
        assert_eq!(lightning_name(&config("  ", None, "regtest")), "agent");
        let mut c = config("x", None, "regtest");
        c.http.lnurl.name = Some("tips".into());
        assert_eq!(lightning_name(&c), "tips");
    }

    #[test]
    fn loopback_http_is_advertised_only_on_regtest() {
        let lab = Advertised::from_config(
            &config("alice", Some("http://127.0.0.1:4100/"), "regtest"),
            None,
        );
        assert_eq!(lab.public_url, "http://127.0.0.1:4100");
        assert_eq!(
            lab.lightning_address.as_deref(),
            Some("alice@127.0.0.1:4100")
        );
        let decoded = crate::lnurl::decode(lab.lnurl.as_deref().unwrap()).unwrap();
        assert_eq!(decoded, "http://127.0.0.1:4100/.well-known/lnurlp/alice");

        let main = Advertised::from_config(
            &config("alice", Some("http://127.0.0.1:4100"), "bitcoin"),
            None,
        );
        assert!(main.lightning_address.is_none() && main.lnurl.is_none());
        assert!(main.lnurl_unavailable.is_some());

        let public = Advertised::from_config(
            &config("alice", Some("https://agent.example.com"), "bitcoin"),
            None,
        );
        assert_eq!(
            public.lightning_address.as_deref(),
            Some("alice@agent.example.com")
        );
        let exposed = Advertised::from_config(
            &config("alice", Some("http://agent.example.com"), "regtest"),
            None,
        );
        assert!(exposed.lightning_address.is_none());
    }
}
