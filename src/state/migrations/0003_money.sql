-- 0003: money. The budget gate's permits (reservations and settled spends), creator approvals, and receipts of
-- every payment in or out. Timestamps are RFC 3339 UTC strings with milliseconds (they sort as text), ids ULIDs.

-- One row per permit the budget gate granted. The rolling caps are sums over this table: a reserved permit counts
-- `reserved_msat` (amount + max fee), a settled one what was really paid, a released one nothing.
CREATE TABLE money_permits (
  id TEXT PRIMARY KEY,
  rail TEXT NOT NULL,
  amount_msat INTEGER NOT NULL,
  max_fee_msat INTEGER NOT NULL,
  reserved_msat INTEGER NOT NULL,
  purpose TEXT NOT NULL,
  counterparty TEXT,
  -- reserved | settled | released
  state TEXT NOT NULL CHECK (state IN ('reserved', 'settled', 'released')),
  paid_msat INTEGER,
  fee_msat INTEGER,
  -- Set when the wallet launches the payment, so crash recovery can ask the node how it ended.
  payment_hash TEXT,
  approval_id TEXT,
  created_at TEXT NOT NULL,
  closed_at TEXT
);
CREATE INDEX money_permits_created ON money_permits (created_at);
CREATE INDEX money_permits_open ON money_permits (state) WHERE state = 'reserved';

-- Payments above `limits.approval_above_sats` wait here for the creator.
CREATE TABLE money_approvals (
  id TEXT PRIMARY KEY,
  -- Identifies "the same payment" when the agent asks again: rail, amounts, counterparty, purpose.
  fingerprint TEXT NOT NULL,
  rail TEXT NOT NULL,
  amount_msat INTEGER NOT NULL,
  max_fee_msat INTEGER NOT NULL,
  purpose TEXT NOT NULL,
  counterparty TEXT,
  -- pending | approved | denied | used | expired
  status TEXT NOT NULL CHECK (status IN ('pending', 'approved', 'denied', 'used', 'expired')),
  created_at TEXT NOT NULL,
  expires_at TEXT NOT NULL,
  decided_at TEXT,
  note TEXT,
  used_at TEXT,
  permit_id TEXT
);
CREATE INDEX money_approvals_fingerprint ON money_approvals (fingerprint, status);

-- Every movement of money, in and out, with its proof.
CREATE TABLE receipts (
  id TEXT PRIMARY KEY,
  direction TEXT NOT NULL CHECK (direction IN ('in', 'out')),
  rail TEXT NOT NULL,
  amount_msat INTEGER NOT NULL,
  fee_msat INTEGER NOT NULL DEFAULT 0,
  counterparty TEXT,
  purpose TEXT,
  -- Lightning payment hash (hex); the txid for on-chain.
  payment_hash TEXT NOT NULL,
  -- Hex; stored as proof, never printed (only its sha256, which equals payment_hash, is shown).
  preimage TEXT,
  request_hash TEXT,
  response_hash TEXT,
  status TEXT NOT NULL CHECK (status IN ('pending', 'succeeded', 'failed')),
  created_at TEXT NOT NULL,
  settled_at TEXT,
  -- zbase32 signature by the node key over `automaton-ln/receipt/v1\n` + canonical JSON.
  signature TEXT,
  permit_id TEXT,
  comment TEXT,
  meta TEXT NOT NULL DEFAULT '{}',
  UNIQUE (payment_hash, direction)
);
CREATE INDEX receipts_created ON receipts (created_at);
