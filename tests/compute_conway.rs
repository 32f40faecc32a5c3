//! The Conway backend against a wiremock server pinned to `shared/specs/conway-api.md`: raw-key auth, field-name
//! alternatives, 404 retries, 429/5xx backoff and the circuit breaker, 402/403, idempotency keys. Then the
//! conformance suite, run against a sandbox route that really executes the commands (in a temporary directory
//! on this machine), the way the lab's Conway double does.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use automaton::compute::conway::{ConwayClient, ConwayCompute, RetryPolicy, SandboxSpec};
use automaton::compute::{ComputeError, ComputeProvider, ExecRequest};
use automaton::config::Secret;
use serde_json::{json, Value};
use wiremock::matchers::{header, method, path, query_param};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

const KEY: &str = "cnwy_k_test_0123456789";

/// The spec's policy with short pauses.
fn fast_policy() -> RetryPolicy {
    RetryPolicy {
        backoff_base: Duration::from_millis(5),
        backoff_max: Duration::from_millis(20),
        not_found_pauses: vec![Duration::from_millis(5); 3],
        breaker_open_for: Duration::from_secs(60),
        ..RetryPolicy::default()
    }
}

fn client(server: &MockServer) -> ConwayClient {
    ConwayClient::with_policy(&server.uri(), Secret::new(KEY), fast_policy()).expect("client")
}

async fn requests_to(server: &MockServer, route: &str) -> Vec<Request> {
    server
        .received_requests()
        .await
        .unwrap_or_default()
        .into_iter()
        .filter(|r| r.url.path() == route)
        .collect()
}

#[tokio::test]
async fn exec_sends_the_raw_key_json_and_an_idempotency_key_and_reads_alternative_fields() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/sandboxes/sb-1/exec"))
        .and(header("authorization", KEY))
        .and(header("content-type", "application/json"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"stdout": "out", "stderr": "err", "exitCode": 3})),
        )
        .mount(&server)
        .await;
    let out = client(&server)
        .exec("sb-1", "echo hi", Duration::from_secs(7))
        .await
        .expect("exec");
    assert_eq!(
        (out.stdout.as_str(), out.stderr.as_str(), out.exit_code),
        ("out", "err", 3)
    );
    let seen = requests_to(&server, "/v1/sandboxes/sb-1/exec").await;
    assert_eq!(seen.len(), 1);
    let auth = seen[0]
        .headers
        .get("authorization")
        .unwrap()
        .to_str()
        .unwrap();
    assert!(!auth.starts_with("Bearer"), "Conway takes the raw key");
    let key = seen[0]
        .headers
        .get("idempotency-key")
        .expect("idempotency key");
    assert_eq!(key.to_str().unwrap().len(), 26, "a ULID");
    let body: Value = serde_json::from_slice(&seen[0].body).unwrap();
    assert_eq!(body, json!({"command": "echo hi", "timeout": 7000}));
}

/// Fails the first `n` calls with `status`, then answers `ok`.
struct FailFirst {
    n: usize,
    status: u16,
    ok: Value,
    seen: Mutex<usize>,
}

impl Respond for FailFirst {
    fn respond(&self, _: &Request) -> ResponseTemplate {
        let mut seen = self.seen.lock().unwrap();
        *seen += 1;
        if *seen <= self.n {
            ResponseTemplate::new(self.status).set_body_string("try again")
        } else {
            ResponseTemplate::new(200).set_body_json(self.ok.clone())
        }
    }
}

fn fail_first(n: usize, status: u16, ok: Value) -> FailFirst {
    FailFirst {
        n,
        status,
        ok,
        seen: Mutex::new(0),
    }
}

#[tokio::test]
async fn a_retried_exec_keeps_its_idempotency_key() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/sandboxes/sb-1/exec"))
        .respond_with(fail_first(
            2,
            503,
            json!({"stdout": "once", "exit_code": 0}),
        ))
        .mount(&server)
        .await;
    let out = client(&server)
        .exec("sb-1", "date", Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!(out.stdout, "once");
    let seen = requests_to(&server, "/v1/sandboxes/sb-1/exec").await;
    assert_eq!(seen.len(), 3);
    let keys: Vec<_> = seen
        .iter()
        .map(|r| r.headers.get("idempotency-key").unwrap().clone())
        .collect();
    assert!(
        keys.iter().all(|k| *k == keys[0]),
        "one key across the retries"
    );
    // A new call gets a new key.
    client(&server)
        .exec("sb-1", "date", Duration::from_secs(1))
        .await
        .unwrap();
    let seen = requests_to(&server, "/v1/sandboxes/sb-1/exec").await;
    assert_ne!(seen[3].headers.get("idempotency-key").unwrap(), &keys[0]);
}

#[tokio::test]
async fn a_404_from_the_load_balancer_is_retried_but_a_missing_file_is_not() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/v1/credits/balance"))
        .respond_with(fail_first(3, 404, json!({"credits_cents": 1234})))
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/v1/sandboxes/sb-1/files/read"))
        .and(query_param("path", "/root/missing file"))
        .respond_with(ResponseTemplate::new(404).set_body_string("not found"))
        .mount(&server)
        .await;
    let c = client(&server);
    assert_eq!(c.credits_balance_cents().await.unwrap(), 1234);
    assert_eq!(requests_to(&server, "/v1/credits/balance").await.len(), 4);
    match c.read_file("sb-1", "/root/missing file").await {
        Err(ComputeError::NotFound { path }) => assert_eq!(path, Path::new("/root/missing file")),
        other => panic!("expected NotFound, got {other:?}"),
    }
    assert_eq!(
        requests_to(&server, "/v1/sandboxes/sb-1/files/read")
            .await
            .len(),
        1
    );
}

#[tokio::test]
async fn file_upload_and_read_use_the_documented_routes() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/sandboxes/sb-1/files/upload/json"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"ok": true})))
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/v1/sandboxes/sb-1/files/read"))
        .and(query_param("path", "/root/a.txt"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"content": "hello"})))
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/v1/sandboxes/sb-1/files/read"))
        .and(query_param("path", "/root/b.txt"))
        .respond_with(ResponseTemplate::new(200).set_body_string("plain text"))
        .mount(&server)
        .await;
    let c = client(&server);
    c.upload_file("sb-1", "/root/a.txt", "hello").await.unwrap();
    let uploads = requests_to(&server, "/v1/sandboxes/sb-1/files/upload/json").await;
    let body: Value = serde_json::from_slice(&uploads[0].body).unwrap();
    assert_eq!(body, json!({"path": "/root/a.txt", "content": "hello"}));
    assert_eq!(c.read_file("sb-1", "/root/a.txt").await.unwrap(), "hello");
    assert_eq!(
        c.read_file("sb-1", "/root/b.txt").await.unwrap(),
        "plain text"
    );
}

#[tokio::test]
async fn a_refused_key_is_an_auth_error_and_is_not_retried() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/sandboxes/sb-1/exec"))
        .respond_with(ResponseTemplate::new(403).set_body_json(json!({"error": "invalid api key"})))
        .mount(&server)
        .await;
    match client(&server)
        .exec("sb-1", "id", Duration::from_secs(1))
        .await
    {
        Err(ComputeError::Auth { message, .. }) => assert_eq!(message, "invalid api key"),
        other => panic!("expected Auth, got {other:?}"),
    }
    assert_eq!(
        requests_to(&server, "/v1/sandboxes/sb-1/exec").await.len(),
        1
    );
}

#[tokio::test]
async fn creating_without_credits_says_how_many_are_needed() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/sandboxes"))
        .respond_with(ResponseTemplate::new(402).set_body_json(json!({
            "error": "INSUFFICIENT_CREDITS",
            "details": {"required_cents": 500, "current_balance_cents": 120}
        })))
        .mount(&server)
        .await;
    let spec = SandboxSpec::smallest_with("agent", 512);
    match client(&server).create_sandbox(&spec).await {
        Err(e @ ComputeError::InsufficientCredits { .. }) => {
            assert!(matches!(
                e,
                ComputeError::InsufficientCredits {
                    required_cents: Some(500),
                    balance_cents: Some(120),
                    ..
                }
            ));
            assert!(e.to_string().contains("500 cents needed, 120 available"));
        }
        other => panic!("expected InsufficientCredits, got {other:?}"),
    }
    let seen = requests_to(&server, "/v1/sandboxes").await;
    let body: Value = serde_json::from_slice(&seen[0].body).unwrap();
    assert_eq!(
        body,
        json!({"name": "agent", "vcpu": 1, "memory_mb": 512, "disk_gb": 5})
    );
}

#[tokio::test]
async fn five_failures_in_a_row_open_the_breaker_and_later_calls_fail_fast() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/v1/sandboxes"))
        .respond_with(ResponseTemplate::new(503).set_body_string("overloaded"))
        .mount(&server)
        .await;
    let c = client(&server);
    // One call: the first attempt and 3 retries.
    match c.list_sandboxes().await {
        Err(ComputeError::Remote { message, .. }) => {
            assert!(
                message.contains("503") && message.contains("after 3 retries"),
                "{message}"
            )
        }
        other => panic!("expected Remote, got {other:?}"),
    }
    assert_eq!(requests_to(&server, "/v1/sandboxes").await.len(), 4);
    // The fifth failure opens the breaker.
    assert!(matches!(
        c.list_sandboxes().await,
        Err(ComputeError::Unavailable { .. })
    ));
    assert_eq!(requests_to(&server, "/v1/sandboxes").await.len(), 5);
    // Open: nothing is sent.
    assert!(matches!(
        c.credits_balance_cents().await,
        Err(ComputeError::Unavailable { .. })
    ));
    assert_eq!(server.received_requests().await.unwrap().len(), 5);
}

#[tokio::test]
async fn listings_pricing_and_ports_accept_every_documented_shape() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/v1/sandboxes"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(json!({"sandboxes": [
                {"sandbox_id": "undefined", "status": "running"},
                {"sandbox_id": "sb-9", "status": "stopped", "memory_mb": 512},
                {"id": "sb-2", "region": "eu", "vcpu": 1, "memory_mb": 1024, "disk_gb": 10}
            ]})),
        )
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/v1/credits/pricing"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"pricing": [
            {"name": "small", "vcpu": 1, "memory_mb": 512, "disk_gb": 5, "monthly_cents": 500}
        ]})))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/v1/sandboxes/sb-2/ports/expose"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"port": 8080, "publicUrl": "https://p.example/x"})),
        )
        .mount(&server)
        .await;
    Mock::given(method("DELETE"))
        .and(path("/v1/sandboxes/sb-2/ports/8080"))
        .respond_with(ResponseTemplate::new(204))
        .mount(&server)
        .await;
    let c = Arc::new(client(&server));
    let list = c.list_sandboxes().await.unwrap();
    assert_eq!(
        list.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(),
        ["sb-9", "sb-2"]
    );
    assert_eq!(list[1].status, "running", "a missing status means running");
    let tiers = c.pricing().await.unwrap();
    assert_eq!(tiers[0].monthly_cents, Some(500));

    // The provider picks the first usable sandbox and exposes ports there.
    let compute = ConwayCompute::new(c.clone(), None, Some(PathBuf::from("/root"))).unwrap();
    assert_eq!(compute.sandbox_id().await.unwrap(), "sb-2");
    assert_eq!(
        compute.expose_port(8080).await.unwrap(),
        "https://p.example/x"
    );
    compute.remove_port(8080).await.unwrap();
    assert_eq!(
        requests_to(&server, "/v1/sandboxes/sb-2/ports/8080")
            .await
            .len(),
        1
    );
    let debug = format!("{compute:?}");
    assert!(
        !debug.contains(KEY),
        "the key never shows in Debug: {debug}"
    );
}

#[tokio::test]
async fn an_account_without_a_running_sandbox_is_a_clear_error_and_nothing_is_created() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/v1/sandboxes"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!([])))
        .mount(&server)
        .await;
    let compute = ConwayCompute::new(Arc::new(client(&server)), None, None).unwrap();
    let err = compute
        .exec(ExecRequest {
            command: "true".into(),
            timeout: Duration::from_secs(5),
            output_cap: 100,
        })
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no running sandbox"), "{err}");
    let posts = server
        .received_requests()
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.method.as_str() != "GET")
        .count();
    assert_eq!(posts, 0);
}

/// A sandbox exec route that runs the command in a directory of this machine (HOME = that directory), as the
/// lab's double does; a repeated idempotency key gets the stored answer without running the command again.
struct LocalSandbox {
    dir: PathBuf,
    answers: Mutex<std::collections::HashMap<String, Value>>,
}

impl Respond for LocalSandbox {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        if request
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            != Some(KEY)
        {
            return ResponseTemplate::new(403).set_body_string("forbidden");
        }
        let key = request
            .headers
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        if let Some(answer) = self.answers.lock().unwrap().get(&key) {
            return ResponseTemplate::new(200).set_body_json(answer.clone());
        }
        let body: Value = serde_json::from_slice(&request.body).unwrap_or_default();
        let command = body["command"].as_str().unwrap_or_default();
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(command)
            .current_dir("/")
            .env("HOME", &self.dir)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("sh");
        let answer = json!({
            "stdout": String::from_utf8_lossy(&out.stdout),
            "stderr": String::from_utf8_lossy(&out.stderr),
            "exit_code": out.status.code().unwrap_or(-1),
        });
        self.answers.lock().unwrap().insert(key, answer.clone());
        ResponseTemplate::new(200).set_body_json(answer)
    }
}

/// A running fake Conway with one sandbox backed by `dir`, and a provider on it with no configured workdir (so
/// the sandbox's home is learnt, as against the real service).
async fn local_conway(dir: PathBuf) -> (MockServer, ConwayCompute) {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/v1/sandboxes"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!([{"id": "sb-local"}])))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/v1/sandboxes/sb-local/exec"))
        .respond_with(LocalSandbox {
            dir,
            answers: Mutex::new(Default::default()),
        })
        .mount(&server)
        .await;
    let client = Arc::new(client(&server));
    let compute = ConwayCompute::new(client, None, None).unwrap();
    // Learn the home now, so `workdir()` is the real directory for the suite's path checks.
    compute
        .exec(ExecRequest {
            command: "true".into(),
            timeout: Duration::from_secs(10),
            output_cap: 100,
        })
        .await
        .expect("first exec");
    (server, compute)
}

/// The fake server must outlive the provider's calls.
struct WithServer {
    compute: ConwayCompute,
    _server: MockServer,
}

#[async_trait::async_trait]
impl ComputeProvider for WithServer {
    fn kind(&self) -> &'static str {
        self.compute.kind()
    }
    fn workdir(&self) -> &Path {
        self.compute.workdir()
    }
    fn shares_agent_filesystem(&self) -> bool {
        self.compute.shares_agent_filesystem()
    }
    async fn exec(
        &self,
        request: ExecRequest,
    ) -> Result<automaton::compute::ExecOutput, ComputeError> {
        self.compute.exec(request).await
    }
    async fn read_file(
        &self,
        path: &Path,
        max_bytes: usize,
    ) -> Result<automaton::compute::FileContent, ComputeError> {
        self.compute.read_file(path, max_bytes).await
    }
    async fn write_file(&self, path: &Path, content: &[u8]) -> Result<(), ComputeError> {
        self.compute.write_file(path, content).await
    }
}

automaton::compute_conformance!(async |dir: PathBuf| async move {
    let (server, compute) = local_conway(dir).await;
    WithServer {
        compute,
        _server: server,
    }
});

#[tokio::test]
async fn the_sandbox_home_is_the_default_workdir_and_tilde_paths_land_there() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, compute) = local_conway(dir.path().to_path_buf()).await;
    assert_eq!(compute.workdir(), dir.path());
    compute
        .write_file(Path::new("~/notes/a.txt"), b"x")
        .await
        .unwrap();
    assert_eq!(std::fs::read(dir.path().join("notes/a.txt")).unwrap(), b"x");
}

/// The conformance suite against the lab's Conway double (`lab.json`: `conway_url`, `conway_api_key`): one
/// prepaid sandbox for the whole binary, each test in its own directory inside it.
mod lab {
    use super::*;

    /// The sandbox (id, home) every test here shares; created once, with the lab's credits.
    static SANDBOX: tokio::sync::OnceCell<(String, PathBuf)> = tokio::sync::OnceCell::const_new();

    fn lab_client() -> Arc<ConwayClient> {
        let world = automaton_lab::world::shared();
        let lab: Value =
            serde_json::from_slice(&std::fs::read(world.lab_json_path()).expect("lab.json"))
                .expect("lab.json is JSON");
        let url = lab["conway_url"].as_str().expect("conway_url in lab.json");
        let key = lab["conway_api_key"]
            .as_str()
            .expect("conway_api_key in lab.json");
        // A client per test: each test has its own runtime, and connections do not outlive it.
        Arc::new(ConwayClient::new(url, Secret::new(key)).expect("client"))
    }

    async fn sandbox(client: &Arc<ConwayClient>) -> &'static (String, PathBuf) {
        SANDBOX
            .get_or_init(|| async {
                let created = client
                    .create_sandbox(&SandboxSpec::smallest_with("conformance", 512))
                    .await
                    .expect("create a sandbox on the double");
                let compute = ConwayCompute::new(client.clone(), Some(created.id.clone()), None)
                    .expect("provider");
                let out = compute
                    .exec(ExecRequest {
                        command: "pwd -P".into(),
                        timeout: Duration::from_secs(30),
                        output_cap: 4096,
                    })
                    .await
                    .expect("first exec");
                assert_eq!(out.exit_code, Some(0), "{out:?}");
                (created.id, PathBuf::from(out.stdout.trim()))
            })
            .await
    }

    async fn lab_provider(dir: PathBuf) -> ConwayCompute {
        let client = lab_client();
        let (id, home) = sandbox(&client).await;
        let name = dir.file_name().expect("a temp dir name");
        ConwayCompute::new(client, Some(id.clone()), Some(home.join(name))).expect("provider")
    }

    automaton::compute_conformance!(async |dir: PathBuf| async move { lab_provider(dir).await });

    #[tokio::test]
    async fn ports_are_exposed_through_the_double_and_taken_away() {
        let dir = tempfile::tempdir().unwrap();
        let compute = lab_provider(dir.path().to_path_buf()).await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let served = tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            while let Ok((mut socket, _)) = listener.accept().await {
                // Answer only once the whole request is in: a reply sent before the request
                // is written makes the client see an unexpected message.
                let mut request = Vec::new();
                let mut chunk = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match socket.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => request.extend_from_slice(&chunk[..n]),
                    }
                }
                let _ = socket
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\nhello",
                    )
                    .await;
            }
        });
        let url = compute.expose_port(port).await.expect("expose");
        let body = reqwest::get(&url)
            .await
            .expect("reach the exposed port")
            .text()
            .await
            .unwrap();
        assert_eq!(body, "hello");
        compute.remove_port(port).await.expect("unexpose");
        assert!(reqwest::get(&url).await.is_err(), "{url} still answers");
        served.abort();
    }

    #[tokio::test]
    async fn the_balance_reflects_the_prepaid_sandbox() {
        let client = lab_client();
        sandbox(&client).await;
        let balance = client.credits_balance_cents().await.expect("balance");
        let price = client
            .pricing()
            .await
            .expect("pricing")
            .iter()
            .filter_map(|t| t.monthly_cents)
            .min()
            .expect("a price");
        assert!(
            balance + price <= 10_000,
            "the sandbox was paid for: {balance}"
        );
        let listed = client.list_sandboxes().await.expect("list");
        let (id, _) = sandbox(&client).await;
        assert!(listed.iter().any(|s| &s.id == id), "{id} not listed");
    }
}
