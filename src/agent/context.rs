//! Context: the conversation the model sees — recent turns replayed as messages within a token budget, with one
//! summary line standing in for everything older.

use rusqlite::Connection;

use crate::inference::{Message, ToolCall};
use crate::state::history::{self, TurnRecord};
use crate::tools::cap_text;

/// Tool results replayed from earlier turns are cut harder than fresh ones: the model already acted on them.
pub const HISTORY_RESULT_CAP: usize = 2_000;

/// A rough token count (≈ 4 bytes per token for English and JSON). Only used to stay under budgets, so erring a
/// little is fine; no tokenizer matches every model anyway.
pub fn estimate_tokens(text: &str) -> usize {
    text.len().div_ceil(4)
}

pub fn message_tokens(message: &Message) -> usize {
    // A few tokens of per-message overhead in every chat format.
    4 + match message {
        Message::User { content } => estimate_tokens(content),
        Message::Assistant {
            content,
            tool_calls,
        } => {
            content.as_deref().map(estimate_tokens).unwrap_or(0)
                + tool_calls
                    .iter()
                    .map(|c| estimate_tokens(&c.name) + estimate_tokens(&c.arguments) + 8)
                    .sum::<usize>()
        }
        Message::Tool { content, .. } => estimate_tokens(content) + 8,
    }
}

/// Replays one stored turn as the messages it was made of.
pub fn turn_messages(turn: &TurnRecord, result_cap: usize) -> Vec<Message> {
    let mut out = vec![Message::User {
        content: format!(
            "[{} · {}] {}",
            turn.started_at,
            turn.input_source,
            turn.input.as_deref().unwrap_or("(no input)")
        ),
    }];
    let thinking = turn.thinking.clone().filter(|t| !t.trim().is_empty());
    if turn.tool_calls.is_empty() {
        if let Some(text) = thinking {
            out.push(Message::Assistant {
                content: Some(text),
                tool_calls: vec![],
            });
        }
    } else {
        out.push(Message::Assistant {
            content: thinking,
            tool_calls: turn
                .tool_calls
                .iter()
                .map(|c| ToolCall {
                    id: c.id.clone(),
                    name: c.name.clone(),
                    arguments: c.arguments.clone(),
                })
                .collect(),
        });
        for c in &turn.tool_calls {
            out.push(Message::Tool {
                tool_call_id: c.id.clone(),
                name: c.name.clone(),
                content: cap_text(&c.result, result_cap.min(HISTORY_RESULT_CAP)),
                is_error: c.is_error,
            });
        }
    }
    out
}

/// What the history contributes to a request.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct History {
    pub messages: Vec<Message>,
    /// Turns replayed in full.
    pub shown_turns: usize,
    /// Turns only counted in the summary line.
    pub summarized_turns: i64,
}

/// Loads the last `recent` turns, keeps the newest that fit in `budget_tokens`, and summarizes the rest in one
/// line. Runs on a DB connection (call it inside `Db::call`).
pub fn load_history(
    conn: &Connection,
    recent: u32,
    budget_tokens: usize,
    result_cap: usize,
) -> rusqlite::Result<History> {
    let turns = history::recent_turns(conn, recent)?;
    let mut kept: Vec<Vec<Message>> = Vec::new();
    let mut used = 0usize;
    let mut oldest_kept_rowid = i64::MAX;
    for turn in turns.iter().rev() {
        let messages = turn_messages(turn, result_cap);
        let cost: usize = messages.iter().map(message_tokens).sum();
        if used + cost > budget_tokens {
            break;
        }
        used += cost;
        oldest_kept_rowid = turn.rowid;
        kept.push(messages);
    }
    kept.reverse();
    let shown_turns = kept.len();
    let mut messages = Vec::new();
    let summary = summarize_before(conn, oldest_kept_rowid)?;
    let summarized_turns = summary.as_ref().map(|s| s.0).unwrap_or(0);
    if let Some((_, line)) = summary {
        messages.push(Message::User { content: line });
    }
    messages.extend(kept.into_iter().flatten());
    Ok(History {
        messages,
        shown_turns,
        summarized_turns,
    })
}

/// One line about every turn older than `before_rowid`, or None when there are none.
fn summarize_before(
    conn: &Connection,
    before_rowid: i64,
) -> rusqlite::Result<Option<(i64, String)>> {
    let (count, first, last): (i64, Option<String>, Option<String>) = conn.query_row(
        "SELECT count(*), min(started_at), max(started_at) FROM turns WHERE rowid < ?1",
        [before_rowid],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )?;
    if count == 0 {
        return Ok(None);
    }
    let mut stmt = conn.prepare(
        "SELECT outcome, count(*) FROM turns WHERE rowid < ?1 GROUP BY outcome ORDER BY count(*) DESC, outcome",
    )?;
    let outcomes: Vec<String> = stmt
        .query_map([before_rowid], |r| {
            Ok(format!(
                "{}×{}",
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?
            ))
        })?
        .collect::<rusqlite::Result<_>>()?;
    let mut stmt = conn.prepare(
        "SELECT c.name, count(*), sum(c.is_error) FROM tool_calls c JOIN turns t ON t.id = c.turn_id \
         WHERE t.rowid < ?1 GROUP BY c.name ORDER BY count(*) DESC, c.name",
    )?;
    let tools: Vec<String> = stmt
        .query_map([before_rowid], |r| {
            let name: String = r.get(0)?;
            let n: i64 = r.get(1)?;
            let failed: i64 = r.get(2)?;
            Ok(if failed > 0 {
                format!("{name}×{n} ({failed} failed)")
            } else {
                format!("{name}×{n}")
            })
        })?
        .collect::<rusqlite::Result<_>>()?;
    let line = format!(
        "[summary of {count} earlier turns, {} to {}, not shown in full] Outcomes: {}. Tools used: {}.",
        first.unwrap_or_default(),
        last.unwrap_or_default(),
        outcomes.join(", "),
        if tools.is_empty() {
            "none".to_string()
        } else {
            tools.join(", ")
        }
    );
    Ok(Some((count, line)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Db;

    fn add_turn(
        c: &Connection,
        id: &str,
        input: &str,
        tool: Option<(&str, &str)>,
    ) -> rusqlite::Result<()> {
        c.execute(
            "INSERT INTO turns (id, started_at, input, input_source, thinking, outcome) \
             VALUES (?1, '2025-01-01T00:00:00Z', ?2, 'self', 'hmm', 'sleep')",
            [id, input],
        )?;
        if let Some((name, result)) = tool {
            c.execute(
                "INSERT INTO tool_calls (id, turn_id, seq, name, arguments, result, is_error, duration_ms, created_at) \
                 VALUES (?1, ?2, 0, ?3, '{}', ?4, 0, 1, '2025-01-01T00:00:01Z')",
                rusqlite::params![format!("c{id}"), id, name, result],
            )?;
        }
        Ok(())
    }

    #[test]
    fn replays_recent_turns_and_summarizes_older_ones() {
        let db = Db::open_in_memory().expect("db");
        db.call_blocking(|c| {
            for i in 0..6 {
                add_turn(
                    c,
                    &format!("t{i}"),
                    &format!("input {i}"),
                    Some(("exec", &"r".repeat(100))),
                )?;
            }
            Ok(())
        })
        .expect("insert");
        // Room for about two turns.
        let h = db
            .call_blocking(|c| load_history(c, 20, 140, 10_000))
            .expect("history");
        assert_eq!(h.shown_turns, 2);
        assert_eq!(h.summarized_turns, 4);
        let Message::User { content } = &h.messages[0] else {
            panic!("summary first: {:?}", h.messages[0]);
        };
        assert!(content.contains("summary of 4 earlier turns"), "{content}");
        assert!(content.contains("exec×4"), "{content}");
        // The replayed turns keep their tool calls paired with results.
        let Message::User { content } = &h.messages[1] else {
            panic!("{:?}", h.messages[1]);
        };
        assert!(content.contains("input 4"));
        assert!(
            matches!(&h.messages[2], Message::Assistant { tool_calls, .. } if tool_calls[0].id == "ct4")
        );
        assert!(
            matches!(&h.messages[3], Message::Tool { tool_call_id, .. } if tool_call_id == "ct4")
        );

        // Everything fits: no summary.
        let h = db
            .call_blocking(|c| load_history(c, 20, 100_000, 10_000))
            .expect("history");
        assert_eq!(h.shown_turns, 6);
        assert_eq!(h.summarized_turns, 0);
        // Beyond `recent`, older turns are summarized even with budget to spare.
        let h = db
            .call_blocking(|c| load_history(c, 3, 100_000, 10_000))
            .expect("history");
        assert_eq!(h.shown_turns, 3);
        assert_eq!(h.summarized_turns, 3);
    }
}
