//! NIP-98 HTTP auth, client side: a freshly signed kind-27235 event per request, as an `Authorization` value.
//!
//! Servers such as LNVPS refuse a reused event id and anything more than a minute off their clock, so nothing
//! here is cached: call [`sign`] again for every request, including every retry.

use ::nostr::hashes::{sha256, Hash};
use ::nostr::{EventBuilder, Keys, Kind, Tag, TagKind, Timestamp, Url};

use super::NostrError;

/// The `Authorization` header value (`Nostr <base64 event>`) for one request.
///
/// `url` must be absolute and is signed in the form an HTTP client sends it (parsed and re-serialised, query
/// included). `method` is any HTTP method (DELETE too). A `payload` tag with the SHA-256 of `body` is added
/// whenever there is a body.
pub fn sign(
    keys: &Keys,
    url: &str,
    method: &str,
    body: Option<&[u8]>,
) -> Result<String, NostrError> {
    let event = auth_event(keys, url, method, body, Timestamp::now())?;
    use ::nostr::base64::Engine;
    let encoded = ::nostr::base64::engine::general_purpose::STANDARD
        .encode(::nostr::JsonUtil::as_json(&event));
    Ok(format!("Nostr {encoded}"))
}

fn auth_event(
    keys: &Keys,
    url: &str,
    method: &str,
    body: Option<&[u8]>,
    created_at: Timestamp,
) -> Result<::nostr::Event, NostrError> {
    let parsed = Url::parse(url.trim()).map_err(|e| {
        NostrError::Event(format!("NIP-98 needs an absolute URL, got `{url}`: {e}"))
    })?;
    let method = method.trim().to_ascii_uppercase();
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_alphabetic()) {
        return Err(NostrError::Event(format!(
            "`{method}` is not an HTTP method"
        )));
    }
    let mut tags = vec![
        Tag::custom(TagKind::u(), [parsed.as_str()]),
        Tag::custom(TagKind::Method, [method]),
    ];
    if let Some(body) = body {
        tags.push(Tag::custom(
            TagKind::Payload,
            [sha256::Hash::hash(body).to_string()],
        ));
    }
    // Two requests to the same URL within one second would otherwise be byte-identical events with the same
    // id, and a server that refuses replays would take the second for one. Servers ignore unknown tags.
    tags.push(Tag::custom(
        TagKind::custom("nonce"),
        [format!("{:032x}", rand::random::<u128>())],
    ));
    EventBuilder::new(Kind::HttpAuth, "")
        .tags(tags)
        .custom_created_at(created_at)
        .sign_with_keys(keys)
        .map_err(|e| NostrError::Event(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ::nostr::nips::nip98::{verify_auth_header, HttpMethod};

    #[test]
    fn header_verifies_and_every_call_is_a_new_event() {
        let keys = Keys::generate();
        let url = "https://api.lnvps.net/api/v1/vm?limit=5";
        let a = sign(&keys, url, "get", None).unwrap();
        let b = sign(&keys, url, "GET", None).unwrap();
        assert_ne!(a, b, "a fresh event per request");
        let parsed = Url::parse(url).unwrap();
        let who = verify_auth_header(&a, &parsed, HttpMethod::GET, Timestamp::now(), None).unwrap();
        assert_eq!(who, keys.public_key());

        let body = br#"{"template_id":1}"#;
        let post = sign(&keys, url, "POST", Some(body)).unwrap();
        verify_auth_header(
            &post,
            &parsed,
            HttpMethod::POST,
            Timestamp::now(),
            Some(body),
        )
        .unwrap();
        assert!(verify_auth_header(
            &post,
            &parsed,
            HttpMethod::POST,
            Timestamp::now(),
            Some(b"other")
        )
        .is_err());
        assert!(verify_auth_header(
            &post,
            &parsed,
            HttpMethod::PUT,
            Timestamp::now(),
            Some(body)
        )
        .is_err());
    }

    #[test]
    fn delete_and_the_exact_url_are_signed() {
        let keys = Keys::generate();
        let event = auth_event(
            &keys,
            "https://h.example/api/v1/ssh-key/3?x=1",
            "delete",
            None,
            Timestamp::from(1_700_000_000),
        )
        .unwrap();
        event.verify().unwrap();
        assert_eq!(event.kind, Kind::HttpAuth);
        assert_eq!(event.content, "");
        let tag = |name: &str| {
            event
                .tags
                .iter()
                .find(|t| t.kind() == TagKind::custom(name) || t.as_slice()[0] == name)
                .map(|t| t.as_slice()[1].clone())
        };
        assert_eq!(
            tag("u").as_deref(),
            Some("https://h.example/api/v1/ssh-key/3?x=1")
        );
        assert_eq!(tag("method").as_deref(), Some("DELETE"));
        assert_eq!(tag("payload"), None);
        assert_eq!(event.created_at, Timestamp::from(1_700_000_000));
    }

    #[test]
    fn refuses_relative_urls_and_bad_methods() {
        let keys = Keys::generate();
        assert!(sign(&keys, "/api/v1/vm", "GET", None).is_err());
        assert!(sign(&keys, "https://h.example/", "GE T", None).is_err());
    }
}
