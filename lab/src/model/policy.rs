//! The scripted agent: a deterministic policy that reads the offered tools and the conversation and plays a
//! sensible agent turn (check status, run scenario steps, use a skill, write a note, read it back, sleep).
//! It never calls a tool that spends, rents or spawns unless a `lab-scenario:` line asks for it.

use std::str::FromStr;

use lightning_invoice::Bolt11Invoice;
use serde_json::{json, Value};

use super::conversation::{Conversation, Reply, Role, ToolCall, ToolChoice};
use super::prompt::{Prompt, Scenario, ScenarioKind, Skill};
use super::schema;

/// Tools that spend, rent or spawn: called only when a scenario asks for them.
pub const GATED_TOOLS: &[&str] = &[
    "pay_invoice",
    "send_payment",
    "l402_fetch",
    "rent_vps",
    "renew_vps",
    "spawn_child",
    "fund_child",
];

/// Status tools, in order of preference, for the first step of a turn.
const STATUS_TOOLS: &[&str] = &["system_synopsis", "check_balance", "check_budget"];

/// Read-only tools a skill may point the model at.
const SKILL_TOOLS: &[&str] = &[
    "list_skills",
    "check_balance",
    "check_budget",
    "list_receipts",
    "get_funding_info",
    "list_services",
    "discover_agents",
    "list_vps",
    "list_children",
];

/// Words that keep a command from a skill's code block out of `exec`: the skill is untrusted and the
/// scripted model must not spend or destroy through the shell either.
const UNSAFE_COMMAND_WORDS: &[&str] = &[
    "pay",
    "send",
    "spawn",
    "rent",
    "renew",
    "fund",
    "rm ",
    "sudo",
    "kill",
    "shutdown",
    "reboot",
    "mkfs",
    "dd ",
    "> /",
    "curl -x post",
    "wallet",
];

/// A turn never makes more tool calls than this before it sleeps, whatever the tool results say.
const MAX_CALLS_PER_TURN: usize = 16;

/// How long the scripted agent asks to sleep at the end of a turn.
pub const SLEEP_SECONDS: u64 = 60;

/// The command the `loop` scenario repeats.
const LOOP_COMMAND: &str = "echo lab-scenario loop";

/// The next reply for this conversation.
pub(crate) fn decide(conversation: &Conversation, prompt: &Prompt) -> Reply {
    let turn = Turn::new(conversation, prompt);
    let wanted = match prompt.scenario(ScenarioKind::Loop) {
        Some(scenario) => turn.loop_call(scenario),
        None => turn.next_step(),
    };
    turn.obey_tool_choice(wanted)
}

/// The current turn: the messages after the last user message, text-only answer or `sleep` result.
struct Turn<'a> {
    conversation: &'a Conversation,
    prompt: &'a Prompt,
    /// Index of the first message of this turn.
    start: usize,
    /// 1-based number of this turn among the turns visible in the conversation.
    number: usize,
    /// Tool calls the assistant made in this turn, in order.
    calls: Vec<&'a ToolCall>,
}

impl<'a> Turn<'a> {
    fn new(conversation: &'a Conversation, prompt: &'a Prompt) -> Turn<'a> {
        // A turn ends with a `sleep` result or a text-only answer; a user message opens the next one (and
        // closes a turn that ended some other way, e.g. at the runtime's tool-call limit).
        let mut start = 0;
        let mut finished = 0;
        let mut active = false;
        for (index, message) in conversation.messages.iter().enumerate() {
            let ends_turn = match message.role {
                Role::Assistant => message.tool_calls.is_empty(),
                Role::Tool => conversation.answered_tool(message) == Some("sleep"),
                Role::User => active,
                Role::System => false,
            };
            if ends_turn {
                finished += 1;
                active = false;
                start = index + 1;
            } else if message.role == Role::Assistant {
                active = true;
            }
            if message.role == Role::User {
                start = index + 1;
            }
        }
        let calls = conversation.messages[start..]
            .iter()
            .flat_map(|message| message.tool_calls.iter())
            .collect();
        Turn {
            conversation,
            prompt,
            start,
            number: finished + 1,
            calls,
        }
    }

    /// The message that opened this turn (the runtime's wake reason), if any.
    fn opening(&self) -> Option<&'a str> {
        let messages = &self.conversation.messages[..self.start];
        match messages.last() {
            Some(message) if message.role == Role::User => Some(message.text.as_str()),
            _ => None,
        }
    }

    fn offers(&self, name: &str) -> bool {
        self.conversation.tool(name).is_some()
    }

    /// A call to `name` with `preferred` arguments bent to the offered schema.
    fn call(&self, name: &str, preferred: Value) -> Reply {
        let parameters = self
            .conversation
            .tool(name)
            .map(|tool| tool.parameters.clone())
            .unwrap_or(Value::Null);
        Reply::Call {
            name: name.to_owned(),
            arguments: schema::arguments_for(&parameters, preferred),
        }
    }

    fn called(&self, name: &str) -> bool {
        self.calls.iter().any(|call| call.name == name)
    }

    /// Whether this turn already made exactly this call.
    fn made(&self, reply: &Reply) -> bool {
        let Reply::Call { name, arguments } = reply else {
            return false;
        };
        self.calls
            .iter()
            .any(|call| &call.name == name && &call.args() == arguments)
    }

    fn result(&self, call: &ToolCall) -> &'a str {
        self.conversation.result_of(&call.id).unwrap_or("")
    }

    fn note_path(&self) -> String {
        format!("notes/turn-{}.md", self.number)
    }

    fn next_step(&self) -> Reply {
        if self.conversation.tools.is_empty() {
            return Reply::Text(self.chat_answer());
        }
        if self.calls.len() >= MAX_CALLS_PER_TURN {
            return self.finish();
        }
        if let Some(status) = self.status_tool() {
            if !self.called(status) {
                return self.call(status, json!({}));
            }
        }
        for scenario in &self.prompt.scenarios {
            if let Some(reply) = self.scenario_step(scenario) {
                return reply;
            }
        }
        if let Some(reply) = self.skill_step() {
            if !self.made(&reply) {
                return reply;
            }
        }
        // The note is the only file the policy writes; compare against calls as made, since the offered
        // schema may have bent the path.
        let wrote = self.calls.iter().find(|call| call.name == "write_file");
        match wrote {
            None if self.offers("write_file") => {
                return self.call(
                    "write_file",
                    json!({"path": self.note_path(), "content": self.note_content()}),
                );
            }
            Some(note) if self.offers("read_file") => {
                let path = note.arg_str("path").unwrap_or_else(|| self.note_path());
                let read_back = self.call("read_file", json!({"path": path}));
                if !self.made(&read_back) {
                    return read_back;
                }
            }
            _ => {}
        }
        self.finish()
    }

    fn status_tool(&self) -> Option<&'static str> {
        STATUS_TOOLS.iter().copied().find(|name| self.offers(name))
    }

    /// Ends the turn: `sleep` when offered, else a text summary.
    fn finish(&self) -> Reply {
        if self.offers("sleep") {
            return self.call(
                "sleep",
                json!({"seconds": SLEEP_SECONDS, "reason": self.sleep_reason()}),
            );
        }
        Reply::Text(format!(
            "Turn {} done: {}. No sleep tool is offered, so I stop here.",
            self.number,
            self.summary()
        ))
    }

    fn sleep_reason(&self) -> String {
        format!("Turn {} done: {}.", self.number, self.summary())
    }

    fn summary(&self) -> String {
        let mut done: Vec<String> = Vec::new();
        let mut seen: Vec<&str> = Vec::new();
        for call in &self.calls {
            if seen.contains(&call.name.as_str()) {
                continue;
            }
            seen.push(&call.name);
            done.push(match call.name.as_str() {
                "write_file" => format!(
                    "wrote {}",
                    call.arg_str("path").unwrap_or_else(|| "a note".to_owned())
                ),
                "read_file" => format!(
                    "read {}",
                    call.arg_str("path").unwrap_or_else(|| "a file".to_owned())
                ),
                name => format!("called {name}"),
            });
        }
        if done.is_empty() {
            "nothing to do".to_owned()
        } else {
            done.join(", ")
        }
    }

    /// A plain chat answer when no tools are offered.
    fn chat_answer(&self) -> String {
        let last_user = self
            .conversation
            .messages
            .iter()
            .rev()
            .find(|message| message.role == Role::User)
            .map(|message| first_line(&message.text, 80))
            .unwrap_or_default();
        if last_user.is_empty() {
            "I am the automaton-lab scripted model. No tools are offered, so all I can do is answer in text: \
             nothing to do."
                .to_owned()
        } else {
            format!(
                "I am the automaton-lab scripted model. No tools are offered, so all I can do is answer in \
                 text. You said: \"{last_user}\"."
            )
        }
    }

    fn note_content(&self) -> String {
        let mut lines = vec![format!("# Turn {}", self.number), String::new()];
        if let Some(opening) = self.opening() {
            lines.push(format!("- woke for: {}", first_line(opening, 160)));
        }
        let status = self
            .calls
            .iter()
            .find(|call| STATUS_TOOLS.contains(&call.name.as_str()));
        lines.push(match status {
            Some(call) => format!(
                "- status ({}): {}",
                call.name,
                collapsed(self.result(call), 200)
            ),
            None => "- status: no status tool offered".to_owned(),
        });
        for call in &self.calls {
            if GATED_TOOLS.contains(&call.name.as_str()) {
                lines.push(format!(
                    "- {} (lab-scenario): {}",
                    call.name,
                    first_line(self.result(call), 200)
                ));
            }
        }
        if let Some(skill) = self.current_skill() {
            lines.push(format!("- skill: {}", skill.name));
        }
        lines.push(format!("- next: sleep {SLEEP_SECONDS}s"));
        lines.push(String::new());
        lines.push("Noted by the automaton-lab scripted model.".to_owned());
        lines.join("\n") + "\n"
    }

    /// Skills rotate by turn so consecutive turns do not look alike.
    fn current_skill(&self) -> Option<&'a Skill> {
        let skills = &self.prompt.skills;
        (!skills.is_empty()).then(|| &skills[(self.number - 1) % skills.len()])
    }

    /// Uses the turn's skill: a read-only tool it names, else the first safe shell command in its code
    /// blocks, else reading its SKILL.md (when the conversation shows where skills live); else nothing.
    fn skill_step(&self) -> Option<Reply> {
        let skill = self.current_skill()?;
        let status = self.status_tool();
        let named_tool = SKILL_TOOLS.iter().copied().find(|name| {
            Some(*name) != status
                && mentions(&skill.body, name)
                && self
                    .conversation
                    .tool(name)
                    .is_some_and(|tool| requires_nothing(&tool.parameters))
        });
        if let Some(name) = named_tool {
            return Some(self.call(name, json!({})));
        }
        if self.offers("exec") {
            if let Some(command) = first_safe_command(&skill.body) {
                return Some(self.call("exec", json!({"command": command})));
            }
        }
        if self.offers("read_file") {
            if let Some(path) = self.skill_file(&skill.name) {
                return Some(self.call("read_file", json!({"path": path})));
            }
        }
        None
    }

    /// The absolute path of a skill's SKILL.md, when the conversation shows where skills live (relative
    /// paths resolve against the runtime's workspace, which need not hold the skills).
    fn skill_file(&self, name: &str) -> Option<String> {
        let name: String = name
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            .collect();
        let name = name.trim_start_matches('.');
        if name.is_empty() {
            return None;
        }
        self.conversation
            .messages
            .iter()
            .filter(|message| message.role != Role::Assistant)
            .flat_map(|message| {
                message.text.split(|c: char| {
                    c.is_whitespace() || matches!(c, '"' | '\'' | '`' | ',' | '(' | ')')
                })
            })
            .filter(|word| word.starts_with('/'))
            .find_map(|word| {
                let word = word.trim_end_matches(['.', ':', ';']);
                if let Some(index) = word.find(&format!("/skills/{name}")) {
                    return Some(format!("{}/skills/{name}/SKILL.md", &word[..index]));
                }
                let dir = word.trim_end_matches('/');
                dir.ends_with("/skills")
                    .then(|| format!("{dir}/{name}/SKILL.md"))
            })
    }

    /// The next call a scenario asks for, if it has one left in this turn.
    fn scenario_step(&self, scenario: &Scenario) -> Option<Reply> {
        match scenario.kind {
            ScenarioKind::Spend => self.spend_step(scenario),
            ScenarioKind::Keysend => {
                let node_id = scenario
                    .args
                    .iter()
                    .find(|arg| is_node_id(arg))
                    .cloned()
                    .or_else(|| {
                        self.find_in_prompt(|word| is_node_id(word).then(|| word.to_owned()))
                    })?;
                let sats = scenario.number().unwrap_or(1_000);
                self.once_per_conversation("send_payment", "node_id", &node_id, || {
                    json!({
                        "node_id": node_id,
                        "amount_sats": sats,
                        "purpose": "lab-scenario keysend: pay the node named in the prompt",
                    })
                })
            }
            ScenarioKind::L402 => {
                if !self.offers("l402_fetch") || self.called("l402_fetch") {
                    return None;
                }
                let url = scenario
                    .url()
                    .map(str::to_owned)
                    .or_else(|| self.l402_url_in_prompt())?;
                let method = scenario
                    .args
                    .iter()
                    .find(|arg| matches!(arg.to_ascii_uppercase().as_str(), "GET" | "POST"))
                    .map(|method| method.to_ascii_uppercase())
                    .unwrap_or_else(|| "GET".to_owned());
                Some(self.call(
                    "l402_fetch",
                    json!({"url": url, "method": method, "max_sats": scenario.number().unwrap_or(1_000)}),
                ))
            }
            ScenarioKind::Rent => {
                if !self.offers("rent_vps") || self.conversation_called("rent_vps") {
                    return None;
                }
                let mut args = json!({"months": 1});
                if let Some(template) = scenario.args.iter().find(|arg| arg.parse::<u64>().is_err())
                {
                    args["template"] = json!(template);
                }
                if let Some(months) = scenario.number() {
                    args["months"] = json!(months);
                }
                Some(self.call("rent_vps", args))
            }
            ScenarioKind::Renew => {
                let id = scenario.args.first()?.clone();
                let months = scenario
                    .args
                    .get(1)
                    .and_then(|m| m.parse::<u64>().ok())
                    .unwrap_or(1);
                self.once_per_conversation(
                    "renew_vps",
                    "id",
                    &id,
                    || json!({"id": id, "months": months}),
                )
            }
            ScenarioKind::Spawn => {
                let name = scenario
                    .args
                    .first()
                    .filter(|arg| arg.parse::<u64>().is_err())
                    .cloned()
                    .unwrap_or_else(|| "child-1".to_owned());
                let fund_sats = scenario.number().unwrap_or(5_000);
                let provider = scenario
                    .args
                    .iter()
                    .find_map(|arg| arg.strip_prefix("provider="))
                    .map(str::to_owned);
                let words: Vec<&str> = scenario
                    .args
                    .iter()
                    .skip(1)
                    .map(String::as_str)
                    .filter(|arg| arg.parse::<u64>().is_err() && !arg.starts_with("provider="))
                    .collect();
                let specialization = if words.is_empty() {
                    "Watch the lab chain and report to the parent".to_owned()
                } else {
                    words.join(" ")
                };
                self.once_per_conversation("spawn_child", "name", &name, || {
                    let mut args = json!({"name": name, "specialization": specialization, "fund_sats": fund_sats});
                    if let Some(provider) = provider {
                        args["provider"] = json!(provider);
                    }
                    args
                })
            }
            ScenarioKind::Fund => {
                let name = scenario.args.first()?.clone();
                let sats = scenario
                    .args
                    .get(1)
                    .and_then(|s| s.parse::<u64>().ok())
                    .unwrap_or(1_000);
                self.once_per_conversation(
                    "fund_child",
                    "name",
                    &name,
                    || json!({"name": name, "amount_sats": sats}),
                )
            }
            ScenarioKind::Schedule => self.schedule_step(scenario),
            // Transport scenarios (error, flaky, slow, context) and loop are handled elsewhere.
            ScenarioKind::Loop
            | ScenarioKind::Error
            | ScenarioKind::Flaky
            | ScenarioKind::Slow
            | ScenarioKind::Context => None,
        }
    }

    /// Changes the agent's own schedule through `modify_heartbeat`, once per conversation and entry.
    fn schedule_step(&self, scenario: &Scenario) -> Option<Reply> {
        let mut args = scenario.args.iter().map(String::as_str).peekable();
        let action = match args.peek() {
            Some(&word @ ("add" | "remove" | "enable" | "disable")) => {
                args.next();
                word
            }
            _ => "add",
        };
        let name = args.next().unwrap_or("lab_schedule").to_owned();
        let mut call = json!({"action": action, "name": name});
        if action == "add" {
            let rest: Vec<&str> = args.collect();
            let every = rest
                .iter()
                .find(|word| {
                    word.len() > 1
                        && word.ends_with(['s', 'm', 'h', 'd'])
                        && word[..word.len() - 1].chars().all(|c| c.is_ascii_digit())
                })
                .copied()
                .unwrap_or("1m");
            let task = rest
                .iter()
                .find(|word| word.contains('_'))
                .copied()
                .unwrap_or("wake_agent");
            call["every"] = json!(every);
            call["task"] = json!(task);
            if task == "wake_agent" {
                call["params"] = json!({"reason": format!("lab-scenario schedule: {name}")});
            }
        }
        let key = format!("{action} {name}");
        let done = self.conversation.calls().any(|(_, made)| {
            made.name == "modify_heartbeat"
                && format!(
                    "{} {}",
                    made.arg_str("action").unwrap_or_default(),
                    made.arg_str("name").unwrap_or_default()
                ) == key
        });
        (self.offers("modify_heartbeat") && !done).then(|| self.call("modify_heartbeat", call))
    }

    fn conversation_called(&self, name: &str) -> bool {
        self.conversation.calls().any(|(_, call)| call.name == name)
    }

    /// A gated call made at most once per conversation for a given key (a child's name, a node id).
    fn once_per_conversation(
        &self,
        tool: &str,
        key: &str,
        value: &str,
        args: impl FnOnce() -> Value,
    ) -> Option<Reply> {
        if !self.offers(tool) {
            return None;
        }
        let reply = self.call(tool, args());
        let Reply::Call { arguments, .. } = &reply else {
            return None;
        };
        // A call the agent's survival tier refused in an earlier turn does not count: like a real model, the double
        // tries again once something new happened (funding, say).
        let this_turn = self
            .conversation
            .messages
            .iter()
            .rposition(|message| message.role == Role::User)
            .unwrap_or(0);
        let done = self.conversation.calls().any(|(index, call)| {
            call.name == tool
                && (call.arg_str(key).as_deref() == Some(value) || &call.args() == arguments)
                && (index > this_turn
                    || !self
                        .conversation
                        .result_of(&call.id)
                        .is_some_and(|result| result.contains("while your survival tier is")))
        });
        (!done).then_some(reply)
    }

    /// Pays each invoice found in the conversation at most once, one payment per turn; with a URL and no
    /// invoice yet, fetches one through `exec` + curl.
    fn spend_step(&self, scenario: &Scenario) -> Option<Reply> {
        if !self.offers("pay_invoice") || self.called("pay_invoice") {
            return None;
        }
        let paid: Vec<String> = self
            .conversation
            .calls()
            .filter(|(_, call)| call.name == "pay_invoice")
            .filter_map(|(_, call)| call.arg_str("bolt11"))
            .map(|bolt11| bolt11.to_ascii_lowercase())
            .collect();
        let mut candidates: Vec<String> = scenario
            .args
            .iter()
            .flat_map(|arg| invoices_in(arg))
            .collect();
        for message in &self.conversation.messages {
            if matches!(message.role, Role::System | Role::User | Role::Tool) {
                candidates.extend(invoices_in(&message.text));
            }
        }
        if let Some(bolt11) = candidates.into_iter().find(|bolt11| !paid.contains(bolt11)) {
            return Some(self.call(
                "pay_invoice",
                json!({
                    "bolt11": bolt11,
                    "purpose": "lab-scenario spend: pay the invoice from the conversation",
                }),
            ));
        }
        let url = scenario.url()?;
        if !self.offers("exec") {
            return None;
        }
        let method = if scenario
            .args
            .iter()
            .any(|arg| arg.eq_ignore_ascii_case("GET"))
        {
            "GET"
        } else {
            "POST"
        };
        let fetch = self.call(
            "exec",
            json!({"command": format!("curl -fsS -X {method} '{}'", url.replace('\'', "%27"))}),
        );
        (!self.made(&fetch)).then_some(fetch)
    }

    fn find_in_prompt(&self, pick: impl Fn(&str) -> Option<String>) -> Option<String> {
        self.conversation
            .messages
            .iter()
            .filter(|message| matches!(message.role, Role::System | Role::User))
            .flat_map(|message| message.text.split(|c: char| !c.is_ascii_alphanumeric()))
            .find_map(pick)
    }

    /// A URL on a line of the prompt that mentions L402 (e.g. `l402_api_url: http://…`).
    fn l402_url_in_prompt(&self) -> Option<String> {
        self.conversation
            .messages
            .iter()
            .filter(|message| matches!(message.role, Role::System | Role::User))
            .flat_map(|message| message.text.lines())
            .filter(|line| line.to_ascii_lowercase().contains("l402"))
            .flat_map(|line| line.split_whitespace())
            .map(|word| {
                word.trim_matches(|c: char| {
                    matches!(c, '`' | '"' | '\'' | ',' | '(' | ')' | '<' | '>')
                })
            })
            .find(|word| word.starts_with("http://") || word.starts_with("https://"))
            .map(str::to_owned)
    }

    /// The `loop` scenario: the same call every time, so loop guards have something to catch.
    fn loop_call(&self, scenario: &Scenario) -> Reply {
        if self.offers("exec") {
            let command = if scenario.args.is_empty() {
                LOOP_COMMAND.to_owned()
            } else {
                scenario.args.join(" ")
            };
            return self.call("exec", json!({"command": command}));
        }
        match self.status_tool() {
            Some(status) => self.call(status, json!({})),
            None => Reply::Text("lab-scenario loop: no exec or status tool offered".to_owned()),
        }
    }

    /// Applies `tool_choice` and the two hard rules: only offered tools, and gated tools only when a
    /// scenario asked for them.
    fn obey_tool_choice(&self, wanted: Reply) -> Reply {
        let reply = match &self.conversation.tool_choice {
            ToolChoice::Auto => wanted,
            ToolChoice::None => match wanted {
                Reply::Call { name, .. } => Reply::Text(format!(
                    "Tools are switched off for this reply; next I would call {name}. {}",
                    self.sleep_reason()
                )),
                text => text,
            },
            ToolChoice::Required => match wanted {
                Reply::Text(text) => self.any_safe_call().unwrap_or(Reply::Text(text)),
                call => call,
            },
            ToolChoice::Function(forced) => match wanted {
                Reply::Call { ref name, .. } if name == forced => wanted,
                _ => {
                    let preferred = match forced.as_str() {
                        "sleep" => json!({"seconds": SLEEP_SECONDS, "reason": self.sleep_reason()}),
                        "write_file" => {
                            json!({"path": self.note_path(), "content": self.note_content()})
                        }
                        "read_file" => json!({"path": self.note_path()}),
                        "exec" => json!({"command": "uptime"}),
                        _ => json!({}),
                    };
                    self.call(forced, preferred)
                }
            },
        };
        match &reply {
            Reply::Call { name, .. } if !self.offers(name) || !self.allowed(name) => Reply::Text(
                format!("I will not call {name} here. {}", self.sleep_reason()),
            ),
            _ => reply,
        }
    }

    fn any_safe_call(&self) -> Option<Reply> {
        if self.offers("sleep") {
            return Some(self.finish());
        }
        self.conversation
            .tools
            .iter()
            .find(|tool| !GATED_TOOLS.contains(&tool.name.as_str()))
            .map(|tool| self.call(&tool.name, json!({})))
    }

    /// Whether a scenario unlocks this gated tool (ungated tools are always allowed).
    fn allowed(&self, name: &str) -> bool {
        let needed = match name {
            "pay_invoice" => ScenarioKind::Spend,
            "send_payment" => ScenarioKind::Keysend,
            "l402_fetch" => ScenarioKind::L402,
            "rent_vps" => ScenarioKind::Rent,
            "renew_vps" => ScenarioKind::Renew,
            "spawn_child" => ScenarioKind::Spawn,
            "fund_child" => ScenarioKind::Fund,
            _ => return !GATED_TOOLS.contains(&name),
        };
        self.prompt.scenario(needed).is_some()
    }
}

/// The first line of a text, whitespace-collapsed, at most `max` characters.
fn first_line(text: &str, max: usize) -> String {
    let line = text
        .lines()
        .map(str::trim)
        .find(|line| !line.is_empty())
        .unwrap_or("");
    let collapsed = line.split_whitespace().collect::<Vec<_>>().join(" ");
    if collapsed.chars().count() > max {
        collapsed.chars().take(max).collect::<String>() + "…"
    } else {
        collapsed
    }
}

/// The whole text on one line (JSON results included), at most `max` characters.
fn collapsed(text: &str, max: usize) -> String {
    let collapsed = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if collapsed.chars().count() > max {
        collapsed.chars().take(max).collect::<String>() + "…"
    } else {
        collapsed
    }
}

/// Whether `text` names `word` as a whole word.
fn mentions(text: &str, word: &str) -> bool {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .any(|token| token == word)
}

fn requires_nothing(parameters: &Value) -> bool {
    parameters
        .get("required")
        .and_then(Value::as_array)
        .is_none_or(|required| required.is_empty())
}

/// The first command in a shell code block of a skill that is safe to run.
fn first_safe_command(body: &str) -> Option<String> {
    let mut in_block = false;
    let mut shell_block = false;
    for line in body.lines() {
        let trimmed = line.trim();
        if let Some(language) = trimmed.strip_prefix("```") {
            if in_block {
                in_block = false;
            } else {
                in_block = true;
                shell_block = matches!(
                    language.trim().to_ascii_lowercase().as_str(),
                    "" | "sh" | "bash" | "shell" | "console" | "zsh"
                );
            }
            continue;
        }
        if !in_block || !shell_block {
            continue;
        }
        let command = trimmed.strip_prefix("$ ").unwrap_or(trimmed).trim();
        if command.is_empty() || command.starts_with('#') || command.len() > 500 {
            continue;
        }
        let lower = command.to_ascii_lowercase();
        if UNSAFE_COMMAND_WORDS.iter().any(|word| lower.contains(word)) {
            continue;
        }
        return Some(command.to_owned());
    }
    None
}

/// BOLT11 invoices in a text (lowercased), checked by parsing them.
fn invoices_in(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|word| word.len() > 60)
        .map(str::to_ascii_lowercase)
        .filter(|word| {
            word.starts_with("lnbc") || word.starts_with("lntb") || word.starts_with("lnsb")
        })
        .filter(|word| Bolt11Invoice::from_str(word).is_ok())
        .collect()
}

fn is_node_id(word: &str) -> bool {
    word.len() == 66
        && (word.starts_with("02") || word.starts_with("03"))
        && word.chars().all(|c| c.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_from_skills_skip_anything_that_could_spend() {
        let body = "Intro\n```sh\n$ automaton pay lnbc1\n# a comment\ndf -h /\n```\n```python\nprint(1)\n```";
        assert_eq!(first_safe_command(body).as_deref(), Some("df -h /"));
        assert_eq!(first_safe_command("```python\nprint(1)\n```"), None);
    }

    #[test]
    fn mentions_whole_words_only() {
        assert!(mentions("use `check_balance` first", "check_balance"));
        assert!(!mentions("use check_balance_now", "check_balance"));
    }
}
