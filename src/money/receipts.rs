//! Receipts: one table for every movement of money in and out, with its proof (the preimage, stored but only ever
//! shown as its SHA-256, which is the payment hash), and the canonical JSON the node key signs.
//!
//! Writes are idempotent (UNIQUE payment hash + direction): the wallet's event pump may deliver an event twice and
//! the process may die between any two lines. Marking an outgoing receipt succeeded or failed also settles or
//! releases its permit in the same transaction, so the books stay right even when the payment ends after a
//! restart.

use std::fmt;

use rusqlite::{params, Connection, OptionalExtension, Row};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::{hex, MoneyError, Permit, Rail};
use crate::state::{new_id, now_rfc3339, Db};

/// Domain separation of the signed bytes: a receipt signature can never be mistaken for another signed message.
pub const SIGNING_PREFIX: &[u8] = b"automaton-ln/receipt/v1\n";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    In,
    Out,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::In => "in",
            Direction::Out => "out",
        }
    }

    pub fn parse(s: &str) -> Option<Direction> {
        match s.trim().to_ascii_lowercase().as_str() {
            "in" => Some(Direction::In),
            "out" => Some(Direction::Out),
            _ => None,
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReceiptStatus {
    Pending,
    Succeeded,
    Failed,
}

impl ReceiptStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ReceiptStatus::Pending => "pending",
            ReceiptStatus::Succeeded => "succeeded",
            ReceiptStatus::Failed => "failed",
        }
    }

    fn parse(s: &str) -> ReceiptStatus {
        match s {
            "succeeded" => ReceiptStatus::Succeeded,
            "failed" => ReceiptStatus::Failed,
            _ => ReceiptStatus::Pending,
        }
    }
}

impl fmt::Display for ReceiptStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A payment preimage. Never printed: `Debug` redacts it and it is not serialised.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Preimage([u8; 32]);

impl Preimage {
    pub fn new(bytes: [u8; 32]) -> Preimage {
        Preimage(bytes)
    }

    pub fn from_hex(text: &str) -> Option<Preimage> {
        let bytes = unhex(text)?;
        Some(Preimage(bytes.try_into().ok()?))
    }

    pub fn bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// SHA-256 of the preimage, hex: equal to the payment hash when the payment is proven.
    pub fn sha256_hex(&self) -> String {
        hex(&Sha256::digest(self.0))
    }

    fn expose_hex(&self) -> String {
        hex(&self.0)
    }
}

impl fmt::Debug for Preimage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Preimage([redacted])")
    }
}

/// One movement of money. The JSON form (what `wallet receipts --json` prints and what is signed) carries the
/// preimage only as `preimage_sha256`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Receipt {
    pub id: String,
    pub direction: Direction,
    pub rail: Rail,
    pub amount_msat: u64,
    pub fee_msat: u64,
    pub counterparty: Option<String>,
    pub purpose: Option<String>,
    /// Lightning payment hash (hex); the txid for on-chain.
    pub payment_hash: String,
    #[serde(skip)]
    pub preimage: Option<Preimage>,
    /// SHA-256 of the stored preimage (hex), present once the payment is proven.
    pub preimage_sha256: Option<String>,
    /// SHA-256 (hex) of the request this payment bought (an L402 call), where there is one.
    pub request_hash: Option<String>,
    pub response_hash: Option<String>,
    pub status: ReceiptStatus,
    pub created_at: String,
    pub settled_at: Option<String>,
    /// zbase32 signature by the node key over `signing_bytes` (lnd-compatible `signmessage`).
    pub signature: Option<String>,
    pub permit_id: Option<String>,
    pub comment: Option<String>,
    #[serde(default = "empty_object")]
    pub meta: Value,
}

fn empty_object() -> Value {
    Value::Object(Default::default())
}

impl Receipt {
    /// Proof of payment: the payment hash, when a preimage hashing to it is stored.
    pub fn payment_proof(&self) -> Option<&str> {
        self.preimage_sha256
            .as_deref()
            .filter(|h| *h == self.payment_hash)
    }

    /// The receipt as one JSON object (signature included).
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }
}

/// JSON with object keys sorted (recursively) and no whitespace: the same receipt always gives the same bytes.
pub fn canonical_json(value: &Value) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                write_canonical(&map[key], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// The receipt's canonical JSON without the `signature` field.
pub fn canonical_unsigned(receipt: &Receipt) -> String {
    let mut value = receipt.to_json();
    if let Value::Object(map) = &mut value {
        map.remove("signature");
    }
    canonical_json(&value)
}

/// What the node key signs: `automaton-ln/receipt/v1\n` followed by the canonical JSON without the signature.
pub fn signing_bytes(receipt: &Receipt) -> Vec<u8> {
    let mut bytes = SIGNING_PREFIX.to_vec();
    bytes.extend_from_slice(canonical_unsigned(receipt).as_bytes());
    bytes
}

/// Reads a receipt from its JSON form (`wallet verify-receipt FILE`); unknown keys are an error so a tampered
/// receipt cannot smuggle fields past the signature.
pub fn from_json(text: &str) -> Result<Receipt, MoneyError> {
    let value: Value = serde_json::from_str(text).map_err(|e| MoneyError::Invalid {
        what: "receipt JSON",
        reason: e.to_string(),
    })?;
    let known: Vec<&str> = vec![
        "id",
        "direction",
        "rail",
        "amount_msat",
        "fee_msat",
        "counterparty",
        "purpose",
        "payment_hash",
        "preimage_sha256",
        "request_hash",
        "response_hash",
        "status",
        "created_at",
        "settled_at",
        "signature",
        "permit_id",
        "comment",
        "meta",
    ];
    if let Value::Object(map) = &value {
        if let Some(extra) = map.keys().find(|k| !known.contains(&k.as_str())) {
            return Err(MoneyError::Invalid {
                what: "receipt JSON",
                reason: format!("unknown field `{extra}`"),
            });
        }
    }
    serde_json::from_value(value).map_err(|e| MoneyError::Invalid {
        what: "receipt JSON",
        reason: e.to_string(),
    })
}

/// SHA-256 (hex) of a request or response body, for `request_hash` / `response_hash`.
pub fn body_hash(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    let text = text.trim();
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

fn check_hash(payment_hash: &str) -> Result<String, MoneyError> {
    let h = payment_hash.trim().to_ascii_lowercase();
    if h.len() == 64 && h.chars().all(|c| c.is_ascii_hexdigit()) {
        Ok(h)
    } else {
        Err(MoneyError::Invalid {
            what: "payment hash",
            reason: format!("`{payment_hash}` is not 64 hex characters"),
        })
    }
}

const COLUMNS: &str = "id, direction, rail, amount_msat, fee_msat, counterparty, purpose, payment_hash, preimage, \
                       request_hash, response_hash, status, created_at, settled_at, signature, permit_id, comment, meta";

fn from_row(r: &Row<'_>) -> rusqlite::Result<Receipt> {
    let preimage = r
        .get::<_, Option<String>>(8)?
        .and_then(|h| Preimage::from_hex(&h));
    let meta: String = r.get(17)?;
    Ok(Receipt {
        id: r.get(0)?,
        direction: Direction::parse(&r.get::<_, String>(1)?).unwrap_or(Direction::Out),
        rail: r.get::<_, String>(2)?.parse().unwrap_or(Rail::Bolt11),
        amount_msat: r.get::<_, i64>(3)?.max(0) as u64,
        fee_msat: r.get::<_, i64>(4)?.max(0) as u64,
        counterparty: r.get(5)?,
        purpose: r.get(6)?,
        payment_hash: r.get(7)?,
        preimage_sha256: preimage.map(|p| p.sha256_hex()),
        preimage,
        request_hash: r.get(9)?,
        response_hash: r.get(10)?,
        status: ReceiptStatus::parse(&r.get::<_, String>(11)?),
        created_at: r.get(12)?,
        settled_at: r.get(13)?,
        signature: r.get(14)?,
        permit_id: r.get(15)?,
        comment: r.get(16)?,
        meta: serde_json::from_str(&meta).unwrap_or_else(|_| empty_object()),
    })
}

fn by_hash(
    conn: &Connection,
    payment_hash: &str,
    direction: Direction,
) -> rusqlite::Result<Option<Receipt>> {
    conn.query_row(
        &format!("SELECT {COLUMNS} FROM receipts WHERE payment_hash = ?1 AND direction = ?2"),
        params![payment_hash, direction.as_str()],
        from_row,
    )
    .optional()
}

/// The receipt of `payment_hash` in `direction`, if any.
pub async fn get_by_hash(
    db: &Db,
    payment_hash: &str,
    direction: Direction,
) -> Result<Option<Receipt>, MoneyError> {
    let hash = check_hash(payment_hash)?;
    Ok(db.call(move |c| by_hash(c, &hash, direction)).await?)
}

/// One receipt by id.
pub async fn get(db: &Db, id: &str) -> Result<Option<Receipt>, MoneyError> {
    let id = id.to_string();
    Ok(db
        .call(move |c| {
            c.query_row(
                &format!("SELECT {COLUMNS} FROM receipts WHERE id = ?1"),
                [id],
                from_row,
            )
            .optional()
        })
        .await?)
}

/// Which receipts to list.
#[derive(Clone, Debug, Default)]
pub struct ReceiptFilter {
    pub limit: Option<u32>,
    pub direction: Option<Direction>,
    pub status: Option<ReceiptStatus>,
}

/// Receipts, newest first.
pub fn list_blocking(db: &Db, filter: &ReceiptFilter) -> Result<Vec<Receipt>, MoneyError> {
    let filter = filter.clone();
    Ok(db.call_blocking(move |c| list_in(c, &filter))?)
}

/// Receipts, newest first.
pub async fn list(db: &Db, filter: ReceiptFilter) -> Result<Vec<Receipt>, MoneyError> {
    Ok(db.call(move |c| list_in(c, &filter)).await?)
}

fn list_in(c: &Connection, filter: &ReceiptFilter) -> rusqlite::Result<Vec<Receipt>> {
    let mut stmt = c.prepare(&format!(
        "SELECT {COLUMNS} FROM receipts WHERE (?1 IS NULL OR direction = ?1) AND (?2 IS NULL OR status = ?2) \
         ORDER BY created_at DESC, id DESC LIMIT ?3"
    ))?;
    let rows = stmt.query_map(
        params![
            filter.direction.map(Direction::as_str),
            filter.status.map(ReceiptStatus::as_str),
            filter.limit.map(i64::from).unwrap_or(-1),
        ],
        from_row,
    )?;
    rows.collect()
}

/// Records an outgoing payment about to be sent under `permit` (status pending) and ties the permit to its
/// payment hash, so crash recovery can ask the node how it ended. Refuses to pay the same hash twice: an already
/// succeeded receipt is `AlreadyPaid`, one in flight under another permit `AlreadyInFlight`; a failed one is
/// reused for the new attempt. Calling it again for the same permit returns the same receipt.
pub async fn record_pending_out(
    db: &Db,
    permit: &Permit,
    payment_hash: &str,
) -> Result<Receipt, MoneyError> {
    let hash = check_hash(payment_hash)?;
    let req = permit.request().clone();
    let permit_id = permit.id().to_string();
    db.call(move |c| {
        let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let existing = by_hash(&tx, &hash, Direction::Out)?;
        let outcome = match existing {
            Some(r) if r.status == ReceiptStatus::Succeeded => Err(MoneyError::AlreadyPaid {
                payment_hash: hash.clone(),
                receipt_id: r.id,
            }),
            Some(r) if r.status == ReceiptStatus::Pending && r.permit_id.as_deref() != Some(permit_id.as_str()) => {
                Err(MoneyError::AlreadyInFlight {
                    payment_hash: hash.clone(),
                    receipt_id: r.id,
                })
            }
            Some(r) if r.status == ReceiptStatus::Pending => Ok(()),
            Some(r) => {
                // A failed attempt: this permit tries again under the same receipt.
                tx.execute(
                    "UPDATE receipts SET status = 'pending', permit_id = ?2, amount_msat = ?3, fee_msat = 0, \
                     rail = ?4, counterparty = ?5, purpose = ?6, settled_at = NULL, signature = NULL WHERE id = ?1",
                    params![r.id, permit_id, req.amount_msat as i64, req.rail.as_str(), req.counterparty, req.purpose],
                )?;
                Ok(())
            }
            None => {
                tx.execute(
                    "INSERT INTO receipts (id, direction, rail, amount_msat, fee_msat, counterparty, purpose, \
                     payment_hash, status, created_at, permit_id) VALUES (?1, 'out', ?2, ?3, 0, ?4, ?5, ?6, 'pending', ?7, ?8)",
                    params![
                        new_id(),
                        req.rail.as_str(),
                        req.amount_msat as i64,
                        req.counterparty,
                        req.purpose,
                        hash,
                        now_rfc3339(),
                        permit_id
                    ],
                )?;
                Ok(())
            }
        };
        if outcome.is_ok() {
            tx.execute(
                "UPDATE money_permits SET payment_hash = ?2 WHERE id = ?1",
                params![permit_id, hash],
            )?;
        }
        let receipt = by_hash(&tx, &hash, Direction::Out)?;
        tx.commit()?;
        Ok(outcome.and_then(|()| receipt.ok_or_else(|| MoneyError::UnknownReceipt(hash.clone()))))
    })
    .await?
}

/// An outgoing payment succeeded: checks `sha256(preimage) == payment_hash`, stores the proof and fee, and settles
/// its permit (amount + fee) in the same transaction. Idempotent: a receipt already succeeded is returned as is.
pub async fn mark_succeeded(
    db: &Db,
    payment_hash: &str,
    direction: Direction,
    preimage: [u8; 32],
    fee_msat: u64,
) -> Result<Receipt, MoneyError> {
    let hash = check_hash(payment_hash)?;
    let preimage = Preimage::new(preimage);
    if preimage.sha256_hex() != hash {
        return Err(MoneyError::PreimageMismatch { payment_hash: hash });
    }
    db.call(move |c| {
        let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let Some(receipt) = by_hash(&tx, &hash, direction)? else {
            return Ok(Err(MoneyError::UnknownReceipt(hash)));
        };
        if receipt.status != ReceiptStatus::Succeeded {
            let now = now_rfc3339();
            tx.execute(
                "UPDATE receipts SET status = 'succeeded', preimage = ?2, fee_msat = ?3, settled_at = ?4, \
                 signature = NULL WHERE id = ?1",
                params![receipt.id, preimage.expose_hex(), fee_msat as i64, now],
            )?;
            if let Some(permit) = &receipt.permit_id {
                tx.execute(
                    "UPDATE money_permits SET state = 'settled', paid_msat = ?2, fee_msat = ?3, closed_at = ?4 \
                     WHERE id = ?1 AND state = 'reserved'",
                    params![permit, receipt.amount_msat as i64, fee_msat as i64, now],
                )?;
            }
        }
        let updated = by_hash(&tx, &hash, direction)?;
        tx.commit()?;
        Ok(updated.ok_or(MoneyError::UnknownReceipt(hash)))
    })
    .await?
}

/// A payment failed for good: the receipt says so and its permit's reservation is released. A receipt that
/// already succeeded stays succeeded (a late failure event for a retried part cannot undo proof of payment).
pub async fn mark_failed(
    db: &Db,
    payment_hash: &str,
    direction: Direction,
    reason: Option<&str>,
) -> Result<Receipt, MoneyError> {
    let hash = check_hash(payment_hash)?;
    let reason = reason.map(str::to_string);
    db.call(move |c| {
        let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let Some(receipt) = by_hash(&tx, &hash, direction)? else {
            return Ok(Err(MoneyError::UnknownReceipt(hash)));
        };
        if receipt.status == ReceiptStatus::Pending {
            let now = now_rfc3339();
            tx.execute(
                "UPDATE receipts SET status = 'failed', settled_at = ?2, comment = COALESCE(?3, comment), \
                 signature = NULL WHERE id = ?1",
                params![receipt.id, now, reason],
            )?;
            if let Some(permit) = &receipt.permit_id {
                tx.execute(
                    "UPDATE money_permits SET state = 'released', closed_at = ?2 WHERE id = ?1 AND state = 'reserved'",
                    params![permit, now],
                )?;
            }
        }
        let updated = by_hash(&tx, &hash, direction)?;
        tx.commit()?;
        Ok(updated.ok_or(MoneyError::UnknownReceipt(hash)))
    })
    .await?
}

/// An invoice the agent issued (status pending until paid). Idempotent.
#[derive(Clone, Debug, Default)]
pub struct IncomingInvoice {
    pub payment_hash: String,
    pub amount_msat: Option<u64>,
    pub rail: Option<Rail>,
    pub purpose: Option<String>,
    pub comment: Option<String>,
}

/// Records an invoice the agent created, so a later payment to it shows its purpose. Idempotent.
pub async fn record_pending_in(db: &Db, invoice: IncomingInvoice) -> Result<Receipt, MoneyError> {
    let hash = check_hash(&invoice.payment_hash)?;
    db.call(move |c| {
        c.execute(
            "INSERT INTO receipts (id, direction, rail, amount_msat, fee_msat, purpose, payment_hash, status, \
             created_at, comment) VALUES (?1, 'in', ?2, ?3, 0, ?4, ?5, 'pending', ?6, ?7) \
             ON CONFLICT(payment_hash, direction) DO NOTHING",
            params![
                new_id(),
                invoice.rail.unwrap_or(Rail::Bolt11).as_str(),
                invoice.amount_msat.unwrap_or(0) as i64,
                invoice.purpose,
                hash,
                now_rfc3339(),
                invoice.comment
            ],
        )?;
        Ok(by_hash(c, &hash, Direction::In)?.ok_or(MoneyError::UnknownReceipt(hash)))
    })
    .await?
}

/// A payment the agent received.
#[derive(Clone, Debug)]
pub struct IncomingPayment {
    pub payment_hash: String,
    pub amount_msat: u64,
    /// Checked against the payment hash when given.
    pub preimage: Option<[u8; 32]>,
    pub rail: Rail,
    pub counterparty: Option<String>,
    pub purpose: Option<String>,
    /// The payer's note (LNURL comment, keysend TLV), untrusted text.
    pub comment: Option<String>,
    pub meta: Option<Value>,
}

/// Records a received payment as succeeded. Idempotent: the same event twice changes nothing; a pending invoice
/// receipt (`record_pending_in`) becomes succeeded and keeps its purpose.
pub async fn record_incoming(db: &Db, payment: IncomingPayment) -> Result<Receipt, MoneyError> {
    let hash = check_hash(&payment.payment_hash)?;
    let preimage = payment.preimage.map(Preimage::new);
    if let Some(p) = &preimage {
        if p.sha256_hex() != hash {
            return Err(MoneyError::PreimageMismatch { payment_hash: hash });
        }
    }
    db.call(move |c| {
        let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let now = now_rfc3339();
        let meta = payment.meta.as_ref().map(canonical_json).unwrap_or_else(|| "{}".into());
        match by_hash(&tx, &hash, Direction::In)? {
            Some(r) if r.status == ReceiptStatus::Succeeded => {}
            Some(r) => {
                tx.execute(
                    "UPDATE receipts SET status = 'succeeded', amount_msat = ?2, preimage = COALESCE(?3, preimage), \
                     rail = ?4, counterparty = COALESCE(?5, counterparty), purpose = COALESCE(purpose, ?6), \
                     comment = COALESCE(?7, comment), meta = ?8, settled_at = ?9, signature = NULL WHERE id = ?1",
                    params![
                        r.id,
                        payment.amount_msat as i64,
                        preimage.map(|p| p.expose_hex()),
                        payment.rail.as_str(),
                        payment.counterparty,
                        payment.purpose,
                        payment.comment,
                        meta,
                        now
                    ],
                )?;
            }
            None => {
                tx.execute(
                    "INSERT INTO receipts (id, direction, rail, amount_msat, fee_msat, counterparty, purpose, \
                     payment_hash, preimage, status, created_at, settled_at, comment, meta) \
                     VALUES (?1, 'in', ?2, ?3, 0, ?4, ?5, ?6, ?7, 'succeeded', ?8, ?8, ?9, ?10)",
                    params![
                        new_id(),
                        payment.rail.as_str(),
                        payment.amount_msat as i64,
                        payment.counterparty,
                        payment.purpose,
                        hash,
                        preimage.map(|p| p.expose_hex()),
                        now,
                        payment.comment,
                        meta
                    ],
                )?;
            }
        }
        let receipt = by_hash(&tx, &hash, Direction::In)?;
        tx.commit()?;
        Ok(receipt.ok_or(MoneyError::UnknownReceipt(hash)))
    })
    .await?
}

/// Stores the node key's signature over `signing_bytes(receipt)`.
pub async fn set_signature(db: &Db, id: &str, zbase32: &str) -> Result<(), MoneyError> {
    let (id, sig) = (id.to_string(), zbase32.trim().to_string());
    if sig.is_empty() {
        return Err(MoneyError::Invalid {
            what: "signature",
            reason: "empty".into(),
        });
    }
    let n = db
        .call({
            let id = id.clone();
            move |c| {
                c.execute(
                    "UPDATE receipts SET signature = ?2 WHERE id = ?1",
                    params![id, sig],
                )
            }
        })
        .await?;
    if n == 0 {
        return Err(MoneyError::UnknownReceipt(id));
    }
    Ok(())
}

/// Sets the request/response hashes (an L402 call) of a receipt.
pub async fn set_body_hashes(
    db: &Db,
    id: &str,
    request_hash: Option<String>,
    response_hash: Option<String>,
) -> Result<(), MoneyError> {
    let id = id.to_string();
    db.call(move |c| {
        c.execute(
            "UPDATE receipts SET request_hash = COALESCE(?2, request_hash), \
             response_hash = COALESCE(?3, response_hash), signature = NULL WHERE id = ?1",
            params![id, request_hash, response_hash],
        )
    })
    .await?;
    Ok(())
}

/// Merges `extra` into a receipt's `meta` object (an L402 call's URL, method and status). Clears the signature,
/// like every change to a receipt: the wallet signs it again.
pub async fn merge_meta(db: &Db, id: &str, extra: Value) -> Result<(), MoneyError> {
    let id = id.to_string();
    db.call(move |c| {
        let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let current: Option<String> = tx
            .query_row("SELECT meta FROM receipts WHERE id = ?1", [&id], |r| {
                r.get(0)
            })
            .optional()?;
        if let Some(current) = current {
            let mut meta: Value = serde_json::from_str(&current).unwrap_or_else(|_| empty_object());
            if let (Value::Object(target), Value::Object(add)) = (&mut meta, extra) {
                target.extend(add);
            }
            tx.execute(
                "UPDATE receipts SET meta = ?2, signature = NULL WHERE id = ?1",
                params![id, canonical_json(&meta)],
            )?;
        }
        tx.commit()
    })
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::money::{BudgetPolicy, SpendRequest};

    fn sample() -> Receipt {
        Receipt {
            id: "01HZX0000000000000000000AA".into(),
            direction: Direction::Out,
            rail: Rail::Bolt11,
            amount_msat: 21_000,
            fee_msat: 12,
            counterparty: Some("02abc".into()),
            purpose: Some("api call \"quoted\"".into()),
            payment_hash: "66".repeat(32),
            preimage: Some(Preimage::new([9; 32])),
            preimage_sha256: Some("66".repeat(32)),
            request_hash: None,
            response_hash: None,
            status: ReceiptStatus::Succeeded,
            created_at: "2025-01-02T03:04:05.678Z".into(),
            settled_at: Some("2025-01-02T03:04:06.000Z".into()),
            signature: Some("d9abc".into()),
            permit_id: Some("01HZX0000000000000000000BB".into()),
            comment: None,
            meta: serde_json::json!({"z": 1, "a": {"y": [2, {"c": 3, "b": 4}], "x": null}}),
        }
    }

    #[test]
    fn canonical_json_sorts_keys_recursively_without_whitespace() {
        let v = serde_json::json!({"b": 1, "a": [true, {"d": "x y", "c": null}], "é": "\n"});
        assert_eq!(
            canonical_json(&v),
            r#"{"a":[true,{"c":null,"d":"x y"}],"b":1,"é":"\n"}"#
        );
    }

    #[test]
    fn signing_bytes_are_prefix_plus_canonical_json_without_signature() {
        let r = sample();
        let bytes = signing_bytes(&r);
        let text = String::from_utf8(bytes.clone()).unwrap();
        let expected = format!(
            "automaton-ln/receipt/v1\n{{\"amount_msat\":21000,\"comment\":null,\"counterparty\":\"02abc\",\
             \"created_at\":\"2025-01-02T03:04:05.678Z\",\"direction\":\"out\",\"fee_msat\":12,\
             \"id\":\"01HZX0000000000000000000AA\",\"meta\":{{\"a\":{{\"x\":null,\"y\":[2,{{\"b\":4,\"c\":3}}]}},\"z\":1}},\
             \"payment_hash\":\"{h}\",\"permit_id\":\"01HZX0000000000000000000BB\",\"preimage_sha256\":\"{h}\",\
             \"purpose\":\"api call \\\"quoted\\\"\",\"rail\":\"bolt11\",\"request_hash\":null,\"response_hash\":null,\
             \"settled_at\":\"2025-01-02T03:04:06.000Z\",\"status\":\"succeeded\"}}",
            h = "66".repeat(32)
        );
        assert_eq!(text, expected);
        // The signature is not part of what it signs; everything else is.
        let mut unsigned = r.clone();
        unsigned.signature = None;
        assert_eq!(signing_bytes(&unsigned), bytes);
        let mut changed = r.clone();
        changed.amount_msat += 1;
        assert_ne!(signing_bytes(&changed), bytes);
    }

    #[test]
    fn preimage_is_never_printed() {
        let r = sample();
        let secret = hex(&[9; 32]);
        assert!(!format!("{r:?}").contains(&secret));
        assert!(!r.to_json().to_string().contains(&secret));
        assert!(!String::from_utf8(signing_bytes(&r))
            .unwrap()
            .contains(&secret));
    }

    #[test]
    fn json_roundtrip_gives_the_same_signing_bytes_and_rejects_extra_fields() {
        let r = sample();
        let text = serde_json::to_string_pretty(&r.to_json()).unwrap();
        let back = from_json(&text).unwrap();
        assert_eq!(signing_bytes(&back), signing_bytes(&r));
        assert_eq!(back.signature.as_deref(), Some("d9abc"));
        let mut v = r.to_json();
        v["preimage"] = serde_json::json!("00");
        assert!(from_json(&v.to_string()).is_err());
        assert!(from_json("not json").is_err());
    }

    fn policy() -> BudgetPolicy {
        BudgetPolicy::new(Db::open_in_memory().unwrap(), Default::default())
    }

    fn spend(sats: u64) -> SpendRequest {
        SpendRequest {
            amount_msat: sats * 1000,
            max_fee_msat: 1000,
            rail: Rail::Bolt11,
            purpose: "test".into(),
            counterparty: Some("02ee".into()),
        }
    }

    #[tokio::test]
    async fn outgoing_lifecycle_and_no_double_payment() {
        let p = policy();
        let preimage = [3u8; 32];
        let hash = Preimage::new(preimage).sha256_hex();
        let permit = p.authorize(spend(10), None).await.unwrap();
        let r = record_pending_out(p.db(), &permit, &hash).await.unwrap();
        assert_eq!((r.status, r.amount_msat), (ReceiptStatus::Pending, 10_000));
        // Same permit again: the same receipt.
        assert_eq!(
            record_pending_out(p.db(), &permit, &hash).await.unwrap().id,
            r.id
        );
        // Another permit for the same hash while in flight: refused.
        let other = p.authorize(spend(10), None).await.unwrap();
        assert!(matches!(
            record_pending_out(p.db(), &other, &hash).await,
            Err(MoneyError::AlreadyInFlight { .. })
        ));
        // A wrong preimage is not proof.
        assert!(matches!(
            mark_succeeded(p.db(), &hash, Direction::Out, [4; 32], 5).await,
            Err(MoneyError::PreimageMismatch { .. })
        ));
        let done = mark_succeeded(p.db(), &hash, Direction::Out, preimage, 5)
            .await
            .unwrap();
        assert_eq!(done.status, ReceiptStatus::Succeeded);
        assert_eq!(done.payment_proof(), Some(hash.as_str()));
        assert_eq!(done.fee_msat, 5);
        // Twice is the same.
        let again = mark_succeeded(p.db(), &hash, Direction::Out, preimage, 5)
            .await
            .unwrap();
        assert_eq!(again, done);
        // A late failure does not undo proof of payment.
        let still = mark_failed(p.db(), &hash, Direction::Out, Some("late"))
            .await
            .unwrap();
        assert_eq!(still.status, ReceiptStatus::Succeeded);
        // Paying the same invoice again is refused.
        assert!(matches!(
            record_pending_out(p.db(), &other, &hash).await,
            Err(MoneyError::AlreadyPaid { .. })
        ));
        p.release(other).await.unwrap();
        p.settle(permit, 10_000, 5).await.unwrap();
        let snap = p.snapshot().await.unwrap();
        assert_eq!((snap.in_flight_sats, snap.spent_hour_sats), (0, 11));
    }

    #[tokio::test]
    async fn failed_payment_releases_and_can_be_retried() {
        let p = policy();
        let hash = "ab".repeat(32);
        let first = p.authorize(spend(10), None).await.unwrap();
        record_pending_out(p.db(), &first, &hash).await.unwrap();
        let failed = mark_failed(p.db(), &hash, Direction::Out, Some("no route"))
            .await
            .unwrap();
        assert_eq!(failed.status, ReceiptStatus::Failed);
        assert_eq!(failed.comment.as_deref(), Some("no route"));
        assert_eq!(p.snapshot().await.unwrap().spent_hour_sats, 0);
        let second = p.authorize(spend(10), None).await.unwrap();
        let retry = record_pending_out(p.db(), &second, &hash).await.unwrap();
        assert_eq!(retry.id, failed.id);
        assert_eq!(retry.status, ReceiptStatus::Pending);
        assert_eq!(retry.permit_id.as_deref(), Some(second.id()));
    }

    #[tokio::test]
    async fn incoming_is_idempotent_and_keeps_the_invoice_purpose() {
        let db = Db::open_in_memory().unwrap();
        let preimage = [5u8; 32];
        let hash = Preimage::new(preimage).sha256_hex();
        let pending = record_pending_in(
            &db,
            IncomingInvoice {
                payment_hash: hash.clone(),
                amount_msat: Some(50_000),
                purpose: Some("funding".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(pending.status, ReceiptStatus::Pending);
        let payment = IncomingPayment {
            payment_hash: hash.clone(),
            amount_msat: 50_000,
            preimage: Some(preimage),
            rail: Rail::Bolt11,
            counterparty: None,
            purpose: Some("other".into()),
            comment: Some("thanks".into()),
            meta: None,
        };
        let got = record_incoming(&db, payment.clone()).await.unwrap();
        assert_eq!(got.id, pending.id);
        assert_eq!(got.status, ReceiptStatus::Succeeded);
        assert_eq!(got.purpose.as_deref(), Some("funding"));
        assert_eq!(got.payment_proof(), Some(hash.as_str()));
        set_signature(&db, &got.id, "sig").await.unwrap();
        let twice = record_incoming(&db, payment).await.unwrap();
        assert_eq!(
            twice.signature.as_deref(),
            Some("sig"),
            "a duplicate event changes nothing"
        );
        let all = list(&db, ReceiptFilter::default()).await.unwrap();
        assert_eq!(all.len(), 1);
        let bad = IncomingPayment {
            payment_hash: "00".repeat(32),
            amount_msat: 1,
            preimage: Some([1; 32]),
            rail: Rail::Keysend,
            counterparty: None,
            purpose: None,
            comment: None,
            meta: None,
        };
        assert!(matches!(
            record_incoming(&db, bad).await,
            Err(MoneyError::PreimageMismatch { .. })
        ));
        assert!(matches!(
            get_by_hash(&db, "xyz", Direction::In).await,
            Err(MoneyError::Invalid { .. })
        ));
    }
}
