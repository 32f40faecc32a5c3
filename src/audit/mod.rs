//! The audit trail of self-modification: every change a tool or a command makes to the agent's definition
//! (skills, heartbeat, genesis, config) is a commit in the home's git repository whose message names the item,
//! the tool or command, and the turn; `automaton logs --changes` lists them and `automaton revert` undoes one.
//!
//! Commits carry trailers (`Changed-By:`, `Turn:`) so the history stays readable with plain `git log` and
//! parseable here. Edits and commits of one home are serialised by an flock, so a command and the running agent
//! never interleave a read-modify-write or fight over git's index.

use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::{Command, Output};

use serde::Serialize;

use crate::home::Home;
use crate::setup::git::{self as setup_git, GitOutcome};

/// Who made a change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Actor {
    /// An agent tool, during a turn.
    Tool { name: String, turn: Option<String> },
    /// An `automaton` command.
    Command { name: String },
    /// Found uncommitted in the home: someone edited the files directly.
    Hand,
}

impl Actor {
    pub fn tool(name: &str, turn: Option<&str>) -> Actor {
        Actor::Tool {
            name: name.to_string(),
            turn: turn.map(str::to_string),
        }
    }

    /// `name` is the command line after `automaton` (e.g. `heartbeat disable`).
    pub fn command(name: &str) -> Actor {
        Actor::Command {
            name: name.to_string(),
        }
    }

    fn by(&self) -> String {
        match self {
            Actor::Tool { name, .. } => format!("tool {name}"),
            Actor::Command { name } => format!("command automaton {name}"),
            Actor::Hand => "hand edit".to_string(),
        }
    }

    fn turn(&self) -> Option<&str> {
        match self {
            Actor::Tool { turn, .. } => turn.as_deref(),
            _ => None,
        }
    }
}

/// One change in the history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Change {
    /// The commit id (full hex); any unique prefix works for `automaton revert`.
    pub id: String,
    /// One line: the item changed, then who changed it (`heartbeat disable x [tool modify_heartbeat, turn …]`).
    pub message: String,
    /// Commit time, RFC 3339 UTC.
    pub time: String,
    /// `tool NAME`, `command automaton …`, `hand edit`; None for commits made outside automaton.
    pub by: Option<String>,
    pub turn: Option<String>,
    /// Files the change touched, relative to the home.
    pub files: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("git is not installed, so the home {home} has no change history")]
    NoGit { home: String },
    #[error("the home {home} has no change history yet (it is not a git repository)")]
    NoHistory { home: String },
    #[error("no change {change:?} in the history of {home}; see `automaton logs --changes`")]
    NoSuchChange { change: String, home: String },
    #[error("{0}")]
    Refused(String),
    #[error("cannot revert {change} cleanly: later changes touched the same lines ({files}); revert those first, newest first. Nothing was changed")]
    Conflict { change: String, files: String },
    #[error("git {args} failed in {home}: {stderr}")]
    Git {
        args: String,
        home: String,
        stderr: String,
    },
    #[error("cannot lock {path}: {source}")]
    Lock {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Held while a definition file is edited and committed.
pub struct AuditLock {
    _file: std::fs::File,
}

/// Takes the home's edit lock (blocking until other editors are done).
pub fn lock(home: &Home) -> Result<AuditLock, AuditError> {
    let path = home.root().join(".audit.lock");
    let err = |source| AuditError::Lock {
        path: path.display().to_string(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(err)?;
    rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)
        .map_err(|e| err(e.into()))?;
    Ok(AuditLock { _file: file })
}

/// Takes the edit lock and first records any edits made by hand since the last change, so the change about to
/// be made gets a commit of its own.
pub fn begin(home: &Home) -> Result<AuditLock, AuditError> {
    let lock = lock(home)?;
    if let Err(err) = record(home, &Actor::Hand, "edits made by hand") {
        tracing::debug!(error = %err, "hand edits not recorded");
    }
    Ok(lock)
}

/// The commit message for `item` changed by `actor`.
pub fn message(actor: &Actor, item: &str) -> String {
    let item = one_line(item);
    let mut subject = format!("{item} [{}", actor.by());
    if let Some(turn) = actor.turn() {
        subject.push_str(&format!(", turn {turn}"));
    }
    subject.push(']');
    let mut out = format!("{subject}\n\nChanged-By: {}\n", actor.by());
    if let Some(turn) = actor.turn() {
        out.push_str(&format!("Turn: {turn}\n"));
    }
    out
}

fn one_line(text: &str) -> String {
    let flat = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() > 200 {
        flat.chars().take(200).collect::<String>() + "…"
    } else {
        flat
    }
}

/// Commits every pending change to the tracked files as `item` by `actor`. Returns the commit id, or None when
/// nothing had changed. Callers that edit files hold [`lock`] around edit and record.
pub fn record(home: &Home, actor: &Actor, item: &str) -> Result<Option<String>, AuditError> {
    match setup_git::commit(home, &message(actor, item)) {
        Ok(GitOutcome::Committed) => {
            let out = git(home.root(), &["rev-parse", "HEAD"])?;
            Ok(Some(
                String::from_utf8_lossy(&out.stdout).trim().to_string(),
            ))
        }
        Ok(GitOutcome::Unchanged) => Ok(None),
        Ok(GitOutcome::Skipped(_)) => Err(AuditError::NoGit {
            home: home.root().display().to_string(),
        }),
        Err(e) => Err(AuditError::Git {
            args: "commit".into(),
            home: home.root().display().to_string(),
            stderr: e.to_string(),
        }),
    }
}

/// Commits edits someone made directly in the home (not through a tool or command), so the history stays
/// complete and a later revert does not trip over them.
pub fn record_hand_edits(home: &Home) -> Result<Option<String>, AuditError> {
    let _lock = lock(home)?;
    record(home, &Actor::Hand, "edits made by hand")
}

/// Records what the agent's general tools (`exec`, `write_file`) changed in the tracked files during a turn.
/// Never fails the turn: a missing git is logged.
pub async fn record_turn_edits(home: &Home, turn_id: &str) {
    let (home, turn) = (home.clone(), turn_id.to_string());
    let recorded = tokio::task::spawn_blocking(move || {
        let _lock = lock(&home)?;
        record(
            &home,
            &Actor::tool("exec/write_file", Some(&turn)),
            "files edited by the agent's commands",
        )
    })
    .await;
    match recorded {
        Ok(Ok(Some(id))) => {
            tracing::info!(change = %short(&id), "the agent's edits were recorded in the change history")
        }
        Ok(Ok(None)) => {}
        Ok(Err(err)) => tracing::debug!(error = %err, "turn edits not recorded"),
        Err(err) => tracing::warn!(error = %err, "recording turn edits failed"),
    }
}

/// The change history, newest first.
pub fn changes(home: &Home, limit: usize) -> Result<Vec<Change>, AuditError> {
    if !home.root().join(".git").exists() {
        return Err(AuditError::NoHistory {
            home: home.root().display().to_string(),
        });
    }
    let limit = format!("-{}", limit.max(1));
    let out = git(
        home.root(),
        &[
            "log",
            &limit,
            "--name-only",
            "--format=%x1e%H%x1f%cI%x1f%s%x1f%(trailers:key=Changed-By,valueonly,separator=%x2C)%x1f%(trailers:key=Turn,valueonly,separator=%x2C)%x1f",
        ],
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut changes = Vec::new();
    for record in text.split('\x1e').filter(|r| !r.trim().is_empty()) {
        let fields: Vec<&str> = record.splitn(6, '\x1f').collect();
        if fields.len() < 6 {
            continue;
        }
        let nonempty = |s: &str| Some(s.trim().to_string()).filter(|s| !s.is_empty());
        let time = chrono::DateTime::parse_from_rfc3339(fields[1])
            .map(|t| {
                t.with_timezone(&chrono::Utc)
                    .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            })
            .unwrap_or_else(|_| fields[1].to_string());
        changes.push(Change {
            id: fields[0].trim().to_string(),
            message: fields[2].to_string(),
            time,
            by: nonempty(fields[3]),
            turn: nonempty(fields[4]),
            files: fields[5]
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(str::to_string)
                .collect(),
        });
    }
    Ok(changes)
}

/// What `revert` did.
#[derive(Clone, Debug, Serialize)]
pub struct Reverted {
    /// The new commit that undoes the change.
    pub id: String,
    pub reverted: Change,
}

/// Undoes one change with a new commit (history is never rewritten). Refused for the agent's birth, for
/// anything touching the constitution, and when later changes conflict; nothing is changed then.
pub fn revert(home: &Home, change: &str, actor: &Actor) -> Result<Reverted, AuditError> {
    let root = home.root();
    let home_text = root.display().to_string();
    if !root.join(".git").exists() {
        return Err(AuditError::NoHistory { home: home_text });
    }
    let change = change.trim();
    let no_such = || AuditError::NoSuchChange {
        change: change.to_string(),
        home: home_text.clone(),
    };
    if change.len() < 4 || change.len() > 64 || !change.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(no_such());
    }
    let _lock = lock(home)?;
    record(home, &Actor::Hand, "edits made by hand")?;
    let id = git(
        root,
        &[
            "rev-parse",
            "--verify",
            "--quiet",
            &format!("{change}^{{commit}}"),
        ],
    )
    .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    .map_err(|_| no_such())?;
    let original = changes(home, 100_000)?
        .into_iter()
        .find(|c| c.id == id)
        .ok_or_else(no_such)?;
    let parents = git(root, &["rev-list", "--parents", "-n", "1", &id])?;
    let parent_count = String::from_utf8_lossy(&parents.stdout)
        .split_whitespace()
        .count()
        - 1;
    if parent_count == 0 {
        return Err(AuditError::Refused(format!(
            "{} is the agent's birth (setup); reverting it would delete the agent",
            short(&id)
        )));
    }
    if parent_count > 1 {
        return Err(AuditError::Refused(format!(
            "{} is a merge; revert its parts instead",
            short(&id)
        )));
    }
    if original
        .files
        .iter()
        .any(|f| f == "genesis/constitution.md")
    {
        return Err(AuditError::Refused(
            "that change touches the constitution, which is immutable".into(),
        ));
    }
    if let Err(err) = git(root, &["revert", "--no-edit", "--no-commit", &id]) {
        let conflicted = git(root, &["diff", "--name-only", "--diff-filter=U"])
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default();
        let _ = git(root, &["revert", "--abort"]);
        let _ = git(root, &["reset", "-q", "--hard", "HEAD"]);
        if conflicted.is_empty() {
            return Err(err);
        }
        return Err(AuditError::Conflict {
            change: short(&id).to_string(),
            files: conflicted,
        });
    }
    let item = format!("revert {}: {}", short(&id), subject_item(&original.message));
    let mut msg = message(actor, &item);
    msg.push_str(&format!("Reverts: {id}\n"));
    let staged = git(root, &["diff", "--cached", "--quiet"]).is_err();
    if !staged {
        let _ = git(root, &["revert", "--quit"]);
        return Err(AuditError::Refused(format!(
            "{} changed nothing that is still there to undo",
            short(&id)
        )));
    }
    git(root, &["commit", "-q", "--no-verify", "-m", &msg])?;
    let new_id = git(root, &["rev-parse", "HEAD"])?;
    Ok(Reverted {
        id: String::from_utf8_lossy(&new_id.stdout).trim().to_string(),
        reverted: original,
    })
}

/// The item part of a subject written by [`message`] (before ` [by …]`).
fn subject_item(subject: &str) -> &str {
    match subject.rfind(" [") {
        Some(i) if subject.ends_with(']') => &subject[..i],
        _ => subject,
    }
}

pub fn short(id: &str) -> &str {
    &id[..id.len().min(10)]
}

fn git(root: &Path, args: &[&str]) -> Result<Output, AuditError> {
    // The same identity and neutralised user config as setup's commits.
    let output = Command::new("git")
        .arg("-C")
        .arg(root)
        .args([
            "-c",
            "user.name=automaton",
            "-c",
            "user.email=automaton@localhost",
            "-c",
            "commit.gpgsign=false",
            "-c",
            "core.hooksPath=/dev/null",
        ])
        .args(args)
        .env("GIT_AUTHOR_NAME", "automaton")
        .env("GIT_AUTHOR_EMAIL", "automaton@localhost")
        .env("GIT_COMMITTER_NAME", "automaton")
        .env("GIT_COMMITTER_EMAIL", "automaton@localhost")
        .env_remove("GIT_DIR")
        .env_remove("GIT_WORK_TREE")
        .env_remove("GIT_INDEX_FILE")
        .output()
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                AuditError::NoGit {
                    home: root.display().to_string(),
                }
            } else {
                AuditError::Git {
                    args: args.join(" "),
                    home: root.display().to_string(),
                    stderr: e.to_string(),
                }
            }
        })?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(AuditError::Git {
            args: args.join(" "),
            home: root.display().to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn home_with_history() -> (tempfile::TempDir, Home) {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::at(dir.path().join("home"));
        std::fs::create_dir_all(home.skills_dir()).unwrap();
        std::fs::write(home.heartbeat_path(), "entries: []\n").unwrap();
        std::fs::write(home.root().join("wallet.json"), "secret").unwrap();
        record(&home, &Actor::command("setup"), "setup: born").unwrap();
        (dir, home)
    }

    #[test]
    fn changes_are_listed_with_who_and_turn_and_can_be_reverted() {
        let (_dir, home) = home_with_history();
        std::fs::write(home.heartbeat_path(), "entries: [1]\n").unwrap();
        let id = record(
            &home,
            &Actor::tool("modify_heartbeat", Some("01TURN")),
            "heartbeat add x",
        )
        .unwrap()
        .expect("committed");
        assert_eq!(
            record(&home, &Actor::command("x"), "nothing").unwrap(),
            None
        );
        let list = changes(&home, 10).unwrap();
        assert_eq!(list[0].id, id);
        assert_eq!(
            list[0].message,
            "heartbeat add x [tool modify_heartbeat, turn 01TURN]"
        );
        assert_eq!(list[0].by.as_deref(), Some("tool modify_heartbeat"));
        assert_eq!(list[0].turn.as_deref(), Some("01TURN"));
        assert_eq!(list[0].files, vec!["heartbeat.yaml".to_string()]);
        assert!(!list
            .iter()
            .any(|c| c.files.iter().any(|f| f.contains("wallet"))));

        let reverted = revert(&home, &id[..8], &Actor::command("revert")).unwrap();
        assert_eq!(reverted.reverted.id, id);
        assert_eq!(
            std::fs::read_to_string(home.heartbeat_path()).unwrap(),
            "entries: []\n"
        );
        let list = changes(&home, 10).unwrap();
        assert!(
            list[0].message.starts_with(&format!(
                "revert {}: heartbeat add x [command automaton revert]",
                short(&id)
            )),
            "{}",
            list[0].message
        );
    }

    #[test]
    fn reverts_that_cannot_apply_change_nothing() {
        let (_dir, home) = home_with_history();
        let birth = changes(&home, 10).unwrap()[0].id.clone();
        assert!(matches!(
            revert(&home, &birth, &Actor::command("revert")),
            Err(AuditError::Refused(_))
        ));
        assert!(matches!(
            revert(&home, "zzzz", &Actor::command("revert")),
            Err(AuditError::NoSuchChange { .. })
        ));
        assert!(matches!(
            revert(&home, "abcdef12", &Actor::command("revert")),
            Err(AuditError::NoSuchChange { .. })
        ));
        std::fs::write(home.heartbeat_path(), "a\n").unwrap();
        let first = record(&home, &Actor::command("one"), "one")
            .unwrap()
            .unwrap();
        std::fs::write(home.heartbeat_path(), "b\n").unwrap();
        record(&home, &Actor::command("two"), "two")
            .unwrap()
            .unwrap();
        match revert(&home, &first, &Actor::command("revert")) {
            Err(AuditError::Conflict { files, .. }) => assert!(files.contains("heartbeat.yaml")),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            std::fs::read_to_string(home.heartbeat_path()).unwrap(),
            "b\n"
        );
        // A hand edit is recorded as such.
        std::fs::write(home.heartbeat_path(), "c\n").unwrap();
        assert!(record_hand_edits(&home).unwrap().is_some());
        assert!(changes(&home, 1).unwrap()[0]
            .message
            .ends_with("[hand edit]"));
    }
}
