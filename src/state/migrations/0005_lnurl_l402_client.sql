-- 0005: money over HTTP, client and LNURL side. Invoices the agent's Lightning address issued, and the L402
-- credentials the agent bought (the token cache shared by the daemon and the CLI).

-- One row per LNURL-pay invoice (LUD-06 callback), written before the invoice is handed out; `verify` (LUD-21)
-- answers from it and from the node's own payment store.
CREATE TABLE lnurl_invoices (
  payment_hash TEXT PRIMARY KEY,
  name TEXT NOT NULL,
  amount_msat INTEGER NOT NULL,
  comment TEXT,
  bolt11 TEXT NOT NULL,
  created_at TEXT NOT NULL
);

-- L402 credentials bought, keyed by origin (scheme://host:port) and the path they were bought for; a request to
-- that path or below sends the credential first. The preimage is the credential's secret half: stored, never shown.
CREATE TABLE l402_tokens (
  origin TEXT NOT NULL,
  path_prefix TEXT NOT NULL,
  token TEXT NOT NULL,
  preimage TEXT NOT NULL,
  payment_hash TEXT NOT NULL,
  token_id TEXT,
  amount_msat INTEGER NOT NULL,
  -- Unix seconds from the macaroon's `*_valid_until` caveats (the earliest); NULL = no expiry caveat.
  valid_until INTEGER,
  created_at TEXT NOT NULL,
  last_used_at TEXT,
  PRIMARY KEY (origin, path_prefix)
);
