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
use crate::inference::{self, ChatRequest, Completion, InferenceError, InferenceProvider};
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
        }
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
        let provider = inference::provider_from_config(&config, self.key.clone())?;
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
    );
    let registry = registry.with_policy(Box::new(TierToolPolicy::new(db.clone())));
    (registry, Arc::new(router))
}
