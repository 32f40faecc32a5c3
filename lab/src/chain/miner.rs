//! Block assembly: coinbase with BIP34 height and BIP141 witness commitment, regtest proof of work.

use bitcoin::block::{Header, Version};
use bitcoin::hashes::Hash;
use bitcoin::script::{Builder, PushBytesBuf};
use bitcoin::{
    absolute, transaction, Amount, Block, BlockHash, CompactTarget, OutPoint, ScriptBuf, Sequence,
    Transaction, TxIn, TxMerkleNode, TxOut, Witness,
};

/// Regtest's proof-of-work limit (`powLimit` in compact form).
const REGTEST_BITS: u32 = 0x207f_ffff;
/// Regtest halves the subsidy every 150 blocks.
const HALVING_INTERVAL: u32 = 150;

pub fn block_subsidy(height: u32) -> u64 {
    let halvings = height / HALVING_INTERVAL;
    if halvings >= 64 {
        0
    } else {
        (50 * 100_000_000u64) >> halvings
    }
}

/// Everything that decides a block's content.
pub struct Template {
    pub prev: BlockHash,
    pub height: u32,
    pub time: u32,
    pub transactions: Vec<Transaction>,
    pub fees: u64,
    pub payout: ScriptBuf,
    /// Extra coinbase bytes so two blocks at one height (a reorg) never collide.
    pub tag: u64,
}

pub fn assemble(template: Template) -> Block {
    let mut tag = PushBytesBuf::new();
    let _ = tag.extend_from_slice(&template.tag.to_le_bytes());
    let script_sig = Builder::new()
        .push_int(template.height as i64)
        .push_slice(tag)
        .into_script();
    let coinbase = Transaction {
        version: transaction::Version::TWO,
        lock_time: absolute::LockTime::ZERO,
        input: vec![TxIn {
            previous_output: OutPoint::null(),
            script_sig,
            sequence: Sequence::MAX,
            witness: Witness::from_slice(&[[0u8; 32]]),
        }],
        output: vec![TxOut {
            value: Amount::from_sat(block_subsidy(template.height) + template.fees),
            script_pubkey: template.payout,
        }],
    };
    let mut txdata = Vec::with_capacity(template.transactions.len() + 1);
    txdata.push(coinbase);
    txdata.extend(template.transactions);
    let mut block = Block {
        header: Header {
            version: Version::from_consensus(0x2000_0000),
            prev_blockhash: template.prev,
            merkle_root: TxMerkleNode::all_zeros(),
            time: template.time,
            bits: CompactTarget::from_consensus(REGTEST_BITS),
            nonce: 0,
        },
        txdata,
    };
    if let Some(witness_root) = block.witness_root() {
        let commitment = Block::compute_witness_commitment(&witness_root, &[0u8; 32]);
        let mut data = PushBytesBuf::new();
        let _ = data.extend_from_slice(&[0xaa, 0x21, 0xa9, 0xed]);
        let _ = data.extend_from_slice(commitment.as_byte_array());
        let script = Builder::new()
            .push_opcode(bitcoin::opcodes::all::OP_RETURN)
            .push_slice(data)
            .into_script();
        block.txdata[0].output.push(TxOut {
            value: Amount::ZERO,
            script_pubkey: script,
        });
    }
    block.header.merkle_root = block
        .compute_merkle_root()
        .unwrap_or_else(TxMerkleNode::all_zeros);
    while block.header.validate_pow(block.header.target()).is_err() {
        block.header.nonce = block.header.nonce.wrapping_add(1);
    }
    block
}
