//! The NIP-47 wallet service against the lab (its real relay, merchant and creator): an independent NWC client
//! (the `nwc` crate) with the URI `automaton nwc create` printed reads the balance, pays a merchant invoice
//! within the connection's budget (the payment goes through the agent's money gate and leaves a receipt), is
//! refused past that budget with QUOTA_EXCEEDED, and gets nothing paid once the connection is revoked.

mod common;

use std::time::Duration;

use automaton_lab::world::{self, World};
use common::lab_agent::{lab_get, lab_post, LabAgent};
use nostr::nips::nip47::{ErrorCode, NostrWalletConnectURI, PayInvoiceRequest};
use serde_json::json;

/// A fresh merchant invoice: (bolt11, payment hash).
async fn merchant_invoice(world: &World, sats: u64, memo: &str) -> (String, String) {
    let invoice = lab_post(
        world,
        "/lab/merchant/invoice",
        json!({"msat": sats * 1000, "memo": memo}),
    )
    .await;
    (
        invoice["bolt11"].as_str().unwrap().to_string(),
        invoice["payment_hash"].as_str().unwrap().to_string(),
    )
}

async fn merchant_paid(world: &World, hash: &str) -> bool {
    lab_get(world, &format!("/lab/merchant/invoice/{hash}")).await["paid"] == true
}

fn nip47_code(error: &nwc::Error) -> Option<ErrorCode> {
    match error {
        nwc::Error::NIP47(nostr::nips::nip47::Error::ErrorCode(e)) => Some(e.code),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_nwc_client_pays_within_the_connection_budget_and_is_refused_past_it_or_once_revoked() {
    let world = world::shared();
    let agent = LabAgent::set_up(world, "nwcagent", &[]);

    // The connection is made while the agent is stopped: the CLI only touches the state DB.
    let created = agent.json(&[
        "nwc",
        "create",
        "--budget-sats",
        "1500",
        "--period",
        "monthly",
        "--name",
        "vps",
        "--json",
    ]);
    let uri_text = created["uri"].as_str().expect("the URI").to_string();
    assert!(uri_text.starts_with("nostr+walletconnect://"), "{uri_text}");
    let uri = NostrWalletConnectURI::parse(&uri_text).expect("a NIP-47 URI");
    let relay = world.lab_json().relay_url.clone().expect("lab relay");
    assert_eq!(
        uri.relays
            .iter()
            .map(|r| r.as_str_without_trailing_slash().to_string())
            .collect::<Vec<_>>(),
        vec![relay.trim_end_matches('/').to_string()]
    );
    let id = created["id"].as_str().unwrap().to_string();
    let listed = agent.json(&["nwc", "list", "--json"]);
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed[0]["budget_sats"], 1500);
    assert!(
        !listed.to_string().contains(&uri.secret.to_secret_hex()),
        "`nwc list` must not show the secret: {listed}"
    );

    let _running = agent.start();
    agent.wait_ready();
    // Fund the agent through its Lightning address.
    agent.fund(world, 20_000).await;

    let client = nwc::NWC::with_opts(
        uri.clone(),
        nwc::NostrWalletConnectOptions::new().timeout(Duration::from_secs(20)),
    );

    // get_balance (retried while the client and the service find the relay).
    let mut balance = None;
    let mut last = String::new();
    for _ in 0..12 {
        match client.get_balance().await {
            Ok(msat) => {
                balance = Some(msat);
                break;
            }
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let balance =
        balance.unwrap_or_else(|| panic!("get_balance never answered: {last}\n{}", agent.logs()));
    assert!(balance >= 10_000_000, "balance {balance} msat");
    let info = client.get_info().await.expect("get_info");
    assert!(
        info.methods
            .contains(&nostr::nips::nip47::Method::PayInvoice),
        "{info:?}"
    );

    // Within the connection's budget: paid, the merchant sees it, the receipt says nwc.
    let (bolt11, hash) = merchant_invoice(world, 1000, "nwc first").await;
    let paid = client
        .pay_invoice(PayInvoiceRequest::new(bolt11))
        .await
        .unwrap_or_else(|e| panic!("pay_invoice: {e}\n{}", agent.logs()));
    assert_eq!(paid.preimage.len(), 64, "{paid:?}");
    // (The merchant's node records its claim a moment after it released the preimage.)
    let start = std::time::Instant::now();
    while !merchant_paid(world, &hash).await {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the merchant was not paid"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let receipt = agent
        .receipts()
        .into_iter()
        .find(|r| r["payment_hash"] == hash.as_str())
        .expect("a receipt for the NWC payment");
    assert_eq!(receipt["direction"], "out");
    assert_eq!(receipt["status"], "succeeded");
    assert_eq!(receipt["purpose"], "nwc:vps", "{receipt}");
    assert_eq!(receipt["preimage_sha256"], hash.as_str());

    // Past the connection's budget (1,000 sats spent of 1,500): refused, nothing paid.
    let (bolt11, hash) = merchant_invoice(world, 1000, "nwc over budget").await;
    let refused = client
        .pay_invoice(PayInvoiceRequest::new(bolt11))
        .await
        .expect_err("over the connection's budget");
    assert_eq!(
        nip47_code(&refused),
        Some(ErrorCode::QuotaExceeded),
        "{refused}"
    );
    assert!(!merchant_paid(world, &hash).await);
    let listed = agent.json(&["nwc", "list", "--json"]);
    let spent = listed[0]["spent_sats"].as_u64().unwrap();
    assert!((1000..1500).contains(&spent), "{listed}");

    // Revoked: refused (or unanswered), and the invoice stays unpaid.
    let revoked = agent.json(&["nwc", "revoke", &id, "--json"]);
    assert_eq!(revoked["active"], false, "{revoked}");
    let (bolt11, hash) = merchant_invoice(world, 100, "nwc revoked").await;
    match client.pay_invoice(PayInvoiceRequest::new(bolt11)).await {
        Ok(paid) => panic!("a revoked connection paid: {paid:?}"),
        Err(e) => {
            let code = nip47_code(&e);
            assert!(
                code.is_none() || code == Some(ErrorCode::Unauthorized),
                "{e}"
            );
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!merchant_paid(world, &hash).await);
    let outgoing = agent
        .receipts()
        .into_iter()
        .filter(|r| r["direction"] == "out" && r["purpose"] == "nwc:vps")
        .count();
    assert_eq!(outgoing, 1, "exactly one NWC payment left the wallet");
    client.shutdown().await;
}
