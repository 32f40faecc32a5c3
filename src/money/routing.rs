//! How money shapes thinking and acting: the inference router (model per survival tier, daily inference cap) and
//! the tool-policy hook that turns expensive (dangerous) tools off in `critical` and `dead`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use serde_json::Value;

use super::tiers::{self, SurvivalTier};
use super::{BudgetError, BudgetPolicy};
use crate::config::{Config, InferenceConfig, Secret};
use crate::home::Home;
use crate::inference::{
    self, ChatRequest, Completion, InferenceError, InferenceProvider, PaidHttp,
};
use crate::state::Db;
use crate::tools::{Authority, AuthorityPolicy, Decision, Registry, ToolDef, ToolPolicy};

/// An inference provider that asks the model of the current survival tier (`inference.tier_models`, same endpoint
/// and key) and refuses to call at all once the daily inference cap is spent.
pub struct TierRouter {
    db: Db,
    config: InferenceConfig,
    key: Option<Secret>,
    default: Arc<dyn InferenceProvider>,
    by_model: Mutex<HashMap<String, Arc<dyn InferenceProvider>>>,
    budget: Option<BudgetPolicy>,
    /// Paid inference (`inference.auth: l402`): other tiers' models pay through the same transport.
    payer: Option<Arc<dyn PaidHttp>>,
}

impl TierRouter {
    /// `default` answers for `config.model`; other tiers' models get providers built from `config` on first use.
    pub fn new(
        db: Db,
        config: InferenceConfig,
        key: Option<Secret>,
        default: Arc<dyn InferenceProvider>,
        budget: Option<BudgetPolicy>,
    ) -> TierRouter {
        TierRouter {
            db,
            config,
            key,
            default,
            by_model: Mutex::new(HashMap::new()),
            budget,
            payer: None,
        }
    }

    /// Other tiers' models pay per call through `payer` too (paid inference).
    pub fn with_payer(mut self, payer: Option<Arc<dyn PaidHttp>>) -> TierRouter {
        self.payer = payer;
        self
    }

    fn provider_for(&self, model: &str) -> Result<Arc<dyn InferenceProvider>, InferenceError> {
        if model == self.config.model {
            return Ok(self.default.clone());
        }
        let mut cache = self
            .by_model
            .lock()
            .map_err(|_| InferenceError::Config("model router lock poisoned".into()))?;
        if let Some(p) = cache.get(model) {
            return Ok(p.clone());
        }
        let config = InferenceConfig {
            model: model.to_string(),
            ..self.config.clone()
        };
        let provider =
            inference::provider_with_payer(&config, self.key.clone(), self.payer.clone())?;
        cache.insert(model.to_string(), provider.clone());
        Ok(provider)
    }
}

#[async_trait]
impl InferenceProvider for TierRouter {
    async fn complete(&self, request: &ChatRequest) -> Result<Completion, InferenceError> {
        if let Some(budget) = &self.budget {
            match budget.check_inference().await {
                Ok(()) => {}
                Err(err @ BudgetError::OverInferenceDaily { .. }) => {
                    tracing::warn!(%err, "inference refused: the daily inference budget is spent");
                    return Err(InferenceError::PaymentRequired {
                        challenge: None,
                        message: format!(
                            "{err}; inference resumes as spending ages out of the 24 h window (limits.inference_daily_sats)"
                        ),
                    });
                }
                Err(err) => {
                    tracing::warn!(%err, "cannot check the inference budget; calling anyway")
                }
            }
        }
        let tier = tiers::load_tier(&self.db).await.unwrap_or_else(|err| {
            tracing::warn!(error = %err, "cannot read the survival tier; using the normal model");
            SurvivalTier::Normal
        });
        if tier == SurvivalTier::Dead && self.config.tier_models.dead.is_none() {
            // A dead agent spends nothing on thinking until funds bring it back (a resurrection wake event).
            return Err(InferenceError::PaymentRequired {
                challenge: None,
                message: "the agent is dead (balance 0 past the grace period): no inference until it is funded \
                          (or inference.tier_models.dead names a free model)"
                    .into(),
            });
        }
        let model = tiers::model_for_tier(&self.config, tier);
        if model != self.config.model {
            tracing::debug!(%tier, %model, "model routed by survival tier");
        }
        self.provider_for(&model)?.complete(request).await
    }
}

/// The registry's policy hook with survival in it: the agent's authority rules (`AuthorityPolicy`), and in
/// `critical` or `dead` no dangerous tool (they spend, rent or spawn) unless the creator started the turn.
pub struct TierToolPolicy {
    db: Db,
    inner: AuthorityPolicy,
}

impl TierToolPolicy {
    pub fn new(db: Db) -> TierToolPolicy {
        TierToolPolicy {
            db,
            inner: AuthorityPolicy,
        }
    }
}

impl ToolPolicy for TierToolPolicy {
    fn check(&self, tool: &ToolDef, args: &Value, authority: Authority) -> Decision {
        let decision = self.inner.check(tool, args, authority);
        if decision != Decision::Allow || tool.risk != crate::tools::Risk::Dangerous {
            return decision;
        }
        if authority == Authority::Creator {
            return Decision::Allow;
        }
        let tier = tiers::current_tier(&self.db);
        if tier.restricts_dangerous_tools() {
            return Decision::Deny(format!(
                "{} is disabled while your survival tier is {tier}: get funded (or ask your creator) first",
                tool.name
            ));
        }
        Decision::Allow
    }
}

/// Wires money into an agent run: the provider behind a `TierRouter` (model per tier, inference cap, no thinking
/// while dead) and the registry behind a `TierToolPolicy`. With no `tier_models` configured the given provider
/// answers every call, so tests' scripted providers keep working.
pub fn wire_agent(
    home: &Home,
    config: &Config,
    db: &Db,
    registry: Registry,
    provider: Arc<dyn InferenceProvider>,
    payer: Option<Arc<dyn PaidHttp>>,
) -> (Registry, Arc<dyn InferenceProvider>) {
    // Other tiers' providers need the key too; an unreadable key only matters once such a model is asked for.
    let key = config.inference_api_key().ok().flatten();
    let budget = BudgetPolicy::from_home(db.clone(), config, home, Vec::new());
    let router = TierRouter::new(
        db.clone(),
        config.inference.clone(),
        key,
        provider,
        Some(budget),
    )
    .with_payer(payer);
    let registry = registry.with_policy(Box::new(TierToolPolicy::new(db.clone())));
    (registry, Arc::new(router))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inference::{Message, StopReason, Usage};
    use crate::money::tiers::{TierThresholds, TIER_KEY};

    /// Answers every call itself and counts them (stands for the configured model).
    struct Fixed(std::sync::atomic::AtomicU32);

    #[async_trait]
    impl InferenceProvider for Fixed {
        async fn complete(&self, _request: &ChatRequest) -> Result<Completion, InferenceError> {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(Completion {
                text: Some("default".into()),
                tool_calls: vec![],
                usage: Usage::default(),
                stop_reason: StopReason::Stop,
                model: "default-model".into(),
            })
        }
    }

    fn request() -> ChatRequest {
        ChatRequest {
            system: "s".into(),
            messages: vec![Message::User {
                content: "hi".into(),
            }],
            tools: vec![],
            max_tokens: 10,
        }
    }

    fn set_tier(db: &Db, tier: SurvivalTier) {
        db.call_blocking(move |c| {
            c.execute(
                "INSERT INTO kv (key, value, updated_at) VALUES (?1, ?2, 'now') \
                 ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                [TIER_KEY, tier.as_str()],
            )
        })
        .unwrap();
    }

    #[tokio::test]
    async fn the_model_follows_the_tier_and_dead_does_not_think() {
        let server = wiremock::MockServer::start().await;
        wiremock::Mock::given(wiremock::matchers::method("POST"))
            .and(wiremock::matchers::body_partial_json(serde_json::json!({"model": "cheap"})))
            .respond_with(wiremock::ResponseTemplate::new(200).set_body_string(
                r#"{"id":"x","object":"chat.completion","created":1,"model":"cheap","choices":[{"index":0,"message":{"role":"assistant","content":"routed"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}"#,
            ))
            .expect(2)
            .mount(&server)
            .await;
        let db = Db::open_in_memory().unwrap();
        let mut config = InferenceConfig {
            base_url: server.uri(),
            model: "default-model".into(),
            ..InferenceConfig::default()
        };
        config.tier_models.low_compute = Some("cheap".into());
        let fixed = Arc::new(Fixed(Default::default()));
        let router = TierRouter::new(db.clone(), config, None, fixed.clone(), None);

        let c = router.complete(&request()).await.unwrap();
        assert_eq!(c.text.as_deref(), Some("default"), "no tier stored: normal");
        set_tier(&db, SurvivalTier::LowCompute);
        assert_eq!(router.complete(&request()).await.unwrap().model, "cheap");
        set_tier(&db, SurvivalTier::Critical);
        assert_eq!(router.complete(&request()).await.unwrap().model, "cheap");
        set_tier(&db, SurvivalTier::Dead);
        let err = router.complete(&request()).await.unwrap_err();
        assert!(
            matches!(err, InferenceError::PaymentRequired { .. }),
            "{err:?}"
        );
        set_tier(&db, SurvivalTier::High);
        router.complete(&request()).await.unwrap();
        assert_eq!(fixed.0.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn spent_inference_budget_stops_calls() {
        let db = Db::open_in_memory().unwrap();
        let limits = crate::config::LimitsConfig {
            inference_daily_sats: Some(10),
            tiers: TierThresholds::default(),
            ..Default::default()
        };
        let fixed = Arc::new(Fixed(Default::default()));
        let router = TierRouter::new(
            db.clone(),
            InferenceConfig::default(),
            None,
            fixed.clone(),
            Some(BudgetPolicy::new(db.clone(), limits)),
        );
        router.complete(&request()).await.unwrap();
        db.call_blocking(|c| {
            c.execute(
                "INSERT INTO inference_calls (id, provider, model, cost_sats, duration_ms, created_at) \
                 VALUES ('a', 'openai', 'm', 10, 1, ?1)",
                [crate::state::now_rfc3339()],
            )
        })
        .unwrap();
        let err = router.complete(&request()).await.unwrap_err();
        assert!(
            err.to_string().contains("daily inference cap of 10 sats"),
            "{err}"
        );
        assert_eq!(fixed.0.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[test]
    fn dangerous_tools_are_off_in_critical_and_dead() {
        let db = Db::open_in_memory().unwrap();
        let policy = TierToolPolicy::new(db.clone());
        let def = |risk| ToolDef {
            name: "pay_invoice",
            description: "",
            parameters: serde_json::json!({}),
            risk,
            read_only: false,
        };
        let dangerous = def(crate::tools::Risk::Dangerous);
        let caution = def(crate::tools::Risk::Caution);
        let check = |d: &ToolDef, a| policy.check(d, &Value::Null, a);
        assert_eq!(check(&dangerous, Authority::Agent), Decision::Allow);
        assert!(matches!(
            check(&dangerous, Authority::External),
            Decision::Deny(_)
        ));
        for tier in [SurvivalTier::Critical, SurvivalTier::Dead] {
            set_tier(&db, tier);
            assert!(
                matches!(check(&dangerous, Authority::Agent), Decision::Deny(r) if r.contains(tier.as_str()))
            );
            assert_eq!(check(&dangerous, Authority::Creator), Decision::Allow);
            assert_eq!(check(&caution, Authority::Agent), Decision::Allow);
        }
        set_tier(&db, SurvivalTier::LowCompute);
        assert_eq!(check(&dangerous, Authority::Agent), Decision::Allow);
    }
}
