-- Schedule (heartbeat), skills and self-modification audit.

-- One row per heartbeat entry the scheduler knows: when it last ran, when it runs next, and who holds it now.
-- `spec` is the schedule the row was planned with (cadence and tier multiplier); when heartbeat.yaml or the tier
-- changes it, the next run is planned again. The lease (`lease_owner`, `lease_until`) is what keeps two schedulers
-- sharing this database from running one entry twice: a run starts only by winning a single UPDATE on this row.
CREATE TABLE heartbeat_schedule (
  name TEXT PRIMARY KEY,
  spec TEXT NOT NULL,
  last_run_at TEXT,
  next_run_at TEXT,
  lease_owner TEXT,
  lease_until TEXT,
  updated_at TEXT NOT NULL
);

-- heartbeat_runs (0001) gains the entry that ran, which process ran it, when it was due, and what it reported.
ALTER TABLE heartbeat_runs ADD COLUMN entry TEXT;
ALTER TABLE heartbeat_runs ADD COLUMN owner TEXT;
ALTER TABLE heartbeat_runs ADD COLUMN scheduled_for TEXT;
ALTER TABLE heartbeat_runs ADD COLUMN summary TEXT;
CREATE INDEX heartbeat_runs_by_entry ON heartbeat_runs (entry, started_at);
