//! The OpenAI-compatible chat-completions backend (OpenAI, OpenRouter, ollama, llama.cpp, lab and Conway
//! endpoints): async-openai's request/response types over our own reqwest transport, one attempt per call.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_openai::types::{
    ChatCompletionMessageToolCall, ChatCompletionRequestAssistantMessage,
    ChatCompletionRequestAssistantMessageContent, ChatCompletionRequestMessage,
    ChatCompletionRequestSystemMessage, ChatCompletionRequestSystemMessageContent,
    ChatCompletionRequestToolMessage, ChatCompletionRequestToolMessageContent,
    ChatCompletionRequestUserMessage, ChatCompletionRequestUserMessageContent, ChatCompletionTool,
    ChatCompletionToolChoiceOption, ChatCompletionToolType, CreateChatCompletionRequest,
    CreateChatCompletionResponse, FinishReason, FunctionCall, FunctionObject,
};
use async_trait::async_trait;
use serde_json::Value;

use super::{
    classify_status, classify_transport, clip_message, read_body, ChatRequest, Completion,
    InferenceError, InferenceProvider, Message, PaidHttp, StopReason, ToolCall, Usage,
};
use crate::config::keys::ConfigKey;
use crate::config::Secret;

pub const DEFAULT_BASE_URL: &str = "https://api.openai.com/v1";
pub const DEFAULT_MODEL: &str = "gpt-4o-mini";

const KEYS: &[ConfigKey] = &[
    ConfigKey {
        name: "inference.base_url",
        prompt: "Inference endpoint (OpenAI-compatible base URL, ending in /v1)",
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
        prompt: "Environment variable that holds the API key (empty for none)",
        default: Some("OPENAI_API_KEY"),
        secret: false,
    },
];

/// The config keys the setup wizard asks for this backend.
pub fn config_keys() -> &'static [ConfigKey] {
    KEYS
}

/// An OpenAI-compatible endpoint.
pub struct OpenAiProvider {
    http: reqwest::Client,
    url: String,
    model: String,
    key: Option<Secret>,
    timeout: Duration,
    /// Newer OpenAI models reject `max_tokens`; older local servers only know it. Start with the widely supported
    /// one and switch for good the first time the server says so.
    use_max_completion_tokens: AtomicBool,
    /// Paid inference: requests go through this transport, which pays the endpoint's L402 challenges.
    payer: Option<Arc<dyn PaidHttp>>,
}

impl std::fmt::Debug for OpenAiProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenAiProvider")
            .field("url", &self.url)
            .field("model", &self.model)
            .field("key", &self.key.as_ref().map(|_| "[redacted]"))
            .finish()
    }
}

impl OpenAiProvider {
    pub fn new(
        base_url: &str,
        model: &str,
        key: Option<Secret>,
        timeout: Duration,
    ) -> Result<OpenAiProvider, InferenceError> {
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
        Ok(OpenAiProvider {
            http,
            url: format!("{base}/chat/completions"),
            model: model.to_string(),
            key,
            timeout,
            use_max_completion_tokens: AtomicBool::new(false),
            payer: None,
        })
    }

    /// Sends every request through `payer` (paid inference) instead of plain HTTP.
    pub fn with_payer(mut self, payer: Option<Arc<dyn PaidHttp>>) -> OpenAiProvider {
        self.payer = payer;
        self
    }

    /// One attempt through the paying transport: the same request, the same classification of the answer.
    async fn attempt_paid(
        &self,
        payer: &dyn PaidHttp,
        request: &ChatRequest,
    ) -> Result<Completion, InferenceError> {
        let body = serde_json::to_vec(&self.request_body(request))
            .map_err(|e| InferenceError::BadResponse(format!("cannot encode the request: {e}")))?;
        let mut headers = vec![("content-type".to_string(), "application/json".to_string())];
        if let Some(key) = &self.key {
            headers.push((
                "authorization".to_string(),
                format!("Bearer {}", key.expose()),
            ));
        }
        let response = payer.post(&self.url, headers, body, self.timeout).await?;
        if response.paid_msat > 0 {
            tracing::info!(
                paid_msat = response.paid_msat,
                "paid for an inference call over L402"
            );
        }
        let text = String::from_utf8_lossy(&response.body).into_owned();
        if !(200..300).contains(&response.status) {
            let (code, message) = error_fields(&text);
            return Err(classify_status(
                response.status,
                &response.headers,
                code.as_deref(),
                &message,
            ));
        }
        parse_response(&text)
    }

    /// The exact request body we send (also used by tests).
    pub fn request_body(&self, request: &ChatRequest) -> CreateChatCompletionRequest {
        let mut messages = Vec::with_capacity(request.messages.len() + 1);
        messages.push(ChatCompletionRequestMessage::System(
            ChatCompletionRequestSystemMessage {
                content: ChatCompletionRequestSystemMessageContent::Text(request.system.clone()),
                name: None,
            },
        ));
        for message in &request.messages {
            messages.push(match message {
                Message::User { content } => {
                    ChatCompletionRequestMessage::User(ChatCompletionRequestUserMessage {
                        content: ChatCompletionRequestUserMessageContent::Text(content.clone()),
                        name: None,
                    })
                }
                Message::Assistant {
                    content,
                    tool_calls,
                } => {
                    ChatCompletionRequestMessage::Assistant(ChatCompletionRequestAssistantMessage {
                        content: content
                            .clone()
                            .map(ChatCompletionRequestAssistantMessageContent::Text),
                        tool_calls: (!tool_calls.is_empty()).then(|| {
                            tool_calls
                                .iter()
                                .map(|c| ChatCompletionMessageToolCall {
                                    id: c.id.clone(),
                                    r#type: ChatCompletionToolType::Function,
                                    function: FunctionCall {
                                        name: c.name.clone(),
                                        arguments: c.arguments.clone(),
                                    },
                                })
                                .collect()
                        }),
                        ..Default::default()
                    })
                }
                Message::Tool {
                    tool_call_id,
                    content,
                    ..
                } => ChatCompletionRequestMessage::Tool(ChatCompletionRequestToolMessage {
                    content: ChatCompletionRequestToolMessageContent::Text(content.clone()),
                    tool_call_id: tool_call_id.clone(),
                }),
            });
        }
        let tools: Vec<ChatCompletionTool> = request
            .tools
            .iter()
            .map(|t| ChatCompletionTool {
                r#type: ChatCompletionToolType::Function,
                function: FunctionObject {
                    name: t.name.clone(),
                    description: Some(t.description.clone()),
                    parameters: Some(t.parameters.clone()),
                    strict: None,
                },
            })
            .collect();
        let has_tools = !tools.is_empty();
        let mut body = CreateChatCompletionRequest {
            model: self.model.clone(),
            messages,
            tools: has_tools.then_some(tools),
            tool_choice: has_tools.then_some(ChatCompletionToolChoiceOption::Auto),
            ..Default::default()
        };
        if self.use_max_completion_tokens.load(Ordering::Relaxed) {
            body.max_completion_tokens = Some(request.max_tokens);
        } else {
            #[allow(deprecated)] // still the only limit many OpenAI-compatible servers understand
            {
                body.max_tokens = Some(request.max_tokens);
            }
        }
        body
    }

    async fn attempt(&self, request: &ChatRequest) -> Result<Completion, InferenceError> {
        if let Some(payer) = &self.payer {
            return self.attempt_paid(payer.as_ref(), request).await;
        }
        let body = self.request_body(request);
        let mut http = self.http.post(&self.url).json(&body);
        if let Some(key) = &self.key {
            http = http.bearer_auth(key.expose());
        }
        let response = http
            .send()
            .await
            .map_err(|e| classify_transport(e, self.timeout))?;
        let status = response.status();
        let headers = response.headers().clone();
        let text = read_body(response, self.timeout).await?;
        if !status.is_success() {
            let (code, message) = error_fields(&text);
            return Err(classify_status(
                status.as_u16(),
                &headers,
                code.as_deref(),
                &message,
            ));
        }
        parse_response(&text)
    }
}

#[async_trait]
impl InferenceProvider for OpenAiProvider {
    async fn complete(&self, request: &ChatRequest) -> Result<Completion, InferenceError> {
        match self.attempt(request).await {
            Err(InferenceError::BadRequest { message, .. })
                if message.contains("max_completion_tokens")
                    && !self.use_max_completion_tokens.swap(true, Ordering::Relaxed) =>
            {
                tracing::info!("endpoint wants max_completion_tokens; switching");
                self.attempt(request).await
            }
            other => other,
        }
    }
}

/// `{"error": {"message", "type", "code"}}`, or whatever text the server sent.
fn error_fields(body: &str) -> (Option<String>, String) {
    let Ok(value) = serde_json::from_str::<Value>(body) else {
        return (None, body.to_string());
    };
    let err = value.get("error").unwrap_or(&value);
    let message = match err {
        Value::String(s) => s.clone(),
        _ => err
            .get("message")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| body.to_string()),
    };
    let code = err
        .get("code")
        .and_then(|c| match c {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        })
        .or_else(|| err.get("type").and_then(Value::as_str).map(str::to_string));
    (code, message)
}

/// Decodes a chat completion. Many compatible servers leave out fields the OpenAI schema marks required
/// (`created`, `object`, a tool call's `type`), or send tool arguments as an object; fill those in first so a
/// small server quirk does not become a failed turn.
pub(crate) fn parse_response(body: &str) -> Result<Completion, InferenceError> {
    let mut value: Value = serde_json::from_str(body)
        .map_err(|e| InferenceError::BadResponse(format!("not JSON: {e}")))?;
    normalize(&mut value);
    let response: CreateChatCompletionResponse = serde_json::from_value(value)
        .map_err(|e| InferenceError::BadResponse(clip_message(&e.to_string())))?;
    let choice = response
        .choices
        .into_iter()
        .next()
        .ok_or_else(|| InferenceError::BadResponse("no choices in the answer".into()))?;
    let usage = response
        .usage
        .map(|u| Usage {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
        })
        .unwrap_or_default();
    let tool_calls: Vec<ToolCall> = choice
        .message
        .tool_calls
        .unwrap_or_default()
        .into_iter()
        .map(|c| ToolCall {
            id: c.id,
            name: c.function.name,
            arguments: c.function.arguments,
        })
        .collect();
    let text = choice.message.content.filter(|t| !t.trim().is_empty());
    let stop_reason = match choice.finish_reason {
        _ if !tool_calls.is_empty() => StopReason::ToolCalls,
        Some(FinishReason::Stop) | None => StopReason::Stop,
        Some(FinishReason::ToolCalls) | Some(FinishReason::FunctionCall) => StopReason::ToolCalls,
        Some(FinishReason::Length) => StopReason::Length,
        Some(FinishReason::ContentFilter) => StopReason::Other,
    };
    Ok(Completion {
        text,
        tool_calls,
        usage,
        stop_reason,
        model: response.model,
    })
}

fn normalize(value: &mut Value) {
    let Some(obj) = value.as_object_mut() else {
        return;
    };
    obj.entry("id")
        .or_insert_with(|| Value::String(String::new()));
    obj.entry("object")
        .or_insert_with(|| Value::String("chat.completion".into()));
    if !obj.get("created").is_some_and(Value::is_u64) {
        obj.insert("created".into(), Value::from(0u32));
    }
    obj.entry("model")
        .or_insert_with(|| Value::String(String::new()));
    if obj.get("usage").is_some_and(|u| !u.is_object()) {
        obj.remove("usage");
    }
    if let Some(Value::Object(usage)) = obj.get_mut("usage") {
        for field in ["prompt_tokens", "completion_tokens", "total_tokens"] {
            if !usage.get(field).is_some_and(Value::is_u64) {
                usage.insert(field.into(), Value::from(0u32));
            }
        }
    }
    // Unknown finish reasons (e.g. "eos" from some local servers) should not fail the turn.
    let Some(Value::Array(choices)) = obj.get_mut("choices") else {
        return;
    };
    for (i, choice) in choices.iter_mut().enumerate() {
        let Some(choice) = choice.as_object_mut() else {
            continue;
        };
        choice.entry("index").or_insert_with(|| Value::from(i));
        if let Some(reason) = choice.get("finish_reason").and_then(Value::as_str) {
            if !matches!(
                reason,
                "stop" | "length" | "tool_calls" | "content_filter" | "function_call"
            ) {
                choice.insert("finish_reason".into(), Value::String("stop".into()));
            }
        }
        let Some(Value::Object(message)) = choice.get_mut("message") else {
            continue;
        };
        message
            .entry("role")
            .or_insert_with(|| Value::String("assistant".into()));
        if let Some(Value::Array(calls)) = message.get_mut("tool_calls") {
            for call in calls.iter_mut() {
                let Some(call) = call.as_object_mut() else {
                    continue;
                };
                let has_id = matches!(call.get("id"), Some(Value::String(id)) if !id.is_empty());
                if !has_id {
                    call.insert(
                        "id".into(),
                        Value::String(format!("call_{}", ulid::Ulid::new())),
                    );
                }
                call.insert("type".into(), Value::String("function".into()));
                if let Some(Value::Object(function)) = call.get_mut("function") {
                    match function.get("arguments") {
                        Some(Value::String(_)) => {}
                        None | Some(Value::Null) => {
                            function.insert("arguments".into(), Value::String("{}".into()));
                        }
                        Some(other) => {
                            let text = other.to_string();
                            function.insert("arguments".into(), Value::String(text));
                        }
                    }
                }
            }
        } else if message.get("tool_calls").is_some() {
            message.remove("tool_calls");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inference::ToolSpec;

    #[test]
    fn request_body_has_system_tools_and_results() {
        let p = OpenAiProvider::new("http://127.0.0.1:1/v1/", "m", None, Duration::from_secs(1))
            .expect("provider");
        assert_eq!(p.url, "http://127.0.0.1:1/v1/chat/completions");
        let req = ChatRequest {
            system: "SYS".into(),
            messages: vec![
                Message::User {
                    content: "go".into(),
                },
                Message::Assistant {
                    content: None,
                    tool_calls: vec![ToolCall {
                        id: "c1".into(),
                        name: "exec".into(),
                        arguments: "{\"command\":\"ls\"}".into(),
                    }],
                },
                Message::Tool {
                    tool_call_id: "c1".into(),
                    name: "exec".into(),
                    content: "out".into(),
                    is_error: false,
                },
            ],
            tools: vec![ToolSpec {
                name: "exec".into(),
                description: "run".into(),
                parameters: serde_json::json!({"type": "object"}),
            }],
            max_tokens: 99,
        };
        let body = serde_json::to_value(p.request_body(&req)).expect("json");
        assert_eq!(body["messages"][0]["role"], "system");
        assert_eq!(body["messages"][0]["content"], "SYS");
        assert_eq!(
            body["messages"][2]["tool_calls"][0]["function"]["name"],
            "exec"
        );
        assert_eq!(body["messages"][3]["role"], "tool");
        assert_eq!(body["messages"][3]["tool_call_id"], "c1");
        assert_eq!(body["tools"][0]["type"], "function");
        assert_eq!(body["tools"][0]["function"]["name"], "exec");
        assert_eq!(body["tool_choice"], "auto");
        assert_eq!(body["max_tokens"], 99);
    }

    #[test]
    fn lenient_response_parsing() {
        let body = r#"{"choices":[{"message":{"content":"","tool_calls":[{"function":{"name":"sleep","arguments":{"seconds":5}}}]},"finish_reason":"eos"}]}"#;
        let c = parse_response(body).expect("parse");
        assert_eq!(c.tool_calls.len(), 1);
        assert_eq!(c.tool_calls[0].name, "sleep");
        assert_eq!(c.tool_calls[0].arguments, "{\"seconds\":5}");
        assert!(c.tool_calls[0].id.starts_with("call_"));
        assert_eq!(c.text, None);
        assert_eq!(c.stop_reason, StopReason::ToolCalls);

        let body = r#"{"id":"x","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"hello"},"finish_reason":"stop"}],"usage":{"prompt_tokens":10,"completion_tokens":2,"total_tokens":12}}"#;
        let c = parse_response(body).expect("parse");
        assert_eq!(c.text.as_deref(), Some("hello"));
        assert_eq!(c.usage.prompt_tokens, 10);
        assert_eq!(c.usage.completion_tokens, 2);
        assert!(matches!(
            parse_response("{}"),
            Err(InferenceError::BadResponse(_))
        ));
        assert!(matches!(
            parse_response("<html>"),
            Err(InferenceError::BadResponse(_))
        ));
    }

    #[test]
    fn error_bodies() {
        let (code, msg) = error_fields(
            r#"{"error":{"message":"nope","type":"invalid_request_error","code":"context_length_exceeded"}}"#,
        );
        assert_eq!(code.as_deref(), Some("context_length_exceeded"));
        assert_eq!(msg, "nope");
        let (code, msg) = error_fields("plain text");
        assert_eq!(code, None);
        assert_eq!(msg, "plain text");
    }
}
