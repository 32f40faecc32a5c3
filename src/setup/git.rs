//! The home as a git repository: only the agent's definition is tracked, so its history can be audited.

use std::path::Path;
use std::process::{Command, Output};

use crate::home::Home;

/// Tracks `automaton.yaml`, `heartbeat.yaml`, `skills/` and `genesis/`; everything else (wallet, DB, node
/// storage, logs, workspace) stays out, including files that appear later.
const GITIGNORE: &str = "\
# Only the agent's definition is tracked. Wallet, state DB, node storage, logs and workspace never are.
/*
!/.gitignore
!/automaton.yaml
!/heartbeat.yaml
!/skills/
!/genesis/
";

const TRACKED: &[&str] = &[
    ".gitignore",
    "automaton.yaml",
    "heartbeat.yaml",
    "skills",
    "genesis",
];

/// What happened to the home's repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GitOutcome {
    Committed,
    /// Nothing had changed since the last commit.
    Unchanged,
    /// git is not installed; the home works without history.
    Skipped(String),
}

#[derive(Debug, thiserror::Error)]
#[error("git {args} failed in {home}: {stderr}")]
pub struct GitError {
    args: String,
    home: String,
    stderr: String,
}

/// Initialises the repository if needed and commits the tracked files.
pub fn commit(home: &Home, message: &str) -> Result<GitOutcome, GitError> {
    let root = home.root();
    if !root.join(".git").exists() {
        match git(root, &["init", "-q"]) {
            Ok(_) => {}
            Err(GitRun::NotFound) => {
                return Ok(GitOutcome::Skipped(
                    "git is not installed; the home has no history".to_string(),
                ))
            }
            Err(GitRun::Failed(e)) => return Err(e),
        }
    }
    std::fs::write(root.join(".gitignore"), GITIGNORE).map_err(|e| GitError {
        args: "(writing .gitignore)".into(),
        home: root.display().to_string(),
        stderr: e.to_string(),
    })?;
    let present: Vec<&str> = TRACKED
        .iter()
        .copied()
        .filter(|p| root.join(p).exists())
        .collect();
    let mut add = vec!["add", "-A", "--"];
    add.extend(&present);
    run(root, &add)?;
    // `diff --cached --quiet` exits 1 when something is staged.
    let staged = match git(root, &["diff", "--cached", "--quiet"]) {
        Ok(_) => false,
        Err(GitRun::Failed(_)) => true,
        Err(GitRun::NotFound) => return Ok(GitOutcome::Skipped("git disappeared".into())),
    };
    if !staged {
        return Ok(GitOutcome::Unchanged);
    }
    run(root, &["commit", "-q", "--no-verify", "-m", message])?;
    Ok(GitOutcome::Committed)
}

enum GitRun {
    NotFound,
    Failed(GitError),
}

fn run(root: &Path, args: &[&str]) -> Result<Output, GitError> {
    git(root, args).map_err(|e| match e {
        GitRun::Failed(e) => e,
        GitRun::NotFound => GitError {
            args: args.join(" "),
            home: root.display().to_string(),
            stderr: "git not found".into(),
        },
    })
}

fn git(root: &Path, args: &[&str]) -> Result<Output, GitRun> {
    // The identity is fixed so commits work where git has no user configured, and so the history says who
    // wrote it; signing and hooks from the user's global config must not block an unattended setup.
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
            "-c",
            "init.defaultBranch=main",
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
                GitRun::NotFound
            } else {
                GitRun::Failed(GitError {
                    args: args.join(" "),
                    home: root.display().to_string(),
                    stderr: e.to_string(),
                })
            }
        })?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(GitRun::Failed(GitError {
            args: args.join(" "),
            home: root.display().to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        }))
    }
}
