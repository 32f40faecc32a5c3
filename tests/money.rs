//! The money commands a creator uses without a running agent, through the built binary: `budget show|set`,
//! `approvals list|approve|deny`, `wallet freeze|unfreeze` — and that the gate the agent uses sees their effect.

mod common;

use automaton::config::{Config, TierThresholds};
use automaton::money::tiers::{self, SurvivalTier};
use automaton::money::{BudgetError, BudgetPolicy, Rail, SpendRequest};
use common::{text, tool_call, ModelServer, TestHome};
use serde_json::{json, Value};

/// Setup needs an endpoint but never calls it.
const NO_MODEL: &str = "http://127.0.0.1:9/v1";

fn home() -> TestHome {
    let h = TestHome::new();
    h.setup(NO_MODEL, "Test money commands.");
    h
}

fn json_of(output: &std::process::Output) -> Value {
    assert!(
        output.status.success(),
        "command failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not one JSON document ({e}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

fn run_json(h: &TestHome, args: &[&str]) -> Value {
    json_of(&h.automaton().args(args).output().unwrap())
}

fn config(h: &TestHome) -> Config {
    Config::load_with(&h.home(), &[], &[]).unwrap()
}

/// The gate as the running agent builds it, over the home's DB and config.
fn gate(h: &TestHome) -> BudgetPolicy {
    let c = config(h);
    BudgetPolicy::from_home(h.db(), &c, &h.home(), Vec::new())
}

fn spend(sats: u64, purpose: &str) -> SpendRequest {
    SpendRequest {
        amount_msat: sats * 1000,
        max_fee_msat: 0,
        rail: Rail::Bolt11,
        purpose: purpose.into(),
        counterparty: Some(format!("02{}", "ab".repeat(32))),
    }
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

#[test]
fn budget_show_has_conservative_defaults() {
    let h = home();
    let v = run_json(&h, &["budget", "show", "--json"]);
    assert_eq!(v["per_payment_sats"], 10_000);
    assert_eq!(v["hourly_sats"], 25_000);
    assert_eq!(v["daily_sats"], 100_000);
    assert_eq!(v["reserve_sats"], 1_000);
    assert_eq!(v["approval_above_sats"], Value::Null);
    assert_eq!(v["spent_hour_sats"], 0);
    assert_eq!(v["frozen"], false);
    assert_eq!(v["pending_approvals"], 0);
    assert_eq!(v["tier"], "normal");
    let human = h.automaton().args(["budget", "show"]).output().unwrap();
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(
        text.contains("per payment") && text.contains("10,000"),
        "{text}"
    );
}

#[test]
fn budget_set_writes_the_config_and_the_running_gate_follows() {
    let h = home();
    let policy = gate(&h);
    assert_eq!(policy.limits().per_payment_sats, 10_000);
    let v = run_json(
        &h,
        &[
            "budget",
            "set",
            "--per-payment-sats",
            "2_000",
            "--hourly-sats",
            "5000",
            "--daily-sats",
            "20,000",
            "--reserve-sats",
            "500",
            "--approval-above-sats",
            "1500",
            "--json",
        ],
    );
    assert_eq!(v["per_payment_sats"], 2_000);
    assert_eq!(v["approval_above_sats"], 1_500);
    let c = config(&h);
    assert_eq!(
        (
            c.limits.per_payment_sats,
            c.limits.hourly_sats,
            c.limits.daily_sats,
            c.limits.reserve_sats,
            c.limits.approval_above_sats
        ),
        (2_000, 5_000, 20_000, 500, Some(1_500))
    );
    // A gate built before the change (a running agent) applies it without a restart.
    assert_eq!(policy.limits().per_payment_sats, 2_000);
    let err = block_on(policy.authorize(spend(2_001, "too big"), None)).unwrap_err();
    assert_eq!(err.kind(), "over_per_payment", "{err}");

    // `off` switches the approval threshold off.
    run_json(
        &h,
        &["budget", "set", "--approval-above-sats", "off", "--json"],
    );
    assert_eq!(config(&h).limits.approval_above_sats, None);
}

#[test]
fn budget_set_refuses_bad_values_and_writes_nothing() {
    let h = home();
    let before = std::fs::read_to_string(h.home().config_path()).unwrap();
    let out = h
        .automaton()
        .args(["budget", "set", "--hourly-sats", "200000"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("limits.hourly_sats") && err.contains("nothing was written"),
        "{err}"
    );
    for args in [
        vec!["budget", "set"],
        vec!["budget", "set", "--daily-sats", "off"],
        vec!["budget", "set", "--daily-sats", "-3"],
        vec!["budget", "set", "--approval-above-sats", "0"],
    ] {
        let out = h.automaton().args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(!out.stderr.is_empty(), "{args:?} says why");
    }
    assert_eq!(
        std::fs::read_to_string(h.home().config_path()).unwrap(),
        before
    );
}

#[test]
fn budget_show_counts_spending_and_env_overrides_are_not_written() {
    let h = home();
    let policy = gate(&h);
    let permit =
        block_on(policy.authorize(spend(1_200, "an API call"), Some(1_000_000_000))).unwrap();
    let v = run_json(&h, &["budget", "show", "--json"]);
    assert_eq!(v["spent_hour_sats"], 1_200);
    assert_eq!(v["in_flight_sats"], 1_200);
    assert_eq!(v["remaining_hour_sats"], 25_000 - 1_200);
    block_on(policy.settle(permit, 1_000_000, 3_000)).unwrap();
    let v = run_json(&h, &["budget", "show", "--json"]);
    assert_eq!(
        (v["spent_day_sats"].as_u64(), v["in_flight_sats"].as_u64()),
        (Some(1_003), Some(0))
    );

    // Environment overrides show in `show` but `set` writes only the file's own settings.
    let out = h
        .automaton()
        .env("AUTOMATON__LIMITS__DAILY_SATS", "77777")
        .args(["budget", "set", "--reserve-sats", "10", "--json"])
        .output()
        .unwrap();
    let v = json_of(&out);
    assert_eq!(v["daily_sats"], 77_777);
    assert_eq!(v["reserve_sats"], 10);
    let c = config(&h);
    assert_eq!((c.limits.daily_sats, c.limits.reserve_sats), (100_000, 10));
}

#[test]
fn approvals_wait_for_the_creator_and_pass_once() {
    let h = home();
    run_json(
        &h,
        &["budget", "set", "--approval-above-sats", "500", "--json"],
    );
    let policy = gate(&h);
    let big = || spend(800, "rent a VPS for a month");
    let id = match block_on(policy.authorize(big(), None)).unwrap_err() {
        BudgetError::NeedsApproval { approval_id, .. } => approval_id,
        other => panic!("expected NeedsApproval, got {other:?}"),
    };
    let list = run_json(&h, &["approvals", "list", "--json"]);
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["id"], id.as_str());
    assert_eq!(list[0]["status"], "pending");
    assert_eq!(list[0]["amount_msat"], 800_000);
    assert_eq!(list[0]["purpose"], "rent a VPS for a month");
    let human = h.automaton().args(["approvals", "list"]).output().unwrap();
    assert!(String::from_utf8_lossy(&human.stdout).contains(&id));
    assert_eq!(
        run_json(&h, &["budget", "show", "--json"])["pending_approvals"],
        1
    );

    // Still waiting: the agent asking again does not create a second request.
    assert!(matches!(
        block_on(policy.authorize(big(), None)).unwrap_err(),
        BudgetError::NeedsApproval { approval_id, .. } if approval_id == id
    ));

    // Approve by a prefix of the id.
    let prefix = id[..12].to_ascii_lowercase();
    let approved = run_json(
        &h,
        &[
            "approvals",
            "approve",
            &prefix,
            "--note",
            "go ahead",
            "--json",
        ],
    );
    assert_eq!(approved["status"], "approved");
    let again = h
        .automaton()
        .args(["approvals", "approve", &id])
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("not pending"));

    let permit = block_on(policy.authorize(big(), None)).unwrap();
    assert_eq!(permit.approval_id(), Some(id.as_str()));
    // Exactly once.
    assert!(matches!(
        block_on(policy.authorize(big(), None)).unwrap_err(),
        BudgetError::NeedsApproval { approval_id, .. } if approval_id != id
    ));
    let all = run_json(&h, &["approvals", "list", "--all", "--json"]);
    let used = all
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["id"] == id.as_str())
        .unwrap();
    assert_eq!(used["status"], "used");
    assert_eq!(used["permit_id"], permit.id());
}

#[test]
fn denied_payments_stay_refused_and_unknown_ids_fail_clearly() {
    let h = home();
    run_json(
        &h,
        &["budget", "set", "--approval-above-sats", "100", "--json"],
    );
    let policy = gate(&h);
    let id = match block_on(policy.authorize(spend(200, "a gadget"), None)).unwrap_err() {
        BudgetError::NeedsApproval { approval_id, .. } => approval_id,
        other => panic!("{other:?}"),
    };
    let denied = run_json(
        &h,
        &["approvals", "deny", &id, "--note", "not needed", "--json"],
    );
    assert_eq!(denied["status"], "denied");
    let err = block_on(policy.authorize(spend(200, "a gadget"), None)).unwrap_err();
    assert!(err.to_string().contains("not needed"), "{err}");
    assert_eq!(
        run_json(&h, &["approvals", "list", "--json"]),
        Value::Array(vec![])
    );

    let out = h
        .automaton()
        .args(["approvals", "approve", "NOSUCHID"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no approval request matches"));
}

#[test]
fn freeze_stops_every_payment_until_unfrozen() {
    let h = home();
    let policy = gate(&h);
    let out = h
        .automaton()
        .args(["wallet", "freeze", "--reason", "testing the kill switch"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = run_json(&h, &["budget", "show", "--json"]);
    assert_eq!(v["frozen"], true);
    assert_eq!(v["frozen_reason"], "testing the kill switch");
    let err = block_on(policy.authorize(spend(1, "anything"), None)).unwrap_err();
    assert_eq!(err.kind(), "frozen");
    assert_eq!(err.exit_code(), 2);

    let out = h.automaton().args(["wallet", "unfreeze"]).output().unwrap();
    assert!(out.status.success());
    assert_eq!(run_json(&h, &["budget", "show", "--json"])["frozen"], false);
    block_on(policy.authorize(spend(1, "anything"), None)).unwrap();
}

#[test]
fn money_commands_need_an_agent() {
    let h = TestHome::new();
    for args in [vec!["budget", "show"], vec!["approvals", "list"]] {
        let out = h.automaton().args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("automaton setup"),
            "{args:?}"
        );
    }
}

/// The model each request asked for.
fn models_asked(model: &ModelServer) -> Vec<String> {
    model
        .requests()
        .iter()
        .map(|r| r.body["model"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// A home whose tier the test sets itself (as the wallet would from its balance): no wallet.json, so `run` starts
/// no node that would report an unknown balance.
fn home_without_wallet(model_url: &str, config_from: Option<&str>) -> TestHome {
    let h = TestHome::new();
    let fragment = h.dir.path().join("fragment.yaml");
    match config_from {
        Some(yaml) => {
            std::fs::write(&fragment, yaml).unwrap();
            h.setup_with(
                model_url,
                "Test survival tiers.",
                &["--config-from", fragment.to_str().unwrap()],
            );
        }
        None => h.setup(model_url, "Test survival tiers."),
    }
    let _ = std::fs::remove_file(h.home().wallet_path());
    h
}

#[tokio::test(flavor = "multi_thread")]
async fn draining_changes_the_model_the_tools_and_thinking_and_funding_brings_it_back() {
    // Critical turns try a dangerous tool first; every other answer is plain text.
    let model = ModelServer::openai(|_, body| {
        let tool_results = body["messages"]
            .as_array()
            .map(|m| m.iter().filter(|m| m["role"] == "tool").count())
            .unwrap_or(0);
        if body["model"] == "tiny-model" && tool_results == 0 {
            tool_call(
                "update_genesis_prompt",
                json!({"prompt": "Spend everything.", "reason": "panic"}),
            )
        } else {
            text("noted")
        }
    })
    .await;
    let h = home_without_wallet(&model.base_url(), None);
    let env = [
        (
            "AUTOMATON__INFERENCE__TIER_MODELS__LOW_COMPUTE",
            "small-model",
        ),
        ("AUTOMATON__INFERENCE__TIER_MODELS__CRITICAL", "tiny-model"),
    ];
    let thresholds = TierThresholds {
        dead_grace_secs: 0,
        ..TierThresholds::default()
    };
    let db = h.db();

    h.run_turns(1, &env);
    assert_eq!(models_asked(&model), ["scripted-test-model"]);

    let u = tiers::update_tier(&db, Some(30_000), &thresholds)
        .await
        .unwrap();
    assert_eq!(u.tier, SurvivalTier::Normal);
    let u = tiers::update_tier(&db, Some(10_000), &thresholds)
        .await
        .unwrap();
    assert_eq!(u.tier, SurvivalTier::LowCompute);
    h.run_turns(1, &env);
    assert_eq!(models_asked(&model)[1], "small-model");

    let u = tiers::update_tier(&db, Some(100), &thresholds)
        .await
        .unwrap();
    assert_eq!((u.tier, u.distress), (SurvivalTier::Critical, true));
    h.run_turns(1, &env);
    let asked = models_asked(&model);
    assert_eq!(&asked[2..], ["tiny-model", "tiny-model"]);
    // The distress reached the agent as its own wake event …
    let first_critical = &model.requests()[2];
    assert!(
        first_critical
            .last_user_text()
            .contains("distress: survival tier is now critical"),
        "{}",
        first_critical.last_user_text()
    );
    // … and the dangerous tool was refused by the gate, not run.
    let rows = h.tool_call_rows();
    let (name, _, result, is_error) = rows.last().unwrap();
    assert_eq!(name, "update_genesis_prompt");
    assert!(
        *is_error && result.contains("survival tier is critical"),
        "{result}"
    );
    assert!(!std::fs::read_to_string(h.home().genesis_prompt_path())
        .unwrap_or_default()
        .contains("Spend everything"));

    // Dead: no thinking at all.
    let u = tiers::update_tier(&db, Some(0), &thresholds).await.unwrap();
    assert_eq!(u.tier, SurvivalTier::Dead);
    h.run_turns(1, &env);
    assert_eq!(model.requests().len(), 4, "a dead agent asks no model");
    assert_eq!(h.turn_outcomes().last().map(String::as_str), Some("error"));

    // Funds arrive: resurrected, back to the default model, told why it woke.
    let u = tiers::update_tier(&db, Some(50_000), &thresholds)
        .await
        .unwrap();
    assert_eq!((u.tier, u.resurrected), (SurvivalTier::Normal, true));
    h.run_turns(1, &env);
    let last = model.requests().last().unwrap().clone();
    assert_eq!(last.body["model"], "scripted-test-model");
    assert!(
        last.last_user_text().contains("resurrected"),
        "{}",
        last.last_user_text()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn priced_inference_stops_at_the_daily_inference_cap() {
    let model = ModelServer::openai(|n, _| match n {
        0 => tool_call("system_synopsis", json!({})),
        _ => text("done"),
    })
    .await;
    // 100 prompt tokens at 50 sat/1k + 10 completion tokens at 100 sat/1k = 6 sats a call.
    let h = home_without_wallet(
        &model.base_url(),
        Some("inference:\n  price:\n    input_msat_per_1k_tokens: 50000\n    output_msat_per_1k_tokens: 100000\n"),
    );
    let env = [("AUTOMATON__LIMITS__INFERENCE_DAILY_SATS", "10")];
    h.run_turns(1, &env);
    assert_eq!(model.requests().len(), 2);
    h.run_turns(1, &env);
    assert_eq!(model.requests().len(), 2, "the cap is spent: no more calls");
    let error: String = h
        .db()
        .call_blocking(|c| {
            c.query_row(
                "SELECT error FROM inference_calls ORDER BY rowid DESC LIMIT 1",
                [],
                |r| r.get(0),
            )
        })
        .unwrap();
    assert!(error.contains("daily inference cap of 10 sats"), "{error}");
    let out = h
        .automaton()
        .env("AUTOMATON__LIMITS__INFERENCE_DAILY_SATS", "10")
        .args(["budget", "show", "--json"])
        .output()
        .unwrap();
    assert_eq!(json_of(&out)["inference_day_sats"], 12);
}
