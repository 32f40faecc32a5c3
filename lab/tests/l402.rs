//! The lab's L402 sellers as a buyer meets them: challenges (both schemes, matching invoice), paid and reused
//! credentials, fresh 402s for bad ones, the per-call paid model, and the odd `/test/` endpoints. The lab's
//! creator pays the merchant's invoices.

mod common;

use std::str::FromStr;

use automaton_l402::{
    format_authorization, parse_challenges, preferred, Challenge, ChallengeError, Macaroon, Scheme,
};
use automaton_lab::world;
use base64::Engine as _;
use bitcoin::hashes::Hash as _;
use common::Control;
use lightning_invoice::Bolt11Invoice;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

fn urls() -> (String, String) {
    let extra = &world::shared().lab_json().extra;
    let api = extra["l402_api_url"]
        .as_str()
        .expect("l402_api_url")
        .to_string();
    let model = extra["l402_model_url"]
        .as_str()
        .expect("l402_model_url")
        .to_string();
    (api, model)
}

/// `http://127.0.0.1:PORT` of the demo API.
fn api_origin() -> String {
    urls().0.trim_end_matches("/api").to_string()
}

async fn get(url: &str, auth: &[String]) -> reqwest::Response {
    let mut request = reqwest::Client::new().get(url);
    for value in auth {
        request = request.header("authorization", value);
    }
    request.send().await.expect("GET")
}

fn www_authenticate(resp: &reqwest::Response) -> Vec<String> {
    resp.headers()
        .get_all("www-authenticate")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect()
}

fn challenge_of(resp: &reqwest::Response) -> Challenge {
    assert_eq!(resp.status(), 402, "expected a 402");
    let values = www_authenticate(resp);
    let challenges =
        parse_challenges(values.iter().map(String::as_str)).expect("an L402 challenge");
    preferred(&challenges).unwrap().clone()
}

/// Pays a challenge's invoice from the lab's creator; returns the preimage.
async fn pay(challenge: &Challenge) -> [u8; 32] {
    let control = Control::new(world::shared());
    let paid = control
        .ok("/lab/creator/pay", json!({"bolt11": challenge.invoice}))
        .await;
    let preimage: [u8; 32] = hex::decode(paid["preimage"].as_str().unwrap())
        .unwrap()
        .try_into()
        .unwrap();
    assert_eq!(
        hex::encode(Sha256::digest(preimage)),
        paid["payment_hash"].as_str().unwrap()
    );
    preimage
}

/// GET → 402 → pay → the token and preimage.
async fn buy(url: &str) -> (String, [u8; 32]) {
    let resp = get(url, &[]).await;
    let challenge = challenge_of(&resp);
    let preimage = pay(&challenge).await;
    (challenge.token, preimage)
}

fn invoice(challenge: &Challenge) -> Bolt11Invoice {
    Bolt11Invoice::from_str(&challenge.invoice).expect("a BOLT11 invoice")
}

#[tokio::test(flavor = "multi_thread")]
async fn the_api_challenges_with_both_schemes_and_a_matching_invoice() {
    let (api, _) = urls();
    let resp = get(&api, &[]).await;
    assert_eq!(resp.status(), 402);
    let values = www_authenticate(&resp);
    assert_eq!(values.len(), 2, "{values:?}");
    assert!(values[0].starts_with("LSAT macaroon=\""), "{}", values[0]);
    assert!(values[1].starts_with("L402 macaroon=\""), "{}", values[1]);
    let challenges = parse_challenges(values.iter().map(String::as_str)).unwrap();
    assert_eq!(challenges[0].token, challenges[1].token);
    assert_eq!(challenges[0].invoice, challenges[1].invoice);
    let challenge = &challenges[1];
    let inv = invoice(challenge);
    assert_eq!(inv.amount_milli_satoshis(), Some(10_000));
    assert_eq!(inv.network(), bitcoin::Network::Regtest);
    assert_eq!(
        challenge.payment_hash().unwrap(),
        inv.payment_hash().to_byte_array()
    );
    let macaroon = challenge.macaroon().unwrap();
    assert_eq!(macaroon.location(), Some("lsat"));
    let caveats: Vec<String> = macaroon
        .first_party_caveats()
        .map(|c| c.into_owned())
        .collect();
    assert_eq!(caveats[0], "services=lab-api:0");
    assert!(
        caveats[1].starts_with("lab-api_valid_until="),
        "{caveats:?}"
    );
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["service"], "lab-api");
    assert_eq!(body["price_sats"], 10);

    // Every 402 is a fresh invoice.
    let again = challenge_of(&get(&api, &[]).await);
    assert_ne!(again.invoice, challenge.invoice);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_paid_credential_passes_until_it_expires_in_every_accepted_form() {
    let (api, _) = urls();
    let (token, preimage) = buy(&api).await;
    let credential = format_authorization(&token, &preimage);
    let resp = get(&api, std::slice::from_ref(&credential)).await;
    assert_eq!(resp.status(), 200);
    let receipt = resp.headers()["payment-receipt"]
        .to_str()
        .unwrap()
        .to_string();
    let receipt: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(receipt)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(receipt["status"], "success");
    assert_eq!(receipt["method"], "lightning");
    assert_eq!(receipt["reference"], hex::encode(Sha256::digest(preimage)));
    let body: Value = resp.json().await.unwrap();
    assert!(body["quote"].as_str().is_some(), "{body}");

    // Reused without paying again, under either scheme and hex case, and on the other routes of the service.
    let upper = format!("LSAT {token}:{}", hex::encode_upper(preimage));
    for auth in [credential.clone(), upper] {
        assert_eq!(get(&format!("{api}/quote"), &[auth]).await.status(), 200);
    }
    let echoed: Value = reqwest::Client::new()
        .post(format!("{api}/echo"))
        .header("authorization", &credential)
        .body("hello lab")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(echoed["echo"], "hello lab");
    assert_eq!(echoed["sha256"], hex::encode(Sha256::digest(b"hello lab")));

    // A bad Authorization header beside the good one: the first that verifies wins.
    let junk = "L402 AgEEbHNhdA:00".to_string();
    assert_eq!(get(&api, &[junk, credential.clone()]).await.status(), 200);

    // Aperture's other form: the macaroon in hex with a preimage caveat.
    let mut with_preimage = Macaroon::from_base64(&token).unwrap();
    with_preimage.add_first_party_caveat(format!("preimage={}", hex::encode(preimage)));
    let resp = reqwest::Client::new()
        .get(&api)
        .header("macaroon", hex::encode(with_preimage.to_binary()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    // The holder narrows the token to an expiry in the past: refused with a fresh challenge.
    let mut expired = Macaroon::from_base64(&token).unwrap();
    expired.add_first_party_caveat("lab-api_valid_until=1000");
    let resp = get(
        &api,
        &[format_authorization(&expired.to_base64(), &preimage)],
    )
    .await;
    let fresh = challenge_of(&resp);
    let body: Value = resp.json().await.unwrap();
    assert!(
        body["reason"].as_str().unwrap().contains("expired"),
        "{body}"
    );
    assert_ne!(fresh.token, token);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_credentials_get_a_fresh_402() {
    let (api, _) = urls();
    let (token, preimage) = buy(&api).await;

    let cases: Vec<(&str, String)> = vec![
        ("wrong preimage", format_authorization(&token, &[7u8; 32])),
        ("tampered macaroon", {
            // A caveat rewritten in place keeps the old signature: the HMAC chain no longer matches.
            let m = Macaroon::from_base64(&token).unwrap();
            let text = base64::engine::general_purpose::STANDARD
                .decode(m.to_base64())
                .unwrap();
            let at = text.windows(7).position(|w| w == b"lab-api").unwrap();
            let mut bytes = text.clone();
            bytes[at + 4..at + 7].copy_from_slice(b"xyz");
            let tampered = base64::engine::general_purpose::STANDARD.encode(bytes);
            format_authorization(&tampered, &preimage)
        }),
        ("not L402 at all", format!("Bearer {token}")),
        ("garbage", "L402 !!!:zz".to_string()),
    ];
    for (what, auth) in cases {
        let resp = get(&api, &[auth]).await;
        assert_eq!(resp.status(), 402, "{what}");
        let fresh = challenge_of(&resp);
        assert_ne!(fresh.token, token, "{what}: a fresh macaroon");
    }

    // A token paid for another service is refused here.
    let lsat_url = format!("{}/test/lsat-only", api_origin());
    let (other_token, other_preimage) = buy(&lsat_url).await;
    assert_eq!(
        get(
            &lsat_url,
            &[format_authorization(&other_token, &other_preimage)]
        )
        .await
        .status(),
        200
    );
    let resp = get(&api, &[format_authorization(&other_token, &other_preimage)]).await;
    challenge_of(&resp);
    let body: Value = resp.json().await.unwrap();
    assert!(
        body["reason"]
            .as_str()
            .unwrap()
            .contains("not valid for service"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_model_is_paid_per_call() {
    let (_, model) = urls();
    let client = reqwest::Client::new();
    let free = client.get(format!("{model}/models")).send().await.unwrap();
    assert_eq!(free.status(), 200, "listing models is free");

    let request = json!({"model": "any", "messages": [{"role": "user", "content": "hello"}]});
    let url = format!("{model}/chat/completions");
    let resp = client.post(&url).json(&request).send().await.unwrap();
    let challenge = challenge_of(&resp);
    assert_eq!(invoice(&challenge).amount_milli_satoshis(), Some(10_000));
    let caveats: Vec<String> = challenge
        .macaroon()
        .unwrap()
        .first_party_caveats()
        .map(|c| c.into_owned())
        .collect();
    assert_eq!(caveats[0], "services=lab-model:0");
    let preimage = pay(&challenge).await;
    let auth = format_authorization(&challenge.token, &preimage);

    // A request the model rejects does not spend the token.
    let bad = client
        .post(&url)
        .header("authorization", &auth)
        .json(&json!({"model": "x", "messages": []}))
        .send();
    assert_eq!(bad.await.unwrap().status(), 400);

    let ok = client
        .post(&url)
        .header("authorization", &auth)
        .json(&request)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    assert!(ok.headers().contains_key("payment-receipt"));
    let completion: Value = ok.json().await.unwrap();
    assert_eq!(completion["object"], "chat.completion");

    // Spent: the next call needs a new payment.
    let again = client
        .post(&url)
        .header("authorization", &auth)
        .json(&request)
        .send()
        .await
        .unwrap();
    let fresh = challenge_of(&again);
    assert_ne!(fresh.invoice, challenge.invoice);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_odd_test_endpoints_behave_as_documented() {
    let origin = api_origin();

    // Only the spec's v0 form.
    let resp = get(&format!("{origin}/test/token-form"), &[]).await;
    let values = www_authenticate(&resp);
    assert_eq!(values.len(), 1);
    assert!(
        values[0].starts_with("L402 version=\"0\", token=\""),
        "{}",
        values[0]
    );
    let c = challenge_of(&resp);
    assert_eq!(c.token_param, automaton_l402::TokenParam::Token);

    // Only LSAT.
    let resp = get(&format!("{origin}/test/lsat-only"), &[]).await;
    assert_eq!(www_authenticate(&resp).len(), 1);
    assert_eq!(challenge_of(&resp).scheme, Scheme::Lsat);

    // Above every default cap.
    let c = challenge_of(&get(&format!("{origin}/test/expensive"), &[]).await);
    assert_eq!(invoice(&c).amount_milli_satoshis(), Some(100_000_000));

    // No usable challenge.
    let resp = get(&format!("{origin}/test/malformed"), &[]).await;
    assert_eq!(resp.status(), 402);
    let values = www_authenticate(&resp);
    assert_eq!(
        parse_challenges(values.iter().map(String::as_str)),
        Err(ChallengeError::MissingInvoice)
    );

    // The macaroon commits to a payment hash other than the invoice's.
    let c = challenge_of(&get(&format!("{origin}/test/mismatch"), &[]).await);
    assert_ne!(
        c.payment_hash().unwrap(),
        invoice(&c).payment_hash().to_byte_array()
    );

    // Never accepts: even a paid credential gets a new 402.
    let url = format!("{origin}/test/always-402");
    let (token, preimage) = buy(&url).await;
    let resp = get(&url, &[format_authorization(&token, &preimage)]).await;
    assert_ne!(challenge_of(&resp).token, token);

    // The free index lists the endpoints and counts challenges.
    let index: Value = reqwest::get(format!("{origin}/"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(index["endpoints"][0]["price_sats"], 10);
    assert!(
        index["stats"]["lab-always-402"]["challenges"]
            .as_u64()
            .unwrap()
            >= 2
    );
}
