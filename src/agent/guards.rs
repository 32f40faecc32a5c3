//! Loop guards: after each turn, decide whether the agent goes on, sleeps because it asked to, or is put to sleep
//! because it is going in circles (same tool pattern, maintenance only, errors in a row, too many turns in one
//! cycle). Forced sleeps back off exponentially until the agent does something different.

use std::time::Duration;

use crate::config::AgentConfig;

/// How a turn ended on its own, before the guards look at it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TurnEnd {
    /// The model called `sleep`.
    Sleep { seconds: u64 },
    /// The model answered with text (or nothing) and no tool call.
    Text,
    /// `max_tool_calls_per_turn` was reached.
    ToolLimit,
    /// Inference failed for good, or the runtime could not continue.
    Error,
    /// The run was stopped.
    Cancelled,
}

/// What the guards need to know about a finished turn.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TurnFacts {
    pub end: TurnEnd,
    /// Sorted `name(arguments)` of the turn's tool calls, `sleep` excluded. Empty: no tool calls.
    pub pattern: Vec<String>,
    /// Every tool call (besides `sleep`) was read-only.
    pub maintenance_only: bool,
    /// Inference failed, or every tool call failed.
    pub failed: bool,
}

impl TurnFacts {
    /// The `turns.outcome` of a turn no guard intervened in.
    pub fn end_label(&self) -> &'static str {
        match self.end {
            TurnEnd::Sleep { .. } => "sleep",
            TurnEnd::Text => "text",
            TurnEnd::ToolLimit => "tool_limit",
            TurnEnd::Error => "error",
            TurnEnd::Cancelled => "cancelled",
        }
    }
}

/// Which guard fired.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Guard {
    Repeat,
    Maintenance,
    Errors,
    Cycle,
}

impl Guard {
    pub fn as_str(self) -> &'static str {
        match self {
            Guard::Repeat => "repeat",
            Guard::Maintenance => "maintenance",
            Guard::Errors => "errors",
            Guard::Cycle => "cycle",
        }
    }

    /// The note the agent reads on waking, so it can change course.
    pub fn notice(self, limit: u32, sleep: Duration) -> String {
        let secs = sleep.as_secs();
        match self {
            Guard::Repeat => format!(
                "[loop guard] You made the same tool calls {limit} turns in a row, so you were put to sleep for \
                 {secs} s. Repeating them will not give a different result: do something else, or sleep longer."
            ),
            Guard::Maintenance => format!(
                "[loop guard] {limit} turns in a row only looked at your own state, so you were put to sleep for \
                 {secs} s. Act on what you know, or sleep until something happens."
            ),
            Guard::Errors => format!(
                "[loop guard] {limit} turns in a row failed, so you were put to sleep for {secs} s. Check what \
                 went wrong before trying again."
            ),
            Guard::Cycle => format!(
                "[loop guard] You worked {limit} turns without resting, so you were put to sleep for {secs} s."
            ),
        }
    }
}

/// The guards' verdict on a turn.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Start the next turn at once.
    Continue,
    /// Sleep; `forced` names the guard that imposed it (None: the agent's own choice or a plain text answer).
    Sleep {
        duration: Duration,
        forced: Option<Guard>,
    },
    /// The run is over (cancelled).
    Stop,
}

/// Counters across turns.
#[derive(Debug)]
pub struct Guards {
    config: AgentConfig,
    last_pattern: Vec<String>,
    repeats: u32,
    maintenance: u32,
    errors: u32,
    turns_in_cycle: u32,
    /// Forced sleeps since the agent last made progress; the exponent of the backoff.
    backoff_level: u32,
}

impl Guards {
    pub fn new(config: &AgentConfig) -> Guards {
        Guards {
            config: config.clone(),
            last_pattern: Vec::new(),
            repeats: 0,
            maintenance: 0,
            errors: 0,
            turns_in_cycle: 0,
            backoff_level: 0,
        }
    }

    fn backoff(&mut self) -> Duration {
        self.backoff_level = self.backoff_level.saturating_add(1);
        let base = self.config.backoff_base_secs;
        let secs = base
            .saturating_mul(2u64.saturating_pow(self.backoff_level.saturating_sub(1).min(40)))
            .min(self.config.backoff_max_secs.max(base));
        Duration::from_secs(secs)
    }

    /// Records a turn and decides what happens next.
    pub fn after_turn(&mut self, facts: &TurnFacts) -> Verdict {
        if facts.end == TurnEnd::Cancelled {
            return Verdict::Stop;
        }
        self.turns_in_cycle += 1;

        if facts.failed {
            self.errors += 1;
        } else {
            self.errors = 0;
        }
        let same_as_last = facts.pattern == self.last_pattern;
        if facts.pattern.is_empty() {
            self.repeats = 0;
        } else if same_as_last {
            self.repeats += 1;
        } else {
            self.repeats = 1;
        }
        self.last_pattern = facts.pattern.clone();
        if !facts.pattern.is_empty() && facts.maintenance_only {
            self.maintenance += 1;
        } else if !facts.pattern.is_empty() {
            self.maintenance = 0;
        }
        let made_progress =
            !facts.failed && !facts.pattern.is_empty() && !facts.maintenance_only && !same_as_last;
        if made_progress {
            self.backoff_level = 0;
        }

        let limit = |n: u32| n.max(1);
        let fired = if self.errors >= limit(self.config.error_limit) {
            Some(Guard::Errors)
        } else if self.repeats >= limit(self.config.repeat_limit) {
            Some(Guard::Repeat)
        } else if self.maintenance >= limit(self.config.maintenance_limit) {
            Some(Guard::Maintenance)
        } else if self.turns_in_cycle >= limit(self.config.max_turns_per_cycle) {
            Some(Guard::Cycle)
        } else {
            None
        };

        if let Some(guard) = fired {
            let mut duration = match guard {
                Guard::Cycle => Duration::from_secs(self.config.default_sleep_secs),
                _ => self.backoff(),
            };
            if let TurnEnd::Sleep { seconds } = facts.end {
                duration = duration.max(Duration::from_secs(seconds));
            }
            match guard {
                Guard::Errors => self.errors = 0,
                Guard::Repeat => self.repeats = 0,
                Guard::Maintenance => self.maintenance = 0,
                Guard::Cycle => {}
            }
            self.turns_in_cycle = 0;
            return Verdict::Sleep {
                duration,
                forced: Some(guard),
            };
        }

        match facts.end {
            TurnEnd::Sleep { seconds } => {
                self.turns_in_cycle = 0;
                Verdict::Sleep {
                    duration: Duration::from_secs(seconds),
                    forced: None,
                }
            }
            // A text answer means the model has nothing to do: rest rather than ask it again at once.
            TurnEnd::Text => {
                self.turns_in_cycle = 0;
                Verdict::Sleep {
                    duration: Duration::from_secs(self.config.default_sleep_secs),
                    forced: None,
                }
            }
            TurnEnd::ToolLimit | TurnEnd::Error => Verdict::Continue,
            TurnEnd::Cancelled => Verdict::Stop,
        }
    }

    /// The limit that belongs to a guard (for notices).
    pub fn limit_of(&self, guard: Guard) -> u32 {
        match guard {
            Guard::Repeat => self.config.repeat_limit,
            Guard::Maintenance => self.config.maintenance_limit,
            Guard::Errors => self.config.error_limit,
            Guard::Cycle => self.config.max_turns_per_cycle,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> AgentConfig {
        AgentConfig {
            repeat_limit: 3,
            maintenance_limit: 3,
            error_limit: 2,
            max_turns_per_cycle: 10,
            backoff_base_secs: 10,
            backoff_max_secs: 25,
            default_sleep_secs: 7,
            ..AgentConfig::default()
        }
    }

    fn turn(end: TurnEnd, pattern: &[&str], maintenance_only: bool, failed: bool) -> TurnFacts {
        TurnFacts {
            end,
            pattern: pattern.iter().map(|s| s.to_string()).collect(),
            maintenance_only,
            failed,
        }
    }

    #[test]
    fn same_pattern_forces_sleep_with_growing_backoff() {
        let mut g = Guards::new(&config());
        let t = turn(
            TurnEnd::ToolLimit,
            &["exec({\"command\":\"ls\"})"],
            false,
            false,
        );
        assert_eq!(g.after_turn(&t), Verdict::Continue);
        assert_eq!(g.after_turn(&t), Verdict::Continue);
        assert_eq!(
            g.after_turn(&t),
            Verdict::Sleep {
                duration: Duration::from_secs(10),
                forced: Some(Guard::Repeat)
            }
        );
        g.after_turn(&t);
        g.after_turn(&t);
        assert_eq!(
            g.after_turn(&t),
            Verdict::Sleep {
                duration: Duration::from_secs(20),
                forced: Some(Guard::Repeat)
            }
        );
        for _ in 0..3 {
            g.after_turn(&t);
        }
        // Capped at backoff_max_secs.
        assert_eq!(g.backoff_level, 3);
        let other = turn(TurnEnd::ToolLimit, &["write_file(x)"], false, false);
        assert_eq!(g.after_turn(&other), Verdict::Continue);
        assert_eq!(g.backoff_level, 0);
    }

    #[test]
    fn maintenance_only_turns() {
        let mut g = Guards::new(&config());
        let a = turn(TurnEnd::ToolLimit, &["system_synopsis({})"], true, false);
        let b = turn(TurnEnd::ToolLimit, &["read_file(a)"], true, false);
        assert_eq!(g.after_turn(&a), Verdict::Continue);
        assert_eq!(g.after_turn(&b), Verdict::Continue);
        assert!(matches!(
            g.after_turn(&a),
            Verdict::Sleep {
                forced: Some(Guard::Maintenance),
                ..
            }
        ));
    }

    #[test]
    fn errors_in_a_row() {
        let mut g = Guards::new(&config());
        let e = turn(TurnEnd::Error, &[], false, true);
        assert_eq!(g.after_turn(&e), Verdict::Continue);
        assert!(matches!(
            g.after_turn(&e),
            Verdict::Sleep {
                forced: Some(Guard::Errors),
                ..
            }
        ));
    }

    #[test]
    fn cycle_cap_and_own_sleep() {
        let mut cfg = config();
        cfg.max_turns_per_cycle = 3;
        let mut g = Guards::new(&cfg);
        for i in 0..2 {
            let t = turn(TurnEnd::ToolLimit, &[&format!("exec({i})")], false, false);
            assert_eq!(g.after_turn(&t), Verdict::Continue);
        }
        let t = turn(TurnEnd::ToolLimit, &["exec(9)"], false, false);
        assert_eq!(
            g.after_turn(&t),
            Verdict::Sleep {
                duration: Duration::from_secs(7),
                forced: Some(Guard::Cycle)
            }
        );
        let s = turn(TurnEnd::Sleep { seconds: 30 }, &[], false, false);
        assert_eq!(
            g.after_turn(&s),
            Verdict::Sleep {
                duration: Duration::from_secs(30),
                forced: None
            }
        );
        let text = turn(TurnEnd::Text, &[], false, false);
        assert_eq!(
            g.after_turn(&text),
            Verdict::Sleep {
                duration: Duration::from_secs(7),
                forced: None
            }
        );
        assert_eq!(
            g.after_turn(&turn(TurnEnd::Cancelled, &[], false, false)),
            Verdict::Stop
        );
    }
}
