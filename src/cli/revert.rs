//! `automaton revert <change>` and `automaton logs --changes`: the history of changes to the agent's definition
//! (skills, heartbeat, genesis, config), and undoing one of them.

use std::io::Write;

use clap::Args;

use crate::audit::{self, Actor};
use crate::home::Home;

#[derive(Debug, Args)]
pub struct RevertArgs {
    /// The change to undo: its id (or a unique prefix) from `automaton logs --changes`
    change: String,
    /// Print the result as JSON on stdout
    #[arg(long)]
    json: bool,
}

pub fn execute(home: &Home, args: RevertArgs) -> anyhow::Result<()> {
    super::init_stderr_tracing();
    if !home.is_set_up() {
        return Err(super::not_set_up(home));
    }
    let reverted = audit::revert(home, &args.change, &Actor::command("revert"))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&reverted)?);
    } else {
        println!(
            "reverted {}: {} (change {})",
            audit::short(&reverted.reverted.id),
            reverted.reverted.message,
            audit::short(&reverted.id)
        );
        eprintln!("a running agent picks the restored files up within a few seconds");
    }
    Ok(())
}

/// `automaton logs --changes [--json]`: newest first.
pub(super) fn print_changes(home: &Home, json: bool, limit: u32) -> anyhow::Result<()> {
    // Edits made directly in the files are part of the history too.
    if let Err(err) = audit::record_hand_edits(home) {
        tracing::debug!(error = %err, "no hand edits recorded");
    }
    let changes = audit::changes(home, limit as usize)?;
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&changes)?)?;
        return Ok(());
    }
    if changes.is_empty() {
        eprintln!("no changes yet");
    }
    for change in &changes {
        writeln!(
            out,
            "{}  {}  {}",
            audit::short(&change.id),
            change.time,
            change.message
        )?;
    }
    Ok(())
}
