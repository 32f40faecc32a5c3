//! `http.services`: the paid services the agent sells behind its L402 paywall (served by `crate::l402::server`).

use serde::{Deserialize, Serialize};

/// Default time a bought token stays valid.
pub const DEFAULT_VALIDITY_SECS: u64 = 3600;
/// Default largest request body a service reads.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 64 * 1024;

/// What answers a paid request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServiceKind {
    /// A node-signed attestation of the agent's current status (built in; answers a plain GET).
    Attestation,
    /// `response` as given, with `content_type`.
    Static,
    /// `command` run on the agent's compute (`sh -c`), the request body on stdin; stdout is the answer.
    Command,
    /// The skill `skill` run by the agent's model on the request body; the model's text is the answer.
    Skill,
}

impl ServiceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceKind::Attestation => "attestation",
            ServiceKind::Static => "static",
            ServiceKind::Command => "command",
            ServiceKind::Skill => "skill",
        }
    }
}

/// One paid service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// Lower-case letters, digits, `-` and `_`; written into the macaroon's `services` caveat.
    pub name: String,
    /// Where it is served on the HTTP face, e.g. `/l402/status` (exact path).
    pub path: String,
    /// What one token costs.
    pub price_sats: u64,
    /// How long a bought token is accepted (its `<name>_valid_until` caveat).
    #[serde(default = "default_validity")]
    pub validity_secs: u64,
    /// Shown to buyers in `/.well-known/automaton.json` and the agent card.
    #[serde(default)]
    pub description: String,
    pub kind: ServiceKind,
    /// The NIP-90 job kind (5000–5999) this service also answers, listed as a `k` tag on the agent card so
    /// discovery by job kind finds it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_kind: Option<u16>,
    /// `static`: the body to answer with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<String>,
    /// `static` / `command`: the answer's Content-Type (default: JSON when the answer parses as JSON, else text).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    /// `command`: the shell command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// `skill`: the skill's name (a folder under `skills/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skill: Option<String>,
    /// `command` / `skill`: longest time one call may take (default `compute.exec_timeout_secs` / the inference timeout).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
    /// Largest request body read (bigger ones are refused with 413 before any work is done).
    #[serde(
        default = "default_max_request",
        skip_serializing_if = "is_default_max_request"
    )]
    pub max_request_bytes: usize,
}

fn default_validity() -> u64 {
    DEFAULT_VALIDITY_SECS
}

fn default_max_request() -> usize {
    DEFAULT_MAX_REQUEST_BYTES
}

fn is_default_max_request(v: &usize) -> bool {
    *v == DEFAULT_MAX_REQUEST_BYTES
}

/// The default paid service setup declares: a node-signed attestation of the agent's status, 21 sats.
pub fn status_attestation() -> ServiceConfig {
    ServiceConfig {
        name: "status-attestation".into(),
        path: "/l402/status".into(),
        price_sats: 21,
        validity_secs: DEFAULT_VALIDITY_SECS,
        description:
            "A node-signed attestation of this agent's current status (GET; ?nonce=… is signed too)"
                .into(),
        kind: ServiceKind::Attestation,
        job_kind: None,
        response: None,
        content_type: None,
        command: None,
        skill: None,
        timeout_secs: None,
        max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
    }
}

/// Paths the HTTP face serves itself; a service may not take them.
const RESERVED_PREFIXES: &[&str] = &["/.well-known/", "/lnurlp/"];

/// Everything wrong with a list of services, one sentence each.
pub fn problems(services: &[ServiceConfig]) -> Vec<String> {
    let mut out = Vec::new();
    for (i, s) in services.iter().enumerate() {
        let who = if s.name.is_empty() {
            format!("service #{}", i + 1)
        } else {
            format!("service `{}`", s.name)
        };
        let name_ok = !s.name.is_empty()
            && s.name.len() <= 64
            && s.name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
        if !name_ok {
            out.push(format!(
                "{who}: name must be 1-64 characters of a-z, 0-9, `-` and `_` (it goes into the macaroon)"
            ));
        }
        let path_ok = s.path.starts_with('/')
            && s.path.len() > 1
            && !s.path.contains("//")
            && s.path
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "/-_.~".contains(c));
        if !path_ok {
            out.push(format!(
                "{who}: path `{}` must start with `/` and hold only letters, digits and `/-_.~`",
                s.path
            ));
        } else if RESERVED_PREFIXES.iter().any(|p| s.path.starts_with(p)) || s.path == "/lnurlp" {
            out.push(format!(
                "{who}: path `{}` belongs to the HTTP face itself",
                s.path
            ));
        }
        if s.price_sats == 0 {
            out.push(format!("{who}: price_sats must be at least 1"));
        }
        if s.validity_secs == 0 {
            out.push(format!("{who}: validity_secs must be at least 1"));
        }
        if s.max_request_bytes == 0 {
            out.push(format!("{who}: max_request_bytes must be at least 1"));
        }
        let needs = |field: &str, value: &Option<String>| -> Option<String> {
            match value {
                Some(v) if !v.trim().is_empty() => None,
                _ => Some(format!("{who}: kind `{}` needs `{field}`", s.kind.as_str())),
            }
        };
        let missing = match s.kind {
            ServiceKind::Attestation => None,
            ServiceKind::Static => needs("response", &s.response),
            ServiceKind::Command => needs("command", &s.command),
            ServiceKind::Skill => needs("skill", &s.skill),
        };
        out.extend(missing);
        if let Some(k) = s.job_kind {
            if !(5000..=5999).contains(&k) {
                out.push(format!(
                    "{who}: job_kind {k} is not a NIP-90 job request kind (5000-5999)"
                ));
            }
        }
        if services[..i].iter().any(|o| o.name == s.name) {
            out.push(format!("{who}: the name is used twice"));
        }
        if services[..i]
            .iter()
            .any(|o| o.path.trim_end_matches('/') == s.path.trim_end_matches('/'))
        {
            out.push(format!("{who}: path `{}` is used twice", s.path));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_service_is_valid_and_bad_ones_are_named() {
        assert!(problems(&[status_attestation()]).is_empty());
        let mut bad = status_attestation();
        bad.name = "Bad Name".into();
        bad.path = "/.well-known/x".into();
        bad.price_sats = 0;
        bad.kind = ServiceKind::Command;
        bad.job_kind = Some(1);
        let found = problems(&[bad, status_attestation(), status_attestation()]);
        let text = found.join("\n");
        assert!(text.contains("name must be"), "{text}");
        assert!(text.contains("job_kind 1"), "{text}");
        assert!(text.contains("belongs to the HTTP face"), "{text}");
        assert!(text.contains("price_sats"), "{text}");
        assert!(text.contains("needs `command`"), "{text}");
        assert!(text.contains("the name is used twice"), "{text}");
        assert!(text.contains("is used twice"), "{text}");
    }
}
