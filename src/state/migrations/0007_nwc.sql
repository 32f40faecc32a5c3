-- NIP-47 Nostr Wallet Connect: the connections the agent serves, the requests it answered and what each
-- connection spent against its own budget.

-- 0004 sketched these tables before the service existed; nothing ever wrote them. The service keys requests by
-- the agent's NIP-06 key and keeps its reservations apart, so they are replaced.
DROP INDEX IF EXISTS nwc_requests_budget;
DROP TABLE IF EXISTS nwc_requests;
DROP TABLE IF EXISTS nwc_connections;

-- One client a connection was handed to. The client's secret is never stored: only its public key, which is
-- how a request is matched to its connection.
CREATE TABLE nwc_connections (
    id             TEXT PRIMARY KEY,           -- ULID
    name           TEXT NOT NULL,
    client_pubkey  TEXT NOT NULL UNIQUE,       -- hex
    service_pubkey TEXT NOT NULL,              -- hex, the key the URI names
    relays         TEXT NOT NULL,              -- JSON array, as written in the URI
    methods        TEXT NOT NULL,              -- space-separated NIP-47 method names
    budget_msat    INTEGER NOT NULL,
    period         TEXT NOT NULL,              -- daily | weekly | monthly | yearly | never
    created_at     TEXT NOT NULL,
    revoked_at     TEXT
);

-- Every request event, recorded before it is acted on (the primary key makes a replay harmless); the signed
-- reply is kept so a replayed request gets the same answer.
CREATE TABLE nwc_requests (
    event_id      TEXT PRIMARY KEY,
    connection_id TEXT,
    method        TEXT,
    received_at   TEXT NOT NULL,
    reply_json    TEXT,
    replied_at    TEXT
);

-- Budget reservations of a connection: `reserved` while a payment is in flight, `settled` once paid (amount is
-- then what was paid, fee included), `released` when nothing left.
CREATE TABLE nwc_spends (
    id            TEXT PRIMARY KEY,
    connection_id TEXT NOT NULL REFERENCES nwc_connections(id),
    request_id    TEXT NOT NULL UNIQUE,
    payment_hash  TEXT,
    amount_msat   INTEGER NOT NULL,
    status        TEXT NOT NULL,
    created_at    TEXT NOT NULL,
    updated_at    TEXT NOT NULL
);
CREATE INDEX nwc_spends_by_connection ON nwc_spends (connection_id, created_at);
