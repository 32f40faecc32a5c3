//! The conversation as the scripted policy sees it: who said what, which tools were called with what
//! arguments and what came back, and which tools are on offer for the next reply.

use serde_json::Value;

/// Who wrote a message. `developer` counts as `System` and the legacy `function` role as `Tool`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    System,
    User,
    Assistant,
    Tool,
}

#[derive(Debug, Clone)]
pub(crate) struct Message {
    pub role: Role,
    /// The text of the message; multi-part content is joined with newlines.
    pub text: String,
    /// Tool calls of an assistant message.
    pub tool_calls: Vec<ToolCall>,
    /// For a tool message: the call it answers.
    pub tool_call_id: Option<String>,
}

#[derive(Debug, Clone)]
pub(crate) struct ToolCall {
    pub id: String,
    pub name: String,
    /// The arguments exactly as sent (a JSON document in a string, as on the wire).
    pub arguments: String,
}

impl ToolCall {
    /// The arguments as JSON; `Null` when the string is not valid JSON.
    pub fn args(&self) -> Value {
        serde_json::from_str(&self.arguments).unwrap_or(Value::Null)
    }

    /// A string argument, if present.
    pub fn arg_str(&self, key: &str) -> Option<String> {
        self.args()
            .get(key)
            .and_then(Value::as_str)
            .map(str::to_owned)
    }
}

/// A function tool offered in the request.
#[derive(Debug, Clone)]
pub(crate) struct ToolSpec {
    pub name: String,
    pub parameters: Value,
}

/// The request's `tool_choice`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ToolChoice {
    Auto,
    None,
    Required,
    Function(String),
}

#[derive(Debug, Clone)]
pub(crate) struct Conversation {
    pub messages: Vec<Message>,
    pub tools: Vec<ToolSpec>,
    pub tool_choice: ToolChoice,
}

impl Conversation {
    /// The tool of that name, if the request offers it.
    pub fn tool(&self, name: &str) -> Option<&ToolSpec> {
        self.tools.iter().find(|tool| tool.name == name)
    }

    /// Every tool call made so far, in order, with the index of the message carrying it.
    pub fn calls(&self) -> impl Iterator<Item = (usize, &ToolCall)> {
        self.messages
            .iter()
            .enumerate()
            .flat_map(|(index, message)| message.tool_calls.iter().map(move |call| (index, call)))
    }

    /// The text of the tool message answering `call_id`.
    pub fn result_of(&self, call_id: &str) -> Option<&str> {
        self.messages
            .iter()
            .find(|message| {
                message.role == Role::Tool && message.tool_call_id.as_deref() == Some(call_id)
            })
            .map(|message| message.text.as_str())
    }

    /// The name of the tool a tool message answers.
    pub fn answered_tool(&self, message: &Message) -> Option<&str> {
        let id = message.tool_call_id.as_deref()?;
        self.calls()
            .find(|(_, call)| call.id == id)
            .map(|(_, call)| call.name.as_str())
    }
}

/// What the scripted model answers: text, or one tool call.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Reply {
    Text(String),
    Call { name: String, arguments: Value },
}
