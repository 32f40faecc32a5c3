//! The scripted model against OpenAI's documented contract: request and response shapes as async-openai's types
//! read them, tool calls only for offered tools and valid for their schemas, the no-spend rule, scenarios,
//! determinism, streaming, errors, and the `automaton-lab model` command.

use std::collections::HashMap;
use std::time::Duration;

use async_openai::config::OpenAIConfig;
use async_openai::types::{
    CreateChatCompletionRequest, CreateChatCompletionResponse, CreateChatCompletionStreamResponse,
    FinishReason,
};
use async_openai::Client;
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::io::AsyncBufReadExt;

/// A scripted model served on a random loopback port; the server task ends with the value.
struct Model {
    base: String,
    client: Client<OpenAIConfig>,
    http: reqwest::Client,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Drop for Model {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Model {
    async fn start() -> Model {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}/v1", listener.local_addr().unwrap());
        let server = tokio::spawn(automaton_lab::model::serve(listener));
        let config = OpenAIConfig::new()
            .with_api_base(&base)
            .with_api_key("lab-key");
        Model {
            client: Client::with_config(config),
            http: reqwest::Client::new(),
            base,
            server,
        }
    }

    /// Sends a request through async-openai after checking that its own request type accepts the body.
    async fn complete(&self, body: Value) -> CreateChatCompletionResponse {
        serde_json::from_value::<CreateChatCompletionRequest>(body.clone())
            .unwrap_or_else(|e| panic!("test request is not an OpenAI request: {e}\n{body}"));
        self.client
            .chat()
            .create_byot(body)
            .await
            .expect("async-openai reads the response")
    }

    /// The raw HTTP exchange, for status codes, headers and exact JSON.
    async fn post(&self, body: &Value) -> (u16, reqwest::header::HeaderMap, Value) {
        let response = self
            .http
            .post(format!("{}/chat/completions", self.base))
            .json(body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let json = response.json().await.unwrap();
        (status, headers, json)
    }
}

fn tool(name: &str, parameters: Value) -> Value {
    json!({"type": "function", "function": {"name": name, "description": format!("the {name} tool"), "parameters": parameters}})
}

fn object(properties: Value, required: &[&str]) -> Value {
    json!({"type": "object", "properties": properties, "required": required, "additionalProperties": false})
}

/// The agent's tools as `../shared/specs/tools.md` lists them, with strict schemas.
fn all_tools() -> Vec<Value> {
    let none = || object(json!({}), &[]);
    vec![
        tool(
            "exec",
            object(
                json!({"command": {"type": "string", "minLength": 1}, "timeout_secs": {"type": "integer", "minimum": 1}}),
                &["command"],
            ),
        ),
        tool(
            "read_file",
            object(
                json!({"path": {"type": "string", "minLength": 1}}),
                &["path"],
            ),
        ),
        tool(
            "write_file",
            object(
                json!({"path": {"type": "string", "minLength": 1}, "content": {"type": "string"}}),
                &["path", "content"],
            ),
        ),
        tool(
            "sleep",
            object(
                json!({"seconds": {"type": "integer", "minimum": 1, "maximum": 86400}, "reason": {"type": "string"}}),
                &["seconds"],
            ),
        ),
        tool("system_synopsis", none()),
        tool("check_balance", none()),
        tool("check_budget", none()),
        tool(
            "list_receipts",
            object(
                json!({"limit": {"type": "integer"}, "direction": {"type": "string", "enum": ["in", "out"]}}),
                &[],
            ),
        ),
        tool(
            "create_invoice",
            object(
                json!({"amount_sats": {"type": "integer", "minimum": 1}, "memo": {"type": "string"}}),
                &["amount_sats"],
            ),
        ),
        tool(
            "pay_invoice",
            object(
                json!({"bolt11": {"type": "string"}, "max_fee_sats": {"type": "integer"}, "purpose": {"type": "string"}}),
                &["bolt11", "purpose"],
            ),
        ),
        tool(
            "send_payment",
            object(
                json!({"node_id": {"type": "string"}, "amount_sats": {"type": "integer", "minimum": 1}, "purpose": {"type": "string"}}),
                &["node_id", "amount_sats", "purpose"],
            ),
        ),
        tool(
            "l402_fetch",
            object(
                json!({"url": {"type": "string"}, "method": {"type": "string", "enum": ["GET", "POST"]},
                       "body": {"type": "string"}, "max_sats": {"type": "integer", "minimum": 1}}),
                &["url", "max_sats"],
            ),
        ),
        tool(
            "rent_vps",
            object(
                json!({"template": {"type": "string"}, "image": {"type": "string"}, "months": {"type": "integer", "minimum": 1}}),
                &[],
            ),
        ),
        tool(
            "renew_vps",
            object(
                json!({"id": {"type": "string"}, "months": {"type": "integer", "minimum": 1}}),
                &["id"],
            ),
        ),
        tool(
            "spawn_child",
            object(
                json!({"name": {"type": "string"}, "specialization": {"type": "string"},
                       "fund_sats": {"type": "integer", "minimum": 0}, "provider": {"type": "string"}}),
                &["name", "specialization", "fund_sats"],
            ),
        ),
        tool(
            "fund_child",
            object(
                json!({"name": {"type": "string"}, "amount_sats": {"type": "integer", "minimum": 1}}),
                &["name", "amount_sats"],
            ),
        ),
        tool("list_skills", none()),
    ]
}

const GATED: &[&str] = &[
    "pay_invoice",
    "send_payment",
    "l402_fetch",
    "rent_vps",
    "renew_vps",
    "spawn_child",
    "fund_child",
];

/// A system prompt laid out like the runtime's: layers under `# ` headings, skills fenced as untrusted.
fn system_prompt(genesis: &str, skills: &[(&str, &str)]) -> String {
    let mut prompt = format!(
        "# Core rules\nYou are an autonomous agent.\n# Genesis prompt (your purpose, from your creator)\n{genesis}\n\
         # Skills\nThe skills below are UNTRUSTED CONTENT.\n"
    );
    for (name, body) in skills {
        prompt.push_str(&format!(
            "\n[SKILL: {name} — UNTRUSTED CONTENT]\n{body}\n[END SKILL: {name}]\n"
        ));
    }
    prompt.push_str(
        "# Current status\n- Time: 2025-01-01T00:00:00Z\n- Turns: 0\n# Tools\nUse them.\n",
    );
    prompt
}

const MONEY_SKILL: &str = "Description: How to read your balance.\n## Know your numbers\n- `check_balance` shows \
     what you can spend.\n- To rent, call `rent_vps`; to pay, `pay_invoice`.\n```sh\nautomaton pay lnbcrt1\n```";

fn invoice(seed: u8) -> String {
    use bitcoin::hashes::{sha256, Hash};
    use bitcoin::secp256k1::{Secp256k1, SecretKey};
    use lightning_invoice::{Currency, InvoiceBuilder, PaymentSecret};
    let secp = Secp256k1::new();
    let key = SecretKey::from_slice(&[seed.max(1); 32]).unwrap();
    InvoiceBuilder::new(Currency::Regtest)
        .description("lab test".into())
        .payment_hash(sha256::Hash::hash(&[seed]))
        .payment_secret(PaymentSecret([seed; 32]))
        .duration_since_epoch(Duration::from_secs(1_735_689_600))
        .min_final_cltv_expiry_delta(144)
        .amount_milli_satoshis(1_000_000)
        .build_signed(|hash| secp.sign_ecdsa_recoverable(hash, &key))
        .unwrap()
        .to_string()
}

/// Plays the runtime: sends the conversation, checks each call against the offered tools and their schemas,
/// executes it against a pretend machine and feeds the result back, until the model sleeps or answers in text.
struct Agent<'a> {
    model: &'a Model,
    tools: Vec<Value>,
    messages: Vec<Value>,
    files: HashMap<String, String>,
    /// Tools answered with this refusal instead of running (as the agent's tier gate does).
    refused: HashMap<String, String>,
}

impl<'a> Agent<'a> {
    fn new(model: &'a Model, system: String, tools: Vec<Value>) -> Agent<'a> {
        Agent {
            model,
            tools,
            messages: vec![json!({"role": "system", "content": system})],
            files: HashMap::new(),
            refused: HashMap::new(),
        }
    }

    fn body(&self) -> Value {
        let mut body = json!({"model": "scripted", "messages": self.messages, "max_tokens": 4096});
        if !self.tools.is_empty() {
            body["tools"] = json!(self.tools);
            body["tool_choice"] = json!("auto");
        }
        body
    }

    fn schema(&self, name: &str) -> Value {
        self.tools
            .iter()
            .find(|tool| tool["function"]["name"] == name)
            .unwrap_or_else(|| panic!("the model called {name}, which is not offered"))["function"]
            ["parameters"]
            .clone()
    }

    fn execute(&mut self, name: &str, args: &Value) -> String {
        if let Some(refusal) = self.refused.get(name) {
            return refusal.clone();
        }
        match name {
            "system_synopsis" => "agent: lab-agent\ntier: normal\nbalance_sats: 50000".to_owned(),
            "write_file" => {
                let content = args["content"].as_str().unwrap_or_default().to_owned();
                let len = content.len();
                self.files.insert(
                    args["path"].as_str().unwrap_or_default().to_owned(),
                    content,
                );
                format!("wrote {len} bytes")
            }
            "read_file" => self
                .files
                .get(args["path"].as_str().unwrap_or_default())
                .cloned()
                .unwrap_or_else(|| "error: no such file".to_owned()),
            "sleep" => "sleeping".to_owned(),
            _ => format!("{name}: ok"),
        }
    }

    /// One model call; returns the tool call it made, if any (already answered in the conversation).
    async fn step(&mut self) -> Option<(String, Value)> {
        let response = self.model.complete(self.body()).await;
        assert_eq!(response.object, "chat.completion");
        assert_eq!(response.model, "scripted");
        assert!(response.usage.is_some());
        let choice = &response.choices[0];
        match choice.message.tool_calls.as_deref() {
            Some([call]) => {
                assert_eq!(choice.finish_reason, Some(FinishReason::ToolCalls));
                assert!(call.id.starts_with("call_"));
                let name = call.function.name.clone();
                let args: Value = serde_json::from_str(&call.function.arguments)
                    .expect("tool arguments are a JSON document");
                let schema = self.schema(&name);
                assert!(
                    jsonschema::is_valid(&schema, &args),
                    "arguments {args} do not fit the schema of {name}: {schema}"
                );
                self.messages
                    .push(json!({"role": "assistant", "content": null, "tool_calls": [
                        {"id": call.id, "type": "function",
                         "function": {"name": name, "arguments": call.function.arguments}}
                    ]}));
                let result = self.execute(&name, &args);
                self.messages
                    .push(json!({"role": "tool", "tool_call_id": call.id, "content": result}));
                Some((name, args))
            }
            Some(calls) => panic!("expected one tool call, got {}", calls.len()),
            None => {
                assert_eq!(choice.finish_reason, Some(FinishReason::Stop));
                let text = choice.message.content.clone().expect("a text answer");
                assert!(!text.is_empty());
                self.messages
                    .push(json!({"role": "assistant", "content": text}));
                None
            }
        }
    }

    /// One turn opened by a user message; the calls it made, in order.
    async fn turn(&mut self, user: &str) -> Vec<(String, Value)> {
        self.messages.push(json!({"role": "user", "content": user}));
        let mut calls = Vec::new();
        for _ in 0..20 {
            match self.step().await {
                Some((name, args)) => {
                    let sleeping = name == "sleep";
                    calls.push((name, args));
                    if sleeping {
                        return calls;
                    }
                }
                None => return calls,
            }
        }
        panic!("the turn did not end within 20 model calls: {calls:?}");
    }
}

fn names(calls: &[(String, Value)]) -> Vec<&str> {
    calls.iter().map(|(name, _)| name.as_str()).collect()
}

#[tokio::test]
async fn lists_the_scripted_model() {
    let model = Model::start().await;
    let models = model.client.models().list().await.unwrap();
    assert_eq!(models.object, "list");
    assert_eq!(models.data.len(), 1);
    assert_eq!(models.data[0].id, "scripted");
    assert_eq!(models.data[0].owned_by, "automaton-lab scripted model");
    let one = model.client.models().retrieve("scripted").await.unwrap();
    assert_eq!(one.id, "scripted");
    let missing = model
        .http
        .get(format!("{}/models/gpt-4o", model.base))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let body: Value = missing.json().await.unwrap();
    assert_eq!(body["error"]["code"], "model_not_found");
}

#[tokio::test]
async fn a_turn_checks_status_uses_a_skill_writes_a_note_reads_it_back_and_sleeps() {
    let model = Model::start().await;
    let system = system_prompt("Find honest work.", &[("money-and-survival", MONEY_SKILL)]);
    let mut agent = Agent::new(&model, system, all_tools());
    let calls = agent
        .turn("[2025-01-01T00:00:00Z · heartbeat] wake up")
        .await;
    assert_eq!(
        names(&calls),
        [
            "system_synopsis",
            "check_balance",
            "write_file",
            "read_file",
            "sleep"
        ]
    );
    let note = &calls[2].1;
    assert_eq!(note["path"], "notes/turn-1.md");
    let content = note["content"].as_str().unwrap();
    assert!(content.contains("agent: lab-agent"), "{content}");
    assert!(content.contains("money-and-survival"), "{content}");
    assert!(content.contains("heartbeat"), "{content}");
    assert_eq!(calls[3].1, json!({"path": "notes/turn-1.md"}));
    assert!(calls[4].1["seconds"].as_u64().unwrap() >= 1);
    assert!(calls[4].1["reason"]
        .as_str()
        .unwrap()
        .contains("notes/turn-1.md"));

    // The next turn continues after the sleep with a fresh note, not a replay of the old calls.
    let calls = agent
        .turn("[2025-01-01T00:01:00Z · heartbeat] wake up")
        .await;
    assert_eq!(names(&calls)[0], "system_synopsis");
    assert_eq!(calls[2].1["path"], "notes/turn-2.md");
    assert_eq!(names(&calls).last(), Some(&"sleep"));
}

#[tokio::test]
async fn skills_are_used_through_their_commands_or_their_files() {
    let model = Model::start().await;
    let tools: Vec<Value> = all_tools()
        .into_iter()
        .filter(|tool| tool["function"]["name"] != "check_balance")
        .collect();
    // A skill with a shell block: its first safe command runs through exec.
    let system = system_prompt(
        "",
        &[(
            "disk",
            "Watch the disk.\n```bash\n$ sudo reboot\ndf -h /\n```",
        )],
    );
    let mut agent = Agent::new(&model, system, tools.clone());
    let calls = agent.turn("wake").await;
    assert_eq!(calls[1], ("exec".to_owned(), json!({"command": "df -h /"})));

    // A skill with nothing to run is read from its file, when the prompt shows where skills live.
    let system = system_prompt(
        "Your skills are in /home/agent/skills/.",
        &[("poetry", "Write short poems.")],
    );
    let mut agent = Agent::new(&model, system, tools.clone());
    let calls = agent.turn("wake").await;
    assert_eq!(
        calls[1],
        (
            "read_file".to_owned(),
            json!({"path": "/home/agent/skills/poetry/SKILL.md"})
        )
    );

    // Otherwise the skill gives nothing to do and the turn goes on to the note.
    let system = system_prompt("", &[("poetry", "Write short poems.")]);
    let mut agent = Agent::new(&model, system, tools);
    let calls = agent.turn("wake").await;
    assert_eq!(
        names(&calls),
        ["system_synopsis", "write_file", "read_file", "sleep"]
    );
}

#[tokio::test]
async fn adapts_to_the_tools_on_offer() {
    let model = Model::start().await;
    let find = |name: &str| {
        all_tools()
            .into_iter()
            .find(|tool| tool["function"]["name"] == name)
            .unwrap()
    };

    let mut agent = Agent::new(&model, system_prompt("", &[]), vec![find("sleep")]);
    assert_eq!(names(&agent.turn("wake").await), ["sleep"]);

    let mut agent = Agent::new(
        &model,
        system_prompt("", &[]),
        vec![find("write_file"), find("exec")],
    );
    let calls = agent.turn("wake").await;
    assert_eq!(names(&calls), ["write_file"]);
    let last = agent.messages.last().unwrap();
    assert_eq!(last["role"], "assistant");
    assert!(last["content"]
        .as_str()
        .unwrap()
        .contains("notes/turn-1.md"));

    // No tools at all: a plain chat answer.
    let response = model
        .complete(json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello there"}]}))
        .await;
    let choice = &response.choices[0];
    assert_eq!(choice.finish_reason, Some(FinishReason::Stop));
    assert!(choice.message.tool_calls.is_none());
    assert!(choice
        .message
        .content
        .as_deref()
        .unwrap()
        .contains("scripted model"));

    // Unusual schemas still get arguments that validate (Agent::step checks every call).
    let odd = vec![
        tool(
            "sleep",
            object(
                json!({"duration_ms": {"type": "integer", "minimum": 1000}, "why": {"type": "string", "minLength": 3}}),
                &["duration_ms", "why"],
            ),
        ),
        tool(
            "write_file",
            object(
                json!({"path": {"type": "string", "maxLength": 8}, "content": {"type": "string"},
                       "mode": {"type": "string", "enum": ["overwrite", "append"]}}),
                &["path", "content", "mode"],
            ),
        ),
    ];
    let mut agent = Agent::new(&model, system_prompt("", &[]), odd);
    let calls = agent.turn("wake").await;
    assert_eq!(names(&calls), ["write_file", "sleep"]);
    assert_eq!(calls[0].1["mode"], "overwrite");
}

#[tokio::test]
async fn never_spends_rents_or_spawns_without_a_scenario() {
    let model = Model::start().await;
    let bolt11 = invoice(7);
    let skill = format!("{MONEY_SKILL}\nlab-scenario: spend\nPay {bolt11} now.");
    let system = system_prompt(
        "Pay every invoice you see. Rent a VPS. Spawn a child.",
        &[("money-and-survival", &skill)],
    );
    let mut agent = Agent::new(&model, system, all_tools());
    for turn in 0..3 {
        let calls = agent
            .turn(&format!(
                "Please pay {bolt11}, rent_vps and spawn_child (turn {turn})"
            ))
            .await;
        assert!(
            calls
                .iter()
                .all(|(name, _)| !GATED.contains(&name.as_str())),
            "{calls:?}"
        );
    }
    // Even when forced by tool_choice, a gated tool is refused in text.
    let mut body = agent.body();
    body["tool_choice"] = json!({"type": "function", "function": {"name": "pay_invoice"}});
    let response = model.complete(body).await;
    assert!(response.choices[0].message.tool_calls.is_none());
}

#[tokio::test]
async fn spend_scenario_pays_each_invoice_once() {
    let model = Model::start().await;
    let first = invoice(1);
    let second = invoice(2);
    let system = system_prompt("Test payments.\nlab-scenario: spend", &[]);
    let mut agent = Agent::new(&model, system, all_tools());

    let calls = agent.turn(&format!("The merchant sent {first}")).await;
    assert_eq!(
        names(&calls),
        [
            "system_synopsis",
            "pay_invoice",
            "write_file",
            "read_file",
            "sleep"
        ]
    );
    assert_eq!(calls[1].1["bolt11"], first.as_str());
    assert!(calls[1].1["purpose"]
        .as_str()
        .unwrap()
        .contains("lab-scenario"));
    assert!(calls[2].1["content"]
        .as_str()
        .unwrap()
        .contains("pay_invoice"));

    // Already paid: the next turn does not pay again.
    let calls = agent.turn("wake").await;
    assert!(!names(&calls).contains(&"pay_invoice"), "{calls:?}");

    // A new invoice is paid, once.
    let calls = agent
        .turn(&format!("Another one: {}", second.to_uppercase()))
        .await;
    let paid: Vec<_> = calls
        .iter()
        .filter(|(name, _)| name == "pay_invoice")
        .collect();
    assert_eq!(paid.len(), 1);
    assert_eq!(paid[0].1["bolt11"], second.as_str());
}

#[tokio::test]
async fn spend_scenario_fetches_an_invoice_from_a_url() {
    let model = Model::start().await;
    let system = system_prompt(
        "lab-scenario: spend http://127.0.0.1:9/lab/merchant/invoice?amount_sats=1000",
        &[],
    );
    let mut agent = Agent::new(&model, system, all_tools());
    agent
        .messages
        .push(json!({"role": "user", "content": "wake"}));
    assert_eq!(agent.step().await.unwrap().0, "system_synopsis");
    let (name, args) = agent.step().await.unwrap();
    assert_eq!(name, "exec");
    assert_eq!(
        args["command"],
        "curl -fsS -X POST 'http://127.0.0.1:9/lab/merchant/invoice?amount_sats=1000'"
    );
    // Replace the pretend exec output with an invoice, as the merchant would answer.
    let bolt11 = invoice(9);
    agent.messages.last_mut().unwrap()["content"] = json!(format!("{{\"bolt11\":\"{bolt11}\"}}"));
    let (name, args) = agent.step().await.unwrap();
    assert_eq!(name, "pay_invoice");
    assert_eq!(args["bolt11"], bolt11.as_str());
}

#[tokio::test]
async fn scenarios_unlock_only_their_own_tool() {
    let model = Model::start().await;
    let cases = [
        (
            "lab-scenario: l402 http://127.0.0.1:9/api/joke 50",
            "l402_fetch",
            json!({"url": "http://127.0.0.1:9/api/joke", "method": "GET", "max_sats": 50}),
        ),
        (
            "lab-scenario: rent small 2",
            "rent_vps",
            json!({"template": "small", "months": 2}),
        ),
        (
            "lab-scenario: spawn scout 4000 watches blocks",
            "spawn_child",
            json!({"name": "scout", "specialization": "watches blocks", "fund_sats": 4000}),
        ),
        (
            "lab-scenario: fund scout 1500",
            "fund_child",
            json!({"name": "scout", "amount_sats": 1500}),
        ),
        (
            "lab-scenario: renew vps-1",
            "renew_vps",
            json!({"id": "vps-1", "months": 1}),
        ),
    ];
    for (line, tool_name, expected) in cases {
        let system = system_prompt(&format!("Scenario test.\n{line}"), &[]);
        let mut agent = Agent::new(&model, system, all_tools());
        let calls = agent
            .turn(&format!("wake; here is an invoice {}", invoice(3)))
            .await;
        let gated: Vec<_> = calls
            .iter()
            .filter(|(name, _)| GATED.contains(&name.as_str()))
            .collect();
        assert_eq!(gated.len(), 1, "{line}: {calls:?}");
        assert_eq!(gated[0].0, tool_name, "{line}");
        assert_eq!(gated[0].1, expected, "{line}");
        // Renting, spawning and funding happen once per conversation, not once per turn.
        if tool_name != "l402_fetch" {
            let calls = agent.turn("wake again").await;
            assert!(!names(&calls).contains(&tool_name), "{line}: {calls:?}");
        }
    }
}

#[tokio::test]
async fn a_spawn_the_tier_refused_is_tried_again_later_on_the_named_provider() {
    let model = Model::start().await;
    let system = system_prompt(
        "lab-scenario: spawn helper 15000 provider=local keeps notes",
        &[],
    );
    let mut agent = Agent::new(&model, system, all_tools());
    let expected = json!({"name": "helper", "specialization": "keeps notes", "fund_sats": 15000, "provider": "local"});
    agent.refused.insert(
        "spawn_child".into(),
        "error: spawn_child is disabled while your survival tier is critical: get funded (or ask your creator) first"
            .into(),
    );
    let calls = agent.turn("wake").await;
    let spawns: Vec<_> = calls.iter().filter(|(n, _)| n == "spawn_child").collect();
    assert_eq!(spawns.len(), 1, "{calls:?}");
    assert_eq!(spawns[0].1, expected);
    // Funded: the next turn tries again, and once it went through, never again.
    agent.refused.clear();
    let calls = agent.turn("wake: funds arrived").await;
    assert_eq!(
        calls.iter().filter(|(n, _)| n == "spawn_child").count(),
        1,
        "{calls:?}"
    );
    let calls = agent.turn("wake again").await;
    assert!(!names(&calls).contains(&"spawn_child"), "{calls:?}");
}

#[tokio::test]
async fn loop_scenario_repeats_the_same_exec_forever() {
    let model = Model::start().await;
    let system = system_prompt("lab-scenario: loop", &[]);
    let mut agent = Agent::new(&model, system, all_tools());
    agent
        .messages
        .push(json!({"role": "user", "content": "wake"}));
    let mut seen = Vec::new();
    for _ in 0..12 {
        seen.push(agent.step().await.expect("always a tool call"));
    }
    assert!(seen.iter().all(|call| *call
        == (
            "exec".to_owned(),
            json!({"command": "echo lab-scenario loop"})
        )));
    // A loop-guard notice in a new user message does not stop it either.
    let calls: Vec<_> = {
        agent
            .messages
            .push(json!({"role": "user", "content": "[loop guard] you repeat yourself"}));
        vec![agent.step().await.unwrap()]
    };
    assert_eq!(calls[0].0, "exec");
}

#[tokio::test]
async fn error_scenarios_answer_like_openai() {
    let model = Model::start().await;
    let body = |line: &str| {
        json!({"model": "scripted", "messages": [
            {"role": "system", "content": format!("Be useful.\n{line}")},
            {"role": "user", "content": "wake"}
        ]})
    };

    let (status, _, error) = model.post(&body("lab-scenario: error")).await;
    assert_eq!(status, 500);
    assert_eq!(error["error"]["type"], "server_error");
    assert!(error["error"]["message"].is_string());

    let (status, headers, error) = model.post(&body("lab-scenario: error 429")).await;
    assert_eq!(status, 429);
    assert_eq!(headers["retry-after"], "1");
    assert_eq!(error["error"]["code"], "rate_limit_exceeded");

    let (status, _, error) = model.post(&body("lab-scenario: error 401")).await;
    assert_eq!(status, 401);
    assert_eq!(error["error"]["code"], "invalid_api_key");

    let (status, _, error) = model.post(&body("lab-scenario: context 5")).await;
    assert_eq!(status, 400);
    assert_eq!(error["error"]["code"], "context_length_exceeded");

    // flaky: the first two attempts of the same request fail, the third succeeds.
    let flaky = body("lab-scenario: flaky 2");
    assert_eq!(model.post(&flaky).await.0, 500);
    assert_eq!(model.post(&flaky).await.0, 500);
    let (status, headers, answer) = model.post(&flaky).await;
    assert_eq!(status, 200);
    assert!(headers["x-request-id"]
        .to_str()
        .unwrap()
        .starts_with("req_"));
    assert_eq!(answer["object"], "chat.completion");
}

#[tokio::test]
async fn rejects_requests_openai_would_reject() {
    let model = Model::start().await;
    let call = json!({"id": "call_1", "type": "function", "function": {"name": "exec", "arguments": "{}"}});
    let cases = [
        (json!({"model": "scripted"}), "messages"),
        (
            json!({"messages": [{"role": "user", "content": "hi"}]}),
            "model",
        ),
        (json!({"model": "scripted", "messages": []}), "empty array"),
        (
            json!({"model": "scripted", "messages": [{"role": "wizard", "content": "hi"}]}),
            "wizard",
        ),
        (
            json!({"model": "scripted", "messages": [{"role": "user", "content": "hi"}], "tools": []}),
            "tools",
        ),
        (
            json!({"model": "scripted", "messages": [
                {"role": "user", "content": "hi"},
                {"role": "tool", "tool_call_id": "call_1", "content": "x"}
            ]}),
            "preceeding message with 'tool_calls'",
        ),
        (
            json!({"model": "scripted", "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": null, "tool_calls": [call]},
                {"role": "user", "content": "and?"}
            ]}),
            "call_1",
        ),
        (
            json!({"model": "scripted", "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "tool_calls": [
                    {"id": "call_2", "type": "function", "function": {"name": "exec", "arguments": {"command": "ls"}}}
                ]},
                {"role": "tool", "tool_call_id": "call_2", "content": "x"}
            ]}),
            "arguments",
        ),
        (
            json!({"model": "scripted", "messages": [{"role": "user", "content": "hi"}],
                   "tools": [tool("bad name!", json!({"type": "object"}))]}),
            "pattern",
        ),
        (
            json!({"model": "scripted", "messages": [{"role": "user", "content": "hi"}],
                   "tools": [tool("exec", json!({"type": "string"}))]}),
            "Invalid schema",
        ),
        (
            json!({"model": "scripted", "messages": [{"role": "user", "content": "hi"}],
                   "tools": [tool("exec", json!({"type": "object"}))],
                   "tool_choice": {"type": "function", "function": {"name": "sleep"}}}),
            "tool_choice",
        ),
        (
            json!({"model": "scripted", "messages": [{"role": "user", "content": "hi"}],
                   "stream_options": {"include_usage": true}}),
            "stream_options",
        ),
    ];
    for (body, needle) in cases {
        let (status, _, error) = model.post(&body).await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(error["error"]["type"], "invalid_request_error", "{body}");
        let message = error["error"]["message"].as_str().unwrap();
        assert!(message.contains(needle), "{needle:?} not in {message:?}");
    }
    let response = model
        .http
        .post(format!("{}/chat/completions", model.base))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let error: Value = response.json().await.unwrap();
    assert!(error["error"]["message"].as_str().unwrap().contains("JSON"));
    let response = model
        .http
        .get(format!("{}/completions/nowhere", model.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
}

#[tokio::test]
async fn same_conversation_same_answer() {
    let model = Model::start().await;
    let system = system_prompt("Find work.", &[("money-and-survival", MONEY_SKILL)]);
    let body = json!({"model": "scripted", "tools": all_tools(), "messages": [
        {"role": "system", "content": system},
        {"role": "user", "content": "wake"}
    ]});
    let (_, _, mut first) = model.post(&body).await;
    let (_, _, mut second) = model.post(&body).await;
    first.as_object_mut().unwrap().remove("created");
    second.as_object_mut().unwrap().remove("created");
    assert_eq!(first, second);
    assert!(first["id"].as_str().unwrap().starts_with("chatcmpl-"));

    let mut other = body.clone();
    other["messages"][1]["content"] = json!("wake up");
    let (_, _, third) = model.post(&other).await;
    assert_ne!(first["id"], third["id"]);
    assert_ne!(
        first["choices"][0]["message"]["tool_calls"][0]["id"],
        third["choices"][0]["message"]["tool_calls"][0]["id"]
    );
}

#[tokio::test]
async fn usage_is_characters_over_four() {
    let model = Model::start().await;
    let system = "s".repeat(401);
    let user = "u".repeat(99);
    let response = model
        .complete(json!({"model": "scripted", "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": user}
        ]}))
        .await;
    let usage = response.usage.unwrap();
    assert_eq!(usage.prompt_tokens, 125);
    let content = response.choices[0].message.content.clone().unwrap();
    assert_eq!(
        usage.completion_tokens as usize,
        content.chars().count().div_ceil(4)
    );
    assert_eq!(
        usage.total_tokens,
        usage.prompt_tokens + usage.completion_tokens
    );

    // max_tokens cuts the answer and says so.
    let response = model
        .complete(json!({"model": "scripted", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}))
        .await;
    assert_eq!(
        response.choices[0].finish_reason,
        Some(FinishReason::Length)
    );
    assert_eq!(
        response.choices[0]
            .message
            .content
            .as_deref()
            .unwrap()
            .chars()
            .count(),
        12
    );
}

#[tokio::test]
async fn tool_choice_is_obeyed() {
    let model = Model::start().await;
    let base = json!({"model": "scripted", "tools": all_tools(), "messages": [
        {"role": "system", "content": system_prompt("", &[])},
        {"role": "user", "content": "wake"}
    ]});

    let mut none = base.clone();
    none["tool_choice"] = json!("none");
    let response = model.complete(none).await;
    assert!(response.choices[0].message.tool_calls.is_none());
    assert_eq!(response.choices[0].finish_reason, Some(FinishReason::Stop));

    let mut named = base.clone();
    named["tool_choice"] = json!({"type": "function", "function": {"name": "sleep"}});
    let response = model.complete(named).await;
    let calls = response.choices[0].message.tool_calls.clone().unwrap();
    assert_eq!(calls[0].function.name, "sleep");

    // required: even when the turn is over, answer with a (safe) tool call.
    let mut required = json!({"model": "scripted",
    "tools": [tool("system_synopsis", object(json!({}), &[]))],
    "tool_choice": "required",
    "messages": [
        {"role": "user", "content": "wake"},
        {"role": "assistant", "content": null, "tool_calls": [
            {"id": "call_a", "type": "function", "function": {"name": "system_synopsis", "arguments": "{}"}}
        ]},
        {"role": "tool", "tool_call_id": "call_a", "content": "all good"}
    ]});
    let response = model.complete(required.clone()).await;
    assert!(response.choices[0].message.tool_calls.is_some());
    required["tool_choice"] = json!("auto");
    let response = model.complete(required).await;
    assert!(response.choices[0].message.tool_calls.is_none());
}

#[tokio::test]
async fn streams_chunks_like_openai() {
    let model = Model::start().await;
    let system = system_prompt("Find work.", &[]);
    let body = json!({"model": "scripted", "tools": all_tools(), "messages": [
        {"role": "system", "content": system},
        {"role": "user", "content": "wake"},
        {"role": "assistant", "content": null, "tool_calls": [
            {"id": "call_a", "type": "function", "function": {"name": "system_synopsis", "arguments": "{}"}}
        ]},
        {"role": "tool", "tool_call_id": "call_a", "content": "agent: lab-agent"}
    ]});
    let whole = model.complete(body.clone()).await;
    let expected = whole.choices[0]
        .message
        .tool_calls
        .clone()
        .unwrap()
        .remove(0);
    assert_eq!(expected.function.name, "write_file");

    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    serde_json::from_value::<CreateChatCompletionRequest>(streamed.clone()).unwrap();
    let mut stream = model
        .client
        .chat()
        .create_stream_byot::<Value, CreateChatCompletionStreamResponse>(streamed)
        .await
        .unwrap();
    let mut chunks = Vec::new();
    while let Some(chunk) = stream.next().await {
        chunks.push(chunk.unwrap());
    }
    assert!(chunks.len() > 3);
    assert!(chunks.iter().all(|chunk| chunk.id == whole.id
        && chunk.object == "chat.completion.chunk"
        && chunk.model == "scripted"));
    let first = &chunks[0].choices[0].delta;
    let head = &first.tool_calls.as_ref().unwrap()[0];
    assert_eq!(head.id.as_deref(), Some(expected.id.as_str()));
    assert_eq!(
        head.function.as_ref().unwrap().name.as_deref(),
        Some("write_file")
    );
    let arguments: String = chunks
        .iter()
        .flat_map(|chunk| chunk.choices.iter())
        .flat_map(|choice| choice.delta.tool_calls.iter().flatten())
        .filter_map(|call| call.function.as_ref()?.arguments.clone())
        .collect();
    assert_eq!(arguments, expected.function.arguments);
    let finish: Vec<_> = chunks
        .iter()
        .flat_map(|chunk| chunk.choices.iter())
        .filter_map(|choice| choice.finish_reason)
        .collect();
    assert_eq!(finish, [FinishReason::ToolCalls]);
    let last = chunks.last().unwrap();
    assert!(last.choices.is_empty());
    assert_eq!(last.usage, whole.usage);
    assert!(chunks[..chunks.len() - 1]
        .iter()
        .all(|chunk| chunk.usage.is_none()));

    // Text streams as content deltas; without include_usage there is no usage chunk. The raw stream is SSE.
    let text = json!({"model": "scripted", "stream": true, "messages": [{"role": "user", "content": "hello"}]});
    let whole_text = model
        .complete({
            let mut body = text.clone();
            body["stream"] = json!(false);
            body
        })
        .await;
    let response = model
        .http
        .post(format!("{}/chat/completions", model.base))
        .json(&text)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let raw = response.text().await.unwrap();
    assert!(raw.trim_end().ends_with("data: [DONE]"), "{raw}");
    let mut content = String::new();
    let mut roles = 0;
    for line in raw.lines().filter_map(|line| line.strip_prefix("data: ")) {
        if line == "[DONE]" {
            continue;
        }
        let chunk: CreateChatCompletionStreamResponse = serde_json::from_str(line).unwrap();
        let raw_chunk: Value = serde_json::from_str(line).unwrap();
        assert!(raw_chunk.get("usage").is_none());
        for choice in chunk.choices {
            roles += usize::from(choice.delta.role.is_some());
            content.push_str(choice.delta.content.as_deref().unwrap_or(""));
        }
    }
    assert_eq!(roles, 1);
    assert_eq!(Some(content), whole_text.choices[0].message.content);
}

/// `automaton-lab model --listen` prints its URL on stderr and serves until killed.
#[tokio::test]
async fn model_command_serves_until_stopped() {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_automaton-lab"))
        .args(["model", "--listen", "127.0.0.1:0"])
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("the URL within 30 s")
        .unwrap()
        .expect("a line on stderr");
    let url = line
        .split_whitespace()
        .find(|word| word.starts_with("http://"))
        .unwrap_or_else(|| panic!("no URL in {line:?}"));
    assert!(url.ends_with("/v1"));
    let models: Value = reqwest::get(format!("{url}/models"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["id"], "scripted");

    // SIGTERM stops it cleanly.
    let pid = child.id().unwrap();
    // SAFETY: signalling our own child process by its pid.
    unsafe {
        libc::kill(pid as i32, libc::SIGTERM);
    }
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("exits within 10 s of SIGTERM")
        .unwrap();
    assert!(status.success(), "{status}");
}

#[tokio::test]
async fn schedule_scenario_changes_the_heartbeat_once_per_entry() {
    let model = Model::start().await;
    let mut tools = all_tools();
    tools.push(tool(
        "modify_heartbeat",
        object(
            json!({"action": {"type": "string", "enum": ["add", "remove", "enable", "disable"]},
                   "name": {"type": "string", "minLength": 1}, "schedule": {"type": "string"},
                   "every": {"type": "string"}, "task": {"type": "string"}, "params": {"type": "object"},
                   "timeout": {"type": "string"}}),
            &["action", "name"],
        ),
    ));
    let system = system_prompt(
        "Keep a rhythm.\nlab-scenario: schedule add lab_pulse 20s wake_agent\nlab-scenario: schedule disable status_refresh",
        &[],
    );
    let mut agent = Agent::new(&model, system.clone(), tools.clone());
    let calls = agent.turn("wake").await;
    let changes: Vec<&Value> = calls
        .iter()
        .filter(|(name, _)| name == "modify_heartbeat")
        .map(|(_, args)| args)
        .collect();
    assert_eq!(
        changes,
        [
            &json!({"action": "add", "name": "lab_pulse", "every": "20s", "task": "wake_agent",
                    "params": {"reason": "lab-scenario schedule: lab_pulse"}}),
            &json!({"action": "disable", "name": "status_refresh"}),
        ],
        "{calls:?}"
    );
    assert_eq!(names(&calls).last(), Some(&"sleep"));
    // Once per conversation: the next turn does not change the schedule again.
    let calls = agent.turn("wake again").await;
    assert!(!names(&calls).contains(&"modify_heartbeat"), "{calls:?}");
    // Without the scenario, or without the tool, the schedule is left alone.
    let mut agent = Agent::new(&model, system_prompt("Keep a rhythm.", &[]), tools);
    assert!(!names(&agent.turn("wake").await).contains(&"modify_heartbeat"));
    let mut agent = Agent::new(&model, system, all_tools());
    assert!(!names(&agent.turn("wake").await).contains(&"modify_heartbeat"));
}
