//! The scheduler loop: reload heartbeat.yaml, plan, claim what is due, run it under a timeout, record it.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::clock::Clock;
use super::spec::{Entry, HeartbeatFile};
use super::store::{self, Finish, Planned};
use super::tasks::{TaskContext, TaskError, TaskRegistry};
use super::{current_tier, parse_timestamp, tier_multiplier, HeartbeatError};
use crate::home::Home;
use crate::state::{new_id, Db};

/// How often the scheduler looks at the clock, the file and the plan. Like an interval with
/// `MissedTickBehavior::Delay`: a slow tick pushes the next one back instead of bunching ticks up.
pub const TICK: Duration = Duration::from_secs(1);

/// A lease outlives the run's timeout by this much, so a run that is being stopped is not claimed twice.
const LEASE_MARGIN: Duration = Duration::from_secs(30);

/// How long the loop waits for running tasks to notice it stopped.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// How one run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunOutcome {
    Ok,
    Error,
    Timeout,
    Cancelled,
}

impl RunOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            RunOutcome::Ok => "ok",
            RunOutcome::Error => "error",
            RunOutcome::Timeout => "timeout",
            RunOutcome::Cancelled => "cancelled",
        }
    }
}

/// One finished run.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RunRecord {
    pub id: String,
    pub entry: String,
    pub task: String,
    pub outcome: RunOutcome,
    pub summary: Option<String>,
    pub error: Option<String>,
    /// The agent was woken (a wake event was written).
    pub woke: bool,
    pub started_at: DateTime<Utc>,
    pub ended_at: DateTime<Utc>,
    pub next_run: Option<DateTime<Utc>>,
}

#[derive(Default)]
struct Loaded {
    file: HeartbeatFile,
    /// The text last read (None: no file); reloading the same text again is skipped.
    seen: Option<Option<String>>,
    /// Why the text last read was refused, while the previous good version stays in force.
    error: Option<String>,
}

struct Inner {
    home: Home,
    db: Db,
    clock: Arc<dyn Clock>,
    tasks: TaskRegistry,
    owner: String,
    loaded: Mutex<Loaded>,
    running: Mutex<HashSet<String>>,
    /// Cancelled when the loop stops: running tasks are told to end.
    stopping: CancellationToken,
}

/// The heartbeat scheduler of one process. Cheap to clone.
#[derive(Clone)]
pub struct Scheduler {
    inner: Arc<Inner>,
}

impl Scheduler {
    pub fn new(home: Home, db: Db, clock: Arc<dyn Clock>, tasks: TaskRegistry) -> Scheduler {
        Scheduler {
            inner: Arc::new(Inner {
                home,
                db,
                clock,
                tasks,
                owner: format!("pid {} ({})", std::process::id(), new_id()),
                loaded: Mutex::new(Loaded::default()),
                running: Mutex::new(HashSet::new()),
                stopping: CancellationToken::new(),
            }),
        }
    }

    /// Who this scheduler is in lease rows and history.
    pub fn owner(&self) -> &str {
        &self.inner.owner
    }

    /// The entries in force (the last good version of heartbeat.yaml).
    pub fn entries(&self) -> Vec<Entry> {
        self.loaded().file.entries.clone()
    }

    /// Why the current heartbeat.yaml was refused, if it was.
    pub fn load_error(&self) -> Option<String> {
        self.loaded().error.clone()
    }

    fn loaded(&self) -> std::sync::MutexGuard<'_, Loaded> {
        self.inner.loaded.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn running(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.inner.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads heartbeat.yaml again if its text changed. A broken file is refused (the error names file, line and
    /// key) and the previous entries stay in force. Returns whether the entries in force changed.
    pub fn reload(&self) -> Result<bool, HeartbeatError> {
        let path = self.inner.home.heartbeat_path();
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => Some(text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(source) => return Err(HeartbeatError::Read { path, source }),
        };
        let mut loaded = self.loaded();
        if loaded.seen.as_ref() == Some(&text) {
            return Ok(false);
        }
        loaded.seen = Some(text.clone());
        let parsed = match &text {
            None => Ok(HeartbeatFile::default()),
            Some(text) => HeartbeatFile::parse(text, &path, &self.inner.tasks),
        };
        match parsed {
            Ok(file) => {
                let changed = file != loaded.file;
                if changed {
                    tracing::info!(
                        path = %path.display(),
                        entries = file.entries.len(),
                        enabled = file.entries.iter().filter(|e| e.enabled).count(),
                        "heartbeat schedule loaded"
                    );
                }
                loaded.file = file;
                loaded.error = None;
                Ok(changed)
            }
            Err(err) => {
                tracing::error!(
                    error = %err,
                    entries = loaded.file.entries.len(),
                    "heartbeat.yaml refused; the previous schedule stays in force until it is fixed"
                );
                loaded.error = Some(err.to_string());
                Err(err)
            }
        }
    }

    /// The multiplier in force and the tier it comes from.
    pub async fn tier(&self) -> Result<(String, f64), HeartbeatError> {
        let tier = self.inner.db.call(|c| current_tier(c)).await?;
        let m = tier_multiplier(&tier);
        Ok((tier, m))
    }

    fn multiplier_for(&self, entry: &Entry, tier_multiplier: f64) -> f64 {
        multiplier_for(&self.inner.tasks, entry, tier_multiplier)
    }

    /// Brings the plan rows in line with the entries in force and the tier.
    async fn sync_plans(&self, now: DateTime<Utc>) -> Result<(), HeartbeatError> {
        let entries = self.entries();
        let (_, m) = self.tier().await?;
        let rows = self.inner.db.call(|c| store::plan_rows(c)).await?;
        let planned: Vec<Planned> = entries
            .iter()
            .map(|entry| {
                let m = self.multiplier_for(entry, m);
                let row = rows.iter().find(|r| r.name == entry.name);
                let (spec, next_run_at) = plan(entry, row, m, now);
                Planned {
                    name: entry.name.clone(),
                    spec,
                    next_run_at,
                }
            })
            .collect();
        self.inner
            .db
            .call(move |c| store::apply_plans(c, &planned, now))
            .await?;
        Ok(())
    }

    /// One look at the schedule: reload the file if it changed, plan, and start every entry that is due and
    /// not running anywhere. Returns the started runs.
    pub async fn tick(&self) -> Result<Vec<JoinHandle<RunRecord>>, HeartbeatError> {
        // A broken file was logged by reload; the last good schedule keeps running.
        let _ = self.reload();
        let now = self.inner.clock.now();
        self.sync_plans(now).await?;
        let mut started = Vec::new();
        for entry in self.entries().into_iter().filter(|e| e.enabled) {
            if self.running().contains(&entry.name) {
                continue;
            }
            if let Some(scheduled_for) = self.claim(&entry, now, false).await? {
                started.push(self.spawn_run(entry, scheduled_for, now));
            }
        }
        Ok(started)
    }

    async fn claim(
        &self,
        entry: &Entry,
        now: DateTime<Utc>,
        force: bool,
    ) -> Result<Option<Option<String>>, HeartbeatError> {
        let lease_until = now
            + chrono::Duration::from_std(entry.timeout + LEASE_MARGIN)
                .unwrap_or(chrono::Duration::hours(1));
        let (name, owner) = (entry.name.clone(), self.inner.owner.clone());
        let claimed = self
            .inner
            .db
            .call(move |c| store::try_claim(c, &name, &owner, now, lease_until, force))
            .await?;
        if claimed.is_some() {
            self.running().insert(entry.name.clone());
        }
        Ok(claimed)
    }

    fn spawn_run(
        &self,
        entry: Entry,
        scheduled_for: Option<String>,
        now: DateTime<Utc>,
    ) -> JoinHandle<RunRecord> {
        let this = self.clone();
        let span = tracing::info_span!("heartbeat", entry = %entry.name, task = %entry.task);
        tokio::spawn(async move { this.execute(entry, scheduled_for, now).await }.instrument(span))
    }

    /// Runs `name` now, whether or not it is due or enabled (`automaton heartbeat run NAME`). Refused while
    /// another run of it holds the lease.
    pub async fn run_now(&self, name: &str) -> Result<RunRecord, HeartbeatError> {
        self.reload()?;
        let Some(entry) = self.entries().into_iter().find(|e| e.name == name) else {
            return Err(HeartbeatError::NoSuchEntry {
                name: name.to_string(),
                known: self
                    .entries()
                    .iter()
                    .map(|e| e.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        };
        let now = self.inner.clock.now();
        self.sync_plans(now).await?;
        if self.running().contains(name) {
            return Err(HeartbeatError::Busy {
                name: name.to_string(),
            });
        }
        match self.claim(&entry, now, true).await? {
            Some(scheduled_for) => {
                let span =
                    tracing::info_span!("heartbeat", entry = %entry.name, task = %entry.task);
                Ok(self
                    .execute(entry, scheduled_for, now)
                    .instrument(span)
                    .await)
            }
            None => Err(HeartbeatError::Busy {
                name: name.to_string(),
            }),
        }
    }

    /// Runs a claimed entry under its timeout and records how it ended.
    async fn execute(
        &self,
        entry: Entry,
        scheduled_for: Option<String>,
        started_at: DateTime<Utc>,
    ) -> RunRecord {
        let inner = &self.inner;
        let run_id = new_id();
        let started = std::time::Instant::now();
        {
            let (id, name, task, owner) = (
                run_id.clone(),
                entry.name.clone(),
                entry.task.clone(),
                inner.owner.clone(),
            );
            let scheduled = scheduled_for.clone();
            if let Err(err) = inner
                .db
                .call(move |c| {
                    store::start_run(
                        c,
                        &id,
                        &name,
                        &task,
                        &owner,
                        started_at,
                        scheduled.as_deref(),
                    )
                })
                .await
            {
                tracing::warn!(error = %err, "cannot record the start of a heartbeat run");
            }
        }
        let ctx = TaskContext {
            home: inner.home.clone(),
            db: inner.db.clone(),
            clock: inner.clock.clone(),
            entry: entry.name.clone(),
        };
        let deadline = started_at
            + chrono::Duration::from_std(entry.timeout).unwrap_or(chrono::Duration::hours(1));
        let result = match inner.tasks.get(&entry.task) {
            None => Some(Err(TaskError::Failed(format!(
                "unknown task {:?}",
                entry.task
            )))),
            Some(task) => {
                tokio::select! {
                    r = task.run(&ctx, &entry.params) => Some(r),
                    _ = inner.clock.sleep_until(deadline) => None,
                    _ = inner.stopping.cancelled() => Some(Err(TaskError::Failed("cancelled: the scheduler stopped".into()))),
                }
            }
        };
        let (outcome, summary, error, wake) = match result {
            Some(Ok(report)) => (RunOutcome::Ok, Some(report.summary), None, report.wake),
            Some(Err(e)) if inner.stopping.is_cancelled() => {
                (RunOutcome::Cancelled, None, Some(e.to_string()), None)
            }
            Some(Err(e)) => (RunOutcome::Error, None, Some(e.to_string()), None),
            None => (
                RunOutcome::Timeout,
                None,
                Some(format!(
                    "stopped after its timeout of {}",
                    humantime::format_duration(entry.timeout)
                )),
                None,
            ),
        };
        let ended_at = inner.clock.now();
        // The next run is planned from the entry as it is now (the file may have changed meanwhile), counted
        // from when this run started: a run that was hours late does not leave a backlog behind it.
        let current = self.entries().into_iter().find(|e| e.name == entry.name);
        let (_, tier_m) = self.tier().await.unwrap_or_else(|_| ("normal".into(), 1.0));
        let next_run = current.as_ref().filter(|e| e.enabled).and_then(|e| {
            e.cadence
                .next_after(started_at, self.multiplier_for(e, tier_m))
        });
        {
            let (id, name, owner) = (run_id.clone(), entry.name.clone(), inner.owner.clone());
            let (summary, error, wake) = (summary.clone(), error.clone(), wake.clone());
            let finished = inner
                .db
                .call(move |c| {
                    store::finish_run(
                        c,
                        &Finish {
                            run_id: &id,
                            entry: &name,
                            owner: &owner,
                            started_at,
                            ended_at,
                            outcome: outcome.as_str(),
                            summary: summary.as_deref(),
                            error: error.as_deref(),
                            next_run_at: next_run,
                            wake: wake.as_deref(),
                        },
                    )
                })
                .await;
            if let Err(err) = finished {
                tracing::error!(error = %err, "cannot record the end of a heartbeat run; its lease will expire");
            }
        }
        self.running().remove(&entry.name);
        let elapsed_ms = started.elapsed().as_millis() as u64;
        match outcome {
            RunOutcome::Ok => tracing::info!(
                outcome = outcome.as_str(),
                summary = summary.as_deref().unwrap_or(""),
                woke = wake.is_some(),
                elapsed_ms,
                "heartbeat task finished"
            ),
            _ => tracing::warn!(
                outcome = outcome.as_str(),
                error = error.as_deref().unwrap_or(""),
                elapsed_ms,
                "heartbeat task failed"
            ),
        }
        RunRecord {
            id: run_id,
            entry: entry.name,
            task: entry.task,
            outcome,
            summary,
            error,
            woke: wake.is_some(),
            started_at,
            ended_at,
            next_run,
        }
    }

    /// Ticks until `cancel`, then tells running tasks to stop and waits briefly for them.
    pub async fn run(self, cancel: CancellationToken) {
        if let Err(err) = self.reload() {
            tracing::error!(error = %err, "heartbeat.yaml is broken; no schedule until it is fixed");
        }
        tracing::info!(owner = %self.inner.owner, "heartbeat scheduler started");
        let mut handles: Vec<JoinHandle<RunRecord>> = Vec::new();
        loop {
            let started = std::time::Instant::now();
            match self.tick().await {
                Ok(new) => handles.extend(new),
                // One failed tick (the DB busy for too long) must not end the schedule.
                Err(err) => tracing::warn!(error = %err, "heartbeat tick failed"),
            }
            handles.retain(|h| !h.is_finished());
            tracing::trace!(
                elapsed_ms = started.elapsed().as_millis() as u64,
                "heartbeat tick"
            );
            let next = self.inner.clock.now()
                + chrono::Duration::from_std(TICK).unwrap_or(chrono::Duration::seconds(1));
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = self.inner.clock.sleep_until(next) => {}
            }
        }
        self.inner.stopping.cancel();
        for handle in handles {
            if tokio::time::timeout(SHUTDOWN_GRACE, handle).await.is_err() {
                tracing::warn!("a heartbeat task did not stop in time");
            }
        }
        tracing::info!("heartbeat scheduler stopped");
    }
}

/// The multiplier that applies to `entry`: the tier's, unless its task opts out of stretching.
pub fn multiplier_for(tasks: &TaskRegistry, entry: &Entry, tier_multiplier: f64) -> f64 {
    match tasks.get(&entry.task) {
        Some(task) if !task.stretches() => 1.0,
        _ => tier_multiplier,
    }
}

/// The plan key and next run of `entry` given its stored row: an unchanged plan keeps its next run; a changed
/// cadence, enabled flag or tier counts from the last run, so slowing down does not reset the clock and speeding
/// up may make the entry due at once (it then runs once, not in a burst); an entry that never ran gets its first
/// run. Shared by the scheduler and `automaton heartbeat list`, so both say the same.
pub fn plan(
    entry: &Entry,
    row: Option<&store::PlanRow>,
    multiplier: f64,
    now: DateTime<Utc>,
) -> (String, Option<DateTime<Utc>>) {
    let spec = entry.plan_key(multiplier);
    let next = match row {
        Some(row) if row.spec == spec => row.next_run_at.as_deref().and_then(parse_timestamp),
        _ if !entry.enabled => None,
        _ => match row
            .and_then(|r| r.last_run_at.as_deref())
            .and_then(parse_timestamp)
        {
            Some(last) => entry.cadence.next_after(last, multiplier),
            None => entry.cadence.first_run(now, multiplier),
        },
    };
    (spec, next)
}
