//! The lab chain against Bitcoin's rules: timelocks, double spends, signatures, maturity, proofs, reorgs,
//! restarts — all through its public HTTP faces, as ldk-node and the control API see it.

use std::str::FromStr;

use automaton_lab::chain::Chain;
use bitcoin::consensus::encode::{deserialize, serialize_hex};
use bitcoin::hashes::Hash;
use bitcoin::merkle_tree::MerkleBlock;
use bitcoin::opcodes::all::{OP_CSV, OP_DROP};
use bitcoin::opcodes::OP_TRUE;
use bitcoin::script::Builder;
use bitcoin::secp256k1::{Message, Secp256k1, SecretKey};
use bitcoin::sighash::{EcdsaSighashType, SighashCache};
use bitcoin::{
    absolute, transaction, Address, Amount, BlockHash, CompressedPublicKey, Network, OutPoint,
    ScriptBuf, Sequence, Transaction, TxIn, TxOut, Txid, Witness,
};
use serde_json::Value;

struct Lab {
    chain: Chain,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

async fn start() -> Lab {
    let dir = tempfile::tempdir().expect("temp dir");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let chain = Chain::start(dir.path(), listener)
        .await
        .expect("chain starts");
    chain.mine(101, None).await.expect("initial blocks");
    Lab {
        chain,
        http: reqwest::Client::new(),
        _dir: dir,
    }
}

impl Lab {
    async fn get_text(&self, path: &str) -> (u16, String) {
        let resp = self
            .http
            .get(format!("{}{path}", self.chain.esplora_url()))
            .send()
            .await
            .expect("GET");
        (resp.status().as_u16(), resp.text().await.expect("body"))
    }

    async fn get_json(&self, path: &str) -> Value {
        let (status, body) = self.get_text(path).await;
        assert_eq!(status, 200, "GET {path}: {body}");
        serde_json::from_str(&body).expect("json")
    }

    /// Broadcasts like ldk-node does; returns Ok(txid) or Err(reason) from a 400.
    async fn broadcast(&self, tx: &Transaction) -> Result<String, String> {
        let resp = self
            .http
            .post(format!("{}/tx", self.chain.esplora_url()))
            .body(serialize_hex(tx))
            .send()
            .await
            .expect("POST /tx");
        let ok = resp.status().is_success();
        let body = resp.text().await.expect("body");
        if ok {
            Ok(body)
        } else {
            Err(body)
        }
    }
}

/// A test wallet key.
struct Key {
    secret: SecretKey,
    public: CompressedPublicKey,
}

impl Key {
    fn new(byte: u8) -> Key {
        let secret = SecretKey::from_slice(&[byte; 32]).expect("key");
        let public = CompressedPublicKey(secret.public_key(&Secp256k1::new()));
        Key { secret, public }
    }
    fn address(&self) -> Address {
        Address::p2wpkh(&self.public, Network::Regtest)
    }
}

fn spend(prev: OutPoint, to: ScriptBuf, value: u64) -> Transaction {
    Transaction {
        version: transaction::Version::TWO,
        lock_time: absolute::LockTime::ZERO,
        input: vec![TxIn {
            previous_output: prev,
            script_sig: ScriptBuf::new(),
            sequence: Sequence::MAX,
            witness: Witness::new(),
        }],
        output: vec![TxOut {
            value: Amount::from_sat(value),
            script_pubkey: to,
        }],
    }
}

fn sign_p2wpkh(tx: &mut Transaction, key: &Key, prev_value: u64) {
    let script = key.address().script_pubkey();
    let sighash = SighashCache::new(&*tx)
        .p2wpkh_signature_hash(
            0,
            &script,
            Amount::from_sat(prev_value),
            EcdsaSighashType::All,
        )
        .expect("sighash");
    let signature = Secp256k1::new().sign_ecdsa(&Message::from(sighash), &key.secret);
    let signature = bitcoin::ecdsa::Signature {
        signature,
        sighash_type: EcdsaSighashType::All,
    };
    tx.input[0].witness = Witness::p2wpkh(&signature, &key.public.0);
}

/// Funds `script` with `sats` from the faucet and returns the outpoint (confirmed).
async fn fund(lab: &Lab, address: &Address, sats: u64) -> OutPoint {
    let txid = lab.chain.faucet(address, sats, true).await.expect("faucet");
    let tx = lab.get_json(&format!("/tx/{txid}")).await;
    let vout = tx["vout"]
        .as_array()
        .expect("vout")
        .iter()
        .position(|o| o["scriptpubkey"] == address.script_pubkey().to_hex_string())
        .expect("output to address");
    OutPoint {
        txid,
        vout: vout as u32,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn relative_timelock_is_enforced_to_the_block() {
    let lab = start().await;
    let delay = 5u16;
    let witness_script = Builder::new()
        .push_int(delay as i64)
        .push_opcode(OP_CSV)
        .push_opcode(OP_DROP)
        .push_opcode(OP_TRUE)
        .into_script();
    let address = Address::p2wsh(&witness_script, Network::Regtest);
    let coin = fund(&lab, &address, 100_000).await; // confirmed at the new tip
    let mut tx = spend(coin, Key::new(9).address().script_pubkey(), 99_000);
    tx.input[0].sequence = Sequence::from_height(delay);
    tx.input[0].witness = Witness::from_slice(&[witness_script.as_bytes()]);

    // The coin has 1 confirmation; the spend can be in a block only at depth `delay`.
    lab.chain
        .mine((delay - 2) as u32, None)
        .await
        .expect("mine");
    let early = lab
        .broadcast(&tx)
        .await
        .expect_err("one block early must be refused");
    assert!(early.contains("non-BIP68-final"), "{early}");

    lab.chain.mine(1, None).await.expect("mine");
    let txid = lab
        .broadcast(&tx)
        .await
        .expect("accepted at exactly the delay");
    assert_eq!(txid, tx.compute_txid().to_string());
    lab.chain.mine(1, None).await.expect("mine");
    let status = lab.get_json(&format!("/tx/{txid}/status")).await;
    assert_eq!(status["confirmed"], true);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_transactions_are_rejected_with_a_reason() {
    let lab = start().await;
    let alice = Key::new(1);
    let coin = fund(&lab, &alice.address(), 50_000).await;

    // A bad signature: signed by the wrong key.
    let mut forged = spend(coin, Key::new(2).address().script_pubkey(), 49_000);
    sign_p2wpkh(&mut forged, &Key::new(3), 50_000);
    let mut forged_witness = forged.input[0].witness.to_vec();
    forged_witness[1] = alice.public.to_bytes().to_vec(); // right pubkey, wrong signature
    forged.input[0].witness = Witness::from_slice(&forged_witness);
    let reason = lab.broadcast(&forged).await.expect_err("bad signature");
    assert!(
        reason.contains("mandatory-script-verify-flag-failed"),
        "{reason}"
    );

    // Inputs worth less than outputs.
    let mut greedy = spend(coin, Key::new(2).address().script_pubkey(), 60_000);
    sign_p2wpkh(&mut greedy, &alice, 50_000);
    let reason = lab
        .broadcast(&greedy)
        .await
        .expect_err("value out > value in");
    assert!(reason.contains("bad-txns-in-belowout"), "{reason}");

    // A non-final absolute lock time.
    let mut later = spend(coin, Key::new(2).address().script_pubkey(), 49_000);
    later.lock_time = absolute::LockTime::from_height(lab.chain.tip_height() + 5).expect("height");
    later.input[0].sequence = Sequence::ENABLE_LOCKTIME_NO_RBF;
    sign_p2wpkh(&mut later, &alice, 50_000);
    let reason = lab.broadcast(&later).await.expect_err("non-final");
    assert!(reason.contains("non-final"), "{reason}");

    // A good spend, then a double spend of the same coin.
    let mut first = spend(coin, Key::new(2).address().script_pubkey(), 49_000);
    sign_p2wpkh(&mut first, &alice, 50_000);
    lab.broadcast(&first).await.expect("valid spend");
    // A rebroadcast of a known transaction is not an error (LDK rebroadcasts).
    lab.broadcast(&first).await.expect("rebroadcast");
    let mut second = spend(coin, Key::new(4).address().script_pubkey(), 48_000);
    sign_p2wpkh(&mut second, &alice, 50_000);
    let reason = lab.broadcast(&second).await.expect_err("double spend");
    assert!(reason.contains("txn-mempool-conflict"), "{reason}");
    lab.chain.mine(1, None).await.expect("mine");
    let reason = lab
        .broadcast(&second)
        .await
        .expect_err("double spend of a confirmed spend");
    assert!(reason.contains("missingorspent"), "{reason}");

    // An immature coinbase.
    let miner = Key::new(5);
    let hashes = lab
        .chain
        .mine(1, Some(miner.address()))
        .await
        .expect("mine to key");
    let block_txids: Value = lab.get_json(&format!("/block/{}/txids", hashes[0])).await;
    let coinbase = Txid::from_str(block_txids[0].as_str().expect("txid")).expect("txid");
    let mut premature = spend(
        OutPoint {
            txid: coinbase,
            vout: 0,
        },
        Key::new(2).address().script_pubkey(),
        1_000_000,
    );
    sign_p2wpkh(&mut premature, &miner, 50 * 100_000_000);
    let reason = lab
        .broadcast(&premature)
        .await
        .expect_err("immature coinbase");
    assert!(reason.contains("premature-spend-of-coinbase"), "{reason}");

    // Garbage is refused without harm.
    let resp = lab
        .http
        .post(format!("{}/tx", lab.chain.esplora_url()))
        .body("zz")
        .send()
        .await
        .expect("post");
    assert_eq!(resp.status().as_u16(), 400);
}

#[tokio::test(flavor = "multi_thread")]
async fn merkle_proofs_headers_and_history_are_real() {
    let lab = start().await;
    let key = Key::new(7);
    let coin = fund(&lab, &key.address(), 70_000).await;
    let status = lab.get_json(&format!("/tx/{}/status", coin.txid)).await;
    let block_hash =
        BlockHash::from_str(status["block_hash"].as_str().expect("hash")).expect("hash");

    let (code, proof_hex) = lab
        .get_text(&format!("/tx/{}/merkleblock-proof", coin.txid))
        .await;
    assert_eq!(code, 200);
    let proof: MerkleBlock =
        deserialize(&hex::decode(proof_hex.trim()).expect("hex")).expect("merkleblock");
    assert_eq!(proof.header.block_hash(), block_hash);
    let mut matches = Vec::new();
    let mut indexes = Vec::new();
    let root = proof
        .txn
        .extract_matches(&mut matches, &mut indexes)
        .expect("valid partial tree");
    assert_eq!(root, proof.header.merkle_root);
    assert_eq!(matches, vec![coin.txid]);

    let (_, header_hex) = lab.get_text(&format!("/block/{block_hash}/header")).await;
    let header: bitcoin::block::Header =
        deserialize(&hex::decode(header_hex.trim()).expect("hex")).expect("header");
    assert_eq!(header.block_hash(), block_hash);
    let (_, raw) = {
        let resp = lab
            .http
            .get(format!("{}/tx/{}/raw", lab.chain.esplora_url(), coin.txid))
            .send()
            .await
            .expect("raw");
        (resp.status(), resp.bytes().await.expect("bytes"))
    };
    let tx: Transaction = deserialize(&raw).expect("raw tx");
    assert_eq!(tx.compute_txid(), coin.txid);

    // An unconfirmed transaction has no proof yet.
    let mut pending = spend(coin, Key::new(8).address().script_pubkey(), 69_000);
    sign_p2wpkh(&mut pending, &key, 70_000);
    let pending_txid = lab.broadcast(&pending).await.expect("spend");
    let (code, _) = lab
        .get_text(&format!("/tx/{pending_txid}/merkleblock-proof"))
        .await;
    assert_eq!(code, 404);

    // Script history: the mempool spend first, then the confirmed funding.
    let sh = bitcoin::hashes::sha256::Hash::hash(key.address().script_pubkey().as_bytes());
    let history = lab
        .get_json(&format!(
            "/scripthash/{}/txs",
            hex::encode(sh.to_byte_array())
        ))
        .await;
    let ids: Vec<&str> = history
        .as_array()
        .expect("list")
        .iter()
        .map(|t| t["txid"].as_str().expect("txid"))
        .collect();
    assert_eq!(
        ids,
        vec![pending_txid.as_str(), coin.txid.to_string().as_str()]
    );
    let outspend = lab
        .get_json(&format!("/tx/{}/outspend/{}", coin.txid, coin.vout))
        .await;
    assert_eq!(outspend["spent"], true);
    assert_eq!(outspend["txid"], pending_txid);

    // The best chain links, and /block-height agrees with /blocks.
    let blocks = lab.get_json("/blocks").await;
    let blocks = blocks.as_array().expect("blocks");
    assert_eq!(blocks.len(), 10);
    for pair in blocks.windows(2) {
        assert_eq!(pair[0]["previousblockhash"], pair[1]["id"]);
        assert_eq!(
            pair[0]["height"].as_u64().expect("h"),
            pair[1]["height"].as_u64().expect("h") + 1
        );
    }
    let tip = blocks[0]["height"].as_u64().expect("h");
    let (_, at_tip) = lab.get_text(&format!("/block-height/{tip}")).await;
    assert_eq!(at_tip, blocks[0]["id"].as_str().expect("id"));
    let (code, _) = lab.get_text(&format!("/block-height/{}", tip + 1)).await;
    assert_eq!(code, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reorg_replaces_blocks_and_returns_transactions_to_the_mempool() {
    let lab = start().await;
    let key = Key::new(11);
    let coin = fund(&lab, &key.address(), 80_000).await;
    let mut tx = spend(coin, Key::new(12).address().script_pubkey(), 79_000);
    sign_p2wpkh(&mut tx, &key, 80_000);
    let txid = lab.broadcast(&tx).await.expect("spend");
    let mined = lab.chain.mine(2, None).await.expect("mine");
    let height_before = lab.chain.tip_height();
    assert_eq!(
        lab.get_json(&format!("/tx/{txid}/status")).await["confirmed"],
        true
    );

    let branch = lab.chain.reorg(2).await.expect("reorg");
    assert_eq!(branch.len(), 3);
    assert_eq!(lab.chain.tip_height(), height_before + 1);
    for stale in &mined {
        let status = lab.get_json(&format!("/block/{stale}/status")).await;
        assert_eq!(status["in_best_chain"], false, "stale block {stale}");
    }
    let (_, at) = lab
        .get_text(&format!("/block-height/{}", height_before))
        .await;
    assert_eq!(at, branch[1].to_string());
    let fork = lab.get_json(&format!("/block/{}/status", branch[0])).await;
    assert_eq!(fork["next_best"], branch[1].to_string());
    // The spend was in a dropped block: it is back in the mempool, unconfirmed.
    assert_eq!(
        lab.get_json(&format!("/tx/{txid}/status")).await["confirmed"],
        false
    );
    lab.chain.mine(1, None).await.expect("mine");
    assert_eq!(
        lab.get_json(&format!("/tx/{txid}/status")).await["confirmed"],
        true
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_chain_resumes_where_it_stopped() {
    let dir = tempfile::tempdir().expect("temp dir");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let chain = Chain::start(dir.path(), listener).await.expect("start");
    chain.mine(120, None).await.expect("mine");
    let address = Key::new(13).address();
    let txid = chain.faucet(&address, 12_345, true).await.expect("faucet");
    let tip = chain.tip_height();
    chain.shutdown().await;
    drop(chain);

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let chain = Chain::start(dir.path(), listener).await.expect("restart");
    assert_eq!(chain.tip_height(), tip);
    let body: Value = reqwest::get(format!("{}/tx/{txid}", chain.esplora_url()))
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    assert_eq!(body["status"]["confirmed"], true);
    chain
        .mine(1, None)
        .await
        .expect("the restarted chain still mines");
}

#[tokio::test(flavor = "multi_thread")]
async fn subsidy_halves_every_150_blocks() {
    assert_eq!(
        automaton_lab::chain::miner::block_subsidy(149),
        50 * 100_000_000
    );
    assert_eq!(
        automaton_lab::chain::miner::block_subsidy(150),
        25 * 100_000_000
    );
    let lab = start().await;
    lab.chain.mine(50, None).await.expect("mine to 151");
    let hash = lab.get_text("/block-height/151").await.1;
    let txids = lab.get_json(&format!("/block/{hash}/txids")).await;
    let coinbase = lab
        .get_json(&format!("/tx/{}", txids[0].as_str().expect("txid")))
        .await;
    assert_eq!(coinbase["vout"][0]["value"], 25 * 100_000_000u64);
    assert_eq!(coinbase["vin"][0]["is_coinbase"], true);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_block_the_kernel_rejects_is_never_served() {
    let lab = start().await;
    let tip = lab.chain.tip_height();
    // A coinbase claiming one BTC more than subsidy + fees: only consensus code can tell.
    let mut greedy = lab.chain.next_template();
    greedy.fees = 100_000_000;
    let block = automaton_lab::chain::miner::assemble(greedy);
    let hash = block.block_hash();
    let err = lab
        .chain
        .submit_block(block)
        .await
        .expect_err("overpaying coinbase");
    assert!(err.to_string().contains("rejected"), "{err}");
    assert_eq!(lab.chain.tip_height(), tip);
    let (code, _) = lab.get_text(&format!("/block/{hash}/status")).await;
    assert_eq!(code, 404);

    // A timestamp more than two hours ahead is refused too; an honest block is accepted.
    let mut future = lab.chain.next_template();
    future.time += 3 * 3600;
    assert!(lab
        .chain
        .submit_block(automaton_lab::chain::miner::assemble(future))
        .await
        .is_err());
    let honest = automaton_lab::chain::miner::assemble(lab.chain.next_template());
    let hash = lab.chain.submit_block(honest).await.expect("valid block");
    assert_eq!(lab.chain.tip_height(), tip + 1);
    let status = lab.get_json(&format!("/block/{hash}/status")).await;
    assert_eq!(status["in_best_chain"], true);
}

#[tokio::test(flavor = "multi_thread")]
async fn time_based_relative_locks_follow_median_time_past() {
    let lab = start().await;
    let witness_script = Builder::new()
        .push_int(Sequence::from_512_second_intervals(2).0 as i64)
        .push_opcode(OP_CSV)
        .push_opcode(OP_DROP)
        .push_opcode(OP_TRUE)
        .into_script();
    let address = Address::p2wsh(&witness_script, Network::Regtest);
    let coin = fund(&lab, &address, 100_000).await;
    let mut tx = spend(coin, Key::new(21).address().script_pubkey(), 99_000);
    tx.input[0].sequence = Sequence::from_512_second_intervals(2);
    tx.input[0].witness = Witness::from_slice(&[witness_script.as_bytes()]);
    let reason = lab
        .broadcast(&tx)
        .await
        .expect_err("1024 s have not passed");
    assert!(reason.contains("non-BIP68-final"), "{reason}");

    // Block times jump ahead, but the median of the last 11 lags: three new blocks are not enough.
    lab.chain.advance_time(2_000).expect("advance");
    lab.chain.mine(3, None).await.expect("mine");
    let reason = lab
        .broadcast(&tx)
        .await
        .expect_err("median-time-past still behind");
    assert!(reason.contains("non-BIP68-final"), "{reason}");
    lab.chain.mine(4, None).await.expect("mine");
    lab.broadcast(&tx)
        .await
        .expect("median-time-past has passed the lock");
    assert!(
        lab.chain.advance_time(10_000).is_err(),
        "the kernel would refuse blocks that far ahead"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn fault_switches_make_the_chain_source_flaky_on_demand() {
    let lab = start().await;
    lab.chain.set_faults(automaton_lab::chain::Faults {
        error_status: Some(503),
        error_count: 2,
        empty_fee_estimates: true,
        proof_lag_blocks: 1,
        ..Default::default()
    });
    assert_eq!(lab.get_text("/blocks/tip/height").await.0, 503);
    assert_eq!(lab.get_text("/blocks/tip/height").await.0, 503);
    assert_eq!(lab.get_text("/blocks/tip/height").await.0, 200);
    assert_eq!(lab.get_json("/fee-estimates").await, serde_json::json!({}));
    let coin = fund(&lab, &Key::new(22).address(), 10_000).await;
    assert_eq!(
        lab.get_text(&format!("/tx/{}/merkleblock-proof", coin.txid))
            .await
            .0,
        404
    );
    lab.chain.mine(1, None).await.expect("mine");
    assert_eq!(
        lab.get_text(&format!("/tx/{}/merkleblock-proof", coin.txid))
            .await
            .0,
        200
    );
    lab.chain.set_faults(Default::default());
    let estimates = lab.get_json("/fee-estimates").await;
    assert_eq!(estimates["1"], 1.0);
}
