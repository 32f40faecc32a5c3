//! The agent's SQLite state: opening (WAL), numbered migrations, and running blocking DB work off the executor.
//!
//! Several processes share the file (`automaton run` and the CLI commands). A transaction that writes begins
//! `IMMEDIATE`: a deferred one that reads first and then writes fails at once with "database is locked" when another
//! process wrote in between (SQLite cannot wait there), where an immediate one waits out the busy timeout.

pub mod history;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::Connection;

/// Migrations in order; entry `i` moves the schema from `user_version` `i` to `i + 1`. Never edit a shipped one.
const MIGRATIONS: &[&str] = &[
    include_str!("migrations/0001_init.sql"),
    include_str!("migrations/0002_schedule.sql"),
    include_str!("migrations/0003_money.sql"),
    include_str!("migrations/0004_nostr.sql"),
    include_str!("migrations/0005_lnurl_l402_client.sql"),
    include_str!("migrations/0006_l402_seller.sql"),
    include_str!("migrations/0007_nwc.sql"),
    include_str!("migrations/0008_lnvps.sql"),
    include_str!("migrations/0009_children.sql"),
];

/// The schema version this binary writes.
pub const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot open state database {}: {source}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    /// The DB was written by a newer automaton; running old code on it could corrupt it.
    #[error(
        "state database {} has schema version {found}, newer than this binary supports ({supported}); upgrade automaton",
        path.display()
    )]
    NewerSchema {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error("migration {version} failed: {source}")]
    Migration {
        version: u32,
        #[source]
        source: rusqlite::Error,
    },
    #[error("cannot create {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("a previous database operation panicked; the connection is unusable")]
    Poisoned,
    #[error("database task failed: {0}")]
    Join(String),
}

/// A handle to the state DB. Cheap to clone; all clones share one connection.
#[derive(Clone)]
pub struct Db {
    conn: Arc<Mutex<Connection>>,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db").finish_non_exhaustive()
    }
}

impl Db {
    /// Opens (creating if needed, mode 0600) and migrates the DB at `path`.
    pub fn open(path: &Path) -> Result<Db, StateError> {
        let open_err = |source| StateError::Open {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| StateError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let existed = path.exists();
        let conn = Connection::open(path).map_err(open_err)?;
        if !existed {
            // Turns hold what the agent did and thought; not for other users of the machine.
            let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
        }
        // WAL lets `automaton status`/`logs` read while `run` writes; the busy timeout covers checkpoints.
        conn.busy_timeout(Duration::from_secs(10))
            .map_err(open_err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(open_err)?;
        Db::setup(conn, path)
    }

    /// A private in-memory DB with the full schema (tests).
    pub fn open_in_memory() -> Result<Db, StateError> {
        let conn = Connection::open_in_memory().map_err(|source| StateError::Open {
            path: PathBuf::from(":memory:"),
            source,
        })?;
        Db::setup(conn, Path::new(":memory:"))
    }

    fn setup(mut conn: Connection, path: &Path) -> Result<Db, StateError> {
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(|source| StateError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        migrate(&mut conn, path)?;
        Ok(Db {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// Runs blocking DB work on tokio's blocking pool.
    pub async fn call<F, R>(&self, f: F) -> Result<R, StateError>
    where
        F: FnOnce(&mut Connection) -> rusqlite::Result<R> + Send + 'static,
        R: Send + 'static,
    {
        let conn = Arc::clone(&self.conn);
        tokio::task::spawn_blocking(move || {
            let mut guard = conn.lock().map_err(|_| StateError::Poisoned)?;
            f(&mut guard).map_err(StateError::from)
        })
        .await
        .map_err(|e| StateError::Join(e.to_string()))?
    }

    /// Runs DB work on the current thread (CLI commands, tests, code already off the executor).
    pub fn call_blocking<F, R>(&self, f: F) -> Result<R, StateError>
    where
        F: FnOnce(&mut Connection) -> rusqlite::Result<R>,
    {
        let mut guard = self.conn.lock().map_err(|_| StateError::Poisoned)?;
        f(&mut guard).map_err(StateError::from)
    }
}

/// Applies every migration newer than the DB's `user_version`, each in its own transaction.
fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StateError> {
    let found: u32 = conn.pragma_query_value(None, "user_version", |row| row.get(0))?;
    if found > SCHEMA_VERSION {
        return Err(StateError::NewerSchema {
            path: path.to_path_buf(),
            found,
            supported: SCHEMA_VERSION,
        });
    }
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let version = index as u32 + 1;
        let tx = conn
            .transaction()
            .map_err(|source| StateError::Migration { version, source })?;
        tx.execute_batch(sql)
            .map_err(|source| StateError::Migration { version, source })?;
        tx.pragma_update(None, "user_version", version)
            .map_err(|source| StateError::Migration { version, source })?;
        tx.commit()
            .map_err(|source| StateError::Migration { version, source })?;
        tracing::debug!(version, "applied state migration");
    }
    Ok(())
}

/// Now, as the RFC 3339 UTC string every timestamp column holds.
pub fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// A fresh ULID string, the id of every row that has one.
pub fn new_id() -> String {
    ulid::Ulid::new().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrates_fresh_db_to_current_version() {
        let db = Db::open_in_memory().unwrap();
        let version: u32 = db
            .call_blocking(|c| c.pragma_query_value(None, "user_version", |r| r.get(0)))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        let tables: Vec<String> = db
            .call_blocking(|c| {
                let mut stmt =
                    c.prepare("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")?;
                let rows = stmt.query_map([], |r| r.get(0))?;
                rows.collect()
            })
            .unwrap();
        for t in [
            "heartbeat_runs",
            "inference_calls",
            "kv",
            "tool_calls",
            "turns",
            "wake_events",
        ] {
            assert!(tables.iter().any(|x| x == t), "missing {t}: {tables:?}");
        }
    }

    #[test]
    fn reopen_is_idempotent_and_wal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        drop(Db::open(&path).unwrap());
        let db = Db::open(&path).unwrap();
        let mode: String = db
            .call_blocking(|c| c.pragma_query_value(None, "journal_mode", |r| r.get(0)))
            .unwrap();
        assert_eq!(mode, "wal");
        let perms = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(perms, 0o600);
    }

    #[test]
    fn refuses_newer_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
                .unwrap();
        }
        let err = Db::open(&path).unwrap_err();
        assert!(
            matches!(err, StateError::NewerSchema { found, .. } if found == SCHEMA_VERSION + 1),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn call_runs_off_the_executor() {
        let db = Db::open_in_memory().unwrap();
        let n: i64 = db
            .call(|c| {
                c.execute(
                    "INSERT INTO kv (key, value, updated_at) VALUES ('a', 'b', 'now')",
                    [],
                )?;
                c.query_row("SELECT count(*) FROM kv", [], |r| r.get(0))
            })
            .await
            .unwrap();
        assert_eq!(n, 1);
    }
}
