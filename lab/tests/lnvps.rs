//! The LNVPS double driven over HTTP as a client drives LNVPS: NIP-98 signed with rust-nostr, every documented
//! route, status and message, the NIP-98 failure modes, and a VM's life: create → renew invoice → the creator pays
//! → running → SSH in with strict host keys → stop kills its processes → start → expiry stops it → LNURL top-up
//! extends it → deletion.

mod common;

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Once;
use std::time::{Duration, Instant};

use automaton_lab::world::{self, World};
use base64::Engine;
use chrono::{DateTime, Utc};
use common::{poll, Control};
use nostr::{EventBuilder, JsonUtil, Keys, Kind, Tag, Timestamp};
use reqwest::Method;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// The fault test changes what every request sees; the others hold this for reading.
static FAULTS: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// Orders are reaped after this many seconds in this binary's world.
const UNPAID_SECS: u64 = 60;

fn world() -> &'static World {
    static ENV: Once = Once::new();
    ENV.call_once(|| {
        // Before the shared world starts (it reads them once). Parallel pollers of this binary would otherwise
        // trip the faithful 600-requests-a-minute limit, which has its own unit test.
        std::env::set_var("AUTOMATON_LAB_LNVPS_UNPAID_SECS", UNPAID_SECS.to_string());
        std::env::set_var("AUTOMATON_LAB_LNVPS_RATE_LIMIT", "100000");
    });
    world::shared()
}

fn base(world: &World) -> String {
    world
        .lab_json()
        .lnvps_url
        .clone()
        .expect("lnvps_url in lab.json")
}

/// A NIP-98 client with its own Nostr key.
struct Client {
    keys: Keys,
    base: String,
    http: reqwest::Client,
}

struct Reply {
    status: u16,
    content_type: String,
    text: String,
    headers: reqwest::header::HeaderMap,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text))
    }
    fn data(&self) -> Value {
        assert_eq!(self.status, 200, "{}", self.text);
        self.json()["data"].clone()
    }
    fn error(&self) -> String {
        self.json()["error"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

impl Client {
    fn new(world: &World) -> Client {
        Client {
            keys: Keys::generate(),
            base: base(world),
            http: reqwest::Client::new(),
        }
    }

    fn pubkey(&self) -> String {
        self.keys.public_key().to_hex()
    }

    /// `Nostr <base64(event)>` for `tags`, created at `created_at`.
    fn header_with(&self, tags: Vec<Vec<String>>, created_at: u64, kind: Kind) -> String {
        let event = EventBuilder::new(kind, "")
            .tags(tags.into_iter().map(|t| Tag::parse(t).unwrap()))
            .custom_created_at(Timestamp::from(created_at))
            .sign_with_keys(&self.keys)
            .unwrap();
        format!(
            "Nostr {}",
            base64::engine::general_purpose::STANDARD.encode(event.as_json())
        )
    }

    /// A fresh, valid header for `method url` (payload tag over `body` when there is one). Two events with the
    /// same tags in the same second have the same id, so a random `nonce` tag keeps quick repeats fresh.
    fn header(&self, method: &str, url: &str, body: Option<&[u8]>) -> String {
        let nonce: u64 = rand::random();
        let mut tags = vec![
            vec!["u".to_string(), url.to_string()],
            vec!["method".to_string(), method.to_string()],
            vec!["nonce".to_string(), format!("{nonce:016x}")],
        ];
        if let Some(body) = body {
            tags.push(vec!["payload".into(), hex::encode(Sha256::digest(body))]);
        }
        self.header_with(tags, now(), Kind::HttpAuth)
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        auth: Option<String>,
        body: Option<Vec<u8>>,
        json_type: bool,
    ) -> Reply {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        if let Some(b) = body {
            if json_type {
                req = req.header("content-type", "application/json");
            }
            req = req.body(b);
        }
        let resp = req.send().await.expect("LNVPS request");
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let content_type = headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        Reply {
            status,
            content_type,
            text: resp.text().await.unwrap_or_default(),
            headers,
        }
    }

    /// An authenticated call with a fresh event; JSON body when given.
    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> Reply {
        let url = format!("{}{path}", self.base);
        let bytes = body.map(|b| serde_json::to_vec(&b).unwrap());
        let auth = self.header(method.as_str(), &url, bytes.as_deref());
        self.send(method, path, Some(auth), bytes, true).await
    }

    async fn public(&self, path: &str) -> Reply {
        self.send(Method::GET, path, None, None, false).await
    }

    async fn add_key(&self, key_line: &str) -> u64 {
        let r = self
            .call(
                Method::POST,
                "/api/v1/ssh-key",
                Some(json!({"name": "lab test", "key_data": key_line})),
            )
            .await;
        r.data()["id"].as_u64().unwrap()
    }

    async fn create_vm(&self, key_id: u64) -> Value {
        let r = self
            .call(
                Method::POST,
                "/api/v1/vm",
                Some(json!({"template_id": 1, "image_id": 1, "ssh_key_id": key_id})),
            )
            .await;
        r.data()
    }

    async fn vm(&self, id: u64) -> Value {
        self.call(Method::GET, &format!("/api/v1/vm/{id}"), None)
            .await
            .data()
    }

    /// Renews (one interval), has the creator pay, and waits until the payment shows paid.
    async fn renew_and_pay(&self, control: &Control, id: u64) -> Value {
        let payment = self
            .call(
                Method::GET,
                &format!("/api/v1/vm/{id}/renew?method=lightning"),
                None,
            )
            .await
            .data();
        let bolt11 = payment["data"]["lightning"].as_str().unwrap().to_string();
        control
            .ok("/lab/creator/pay", json!({ "bolt11": bolt11 }))
            .await;
        let pid = payment["id"].as_str().unwrap().to_string();
        poll(Duration::from_secs(30), "payment settles", || async {
            let p = self
                .call(Method::GET, &format!("/api/v1/payment/{pid}"), None)
                .await
                .data();
            p["is_paid"].as_bool().unwrap_or(false).then_some(p)
        })
        .await
    }

    async fn wait_state(&self, id: u64, state: &str) -> Value {
        poll(
            Duration::from_secs(30),
            &format!("VM {id} {state}"),
            || async {
                let vm = self.vm(id).await;
                (vm["status"]["state"] == state).then_some(vm)
            },
        )
        .await
    }
}

fn now() -> u64 {
    Timestamp::now().as_secs()
}

fn ts(v: &Value) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(v.as_str().unwrap_or_else(|| panic!("not a timestamp: {v}")))
        .unwrap()
        .with_timezone(&Utc)
}

/// A client key pair for SSH, in its own directory.
struct SshIdentity {
    dir: tempfile::TempDir,
}

impl SshIdentity {
    fn new() -> SshIdentity {
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "lab-client", "-f"])
            .arg(dir.path().join("id"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        SshIdentity { dir }
    }
    fn public(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("id.pub"))
            .unwrap()
            .trim()
            .to_string()
    }
    fn key(&self) -> PathBuf {
        self.dir.path().join("id")
    }
    /// A known_hosts made from the VM's `host_ssh_keys`.
    fn known_hosts(&self, vm: &Value) -> PathBuf {
        let ip = vm_ip(vm);
        let mut lines = String::new();
        for k in vm["host_ssh_keys"].as_array().unwrap() {
            lines.push_str(&format!(
                "{ip} {} {}\n",
                k["key_type"].as_str().unwrap(),
                k["public_key"].as_str().unwrap()
            ));
        }
        let path = self.dir.path().join(format!("known_hosts-{}", vm["id"]));
        std::fs::write(&path, lines).unwrap();
        path
    }
    fn ssh_args(&self, known_hosts: &Path, user: &str, ip: &str) -> Vec<String> {
        vec![
            "-i".into(),
            self.key().display().to_string(),
            "-o".into(),
            "IdentitiesOnly=yes".into(),
            "-o".into(),
            "BatchMode=yes".into(),
            "-o".into(),
            "StrictHostKeyChecking=yes".into(),
            "-o".into(),
            format!("UserKnownHostsFile={}", known_hosts.display()),
            "-o".into(),
            "ConnectTimeout=5".into(),
            "-o".into(),
            "LogLevel=ERROR".into(),
            format!("{user}@{ip}"),
        ]
    }
    /// Runs `command` on the VM; (exit code, stdout, stderr).
    async fn ssh(&self, vm: &Value, known_hosts: &Path, command: &str) -> (i32, String, String) {
        let user = vm["image"]["default_username"]
            .as_str()
            .unwrap()
            .to_string();
        let mut cmd = tokio::process::Command::new("ssh");
        cmd.args(self.ssh_args(known_hosts, &user, &vm_ip(vm)))
            .arg(command)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
            .await
            .expect("ssh timed out")
            .expect("ssh runs");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    }
}

fn vm_ip(vm: &Value) -> String {
    vm["ip_assignments"][0]["ip"]
        .as_str()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string()
}

fn whoami() -> String {
    let out = std::process::Command::new("whoami").output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Alive and not a zombie.
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let rest = &stat[stat.rfind(')').unwrap() + 1..];
            !rest.trim_start().starts_with('Z')
        }
        Err(_) => false,
    }
}

async fn wait_dead(pid: u32, what: &str) {
    poll(Duration::from_secs(20), what, || async {
        (!alive(pid)).then_some(())
    })
    .await
}

async fn lab_vm(control: &Control, id: u64) -> Value {
    let (status, v) = control.get(&format!("/lab/lnvps/vm/{id}")).await;
    assert_eq!(status, 200, "{v}");
    v
}

#[tokio::test(flavor = "multi_thread")]
async fn catalogue_exchange_rate_and_payment_methods_are_public() {
    let _g = FAULTS.read().await;
    let world = world();
    let c = Client::new(world);

    let templates = c.public("/api/v1/vm/templates").await.data();
    let templates = templates["templates"].as_array().unwrap().clone();
    assert!(templates.len() >= 2);
    let currencies: Vec<&str> = templates
        .iter()
        .map(|t| t["cost_plan"]["currency"].as_str().unwrap())
        .collect();
    assert!(
        currencies.contains(&"BTC") && currencies.contains(&"EUR"),
        "{currencies:?}"
    );
    for t in &templates {
        for key in [
            "id",
            "name",
            "created",
            "cpu",
            "memory",
            "disk_size",
            "disk_type",
            "disk_interface",
            "region",
            "ip4_count",
            "ip6_count",
        ] {
            assert!(t.get(key).is_some(), "template lacks {key}: {t}");
        }
        assert_eq!(t["cost_plan"]["interval_type"], "month");
        assert!(t["expires"].is_null());
    }

    // Prices compared in sats through the exchange rate: the cheapest renews for under 2,000 sats.
    let rates = c.public("/api/v1/exchange-rate?base=BTC").await.data();
    let eur = rates
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["quote"] == "EUR")
        .expect("a BTC/EUR rate")["rate"]
        .as_f64()
        .unwrap();
    let sats = |t: &Value| -> f64 {
        let amount = t["cost_plan"]["amount"].as_f64().unwrap();
        match t["cost_plan"]["currency"].as_str().unwrap() {
            "BTC" => amount / 1000.0,
            "EUR" => amount / 100.0 / eur * 1e8,
            other => panic!("unexpected currency {other}"),
        }
    };
    let cheapest = templates.iter().map(sats).fold(f64::MAX, f64::min);
    assert!(cheapest < 2000.0, "cheapest template costs {cheapest} sats");
    let bad = c.public("/api/v1/exchange-rate?base=XYZ").await;
    assert_eq!(bad.status, 400);
    assert_eq!(bad.error(), "Invalid currency");

    let images = c.public("/api/v1/image").await.data();
    let images = images.as_array().unwrap();
    assert!(images.iter().any(|i| i["distribution"] == "debian"));
    for i in images {
        assert_eq!(i["default_username"], whoami());
    }
    let arch = images[0]["cpu_arch"].as_str().unwrap().to_string();
    let same = c.public(&format!("/api/v1/image?arch={arch}")).await.data();
    assert_eq!(same.as_array().unwrap().len(), images.len());
    let other = if arch == "x86_64" { "aarch64" } else { "amd64" };
    assert_eq!(
        c.public(&format!("/api/v1/image?arch={other}"))
            .await
            .data(),
        json!([])
    );
    assert_eq!(c.public("/api/v1/image?arch=sparc").await.status, 400);

    let methods = c.public("/api/v1/payment/methods").await.data();
    assert_eq!(methods[0]["name"], "lightning");

    // Unknown routes are plain 404s.
    assert_eq!(c.public("/api/v1/nothing-here").await.status, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn nip98_failures_answer_like_the_real_server() {
    let _g = FAULTS.read().await;
    let world = world();
    let c = Client::new(world);
    let path = "/api/v1/ssh-key";
    let url = format!("{}{path}", c.base);
    let get = |auth: Option<String>| {
        let c = &c;
        async move { c.send(Method::GET, path, auth, None, false).await }
    };
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<String>>();

    // Status and plain-text body, in the server's check order.
    let expect = |r: Reply, status: u16, text: &str| {
        assert_eq!(
            (r.status, r.text.as_str()),
            (status, text),
            "content-type {}",
            r.content_type
        );
        assert!(
            r.content_type.starts_with("text/plain"),
            "{}",
            r.content_type
        );
    };
    expect(get(None).await, 403, "Auth header not found");
    expect(
        get(Some("Basic Zm9vOmJhcg==".into())).await,
        403,
        "Auth scheme must be Nostr or Bearer",
    );
    expect(
        get(Some("Bearer abc.def.ghi".into())).await,
        401,
        "Invalid session: InvalidToken",
    );
    expect(
        get(Some("Nostr !!!not base64".into())).await,
        401,
        "Invalid auth: Invalid auth string",
    );
    let not_event = base64::engine::general_purpose::STANDARD.encode(b"{\"hello\":1}");
    expect(
        get(Some(format!("Nostr {not_event}"))).await,
        401,
        "Invalid auth: Invalid nostr event",
    );

    let ok_tags = || vec![s(&["u", &url]), s(&["method", "GET"])];
    let failed = |why: &str| format!("Auth check failed: {why}");
    expect(
        get(Some(c.header_with(ok_tags(), now(), Kind::TextNote))).await,
        401,
        &failed("Wrong event kind"),
    );
    expect(
        get(Some(c.header_with(ok_tags(), now() - 120, Kind::HttpAuth))).await,
        401,
        &failed("Created timestamp is out of range"),
    );
    expect(
        get(Some(c.header_with(ok_tags(), now() + 120, Kind::HttpAuth))).await,
        401,
        &failed("Created timestamp is out of range"),
    );
    expect(
        get(Some(c.header_with(
            vec![s(&["method", "GET"])],
            now(),
            Kind::HttpAuth,
        )))
        .await,
        401,
        &failed("Missing url tag"),
    );
    expect(
        get(Some(c.header_with(
            vec![s(&["u", "http://bad host/x"]), s(&["method", "GET"])],
            now(),
            Kind::HttpAuth,
        )))
        .await,
        401,
        &failed("Invalid U tag"),
    );
    expect(
        get(Some(c.header_with(
            vec![
                s(&["u", &format!("{}/api/v1/vm", c.base)]),
                s(&["method", "GET"]),
            ],
            now(),
            Kind::HttpAuth,
        )))
        .await,
        401,
        &failed("U tag does not match"),
    );
    expect(
        get(Some(c.header_with(
            vec![s(&["u", &url])],
            now(),
            Kind::HttpAuth,
        )))
        .await,
        401,
        &failed("Missing method tag"),
    );
    expect(
        get(Some(c.header_with(
            vec![s(&["u", &url]), s(&["method", "POST"])],
            now(),
            Kind::HttpAuth,
        )))
        .await,
        401,
        &failed("Method tag incorrect"),
    );
    expect(
        get(Some(c.header_with(
            vec![s(&["u", &url]), s(&["method", "get"])],
            now(),
            Kind::HttpAuth,
        )))
        .await,
        401,
        &failed("Method tag incorrect"),
    );
    // A tampered event: the id no longer matches its content.
    let good = c.header_with(ok_tags(), now(), Kind::HttpAuth);
    let raw = base64::engine::general_purpose::STANDARD
        .decode(good.trim_start_matches("Nostr "))
        .unwrap();
    let mut event: Value = serde_json::from_slice(&raw).unwrap();
    event["content"] = json!("tampered");
    let forged = format!(
        "Nostr {}",
        base64::engine::general_purpose::STANDARD.encode(event.to_string())
    );
    expect(
        get(Some(forged)).await,
        401,
        &failed("Event signature invalid"),
    );
    // Someone else's key over this event's id: a bad signature.
    let mut event: Value = serde_json::from_slice(&raw).unwrap();
    event["pubkey"] = json!(Keys::generate().public_key().to_hex());
    let forged = format!(
        "Nostr {}",
        base64::engine::general_purpose::STANDARD.encode(event.to_string())
    );
    expect(
        get(Some(forged)).await,
        401,
        &failed("Event signature invalid"),
    );

    // The forgeries did not burn the real event: it works once, then it is a replay.
    let first = get(Some(good.clone())).await;
    assert_eq!(first.status, 200, "{}", first.text);
    assert_eq!(first.data(), json!([]));
    expect(
        get(Some(good)).await,
        401,
        &failed("Credential has already been used"),
    );

    // Only the path counts: another scheme, host and query in `u` pass.
    let elsewhere = c.header_with(
        vec![
            s(&["u", "https://lnvps.example/api/v1/ssh-key?x=1"]),
            s(&["method", "GET"]),
        ],
        now(),
        Kind::HttpAuth,
    );
    assert_eq!(get(Some(elsewhere)).await.status, 200);
    // Within the window on either side.
    assert_eq!(
        get(Some(c.header_with(ok_tags(), now() - 50, Kind::HttpAuth)))
            .await
            .status,
        200
    );
    assert_eq!(
        get(Some(c.header_with(ok_tags(), now() + 50, Kind::HttpAuth)))
            .await
            .status,
        200
    );

    // rust-nostr's own NIP-98 header is accepted.
    let header = nostr::nips::nip98::HttpData::new(
        nostr::Url::from_str(&url).unwrap(),
        nostr::nips::nip98::HttpMethod::GET,
    )
    .to_authorization(&Keys::generate())
    .await
    .unwrap();
    assert_eq!(get(Some(header)).await.status, 200);
    // The same tags signed twice within one second are the same event: the second is a replay.
    let at = now() - 5;
    let once = c.header_with(
        vec![s(&["u", &url]), s(&["method", "GET"]), s(&["x", "1"])],
        at,
        Kind::HttpAuth,
    );
    let twice = c.header_with(
        vec![s(&["u", &url]), s(&["method", "GET"]), s(&["x", "1"])],
        at,
        Kind::HttpAuth,
    );
    assert_eq!(get(Some(once)).await.status, 200);
    expect(
        get(Some(twice)).await,
        401,
        &failed("Credential has already been used"),
    );

    // The payload tag, when present, binds the body (compared case-insensitively); without one any body goes.
    let body = serde_json::to_vec(&json!({"name": "k", "key_data": "nope"})).unwrap();
    let other = serde_json::to_vec(&json!({"name": "k", "key_data": "other"})).unwrap();
    let bound = c.header("POST", &url, Some(&body));
    let r = c
        .send(Method::POST, path, Some(bound), Some(other.clone()), true)
        .await;
    expect(r, 401, &failed("Payload tag does not match request body"));
    let upper = c.header_with(
        vec![
            s(&["u", &url]),
            s(&["method", "POST"]),
            s(&[
                "payload",
                &hex::encode(Sha256::digest(&body)).to_uppercase(),
            ]),
        ],
        now(),
        Kind::HttpAuth,
    );
    let r = c
        .send(Method::POST, path, Some(upper), Some(body.clone()), true)
        .await;
    assert_eq!(
        (r.status, r.error()),
        (400, "Invalid SSH public key format".to_string())
    );
    // Bodies of NIP-98 requests are hashed; more than 2 MiB is refused before anything else.
    let huge = vec![b' '; 2 * 1024 * 1024 + 1];
    let r = c
        .send(
            Method::POST,
            path,
            Some(c.header("POST", &url, None)),
            Some(huge),
            true,
        )
        .await;
    assert_eq!((r.status, r.text.as_str()), (413, "Request body too large"));
    let unbound = c.header("POST", &url, None);
    let r = c
        .send(Method::POST, path, Some(unbound), Some(other), true)
        .await;
    assert_eq!(r.status, 400, "{}", r.text);
}

#[tokio::test(flavor = "multi_thread")]
async fn account_and_ssh_keys() {
    let _g = FAULTS.read().await;
    let world = world();
    let c = Client::new(world);
    let other = Client::new(world);

    // The account exists on first contact.
    let account = c.call(Method::GET, "/api/v1/account", None).await.data();
    assert_eq!(account["contact_nip17"], false);
    assert_eq!(account["account_type"], "nostr");
    assert!(account["email"].is_null());

    // The two contact flags are required: axum's 422, as plain text.
    let r = c
        .call(Method::PATCH, "/api/v1/account", Some(json!({"name": "x"})))
        .await;
    assert_eq!(r.status, 422, "{}", r.text);
    assert!(r.content_type.starts_with("text/plain"));
    // Bad JSON is a plain-text 400; no JSON content type is a 415.
    let url = format!("{}/api/v1/account", c.base);
    let bad = b"{not json".to_vec();
    let r = c
        .send(
            Method::PATCH,
            "/api/v1/account",
            Some(c.header("PATCH", &url, Some(&bad))),
            Some(bad),
            true,
        )
        .await;
    assert_eq!(r.status, 400);
    assert!(r.content_type.starts_with("text/plain"));
    let body = b"{}".to_vec();
    let r = c
        .send(
            Method::PATCH,
            "/api/v1/account",
            Some(c.header("PATCH", &url, Some(&body))),
            Some(body),
            false,
        )
        .await;
    assert_eq!(r.status, 415);

    let r = c
        .call(
            Method::PATCH,
            "/api/v1/account",
            Some(json!({"contact_nip17": true, "contact_email": false, "name": "Lab", "city": "Zug", "country_code": "che"})),
        )
        .await;
    assert_eq!(r.data(), json!({}));
    let account = c.call(Method::GET, "/api/v1/account", None).await.data();
    assert_eq!(
        (account["name"].clone(), account["city"].clone()),
        (json!("Lab"), json!("Zug"))
    );
    assert_eq!(account["country_code"], "CHE");
    assert_eq!(account["contact_nip17"], true);
    // Absent keeps, null clears.
    c.call(
        Method::PATCH,
        "/api/v1/account",
        Some(json!({"contact_nip17": true, "contact_email": false, "city": null})),
    )
    .await
    .data();
    let account = c.call(Method::GET, "/api/v1/account", None).await.data();
    assert_eq!(account["name"], "Lab");
    assert!(account["city"].is_null());

    // SSH keys.
    let bad = c
        .call(
            Method::POST,
            "/api/v1/ssh-key",
            Some(json!({"name": "x", "key_data": "ssh-ed25519 AAAA"})),
        )
        .await;
    assert_eq!(
        (bad.status, bad.error()),
        (400, "Invalid SSH public key format".to_string())
    );
    let id = SshIdentity::new();
    let key = c
        .call(
            Method::POST,
            "/api/v1/ssh-key",
            Some(json!({"name": "", "key_data": id.public()})),
        )
        .await
        .data();
    assert_eq!(
        key["name"], "lab-client",
        "an empty name takes the key comment"
    );
    assert_eq!(key["vms"], json!([]));
    let listed = c.call(Method::GET, "/api/v1/ssh-key", None).await.data();
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert_eq!(
        other
            .call(Method::GET, "/api/v1/ssh-key", None)
            .await
            .data(),
        json!([])
    );

    let key_id = key["id"].as_u64().unwrap();
    let r = other
        .call(Method::DELETE, &format!("/api/v1/ssh-key/{key_id}"), None)
        .await;
    assert_eq!(r.status, 403, "{}", r.text);
    let r = c.call(Method::DELETE, "/api/v1/ssh-key/999999", None).await;
    assert_eq!(
        (r.status, r.error()),
        (404, "Resource not found".to_string())
    );
    let r = c.call(Method::DELETE, "/api/v1/ssh-key/abc", None).await;
    assert_eq!(r.status, 400);
    assert!(r.content_type.starts_with("text/plain"));
    assert!(c
        .call(Method::DELETE, &format!("/api/v1/ssh-key/{key_id}"), None)
        .await
        .data()
        .is_null());
    assert_eq!(
        c.call(Method::GET, "/api/v1/ssh-key", None).await.data(),
        json!([])
    );
}

/// Create → renew invoice → paid by the creator → running → SSH (strict host keys) → stop kills its processes →
/// start → restart → the expiry loop stops it → renewed again → LNURL top-up → re-install → deleted.
#[tokio::test(flavor = "multi_thread")]
async fn a_paid_vm_is_a_machine_you_can_ssh_into() {
    let _g = FAULTS.read().await;
    let world = world();
    let control = Control::new(world);
    let c = Client::new(world);
    let stranger = Client::new(world);
    let id = SshIdentity::new();
    let key_id = c.add_key(&id.public()).await;

    let vm = c.create_vm(key_id).await;
    let vm_id = vm["id"].as_u64().unwrap();
    assert!(vm["expires"].is_null());
    assert!(vm["deleting_on"].is_null());
    assert_eq!(vm["status"]["state"], "unknown");
    assert_eq!(vm["image"]["default_username"], whoami());
    assert_eq!(vm["ssh_key"]["id"], key_id);
    assert_eq!(vm["host_ssh_keys"][0]["key_type"], "ssh-ed25519");
    assert!(vm["host_ssh_keys"][0]["fingerprint_sha256"]
        .as_str()
        .unwrap()
        .starts_with("SHA256:"));
    let ip = vm_ip(&vm);
    assert!(ip.starts_with("127.0.0.") && ip != "127.0.0.1", "{ip}");
    let listed = c.call(Method::GET, "/api/v1/vm", None).await.data();
    assert_eq!(listed.as_array().unwrap().len(), 1);

    // A key in use cannot be deleted.
    let r = c
        .call(Method::DELETE, &format!("/api/v1/ssh-key/{key_id}"), None)
        .await;
    assert_eq!(
        (r.status, r.error()),
        (400, "SSH key is in use by a VM".to_string())
    );
    // Ownership.
    let r = stranger
        .call(Method::GET, &format!("/api/v1/vm/{vm_id}"), None)
        .await;
    assert_eq!(
        (r.status, r.error()),
        (403, "VM does not belong to you".to_string())
    );
    let r = c.call(Method::GET, "/api/v1/vm/999999", None).await;
    assert_eq!(
        (r.status, r.error()),
        (404, "Resource not found".to_string())
    );
    let r = stranger
        .call(Method::GET, &format!("/api/v1/vm/{vm_id}/renew"), None)
        .await;
    assert_eq!(r.status, 403);
    // Not paid yet: no machine to start, nothing to re-install.
    let r = c
        .call(Method::PATCH, &format!("/api/v1/vm/{vm_id}/start"), None)
        .await;
    assert_eq!(r.status, 400, "{}", r.text);
    let r = c
        .call(
            Method::PATCH,
            &format!("/api/v1/vm/{vm_id}/re-install"),
            None,
        )
        .await;
    assert_eq!(
        (r.status, r.error()),
        (
            402,
            "Cannot re-install an expired VM, please renew it first".to_string()
        )
    );

    // A quote creates nothing.
    let quote = c
        .call(
            Method::GET,
            &format!("/api/v1/vm/{vm_id}/renew/quote?intervals=2"),
            None,
        )
        .await
        .data();
    assert_eq!(quote["currency"], "BTC");
    assert_eq!(quote["amount"], 3_000_000);
    let month = world.lnvps().settings().month_secs;
    assert_eq!(quote["time"], 2 * month);
    let payments = c
        .call(Method::GET, &format!("/api/v1/vm/{vm_id}/payments"), None)
        .await;
    assert_eq!(payments.json()["total"], 0);

    // The renew invoice: the merchant's, hash = id, amount = amount + tax in whole sats, 600 s.
    let payment = c
        .call(Method::GET, &format!("/api/v1/vm/{vm_id}/renew"), None)
        .await
        .data();
    assert_eq!(payment["is_paid"], false);
    assert!(payment.get("paid_at").is_none());
    assert_eq!(payment["currency"], "BTC");
    assert_eq!(payment["is_upgrade"], false);
    assert_eq!(payment["time"], month);
    let invoice =
        lightning_invoice::Bolt11Invoice::from_str(payment["data"]["lightning"].as_str().unwrap())
            .unwrap();
    assert_eq!(
        invoice.payment_hash().to_string(),
        payment["id"].as_str().unwrap()
    );
    assert_eq!(
        invoice.amount_milli_satoshis().unwrap(),
        payment["amount"].as_u64().unwrap() + payment["tax"].as_u64().unwrap()
    );
    assert_eq!(invoice.expiry_time(), Duration::from_secs(600));
    let merchant = &world.lab_json().nodes["merchant"].node_id;
    assert_eq!(&invoice.recover_payee_pub_key().to_string(), merchant);
    let r = c.call(Method::GET, "/api/v1/payment/not-hex", None).await;
    assert_eq!(
        (r.status, r.error()),
        (400, "Invalid payment id".to_string())
    );
    let r = stranger
        .call(
            Method::GET,
            &format!("/api/v1/payment/{}", payment["id"].as_str().unwrap()),
            None,
        )
        .await;
    assert_eq!(
        (r.status, r.error()),
        (403, "Payment does not belong to you".to_string())
    );
    let r = c
        .call(
            Method::GET,
            &format!("/api/v1/payment/{}", "ab".repeat(32)),
            None,
        )
        .await;
    assert_eq!(
        (r.status, r.error()),
        (404, "Resource not found".to_string())
    );

    let before = Utc::now();
    control
        .ok(
            "/lab/creator/pay",
            json!({ "bolt11": payment["data"]["lightning"] }),
        )
        .await;
    let pid = payment["id"].as_str().unwrap();
    let paid = poll(Duration::from_secs(30), "is_paid", || async {
        let p = c
            .call(Method::GET, &format!("/api/v1/payment/{pid}"), None)
            .await
            .data();
        (p["is_paid"] == true).then_some(p)
    })
    .await;
    assert!(ts(&paid["paid_at"]) >= before - chrono::Duration::seconds(1));
    let vm = c.wait_state(vm_id, "running").await;
    let expires = ts(&vm["expires"]);
    let expected = before + chrono::Duration::seconds(month as i64);
    assert!(
        (expires - expected).num_seconds().abs() <= 10,
        "expires {expires}, expected ≈ {expected}"
    );
    assert!(ts(&vm["deleting_on"]) > expires);

    // SSH in as the image's default user, host key pinned from the API.
    let known_hosts = id.known_hosts(&vm);
    let summary = lab_vm(&control, vm_id).await;
    assert_eq!(
        summary["owner_pubkey"],
        c.pubkey(),
        "the user is the event's key"
    );
    let home = summary["home"].as_str().unwrap().to_string();
    let (code, out, err) = id
        .ssh(
            &vm,
            &known_hosts,
            "whoami; echo \"$HOME\"; echo \"$AUTOMATON_SUPERVISOR\"; pwd",
        )
        .await;
    assert_eq!(code, 0, "ssh failed: {err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        vec![whoami().as_str(), home.as_str(), "pidfile", home.as_str()],
        "{out}"
    );
    // Files land in the VM's home over SFTP (scp).
    let local = id.dir.path().join("hello.txt");
    std::fs::write(&local, "hello VM\n").unwrap();
    let user = vm["image"]["default_username"].as_str().unwrap();
    let mut scp_args = id.ssh_args(&known_hosts, user, &ip);
    let target = format!("{}:hello.txt", scp_args.pop().unwrap());
    let scp = tokio::process::Command::new("scp")
        .args(&scp_args)
        .arg(&local)
        .arg(&target)
        .output()
        .await
        .unwrap();
    assert!(
        scp.status.success(),
        "{}",
        String::from_utf8_lossy(&scp.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(Path::new(&home).join("hello.txt")).unwrap(),
        "hello VM\n"
    );
    // A host key the API did not report is refused.
    let wrong = id.dir.path().join("wrong_known_hosts");
    std::fs::write(&wrong, format!("{ip} ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPPwF2Oob18mTOudLjiJ00REIcI781xZ3NRLqiebcAHO\n")).unwrap();
    let (code, _, err) = id.ssh(&vm, &wrong, "true").await;
    assert_ne!(code, 0);
    assert!(
        err.contains("HOST IDENTIFICATION HAS CHANGED") || err.contains("verification failed"),
        "{err}"
    );

    // A detached process started over SSH dies when the VM stops, and so does the sshd.
    let (code, out, err) = id
        .ssh(
            &vm,
            &known_hosts,
            "setsid sleep 600 > /dev/null 2>&1 < /dev/null & echo $!",
        )
        .await;
    assert_eq!(code, 0, "{err}");
    let sleeper: u32 = out.trim().parse().unwrap();
    assert!(alive(sleeper));
    let sshd_pid = lab_vm(&control, vm_id).await["sshd_pid"].as_u64().unwrap() as u32;
    assert!(alive(sshd_pid));
    assert!(c
        .call(Method::PATCH, &format!("/api/v1/vm/{vm_id}/stop"), None)
        .await
        .data()
        .is_null());
    c.wait_state(vm_id, "stopped").await;
    wait_dead(sleeper, "the VM's detached process dies on stop").await;
    wait_dead(sshd_pid, "the VM's sshd dies on stop").await;
    let (code, _, _) = id.ssh(&vm, &known_hosts, "true").await;
    assert_ne!(code, 0, "a stopped VM refuses connections");

    // Start again: same address, same host key.
    c.call(Method::PATCH, &format!("/api/v1/vm/{vm_id}/start"), None)
        .await
        .data();
    let vm = c.wait_state(vm_id, "running").await;
    assert_eq!(vm_ip(&vm), ip);
    let (code, out, err) = id.ssh(&vm, &known_hosts, "cat hello.txt").await;
    assert_eq!((code, out.as_str()), (0, "hello VM\n"), "{err}");

    // Restart is a hard reset: a new sshd.
    let sshd_before = lab_vm(&control, vm_id).await["sshd_pid"].as_u64().unwrap();
    c.call(Method::PATCH, &format!("/api/v1/vm/{vm_id}/restart"), None)
        .await
        .data();
    poll(
        Duration::from_secs(30),
        "a new sshd after restart",
        || async {
            let v = lab_vm(&control, vm_id).await;
            (v["state"] == "running" && v["sshd_pid"].as_u64().is_some_and(|p| p != sshd_before))
                .then_some(())
        },
    )
    .await;
    assert_eq!(id.ssh(&vm, &known_hosts, "true").await.0, 0);

    // PATCH: auto-renewal, reverse DNS; someone else's key is refused.
    let r = c
        .call(
            Method::PATCH,
            &format!("/api/v1/vm/{vm_id}"),
            Some(json!({"auto_renewal_enabled": true, "reverse_dns": "vm.lab.example"})),
        )
        .await;
    assert!(r.data().is_null());
    let vm = c.vm(vm_id).await;
    assert_eq!(vm["auto_renewal_enabled"], true);
    assert_eq!(vm["ip_assignments"][0]["reverse_dns"], "vm.lab.example");
    let stranger_key = stranger.add_key(&SshIdentity::new().public()).await;
    let r = c
        .call(
            Method::PATCH,
            &format!("/api/v1/vm/{vm_id}"),
            Some(json!({"ssh_key_id": stranger_key})),
        )
        .await;
    assert_eq!(
        (r.status, r.error()),
        (403, "SSH key doesnt belong to you".to_string())
    );

    // The background expiry loop stops the VM at expiry, once; deleting_on follows the grace table.
    let summary = control
        .ok(
            &format!("/lab/lnvps/vm/{vm_id}"),
            json!({"expires_in_secs": 2}),
        )
        .await;
    assert!(summary["expires"].is_string());
    let (code, out, _) = id
        .ssh(
            &vm,
            &known_hosts,
            "setsid sleep 600 > /dev/null 2>&1 < /dev/null & echo $!",
        )
        .await;
    assert_eq!(code, 0);
    let sleeper: u32 = out.trim().parse().unwrap();
    let vm = c.wait_state(vm_id, "stopped").await;
    wait_dead(sleeper, "processes die when the VM expires").await;
    let expires = ts(&vm["expires"]);
    let grace = (ts(&vm["deleting_on"]) - expires).num_seconds();
    let day = (month / 30) as i64;
    assert!(grace >= day && grace <= 30 * day, "grace {grace} s");
    let r = c
        .call(
            Method::PATCH,
            &format!("/api/v1/vm/{vm_id}/re-install"),
            None,
        )
        .await;
    assert_eq!(r.status, 402);

    // Paying again brings it back, extended from now.
    let before = Utc::now();
    c.renew_and_pay(&control, vm_id).await;
    let vm = c.wait_state(vm_id, "running").await;
    let expires = ts(&vm["expires"]);
    assert!(
        expires >= before + chrono::Duration::seconds(month as i64 - 5),
        "{expires}"
    );
    assert_eq!(id.ssh(&vm, &known_hosts, "true").await.0, 0);

    // LNURL top-up: anyone may pay, no auth; the paid time extends the expiry.
    let lnurlp = c.public(&format!("/.well-known/lnurlp/{vm_id}")).await;
    assert_eq!(lnurlp.status, 200);
    let pay = lnurlp.json();
    assert_eq!(pay["tag"], "payRequest");
    assert_eq!(pay["minSendable"], 100_000);
    assert_eq!(pay["maxSendable"], 1_000_000_000);
    assert_eq!(
        pay["metadata"],
        format!("[[\"text/plain\",\"Extend VM {vm_id}\"]]")
    );
    assert_eq!(
        pay["callback"],
        format!("{}/api/v1/vm/{vm_id}/renew-lnurlp", c.base)
    );
    let low = c
        .public(&format!("/api/v1/vm/{vm_id}/renew-lnurlp?amount=999"))
        .await
        .json();
    assert_eq!(
        low,
        json!({"status": "ERROR", "reason": "Amount must be greater than 1000"})
    );
    let callback = c
        .public(&format!("/api/v1/vm/{vm_id}/renew-lnurlp?amount=300000"))
        .await
        .json();
    let pr = lightning_invoice::Bolt11Invoice::from_str(callback["pr"].as_str().unwrap()).unwrap();
    assert_eq!(callback["routes"], json!([]));
    assert_eq!(pr.amount_milli_satoshis(), Some(300_000));
    let metadata_hash = Sha256::digest(pay["metadata"].as_str().unwrap().as_bytes());
    match pr.description() {
        lightning_invoice::Bolt11InvoiceDescriptionRef::Hash(h) => {
            assert_eq!(AsRef::<[u8]>::as_ref(&h.0), metadata_hash.as_slice())
        }
        other => panic!("expected a description hash, got {other:?}"),
    }
    let before_topup = ts(&c.vm(vm_id).await["expires"]);
    let lnurl_target = format!("{}/.well-known/lnurlp/{vm_id}", c.base);
    control
        .ok(
            "/lab/creator/pay-lnurl",
            json!({"target": lnurl_target, "sats": 300}),
        )
        .await;
    // 300 sats of a 1,500-sat month buy a fifth of it.
    let added = (month * 300 / 1500) as i64;
    let vm = poll(
        Duration::from_secs(30),
        "top-up extends the expiry",
        || async {
            let vm = c.vm(vm_id).await;
            (ts(&vm["expires"]) > before_topup).then_some(vm)
        },
    )
    .await;
    assert_eq!((ts(&vm["expires"]) - before_topup).num_seconds(), added);
    let history = c
        .call(
            Method::GET,
            &format!("/api/v1/vm/{vm_id}/payments?limit=2"),
            None,
        )
        .await
        .json();
    assert!(history["total"].as_u64().unwrap() >= 3, "{history}");
    assert_eq!(history["limit"], 2);
    assert_eq!(history["data"].as_array().unwrap().len(), 2);
    let total = history["total"].as_u64().unwrap();
    let rest = c
        .call(
            Method::GET,
            &format!("/api/v1/vm/{vm_id}/payments?offset=2&limit=500"),
            None,
        )
        .await
        .json();
    assert_eq!(rest["limit"], 100, "limit is capped at 100");
    assert_eq!(rest["offset"], 2);
    assert_eq!(rest["data"].as_array().unwrap().len() as u64, total - 2);
    // Newest first: the top-up is the latest payment, and it is paid.
    assert_eq!(history["data"][0]["is_paid"], true);
    assert_eq!(history["data"][0]["amount"], 300_000);

    // Re-install: a fresh home and a new host key (the old known_hosts is now wrong).
    let r = c
        .call(
            Method::PATCH,
            &format!("/api/v1/vm/{vm_id}/re-install"),
            Some(json!({"image_id": 3})),
        )
        .await;
    assert_eq!(
        (r.status, r.error()),
        (403, "OS image is not available".to_string())
    );
    let old_key = vm["host_ssh_keys"][0]["public_key"].clone();
    c.call(
        Method::PATCH,
        &format!("/api/v1/vm/{vm_id}/re-install"),
        Some(json!({"image_id": 2})),
    )
    .await
    .data();
    let vm = poll(
        Duration::from_secs(30),
        "re-installed and running",
        || async {
            let vm = c.vm(vm_id).await;
            (vm["host_ssh_keys"][0]["public_key"] != old_key && vm["status"]["state"] == "running")
                .then_some(vm)
        },
    )
    .await;
    assert_eq!(vm["image"]["distribution"], "ubuntu");
    assert_ne!(
        id.ssh(&vm, &known_hosts, "true").await.0,
        0,
        "the old host key no longer matches"
    );
    let known_hosts = id.known_hosts(&vm);
    let (code, out, _) = id.ssh(&vm, &known_hosts, "ls").await;
    assert_eq!((code, out.as_str()), (0, ""), "a fresh home");

    // Past its grace the VM is deleted: 404 `VM not found`, the LNURL says so, the machine is gone.
    let sshd_pid = lab_vm(&control, vm_id).await["sshd_pid"].as_u64().unwrap() as u32;
    control
        .ok(
            &format!("/lab/lnvps/vm/{vm_id}"),
            json!({"expires_in_secs": -10_000_000}),
        )
        .await;
    let r = poll(Duration::from_secs(30), "VM deleted", || async {
        let r = c
            .call(Method::GET, &format!("/api/v1/vm/{vm_id}"), None)
            .await;
        (r.status == 404).then_some(r)
    })
    .await;
    assert_eq!(r.error(), "VM not found");
    wait_dead(sshd_pid, "a deleted VM's sshd").await;
    // The machine's directory goes right after its sshd is stopped.
    poll(Duration::from_secs(10), "the VM's home removed", || async {
        (!Path::new(&home).exists()).then_some(())
    })
    .await;
    let r = c.public(&format!("/.well-known/lnurlp/{vm_id}")).await;
    assert_eq!((r.status, r.text.as_str()), (200, "VM not found"));
    let r = c
        .public(&format!("/api/v1/vm/{vm_id}/renew-lnurlp?amount=300000"))
        .await
        .json();
    assert_eq!(r, json!({"status": "ERROR", "reason": "VM not found"}));
    assert_eq!(
        c.call(Method::GET, "/api/v1/vm", None).await.data(),
        json!([])
    );
    // A deleted VM's key is free to delete.
    assert!(c
        .call(Method::DELETE, &format!("/api/v1/ssh-key/{key_id}"), None)
        .await
        .data()
        .is_null());
}

#[tokio::test(flavor = "multi_thread")]
async fn renewal_rules_and_upgrades() {
    let _g = FAULTS.read().await;
    let world = world();
    let control = Control::new(world);
    let c = Client::new(world);
    let id = SshIdentity::new();
    let key_id = c.add_key(&id.public()).await;
    let vm = c.create_vm(key_id).await;
    let vm_id = vm["id"].as_u64().unwrap();
    let renew = |q: &str| format!("/api/v1/vm/{vm_id}/renew{q}");

    for q in ["?intervals=0", "?intervals=121"] {
        let r = c.call(Method::GET, &renew(q), None).await;
        assert_eq!(
            (r.status, r.error()),
            (400, "intervals must be between 1 and 120".to_string()),
            "{q}"
        );
    }
    // 13 lab months is past the 365-day prepay limit.
    let r = c.call(Method::GET, &renew("?intervals=13"), None).await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert!(r.error().contains("prepay"), "{}", r.error());
    let r = c
        .call(Method::GET, &renew("/quote?intervals=13"), None)
        .await;
    assert_eq!(r.status, 400);
    let r = c.call(Method::GET, &renew("?method=nwc"), None).await;
    assert_eq!(
        (r.status, r.error()),
        (400, "No NWC payment method configured".to_string())
    );
    let r = c.call(Method::GET, &renew("?method=onchain"), None).await;
    assert_eq!(r.status, 400);
    let r = c.call(Method::GET, &renew("?code=FREE"), None).await;
    assert_eq!(
        r.status, 400,
        "a code that cannot be used fails the request"
    );
    let r = c.call(Method::GET, &renew("?intervals=x"), None).await;
    assert_eq!(r.status, 400);
    assert!(r.content_type.starts_with("text/plain"));

    // Upgrades need a paid VM.
    let r = c
        .call(
            Method::POST,
            &format!("/api/v1/vm/{vm_id}/upgrade/quote"),
            Some(json!({"cpu": 2})),
        )
        .await;
    assert_eq!(r.status, 400);
    c.renew_and_pay(&control, vm_id).await;
    let vm = c.wait_state(vm_id, "running").await;
    let (cpu, memory) = (
        vm["template"]["cpu"].as_u64().unwrap(),
        vm["template"]["memory"].as_u64().unwrap(),
    );

    // The host's sunset date caps renewals.
    let summary = control
        .ok(
            &format!("/lab/lnvps/vm/{vm_id}"),
            json!({"host_sunset_in_secs": 60}),
        )
        .await;
    assert!(summary["deleted"] == false);
    let vm_now = c.vm(vm_id).await;
    assert!(vm_now["host_sunset_date"].is_string());
    let r = c.call(Method::GET, &renew(""), None).await;
    assert_eq!(r.status, 400);
    assert!(r.error().contains("sunset"), "{}", r.error());
    control
        .ok(
            &format!("/lab/lnvps/vm/{vm_id}"),
            json!({"host_sunset_in_secs": null}),
        )
        .await;
    assert!(c.vm(vm_id).await.get("host_sunset_date").is_none());

    for body in [
        json!({}),
        json!({"cpu": cpu}),
        json!({"cpu": cpu + 1, "memory": memory - 1}),
    ] {
        let r = c
            .call(
                Method::POST,
                &format!("/api/v1/vm/{vm_id}/upgrade/quote"),
                Some(body.clone()),
            )
            .await;
        assert_eq!(r.status, 400, "{body}: {}", r.text);
    }
    let quote = c
        .call(
            Method::POST,
            &format!("/api/v1/vm/{vm_id}/upgrade/quote"),
            Some(json!({"cpu": cpu + 1})),
        )
        .await
        .data();
    assert_eq!(quote["new_renewal_cost"]["currency"], "BTC");
    assert_eq!(quote["new_renewal_cost"]["amount"], 1_500_000 + 500_000);
    let difference = quote["cost_difference"]["amount"].as_u64().unwrap();
    assert!(difference > 0 && difference <= 500_000, "{quote}");
    let sshd_before = lab_vm(&control, vm_id).await["sshd_pid"].as_u64().unwrap();
    let payment = c
        .call(
            Method::POST,
            &format!("/api/v1/vm/{vm_id}/upgrade?method=lightning"),
            Some(json!({"cpu": cpu + 1})),
        )
        .await
        .data();
    assert_eq!(payment["is_upgrade"], true);
    assert_eq!(payment["time"], 0);
    assert!(payment["upgrade_params"]
        .as_str()
        .unwrap()
        .contains("\"cpu\""));
    control
        .ok(
            "/lab/creator/pay",
            json!({ "bolt11": payment["data"]["lightning"] }),
        )
        .await;
    let vm = poll(
        Duration::from_secs(30),
        "upgrade applied, VM restarted",
        || async {
            let vm = c.vm(vm_id).await;
            let restarted = lab_vm(&control, vm_id).await["sshd_pid"]
                .as_u64()
                .is_some_and(|p| p != sshd_before);
            (vm["template"]["cpu"] == cpu + 1 && vm["status"]["state"] == "running" && restarted)
                .then_some(vm)
        },
    )
    .await;
    // Later renewals cost the upgraded price.
    let quote = c.call(Method::GET, &renew("/quote"), None).await.data();
    assert_eq!(quote["amount"], 2_000_000);
    assert_eq!(
        vm["expires"],
        c.vm(vm_id).await["expires"],
        "an upgrade adds no time"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn unpaid_orders_are_reaped() {
    let _g = FAULTS.read().await;
    let world = world();
    let c = Client::new(world);
    let id = SshIdentity::new();
    let key_id = c.add_key(&id.public()).await;
    let vm = c.create_vm(key_id).await;
    let vm_id = vm["id"].as_u64().unwrap();
    let created = Instant::now();
    let r = poll(
        Duration::from_secs(UNPAID_SECS + 30),
        "unpaid order reaped",
        || async {
            let r = c
                .call(Method::GET, &format!("/api/v1/vm/{vm_id}"), None)
                .await;
            (r.status == 404).then_some(r)
        },
    )
    .await;
    assert!(created.elapsed() >= Duration::from_secs(UNPAID_SECS - 2));
    assert_eq!(r.error(), "VM not found");
    assert_eq!(
        c.call(Method::GET, "/api/v1/vm", None).await.data(),
        json!([])
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn injected_faults() {
    let _g = FAULTS.write().await;
    let world = world();
    let control = Control::new(world);
    let c = Client::new(world);

    let set = |body: Value| {
        let control = &control;
        async move { control.ok("/lab/lnvps/faults", body).await }
    };
    set(json!({"error_status": 429, "error_count": 1})).await;
    let r = c.public("/api/v1/vm/templates").await;
    assert_eq!(r.status, 429);
    assert!(r.headers.get("retry-after").is_some());
    assert_eq!(c.public("/api/v1/vm/templates").await.status, 200);

    set(json!({"error_status": 503, "error_count": 1})).await;
    let r = c.call(Method::GET, "/api/v1/vm", None).await;
    assert_eq!(
        (r.status, r.error()),
        (503, "An internal error occurred".to_string())
    );

    set(json!({"delay_ms": 700, "delay_count": 1})).await;
    let started = Instant::now();
    assert_eq!(c.public("/api/v1/image").await.status, 200);
    assert!(started.elapsed() >= Duration::from_millis(700));

    set(json!({"drop_count": 1})).await;
    let dropped = reqwest::get(format!("{}/api/v1/image", c.base)).await;
    let broken = match dropped {
        Err(_) => true,
        Ok(resp) => resp.bytes().await.is_err(),
    };
    assert!(broken, "the dropped response must not arrive whole");
    assert_eq!(c.public("/api/v1/image").await.status, 200);

    let (status, bad) = control
        .post("/lab/lnvps/faults", json!({"error_status": 200}))
        .await;
    assert_eq!(status, 400, "{bad}");
    let (status, faults) = control.get("/lab/lnvps/faults").await;
    assert_eq!(status, 200);
    assert_eq!(faults["error_count"], 0);
}

/// `automaton-lab up` killed outright (SIGKILL): its VMs' sshd and everything started through them die too.
#[tokio::test(flavor = "multi_thread")]
async fn a_killed_lab_takes_its_vms_processes_with_it() {
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_automaton-lab"));
    command
        .args(["up", "--dir"])
        .arg(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: prctl is async-signal-safe and only affects the child being spawned.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
    }
    let mut up = KillOnDrop(command.spawn().unwrap());
    let lab_json = dir.path().join("lab.json");
    let lab = poll(Duration::from_secs(180), "lab.json from up", || async {
        automaton_lab::world::LabJson::read(&lab_json).ok()
    })
    .await;
    let control = Control {
        url: lab.control_url.clone(),
        http: reqwest::Client::new(),
    };
    let c = Client {
        keys: Keys::generate(),
        base: lab.lnvps_url.clone().expect("lnvps_url"),
        http: reqwest::Client::new(),
    };
    let id = SshIdentity::new();
    let key_id = c.add_key(&id.public()).await;
    let vm = c.create_vm(key_id).await;
    let vm_id = vm["id"].as_u64().unwrap();
    c.renew_and_pay(&control, vm_id).await;
    let vm = c.wait_state(vm_id, "running").await;
    let known_hosts = id.known_hosts(&vm);
    let (code, out, err) = id
        .ssh(
            &vm,
            &known_hosts,
            "setsid sleep 600 > /dev/null 2>&1 < /dev/null & echo $!",
        )
        .await;
    assert_eq!(code, 0, "{err}");
    let sleeper: u32 = out.trim().parse().unwrap();
    let sshd = lab_vm(&control, vm_id).await["sshd_pid"].as_u64().unwrap() as u32;
    assert!(alive(sleeper) && alive(sshd));

    // SAFETY: SIGKILL to our own child by its pid.
    unsafe {
        libc::kill(up.0.id() as i32, libc::SIGKILL);
    }
    let _ = up.0.wait();
    wait_dead(sleeper, "a VM's process after the lab was killed").await;
    wait_dead(sshd, "a VM's sshd after the lab was killed").await;
}
