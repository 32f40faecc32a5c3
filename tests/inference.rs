//! Inference backends over real HTTP against scripted servers: request shapes, error classification, timeouts,
//! and the retry loop honouring `Retry-After`.

mod common;

use std::time::Duration;

use automaton::config::Secret;
use automaton::inference::anthropic::AnthropicProvider;
use automaton::inference::openai::OpenAiProvider;
use automaton::inference::{
    complete_with_retry, ChatRequest, InferenceError, InferenceProvider, Message, RetryPolicy,
    StopReason, ToolCall, ToolSpec,
};
use common::{error, text, tool_call, ModelServer};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use wiremock::ResponseTemplate;

fn request() -> ChatRequest {
    ChatRequest {
        system: "You are a test.".into(),
        messages: vec![
            Message::User {
                content: "hello".into(),
            },
            Message::Assistant {
                content: Some("let me look".into()),
                tool_calls: vec![ToolCall {
                    id: "call_a".into(),
                    name: "exec".into(),
                    arguments: "{\"command\":\"ls\"}".into(),
                }],
            },
            Message::Tool {
                tool_call_id: "call_a".into(),
                name: "exec".into(),
                content: "a.txt".into(),
                is_error: false,
            },
        ],
        tools: vec![ToolSpec {
            name: "exec".into(),
            description: "run a command".into(),
            parameters: json!({"type": "object", "properties": {"command": {"type": "string"}}}),
        }],
        max_tokens: 256,
    }
}

fn openai(server: &ModelServer, timeout: Duration) -> OpenAiProvider {
    OpenAiProvider::new(
        &server.base_url(),
        "test-model",
        Some(Secret::new("sk-inference-test")),
        timeout,
    )
    .expect("provider")
}

#[tokio::test]
async fn openai_sends_the_conversation_and_reads_tool_calls() {
    let server = ModelServer::openai(|_, _| tool_call("exec", json!({"command": "pwd"}))).await;
    let provider = openai(&server, Duration::from_secs(10));
    let completion = provider.complete(&request()).await.expect("completion");
    assert_eq!(completion.stop_reason, StopReason::ToolCalls);
    assert_eq!(completion.tool_calls[0].name, "exec");
    assert_eq!(completion.tool_calls[0].arguments, "{\"command\":\"pwd\"}");
    assert_eq!(completion.usage.prompt_tokens, 100);
    assert_eq!(completion.usage.completion_tokens, 10);

    let sent = &server.requests()[0];
    assert_eq!(
        sent.authorization.as_deref(),
        Some("Bearer sk-inference-test")
    );
    assert_eq!(
        sent.body,
        json!({
            "model": "test-model",
            "messages": [
                {"role": "system", "content": "You are a test."},
                {"role": "user", "content": "hello"},
                {"role": "assistant", "content": "let me look", "tool_calls": [
                    {"id": "call_a", "type": "function", "function": {"name": "exec", "arguments": "{\"command\":\"ls\"}"}}
                ]},
                {"role": "tool", "content": "a.txt", "tool_call_id": "call_a"}
            ],
            "max_tokens": 256,
            "tools": [{"type": "function", "function": {
                "name": "exec", "description": "run a command",
                "parameters": {"type": "object", "properties": {"command": {"type": "string"}}}
            }}],
            "tool_choice": "auto"
        })
    );
}

#[tokio::test]
async fn openai_errors_are_classified() {
    let server = ModelServer::openai(|n, _| match n {
        0 => ResponseTemplate::new(402)
            .insert_header("www-authenticate", "L402 macaroon=\"AgE=\", invoice=\"lnbcrt1\"")
            .set_body_string("payment required"),
        1 => ResponseTemplate::new(429)
            .insert_header("retry-after", "2")
            .set_body_json(json!({"error": {"message": "slow down", "type": "requests"}})),
        2 => ResponseTemplate::new(400).set_body_json(json!({"error": {
            "message": "This model's maximum context length is 8192 tokens", "code": "context_length_exceeded"}})),
        3 => error(401, "bad key"),
        4 => error(503, "overloaded"),
        5 => ResponseTemplate::new(200).set_body_string("<html>proxy error</html>"),
        6 => ResponseTemplate::new(429)
            .set_body_json(json!({"error": {"message": "quota", "code": "insufficient_quota"}})),
        _ => error(404, "no such model"),
    })
    .await;
    let provider = openai(&server, Duration::from_secs(10));
    let req = request();
    match provider.complete(&req).await {
        Err(InferenceError::PaymentRequired { challenge, .. }) => {
            assert_eq!(
                challenge.as_deref(),
                Some("L402 macaroon=\"AgE=\", invoice=\"lnbcrt1\"")
            )
        }
        other => panic!("402: {other:?}"),
    }
    match provider.complete(&req).await {
        Err(e @ InferenceError::RateLimited { .. }) => {
            assert!(e.is_retryable());
            assert!(
                matches!(e, InferenceError::RateLimited { retry_after: Some(d), .. } if d == Duration::from_secs(2))
            );
        }
        other => panic!("429: {other:?}"),
    }
    assert!(matches!(
        provider.complete(&req).await,
        Err(InferenceError::ContextTooLong { .. })
    ));
    assert!(matches!(
        provider.complete(&req).await,
        Err(InferenceError::Auth { status: 401, .. })
    ));
    assert!(matches!(
        provider.complete(&req).await,
        Err(InferenceError::Server { status: 503, .. })
    ));
    assert!(matches!(
        provider.complete(&req).await,
        Err(InferenceError::BadResponse(_))
    ));
    assert!(matches!(
        provider.complete(&req).await,
        Err(InferenceError::PaymentRequired {
            challenge: None,
            ..
        })
    ));
    match provider.complete(&req).await {
        Err(e @ InferenceError::BadRequest { status: 404, .. }) => assert!(!e.is_retryable()),
        other => panic!("404: {other:?}"),
    }
}

#[tokio::test]
async fn slow_and_unreachable_servers() {
    let server = ModelServer::openai(|_, _| text("late").set_delay(Duration::from_secs(5))).await;
    let provider = openai(&server, Duration::from_secs(1));
    assert!(matches!(
        provider.complete(&request()).await,
        Err(InferenceError::Timeout(_))
    ));

    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let provider = OpenAiProvider::new(
        &format!("http://127.0.0.1:{port}/v1"),
        "m",
        None,
        Duration::from_secs(5),
    )
    .expect("provider");
    match provider.complete(&request()).await {
        Err(e @ InferenceError::Network(_)) => assert!(e.is_retryable()),
        other => panic!("closed port: {other:?}"),
    }
}

#[tokio::test]
async fn switches_to_max_completion_tokens_when_the_endpoint_asks() {
    let server = ModelServer::openai(|n, _| match n {
        0 => ResponseTemplate::new(400).set_body_json(json!({"error": {
            "message": "Unsupported parameter: 'max_tokens' is not supported with this model. Use 'max_completion_tokens' instead.",
            "type": "invalid_request_error", "code": "unsupported_parameter"}})),
        _ => text("ok"),
    })
    .await;
    let provider = openai(&server, Duration::from_secs(10));
    let completion = provider.complete(&request()).await.expect("completion");
    assert_eq!(completion.text.as_deref(), Some("ok"));
    provider
        .complete(&request())
        .await
        .expect("second completion");
    let requests = server.requests();
    assert_eq!(
        requests.len(),
        3,
        "one failed attempt, then the switch sticks"
    );
    assert_eq!(requests[0].body["max_tokens"], 256);
    for later in &requests[1..] {
        assert_eq!(later.body["max_completion_tokens"], 256);
        assert!(later.body.get("max_tokens").is_none());
    }
}

#[tokio::test]
async fn retry_loop_honours_retry_after_then_succeeds() {
    let server = ModelServer::openai(|n, _| match n {
        0 => error(502, "bad gateway"),
        1 => ResponseTemplate::new(429)
            .insert_header("retry-after", "1")
            .set_body_string("later"),
        _ => text("finally"),
    })
    .await;
    let provider = openai(&server, Duration::from_secs(10));
    let policy = RetryPolicy {
        max_retries: 4,
        base_delay: Duration::from_millis(10),
        max_delay: Duration::from_millis(50),
        deadline: Duration::from_secs(30),
    };
    let record =
        complete_with_retry(&provider, &request(), &policy, &CancellationToken::new()).await;
    assert_eq!(
        record.result.expect("completion").text.as_deref(),
        Some("finally")
    );
    assert_eq!(record.attempts, 3);
    let requests = server.requests();
    assert!(requests[2].at.duration_since(requests[1].at) >= Duration::from_secs(1));

    // Cancelling during a backoff ends the call at once with Cancelled.
    let server =
        ModelServer::openai(|_, _| ResponseTemplate::new(429).insert_header("retry-after", "20"))
            .await;
    let provider = openai(&server, Duration::from_secs(10));
    let cancel = CancellationToken::new();
    let canceller = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        canceller.cancel();
    });
    let record = complete_with_retry(&provider, &request(), &policy, &cancel).await;
    assert!(matches!(record.result, Err(InferenceError::Cancelled)));
}

#[tokio::test]
async fn anthropic_messages_with_tool_use() {
    let server = ModelServer::anthropic(|n, _| match n {
        0 => ResponseTemplate::new(200).set_body_json(json!({
            "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-test",
            "content": [
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_1", "name": "exec", "input": {"command": "uptime"}}
            ],
            "stop_reason": "tool_use",
            "usage": {"input_tokens": 42, "output_tokens": 7}
        })),
        1 => ResponseTemplate::new(529).set_body_json(json!({
            "type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})),
        _ => ResponseTemplate::new(429)
            .insert_header("retry-after", "3")
            .set_body_json(json!({"type": "error", "error": {"type": "rate_limit_error", "message": "slow"}})),
    })
    .await;
    let provider = AnthropicProvider::new(
        &server.base_url(),
        "claude-test",
        Some(Secret::new("sk-ant-test")),
        Duration::from_secs(10),
    )
    .expect("provider");
    let completion = provider.complete(&request()).await.expect("completion");
    assert_eq!(completion.text.as_deref(), Some("Checking."));
    assert_eq!(completion.tool_calls[0].id, "toolu_1");
    assert_eq!(
        completion.tool_calls[0].arguments,
        "{\"command\":\"uptime\"}"
    );
    assert_eq!(completion.usage.prompt_tokens, 42);

    let sent = &server.requests()[0];
    assert_eq!(sent.api_key_header.as_deref(), Some("sk-ant-test"));
    assert_eq!(
        sent.body,
        json!({
            "model": "claude-test",
            "max_tokens": 256,
            "system": "You are a test.",
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "hello"}]},
                {"role": "assistant", "content": [
                    {"type": "text", "text": "let me look"},
                    {"type": "tool_use", "id": "call_a", "name": "exec", "input": {"command": "ls"}}
                ]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_a", "content": "a.txt"}]}
            ],
            "tools": [{"name": "exec", "description": "run a command",
                       "input_schema": {"type": "object", "properties": {"command": {"type": "string"}}}}]
        })
    );

    match provider.complete(&request()).await {
        Err(e @ InferenceError::Server { status: 529, .. }) => assert!(e.is_retryable()),
        other => panic!("529: {other:?}"),
    }
    assert!(matches!(
        provider.complete(&request()).await,
        Err(InferenceError::RateLimited { retry_after: Some(d), .. }) if d == Duration::from_secs(3)
    ));
}
