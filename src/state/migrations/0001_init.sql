-- 0001: the runtime's first tables. Timestamps are RFC 3339 UTC strings, ids are ULIDs.

-- One row per agent turn, written in one transaction with its tool calls.
CREATE TABLE turns (
  id TEXT PRIMARY KEY,
  started_at TEXT NOT NULL,
  ended_at TEXT,
  input TEXT,
  input_source TEXT NOT NULL,
  thinking TEXT,
  outcome TEXT NOT NULL,
  prompt_tokens INTEGER NOT NULL DEFAULT 0,
  completion_tokens INTEGER NOT NULL DEFAULT 0,
  cost_sats INTEGER
);
CREATE INDEX turns_started_at ON turns(started_at);

CREATE TABLE tool_calls (
  id TEXT PRIMARY KEY,
  turn_id TEXT NOT NULL REFERENCES turns(id),
  seq INTEGER NOT NULL,
  name TEXT NOT NULL,
  arguments TEXT NOT NULL,
  result TEXT NOT NULL,
  is_error INTEGER NOT NULL,
  duration_ms INTEGER NOT NULL,
  created_at TEXT NOT NULL
);
CREATE INDEX tool_calls_turn ON tool_calls(turn_id, seq);

-- Every request to the model, including failed attempts, so spend on inference is never invisible.
CREATE TABLE inference_calls (
  id TEXT PRIMARY KEY,
  turn_id TEXT,
  provider TEXT NOT NULL,
  model TEXT NOT NULL,
  prompt_tokens INTEGER NOT NULL DEFAULT 0,
  completion_tokens INTEGER NOT NULL DEFAULT 0,
  cost_sats INTEGER,
  duration_ms INTEGER NOT NULL,
  attempts INTEGER NOT NULL DEFAULT 1,
  error TEXT,
  created_at TEXT NOT NULL
);
CREATE INDEX inference_calls_turn ON inference_calls(turn_id);

CREATE TABLE heartbeat_runs (
  id TEXT PRIMARY KEY,
  task TEXT NOT NULL,
  started_at TEXT NOT NULL,
  ended_at TEXT,
  outcome TEXT,
  error TEXT
);
CREATE INDEX heartbeat_runs_task ON heartbeat_runs(task, started_at);

-- Reasons to wake a sleeping agent (heartbeat tasks, incoming payments, messages); consumed once.
CREATE TABLE wake_events (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  source TEXT NOT NULL,
  reason TEXT NOT NULL,
  created_at TEXT NOT NULL,
  consumed_at TEXT
);
CREATE INDEX wake_events_pending ON wake_events(consumed_at);

CREATE TABLE kv (
  key TEXT PRIMARY KEY,
  value TEXT NOT NULL,
  updated_at TEXT NOT NULL
);
