//! `automaton logs`: recent turns and their tool calls, from the state DB (optionally following new ones).

use std::io::Write;
use std::time::Duration;

use clap::Args;

use crate::home::Home;
use crate::state::history::{self, TurnRecord};
use crate::state::Db;

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// Print JSON: one array of turns; with --follow, one turn object per line
    #[arg(long)]
    json: bool,
    /// How many recent turns to show
    #[arg(long, default_value_t = 20, value_name = "N")]
    limit: u32,
    /// Keep printing turns as the agent finishes them (Ctrl-C to stop)
    #[arg(short, long)]
    follow: bool,
    /// Show changes to the agent's definition (skills, heartbeat, genesis, config) instead of turns
    #[arg(long, conflicts_with = "follow")]
    changes: bool,
}

/// How often `--follow` looks for new turns.
const FOLLOW_POLL: Duration = Duration::from_millis(500);

/// Longest excerpt of free text (input, thinking, results) in the human view; `--json` has everything.
const EXCERPT_CHARS: usize = 200;
/// Tool arguments are shown shorter: the result usually says more.
const ARGUMENT_CHARS: usize = 100;

pub fn execute(home: &Home, args: LogsArgs) -> anyhow::Result<()> {
    super::init_stderr_tracing();
    if !home.is_set_up() {
        return Err(super::not_set_up(home));
    }
    if args.changes {
        return super::revert::print_changes(home, args.json, args.limit);
    }
    // Opening creates the DB of an agent that never ran, so --follow can wait for its first turn.
    let db = Db::open(&home.db_path())?;
    let turns = db.call_blocking(move |c| history::recent_turns(c, args.limit))?;
    let mut last_rowid = turns.last().map(|t| t.rowid).unwrap_or(0);
    let mut stdout = std::io::stdout().lock();

    if args.json && !args.follow {
        writeln!(stdout, "{}", serde_json::to_string_pretty(&turns)?)?;
        return Ok(());
    }
    if turns.is_empty() && !args.json {
        eprintln!("no turns yet");
    }
    for turn in &turns {
        print_turn(&mut stdout, turn, args.json)?;
    }
    stdout.flush()?;
    if !args.follow {
        return Ok(());
    }
    drop(stdout);
    loop {
        std::thread::sleep(FOLLOW_POLL);
        let new = db.call_blocking(move |c| history::turns_after(c, last_rowid))?;
        let mut stdout = std::io::stdout().lock();
        for turn in &new {
            print_turn(&mut stdout, turn, args.json)?;
            last_rowid = turn.rowid;
        }
        // A closed pipe (`automaton logs -f | head`) ends the loop through this error.
        stdout.flush()?;
    }
}

fn print_turn(out: &mut impl Write, turn: &TurnRecord, json: bool) -> anyhow::Result<()> {
    if json {
        writeln!(out, "{}", serde_json::to_string(turn)?)?;
        return Ok(());
    }
    let cost = turn
        .cost_sats
        .map(|c| format!(", {c} sats"))
        .unwrap_or_default();
    writeln!(
        out,
        "{}  turn {}  [{}] {}  ({}+{} tokens{cost})",
        turn.started_at,
        turn.id,
        turn.input_source,
        turn.outcome,
        turn.prompt_tokens,
        turn.completion_tokens
    )?;
    if let Some(input) = turn.input.as_deref().filter(|s| !s.trim().is_empty()) {
        writeln!(out, "  input:    {}", excerpt(input, EXCERPT_CHARS))?;
    }
    if let Some(thinking) = turn.thinking.as_deref().filter(|s| !s.trim().is_empty()) {
        writeln!(out, "  thinking: {}", excerpt(thinking, EXCERPT_CHARS))?;
    }
    for call in &turn.tool_calls {
        writeln!(
            out,
            "  {}. {} {} -> {} ({} ms): {}",
            call.seq + 1,
            call.name,
            excerpt(&call.arguments, ARGUMENT_CHARS),
            if call.is_error { "error" } else { "ok" },
            call.duration_ms,
            excerpt(&call.result, EXCERPT_CHARS)
        )?;
    }
    Ok(())
}

/// One line of at most `max` characters.
fn excerpt(text: &str, max: usize) -> String {
    let flat: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() > max {
        let cut: String = flat.chars().take(max).collect();
        format!("{cut}…")
    } else {
        flat
    }
}
