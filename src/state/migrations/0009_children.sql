-- 0009: children this agent spawned. One row per child, its lifecycle state and what each step left behind, so
-- an interrupted spawn resumes with the same VM and the same funding invoice (never a second of either).
CREATE TABLE children (
  name TEXT PRIMARY KEY,
  state TEXT NOT NULL,            -- requested | provisioned | installed | configured | started | funded | alive
                                  -- | unhealthy | dead | cleaned_up | failed
  provider TEXT NOT NULL,         -- lnvps | ssh | local | conway
  specialization TEXT NOT NULL,
  genesis TEXT NOT NULL,          -- the child's genesis prompt, as validated at request time
  fund_sats INTEGER NOT NULL,
  template TEXT,                  -- LNVPS template asked for
  target TEXT,                    -- ssh: the host as configured at spawn ({host, port, user, key_path}, JSON)
  vm_id INTEGER,                  -- LNVPS VM, recorded as soon as it exists (before it is paid)
  base_dir TEXT,                  -- the child's directory on its machine: bin/automaton and home/
  http_url TEXT,                  -- the child's HTTP face, as configured
  node_id TEXT,
  npub TEXT,
  balance_sats INTEGER,           -- as last read from the child's `automaton status --json`
  card_status TEXT,               -- from the child's Nostr card / automaton.json
  fund_invoice TEXT,              -- the child's invoice for its funding, stored before paying
  fund_payment_hash TEXT,
  funded_sats INTEGER,
  last_seen_at TEXT,              -- when the child last answered as running
  last_error TEXT,
  attempts INTEGER NOT NULL DEFAULT 0, -- failed spawn attempts (given up and cleaned up after a few)
  worker_pid INTEGER,             -- the process working on this spawn right now (a lease)
  worker_until TEXT,
  created_at TEXT NOT NULL,
  updated_at TEXT NOT NULL
);
CREATE TABLE child_transitions (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  child TEXT NOT NULL,
  from_state TEXT,
  to_state TEXT NOT NULL,
  detail TEXT,
  at TEXT NOT NULL
);
CREATE INDEX child_transitions_child ON child_transitions (child, id);
-- Private messages between this agent and its parent or children (NIP-17), each delivered once.
CREATE TABLE family_messages (
  event_id TEXT PRIMARY KEY,      -- the gift wrap's id
  direction TEXT NOT NULL,        -- in | out
  peer TEXT NOT NULL,             -- parent | child:<name>
  peer_npub TEXT NOT NULL,
  text TEXT NOT NULL,
  at TEXT NOT NULL
);
