//! The lab's Nostr relay driven by a plain websocket client (tokio-tungstenite, NIP-01 JSON by hand; events signed
//! with the `nostr` crate): publish and read back, addressable (kind 31990) replacement, forged events refused,
//! NIP-09 deletions, DMs and live delivery, NIP-40 expiry, persistence, NIP-11, and stop/start through the world's
//! control API.

use std::path::Path;
use std::time::Duration;

use automaton_lab::relay::Relay;
use automaton_lab::world::{self, LabJson, World};
use futures::{SinkExt, StreamExt};
use nostr::{Event, EventBuilder, Keys, Kind, Tag, Timestamp};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Guard on every wait for a relay message, so a broken relay fails the test instead of hanging it.
const ANSWER_GUARD: Duration = Duration::from_secs(15);

/// A bare NIP-01 client: JSON arrays over a websocket, nothing from the project's own Nostr code.
struct Client {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next_sub: u32,
}

impl Client {
    async fn connect(url: &str) -> Client {
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .unwrap_or_else(|e| panic!("connecting to {url}: {e}"));
        Client { ws, next_sub: 0 }
    }

    async fn send(&mut self, message: Value) {
        self.ws
            .send(Message::text(message.to_string()))
            .await
            .expect("sending to the relay");
    }

    /// The next relay message, or `None` once the relay closed the connection.
    async fn recv(&mut self) -> Option<Value> {
        loop {
            let next = tokio::time::timeout(ANSWER_GUARD, self.ws.next())
                .await
                .expect("the relay answered in time");
            match next {
                Some(Ok(Message::Text(text))) => {
                    return Some(serde_json::from_str(text.as_str()).expect("relay sent JSON"))
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return None,
                Some(Ok(_)) => continue,
            }
        }
    }

    /// Publishes `event` (as JSON, so tests can send forged ones) and returns the relay's `OK` verdict and message.
    async fn publish_json(&mut self, event: Value) -> (bool, String) {
        let id = event["id"].clone();
        self.send(json!(["EVENT", event])).await;
        loop {
            let msg = self.recv().await.expect("the relay answered the EVENT");
            if msg[0] == "OK" && msg[1] == id {
                return (
                    msg[2].as_bool().expect("OK carries a bool"),
                    msg[3].as_str().unwrap_or_default().to_string(),
                );
            }
        }
    }

    async fn publish(&mut self, event: &Event) -> (bool, String) {
        self.publish_json(serde_json::to_value(event).expect("event JSON"))
            .await
    }

    /// Opens a subscription and returns its id and the stored events (up to `EOSE`).
    async fn subscribe(&mut self, filter: Value) -> (String, Vec<Value>) {
        self.next_sub += 1;
        let sub = format!("sub-{}", self.next_sub);
        self.send(json!(["REQ", sub, filter])).await;
        let mut events = Vec::new();
        loop {
            let msg = self.recv().await.expect("the relay answered the REQ");
            if msg[1] != sub.as_str() {
                continue;
            }
            match msg[0].as_str() {
                Some("EVENT") => events.push(msg[2].clone()),
                Some("EOSE") => return (sub, events),
                Some("CLOSED") => panic!("subscription refused: {msg}"),
                _ => {}
            }
        }
    }

    /// The stored events matching `filter` (REQ, then CLOSE after `EOSE`).
    async fn query(&mut self, filter: Value) -> Vec<Value> {
        let (sub, events) = self.subscribe(filter).await;
        self.send(json!(["CLOSE", sub])).await;
        events
    }

    /// The next live event on subscription `sub`.
    async fn next_event(&mut self, sub: &str) -> Value {
        loop {
            let msg = self.recv().await.expect("the relay delivered an event");
            if msg[0] == "EVENT" && msg[1] == sub {
                return msg[2].clone();
            }
        }
    }
}

/// A relay of its own in a temporary directory, on a random loopback port.
async fn private_relay(dir: &Path) -> Relay {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a loopback port");
    Relay::start(dir, listener).await.expect("the relay starts")
}

/// Parses an event the relay served and checks its signature, as an independent reader would.
fn verified(value: &Value) -> Event {
    let event: Event = serde_json::from_value(value.clone()).expect("a NIP-01 event");
    event
        .verify()
        .expect("the served event's id and signature verify");
    event
}

fn card(keys: &Keys, d: &str, name: &str, created_at: u64) -> Event {
    EventBuilder::new(Kind::Custom(31990), json!({ "name": name }).to_string())
        .tags([Tag::identifier(d), Tag::hashtag("automaton-ln")])
        .custom_created_at(Timestamp::from_secs(created_at))
        .sign_with_keys(keys)
        .expect("signing a card")
}

#[tokio::test]
async fn a_published_event_is_read_back_with_its_signature() {
    let dir = tempfile::tempdir().unwrap();
    let relay = private_relay(dir.path()).await;
    let keys = Keys::generate();
    let note = EventBuilder::text_note("hello from the lab")
        .sign_with_keys(&keys)
        .unwrap();

    let mut writer = Client::connect(&relay.url()).await;
    assert_eq!(writer.publish(&note).await, (true, String::new()));
    // Publishing the same event again is accepted as a duplicate, not stored twice.
    let (ok, message) = writer.publish(&note).await;
    assert!(ok, "{message}");
    assert!(message.starts_with("duplicate:"), "{message}");

    let mut reader = Client::connect(&relay.url()).await;
    let found = reader
        .query(json!({ "authors": [keys.public_key().to_hex()] }))
        .await;
    assert_eq!(found.len(), 1, "{found:?}");
    let event = verified(&found[0]);
    assert_eq!(event.id, note.id);
    assert_eq!(event.content, "hello from the lab");
    assert_eq!(event.pubkey, keys.public_key());
    assert_eq!(relay.event_count().await.unwrap(), 1);
}

#[tokio::test]
async fn an_addressable_card_keeps_only_the_latest_version_per_d_tag() {
    let dir = tempfile::tempdir().unwrap();
    let relay = private_relay(dir.path()).await;
    let keys = Keys::generate();
    let now = Timestamp::now().as_secs();
    let mut client = Client::connect(&relay.url()).await;

    let first = card(&keys, "automaton-ln", "v1", now - 20);
    let second = card(&keys, "automaton-ln", "v2", now - 10);
    let other = card(&keys, "another-card", "other", now - 15);
    for event in [&first, &second, &other] {
        assert_eq!(client.publish(event).await, (true, String::new()));
    }
    // An older version arriving late is refused, with a reason, and changes nothing.
    let stale = card(&keys, "automaton-ln", "v0", now - 30);
    let (ok, message) = client.publish(&stale).await;
    assert!(!ok);
    assert!(message.contains("newer version"), "{message}");

    let author = keys.public_key().to_hex();
    let cards = client
        .query(json!({ "kinds": [31990], "authors": [author] }))
        .await;
    let mut names: Vec<String> = cards
        .iter()
        .map(|c| {
            let event = verified(c);
            serde_json::from_str::<Value>(&event.content).unwrap()["name"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    names.sort();
    assert_eq!(names, ["other", "v2"]);

    let by_d = client
        .query(json!({ "kinds": [31990], "authors": [author], "#d": ["automaton-ln"] }))
        .await;
    assert_eq!(by_d.len(), 1);
    assert_eq!(verified(&by_d[0]).id, second.id);
    // The discovery filter of the spec (`#t`) finds both cards.
    let by_t = client
        .query(json!({ "kinds": [31990], "#t": ["automaton-ln"] }))
        .await;
    assert_eq!(by_t.len(), 2);
}

#[tokio::test]
async fn forged_events_are_refused_with_ok_false() {
    let dir = tempfile::tempdir().unwrap();
    let relay = private_relay(dir.path()).await;
    let keys = Keys::generate();
    let genuine = card(&keys, "automaton-ln", "genuine", Timestamp::now().as_secs());
    let other = EventBuilder::text_note("another event")
        .sign_with_keys(&keys)
        .unwrap();
    let mut client = Client::connect(&relay.url()).await;

    // A valid id, but the signature of a different event.
    let mut forged = serde_json::to_value(&genuine).unwrap();
    forged["sig"] = json!(other.sig.to_string());
    let (ok, message) = client.publish_json(forged).await;
    assert!(!ok);
    assert!(message.starts_with("invalid:"), "{message}");
    assert!(message.contains("signature"), "{message}");

    // Content changed after signing: the id no longer matches.
    let mut tampered = serde_json::to_value(&genuine).unwrap();
    tampered["content"] = json!(r#"{"name":"tampered"}"#);
    let (ok, message) = client.publish_json(tampered).await;
    assert!(!ok);
    assert!(message.starts_with("invalid:"), "{message}");

    // The connection is still usable, and nothing was stored.
    let found = client.query(json!({ "ids": [genuine.id.to_hex()] })).await;
    assert!(found.is_empty(), "{found:?}");
    assert_eq!(relay.event_count().await.unwrap(), 0);
}

#[tokio::test]
async fn a_deletion_removes_its_authors_events_only() {
    let dir = tempfile::tempdir().unwrap();
    let relay = private_relay(dir.path()).await;
    let author = Keys::generate();
    let stranger = Keys::generate();
    let note = EventBuilder::text_note("to be deleted")
        .sign_with_keys(&author)
        .unwrap();
    let mut client = Client::connect(&relay.url()).await;
    assert!(client.publish(&note).await.0);

    // Someone else cannot delete it.
    let foreign = EventBuilder::new(Kind::EventDeletion, "")
        .tag(Tag::event(note.id))
        .sign_with_keys(&stranger)
        .unwrap();
    let (ok, message) = client.publish(&foreign).await;
    assert!(!ok);
    assert!(message.contains("another author"), "{message}");
    assert_eq!(
        client
            .query(json!({ "ids": [note.id.to_hex()] }))
            .await
            .len(),
        1
    );

    // Its author can; the note is gone and cannot be published again.
    let deletion = EventBuilder::new(Kind::EventDeletion, "wrong note")
        .tag(Tag::event(note.id))
        .sign_with_keys(&author)
        .unwrap();
    assert_eq!(client.publish(&deletion).await, (true, String::new()));
    assert!(client
        .query(json!({ "ids": [note.id.to_hex()] }))
        .await
        .is_empty());
    let (ok, message) = client.publish(&note).await;
    assert!(!ok);
    assert!(message.contains("deleted"), "{message}");

    // A card deleted by its address (`a` tag) is gone too.
    let card_v1 = card(
        &author,
        "automaton-ln",
        "dying",
        Timestamp::now().as_secs() - 5,
    );
    assert!(client.publish(&card_v1).await.0);
    let by_address = EventBuilder::new(Kind::EventDeletion, "")
        .tag(
            Tag::parse([
                "a".to_string(),
                format!("31990:{}:automaton-ln", author.public_key().to_hex()),
            ])
            .unwrap(),
        )
        .sign_with_keys(&author)
        .unwrap();
    assert!(client.publish(&by_address).await.0);
    assert!(client
        .query(json!({ "kinds": [31990], "authors": [author.public_key().to_hex()] }))
        .await
        .is_empty());
}

#[tokio::test]
async fn dms_are_stored_and_delivered_live_and_ephemeral_events_only_live() {
    let dir = tempfile::tempdir().unwrap();
    let relay = private_relay(dir.path()).await;
    let sender = Keys::generate();
    let recipient = Keys::generate();
    let recipient_hex = recipient.public_key().to_hex();

    // The recipient listens before anything is sent, as an agent or an NWC client does.
    let mut listener = Client::connect(&relay.url()).await;
    let (sub, stored) = listener
        .subscribe(json!({ "kinds": [4, 1059, 23194], "#p": [recipient_hex] }))
        .await;
    assert!(stored.is_empty());

    let mut client = Client::connect(&relay.url()).await;
    let dm = EventBuilder::new(Kind::EncryptedDirectMessage, "ciphertext?iv=abc")
        .tag(Tag::public_key(recipient.public_key()))
        .sign_with_keys(&sender)
        .unwrap();
    // A gift wrap is signed by a throwaway key (NIP-59).
    let wrap = EventBuilder::new(Kind::GiftWrap, "sealed")
        .tag(Tag::public_key(recipient.public_key()))
        .sign_with_keys(&Keys::generate())
        .unwrap();
    let request = EventBuilder::new(Kind::Custom(23194), "nwc request")
        .tag(Tag::public_key(recipient.public_key()))
        .sign_with_keys(&sender)
        .unwrap();
    for event in [&dm, &wrap, &request] {
        assert_eq!(client.publish(event).await, (true, String::new()));
        assert_eq!(verified(&listener.next_event(&sub).await).id, event.id);
    }

    // Later readers find the DMs, but not the ephemeral request.
    let mut late = Client::connect(&relay.url()).await;
    let mut ids: Vec<String> = late
        .query(json!({ "kinds": [4, 1059, 23194], "#p": [recipient_hex] }))
        .await
        .iter()
        .map(|e| verified(e).id.to_hex())
        .collect();
    ids.sort();
    let mut expected = vec![dm.id.to_hex(), wrap.id.to_hex()];
    expected.sort();
    assert_eq!(ids, expected);
}

#[tokio::test]
async fn expired_events_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let relay = private_relay(dir.path()).await;
    let keys = Keys::generate();
    let expired = EventBuilder::text_note("too late")
        .tag(Tag::expiration(Timestamp::from_secs(
            Timestamp::now().as_secs() - 60,
        )))
        .sign_with_keys(&keys)
        .unwrap();
    let mut client = Client::connect(&relay.url()).await;
    let (ok, message) = client.publish(&expired).await;
    assert!(!ok);
    assert!(message.contains("expired"), "{message}");
}

#[tokio::test]
async fn events_survive_a_restart_of_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let keys = Keys::generate();
    let note = EventBuilder::text_note("kept on disk")
        .sign_with_keys(&keys)
        .unwrap();
    {
        let relay = private_relay(dir.path()).await;
        let mut client = Client::connect(&relay.url()).await;
        assert!(client.publish(&note).await.0);
        relay.shutdown().await;
    }
    assert!(
        dir.path().join("data.mdb").exists(),
        "LMDB files in the dir"
    );
    let relay = private_relay(dir.path()).await;
    let mut client = Client::connect(&relay.url()).await;
    let found = client.query(json!({ "ids": [note.id.to_hex()] })).await;
    assert_eq!(found.len(), 1);
    assert_eq!(verified(&found[0]).id, note.id);
}

#[tokio::test]
async fn a_restart_fails_clearly_when_another_process_took_the_port() {
    let dir = tempfile::tempdir().unwrap();
    let relay = private_relay(dir.path()).await;
    relay.stop().await;
    assert!(!relay.is_running().await);
    let squatter =
        std::net::TcpListener::bind(relay.addr()).expect("the port is free once stopped");
    let err = relay.restart().await.expect_err("the port is taken");
    assert_eq!(err.kind(), "port_in_use", "{err}");
    assert!(err.to_string().contains(&relay.addr().to_string()), "{err}");
    drop(squatter);
    relay.restart().await.expect("free again");
    assert!(relay.is_running().await);
    Client::connect(&relay.url()).await;
}

/// `up` on an existing dir: the relay comes back on the same URL with its events (`DIR/relay/`).
#[tokio::test(flavor = "multi_thread")]
async fn a_resumed_world_keeps_its_relay_url_and_events() {
    let dir = tempfile::tempdir().unwrap();
    let keys = Keys::generate();
    let note = EventBuilder::text_note("before the restart")
        .sign_with_keys(&keys)
        .unwrap();
    let first = World::start(dir.path()).await.expect("first start");
    let url = first.lab_json().relay_url.clone().expect("relay_url");
    let mut client = Client::connect(&url).await;
    assert!(client.publish(&note).await.0);
    assert!(first.summary(None).contains(&url));
    first.shutdown().await;
    drop(first);
    assert!(dir.path().join("relay").join("data.mdb").exists());

    let second = World::start(dir.path()).await.expect("resume");
    assert_eq!(second.lab_json().relay_url.as_deref(), Some(url.as_str()));
    let mut client = Client::connect(&url).await;
    let found = client.query(json!({ "ids": [note.id.to_hex()] })).await;
    assert_eq!(found.len(), 1);
    second.shutdown().await;
}

#[tokio::test]
async fn nip11_information_and_plain_http() {
    let dir = tempfile::tempdir().unwrap();
    let relay = private_relay(dir.path()).await;
    let http = format!("http://{}", relay.addr());
    let client = reqwest::Client::new();

    let info = client
        .get(&http)
        .header("accept", "application/nostr+json")
        .send()
        .await
        .unwrap();
    assert_eq!(info.status(), 200);
    assert_eq!(
        info.headers()["content-type"].to_str().unwrap(),
        "application/nostr+json"
    );
    assert_eq!(info.headers()["access-control-allow-origin"], "*");
    let info: Value = info.json().await.unwrap();
    let nips: Vec<u64> = info["supported_nips"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_u64().unwrap())
        .collect();
    for nip in [1, 9, 11, 40] {
        assert!(nips.contains(&nip), "NIP-{nip} missing from {info}");
    }

    let page = client.get(&http).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("websocket"));
}

/// The world's relay: `relay_url` in lab.json, stop/start through the control API (connection refused while
/// stopped, open connections cut, the same URL and the same events after), status and injected forged events.
#[tokio::test(flavor = "multi_thread")]
async fn the_world_relay_stops_and_starts_through_the_control_api() {
    let world = world::shared();
    let lab = LabJson::read(&world.lab_json_path()).unwrap();
    let url = lab.relay_url.clone().expect("relay_url in lab.json");
    assert_eq!(url, world.relay().url());
    assert!(url.starts_with("ws://127.0.0.1:"), "{url}");
    let control = reqwest::Client::new();
    let route = |path: &str| format!("{}{path}", world.control_url());

    let keys = Keys::generate();
    let before = card(&keys, "automaton-ln", "before", Timestamp::now().as_secs());
    let mut client = Client::connect(&url).await;
    assert_eq!(client.publish(&before).await, (true, String::new()));
    let (sub, _) = client
        .subscribe(json!({ "authors": [keys.public_key().to_hex()] }))
        .await;

    let stopped: Value = control
        .post(route("/lab/relay/stop"))
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stopped["running"], false);
    assert_eq!(stopped["url"], url.as_str());
    // The open connection was cut (the event may still arrive live just before the cut), and new ones
    // are refused.
    while let Some(msg) = client.recv().await {
        assert_eq!(msg[0], "EVENT", "connection still open on {sub}: {msg}");
    }
    match tokio_tungstenite::connect_async(url.as_str()).await {
        Err(tokio_tungstenite::tungstenite::Error::Io(e)) => {
            assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}")
        }
        Err(e) => panic!("expected connection refused, got {e}"),
        Ok(_) => panic!("connected to a stopped relay"),
    }
    // Stopping twice is harmless.
    let again = control.post(route("/lab/relay/stop")).send().await.unwrap();
    assert_eq!(again.status(), 200);

    let started: Value = control
        .post(route("/lab/relay/start"))
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(started["running"], true);
    assert_eq!(started["url"], url.as_str());

    let mut client = Client::connect(&url).await;
    let found = client
        .query(json!({ "kinds": [31990], "authors": [keys.public_key().to_hex()] }))
        .await;
    assert_eq!(found.len(), 1);
    assert_eq!(verified(&found[0]).id, before.id);
    let after = card(
        &keys,
        "automaton-ln",
        "after",
        Timestamp::now().as_secs() + 1,
    );
    assert_eq!(client.publish(&after).await, (true, String::new()));

    let status: Value = control
        .get(route("/lab/relay"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["running"], true);
    assert!(status["events"].as_u64().unwrap() >= 1, "{status}");

    // A forged card can be planted for discovery tests: the relay serves it, and it does not verify.
    let forger = Keys::generate();
    let genuine = card(
        &forger,
        "automaton-ln",
        "forged",
        Timestamp::now().as_secs(),
    );
    let mut forged = serde_json::to_value(&genuine).unwrap();
    forged["sig"] = json!(after.sig.to_string());
    let injected = control
        .post(route("/lab/relay/inject"))
        .json(&json!({ "event": forged }))
        .send()
        .await
        .unwrap();
    assert_eq!(injected.status(), 200);
    let injected: Value = injected.json().await.unwrap();
    assert_eq!(injected["stored"], true);
    assert_eq!(injected["id"], genuine.id.to_hex());
    let served = client.query(json!({ "ids": [genuine.id.to_hex()] })).await;
    assert_eq!(served.len(), 1);
    let served: Event = serde_json::from_value(served[0].clone()).unwrap();
    assert!(served.verify().is_err());

    // Bad bodies get the control API's error shape.
    let bad = control
        .post(route("/lab/relay/inject"))
        .json(&json!({ "event": { "id": "nope" } }))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let bad: Value = bad.json().await.unwrap();
    assert_eq!(bad["kind"], "bad_request");
    let unknown = control
        .post(route("/lab/relay/inject"))
        .json(&json!({ "event": serde_json::to_value(&after).unwrap(), "extra": 1 }))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 400);
    let duplicate = control
        .post(route("/lab/relay/inject"))
        .json(&json!({ "event": serde_json::to_value(&after).unwrap() }))
        .send()
        .await
        .unwrap();
    assert_eq!(duplicate.status(), 409);
    assert_eq!(duplicate.json::<Value>().await.unwrap()["kind"], "rejected");
}
