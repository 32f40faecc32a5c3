//! The lab's Lightning world against a real outside ldk-node (configured as the agent configures its wallet):
//! JIT channel from the hub's LSPS2 service, paying the merchant through the hub, a force close whose sweep waits
//! for `to_self_delay`, a reorg seen by the node, LNURL-pay from the creator, the control API, lab.json and `up`.

mod common;

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use automaton_lab::world::{self, LabJson, World};
use axum::extract::{Path, Query, State};
use axum::routing::get;
use axum::{Json, Router};
use common::{poll, Agent, Control, CHAIN_LOCK};
use ldk_node::bitcoin::hashes::{sha256, Hash};
use ldk_node::lightning::chain::channelmonitor::BalanceSource;
use ldk_node::lightning_invoice::{Bolt11Invoice, Bolt11InvoiceDescription, Description};
use ldk_node::payment::{ConfirmationStatus, PaymentKind};
use ldk_node::{Event, LightningBalance};
use serde_json::{json, Value};

/// The `to_self_delay` the hub imposes on its channel partners' own outputs (LDK's default, 144 blocks).
const HUB_TO_SELF_DELAY: u32 = 144;

async fn esplora(world: &World, path: &str) -> Value {
    let url = format!("{}{path}", world.esplora_url());
    reqwest::get(&url)
        .await
        .expect("esplora GET")
        .json()
        .await
        .expect("esplora JSON")
}

async fn esplora_text(world: &World, path: &str) -> String {
    let url = format!("{}{path}", world.esplora_url());
    reqwest::get(&url)
        .await
        .expect("esplora GET")
        .text()
        .await
        .expect("esplora text")
}

fn sha256_hex(hex_preimage: &str) -> String {
    let bytes = hex::decode(hex_preimage).expect("hex preimage");
    sha256::Hash::hash(&bytes).to_string()
}

/// Has the creator pay a JIT invoice of `agent` for `amount_msat`; returns what the agent received.
async fn fund_via_jit_channel(control: &Control, agent: &Agent, amount_msat: u64) -> u64 {
    let description = Bolt11InvoiceDescription::Direct(Description::new("fund me".into()).unwrap());
    let invoice = agent
        .node
        .bolt11_payment()
        .receive_via_jit_channel(amount_msat, &description, 3600, None)
        .expect("JIT invoice from the hub's LSPS2 service");
    let paid = control
        .ok("/lab/creator/pay", json!({ "bolt11": invoice.to_string() }))
        .await;
    assert_eq!(paid["payment_hash"], invoice.payment_hash().to_string());
    assert_eq!(
        sha256_hex(paid["preimage"].as_str().unwrap()),
        invoice.payment_hash().to_string()
    );
    let received = agent
        .expect_event("PaymentReceived", |e| {
            matches!(e, Event::PaymentReceived { .. })
        })
        .await;
    let Event::PaymentReceived {
        amount_msat: got, ..
    } = received
    else {
        unreachable!()
    };
    got
}

/// Waits until the funding output of `funding` is spent and returns the spending (commitment) txid.
async fn commitment_spending(world: &World, funding: ldk_node::bitcoin::OutPoint) -> String {
    poll(Duration::from_secs(30), "commitment broadcast", || async {
        let spend = esplora(
            world,
            &format!("/tx/{}/outspend/{}", funding.txid, funding.vout),
        )
        .await;
        spend["spent"]
            .as_bool()
            .unwrap_or(false)
            .then(|| spend["txid"].as_str().unwrap().to_string())
    })
    .await
}

fn awaiting(agent: &Agent, wanted: BalanceSource) -> Option<(u64, u32)> {
    agent
        .node
        .list_balances()
        .lightning_balances
        .iter()
        .find_map(|b| match b {
            LightningBalance::ClaimableAwaitingConfirmations {
                amount_satoshis,
                confirmation_height,
                source,
                ..
            } if *source == wanted => Some((*amount_satoshis, *confirmation_height)),
            _ => None,
        })
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_gets_a_jit_channel_pays_the_merchant_and_force_closes() {
    let world = world::shared();
    let control = Control::new(world);
    let _chain = CHAIN_LOCK.lock().await;

    // The agent syncs from the lab chain.
    let agent = Agent::start(world);
    agent.sync();
    assert_eq!(
        agent.node.status().current_best_block.height,
        world.chain().tip_height()
    );
    assert!(
        agent.node.list_channels().is_empty(),
        "a fresh agent has no channels"
    );

    // The creator pays the agent's JIT invoice; the hub opens a channel to the agent via LSPS2, taking its 1%
    // opening fee (1,000 sats here; the minimum is 500 sats).
    let received = fund_via_jit_channel(&control, &agent, 100_000_000).await;
    assert_eq!(received, 99_000_000);
    let channels = agent.node.list_channels();
    assert_eq!(channels.len(), 1);
    let jit = &channels[0];
    assert_eq!(jit.counterparty_node_id.to_string(), world.lsp().node_id);
    assert!(!jit.is_outbound);
    // Over-provisioned: three times the forwarded amount, so the agent can also receive ~198k sats more.
    assert_eq!(jit.channel_value_sats, 297_000);
    assert!(
        jit.inbound_capacity_msat > 150_000_000,
        "inbound {}",
        jit.inbound_capacity_msat
    );

    // The agent pays the merchant through the hub.
    let created = control
        .ok(
            "/lab/merchant/invoice",
            json!({ "msat": 20_000_000, "memo": "lab vps" }),
        )
        .await;
    let merchant_invoice = Bolt11Invoice::from_str(created["bolt11"].as_str().unwrap()).unwrap();
    let payment_id = agent
        .node
        .bolt11_payment()
        .send(&merchant_invoice, None)
        .expect("send");
    let success = agent
        .expect_event("PaymentSuccessful", |e| {
            matches!(e, Event::PaymentSuccessful { payment_id: Some(id), .. } if *id == payment_id)
        })
        .await;
    let Event::PaymentSuccessful {
        payment_preimage: Some(preimage),
        ..
    } = success
    else {
        panic!("no preimage in {success:?}")
    };
    let hash = created["payment_hash"].as_str().unwrap();
    // The merchant's node records its claim a moment after it released the preimage.
    let invoice_status = poll(
        Duration::from_secs(10),
        "the merchant records the payment",
        || async {
            let (status, invoice_status) =
                control.get(&format!("/lab/merchant/invoice/{hash}")).await;
            assert_eq!(status, 200);
            (invoice_status["paid"] == true).then_some(invoice_status)
        },
    )
    .await;
    assert_eq!(invoice_status["preimage"], hex::encode(preimage.0));

    // The agent force-closes. It trusts the hub (no anchor reserve of its own), so ldk-node leaves the broadcast
    // to the hub, which publishes its commitment when told; the agent's balance comes back on chain.
    control.mine(6).await;
    agent.sync();
    let channel = agent.node.list_channels().remove(0);
    let funding = channel.funding_txo.expect("funded channel");
    let lightning_before = agent.node.list_balances().total_lightning_balance_sats;
    agent
        .node
        .force_close_channel(&channel.user_channel_id, channel.counterparty_node_id, None)
        .expect("force close");
    agent
        .expect_event("ChannelClosed", |e| {
            matches!(e, Event::ChannelClosed { .. })
        })
        .await;
    let commitment = commitment_spending(world, funding).await;
    control.mine(1).await;
    agent.sync();
    let status = esplora(world, &format!("/tx/{commitment}/status")).await;
    assert_eq!(status["confirmed"], true);
    let (amount, _) = awaiting(&agent, BalanceSource::CounterpartyForceClosed)
        .expect("the agent's balance on the hub's commitment");
    assert!(
        amount + 1_000 >= lightning_before.min(amount + 1_000),
        "claimable {amount}"
    );
    let swept = poll(Duration::from_secs(60), "agent sweeps its balance", || {
        let control = &control;
        let agent = &agent;
        async move {
            control.mine(1).await;
            agent.sync();
            let onchain = agent.node.list_balances().spendable_onchain_balance_sats;
            (onchain > 0).then_some(onchain)
        }
    })
    .await;
    assert!(
        swept > amount - 5_000 && swept <= amount,
        "swept {swept} of {amount}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn lsps2_terms_cover_payments_from_2k_to_5m_sats() {
    let world = world::shared();
    let control = Control::new(world);
    let description = Bolt11InvoiceDescription::Direct(Description::new("terms".into()).unwrap());

    // The smallest payment the hub accepts still opens a channel that works: 500 sats fee, 1,500 forwarded.
    let small = Agent::start(world);
    small.sync();
    assert_eq!(
        fund_via_jit_channel(&control, &small, 2_000_000).await,
        1_500_000
    );
    assert_eq!(small.node.list_channels()[0].channel_value_sats, 4_500);

    // The largest: 1% fee, a 14,850,000-sat channel (under the non-wumbo limit).
    let large = Agent::start(world);
    large.sync();
    assert_eq!(
        fund_via_jit_channel(&control, &large, 5_000_000_000).await,
        4_950_000_000
    );
    assert_eq!(large.node.list_channels()[0].channel_value_sats, 14_850_000);

    // Outside the terms the LSP refuses up front.
    let outside = Agent::start(world);
    outside.sync();
    for msat in [1_999_000, 5_000_001_000] {
        let refused =
            outside
                .node
                .bolt11_payment()
                .receive_via_jit_channel(msat, &description, 3600, None);
        assert!(refused.is_err(), "{msat} msat was accepted");
    }
}

/// JIT opens at the same moment each get their own coins from the hub: every funding transaction confirms.
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_jit_opens_all_confirm() {
    let world = world::shared();
    let control = Control::new(world);
    let _chain = CHAIN_LOCK.lock().await;
    let description = Bolt11InvoiceDescription::Direct(Description::new("at once".into()).unwrap());
    let agents: Vec<Agent> = (0..4)
        .map(|_| {
            let agent = Agent::start(world);
            agent.sync();
            agent
        })
        .collect();
    let payments: Vec<_> = agents
        .iter()
        .map(|agent| {
            let invoice = agent
                .node
                .bolt11_payment()
                .receive_via_jit_channel(30_000_000, &description, 3600, None)
                .expect("JIT invoice")
                .to_string();
            let url = format!("{}/lab/creator/pay", world.control_url());
            tokio::spawn(async move {
                let resp = reqwest::Client::new()
                    .post(url)
                    .json(&json!({ "bolt11": invoice }))
                    .send()
                    .await
                    .expect("pay");
                (
                    resp.status().as_u16(),
                    resp.text().await.unwrap_or_default(),
                )
            })
        })
        .collect();
    for payment in payments {
        let (status, body) = payment.await.unwrap();
        assert_eq!(status, 200, "{body}");
    }
    // The hub broadcasts each funding a moment after its payment: all of them are in the mempool before mining.
    let mempool = format!("{}/mempool/txids", world.lab_json().esplora_url);
    poll(
        Duration::from_secs(30),
        "the JIT fundings reach the mempool",
        || async {
            let txids: Vec<String> = reqwest::get(&mempool).await.ok()?.json().await.ok()?;
            agents
                .iter()
                .all(|agent| {
                    agent.node.list_channels().first().is_some_and(|c| {
                        c.funding_txo
                            .is_some_and(|o| txids.contains(&o.txid.to_string()))
                    })
                })
                .then_some(())
        },
    )
    .await;
    control.mine(6).await;
    let mut fundings = Vec::new();
    for agent in &agents {
        agent.sync();
        let channel = agent.node.list_channels().remove(0);
        assert_eq!(
            channel.confirmations,
            Some(6),
            "a JIT funding did not confirm"
        );
        fundings.push(channel.funding_txo.unwrap().txid);
    }
    fundings.sort();
    fundings.dedup();
    assert_eq!(fundings.len(), agents.len());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_force_close_sweep_waits_for_to_self_delay() {
    let world = world::shared();
    let control = Control::new(world);
    let _chain = CHAIN_LOCK.lock().await;

    // An agent holding its own anchor reserve publishes its own commitment (with a CPFP child if needed).
    let agent = Agent::start_with(world, false);
    let address = agent.node.onchain_payment().new_address().unwrap();
    control
        .ok(
            "/lab/faucet",
            json!({ "address": address.to_string(), "sats": 100_000 }),
        )
        .await;
    agent.sync();
    let onchain_before = agent.node.list_balances().spendable_onchain_balance_sats;
    assert_eq!(onchain_before, 100_000);
    fund_via_jit_channel(&control, &agent, 50_000_000).await;
    control.mine(6).await;
    agent.sync();

    let channel = agent.node.list_channels().remove(0);
    let funding = channel.funding_txo.expect("funded channel");
    // Disconnected first, so the hub learns of the close from the chain instead of racing its own commitment.
    agent
        .node
        .disconnect(channel.counterparty_node_id)
        .expect("disconnect from the hub");
    agent
        .node
        .force_close_channel(&channel.user_channel_id, channel.counterparty_node_id, None)
        .expect("force close");
    agent
        .expect_event("ChannelClosed", |e| {
            matches!(e, Event::ChannelClosed { .. })
        })
        .await;
    let commitment = commitment_spending(world, funding).await;
    control.mine(1).await;
    agent.sync();
    let status = esplora(world, &format!("/tx/{commitment}/status")).await;
    assert_eq!(status["confirmed"], true);
    let confirmed_at = status["block_height"].as_u64().unwrap() as u32;

    // The agent's own output waits for the to_self_delay the hub imposed.
    let (to_local_sats, claimable_at) = awaiting(&agent, BalanceSource::HolderForceClosed)
        .expect("a balance awaiting the CSV delay");
    assert!(
        claimable_at >= confirmed_at + HUB_TO_SELF_DELAY - 1,
        "claimable at {claimable_at}"
    );
    let commitment_tx = esplora(world, &format!("/tx/{commitment}")).await;
    let to_local_vout = commitment_tx["vout"]
        .as_array()
        .unwrap()
        .iter()
        .position(|o| o["value"].as_u64() == Some(to_local_sats))
        .expect("the agent's to_local output");

    // One block short of the delay nothing may spend it (the chain refuses an early CSV spend).
    let early_tip = confirmed_at + HUB_TO_SELF_DELAY - 2;
    control.mine(early_tip - world.chain().tip_height()).await;
    agent.sync();
    agent.sync();
    let spend = esplora(world, &format!("/tx/{commitment}/outspend/{to_local_vout}")).await;
    assert_eq!(spend["spent"], false, "swept before to_self_delay: {spend}");

    // From then on the sweep goes through and confirms no earlier than to_self_delay blocks after the close.
    let mut swept_at = None;
    for _ in 0..20 {
        control.mine(1).await;
        agent.sync();
        let spend = esplora(world, &format!("/tx/{commitment}/outspend/{to_local_vout}")).await;
        if spend["status"]["confirmed"] == true {
            swept_at = spend["status"]["block_height"].as_u64();
            break;
        }
    }
    let swept_at =
        swept_at.expect("the agent swept its output within 20 blocks of maturity") as u32;
    assert!(
        swept_at >= confirmed_at + HUB_TO_SELF_DELAY,
        "swept at {swept_at}, closed at {confirmed_at}"
    );
    agent.sync();
    let onchain = agent.node.list_balances().spendable_onchain_balance_sats;
    assert!(
        onchain > onchain_before,
        "on-chain {onchain} after the sweep"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_two_block_reorg_unconfirms_a_transaction_for_ldk_node() {
    let world = world::shared();
    let control = Control::new(world);
    let _chain = CHAIN_LOCK.lock().await;
    let agent = Agent::start(world);
    agent.sync();

    let address = agent.node.onchain_payment().new_address().unwrap();
    let faucet = control
        .ok(
            "/lab/faucet",
            json!({ "address": address.to_string(), "sats": 50_000 }),
        )
        .await;
    let txid = faucet["txid"].as_str().unwrap().to_string();
    agent.sync();
    let onchain_status = |agent: &Agent| {
        agent
            .node
            .list_payments()
            .into_iter()
            .find_map(|p| match p.kind {
                PaymentKind::Onchain { txid: t, status } if t.to_string() == txid => Some(status),
                _ => None,
            })
    };
    let Some(ConfirmationStatus::Confirmed {
        block_hash: old_block,
        ..
    }) = onchain_status(&agent)
    else {
        panic!(
            "faucet payment not confirmed for the agent: {:?}",
            onchain_status(&agent)
        )
    };
    assert_eq!(
        agent.node.list_balances().spendable_onchain_balance_sats,
        50_000
    );

    let reorg = control.ok("/lab/reorg", json!({ "depth": 2 })).await;
    assert!(reorg
        .to_string()
        .contains(&esplora_text(world, "/blocks/tip/hash").await));
    agent.sync();

    // The node follows the new best chain: its best block is the new tip, the transaction is back to unconfirmed
    // and no longer counts as spendable.
    let tip_hash = esplora_text(world, "/blocks/tip/hash").await;
    assert_eq!(
        agent
            .node
            .status()
            .current_best_block
            .block_hash
            .to_string(),
        tip_hash
    );
    assert_eq!(
        onchain_status(&agent),
        Some(ConfirmationStatus::Unconfirmed)
    );
    let balances = agent.node.list_balances();
    assert_eq!(balances.spendable_onchain_balance_sats, 0);
    assert_eq!(balances.total_onchain_balance_sats, 50_000);
    let old = esplora(world, &format!("/block/{old_block}/status")).await;
    assert_eq!(old["in_best_chain"], false);

    // Mined again on the new chain, it confirms again.
    control.mine(1).await;
    agent.sync();
    assert!(matches!(
        onchain_status(&agent),
        Some(ConfirmationStatus::Confirmed { .. })
    ));
    assert_eq!(
        agent.node.list_balances().spendable_onchain_balance_sats,
        50_000
    );
}

/// A LUD-06/16 service double backed by the merchant's invoices, with misbehaving names for the refusals.
#[derive(Clone)]
struct LnurlService {
    base: String,
    control: String,
    comments: Arc<Mutex<Vec<String>>>,
}

fn metadata(name: &str, host: &str) -> String {
    // Unicode and a non-string item: the hash must be over the raw string, not a re-serialisation.
    format!(
        r#"[["text/plain","Pay {name} ☕ \u00e9"],["text/identifier","{name}@{host}"],["x-extra",{{"n":1}}]]"#
    )
}

async fn lnurl_first(State(svc): State<LnurlService>, Path(name): Path<String>) -> Json<Value> {
    if name == "closed" {
        return Json(json!({ "status": "ERROR", "reason": "this wallet is closed" }));
    }
    let host = svc.base.trim_start_matches("http://");
    Json(json!({
        "tag": "payRequest",
        "callback": format!("{}/lnurlp/cb/{name}", svc.base),
        "minSendable": 1_000,
        "maxSendable": 100_000_000,
        "metadata": metadata(&name, host),
        "commentAllowed": 20,
    }))
}

async fn lnurl_callback(
    State(svc): State<LnurlService>,
    Path(name): Path<String>,
    Query(q): Query<BTreeMap<String, String>>,
) -> Json<Value> {
    let amount: u64 = q["amount"].parse().unwrap();
    if let Some(comment) = q.get("comment") {
        svc.comments.lock().unwrap().push(comment.clone());
    }
    let host = svc.base.trim_start_matches("http://");
    let hash = sha256::Hash::hash(metadata(&name, host).as_bytes()).to_string();
    let body = match name.as_str() {
        // A memo invoice instead of one committing to the metadata.
        "mallory" => json!({ "msat": amount, "memo": "not the metadata" }),
        // Asks for more than requested.
        "greedy" => json!({ "msat": amount + 1_000, "description_hash": hash }),
        _ => json!({ "msat": amount, "description_hash": hash }),
    };
    let created: Value = reqwest::Client::new()
        .post(format!("{}/lab/merchant/invoice", svc.control))
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    Json(json!({ "pr": created["bolt11"], "routes": [] }))
}

async fn start_lnurl_service(world: &World) -> LnurlService {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let svc = LnurlService {
        base: format!("http://{}", listener.local_addr().unwrap()),
        control: world.control_url().to_string(),
        comments: Arc::new(Mutex::new(Vec::new())),
    };
    let app = Router::new()
        .route("/.well-known/lnurlp/{name}", get(lnurl_first))
        .route("/lnurlp/cb/{name}", get(lnurl_callback))
        .with_state(svc.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    svc
}

#[tokio::test(flavor = "multi_thread")]
async fn creator_pays_lightning_addresses_and_lnurls_after_checking_them() {
    let world = world::shared();
    let control = Control::new(world);
    let svc = start_lnurl_service(world).await;
    let host = svc.base.trim_start_matches("http://").to_string();

    let paid = control
        .ok(
            "/lab/creator/pay-lnurl",
            json!({ "target": format!("alice@{host}"), "sats": 2_000, "comment": "for coffee" }),
        )
        .await;
    assert_eq!(
        sha256_hex(paid["preimage"].as_str().unwrap()),
        paid["payment_hash"]
    );
    assert!(
        paid.get("warnings").is_none(),
        "no warnings expected: {paid}"
    );
    let path = format!(
        "/lab/merchant/invoice/{}",
        paid["payment_hash"].as_str().unwrap()
    );
    let status = poll(
        Duration::from_secs(10),
        "the merchant records the payment",
        || async {
            let (_, status) = control.get(&path).await;
            (status["paid"] == true).then_some(status)
        },
    )
    .await;
    assert_eq!(status["amount_msat"], 2_000_000);
    assert_eq!(svc.comments.lock().unwrap().as_slice(), ["for coffee"]);

    // The same service as a bech32 LNURL.
    let url = format!("{}/.well-known/lnurlp/bob", svc.base);
    let hrp = ldk_node::bitcoin::bech32::Hrp::parse("lnurl").unwrap();
    let lnurl =
        ldk_node::bitcoin::bech32::encode::<ldk_node::bitcoin::bech32::Bech32>(hrp, url.as_bytes())
            .unwrap()
            .to_uppercase();
    let paid = control
        .ok(
            "/lab/creator/pay-lnurl",
            json!({ "target": lnurl, "sats": 1_500 }),
        )
        .await;
    assert_eq!(
        sha256_hex(paid["preimage"].as_str().unwrap()),
        paid["payment_hash"]
    );

    // What a wallet must refuse, each before paying anything.
    let refusals = [
        (
            json!({ "target": format!("mallory@{host}"), "sats": 2_000 }),
            502,
            "description hash",
        ),
        (
            json!({ "target": format!("greedy@{host}"), "sats": 2_000 }),
            502,
            "msat were requested",
        ),
        (
            json!({ "target": format!("closed@{host}"), "sats": 2_000 }),
            502,
            "this wallet is closed",
        ),
        (
            json!({ "target": format!("alice@{host}"), "sats": 200_000 }),
            400,
            "outside",
        ),
        (
            json!({ "target": format!("alice@{host}"), "sats": 2_000, "comment": "x".repeat(21) }),
            400,
            "comment",
        ),
        (
            json!({ "target": "alice@example.com:1", "sats": 0 }),
            400,
            "positive",
        ),
        (
            json!({ "target": "http://example.com/lnurlp/x", "sats": 1 }),
            400,
            "only https",
        ),
        (
            json!({ "target": "nonsense", "sats": 1 }),
            400,
            "not an LNURL",
        ),
    ];
    let before = world.peers().creator.node().list_payments().len();
    for (body, code, needle) in refusals {
        let (status, value) = control.post("/lab/creator/pay-lnurl", body.clone()).await;
        assert_eq!(status, code, "{body} → {value}");
        let error = value["error"].as_str().unwrap();
        assert!(
            error.contains(needle),
            "{body}: {error:?} should mention {needle:?}"
        );
    }
    assert_eq!(
        world.peers().creator.node().list_payments().len(),
        before,
        "a refused LNURL was paid"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn control_api_keysends_and_answers_errors_as_json() {
    let world = world::shared();
    let control = Control::new(world);
    let hub = world.lsp().node_id;

    let sent = control
        .ok(
            "/lab/creator/keysend",
            json!({ "node_id": hub, "sats": 1_234 }),
        )
        .await;
    assert_eq!(
        sha256_hex(sent["preimage"].as_str().unwrap()),
        sent["payment_hash"]
    );

    let cases = [
        (
            "/lab/creator/keysend",
            json!({ "node_id": "02ab", "sats": 1 }),
            400,
        ),
        (
            "/lab/creator/keysend",
            json!({ "node_id": hub, "sats": 0 }),
            400,
        ),
        (
            "/lab/creator/pay",
            json!({ "bolt11": "lnbcrt1notaninvoice" }),
            400,
        ),
        ("/lab/creator/pay", json!({ "invoice": "x" }), 400),
        (
            "/lab/merchant/invoice",
            json!({ "msat": 0, "memo": "x" }),
            400,
        ),
        (
            "/lab/merchant/invoice",
            json!({ "msat": 1000, "description_hash": "zz" }),
            400,
        ),
    ];
    for (path, body, code) in cases {
        let (status, value) = control.post(path, body.clone()).await;
        assert_eq!(status, code, "{path} {body} → {value}");
        assert!(
            value["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{value}"
        );
    }

    // A paid invoice cannot be paid twice; an unknown hash is 404.
    let created = control
        .ok(
            "/lab/merchant/invoice",
            json!({ "msat": 5_000, "memo": "twice" }),
        )
        .await;
    control
        .ok("/lab/creator/pay", json!({ "bolt11": created["bolt11"] }))
        .await;
    let (status, value) = control
        .post("/lab/creator/pay", json!({ "bolt11": created["bolt11"] }))
        .await;
    assert_eq!(status, 409, "{value}");
    assert_eq!(value["kind"], "duplicate_payment");
    let (status, value) = control
        .get(&format!("/lab/merchant/invoice/{}", "00".repeat(32)))
        .await;
    assert_eq!(status, 404, "{value}");
    let (status, _) = control.get("/lab/merchant/invoice/nothex").await;
    assert_eq!(status, 400);

    // Status shows heights, balances and channels of every peer.
    let (status, value) = control.get("/lab/status").await;
    assert_eq!(status, 200);
    assert!(value["chain_height"].as_u64().unwrap() >= u64::from(world::INITIAL_HEIGHT));
    let nodes = value["nodes"].as_array().unwrap();
    let names: Vec<_> = nodes.iter().map(|n| n["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["hub", "creator", "merchant"]);
    let creator = &nodes[1];
    assert!(creator["channels"][0]["is_usable"].as_bool().unwrap());
    assert_eq!(
        creator["channels"][0]["capacity_sats"],
        world::CREATOR_CHANNEL_SATS
    );
    assert!(nodes[0]["onchain_sats"].as_u64().unwrap() > 400_000_000);
}

#[tokio::test(flavor = "multi_thread")]
async fn lab_json_describes_the_running_world() {
    let world = world::shared();
    let path = world.lab_json_path();
    let written = LabJson::read(&path).unwrap();
    assert_eq!(&written, world.lab_json());
    assert_eq!(written.network, "regtest");
    assert!(!written.lsp.token.is_empty());
    assert_eq!(written.lsp.node_id, written.nodes["hub"].node_id);
    for name in ["hub", "creator", "merchant"] {
        let node = &written.nodes[name];
        assert_eq!(node.node_id.len(), 66);
        assert!(node.address.starts_with("127.0.0.1:"));
    }
    let tip: u32 = esplora_text(world, "/blocks/tip/height")
        .await
        .parse()
        .unwrap();
    assert!(tip >= world::INITIAL_HEIGHT);
    let models: Value = reqwest::get(format!("{}/models", written.model_url.as_deref().unwrap()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        models["data"].as_array().is_some_and(|m| !m.is_empty()),
        "{models}"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_world_resumes_its_chain_peers_and_channels() {
    let dir = tempfile::tempdir().unwrap();
    let first = World::start(dir.path()).await.expect("first start");
    let first_json = first.lab_json().clone();
    let height = first.chain().tip_height();
    first.shutdown().await;
    drop(first);

    // A stale lab.json is removed at start and rewritten when ready.
    let second = World::start(dir.path()).await.expect("resume");
    let resumed = second.lab_json();
    assert_eq!(
        resumed.nodes, first_json.nodes,
        "same identities and (free) ports"
    );
    assert_eq!(resumed.lsp, first_json.lsp);
    assert_eq!(
        second.chain().tip_height(),
        height,
        "nothing re-funded or re-opened"
    );
    for node in second.peers().all() {
        assert_eq!(
            node.node().list_channels().len(),
            if node.role().name() == "hub" { 2 } else { 1 }
        );
    }
    second.shutdown().await;
}

/// `automaton-lab up --dir DIR`: ready, lab.json written, SIGTERM stops it cleanly.
#[tokio::test(flavor = "multi_thread")]
async fn up_writes_lab_json_and_stops_on_sigterm() {
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("lab.json"), "{stale").unwrap();
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_automaton-lab"));
    command
        .args(["up", "--dir"])
        .arg(dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    // Dies with the test process even if that is killed outright.
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: prctl is async-signal-safe and only affects the child being spawned.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
    }
    let child = command.spawn().unwrap();
    let mut child = KillOnDrop(child);
    let lab_json = dir.path().join("lab.json");
    let written = poll(Duration::from_secs(120), "lab.json from up", || async {
        LabJson::read(&lab_json).ok()
    })
    .await;
    let (status, _) = Control {
        url: written.control_url.clone(),
        http: reqwest::Client::new(),
    }
    .get("/lab/status")
    .await;
    assert_eq!(status, 200);

    // SAFETY: sending a signal to our own child process by its pid.
    unsafe {
        libc::kill(child.0.id() as i32, libc::SIGTERM);
    }
    let exit = poll(Duration::from_secs(60), "up exits after SIGTERM", || {
        let done = child.0.try_wait().unwrap();
        async move { done }
    })
    .await;
    assert!(exit.success(), "up exited with {exit}");
    let mut out = String::new();
    std::io::Read::read_to_string(child.0.stdout.as_mut().unwrap(), &mut out).unwrap();
    assert!(out.contains("lab ready"), "{out}");
    assert!(out.contains(&written.control_url), "{out}");
}
