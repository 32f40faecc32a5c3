//! The agent's home directory: where every file of one agent lives, and which of them the agent may never touch.
//!
//! Several agents can share a machine because everything hangs off one root (`$AUTOMATON_HOME`, default
//! `~/.automaton`); nothing in the runtime builds a path into the home by hand.

use std::path::{Path, PathBuf};

use crate::config::Config;

/// Environment variable that selects the home. It is a process variable, not a config key.
pub const HOME_ENV: &str = "AUTOMATON_HOME";

/// The root of one agent's state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Home {
    root: PathBuf,
}

impl Home {
    /// `$AUTOMATON_HOME`, else `~/.automaton`, made absolute so a later `chdir` cannot move the home.
    pub fn from_env() -> Home {
        match std::env::var_os(HOME_ENV) {
            Some(dir) if !dir.is_empty() => Home::at(dir),
            _ => {
                let user_home = std::env::var_os("HOME")
                    .filter(|h| !h.is_empty())
                    .map(PathBuf::from)
                    .unwrap_or_else(|| PathBuf::from("."));
                Home::at(user_home.join(".automaton"))
            }
        }
    }

    /// A home at an explicit directory (the `--home` flag, tests, a parent setting up a child).
    pub fn at(root: impl Into<PathBuf>) -> Home {
        let root = root.into();
        // A relative home would silently change meaning when the compute provider changes directory.
        let root = std::path::absolute(&root).unwrap_or(root);
        Home { root }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `automaton.yaml`: the agent's configuration.
    pub fn config_path(&self) -> PathBuf {
        self.root.join("automaton.yaml")
    }

    /// `heartbeat.yaml`: the agent's schedule.
    pub fn heartbeat_path(&self) -> PathBuf {
        self.root.join("heartbeat.yaml")
    }

    /// `wallet.json` (mode 0600): the mnemonic. Written by the wallet; protected from the agent's tools now.
    pub fn wallet_path(&self) -> PathBuf {
        self.root.join("wallet.json")
    }

    /// `state.db`: the SQLite state. Its `-wal` and `-shm` companions are protected too.
    pub fn db_path(&self) -> PathBuf {
        self.root.join("state.db")
    }

    /// `node/`: the Lightning node's own storage.
    pub fn node_dir(&self) -> PathBuf {
        self.root.join("node")
    }

    /// `ssh/`: the agent's SSH key pair and the `known_hosts` its SSH connections trust (0700).
    pub fn ssh_dir(&self) -> PathBuf {
        self.root.join("ssh")
    }

    pub fn genesis_dir(&self) -> PathBuf {
        self.root.join("genesis")
    }

    /// `genesis/prompt.md`: what the creator asked this agent to be.
    pub fn genesis_prompt_path(&self) -> PathBuf {
        self.genesis_dir().join("prompt.md")
    }

    /// `genesis/constitution.md` (mode 0444): the laws the agent cannot rewrite.
    pub fn constitution_path(&self) -> PathBuf {
        self.genesis_dir().join("constitution.md")
    }

    pub fn skills_dir(&self) -> PathBuf {
        self.root.join("skills")
    }

    /// `logs/`: `automaton.log` holds JSON lines written by `automaton run`.
    pub fn logs_dir(&self) -> PathBuf {
        self.root.join("logs")
    }

    pub fn log_path(&self) -> PathBuf {
        self.logs_dir().join("automaton.log")
    }

    /// `workspace/`: default working directory of the local compute provider.
    pub fn workspace_dir(&self) -> PathBuf {
        self.root.join("workspace")
    }

    /// `agent.lock`: held (flock) by the one `automaton run` of this home; contains its pid.
    pub fn lock_path(&self) -> PathBuf {
        self.root.join("agent.lock")
    }

    /// Files the agent's own tools must never read or write, whatever path tricks are used.
    ///
    /// The list is absolute and not canonicalised: callers resolve symlinks on both sides, because some of these
    /// files do not exist yet (the wallet arrives in a later issue) and must still be refused.
    pub fn protected_paths(&self, config: &Config) -> Vec<PathBuf> {
        let db = self.db_path();
        let mut wal = db.clone().into_os_string();
        wal.push("-wal");
        let mut shm = db.clone().into_os_string();
        shm.push("-shm");
        let mut journal = db.clone().into_os_string();
        journal.push("-journal");
        let mut paths = vec![
            self.wallet_path(),
            db,
            PathBuf::from(wal),
            PathBuf::from(shm),
            PathBuf::from(journal),
            self.constitution_path(),
            // The agent rewrites its purpose only through `update_genesis_prompt` (rate-limited, audited).
            self.genesis_prompt_path(),
            self.config_path(),
            self.lock_path(),
            self.node_dir(),
        ];
        if let Some(key_file) = &config.inference.api_key_file {
            paths.push(key_file.clone());
        }
        // The SSH private key and the host keys the agent trusts: reading one leaks it, editing the other
        // would let a command redirect the agent's connections.
        paths.push(self.ssh_dir());
        paths.push(config.compute.ssh.key_path.clone());
        if let Some(key_file) = &config.compute.conway.api_key_file {
            paths.push(key_file.clone());
        }
        paths
    }

    /// True once `automaton setup` has written a configuration here.
    pub fn is_set_up(&self) -> bool {
        self.config_path().exists()
    }
}

/// The exclusive `flock` on `agent.lock` that makes one `automaton run` per home. Released when dropped or
/// when the process dies, however it dies, so a crashed agent never leaves a stale lock behind.
#[derive(Debug)]
pub struct AgentLock {
    _file: std::fs::File,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("another `automaton run` ({}) holds {}; one agent per home", holder_text(*pid), path.display())]
    Held { path: PathBuf, pid: Option<u32> },
    #[error("cannot lock {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn holder_text(pid: Option<u32>) -> String {
    match pid {
        Some(pid) => format!("pid {pid}"),
        None => "pid unknown".to_string(),
    }
}

impl AgentLock {
    /// Takes the lock and writes this process's pid into the lock file.
    pub fn acquire(home: &Home) -> Result<AgentLock, LockError> {
        use std::io::{Seek, Write};
        use std::os::unix::fs::OpenOptionsExt;
        let path = home.lock_path();
        let io_err = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(io_err)?;
        // `status` probes the lock for an instant; a few retries keep that probe from refusing a real start.
        let mut attempts = 0;
        loop {
            match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => break,
                Err(e) if e == rustix::io::Errno::WOULDBLOCK && attempts < 5 => {
                    attempts += 1;
                    std::thread::sleep(std::time::Duration::from_millis(40));
                }
                Err(e) if e == rustix::io::Errno::WOULDBLOCK => {
                    return Err(LockError::Held {
                        pid: read_pid(&path),
                        path,
                    })
                }
                Err(e) => return Err(io_err(e.into())),
            }
        }
        file.set_len(0).map_err(io_err)?;
        file.rewind().map_err(io_err)?;
        writeln!(file, "{}", std::process::id()).map_err(io_err)?;
        file.sync_all().map_err(io_err)?;
        Ok(AgentLock { _file: file })
    }

    /// The pid of the running agent of this home, if one is running (`Some(None)`: running, pid unreadable).
    pub fn holder(home: &Home) -> Result<Option<Option<u32>>, LockError> {
        let path = home.lock_path();
        let file = match std::fs::File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(LockError::Io { path, source }),
        };
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockShared) {
            Ok(()) => {
                let _ = rustix::fs::flock(&file, rustix::fs::FlockOperation::Unlock);
                Ok(None)
            }
            Err(e) if e == rustix::io::Errno::WOULDBLOCK => Ok(Some(read_pid(&path))),
            Err(e) => Err(LockError::Io {
                path,
                source: e.into(),
            }),
        }
    }
}

fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_is_refused_naming_the_pid() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::at(dir.path());
        assert_eq!(AgentLock::holder(&home).unwrap(), None);
        let lock = AgentLock::acquire(&home).unwrap();
        let pid = std::process::id();
        match AgentLock::acquire(&home) {
            Err(LockError::Held { pid: Some(p), .. }) => assert_eq!(p, pid),
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(AgentLock::holder(&home).unwrap(), Some(Some(pid)));
        drop(lock);
        assert_eq!(AgentLock::holder(&home).unwrap(), None);
        AgentLock::acquire(&home).unwrap();
    }

    #[test]
    fn relative_home_is_made_absolute() {
        let home = Home::at("some/dir");
        assert!(home.root().is_absolute());
        assert!(home.root().ends_with("some/dir"));
    }

    #[test]
    fn protected_paths_cover_db_companions_and_key_file() {
        let home = Home::at("/tmp/h");
        let mut config = Config::default();
        config.inference.api_key_file = Some(PathBuf::from("/tmp/h/key"));
        let protected = home.protected_paths(&config);
        for p in [
            "/tmp/h/state.db",
            "/tmp/h/state.db-wal",
            "/tmp/h/state.db-shm",
            "/tmp/h/wallet.json",
            "/tmp/h/genesis/constitution.md",
            "/tmp/h/automaton.yaml",
            "/tmp/h/key",
            "/tmp/h/node",
        ] {
            assert!(protected.contains(&PathBuf::from(p)), "{p} not protected");
        }
    }
}
