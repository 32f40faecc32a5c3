//! NIP-98 authentication exactly as the LNVPS server applies it: the check order, plain-text 401/403 bodies,
//! path-only `u` comparison, a ±60 s window, single-use event ids, and the optional `payload` hash.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{FromRef, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use nostr::{Event, EventId, JsonUtil, Kind};
use sha2::{Digest, Sha256};

/// `|created_at − now|` above this is refused.
pub const AUTH_WINDOW_SECS: u64 = 60;
/// Seen ids are remembered this long (an event may be presented for a whole window on either side of now).
pub const REPLAY_MEMORY: Duration = Duration::from_secs(2 * AUTH_WINDOW_SECS);
/// At most this many ids are remembered.
pub const MAX_TRACKED_EVENTS: usize = 100_000;
/// Bodies of NIP-98 requests are buffered (to hash them) up to this size.
pub const MAX_BODY: usize = 2 * 1024 * 1024;

/// Burned ids with when they were burned, and the same in burning order (oldest first) for expiry.
type Seen = (HashMap<EventId, Instant>, VecDeque<(Instant, EventId)>);

/// Event ids already used, each burned once every other check passed.
#[derive(Default)]
pub struct ReplayGuard {
    seen: Mutex<Seen>,
}

impl ReplayGuard {
    /// Burns `id`; false if it was already used within [`REPLAY_MEMORY`].
    fn consume(&self, id: EventId) -> bool {
        let Ok(mut guard) = self.seen.lock() else {
            return false;
        };
        let (seen, order) = &mut *guard;
        let now = Instant::now();
        while let Some((at, old)) = order.front().copied() {
            if now.duration_since(at) < REPLAY_MEMORY && order.len() < MAX_TRACKED_EVENTS {
                break;
            }
            order.pop_front();
            if seen.get(&old) == Some(&at) {
                seen.remove(&old);
            }
        }
        if seen.contains_key(&id) {
            return false;
        }
        seen.insert(id, now);
        order.push_back((now, id));
        true
    }
}

/// SHA-256 of the request body (lowercase hex), put in the request's extensions by [`payload_layer`] for every
/// NIP-98 request, so the extractor can check a `payload` tag.
#[derive(Clone, Debug)]
pub struct PayloadHash(pub String);

/// Buffers the body of requests that carry `Authorization: Nostr …` and records its hash. Other requests pass
/// untouched.
pub async fn payload_layer(req: Request, next: Next) -> Response {
    let is_nostr = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("Nostr "));
    if !is_nostr {
        return next.run(req).await;
    }
    let (mut parts, body) = req.into_parts();
    let bytes = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(b) => b,
        Err(_) => {
            return (StatusCode::PAYLOAD_TOO_LARGE, "Request body too large").into_response();
        }
    };
    parts
        .extensions
        .insert(PayloadHash(hex::encode(Sha256::digest(&bytes))));
    next.run(Request::from_parts(parts, axum::body::Body::from(bytes)))
        .await
}

/// What an authenticated request proves: the event's public key (hex), the caller's identity.
#[derive(Debug, Clone)]
pub struct Nip98 {
    pub pubkey: String,
}

fn reject(status: StatusCode, message: impl Into<String>) -> (StatusCode, String) {
    (status, message.into())
}

fn tag_value<'a>(event: &'a Event, name: &str) -> Option<&'a str> {
    event.tags.iter().find_map(|t| match t.as_slice() {
        [k, v, ..] if k == name => Some(v.as_str()),
        _ => None,
    })
}

/// The checks of step 5, in the server's order. `Err` is the message after `Auth check failed: `.
fn check_event(
    event: &Event,
    path: &str,
    method: &str,
    body_hash: Option<&str>,
    guard: &ReplayGuard,
    now: u64,
) -> Result<(), &'static str> {
    if event.kind != Kind::HttpAuth {
        return Err("Wrong event kind");
    }
    if event.created_at.as_secs().abs_diff(now) > AUTH_WINDOW_SECS {
        return Err("Created timestamp is out of range");
    }
    let url = tag_value(event, "u").ok_or("Missing url tag")?;
    let uri = url.parse::<Uri>().map_err(|_| "Invalid U tag")?;
    // Only the path is compared: scheme, host and query are ignored on both sides.
    if uri.path() != path {
        return Err("U tag does not match");
    }
    match tag_value(event, "method") {
        Some(m) if m == method => {}
        Some(_) => return Err("Method tag incorrect"),
        None => return Err("Missing method tag"),
    }
    if event.verify().is_err() {
        return Err("Event signature invalid");
    }
    // Burned only now, so a forged or mistargeted event cannot burn a legitimate one's id.
    if !guard.consume(event.id) {
        return Err("Credential has already been used");
    }
    if let Some(expected) = tag_value(event, "payload") {
        match body_hash {
            Some(actual) if expected.eq_ignore_ascii_case(actual) => {}
            Some(_) => return Err("Payload tag does not match request body"),
            None => return Err("Payload tag present but request has no body"),
        }
    }
    Ok(())
}

impl<S> FromRequestParts<S> for Nip98
where
    S: Send + Sync,
    Arc<super::Inner>: FromRef<S>,
{
    type Rejection = (StatusCode, String);

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let inner = Arc::<super::Inner>::from_ref(state);
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| reject(StatusCode::FORBIDDEN, "Auth header not found"))?;
        if header.starts_with("Bearer ") {
            // The real server verifies an OAuth session JWT here; the lab issues none, so none is valid.
            return Err(reject(
                StatusCode::UNAUTHORIZED,
                "Invalid session: InvalidToken",
            ));
        }
        let Some(encoded) = header.strip_prefix("Nostr ") else {
            return Err(reject(
                StatusCode::FORBIDDEN,
                "Auth scheme must be Nostr or Bearer",
            ));
        };
        let json = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .map_err(|_| {
                reject(
                    StatusCode::UNAUTHORIZED,
                    "Invalid auth: Invalid auth string",
                )
            })?;
        let event = Event::from_json(json).map_err(|_| {
            reject(
                StatusCode::UNAUTHORIZED,
                "Invalid auth: Invalid nostr event",
            )
        })?;
        let body_hash = parts.extensions.get::<PayloadHash>().map(|h| h.0.clone());
        let now = nostr::Timestamp::now().as_secs();
        check_event(
            &event,
            parts.uri.path(),
            parts.method.as_str(),
            body_hash.as_deref(),
            &inner.replay,
            now,
        )
        .map_err(|why| {
            reject(
                StatusCode::UNAUTHORIZED,
                format!("Auth check failed: {why}"),
            )
        })?;
        Ok(Nip98 {
            pubkey: event.pubkey.to_hex(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nostr::{EventBuilder, Keys, Tag, Timestamp};

    fn event(tags: Vec<Vec<&str>>, created_at: u64, kind: Kind) -> Event {
        let keys = Keys::generate();
        EventBuilder::new(kind, "")
            .tags(tags.into_iter().map(|t| Tag::parse(t).unwrap()))
            .custom_created_at(Timestamp::from(created_at))
            .sign_with_keys(&keys)
            .unwrap()
    }

    fn now() -> u64 {
        Timestamp::now().as_secs()
    }

    #[test]
    fn order_and_messages() {
        let g = ReplayGuard::default();
        let path = "/api/v1/vm";
        let ok = vec![vec!["u", "http://h/api/v1/vm?x=1"], vec!["method", "GET"]];
        let e = event(ok.clone(), now(), Kind::TextNote);
        assert_eq!(
            check_event(&e, path, "GET", None, &g, now()),
            Err("Wrong event kind")
        );
        let e = event(ok.clone(), now() - 61, Kind::HttpAuth);
        assert_eq!(
            check_event(&e, path, "GET", None, &g, now()),
            Err("Created timestamp is out of range")
        );
        let e = event(ok.clone(), now() + 61, Kind::HttpAuth);
        assert_eq!(
            check_event(&e, path, "GET", None, &g, now()),
            Err("Created timestamp is out of range")
        );
        let e = event(vec![vec!["method", "GET"]], now(), Kind::HttpAuth);
        assert_eq!(
            check_event(&e, path, "GET", None, &g, now()),
            Err("Missing url tag")
        );
        let e = event(
            vec![vec!["u", "http://h h/x"], vec!["method", "GET"]],
            now(),
            Kind::HttpAuth,
        );
        assert_eq!(
            check_event(&e, path, "GET", None, &g, now()),
            Err("Invalid U tag")
        );
        let e = event(
            vec![vec!["u", "http://h/api/v1/vm/1"], vec!["method", "GET"]],
            now(),
            Kind::HttpAuth,
        );
        assert_eq!(
            check_event(&e, path, "GET", None, &g, now()),
            Err("U tag does not match")
        );
        let e = event(vec![vec!["u", "http://h/api/v1/vm"]], now(), Kind::HttpAuth);
        assert_eq!(
            check_event(&e, path, "GET", None, &g, now()),
            Err("Missing method tag")
        );
        let e = event(
            vec![vec!["u", "http://h/api/v1/vm"], vec!["method", "get"]],
            now(),
            Kind::HttpAuth,
        );
        assert_eq!(
            check_event(&e, path, "GET", None, &g, now()),
            Err("Method tag incorrect")
        );
        let e = event(ok.clone(), now(), Kind::HttpAuth);
        assert_eq!(check_event(&e, path, "GET", None, &g, now()), Ok(()));
        assert_eq!(
            check_event(&e, path, "GET", None, &g, now()),
            Err("Credential has already been used")
        );
    }

    #[test]
    fn payload_hash_is_optional_but_binding() {
        let g = ReplayGuard::default();
        let body_hash = hex::encode(Sha256::digest(b"{}"));
        let upper = body_hash.to_uppercase();
        let tags = vec![
            vec!["u", "/api/v1/vm"],
            vec!["method", "POST"],
            vec!["payload", upper.as_str()],
        ];
        let e = event(tags.clone(), now(), Kind::HttpAuth);
        assert_eq!(
            check_event(&e, "/api/v1/vm", "POST", Some(&body_hash), &g, now()),
            Ok(())
        );
        let e = event(tags, now(), Kind::HttpAuth);
        let other = hex::encode(Sha256::digest(b"{\"a\":1}"));
        assert_eq!(
            check_event(&e, "/api/v1/vm", "POST", Some(&other), &g, now()),
            Err("Payload tag does not match request body")
        );
    }
}
