//! Tests of the budget gate: the policy as a table, reservations, approvals, freeze, recovery and concurrency.

use super::*;
use crate::money::receipts::{self, Direction, ReceiptStatus};

fn req(amount_sats: u64, counterparty: Option<&str>) -> SpendRequest {
    SpendRequest {
        amount_msat: amount_sats * 1000,
        max_fee_msat: 0,
        rail: Rail::Bolt11,
        purpose: "test".into(),
        counterparty: counterparty.map(str::to_string),
    }
}

fn limits() -> LimitsConfig {
    LimitsConfig {
        per_payment_sats: 1_000,
        hourly_sats: 2_000,
        daily_sats: 5_000,
        reserve_sats: 100,
        ..LimitsConfig::default()
    }
}

#[test]
fn policy_table() {
    let node = "02aaaa";
    let frozen = Freeze {
        since: "2024-01-01T00:00:00.000Z".into(),
        reason: Some("creator".into()),
    };
    let mut with_lists = limits();
    with_lists.deny = vec!["evil.example".into()];
    with_lists.allow = vec!["good.example".into(), node.into()];
    let mut default_deny = with_lists.clone();
    default_deny.default_deny = true;
    let mut cp_caps = limits();
    cp_caps.per_counterparty_sats = Some(500);
    cp_caps.counterparty_sats.insert("api.example".into(), 800);
    let mut inference = limits();
    inference.inference_daily_sats = Some(300);
    let inf = |sats: u64| SpendRequest {
        purpose: "inference: model call".into(),
        rail: Rail::L402,
        ..req(sats, Some("models.example"))
    };
    let usage = |hour: u64, day: u64, cp: u64, inf: u64, out: u64| Usage {
        hour_msat: hour * 1000,
        day_msat: day * 1000,
        counterparty_day_msat: cp * 1000,
        inference_day_msat: inf * 1000,
        outstanding_msat: out * 1000,
    };
    let none = Usage::default();

    type Case<'a> = (
        &'a str,
        &'a LimitsConfig,
        SpendRequest,
        Usage,
        Option<u64>,
        Option<&'a Freeze>,
        &'a str,
    );
    let base = limits();
    let cases: Vec<Case> = vec![
        (
            "plain ok",
            &base,
            req(500, None),
            none.clone(),
            None,
            None,
            "ok",
        ),
        (
            "frozen wins over everything",
            &base,
            req(1, None),
            none.clone(),
            None,
            Some(&frozen),
            "frozen",
        ),
        (
            "zero amount",
            &base,
            req(0, None),
            none.clone(),
            None,
            None,
            "invalid",
        ),
        (
            "empty purpose",
            &base,
            SpendRequest {
                purpose: " ".into(),
                ..req(1, None)
            },
            none.clone(),
            None,
            None,
            "invalid",
        ),
        (
            "per payment: exactly at cap",
            &base,
            req(1_000, None),
            none.clone(),
            None,
            None,
            "ok",
        ),
        (
            "per payment: 1 msat over",
            &base,
            SpendRequest {
                amount_msat: 1_000_001,
                ..req(0, None)
            },
            none.clone(),
            None,
            None,
            "over_per_payment",
        ),
        (
            "per payment counts max fee",
            &base,
            SpendRequest {
                max_fee_msat: 1,
                ..req(1_000, None)
            },
            none.clone(),
            None,
            None,
            "over_per_payment",
        ),
        (
            "hourly: fills exactly",
            &base,
            req(500, None),
            usage(1_500, 1_500, 0, 0, 0),
            None,
            None,
            "ok",
        ),
        (
            "hourly: over",
            &base,
            req(501, None),
            usage(1_500, 1_500, 0, 0, 0),
            None,
            None,
            "over_hourly",
        ),
        (
            "daily: over",
            &base,
            req(600, None),
            usage(0, 4_500, 0, 0, 0),
            None,
            None,
            "over_daily",
        ),
        (
            "deny list",
            &with_lists,
            req(1, Some("evil.example")),
            none.clone(),
            None,
            None,
            "denied",
        ),
        (
            "deny list covers subdomains",
            &with_lists,
            req(1, Some("API.Evil.Example.")),
            none.clone(),
            None,
            None,
            "denied",
        ),
        (
            "deny list is not a substring match",
            &with_lists,
            req(1, Some("notevil.example")),
            none.clone(),
            None,
            None,
            "ok",
        ),
        (
            "default deny: listed domain",
            &default_deny,
            req(1, Some("pay.good.example")),
            none.clone(),
            None,
            None,
            "ok",
        ),
        (
            "default deny: listed node",
            &default_deny,
            req(1, Some("02AAAA")),
            none.clone(),
            None,
            None,
            "ok",
        ),
        (
            "default deny: unlisted",
            &default_deny,
            req(1, Some("other.example")),
            none.clone(),
            None,
            None,
            "denied",
        ),
        (
            "default deny: no counterparty",
            &default_deny,
            req(1, None),
            none.clone(),
            None,
            None,
            "denied",
        ),
        (
            "deny beats allow",
            &default_deny,
            req(1, Some("evil.example")),
            none.clone(),
            None,
            None,
            "denied",
        ),
        (
            "per counterparty cap",
            &cp_caps,
            req(300, Some("02bb")),
            usage(0, 0, 300, 0, 0),
            None,
            None,
            "over_counterparty",
        ),
        (
            "per counterparty under cap",
            &cp_caps,
            req(200, Some("02bb")),
            usage(0, 0, 300, 0, 0),
            None,
            None,
            "ok",
        ),
        (
            "specific counterparty cap overrides",
            &cp_caps,
            req(300, Some("x.api.example")),
            usage(0, 0, 300, 0, 0),
            None,
            None,
            "ok",
        ),
        (
            "specific counterparty cap binds",
            &cp_caps,
            req(600, Some("api.example")),
            usage(0, 0, 300, 0, 0),
            None,
            None,
            "over_counterparty",
        ),
        (
            "inference cap",
            &inference,
            inf(200),
            usage(0, 0, 0, 200, 0),
            None,
            None,
            "over_inference_daily",
        ),
        (
            "inference cap not for other purposes",
            &inference,
            req(200, Some("models.example")),
            usage(0, 0, 0, 200, 0),
            None,
            None,
            "ok",
        ),
        (
            "inference under cap",
            &inference,
            inf(100),
            usage(0, 0, 0, 200, 0),
            None,
            None,
            "ok",
        ),
        (
            "reserve: leaves exactly the floor",
            &base,
            req(400, None),
            none.clone(),
            Some(500_000),
            None,
            "ok",
        ),
        (
            "reserve: below the floor",
            &base,
            req(401, None),
            none.clone(),
            Some(500_000),
            None,
            "below_reserve",
        ),
        (
            "reserve: in-flight counts",
            &base,
            req(300, None),
            usage(0, 0, 0, 0, 200),
            Some(500_000),
            None,
            "below_reserve",
        ),
        (
            "reserve: unknown balance not checked",
            &base,
            req(400, None),
            none.clone(),
            None,
            None,
            "ok",
        ),
    ];
    for (name, limits, request, usage, balance, frozen, expected) in cases {
        let got = match check_request(limits, &request, &usage, balance, frozen) {
            Ok(()) => "ok",
            Err(e) => e.kind(),
        };
        assert_eq!(got, expected, "case `{name}`");
    }
}

#[test]
fn refusals_exit_2_and_errors_exit_1() {
    let refusal = BudgetError::OverHourly {
        limit_sats: 1,
        spent_msat: 0,
        requested_msat: 2000,
    };
    assert_eq!(refusal.exit_code(), 2);
    assert!(
        refusal.to_string().contains("hourly cap of 1 sats"),
        "{refusal}"
    );
    let broken = BudgetError::State(StateError::Poisoned);
    assert_eq!(broken.exit_code(), 1);
}

fn policy(limits: LimitsConfig) -> BudgetPolicy {
    BudgetPolicy::new(Db::open_in_memory().unwrap(), limits)
}

#[tokio::test]
async fn reservations_count_until_settled_or_released() {
    let p = policy(limits());
    let a = p.authorize(req(1_000, None), None).await.unwrap();
    let b = p.authorize(req(1_000, None), None).await.unwrap();
    let err = p.authorize(req(1, None), None).await.unwrap_err();
    assert_eq!(err.kind(), "over_hourly", "{err}");
    // Settled for less than reserved: only what was paid counts.
    p.settle(a, 400_000, 1_000).await.unwrap();
    p.release(b).await.unwrap();
    let snap = p.snapshot().await.unwrap();
    assert_eq!(snap.spent_hour_sats, 401);
    assert_eq!(snap.in_flight_sats, 0);
    let c = p.authorize(req(1_000, None), None).await.unwrap();
    assert_eq!(p.snapshot().await.unwrap().in_flight_sats, 1_000);
    assert_eq!(c.reserved_msat(), 1_000_000);
}

#[tokio::test]
async fn settle_twice_the_same_way_is_a_noop_but_not_the_other_way() {
    let p = policy(limits());
    let a = p.authorize(req(10, None), None).await.unwrap();
    let id = a.id().to_string();
    p.settle(a, 10_000, 0).await.unwrap();
    let again = Permit {
        id: id.clone(),
        request: req(10, None),
        created_at: Utc::now(),
        approval_id: None,
    };
    p.settle(again, 10_000, 0).await.unwrap();
    let third = Permit {
        id,
        request: req(10, None),
        created_at: Utc::now(),
        approval_id: None,
    };
    let err = p.release(third).await.unwrap_err();
    assert!(matches!(err, MoneyError::PermitClosed { .. }), "{err:?}");
}

#[tokio::test]
async fn old_spend_ages_out_of_the_hourly_window_but_not_the_daily() {
    let db = Db::open_in_memory().unwrap();
    let l = limits();
    let two_hours_ago = Utc::now() - chrono::Duration::hours(2);
    let r = db
        .call(move |c| authorize_in(c, &l, req(1_000, None), None, two_hours_ago))
        .await
        .unwrap();
    r.unwrap();
    let p = BudgetPolicy::new(db, limits());
    let snap = p.snapshot().await.unwrap();
    assert_eq!((snap.spent_hour_sats, snap.spent_day_sats), (0, 1_000));
    p.authorize(req(1_000, None), None).await.unwrap();
}

#[tokio::test]
async fn frozen_wallet_pays_nothing_until_unfrozen() {
    let p = policy(limits());
    assert!(freeze(p.db(), Some("suspicious activity")).unwrap());
    assert!(!freeze(p.db(), None).unwrap(), "already frozen");
    let err = p.authorize(req(1, None), None).await.unwrap_err();
    assert!(
        matches!(&err, BudgetError::Frozen { reason: Some(r) } if r == "suspicious activity"),
        "{err:?}"
    );
    assert!(p.snapshot().await.unwrap().frozen);
    assert!(unfreeze(p.db()).unwrap());
    assert!(!unfreeze(p.db()).unwrap());
    p.authorize(req(1, None), None).await.unwrap();
}

#[tokio::test]
async fn approval_flow_pending_then_approved_exactly_once() {
    let mut l = limits();
    l.approval_above_sats = Some(500);
    l.hourly_sats = 5_000;
    let p = policy(l);
    // Under the threshold: no approval needed.
    p.authorize(req(500, Some("02cc")), None).await.unwrap();
    let big = || req(800, Some("02cc"));
    let id = match p.authorize(big(), None).await.unwrap_err() {
        BudgetError::NeedsApproval {
            approval_id,
            threshold_sats,
            ..
        } => {
            assert_eq!(threshold_sats, 500);
            approval_id
        }
        other => panic!("unexpected {other:?}"),
    };
    // Asking again while pending gives the same request, not a new one.
    match p.authorize(big(), None).await.unwrap_err() {
        BudgetError::NeedsApproval { approval_id, .. } => assert_eq!(approval_id, id),
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(approvals::list(p.db(), false).unwrap().len(), 1);
    assert_eq!(p.snapshot().await.unwrap().pending_approvals, 1);
    // A different payment is a different request.
    assert!(matches!(
        p.authorize(req(801, Some("02cc")), None).await.unwrap_err(),
        BudgetError::NeedsApproval { approval_id, .. } if approval_id != id
    ));

    let approved = approvals::approve(p.db(), &id[..10].to_ascii_lowercase(), Some("ok")).unwrap();
    assert_eq!(approved.status, ApprovalStatus::Approved);
    let err = approvals::approve(p.db(), &id, None).unwrap_err();
    assert!(
        matches!(err, MoneyError::ApprovalNotPending { .. }),
        "{err:?}"
    );

    let permit = p.authorize(big(), None).await.unwrap();
    assert_eq!(permit.approval_id(), Some(id.as_str()));
    let used = approvals::get(p.db(), &id).unwrap();
    assert_eq!(used.status, ApprovalStatus::Used);
    assert_eq!(used.permit_id.as_deref(), Some(permit.id()));
    // Exactly once: the same payment again needs a new approval.
    assert!(matches!(
        p.authorize(big(), None).await.unwrap_err(),
        BudgetError::NeedsApproval { approval_id, .. } if approval_id != id
    ));
}

#[tokio::test]
async fn denied_request_is_refused_without_asking_again() {
    let mut l = limits();
    l.approval_above_sats = Some(100);
    let p = policy(l);
    let id = match p.authorize(req(200, None), None).await.unwrap_err() {
        BudgetError::NeedsApproval { approval_id, .. } => approval_id,
        other => panic!("unexpected {other:?}"),
    };
    approvals::deny(p.db(), &id, Some("too expensive")).unwrap();
    let err = p.authorize(req(200, None), None).await.unwrap_err();
    assert!(
        matches!(&err, BudgetError::Denied { reason } if reason.contains("too expensive")),
        "{err:?}"
    );
    assert!(approvals::list(p.db(), false).unwrap().is_empty());
    assert_eq!(approvals::list(p.db(), true).unwrap().len(), 1);
}

#[tokio::test]
async fn caps_are_checked_before_asking_the_creator() {
    let mut l = limits();
    l.approval_above_sats = Some(100);
    let p = policy(l);
    let err = p.authorize(req(5_000, None), None).await.unwrap_err();
    assert_eq!(err.kind(), "over_per_payment");
    assert!(approvals::list(p.db(), true).unwrap().is_empty());
}

#[test]
fn unknown_or_ambiguous_approval_ids() {
    let db = Db::open_in_memory().unwrap();
    assert!(matches!(
        approvals::get(&db, "nope"),
        Err(MoneyError::UnknownApproval(_))
    ));
    assert!(matches!(
        approvals::get(&db, ""),
        Err(MoneyError::UnknownApproval(_))
    ));
}

#[tokio::test]
async fn recover_settles_or_releases_what_a_crash_left() {
    let p = policy(limits());
    let never_launched = p.authorize(req(100, None), None).await.unwrap();
    let paid = p.authorize(req(100, None), None).await.unwrap();
    let failed = p.authorize(req(100, None), None).await.unwrap();
    let in_flight = p.authorize(req(100, None), None).await.unwrap();
    let unknown = p.authorize(req(100, None), None).await.unwrap();
    let hash = |n: u8| hex(&[n; 32]);
    for (permit, n) in [(&paid, 1), (&failed, 2), (&in_flight, 3), (&unknown, 4)] {
        receipts::record_pending_out(p.db(), permit, &hash(n))
            .await
            .unwrap();
    }
    // The process dies here: the permits are dropped without being settled or released.
    drop((never_launched, paid, failed, in_flight, unknown));
    let (h1, h2, h3) = (hash(1), hash(2), hash(3));
    let summary = p
        .recover(|h| {
            if h == h1 {
                PaymentOutcome::Succeeded {
                    paid_msat: 100_000,
                    fee_msat: 5,
                }
            } else if h == h2 {
                PaymentOutcome::Failed
            } else if h == h3 {
                PaymentOutcome::Pending
            } else {
                PaymentOutcome::Unknown
            }
        })
        .await
        .unwrap();
    assert_eq!(
        summary,
        RecoverySummary {
            settled: 1,
            released: 3,
            still_pending: 1
        }
    );
    let snap = p.snapshot().await.unwrap();
    assert_eq!(snap.in_flight_sats, 100);
    assert_eq!(snap.spent_hour_sats, 201); // 100.005 settled rounds up, + 100 in flight
                                           // Running recovery again changes nothing.
    let again = p.recover(|_| PaymentOutcome::Pending).await.unwrap();
    assert_eq!(
        again,
        RecoverySummary {
            settled: 0,
            released: 0,
            still_pending: 1
        }
    );
}

#[tokio::test]
async fn receipt_events_close_the_permit_even_after_a_restart() {
    let p = policy(limits());
    let preimage = [7u8; 32];
    let hash = receipts::Preimage::new(preimage).sha256_hex();
    let permit = p.authorize(req(300, Some("02dd")), None).await.unwrap();
    receipts::record_pending_out(p.db(), &permit, &hash)
        .await
        .unwrap();
    drop(permit); // crash; the success event arrives after the restart
    let r = receipts::mark_succeeded(p.db(), &hash, Direction::Out, preimage, 2_000)
        .await
        .unwrap();
    assert_eq!(r.status, ReceiptStatus::Succeeded);
    let snap = p.snapshot().await.unwrap();
    assert_eq!((snap.in_flight_sats, snap.spent_hour_sats), (0, 302));
}

/// 100 concurrent authorizations against a real SQLite file through several connections (as separate processes
/// would have) never reserve more than the hourly cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_authorizations_never_overshoot_the_hourly_cap() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let l = LimitsConfig {
        per_payment_sats: 1_000,
        hourly_sats: 2_500,
        daily_sats: 100_000,
        reserve_sats: 0,
        ..LimitsConfig::default()
    };
    let policies: Vec<BudgetPolicy> = (0..4)
        .map(|_| BudgetPolicy::new(Db::open(&path).unwrap(), l.clone()))
        .collect();
    let mut tasks = Vec::new();
    for i in 0..100u64 {
        let p = policies[i as usize % policies.len()].clone();
        tasks.push(tokio::spawn(async move {
            let request = SpendRequest {
                amount_msat: 90_000 + i * 7,
                max_fee_msat: 1_000,
                rail: Rail::Keysend,
                purpose: format!("concurrent {i}"),
                counterparty: None,
            };
            p.authorize(request, None).await
        }));
    }
    let mut granted = 0u64;
    let mut reserved = 0u64;
    for t in tasks {
        match t.await.unwrap() {
            Ok(permit) => {
                granted += 1;
                reserved += permit.reserved_msat();
            }
            Err(err) => assert_eq!(err.kind(), "over_hourly", "{err}"),
        }
    }
    assert!(
        reserved <= 2_500_000,
        "reserved {reserved} msat over the cap"
    );
    assert!(
        granted >= 20,
        "only {granted} granted: the cap should fit about 26"
    );
    let in_db: i64 = policies[0]
        .db()
        .call_blocking(|c| {
            c.query_row("SELECT SUM(reserved_msat) FROM money_permits", [], |r| {
                r.get(0)
            })
        })
        .unwrap();
    assert_eq!(in_db as u64, reserved);
}

#[tokio::test]
async fn inference_spend_counts_against_the_inference_cap() {
    let mut l = limits();
    l.inference_daily_sats = Some(100);
    let p = policy(l);
    p.check_inference().await.unwrap();
    p.db()
        .call(|c| {
            c.execute(
                "INSERT INTO inference_calls (id, provider, model, cost_sats, duration_ms, created_at) \
                 VALUES ('a', 'openai', 'm', 100, 1, ?1)",
                [crate::state::now_rfc3339()],
            )
        })
        .await
        .unwrap();
    let err = p.check_inference().await.unwrap_err();
    assert_eq!(err.kind(), "over_inference_daily");
    assert_eq!(p.snapshot().await.unwrap().inference_day_sats, 100);
}

#[tokio::test]
async fn limits_reload_when_the_config_file_changes() {
    let dir = tempfile::tempdir().unwrap();
    let home = Home::at(dir.path());
    let mut config = Config {
        name: "ada".into(),
        ..Config::default()
    };
    config.write(&home).unwrap();
    let p = BudgetPolicy::from_home(Db::open_in_memory().unwrap(), &config, &home, Vec::new());
    assert_eq!(p.limits().per_payment_sats, 10_000);
    config.limits.per_payment_sats = 77;
    config.write(&home).unwrap();
    assert_eq!(p.limits().per_payment_sats, 77);
    // A broken file keeps the last good limits.
    std::fs::write(home.config_path(), "name: [oops\n").unwrap();
    assert_eq!(p.limits().per_payment_sats, 77);
}

#[test]
fn fingerprint_ignores_case_and_spacing_of_the_counterparty() {
    let a = req(5, Some("API.Example."));
    let b = req(5, Some("api.example"));
    assert_eq!(a.fingerprint(), b.fingerprint());
    assert_ne!(a.fingerprint(), req(6, Some("api.example")).fingerprint());
}
