//! The Conway double driven over HTTP as the Conway client drives Conway Cloud: raw-key auth, prepaid sandboxes
//! with credits, exec (exit codes, timeouts that kill the process group, Idempotency-Key), files, exposed ports,
//! credit transfers on the singular/plural paths, and the fault modes the client's retry rules are built for.

mod common;

use std::time::{Duration, Instant};

use automaton_lab::conway::Conway;
use automaton_lab::world::{self, World};
use common::{poll, Control};
use reqwest::Method;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Tests that change faults or count credits hold this for writing; the others for reading.
static GLOBAL: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

struct Api {
    base: String,
    key: String,
    http: reqwest::Client,
}

struct Reply {
    status: u16,
    text: String,
    headers: reqwest::header::HeaderMap,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text))
    }
    fn ok(&self) -> Value {
        assert_eq!(self.status, 200, "{}", self.text);
        self.json()
    }
}

impl Api {
    fn new(world: &World) -> Api {
        let lab = world.lab_json();
        Api {
            base: lab.conway_url.clone().expect("conway_url in lab.json"),
            key: lab
                .conway_api_key
                .clone()
                .expect("conway_api_key in lab.json"),
            http: reqwest::Client::new(),
        }
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        auth: Option<&str>,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> Reply {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("Conway request");
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        Reply {
            status,
            text: resp.text().await.unwrap_or_default(),
            headers,
        }
    }

    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> Reply {
        self.send(method, path, Some(self.key.as_str()), body, &[])
            .await
    }

    async fn create(&self, memory_mb: u64) -> Value {
        self.call(
            Method::POST,
            "/v1/sandboxes",
            Some(json!({"name": "lab-test", "vcpu": 1, "memory_mb": memory_mb, "disk_gb": 5})),
        )
        .await
        .ok()
    }

    async fn exec(&self, id: &str, command: &str, timeout_ms: u64) -> Value {
        self.call(
            Method::POST,
            &format!("/v1/sandboxes/{id}/exec"),
            Some(json!({"command": command, "timeout": timeout_ms})),
        )
        .await
        .ok()
    }

    async fn balance(&self) -> u64 {
        self.call(Method::GET, "/v1/credits/balance", None)
            .await
            .ok()["balance_cents"]
            .as_u64()
            .unwrap()
    }
}

fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat[stat.rfind(')').unwrap() + 1..]
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn raw_key_auth() {
    let _g = GLOBAL.read().await;
    let api = Api::new(world::shared());
    assert!(api.key.starts_with("cnwy_k_"));
    let r = api
        .send(Method::GET, "/v1/credits/balance", None, None, &[])
        .await;
    assert_eq!(r.status, 401, "{}", r.text);
    let r = api
        .send(
            Method::GET,
            "/v1/credits/balance",
            Some("cnwy_k_wrong"),
            None,
            &[],
        )
        .await;
    assert_eq!(r.status, 403, "{}", r.text);
    // The key goes raw: a Bearer prefix makes it an unknown key.
    let bearer = format!("Bearer {}", api.key);
    let r = api
        .send(Method::GET, "/v1/credits/balance", Some(&bearer), None, &[])
        .await;
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["error"], "Invalid API key");
    assert_eq!(
        api.call(Method::GET, "/v1/credits/balance", None)
            .await
            .status,
        200
    );
    assert_eq!(api.call(Method::GET, "/v1/nothing", None).await.status, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn sandboxes_are_prepaid_and_run_commands() {
    let _g = GLOBAL.write().await;
    let world = world::shared();
    let api = Api::new(world);
    let control = Control::new(world);

    let pricing = api
        .call(Method::GET, "/v1/credits/pricing", None)
        .await
        .ok();
    let tiers = pricing["tiers"].as_array().unwrap();
    assert_eq!(tiers[0]["memory_mb"], 512);
    let micro = tiers.iter().find(|t| t["memory_mb"] == 1024).unwrap()["monthly_cents"]
        .as_u64()
        .unwrap();

    // The smallest tier with enough memory is chosen and its month is debited.
    let before = api.balance().await;
    let sandbox = api.create(700).await;
    assert_eq!(api.balance().await, before - micro);
    assert_eq!(sandbox["memory_mb"], 1024);
    assert_eq!(sandbox["status"], "running");
    let id = sandbox["id"].as_str().unwrap().to_string();
    let listed = api.call(Method::GET, "/v1/sandboxes", None).await.ok();
    assert!(listed
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s["id"] == id.as_str()));

    // No deletion: prepaid and non-refundable.
    let r = api
        .call(Method::DELETE, &format!("/v1/sandboxes/{id}"), None)
        .await;
    assert!(r.status >= 400, "{}", r.text);
    assert!(r.json()["error"]
        .as_str()
        .unwrap()
        .contains("not supported"));
    assert_eq!(
        api.call(Method::DELETE, "/v1/sandboxes/sbx_nope", None)
            .await
            .status,
        404
    );

    // Insufficient credits: 402 with the details and the old text; nothing debited.
    control
        .ok("/lab/conway/credits", json!({"balance_cents": 100}))
        .await;
    let r = api
        .call(
            Method::POST,
            "/v1/sandboxes",
            Some(json!({"name": "x", "vcpu": 1, "memory_mb": 512, "disk_gb": 5})),
        )
        .await;
    assert_eq!(r.status, 402);
    let err = r.json();
    assert_eq!(err["details"]["required_cents"], 500);
    assert_eq!(err["details"]["current_balance_cents"], 100);
    assert!(r.text.contains("INSUFFICIENT_CREDITS"));
    assert_eq!(api.balance().await, 100);
    control
        .ok("/lab/conway/credits", json!({"balance_cents": 10_000}))
        .await;

    // exec: exit codes, stderr, the sandbox directory as working directory and HOME, the sandbox id.
    let dir = world.conway().sandbox_dir(&id);
    let out = api
        .exec(
            &id,
            "echo out; echo err >&2; pwd; echo \"$HOME\"; echo \"$CONWAY_SANDBOX_ID\"; exit 7",
            10_000,
        )
        .await;
    assert_eq!(out["exit_code"], 7);
    assert_eq!(out["stderr"], "err\n");
    let d = dir.display().to_string();
    assert_eq!(out["stdout"], format!("out\n{d}\n{d}\n{id}\n"));

    // Timeout (ms): partial output, a non-zero exit code, and the command's whole process group killed.
    let started = Instant::now();
    let out = api
        .exec(&id, "sleep 300 & echo $!; echo partial; sleep 300", 3000)
        .await;
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(out["exit_code"], 124);
    assert_eq!(out["timed_out"], true);
    let mut lines = out["stdout"].as_str().unwrap().lines();
    let background: u32 = lines.next().unwrap().parse().unwrap();
    assert_eq!(lines.next(), Some("partial"));
    poll(
        Duration::from_secs(10),
        "the timed-out command's group dies",
        || async { (!alive(background)).then_some(()) },
    )
    .await;

    // Idempotency-Key: a retried exec returns the first result and does not run again.
    let exec_once = |key: &'static str| {
        let api = &api;
        let id = id.clone();
        async move {
            api.send(
                Method::POST,
                &format!("/v1/sandboxes/{id}/exec"),
                Some(&api.key),
                Some(json!({"command": "echo run >> runs.log; wc -l < runs.log"})),
                &[("idempotency-key", key)],
            )
            .await
            .ok()
        }
    };
    let first = exec_once("01JLABTESTKEY0000000000001").await;
    let again = exec_once("01JLABTESTKEY0000000000001").await;
    assert_eq!(first, again);
    assert_eq!(
        std::fs::read_to_string(dir.join("runs.log")).unwrap(),
        "run\n"
    );
    let other = exec_once("01JLABTESTKEY0000000000002").await;
    assert_eq!(other["stdout"], "2\n");

    // Files: upload/read round trip (relative, nested, or absolute inside the sandbox); 404 for a missing file.
    let up = api
        .call(
            Method::POST,
            &format!("/v1/sandboxes/{id}/files/upload/json"),
            Some(json!({"path": "notes/a.txt", "content": "héllo\nworld"})),
        )
        .await;
    assert_eq!(up.status, 200, "{}", up.text);
    let read = api
        .call(
            Method::GET,
            &format!("/v1/sandboxes/{id}/files/read?path=notes%2Fa.txt"),
            None,
        )
        .await;
    assert_eq!((read.status, read.text.as_str()), (200, "héllo\nworld"));
    let abs = dir.join("notes/a.txt").display().to_string();
    let read = api
        .call(
            Method::GET,
            &format!("/v1/sandboxes/{id}/files/read?path={}", urlencode(&abs)),
            None,
        )
        .await;
    assert_eq!(read.text, "héllo\nworld");
    assert_eq!(
        api.exec(&id, "cat notes/a.txt", 5_000).await["stdout"],
        "héllo\nworld"
    );
    let missing = api
        .call(
            Method::GET,
            &format!("/v1/sandboxes/{id}/files/read?path=nope.txt"),
            None,
        )
        .await;
    assert_eq!(missing.status, 404);
    let outside = api
        .call(
            Method::POST,
            &format!("/v1/sandboxes/{id}/files/upload/json"),
            Some(json!({"path": "/etc/lab-x", "content": "x"})),
        )
        .await;
    assert_eq!(outside.status, 400);
    let climb = api
        .call(
            Method::GET,
            &format!("/v1/sandboxes/{id}/files/read?path=..%2F..%2Fstate.json"),
            None,
        )
        .await;
    assert_eq!(climb.status, 400);

    // Ports: a reachable public URL while exposed, unreachable after removal.
    let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = server.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = server.accept().await {
            tokio::spawn(async move {
                // The whole request first: answering early makes the client see an unexpected message.
                let (mut request, mut buf) = (Vec::new(), [0u8; 1024]);
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\nconnection: close\r\n\r\nsandboxed")
                    .await;
            });
        }
    });
    let exposed = api
        .call(
            Method::POST,
            &format!("/v1/sandboxes/{id}/ports/expose"),
            Some(json!({"port": port})),
        )
        .await
        .ok();
    assert_eq!(exposed["port"], port);
    let url = exposed["public_url"].as_str().unwrap().to_string();
    assert_eq!(
        reqwest::get(&url).await.unwrap().text().await.unwrap(),
        "sandboxed"
    );
    let again = api
        .call(
            Method::POST,
            &format!("/v1/sandboxes/{id}/ports/expose"),
            Some(json!({"port": port})),
        )
        .await
        .ok();
    assert_eq!(
        again["public_url"],
        url.as_str(),
        "exposing twice gives the same URL"
    );
    let removed = api
        .call(
            Method::DELETE,
            &format!("/v1/sandboxes/{id}/ports/{port}"),
            None,
        )
        .await;
    assert_eq!(removed.status, 200);
    poll(
        Duration::from_secs(5),
        "the public URL stops answering",
        || async { reqwest::get(&url).await.is_err().then_some(()) },
    )
    .await;
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn credit_transfers_on_the_singular_path_then_the_plural() {
    let _g = GLOBAL.write().await;
    let world = world::shared();
    let api = Api::new(world);
    let control = Control::new(world);
    control
        .ok("/lab/conway/credits", json!({"balance_cents": 1_000}))
        .await;
    let to = "0x00000000000000000000000000000000000000aa";

    let r = api
        .send(
            Method::POST,
            "/v1/credits/transfer",
            Some(&api.key),
            Some(json!({"to_address": to, "amount_cents": 300, "note": "lab"})),
            &[("idempotency-key", "01JTRANSFER000000000000001")],
        )
        .await
        .ok();
    assert_eq!(r["status"], "submitted");
    assert_eq!(r["amount_cents"], 300);
    assert_eq!(r["balance_after_cents"], 700);
    assert!(r["transfer_id"].as_str().unwrap().starts_with("tr_"));
    // The same key: the same answer, no second debit.
    let again = api
        .send(
            Method::POST,
            "/v1/credits/transfer",
            Some(&api.key),
            Some(json!({"to_address": to, "amount_cents": 300})),
            &[("idempotency-key", "01JTRANSFER000000000000001")],
        )
        .await
        .ok();
    assert_eq!(again, r);
    assert_eq!(api.balance().await, 700);
    assert_eq!(
        api.call(
            Method::POST,
            "/v1/credits/transfers",
            Some(json!({"to_address": to, "amount_cents": 1}))
        )
        .await
        .status,
        404
    );
    let r = api
        .call(
            Method::POST,
            "/v1/credits/transfer",
            Some(json!({"to_address": to, "amount_cents": 5_000})),
        )
        .await;
    assert_eq!(r.status, 402);
    assert_eq!(r.json()["details"]["current_balance_cents"], 700);
    let r = api
        .call(
            Method::POST,
            "/v1/credits/transfer",
            Some(json!({"to_address": "nope", "amount_cents": 1})),
        )
        .await;
    assert_eq!(r.status, 400);

    // A deployment that moved the route: the singular path 404s, the plural one works.
    control
        .ok("/lab/conway/faults", json!({"transfer_plural": true}))
        .await;
    assert_eq!(
        api.call(
            Method::POST,
            "/v1/credits/transfer",
            Some(json!({"to_address": to, "amount_cents": 100}))
        )
        .await
        .status,
        404
    );
    let r = api
        .call(
            Method::POST,
            "/v1/credits/transfers",
            Some(json!({"to_address": to, "amount_cents": 100})),
        )
        .await
        .ok();
    assert_eq!(r["balance_after_cents"], 600);
    control.ok("/lab/conway/faults", json!({})).await;
    control
        .ok("/lab/conway/credits", json!({"balance_cents": 10_000}))
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn fault_modes_for_the_retry_rules() {
    let _g = GLOBAL.write().await;
    let world = world::shared();
    let api = Api::new(world);
    let control = Control::new(world);
    let id = api.create(512).await["id"].as_str().unwrap().to_string();
    api.call(
        Method::POST,
        &format!("/v1/sandboxes/{id}/files/upload/json"),
        Some(json!({"path": "f.txt", "content": "x"})),
    )
    .await
    .ok();

    // Intermittent 404 on valid routes; a file read is never one of them (there 404 means "no such file").
    control
        .ok("/lab/conway/faults", json!({"not_found_count": 2}))
        .await;
    let r = api
        .call(
            Method::GET,
            &format!("/v1/sandboxes/{id}/files/read?path=f.txt"),
            None,
        )
        .await;
    assert_eq!((r.status, r.text.as_str()), (200, "x"));
    assert_eq!(
        api.call(Method::GET, "/v1/credits/balance", None)
            .await
            .status,
        404
    );
    assert_eq!(
        api.call(Method::GET, "/v1/sandboxes", None).await.status,
        404
    );
    assert_eq!(
        api.call(Method::GET, "/v1/sandboxes", None).await.status,
        200
    );

    // A burst of 5xx (enough to open the client's breaker), and 429 with Retry-After.
    control
        .ok(
            "/lab/conway/faults",
            json!({"error_status": 503, "error_count": 5}),
        )
        .await;
    for _ in 0..5 {
        assert_eq!(
            api.call(Method::GET, "/v1/credits/balance", None)
                .await
                .status,
            503
        );
    }
    assert_eq!(
        api.call(Method::GET, "/v1/credits/balance", None)
            .await
            .status,
        200
    );
    control
        .ok(
            "/lab/conway/faults",
            json!({"error_status": 429, "error_count": 1}),
        )
        .await;
    let r = api.call(Method::GET, "/v1/credits/balance", None).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.headers.get("retry-after").unwrap(), "1");

    // A hang past the client's timeout.
    control
        .ok(
            "/lab/conway/faults",
            json!({"delay_ms": 1500, "delay_count": 1}),
        )
        .await;
    let quick = reqwest::Client::builder()
        .timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let timed_out = quick
        .get(format!("{}/v1/credits/balance", api.base))
        .header("authorization", &api.key)
        .send()
        .await;
    assert!(timed_out.is_err());

    // Older deployments' field names and shapes.
    control
        .ok(
            "/lab/conway/faults",
            json!({"alt_fields": true, "list_object": true, "files_read_json": true}),
        )
        .await;
    let balance = api
        .call(Method::GET, "/v1/credits/balance", None)
        .await
        .ok();
    assert!(balance["credits_cents"].is_u64(), "{balance}");
    let list = api.call(Method::GET, "/v1/sandboxes", None).await.ok();
    assert!(list["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s["sandbox_id"] == id.as_str()));
    let out = api.exec(&id, "exit 2", 5_000).await;
    assert_eq!(out["exitCode"], 2);
    let read = api
        .call(
            Method::GET,
            &format!("/v1/sandboxes/{id}/files/read?path=f.txt"),
            None,
        )
        .await
        .ok();
    assert_eq!(read["content"], "x");
    let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = server.local_addr().unwrap().port();
    let exposed = api
        .call(
            Method::POST,
            &format!("/v1/sandboxes/{id}/ports/expose"),
            Some(json!({"port": port})),
        )
        .await
        .ok();
    assert!(exposed["publicUrl"].is_string(), "{exposed}");
    control.ok("/lab/conway/faults", json!({})).await;
    let (status, faults) = control
        .post("/lab/conway/faults", json!({"bogus": 1}))
        .await;
    assert_eq!(status, 400, "{faults}");
}

/// A private double: its shutdown kills whatever its sandboxes started, detached or not.
#[tokio::test(flavor = "multi_thread")]
async fn shutdown_kills_sandbox_processes() {
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let conway = Conway::start(dir.path(), listener).await.unwrap();
    let api = Api {
        base: conway.url(),
        key: conway.api_key(),
        http: reqwest::Client::new(),
    };
    let id = api.create(512).await["id"].as_str().unwrap().to_string();
    let out = api
        .exec(
            &id,
            "setsid sleep 600 > /dev/null 2>&1 < /dev/null & echo $!",
            5_000,
        )
        .await;
    let pid: u32 = out["stdout"].as_str().unwrap().trim().parse().unwrap();
    assert!(alive(pid), "the background process outlives its exec");
    // A restarted double keeps its key, balance and sandboxes.
    let key = conway.api_key();
    conway.shutdown().await;
    poll(
        Duration::from_secs(10),
        "sandbox processes die with the double",
        || async { (!alive(pid)).then_some(()) },
    )
    .await;
    drop(conway);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let resumed = Conway::start(dir.path(), listener).await.unwrap();
    assert_eq!(resumed.api_key(), key);
    let api = Api {
        base: resumed.url(),
        key,
        http: reqwest::Client::new(),
    };
    let list = api.call(Method::GET, "/v1/sandboxes", None).await.ok();
    assert_eq!(list[0]["id"], id.as_str());
    assert_eq!(
        api.balance().await,
        automaton_lab::conway::INITIAL_BALANCE_CENTS - 500
    );
    resumed.shutdown().await;
}
