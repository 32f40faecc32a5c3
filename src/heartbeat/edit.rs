//! Changing heartbeat.yaml on behalf of a command or the agent: checked, written atomically, committed to the
//! home's history. The running scheduler picks the new file up on its next tick.

use super::spec::{header_of, Entry, HeartbeatFile};
use super::tasks::TaskRegistry;
use super::HeartbeatError;
use crate::audit::{self, Actor};
use crate::home::Home;

/// One change to the schedule.
#[derive(Clone, Debug, PartialEq)]
pub enum Edit {
    Add(Box<Entry>),
    Remove(String),
    Enable(String),
    Disable(String),
}

/// What an edit did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EditOutcome {
    /// What changed, as the history says it (`heartbeat disable status_refresh`).
    pub item: String,
    /// The commit recording it; None when nothing changed or the home has no history.
    pub change: Option<String>,
    /// The file already said so: nothing was written.
    pub unchanged: bool,
    /// Something to tell the user (the history could not be written).
    pub warning: Option<String>,
}

/// Applies `edit` to the home's heartbeat.yaml. A broken file is not touched: it is reported so a person can fix
/// it, rather than overwritten with a guess.
pub fn edit(
    home: &Home,
    tasks: &TaskRegistry,
    edit: Edit,
    actor: &Actor,
) -> Result<EditOutcome, HeartbeatError> {
    let path = home.heartbeat_path();
    let _lock = audit::begin(home).map_err(|e| HeartbeatError::BadRequest(e.to_string()))?;
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            header_of(crate::setup::defaults::HEARTBEAT_EXAMPLE)
        }
        Err(source) => return Err(HeartbeatError::Read { path, source }),
    };
    let mut file = HeartbeatFile::parse(&text, &path, tasks)?;
    let known = |file: &HeartbeatFile| {
        let names: Vec<&str> = file.entries.iter().map(|e| e.name.as_str()).collect();
        if names.is_empty() {
            "none".to_string()
        } else {
            names.join(", ")
        }
    };
    let missing = |name: &str, file: &HeartbeatFile| HeartbeatError::NoSuchEntry {
        name: name.to_string(),
        known: known(file),
    };
    let (item, changed) = match edit {
        Edit::Add(entry) => {
            if file.get(&entry.name).is_some() {
                return Err(HeartbeatError::EntryExists { name: entry.name });
            }
            let item = format!(
                "heartbeat add {} ({}, task {})",
                entry.name,
                entry.cadence.describe(),
                entry.task
            );
            file.entries.push(*entry);
            (item, true)
        }
        Edit::Remove(name) => {
            let before = file.entries.len();
            file.entries.retain(|e| e.name != name);
            if file.entries.len() == before {
                return Err(missing(&name, &file));
            }
            (format!("heartbeat remove {name}"), true)
        }
        Edit::Enable(name) | Edit::Disable(name) if file.get(&name).is_none() => {
            return Err(missing(&name, &file));
        }
        Edit::Enable(name) => {
            let entry = file
                .get_mut(&name)
                .ok_or_else(|| HeartbeatError::BadRequest(name.clone()))?;
            let changed = !entry.enabled;
            entry.enabled = true;
            (format!("heartbeat enable {name}"), changed)
        }
        Edit::Disable(name) => {
            let entry = file
                .get_mut(&name)
                .ok_or_else(|| HeartbeatError::BadRequest(name.clone()))?;
            let changed = entry.enabled;
            entry.enabled = false;
            (format!("heartbeat disable {name}"), changed)
        }
    };
    if !changed {
        return Ok(EditOutcome {
            item,
            change: None,
            unchanged: true,
            warning: None,
        });
    }
    let new_text = file.render(&header_of(&text))?;
    // What we write must be what we would accept.
    HeartbeatFile::parse(&new_text, &path, tasks)?;
    crate::config::write_atomic(&path, new_text.as_bytes(), 0o644).map_err(|source| {
        HeartbeatError::Write {
            path: path.clone(),
            source,
        }
    })?;
    let (change, warning) = match audit::record(home, actor, &item) {
        Ok(change) => (change, None),
        Err(err) => {
            tracing::warn!(error = %err, "the change was made but not recorded in the home's history");
            (
                None,
                Some(format!(
                    "the change was made but not recorded in the history: {err}"
                )),
            )
        }
    };
    Ok(EditOutcome {
        item,
        change,
        unchanged: false,
        warning,
    })
}
