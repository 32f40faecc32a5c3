//! The OpenAI chat-completions wire format: requests parsed and validated the way api.openai.com does it,
//! responses, stream chunks and error bodies shaped like its own.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::conversation::{Conversation, Message, Reply, Role, ToolCall, ToolChoice, ToolSpec};

/// The model id the server answers with, whatever model the client asked for.
pub const MODEL_ID: &str = "scripted";
/// Plain naming in `system_fingerprint` and `owned_by`: this is not an LLM.
pub const FINGERPRINT: &str = "automaton-lab scripted model";
/// The default context window, in (approximate) tokens.
pub const CONTEXT_WINDOW: u32 = 128_000;
/// When the scripted model was "created", for `GET /v1/models` (2025-01-01).
pub const MODEL_CREATED: u64 = 1_735_689_600;

/// A parsed `POST /v1/chat/completions` body.
#[derive(Debug, Clone)]
pub(crate) struct ChatRequest {
    pub conversation: Conversation,
    pub stream: bool,
    pub include_usage: bool,
    pub n: u32,
    pub max_tokens: Option<u64>,
    /// sha256 over the parts of the request that decide the answer.
    pub digest: [u8; 32],
    /// Approximate prompt size: characters / 4.
    pub prompt_tokens: u32,
}

/// An error answered in OpenAI's `{"error": {...}}` shape.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum ApiError {
    #[error("{message}")]
    InvalidRequest {
        message: String,
        param: Option<String>,
        code: Option<&'static str>,
    },
    #[error("context length {requested} exceeds {limit}")]
    ContextLengthExceeded { limit: u32, requested: u32 },
    #[error("not found: {message}")]
    NotFound {
        message: String,
        code: Option<&'static str>,
    },
    /// An HTTP error the prompt asked for (`lab-scenario: error STATUS` or `flaky`).
    #[error("scripted HTTP {status}")]
    Scripted { status: u16 },
}

impl ApiError {
    fn invalid(
        message: impl Into<String>,
        param: impl Into<Option<String>>,
        code: Option<&'static str>,
    ) -> Self {
        ApiError::InvalidRequest {
            message: message.into(),
            param: param.into(),
            code,
        }
    }
}

fn error_body(message: &str, kind: &str, param: Option<&str>, code: Option<&str>) -> Value {
    json!({"error": {"message": message, "type": kind, "param": param, "code": code}})
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, body, retry_after) = match &self {
            ApiError::InvalidRequest {
                message,
                param,
                code,
            } => (
                StatusCode::BAD_REQUEST,
                error_body(message, "invalid_request_error", param.as_deref(), *code),
                None,
            ),
            ApiError::ContextLengthExceeded { limit, requested } => (
                StatusCode::BAD_REQUEST,
                error_body(
                    &format!(
                        "This model's maximum context length is {limit} tokens. However, your messages \
                         resulted in {requested} tokens. Please reduce the length of the messages."
                    ),
                    "invalid_request_error",
                    Some("messages"),
                    Some("context_length_exceeded"),
                ),
                None,
            ),
            ApiError::NotFound { message, code } => (
                StatusCode::NOT_FOUND,
                error_body(message, "invalid_request_error", None, *code),
                None,
            ),
            ApiError::Scripted { status } => scripted_error(*status),
        };
        let mut response = (status, axum::Json(body)).into_response();
        if let Some(seconds) = retry_after {
            if let Ok(value) = HeaderValue::from_str(&seconds.to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, value);
            }
        }
        response
    }
}

/// The error bodies OpenAI sends for each status, so clients classify them as they would in production.
fn scripted_error(status: u16) -> (StatusCode, Value, Option<u64>) {
    let code = StatusCode::from_u16(status)
        .ok()
        .filter(|code| code.is_client_error() || code.is_server_error())
        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let (body, retry_after) = match code.as_u16() {
        400 => (
            error_body(
                &format!(
                    "This model's maximum context length is {CONTEXT_WINDOW} tokens. However, your messages \
                     resulted in {} tokens. Please reduce the length of the messages.",
                    CONTEXT_WINDOW + 1
                ),
                "invalid_request_error",
                Some("messages"),
                Some("context_length_exceeded"),
            ),
            None,
        ),
        401 => (
            error_body(
                "Incorrect API key provided. You can find your API key at https://platform.openai.com/account/api-keys.",
                "invalid_request_error",
                None,
                Some("invalid_api_key"),
            ),
            None,
        ),
        402 => (
            error_body(
                "Payment required: this endpoint needs credit.",
                "insufficient_quota",
                None,
                Some("payment_required"),
            ),
            None,
        ),
        403 => (
            error_body(
                "You are not allowed to sample from this model",
                "invalid_request_error",
                None,
                Some("unsupported_country_region_territory"),
            ),
            None,
        ),
        404 => (
            error_body(
                &format!("The model `{MODEL_ID}` does not exist or you do not have access to it."),
                "invalid_request_error",
                None,
                Some("model_not_found"),
            ),
            None,
        ),
        429 => (
            error_body(
                &format!(
                    "Rate limit reached for {MODEL_ID} on requests per min (RPM): Limit 3, Used 3, Requested 1. \
                     Please try again in 1s."
                ),
                "requests",
                Some("requests"),
                Some("rate_limit_exceeded"),
            ),
            Some(1),
        ),
        502..=504 => (
            error_body(
                "The server is overloaded or not ready yet.",
                "server_error",
                None,
                None,
            ),
            None,
        ),
        _ => (
            error_body(
                "The server had an error while processing your request. Sorry about that!",
                "server_error",
                None,
                None,
            ),
            None,
        ),
    };
    (code, body, retry_after)
}

/// Parses and validates a request body, with OpenAI's error messages for what it rejects.
pub(crate) fn parse_request(body: &[u8]) -> Result<ChatRequest, ApiError> {
    let raw: Value = serde_json::from_slice(body).map_err(|_| {
        ApiError::invalid(
            "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your \
             HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was not valid \
             JSON.)",
            None,
            None,
        )
    })?;
    let Some(object) = raw.as_object() else {
        return Err(ApiError::invalid(
            "Invalid type for request body: expected an object.",
            None,
            Some("invalid_type"),
        ));
    };
    match object.get("model") {
        Some(Value::String(model)) if !model.is_empty() => {}
        _ => {
            return Err(ApiError::invalid(
                "you must provide a model parameter",
                None,
                None,
            ))
        }
    }
    let raw_messages = match object.get("messages") {
        None | Some(Value::Null) => {
            return Err(ApiError::invalid(
                "Missing required parameter: 'messages'.",
                "messages".to_owned(),
                Some("missing_required_parameter"),
            ))
        }
        Some(Value::Array(messages)) if messages.is_empty() => {
            return Err(ApiError::invalid(
                "Invalid 'messages': empty array. Expected an array with minimum length 1, but got an empty \
                 array instead.",
                "messages".to_owned(),
                Some("empty_array"),
            ))
        }
        Some(Value::Array(messages)) => messages,
        Some(other) => return Err(wrong_type("messages", "an array", other)),
    };
    let messages = raw_messages
        .iter()
        .enumerate()
        .map(|(index, message)| parse_message(index, message))
        .collect::<Result<Vec<_>, _>>()?;
    check_tool_sequence(&messages)?;

    let tools = match object.get("tools") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(tools)) if tools.is_empty() => {
            return Err(ApiError::invalid(
                "Invalid 'tools': empty array. Expected an array with minimum length 1, but got an empty array \
                 instead.",
                "tools".to_owned(),
                Some("empty_array"),
            ))
        }
        Some(Value::Array(tools)) => tools
            .iter()
            .enumerate()
            .map(|(index, tool)| parse_tool(index, tool))
            .collect::<Result<Vec<_>, _>>()?,
        Some(other) => return Err(wrong_type("tools", "an array", other)),
    };
    let tool_choice = parse_tool_choice(object.get("tool_choice"), &tools)?;

    let stream = match object.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(flag)) => *flag,
        Some(other) => return Err(wrong_type("stream", "a boolean", other)),
    };
    let include_usage = match object.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(_) if !stream => {
            return Err(ApiError::invalid(
                "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                "stream_options".to_owned(),
                None,
            ));
        }
        Some(Value::Object(options)) => match options.get("include_usage") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(flag)) => *flag,
            Some(other) => {
                return Err(wrong_type(
                    "stream_options.include_usage",
                    "a boolean",
                    other,
                ))
            }
        },
        Some(other) => return Err(wrong_type("stream_options", "an object", other)),
    };
    let n = match object.get("n") {
        None | Some(Value::Null) => 1,
        Some(Value::Number(n)) => match n.as_u64() {
            Some(n @ 1..=128) => n as u32,
            _ => {
                return Err(ApiError::invalid(
                    format!("Invalid 'n': integer out of range. Expected a value between 1 and 128, got {n}."),
                    "n".to_owned(),
                    Some("integer_out_of_range"),
                ))
            }
        },
        Some(other) => return Err(wrong_type("n", "an integer", other)),
    };
    let mut max_tokens = None;
    for key in ["max_completion_tokens", "max_tokens"] {
        match object.get(key) {
            None | Some(Value::Null) => {}
            Some(Value::Number(number)) => match number.as_u64() {
                Some(limit) if limit >= 1 => {
                    max_tokens = max_tokens.or(Some(limit));
                }
                _ => {
                    return Err(ApiError::invalid(
                        format!("Invalid '{key}': integer below minimum value. Expected a value >= 1, got {number}."),
                        key.to_owned(),
                        Some("integer_below_min_value"),
                    ))
                }
            },
            Some(other) => return Err(wrong_type(key, "an integer", other)),
        }
    }

    let decisive = json!({
        "messages": object.get("messages"),
        "tools": object.get("tools"),
        "tool_choice": object.get("tool_choice"),
        "n": n,
        "max_tokens": max_tokens,
    });
    let digest: [u8; 32] = Sha256::digest(decisive.to_string().as_bytes()).into();
    let conversation = Conversation {
        messages,
        tools,
        tool_choice,
    };
    let prompt_tokens = approx_tokens(prompt_chars(&conversation, object.get("tools")));
    Ok(ChatRequest {
        conversation,
        stream,
        include_usage,
        n,
        max_tokens,
        digest,
        prompt_tokens,
    })
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn wrong_type(param: &str, expected: &str, got: &Value) -> ApiError {
    ApiError::invalid(
        format!(
            "Invalid type for '{param}': expected {expected}, but got {} instead.",
            type_name(got)
        ),
        param.to_owned(),
        Some("invalid_type"),
    )
}

/// The text of a `content` field: a string, or an array of parts whose text parts are joined.
fn content_text(param: &str, content: &Value) -> Result<Option<String>, ApiError> {
    match content {
        Value::Null => Ok(None),
        Value::String(text) => Ok(Some(text.clone())),
        Value::Array(parts) => {
            let mut texts = Vec::new();
            for (index, part) in parts.iter().enumerate() {
                let kind = part.get("type").and_then(Value::as_str).ok_or_else(|| {
                    ApiError::invalid(
                        format!("Missing required parameter: '{param}[{index}].type'."),
                        format!("{param}[{index}].type"),
                        Some("missing_required_parameter"),
                    )
                })?;
                match kind {
                    "text" => match part.get("text") {
                        Some(Value::String(text)) => texts.push(text.clone()),
                        Some(other) => {
                            return Err(wrong_type(
                                &format!("{param}[{index}].text"),
                                "a string",
                                other,
                            ))
                        }
                        None => {
                            return Err(ApiError::invalid(
                                format!("Missing required parameter: '{param}[{index}].text'."),
                                format!("{param}[{index}].text"),
                                Some("missing_required_parameter"),
                            ))
                        }
                    },
                    "refusal" => {
                        if let Some(text) = part.get("refusal").and_then(Value::as_str) {
                            texts.push(text.to_owned());
                        }
                    }
                    // Images, audio and files carry no text the scripted policy reads.
                    "image_url" | "input_audio" | "file" => {}
                    other => {
                        return Err(ApiError::invalid(
                            format!(
                            "Invalid value: '{other}'. Supported values are: 'text', 'image_url', \
                                 'input_audio', 'refusal', and 'file'."
                        ),
                            format!("{param}[{index}].type"),
                            Some("invalid_value"),
                        ))
                    }
                }
            }
            Ok(Some(texts.join("\n")))
        }
        other => Err(wrong_type(param, "a string or an array", other)),
    }
}

fn parse_message(index: usize, raw: &Value) -> Result<Message, ApiError> {
    let param = format!("messages[{index}]");
    let Some(object) = raw.as_object() else {
        return Err(wrong_type(&param, "an object", raw));
    };
    let role = match object.get("role") {
        Some(Value::String(role)) => match role.as_str() {
            "system" | "developer" => Role::System,
            "user" => Role::User,
            "assistant" => Role::Assistant,
            "tool" | "function" => Role::Tool,
            other => {
                return Err(ApiError::invalid(
                    format!(
                        "Invalid value: '{other}'. Supported values are: 'system', 'assistant', 'user', \
                         'function', 'tool', and 'developer'."
                    ),
                    format!("{param}.role"),
                    Some("invalid_value"),
                ))
            }
        },
        Some(other) => return Err(wrong_type(&format!("{param}.role"), "a string", other)),
        None => {
            return Err(ApiError::invalid(
                format!("Missing required parameter: '{param}.role'."),
                format!("{param}.role"),
                Some("missing_required_parameter"),
            ))
        }
    };
    let text = content_text(
        &format!("{param}.content"),
        object.get("content").unwrap_or(&Value::Null),
    )?;
    let mut tool_calls = Vec::new();
    if role == Role::Assistant {
        match object.get("tool_calls") {
            None | Some(Value::Null) => {}
            Some(Value::Array(calls)) => {
                for (call_index, call) in calls.iter().enumerate() {
                    tool_calls.push(parse_tool_call(
                        &format!("{param}.tool_calls[{call_index}]"),
                        call,
                    )?);
                }
            }
            Some(other) => {
                return Err(wrong_type(
                    &format!("{param}.tool_calls"),
                    "an array",
                    other,
                ))
            }
        }
        // The legacy `function_call` form counts as a call without an id.
        if let Some(function) = object.get("function_call").filter(|value| !value.is_null()) {
            tool_calls.push(ToolCall {
                id: String::new(),
                name: function
                    .get("name")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned(),
                arguments: function
                    .get("arguments")
                    .and_then(Value::as_str)
                    .unwrap_or("{}")
                    .to_owned(),
            });
        }
    }
    let needs_content = match role {
        Role::Assistant => tool_calls.is_empty(),
        _ => true,
    };
    if needs_content && text.is_none() {
        return Err(ApiError::invalid(
            "Invalid value for 'content': expected a string, got null.",
            format!("{param}.content"),
            None,
        ));
    }
    let tool_call_id = if role == Role::Tool
        && object.get("role").and_then(Value::as_str) == Some("tool")
    {
        match object.get("tool_call_id") {
            Some(Value::String(id)) => Some(id.clone()),
            Some(other) => return Err(wrong_type(&format!("{param}.tool_call_id"), "a string", other)),
            None => {
                return Err(ApiError::invalid(
                    "Missing parameter 'tool_call_id': messages with role 'tool' must have a 'tool_call_id'.",
                    format!("{param}.tool_call_id"),
                    None,
                ))
            }
        }
    } else {
        None
    };
    Ok(Message {
        role,
        text: text.unwrap_or_default(),
        tool_calls,
        tool_call_id,
    })
}

fn parse_tool_call(param: &str, raw: &Value) -> Result<ToolCall, ApiError> {
    let id = match raw.get("id") {
        Some(Value::String(id)) => id.clone(),
        Some(other) => return Err(wrong_type(&format!("{param}.id"), "a string", other)),
        None => {
            return Err(ApiError::invalid(
                format!("Missing required parameter: '{param}.id'."),
                format!("{param}.id"),
                Some("missing_required_parameter"),
            ))
        }
    };
    match raw.get("type") {
        Some(Value::String(kind)) if kind == "function" => {}
        None => {
            return Err(ApiError::invalid(
                format!("Missing required parameter: '{param}.type'."),
                format!("{param}.type"),
                Some("missing_required_parameter"),
            ))
        }
        Some(other) => {
            return Err(ApiError::invalid(
                format!("Invalid value: {other}. Supported values are: 'function'."),
                format!("{param}.type"),
                Some("invalid_value"),
            ))
        }
    }
    let function = raw.get("function").ok_or_else(|| {
        ApiError::invalid(
            format!("Missing required parameter: '{param}.function'."),
            format!("{param}.function"),
            Some("missing_required_parameter"),
        )
    })?;
    let name = match function.get("name") {
        Some(Value::String(name)) => name.clone(),
        Some(other) => {
            return Err(wrong_type(
                &format!("{param}.function.name"),
                "a string",
                other,
            ))
        }
        None => {
            return Err(ApiError::invalid(
                format!("Missing required parameter: '{param}.function.name'."),
                format!("{param}.function.name"),
                Some("missing_required_parameter"),
            ))
        }
    };
    // Like the real API, arguments must be the JSON document as a string, not an object.
    let arguments = match function.get("arguments") {
        Some(Value::String(arguments)) => arguments.clone(),
        Some(other) => {
            return Err(wrong_type(
                &format!("{param}.function.arguments"),
                "a string",
                other,
            ))
        }
        None => {
            return Err(ApiError::invalid(
                format!("Missing required parameter: '{param}.function.arguments'."),
                format!("{param}.function.arguments"),
                Some("missing_required_parameter"),
            ))
        }
    };
    Ok(ToolCall {
        id,
        name,
        arguments,
    })
}

/// Every assistant `tool_calls` message must be followed by one tool message per call id, and every tool
/// message must answer a call of the assistant message before its block.
fn check_tool_sequence(messages: &[Message]) -> Result<(), ApiError> {
    let mut index = 0;
    while index < messages.len() {
        let message = &messages[index];
        let assistant_index = index;
        if message.role == Role::Tool && message.tool_call_id.is_some() {
            return Err(ApiError::invalid(
                "Invalid parameter: messages with role 'tool' must be a response to a preceeding message with \
                 'tool_calls'.",
                format!("messages.[{index}].role"),
                None,
            ));
        }
        index += 1;
        let ids: Vec<&str> = message
            .tool_calls
            .iter()
            .filter(|call| !call.id.is_empty())
            .map(|call| call.id.as_str())
            .collect();
        if message.role != Role::Assistant || ids.is_empty() {
            continue;
        }
        let mut answered: Vec<&str> = Vec::new();
        while let Some(reply) = messages.get(index).filter(|reply| reply.role == Role::Tool) {
            if let Some(id) = reply.tool_call_id.as_deref() {
                if !ids.contains(&id) {
                    return Err(ApiError::invalid(
                        "Invalid parameter: messages with role 'tool' must be a response to a preceeding message \
                         with 'tool_calls'.",
                        format!("messages.[{index}].role"),
                        None,
                    ));
                }
                answered.push(id);
            }
            index += 1;
        }
        let missing: Vec<&str> = ids
            .iter()
            .copied()
            .filter(|id| !answered.contains(id))
            .collect();
        if !missing.is_empty() {
            return Err(ApiError::invalid(
                format!(
                    "An assistant message with 'tool_calls' must be followed by tool messages responding to each \
                     'tool_call_id'. The following tool_call_ids did not have response messages: {}",
                    missing.join(", ")
                ),
                format!("messages.[{assistant_index}].role"),
                None,
            ));
        }
    }
    Ok(())
}

fn is_valid_function_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn parse_tool(index: usize, raw: &Value) -> Result<ToolSpec, ApiError> {
    let param = format!("tools[{index}]");
    match raw.get("type") {
        Some(Value::String(kind)) if kind == "function" => {}
        Some(Value::String(kind)) if kind == "custom" => {
            return Err(ApiError::invalid(
                "The scripted model supports only function tools.",
                format!("{param}.type"),
                Some("invalid_value"),
            ))
        }
        None => {
            return Err(ApiError::invalid(
                format!("Missing required parameter: '{param}.type'."),
                format!("{param}.type"),
                Some("missing_required_parameter"),
            ))
        }
        Some(other) => {
            return Err(ApiError::invalid(
                format!("Invalid value: {other}. Supported values are: 'function' and 'custom'."),
                format!("{param}.type"),
                Some("invalid_value"),
            ))
        }
    }
    let Some(function) = raw.get("function").and_then(Value::as_object) else {
        return Err(ApiError::invalid(
            format!("Missing required parameter: '{param}.function'."),
            format!("{param}.function"),
            Some("missing_required_parameter"),
        ));
    };
    let name = match function.get("name") {
        Some(Value::String(name)) => name.clone(),
        Some(other) => {
            return Err(wrong_type(
                &format!("{param}.function.name"),
                "a string",
                other,
            ))
        }
        None => {
            return Err(ApiError::invalid(
                format!("Missing required parameter: '{param}.function.name'."),
                format!("{param}.function.name"),
                Some("missing_required_parameter"),
            ))
        }
    };
    if !is_valid_function_name(&name) {
        return Err(ApiError::invalid(
            format!(
                "Invalid '{param}.function.name': string does not match pattern. Expected a string that matches \
                 the pattern '^[a-zA-Z0-9_-]{{1,64}}$'."
            ),
            format!("{param}.function.name"),
            Some("invalid_value"),
        ));
    }
    let parameters = match function.get("parameters") {
        None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
        Some(Value::Object(schema)) => {
            match schema.get("type") {
                Some(Value::String(kind)) if kind == "object" => {}
                Some(kind) => {
                    return Err(ApiError::invalid(
                        format!(
                            "Invalid schema for function '{name}': schema must be a JSON Schema of 'type: \
                             \"object\"', got 'type: {kind}'."
                        ),
                        format!("{param}.function.parameters"),
                        Some("invalid_function_parameters"),
                    ))
                }
                None if schema.is_empty() => {}
                None => {
                    return Err(ApiError::invalid(
                        format!(
                            "Invalid schema for function '{name}': schema must be a JSON Schema of 'type: \
                             \"object\"', got 'type: None'."
                        ),
                        format!("{param}.function.parameters"),
                        Some("invalid_function_parameters"),
                    ))
                }
            }
            Value::Object(schema.clone())
        }
        Some(other) => {
            return Err(wrong_type(
                &format!("{param}.function.parameters"),
                "an object",
                other,
            ))
        }
    };
    Ok(ToolSpec { name, parameters })
}

fn parse_tool_choice(raw: Option<&Value>, tools: &[ToolSpec]) -> Result<ToolChoice, ApiError> {
    let choice = match raw {
        None | Some(Value::Null) => return Ok(ToolChoice::Auto),
        Some(Value::String(choice)) => match choice.as_str() {
            "auto" => ToolChoice::Auto,
            "none" => ToolChoice::None,
            "required" => ToolChoice::Required,
            other => {
                return Err(ApiError::invalid(
                    format!("Invalid value: '{other}'. Supported values are: 'none', 'auto', and 'required'."),
                    "tool_choice".to_owned(),
                    Some("invalid_value"),
                ))
            }
        },
        Some(Value::Object(choice)) => {
            let name = choice
                .get("function")
                .and_then(|function| function.get("name"))
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    ApiError::invalid(
                        "Missing required parameter: 'tool_choice.function.name'.",
                        "tool_choice.function.name".to_owned(),
                        Some("missing_required_parameter"),
                    )
                })?;
            ToolChoice::Function(name.to_owned())
        }
        Some(other) => return Err(wrong_type("tool_choice", "a string or an object", other)),
    };
    if tools.is_empty() && choice != ToolChoice::None {
        return Err(ApiError::invalid(
            "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are specified.",
            "tool_choice".to_owned(),
            None,
        ));
    }
    if let ToolChoice::Function(name) = &choice {
        if !tools.iter().any(|tool| &tool.name == name) {
            return Err(ApiError::invalid(
                format!("Invalid value for 'tool_choice': function '{name}' is not one of the offered tools."),
                "tool_choice".to_owned(),
                Some("invalid_value"),
            ));
        }
    }
    Ok(choice)
}

/// Tokens are approximated as characters / 4, rounded up.
pub(crate) fn approx_tokens(chars: usize) -> u32 {
    u32::try_from(chars.div_ceil(4)).unwrap_or(u32::MAX)
}

fn prompt_chars(conversation: &Conversation, raw_tools: Option<&Value>) -> usize {
    let messages: usize = conversation
        .messages
        .iter()
        .map(|message| {
            message.text.chars().count()
                + message
                    .tool_calls
                    .iter()
                    .map(|call| call.name.chars().count() + call.arguments.chars().count())
                    .sum::<usize>()
        })
        .sum();
    let tools = raw_tools
        .filter(|tools| !tools.is_null())
        .map(|tools| tools.to_string().chars().count())
        .unwrap_or(0);
    messages + tools
}

/// Short ids from a digest, in the alphabet OpenAI's ids use.
pub(crate) fn id_from(seed: &[u8], len: usize) -> String {
    const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut out = String::with_capacity(len);
    let mut block: Vec<u8> = Sha256::digest(seed).to_vec();
    while out.len() < len {
        for byte in &block {
            if out.len() == len {
                break;
            }
            out.push(char::from(ALPHABET[usize::from(*byte) % ALPHABET.len()]));
        }
        block = Sha256::digest(&block).to_vec();
    }
    out
}

/// One rendered choice.
#[derive(Debug, Clone)]
pub(crate) struct Choice {
    pub content: Option<String>,
    /// (call id, function name, arguments as a JSON string)
    pub tool_call: Option<(String, String, String)>,
    pub finish_reason: &'static str,
    pub completion_tokens: u32,
}

/// A completion ready to be sent whole or as chunks.
#[derive(Debug, Clone)]
pub(crate) struct Completion {
    pub id: String,
    pub created: u64,
    pub choices: Vec<Choice>,
    pub prompt_tokens: u32,
}

impl Completion {
    pub fn new(request: &ChatRequest, reply: &Reply, created: u64) -> Completion {
        let id = format!("chatcmpl-{}", id_from(&request.digest, 29));
        let budget = request
            .max_tokens
            .map(|tokens| usize::try_from(tokens.saturating_mul(4)).unwrap_or(usize::MAX));
        let choices = (0..request.n)
            .map(|index| {
                let (mut content, mut tool_call, mut finish_reason) = match reply {
                    Reply::Text(text) => (Some(text.clone()), None, "stop"),
                    Reply::Call { name, arguments } => {
                        let call_id =
                            format!("call_{}", id_from(format!("{id}/{index}").as_bytes(), 24));
                        (
                            None,
                            Some((call_id, name.clone(), arguments.to_string())),
                            "tool_calls",
                        )
                    }
                };
                // Honour max_tokens as the real API does: cut the output and say so.
                if let Some(budget) = budget {
                    if let Some(text) = content
                        .as_mut()
                        .filter(|text| text.chars().count() > budget)
                    {
                        *text = text.chars().take(budget).collect();
                        finish_reason = "length";
                    }
                    if let Some((_, name, arguments)) = tool_call.as_mut() {
                        let room = budget.saturating_sub(name.chars().count());
                        if arguments.chars().count() > room {
                            *arguments = arguments.chars().take(room).collect();
                            finish_reason = "length";
                        }
                    }
                }
                let chars = content.as_ref().map_or(0, |text| text.chars().count())
                    + tool_call.as_ref().map_or(0, |(_, name, arguments)| {
                        name.chars().count() + arguments.chars().count()
                    });
                Choice {
                    content,
                    tool_call,
                    finish_reason,
                    completion_tokens: approx_tokens(chars).max(1),
                }
            })
            .collect();
        Completion {
            id,
            created,
            choices,
            prompt_tokens: request.prompt_tokens,
        }
    }

    fn completion_tokens(&self) -> u32 {
        self.choices
            .iter()
            .map(|choice| choice.completion_tokens)
            .fold(0u32, u32::saturating_add)
    }

    pub fn usage(&self) -> Value {
        let completion = self.completion_tokens();
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens.saturating_add(completion),
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0
            }
        })
    }

    /// The `chat.completion` object.
    pub fn to_json(&self) -> Value {
        let choices: Vec<Value> = self
            .choices
            .iter()
            .enumerate()
            .map(|(index, choice)| {
                let mut message = json!({
                    "role": "assistant",
                    "content": choice.content,
                    "refusal": null,
                    "annotations": [],
                });
                if let Some((id, name, arguments)) = &choice.tool_call {
                    message["tool_calls"] = json!([{
                        "id": id,
                        "type": "function",
                        "function": {"name": name, "arguments": arguments}
                    }]);
                }
                json!({
                    "index": index,
                    "message": message,
                    "logprobs": null,
                    "finish_reason": choice.finish_reason,
                })
            })
            .collect();
        json!({
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": MODEL_ID,
            "choices": choices,
            "usage": self.usage(),
            "service_tier": "default",
            "system_fingerprint": FINGERPRINT,
        })
    }

    fn chunk(&self, choices: Vec<Value>, include_usage: bool) -> Value {
        let mut chunk = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": MODEL_ID,
            "service_tier": "default",
            "system_fingerprint": FINGERPRINT,
            "choices": choices,
        });
        if include_usage {
            chunk["usage"] = Value::Null;
        }
        chunk
    }

    /// The `chat.completion.chunk` objects of a streamed answer, in order (without the final `[DONE]`).
    pub fn chunks(&self, include_usage: bool) -> Vec<Value> {
        let delta = |index: usize, delta: Value, finish: Option<&str>| json!({"index": index, "delta": delta, "logprobs": null, "finish_reason": finish});
        let mut chunks = Vec::new();
        for (index, choice) in self.choices.iter().enumerate() {
            match &choice.tool_call {
                Some((id, name, arguments)) => {
                    chunks.push(self.chunk(
                        vec![delta(
                            index,
                            json!({
                                "role": "assistant",
                                "content": null,
                                "tool_calls": [{
                                    "index": 0,
                                    "id": id,
                                    "type": "function",
                                    "function": {"name": name, "arguments": ""}
                                }],
                                "refusal": null
                            }),
                            None,
                        )],
                        include_usage,
                    ));
                    for piece in pieces(arguments, 16) {
                        chunks.push(self.chunk(
                            vec![delta(
                                index,
                                json!({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}),
                                None,
                            )],
                            include_usage,
                        ));
                    }
                }
                None => {
                    chunks.push(self.chunk(
                        vec![delta(
                            index,
                            json!({"role": "assistant", "content": "", "refusal": null}),
                            None,
                        )],
                        include_usage,
                    ));
                    for piece in pieces(choice.content.as_deref().unwrap_or(""), 12) {
                        chunks.push(self.chunk(
                            vec![delta(index, json!({"content": piece}), None)],
                            include_usage,
                        ));
                    }
                }
            }
            chunks.push(self.chunk(
                vec![delta(index, json!({}), Some(choice.finish_reason))],
                include_usage,
            ));
        }
        if include_usage {
            let mut last = self.chunk(Vec::new(), false);
            last["usage"] = self.usage();
            chunks.push(last);
        }
        chunks
    }
}

/// Splits text into pieces of about `size` characters, on character boundaries.
fn pieces(text: &str, size: usize) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    chars
        .chunks(size.max(1))
        .map(|piece| piece.iter().collect())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unanswered_tool_calls_are_rejected_like_openai_does() {
        let body = json!({
            "model": "scripted",
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "exec", "arguments": "{}"}}
                ]},
                {"role": "user", "content": "again"}
            ]
        });
        let error = parse_request(body.to_string().as_bytes()).unwrap_err();
        assert!(error.to_string().contains("call_1"), "{error}");
    }

    #[test]
    fn ids_are_stable_and_shaped_like_openai_ids() {
        let id = id_from(b"seed", 29);
        assert_eq!(id.len(), 29);
        assert_eq!(id, id_from(b"seed", 29));
        assert!(id.chars().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(id, id_from(b"other", 29));
    }
}
