//! The agent card (NIP-89 kind 31990, `d` = `automaton-ln`): what goes into it, how it is signed, and how a
//! card found on a relay is checked and read (strict about the signature and identity, lenient about content).

use std::collections::BTreeSet;

use ::nostr::{Event, EventBuilder, Keys, Kind, PublicKey, Tag, Timestamp};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{NostrError, CARD_D_TAG, CARD_KIND, CARD_T_TAG, STATUS_NAMESPACE};

/// The card's version string.
pub const VERSION: &str = concat!("automaton-ln/", env!("CARGO_PKG_VERSION"));

/// Survival status in the card vocabulary (shared/CONVENTIONS.md): the tier itself is a separate field.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord,
)]
#[serde(rename_all = "snake_case")]
pub enum CardStatus {
    #[default]
    Alive,
    Low,
    Critical,
    Dead,
}

impl CardStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CardStatus::Alive => "alive",
            CardStatus::Low => "low",
            CardStatus::Critical => "critical",
            CardStatus::Dead => "dead",
        }
    }

    pub fn parse(s: &str) -> Option<CardStatus> {
        match s.trim().to_ascii_lowercase().as_str() {
            "alive" => Some(CardStatus::Alive),
            "low" => Some(CardStatus::Low),
            "critical" => Some(CardStatus::Critical),
            "dead" => Some(CardStatus::Dead),
            _ => None,
        }
    }

    /// The card status for a survival tier as stored in kv `money.tier` (`high`, `normal`, `low_compute`,
    /// `critical`, `dead`). An unknown or missing tier reads as alive, like an unknown balance.
    pub fn from_tier(tier: Option<&str>) -> CardStatus {
        match tier.map(|t| t.trim().to_ascii_lowercase()) {
            Some(t) if t == "low_compute" || t == "low" => CardStatus::Low,
            Some(t) if t == "critical" => CardStatus::Critical,
            Some(t) if t == "dead" => CardStatus::Dead,
            _ => CardStatus::Alive,
        }
    }

    /// Statuses that ask for help.
    pub fn is_distress(self) -> bool {
        matches!(self, CardStatus::Critical | CardStatus::Dead)
    }
}

impl std::fmt::Display for CardStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A paid service the agent offers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CardService {
    pub id: String,
    /// NIP-90 job kind, when the service is also a DVM job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// `l402` for services behind an L402 paywall.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price_msat: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// The card's content (a JSON object in the event's `content`). Secrets never go in here.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CardContent {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub about: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub picture: Option<String>,
    pub version: String,
    pub status: CardStatus,
    /// The survival tier behind `status` (`high`, `normal`, `low_compute`, `critical`, `dead`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ln_node_pubkey: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ln_node_addr: Option<String>,
    /// The Lightning node's signature over `automaton-ln:<nostr pubkey hex>` (zbase32), binding both keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_sig: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lud16: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lnurlp: Option<String>,
    /// Where the agent describes itself over HTTP (`/.well-known/automaton.json`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub web: Option<String>,
    #[serde(default)]
    pub services: Vec<CardService>,
    /// The parent agent's npub, for a child.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// How many children this agent has running (funded, alive or unhealthy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub children: Option<u32>,
    pub updated_at: u64,
}

impl CardContent {
    /// The same card for the purpose of "did anything change": everything but the timestamp.
    pub fn same_as(&self, other: &CardContent) -> bool {
        let mut a = self.clone();
        a.updated_at = other.updated_at;
        &a == other
    }
}

/// Signs a card. `created_at` is the content's `updated_at`, so republishing the same content at the same
/// second gives the same event.
pub fn card_event(keys: &Keys, content: &CardContent) -> Result<Event, NostrError> {
    let json = serde_json::to_string(content).map_err(|e| NostrError::Event(e.to_string()))?;
    let mut tags = vec![
        Tag::identifier(CARD_D_TAG),
        Tag::hashtag(CARD_T_TAG),
        raw_tag(&["L", STATUS_NAMESPACE]),
        raw_tag(&["l", content.status.as_str(), STATUS_NAMESPACE]),
        raw_tag(&["alt", &format!("Automaton-LN agent card: {}", content.name)]),
    ];
    let kinds: BTreeSet<u16> = content.services.iter().filter_map(|s| s.kind).collect();
    for kind in kinds {
        tags.push(raw_tag(&["k", &kind.to_string()]));
    }
    if let Some(parent) = content.parent.as_deref() {
        let parent = super::parse_public_key(parent)?;
        tags.push(Tag::public_key(parent));
    }
    if let Some(web) = content.web.as_deref() {
        tags.push(raw_tag(&["web", web]));
    }
    EventBuilder::new(Kind::Custom(CARD_KIND), json)
        .tags(tags)
        .custom_created_at(Timestamp::from(content.updated_at))
        .sign_with_keys(keys)
        .map_err(|e| NostrError::Event(e.to_string()))
}

fn raw_tag(parts: &[&str]) -> Tag {
    // Tag::parse only fails on an empty slice.
    Tag::parse(parts.iter().copied()).unwrap_or_else(|_| Tag::hashtag(CARD_T_TAG))
}

/// A card read from a relay, after its signature and identity checks.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AgentCard {
    pub pubkey: String,
    pub npub: String,
    pub event_id: String,
    pub created_at: u64,
    pub name: String,
    pub about: Option<String>,
    pub status: Option<CardStatus>,
    pub tier: Option<String>,
    pub version: Option<String>,
    pub ln_node_pubkey: Option<String>,
    pub ln_node_addr: Option<String>,
    pub node_sig: Option<String>,
    pub lud16: Option<String>,
    pub lnurlp: Option<String>,
    pub web: Option<String>,
    pub services: Vec<CardService>,
    pub parent: Option<String>,
    /// How many children it has running.
    pub children: Option<u32>,
    /// Job kinds from the `k` tags.
    pub kinds: Vec<u16>,
}

impl AgentCard {
    /// True when the card offers a service matching `query`: a service id, a word of its description, or a
    /// job kind.
    pub fn offers(&self, query: &str) -> bool {
        let q = query.trim().to_ascii_lowercase();
        if q.is_empty() {
            return true;
        }
        if let Ok(kind) = q.parse::<u16>() {
            if self.kinds.contains(&kind) || self.services.iter().any(|s| s.kind == Some(kind)) {
                return true;
            }
        }
        self.services.iter().any(|s| {
            s.id.to_ascii_lowercase().contains(&q)
                || s.description
                    .as_deref()
                    .is_some_and(|d| d.to_ascii_lowercase().contains(&q))
        })
    }

    /// A card older than `max_age_secs` at `now` (readers treat one older than twice the publish interval as
    /// stale).
    pub fn is_stale(&self, now: u64, max_age_secs: u64) -> bool {
        now.saturating_sub(self.created_at) > max_age_secs
    }
}

/// Why a card found on a relay was dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CardRejection {
    #[error("not a kind {CARD_KIND} event")]
    WrongKind,
    #[error("bad id or signature")]
    BadSignature,
    #[error("not an automaton-ln card (d tag)")]
    NotOurs,
    #[error("content is not a JSON object")]
    MalformedContent,
    #[error("card names no agent")]
    NoName,
}

/// Checks a card event and reads it. The id and signature must verify, the `d` tag must be ours and the
/// content a JSON object with a name; every other field is taken when it has the right type and skipped
/// otherwise, so one odd field never hides an agent.
pub fn parse_card(event: &Event) -> Result<AgentCard, CardRejection> {
    if event.kind != Kind::Custom(CARD_KIND) {
        return Err(CardRejection::WrongKind);
    }
    if event.verify().is_err() {
        return Err(CardRejection::BadSignature);
    }
    let d = first_value(event, "d");
    if d.as_deref() != Some(CARD_D_TAG) {
        return Err(CardRejection::NotOurs);
    }
    let content: Map<String, Value> = match serde_json::from_str(&event.content) {
        Ok(Value::Object(map)) => map,
        _ => return Err(CardRejection::MalformedContent),
    };
    let text = |key: &str| {
        content
            .get(key)
            .and_then(Value::as_str)
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    };
    let name = text("name").ok_or(CardRejection::NoName)?;
    let status = text("status")
        .and_then(|s| CardStatus::parse(&s))
        .or_else(|| label_status(event));
    let services = content
        .get("services")
        .and_then(Value::as_array)
        .map(|list| list.iter().filter_map(lenient_service).collect::<Vec<_>>())
        .unwrap_or_default();
    let kinds: BTreeSet<u16> = event
        .tags
        .iter()
        .filter(|t| t.as_slice().first().map(String::as_str) == Some("k"))
        .filter_map(|t| t.as_slice().get(1).and_then(|k| k.parse().ok()))
        .collect();
    Ok(AgentCard {
        pubkey: event.pubkey.to_hex(),
        npub: super::npub(&event.pubkey),
        event_id: event.id.to_hex(),
        created_at: event.created_at.as_secs(),
        name,
        about: text("about"),
        status,
        tier: text("tier"),
        version: text("version"),
        ln_node_pubkey: text("ln_node_pubkey").filter(|k| is_node_id(k)),
        ln_node_addr: text("ln_node_addr"),
        node_sig: text("node_sig"),
        lud16: text("lud16"),
        lnurlp: text("lnurlp"),
        web: text("web").or_else(|| first_value(event, "web")),
        services,
        parent: text("parent")
            .and_then(|p| PublicKey::parse(&p).ok())
            .or_else(|| event.tags.public_keys().next().copied())
            .map(|pk| super::npub(&pk)),
        children: content
            .get("children")
            .and_then(Value::as_u64)
            .map(|n| n.min(u32::MAX as u64) as u32),
        kinds: kinds.into_iter().collect(),
    })
}

fn first_value(event: &Event, name: &str) -> Option<String> {
    event
        .tags
        .iter()
        .find(|t| t.as_slice().first().map(String::as_str) == Some(name))
        .and_then(|t| t.as_slice().get(1).cloned())
}

fn label_status(event: &Event) -> Option<CardStatus> {
    event
        .tags
        .iter()
        .map(|t| t.as_slice())
        .find(|t| t.len() >= 3 && t[0] == "l" && t[2] == STATUS_NAMESPACE)
        .and_then(|t| CardStatus::parse(&t[1]))
}

fn lenient_service(value: &Value) -> Option<CardService> {
    let obj = value.as_object()?;
    let text = |key: &str| obj.get(key).and_then(Value::as_str).map(str::to_string);
    let id = text("id").or_else(|| text("name"))?;
    Some(CardService {
        id,
        kind: obj
            .get("kind")
            .and_then(Value::as_u64)
            .and_then(|k| u16::try_from(k).ok()),
        url: text("url"),
        auth: text("auth"),
        price_msat: obj.get("price_msat").and_then(Value::as_u64).or_else(|| {
            obj.get("price_sats")
                .and_then(Value::as_u64)
                .map(|s| s.saturating_mul(1000))
        }),
        unit: text("unit"),
        description: text("description"),
    })
}

fn is_node_id(s: &str) -> bool {
    s.len() == 66
        && (s.starts_with("02") || s.starts_with("03"))
        && s.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(status: CardStatus) -> CardContent {
        CardContent {
            name: "atm-7f3a".into(),
            about: Some("Summaries over L402".into()),
            version: VERSION.into(),
            status,
            tier: Some("normal".into()),
            ln_node_pubkey: Some(format!("02{}", "ab".repeat(32))),
            lud16: Some("atm-7f3a@127.0.0.1:8080".into()),
            lnurlp: Some("http://127.0.0.1:8080/.well-known/lnurlp/atm-7f3a".into()),
            services: vec![CardService {
                id: "summarize".into(),
                kind: Some(5050),
                url: Some("http://127.0.0.1:8080/v1/summarize".into()),
                auth: Some("l402".into()),
                price_msat: Some(21_000),
                unit: Some("request".into()),
                description: Some("Summarise a text".into()),
            }],
            updated_at: 1_767_225_600,
            ..Default::default()
        }
    }

    #[test]
    fn card_roundtrip_with_tags() {
        let keys = Keys::generate();
        let parent = Keys::generate();
        let mut content = sample(CardStatus::Low);
        content.parent = Some(super::super::npub(&parent.public_key()));
        let event = card_event(&keys, &content).unwrap();
        assert_eq!(event.kind, Kind::Custom(31990));
        let tags: Vec<Vec<String>> = event.tags.iter().map(|t| t.clone().to_vec()).collect();
        for expected in [
            vec!["d", "automaton-ln"],
            vec!["t", "automaton-ln"],
            vec!["L", "automaton-ln.status"],
            vec!["l", "low", "automaton-ln.status"],
            vec!["k", "5050"],
        ] {
            assert!(
                tags.iter().any(|t| t == &expected),
                "{expected:?} missing in {tags:?}"
            );
        }
        assert!(tags
            .iter()
            .any(|t| t[0] == "p" && t[1] == parent.public_key().to_hex()));
        let card = parse_card(&event).unwrap();
        assert_eq!(card.name, "atm-7f3a");
        assert_eq!(card.status, Some(CardStatus::Low));
        assert_eq!(card.pubkey, keys.public_key().to_hex());
        assert_eq!(card.kinds, vec![5050]);
        assert_eq!(card.services[0].price_msat, Some(21_000));
        assert!(card.offers("summar"));
        assert!(card.offers("5050"));
        assert!(!card.offers("translate"));
        assert_eq!(card.parent, content.parent);
    }

    #[test]
    fn forged_and_malformed_cards_are_rejected() {
        let keys = Keys::generate();
        let event = card_event(&keys, &sample(CardStatus::Alive)).unwrap();

        // Same signature, changed content: the id no longer matches.
        let mut json: Value = serde_json::from_str(&::nostr::JsonUtil::as_json(&event)).unwrap();
        json["content"] = Value::String(r#"{"name":"evil"}"#.into());
        let forged: Event = ::nostr::JsonUtil::from_json(json.to_string()).unwrap();
        assert_eq!(parse_card(&forged), Err(CardRejection::BadSignature));

        // Someone else's key claiming the author's pubkey, with a recomputed id.
        let other = Keys::generate();
        let theirs = card_event(&other, &sample(CardStatus::Alive)).unwrap();
        let mut json: Value = serde_json::from_str(&::nostr::JsonUtil::as_json(&theirs)).unwrap();
        json["pubkey"] = Value::String(keys.public_key().to_hex());
        let unsigned = ::nostr::UnsignedEvent::new(
            keys.public_key(),
            theirs.created_at,
            theirs.kind,
            theirs.tags.clone(),
            theirs.content.clone(),
        );
        let mut unsigned = unsigned;
        json["id"] = Value::String(unsigned.id().to_hex());
        let impostor: Event = ::nostr::JsonUtil::from_json(json.to_string()).unwrap();
        assert_eq!(parse_card(&impostor), Err(CardRejection::BadSignature));

        let not_json = EventBuilder::new(Kind::Custom(CARD_KIND), "hello")
            .tag(Tag::identifier(CARD_D_TAG))
            .sign_with_keys(&keys)
            .unwrap();
        assert_eq!(parse_card(&not_json), Err(CardRejection::MalformedContent));

        let other_app = EventBuilder::new(Kind::Custom(CARD_KIND), r#"{"name":"x"}"#)
            .tag(Tag::identifier("some-app"))
            .sign_with_keys(&keys)
            .unwrap();
        assert_eq!(parse_card(&other_app), Err(CardRejection::NotOurs));

        let nameless = EventBuilder::new(Kind::Custom(CARD_KIND), r#"{"about":"x"}"#)
            .tag(Tag::identifier(CARD_D_TAG))
            .sign_with_keys(&keys)
            .unwrap();
        assert_eq!(parse_card(&nameless), Err(CardRejection::NoName));
    }

    #[test]
    fn odd_fields_are_skipped_not_fatal() {
        let keys = Keys::generate();
        let content = r#"{"name":"odd","status":42,"services":[{"id":"a","price_msat":"free"},7,{"name":"b","price_sats":3}],
                          "ln_node_pubkey":"nope","future_field":{"x":1}}"#;
        let event = EventBuilder::new(Kind::Custom(CARD_KIND), content)
            .tags([
                Tag::identifier(CARD_D_TAG),
                raw_tag(&["l", "critical", STATUS_NAMESPACE]),
            ])
            .sign_with_keys(&keys)
            .unwrap();
        let card = parse_card(&event).unwrap();
        assert_eq!(card.status, Some(CardStatus::Critical), "label as fallback");
        assert_eq!(card.ln_node_pubkey, None);
        assert_eq!(card.services.len(), 2);
        assert_eq!(card.services[0].price_msat, None);
        assert_eq!(card.services[1].price_msat, Some(3000));
    }

    #[test]
    fn tiers_map_to_card_statuses() {
        assert_eq!(CardStatus::from_tier(None), CardStatus::Alive);
        assert_eq!(CardStatus::from_tier(Some("high")), CardStatus::Alive);
        assert_eq!(CardStatus::from_tier(Some("normal")), CardStatus::Alive);
        assert_eq!(CardStatus::from_tier(Some("low_compute")), CardStatus::Low);
        assert_eq!(
            CardStatus::from_tier(Some("critical")),
            CardStatus::Critical
        );
        assert_eq!(CardStatus::from_tier(Some("dead")), CardStatus::Dead);
        assert!(sample(CardStatus::Alive).same_as(&CardContent {
            updated_at: 5,
            ..sample(CardStatus::Alive)
        }));
    }
}
