-- Nostr presence: the outbox every publication goes through, the cache of other agents' cards, the distress
-- notes sent (rate limit), and the NIP-47 wallet-service connections with the requests they made.

-- One row per (event, relay): each relay is retried on its own until it accepts the event.
CREATE TABLE nostr_outbox (
  event_id TEXT NOT NULL,
  relay TEXT NOT NULL,
  kind INTEGER NOT NULL,
  purpose TEXT NOT NULL,
  event_json TEXT NOT NULL,
  created_at TEXT NOT NULL,
  attempts INTEGER NOT NULL DEFAULT 0,
  next_attempt_at TEXT NOT NULL,
  last_error TEXT,
  sent_at TEXT,
  PRIMARY KEY (event_id, relay)
);
CREATE INDEX nostr_outbox_pending ON nostr_outbox (sent_at, next_attempt_at);

-- The newest verified card of every agent discovery has seen.
CREATE TABLE nostr_agents (
  pubkey TEXT PRIMARY KEY,
  event_id TEXT NOT NULL,
  created_at INTEGER NOT NULL,
  card TEXT NOT NULL,
  event_json TEXT NOT NULL,
  seen_at TEXT NOT NULL
);

-- Distress notes published (one per status within nostr.distress_interval_secs).
CREATE TABLE nostr_distress (
  id TEXT PRIMARY KEY,
  status TEXT NOT NULL,
  amount_sats INTEGER NOT NULL,
  event_id TEXT NOT NULL,
  dm_event_id TEXT,
  created_at TEXT NOT NULL
);
CREATE INDEX nostr_distress_status ON nostr_distress (status, created_at);

-- NIP-47 connections: each has its own wallet-service key (secret kept here, in the 0600 state DB) and the
-- public key of the client secret handed out in the URI (the secret itself is not kept).
CREATE TABLE nwc_connections (
  id TEXT PRIMARY KEY,
  name TEXT NOT NULL,
  service_secret TEXT NOT NULL,
  service_pubkey TEXT NOT NULL UNIQUE,
  client_pubkey TEXT NOT NULL UNIQUE,
  relays TEXT NOT NULL,
  methods TEXT NOT NULL,
  budget_msat INTEGER NOT NULL,
  budget_period TEXT NOT NULL,
  max_payment_msat INTEGER,
  created_at TEXT NOT NULL,
  expires_at TEXT,
  revoked_at TEXT
);

-- Every request a connection made, keyed by the request event id so a re-sent request gets the same answer
-- and never a second payment. Payments count against the connection's budget while pending or settled.
CREATE TABLE nwc_requests (
  request_id TEXT PRIMARY KEY,
  connection_id TEXT NOT NULL REFERENCES nwc_connections(id),
  method TEXT NOT NULL,
  state TEXT NOT NULL,
  amount_msat INTEGER,
  fee_msat INTEGER,
  payment_hash TEXT,
  response TEXT,
  created_at TEXT NOT NULL,
  finished_at TEXT
);
CREATE INDEX nwc_requests_budget ON nwc_requests (connection_id, method, created_at);
