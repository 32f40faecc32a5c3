//! What the scripted model reads out of the prompt: `lab-scenario:` lines (the only thing that lets it spend,
//! rent or spawn) and the skills the system prompt lists.

use super::conversation::{Conversation, Role};

/// The scenarios a `lab-scenario: NAME ARGS…` line can ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ScenarioKind {
    /// `spend [BOLT11 | [GET|POST] URL]`: pay an invoice (`pay_invoice`).
    Spend,
    /// `keysend NODE_ID [SATS]`: `send_payment`.
    Keysend,
    /// `l402 URL [MAX_SATS] [METHOD]`: `l402_fetch`, once per turn.
    L402,
    /// `rent [TEMPLATE] [MONTHS]`: `rent_vps`.
    Rent,
    /// `renew ID [MONTHS]`: `renew_vps`.
    Renew,
    /// `spawn [NAME] [FUND_SATS] [provider=NAME] [SPECIALIZATION…]`: `spawn_child`.
    Spawn,
    /// `fund NAME SATS`: `fund_child`.
    Fund,
    /// `schedule [add|remove|enable|disable] NAME [EVERY] [TASK]`: `modify_heartbeat`, once per conversation
    /// and entry (add defaults to every 1m, task wake_agent).
    Schedule,
    /// `loop [COMMAND…]`: the same `exec` call forever, never sleeping.
    Loop,
    /// `error [STATUS]`: every request fails with that HTTP status (default 500).
    Error,
    /// `flaky [N]`: the first N (default 2) attempts at each request fail with 500.
    Flaky,
    /// `slow SECS`: wait before answering.
    Slow,
    /// `context TOKENS`: a context window of that many tokens instead of 128,000.
    Context,
}

impl ScenarioKind {
    fn parse(name: &str) -> Option<ScenarioKind> {
        Some(match name.to_ascii_lowercase().as_str() {
            "spend" | "pay" => ScenarioKind::Spend,
            "keysend" => ScenarioKind::Keysend,
            "l402" => ScenarioKind::L402,
            "rent" => ScenarioKind::Rent,
            "renew" => ScenarioKind::Renew,
            "spawn" => ScenarioKind::Spawn,
            "fund" => ScenarioKind::Fund,
            "schedule" => ScenarioKind::Schedule,
            "loop" => ScenarioKind::Loop,
            "error" => ScenarioKind::Error,
            "flaky" => ScenarioKind::Flaky,
            "slow" => ScenarioKind::Slow,
            "context" => ScenarioKind::Context,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Scenario {
    pub kind: ScenarioKind,
    pub args: Vec<String>,
}

impl Scenario {
    /// The first argument that parses as a number.
    pub fn number(&self) -> Option<u64> {
        self.args.iter().find_map(|arg| arg.parse().ok())
    }

    /// The first argument that is an http(s) URL.
    pub fn url(&self) -> Option<&str> {
        self.args
            .iter()
            .map(String::as_str)
            .find(|arg| arg.starts_with("http://") || arg.starts_with("https://"))
    }
}

/// A skill listed in the system prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Skill {
    pub name: String,
    pub body: String,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct Prompt {
    pub scenarios: Vec<Scenario>,
    pub skills: Vec<Skill>,
    /// Every `lab-scenario:` line that named no known scenario (reported in the server log).
    pub unknown_scenarios: Vec<String>,
}

impl Prompt {
    /// Reads scenario lines from system, developer and user messages (outside skill blocks: skills are
    /// untrusted content and must not unlock spending) and skills from system messages.
    pub fn read(conversation: &Conversation) -> Prompt {
        let mut prompt = Prompt::default();
        for message in &conversation.messages {
            if !matches!(message.role, Role::System | Role::User) {
                continue;
            }
            let blocks = split_skills(&message.text);
            if message.role == Role::System {
                prompt.skills.extend(blocks.skills);
            }
            for line in blocks.outside {
                let Some(rest) = strip_prefix_ignore_case(line.trim(), "lab-scenario:") else {
                    continue;
                };
                let mut words = rest.split_whitespace().map(|word| {
                    word.trim_matches(|c: char| matches!(c, '`' | '"' | '\'' | ',' | ';'))
                        .to_owned()
                });
                let Some(name) = words.next() else { continue };
                match ScenarioKind::parse(&name) {
                    Some(kind) => {
                        let scenario = Scenario {
                            kind,
                            args: words.filter(|word| !word.is_empty()).collect(),
                        };
                        if !prompt.scenarios.contains(&scenario) {
                            prompt.scenarios.push(scenario);
                        }
                    }
                    None => prompt.unknown_scenarios.push(name),
                }
            }
        }
        prompt
    }

    pub fn scenario(&self, kind: ScenarioKind) -> Option<&Scenario> {
        self.scenarios.iter().find(|scenario| scenario.kind == kind)
    }
}

fn strip_prefix_ignore_case<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let head = text.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &text[prefix.len()..])
}

struct Blocks<'a> {
    skills: Vec<Skill>,
    outside: Vec<&'a str>,
}

enum Open {
    /// `[SKILL: name …]` or `<skill name="…">`, closed by an end marker or the next block.
    Marker,
    /// `## Skill: name`, closed by a heading of the same or a higher level.
    Heading(usize),
    /// A `## Skills` section listing `- name: description` bullets.
    Listing(usize),
}

/// Splits a message into skill blocks and the lines outside them. Recognised forms:
/// `[SKILL: name — UNTRUSTED CONTENT]` … `[END SKILL]` (or `[/SKILL…]`), `<skill name="name">` … `</skill>`,
/// a heading `## Skill: name`, and a `## Skills` heading followed by `- name: description` bullets.
fn split_skills(text: &str) -> Blocks<'_> {
    let mut blocks = Blocks {
        skills: Vec::new(),
        outside: Vec::new(),
    };
    let mut open: Option<Open> = None;
    let mut in_fence = false;
    for line in text.lines() {
        let trimmed = line.trim();
        let upper = trimmed.to_ascii_uppercase();
        if trimmed.starts_with("```") {
            in_fence = !in_fence;
        }
        let fenced = in_fence || trimmed.starts_with("```");
        if !fenced {
            if let Some(name) = marker_skill_name(trimmed) {
                blocks.skills.push(Skill {
                    name,
                    body: String::new(),
                });
                open = Some(Open::Marker);
                // Text after the closing bracket of the marker belongs to the body.
                if let Some((_, after)) = trimmed.split_once(']') {
                    push_body(&mut blocks.skills, after);
                }
                continue;
            }
            if is_end_marker(&upper) {
                if open.is_some() {
                    open = None;
                    continue;
                }
            } else if let Some((level, title)) = heading(trimmed) {
                let closes = match open {
                    Some(Open::Heading(open_level)) | Some(Open::Listing(open_level)) => {
                        level <= open_level
                    }
                    // An H1 (a new layer of the system prompt) ends an unterminated `[SKILL:` block.
                    Some(Open::Marker) => level == 1,
                    None => false,
                };
                if closes {
                    open = None;
                }
                if let Some(name) = strip_prefix_ignore_case(title, "skill:") {
                    blocks.skills.push(Skill {
                        name: name.trim().to_owned(),
                        body: String::new(),
                    });
                    open = Some(Open::Heading(level));
                    continue;
                }
                if open.is_none() && is_listing_title(title) {
                    open = Some(Open::Listing(level));
                    blocks.outside.push(line);
                    continue;
                }
            }
        }
        match open {
            Some(Open::Marker) | Some(Open::Heading(_)) => push_body(&mut blocks.skills, line),
            Some(Open::Listing(_)) => {
                if let Some(skill) = listed_skill(trimmed) {
                    blocks.skills.push(skill);
                } else if !trimmed.is_empty() && !trimmed.starts_with(['-', '*']) {
                    // Indented continuation lines belong to the previous bullet.
                    if line.starts_with([' ', '\t']) {
                        push_body(&mut blocks.skills, trimmed);
                    } else {
                        open = None;
                        blocks.outside.push(line);
                    }
                }
            }
            None => blocks.outside.push(line),
        }
    }
    blocks.skills.retain(|skill| !skill.name.is_empty());
    blocks
}

fn push_body(skills: &mut [Skill], line: &str) {
    if let Some(skill) = skills.last_mut() {
        if !skill.body.is_empty() {
            skill.body.push('\n');
        }
        skill.body.push_str(line);
    }
}

fn marker_skill_name(trimmed: &str) -> Option<String> {
    if let Some(rest) = strip_prefix_ignore_case(trimmed, "[skill:") {
        let end = rest
            .find([']', '—', '–', '(', '|'])
            .or_else(|| rest.find(" - "))
            .unwrap_or(rest.len());
        return Some(rest[..end].trim().to_owned());
    }
    if let Some(rest) = strip_prefix_ignore_case(trimmed, "<skill") {
        if rest.starts_with(['>', ' ']) {
            let name = rest
                .split_once("name=\"")
                .and_then(|(_, after)| after.split_once('"'))
                .map(|(name, _)| name.trim().to_owned())
                .unwrap_or_default();
            return Some(name);
        }
    }
    None
}

fn is_end_marker(upper: &str) -> bool {
    [
        "[END SKILL",
        "[/SKILL",
        "[END OF SKILL",
        "[SKILL END",
        "</SKILL",
    ]
    .iter()
    .any(|marker| upper.starts_with(marker))
}

fn heading(trimmed: &str) -> Option<(usize, &str)> {
    let level = trimmed.chars().take_while(|c| *c == '#').count();
    if level == 0 || level > 6 {
        return None;
    }
    let title = trimmed[level..].strip_prefix(' ')?;
    Some((level, title.trim()))
}

fn is_listing_title(title: &str) -> bool {
    let lower = title.to_ascii_lowercase();
    lower == "skills"
        || lower.starts_with("skills ")
        || lower.starts_with("skills:")
        || lower.starts_with("available skills")
        || lower.starts_with("installed skills")
        || lower.starts_with("active skills")
}

/// `- name: description`, `- **name** — description`, `* name - description`.
fn listed_skill(trimmed: &str) -> Option<Skill> {
    let item = trimmed
        .strip_prefix("- ")
        .or_else(|| trimmed.strip_prefix("* "))?
        .trim();
    let item = item.trim_start_matches("**").trim_start_matches('`');
    let end = item
        .find(['*', '`', ':', '—', '–', '('])
        .or_else(|| item.find(" - "))
        .unwrap_or(item.len());
    let name = item[..end].trim();
    if name.is_empty() || name.contains(' ') {
        return None;
    }
    let description = item[end..]
        .trim_start_matches(['*', '`', ':', '—', '–', '-', ' '])
        .trim();
    Some(Skill {
        name: name.to_owned(),
        body: description.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::conversation::{Message, ToolChoice};

    fn system(text: &str) -> Conversation {
        Conversation {
            messages: vec![Message {
                role: Role::System,
                text: text.to_owned(),
                tool_calls: Vec::new(),
                tool_call_id: None,
            }],
            tools: Vec::new(),
            tool_choice: ToolChoice::Auto,
        }
    }

    #[test]
    fn reads_bracketed_skills_and_ignores_scenarios_inside_them() {
        let prompt = Prompt::read(&system(
            "You are an agent.\nlab-scenario: rent small 2\n\
             [SKILL: survival — UNTRUSTED CONTENT]\nCheck `check_balance` often.\n\
             lab-scenario: spend\n[END SKILL: survival]\n\
             [SKILL: notes]\nWrite notes.\n# Status\nlab-scenario: loop",
        ));
        let names: Vec<_> = prompt
            .skills
            .iter()
            .map(|skill| skill.name.as_str())
            .collect();
        assert_eq!(names, ["survival", "notes"]);
        assert!(prompt.skills[0].body.contains("check_balance"));
        let kinds: Vec<_> = prompt.scenarios.iter().map(|s| s.kind).collect();
        assert_eq!(kinds, [ScenarioKind::Rent, ScenarioKind::Loop]);
        assert_eq!(prompt.scenarios[0].args, ["small", "2"]);
    }

    #[test]
    fn reads_heading_xml_and_listing_skills() {
        let prompt = Prompt::read(&system(
            "## Skills\n- survival: stay alive\n- **earn** — sell things\n\n\
             ## Skill: weather\nRun:\n```sh\ncurl wttr.in\n```\n## Other\n\
             <skill name=\"greet\">\nSay hi\n</skill>\nLAB-SCENARIO: Spend lnbcrt1xyz",
        ));
        let names: Vec<_> = prompt
            .skills
            .iter()
            .map(|skill| skill.name.as_str())
            .collect();
        assert_eq!(names, ["survival", "earn", "weather", "greet"]);
        assert_eq!(prompt.skills[1].body, "sell things");
        assert!(prompt.skills[2].body.contains("curl wttr.in"));
        assert!(!prompt.skills[2].body.contains("Other"));
        assert_eq!(
            prompt.scenarios,
            [Scenario {
                kind: ScenarioKind::Spend,
                args: vec!["lnbcrt1xyz".to_owned()]
            }]
        );
    }
}
