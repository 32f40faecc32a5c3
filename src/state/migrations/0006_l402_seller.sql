-- 0006: the agent's L402 seller. One row per macaroon minted for a challenge: its root key, stored under
-- sha256(identifier) as Aperture does. Deleting a row revokes that token. The root key is a secret (the DB is a
-- protected path); it is never printed.
CREATE TABLE l402_root_keys (
  id TEXT PRIMARY KEY,            -- hex sha256(identifier)
  root_key BLOB NOT NULL,         -- 32 random bytes
  service TEXT NOT NULL,
  payment_hash TEXT NOT NULL,     -- hex; the invoice that pays for the token
  token_id TEXT NOT NULL,         -- hex; identifier bytes 34..66
  price_msat INTEGER NOT NULL,
  bolt11 TEXT NOT NULL,
  invoice_expires_at INTEGER NOT NULL, -- unix seconds: unpaid rows past it are pruned
  valid_until INTEGER,            -- unix seconds of the <service>_valid_until caveat
  created_at TEXT NOT NULL,
  paid_at TEXT,                   -- when a credential first verified with the invoice settled
  last_used_at TEXT,
  uses INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX l402_root_keys_payment_hash ON l402_root_keys(payment_hash);
CREATE INDEX l402_root_keys_unpaid ON l402_root_keys(paid_at, invoice_expires_at);
