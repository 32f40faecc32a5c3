//! Read side of the turn history: what `automaton status` and `automaton logs` show.

use rusqlite::{Connection, OptionalExtension, Row};
use serde::Serialize;

/// One persisted agent turn with its tool calls, in call order.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TurnRecord {
    /// Insertion order; `logs --follow` resumes from it.
    #[serde(skip)]
    pub rowid: i64,
    pub id: String,
    pub started_at: String,
    pub ended_at: Option<String>,
    pub input: Option<String>,
    pub input_source: String,
    pub thinking: Option<String>,
    pub outcome: String,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub cost_sats: Option<i64>,
    pub tool_calls: Vec<ToolCallRecord>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ToolCallRecord {
    pub id: String,
    pub seq: i64,
    pub name: String,
    pub arguments: String,
    pub result: String,
    pub is_error: bool,
    pub duration_ms: i64,
    pub created_at: String,
}

/// Lifetime counters over the whole DB.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Totals {
    pub turns: i64,
    pub tool_calls: i64,
    pub inference_calls: i64,
    pub inference_errors: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    /// Sum over calls whose cost is known; calls to an unpriced endpoint add nothing.
    pub inference_cost_sats: i64,
}

const TURN_COLUMNS: &str =
    "rowid, id, started_at, ended_at, input, input_source, thinking, outcome, \
     prompt_tokens, completion_tokens, cost_sats";

fn turn_from_row(row: &Row<'_>) -> rusqlite::Result<TurnRecord> {
    Ok(TurnRecord {
        rowid: row.get(0)?,
        id: row.get(1)?,
        started_at: row.get(2)?,
        ended_at: row.get(3)?,
        input: row.get(4)?,
        input_source: row.get(5)?,
        thinking: row.get(6)?,
        outcome: row.get(7)?,
        prompt_tokens: row.get(8)?,
        completion_tokens: row.get(9)?,
        cost_sats: row.get(10)?,
        tool_calls: Vec::new(),
    })
}

fn attach_tool_calls(conn: &Connection, turns: &mut [TurnRecord]) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare(
        "SELECT id, seq, name, arguments, result, is_error, duration_ms, created_at \
         FROM tool_calls WHERE turn_id = ?1 ORDER BY seq",
    )?;
    for turn in turns {
        let calls = stmt.query_map([&turn.id], |row| {
            Ok(ToolCallRecord {
                id: row.get(0)?,
                seq: row.get(1)?,
                name: row.get(2)?,
                arguments: row.get(3)?,
                result: row.get(4)?,
                is_error: row.get::<_, i64>(5)? != 0,
                duration_ms: row.get(6)?,
                created_at: row.get(7)?,
            })
        })?;
        turn.tool_calls = calls.collect::<rusqlite::Result<_>>()?;
    }
    Ok(())
}

/// The last `limit` turns, oldest first.
pub fn recent_turns(conn: &Connection, limit: u32) -> rusqlite::Result<Vec<TurnRecord>> {
    let mut stmt = conn.prepare(&format!(
        "SELECT {TURN_COLUMNS} FROM turns ORDER BY rowid DESC LIMIT ?1"
    ))?;
    let mut turns = stmt
        .query_map([limit], turn_from_row)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    turns.reverse();
    attach_tool_calls(conn, &mut turns)?;
    Ok(turns)
}

/// Turns written after the turn with insertion order `after_rowid`, oldest first.
pub fn turns_after(conn: &Connection, after_rowid: i64) -> rusqlite::Result<Vec<TurnRecord>> {
    let mut stmt = conn.prepare(&format!(
        "SELECT {TURN_COLUMNS} FROM turns WHERE rowid > ?1 ORDER BY rowid"
    ))?;
    let mut turns = stmt
        .query_map([after_rowid], turn_from_row)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    attach_tool_calls(conn, &mut turns)?;
    Ok(turns)
}

/// The most recent turn, without its tool calls.
pub fn last_turn(conn: &Connection) -> rusqlite::Result<Option<TurnRecord>> {
    conn.query_row(
        &format!("SELECT {TURN_COLUMNS} FROM turns ORDER BY rowid DESC LIMIT 1"),
        [],
        turn_from_row,
    )
    .optional()
}

pub fn totals(conn: &Connection) -> rusqlite::Result<Totals> {
    let (turns, tool_calls) = conn.query_row(
        "SELECT (SELECT count(*) FROM turns), (SELECT count(*) FROM tool_calls)",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let (inference_calls, inference_errors, prompt_tokens, completion_tokens, inference_cost_sats) =
        conn.query_row(
            "SELECT count(*), count(error), coalesce(sum(prompt_tokens), 0), \
             coalesce(sum(completion_tokens), 0), coalesce(sum(cost_sats), 0) FROM inference_calls",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
        )?;
    Ok(Totals {
        turns,
        tool_calls,
        inference_calls,
        inference_errors,
        prompt_tokens,
        completion_tokens,
        inference_cost_sats,
    })
}

/// A value from the `kv` table.
pub fn kv_get(conn: &Connection, key: &str) -> rusqlite::Result<Option<String>> {
    conn.query_row("SELECT value FROM kv WHERE key = ?1", [key], |r| r.get(0))
        .optional()
}

/// Sets a value in the `kv` table.
pub fn kv_set(conn: &Connection, key: &str, value: &str) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO kv (key, value, updated_at) VALUES (?1, ?2, ?3) \
         ON CONFLICT(key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
        rusqlite::params![key, value, crate::state::now_rfc3339()],
    )?;
    Ok(())
}

/// Wake events not yet consumed by the agent.
pub fn pending_wake_events(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row(
        "SELECT count(*) FROM wake_events WHERE consumed_at IS NULL",
        [],
        |r| r.get(0),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Db;

    fn insert_turn(c: &Connection, id: &str, calls: &[&str]) -> rusqlite::Result<()> {
        c.execute(
            "INSERT INTO turns (id, started_at, input_source, outcome, prompt_tokens, completion_tokens) \
             VALUES (?1, '2025-01-01T00:00:00Z', 'wakeup', 'ok', 10, 5)",
            [id],
        )?;
        for (i, name) in calls.iter().enumerate() {
            c.execute(
                "INSERT INTO tool_calls (id, turn_id, seq, name, arguments, result, is_error, duration_ms, created_at) \
                 VALUES (?1, ?2, ?3, ?4, '{}', 'done', 0, 3, '2025-01-01T00:00:01Z')",
                rusqlite::params![format!("{id}-{i}"), id, i as i64, name],
            )?;
        }
        Ok(())
    }

    #[test]
    fn recent_and_follow() {
        let db = Db::open_in_memory().unwrap();
        db.call_blocking(|c| {
            insert_turn(c, "t1", &["exec"])?;
            insert_turn(c, "t2", &["read_file", "sleep"])?;
            insert_turn(c, "t3", &[])
        })
        .unwrap();
        let recent = db.call_blocking(|c| recent_turns(c, 2)).unwrap();
        assert_eq!(
            recent.iter().map(|t| t.id.as_str()).collect::<Vec<_>>(),
            ["t2", "t3"]
        );
        assert_eq!(recent[0].tool_calls.len(), 2);
        assert_eq!(recent[0].tool_calls[1].name, "sleep");
        let after = db
            .call_blocking(|c| turns_after(c, recent[0].rowid))
            .unwrap();
        assert_eq!(after.len(), 1);
        assert_eq!(after[0].id, "t3");
        let totals = db.call_blocking(|c| totals(c)).unwrap();
        assert_eq!(totals.turns, 3);
        assert_eq!(totals.tool_calls, 3);
        assert_eq!(
            db.call_blocking(|c| last_turn(c)).unwrap().unwrap().id,
            "t3"
        );
    }
}
