//! The Anthropic Messages backend: `tool_use` / `tool_result` content blocks over our own reqwest transport,
//! one attempt per call.

use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{
    classify_status, classify_transport, clip_message, read_body, ChatRequest, Completion,
    InferenceError, InferenceProvider, Message, StopReason, ToolCall, Usage,
};
use crate::config::keys::ConfigKey;
use crate::config::Secret;

pub const DEFAULT_BASE_URL: &str = "https://api.anthropic.com/v1";
pub const DEFAULT_MODEL: &str = "claude-sonnet-4-5";
const API_VERSION: &str = "2023-06-01";

const KEYS: &[ConfigKey] = &[
    ConfigKey {
        name: "inference.base_url",
        prompt: "Anthropic API base URL (ending in /v1)",
        default: Some(DEFAULT_BASE_URL),
        secret: false,
    },
    ConfigKey {
        name: "inference.model",
        prompt: "Model name",
        default: Some(DEFAULT_MODEL),
        secret: false,
    },
    ConfigKey {
        name: "inference.api_key_env",
        prompt: "Environment variable that holds the API key",
        default: Some("ANTHROPIC_API_KEY"),
        secret: false,
    },
];

/// The config keys the setup wizard asks for this backend.
pub fn config_keys() -> &'static [ConfigKey] {
    KEYS
}

/// The Anthropic Messages API.
pub struct AnthropicProvider {
    http: reqwest::Client,
    url: String,
    model: String,
    key: Option<Secret>,
    timeout: Duration,
}

impl std::fmt::Debug for AnthropicProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AnthropicProvider")
            .field("url", &self.url)
            .field("model", &self.model)
            .field("key", &self.key.as_ref().map(|_| "[redacted]"))
            .finish()
    }
}

#[derive(Serialize, Debug)]
pub struct MessagesRequest {
    pub model: String,
    pub max_tokens: u32,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub system: String,
    pub messages: Vec<WireMessage>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<WireTool>,
}

#[derive(Serialize, Debug, PartialEq)]
pub struct WireMessage {
    pub role: &'static str,
    pub content: Vec<Block>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Block {
    Text {
        text: String,
    },
    ToolUse {
        id: String,
        name: String,
        input: Value,
    },
    ToolResult {
        tool_use_id: String,
        content: String,
        #[serde(skip_serializing_if = "std::ops::Not::not", default)]
        is_error: bool,
    },
    /// Thinking and other blocks we neither send nor act on.
    #[serde(other)]
    Unknown,
}

#[derive(Serialize, Debug)]
pub struct WireTool {
    pub name: String,
    pub description: String,
    pub input_schema: Value,
}

#[derive(Deserialize, Debug)]
struct MessagesResponse {
    #[serde(default)]
    content: Vec<Block>,
    #[serde(default)]
    model: String,
    #[serde(default)]
    stop_reason: Option<String>,
    #[serde(default)]
    usage: Option<WireUsage>,
}

#[derive(Deserialize, Debug)]
struct WireUsage {
    #[serde(default)]
    input_tokens: u32,
    #[serde(default)]
    output_tokens: u32,
}

impl AnthropicProvider {
    pub fn new(
        base_url: &str,
        model: &str,
        key: Option<Secret>,
        timeout: Duration,
    ) -> Result<AnthropicProvider, InferenceError> {
        let base = base_url.trim().trim_end_matches('/');
        let parsed = reqwest::Url::parse(base)
            .map_err(|e| InferenceError::Config(format!("inference.base_url {base:?}: {e}")))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(InferenceError::Config(format!(
                "inference.base_url {base:?}: only http and https are supported"
            )));
        }
        if model.trim().is_empty() {
            return Err(InferenceError::Config("inference.model is empty".into()));
        }
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(30)))
            .user_agent(concat!("automaton/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| InferenceError::Config(format!("HTTP client: {e}")))?;
        Ok(AnthropicProvider {
            http,
            url: format!("{base}/messages"),
            model: model.to_string(),
            key,
            timeout,
        })
    }

    /// The exact request body we send. Consecutive messages of one role are merged, because the API wants
    /// user and assistant to alternate and tool results travel in user messages.
    pub fn request_body(&self, request: &ChatRequest) -> MessagesRequest {
        let mut messages: Vec<WireMessage> = Vec::new();
        for message in &request.messages {
            let (role, blocks) = match message {
                Message::User { content } => (
                    "user",
                    vec![Block::Text {
                        text: content.clone(),
                    }],
                ),
                Message::Assistant {
                    content,
                    tool_calls,
                } => {
                    let mut blocks = Vec::new();
                    if let Some(text) = content.as_ref().filter(|t| !t.trim().is_empty()) {
                        blocks.push(Block::Text { text: text.clone() });
                    }
                    for call in tool_calls {
                        let input = serde_json::from_str::<Value>(&call.arguments)
                            .ok()
                            .filter(Value::is_object)
                            // The API insists on an object; keep what the model wrote so it can see its mistake.
                            .unwrap_or_else(|| serde_json::json!({ "_raw": call.arguments }));
                        blocks.push(Block::ToolUse {
                            id: call.id.clone(),
                            name: call.name.clone(),
                            input,
                        });
                    }
                    ("assistant", blocks)
                }
                Message::Tool {
                    tool_call_id,
                    content,
                    is_error,
                    ..
                } => (
                    "user",
                    vec![Block::ToolResult {
                        tool_use_id: tool_call_id.clone(),
                        content: content.clone(),
                        is_error: *is_error,
                    }],
                ),
            };
            if blocks.is_empty() {
                continue;
            }
            match messages.last_mut() {
                Some(last) if last.role == role => last.content.extend(blocks),
                _ => messages.push(WireMessage {
                    role,
                    content: blocks,
                }),
            }
        }
        MessagesRequest {
            model: self.model.clone(),
            max_tokens: request.max_tokens,
            system: request.system.clone(),
            messages,
            tools: request
                .tools
                .iter()
                .map(|t| WireTool {
                    name: t.name.clone(),
                    description: t.description.clone(),
                    input_schema: t.parameters.clone(),
                })
                .collect(),
        }
    }
}

#[async_trait]
impl InferenceProvider for AnthropicProvider {
    async fn complete(&self, request: &ChatRequest) -> Result<Completion, InferenceError> {
        let body = self.request_body(request);
        let mut http = self
            .http
            .post(&self.url)
            .header("anthropic-version", API_VERSION)
            .json(&body);
        if let Some(key) = &self.key {
            http = http.header("x-api-key", key.expose());
        }
        let response = http
            .send()
            .await
            .map_err(|e| classify_transport(e, self.timeout))?;
        let status = response.status();
        let headers = response.headers().clone();
        let text = read_body(response, self.timeout).await?;
        if !status.is_success() {
            let (kind, message) = error_fields(&text);
            return Err(classify_status(
                status.as_u16(),
                &headers,
                kind.as_deref(),
                &message,
            ));
        }
        parse_response(&text)
    }
}

/// `{"type":"error","error":{"type":"rate_limit_error","message":"…"}}`
fn error_fields(body: &str) -> (Option<String>, String) {
    let Ok(value) = serde_json::from_str::<Value>(body) else {
        return (None, body.to_string());
    };
    let err = value.get("error").unwrap_or(&value);
    let kind = err.get("type").and_then(Value::as_str).map(str::to_string);
    let message = err
        .get("message")
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| body.to_string());
    (kind, message)
}

fn parse_response(body: &str) -> Result<Completion, InferenceError> {
    let response: MessagesResponse = serde_json::from_str(body)
        .map_err(|e| InferenceError::BadResponse(clip_message(&e.to_string())))?;
    let mut texts = Vec::new();
    let mut tool_calls = Vec::new();
    for block in response.content {
        match block {
            Block::Text { text } => texts.push(text),
            Block::ToolUse { id, name, input } => tool_calls.push(ToolCall {
                id,
                name,
                arguments: input.to_string(),
            }),
            Block::ToolResult { .. } | Block::Unknown => {}
        }
    }
    let text = Some(texts.join("\n")).filter(|t| !t.trim().is_empty());
    let stop_reason = match response.stop_reason.as_deref() {
        _ if !tool_calls.is_empty() => StopReason::ToolCalls,
        Some("end_turn") | Some("stop_sequence") | None => StopReason::Stop,
        Some("tool_use") => StopReason::ToolCalls,
        Some("max_tokens") => StopReason::Length,
        Some(_) => StopReason::Other,
    };
    let usage = response
        .usage
        .map(|u| Usage {
            prompt_tokens: u.input_tokens,
            completion_tokens: u.output_tokens,
        })
        .unwrap_or_default();
    Ok(Completion {
        text,
        tool_calls,
        usage,
        stop_reason,
        model: response.model,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inference::ToolSpec;

    #[test]
    fn tool_results_travel_in_user_messages_and_roles_alternate() {
        let p = AnthropicProvider::new(
            "http://127.0.0.1:1/v1",
            "claude",
            None,
            Duration::from_secs(1),
        )
        .expect("provider");
        let req = ChatRequest {
            system: "SYS".into(),
            messages: vec![
                Message::User {
                    content: "go".into(),
                },
                Message::Assistant {
                    content: Some("thinking".into()),
                    tool_calls: vec![
                        ToolCall {
                            id: "t1".into(),
                            name: "exec".into(),
                            arguments: "{\"command\":\"ls\"}".into(),
                        },
                        ToolCall {
                            id: "t2".into(),
                            name: "read_file".into(),
                            arguments: "not json".into(),
                        },
                    ],
                },
                Message::Tool {
                    tool_call_id: "t1".into(),
                    name: "exec".into(),
                    content: "a b".into(),
                    is_error: false,
                },
                Message::Tool {
                    tool_call_id: "t2".into(),
                    name: "read_file".into(),
                    content: "bad args".into(),
                    is_error: true,
                },
                Message::User {
                    content: "next".into(),
                },
            ],
            tools: vec![ToolSpec {
                name: "exec".into(),
                description: "run".into(),
                parameters: serde_json::json!({"type": "object"}),
            }],
            max_tokens: 50,
        };
        let body = serde_json::to_value(p.request_body(&req)).expect("json");
        assert_eq!(body["system"], "SYS");
        let msgs = body["messages"].as_array().expect("messages");
        assert_eq!(msgs.len(), 3);
        assert_eq!(msgs[1]["content"][1]["type"], "tool_use");
        assert_eq!(msgs[1]["content"][1]["input"]["command"], "ls");
        assert_eq!(msgs[1]["content"][2]["input"]["_raw"], "not json");
        assert_eq!(msgs[2]["role"], "user");
        assert_eq!(msgs[2]["content"][0]["type"], "tool_result");
        assert!(msgs[2]["content"][0].get("is_error").is_none());
        assert_eq!(msgs[2]["content"][1]["is_error"], true);
        assert_eq!(msgs[2]["content"][2]["type"], "text");
        assert_eq!(body["tools"][0]["input_schema"]["type"], "object");
    }

    #[test]
    fn parses_tool_use_answers() {
        let body = r#"{"id":"m","type":"message","role":"assistant","model":"claude","content":[{"type":"thinking","thinking":"hm"},{"type":"text","text":"Let me look."},{"type":"tool_use","id":"tu1","name":"exec","input":{"command":"ls"}}],"stop_reason":"tool_use","usage":{"input_tokens":12,"output_tokens":7}}"#;
        let c = parse_response(body).expect("parse");
        assert_eq!(c.text.as_deref(), Some("Let me look."));
        assert_eq!(c.tool_calls[0].id, "tu1");
        assert_eq!(c.tool_calls[0].arguments, "{\"command\":\"ls\"}");
        assert_eq!(c.stop_reason, StopReason::ToolCalls);
        assert_eq!(c.usage.prompt_tokens, 12);
        let (kind, msg) = error_fields(
            r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
        );
        assert_eq!(kind.as_deref(), Some("overloaded_error"));
        assert_eq!(msg, "Overloaded");
    }
}
