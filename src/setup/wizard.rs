//! The interactive setup wizard: asks what each backend declares it needs, with the current values as defaults.

use std::io::IsTerminal;

use anyhow::{bail, Context};
use dialoguer::theme::ColorfulTheme;
use dialoguer::{Confirm, Input, Select};
use serde_json::Value;

use super::{check_genesis, set_creator};
use crate::config::keys::ConfigKey;
use crate::config::{self, Config, ConfigError, InferenceKind};
use crate::home::Home;

/// What the wizard collected.
pub struct Answers {
    pub config: Config,
    /// `None`: keep the default (new agent) or the existing prompt (reconfigure).
    pub genesis: Option<String>,
}

/// Runs the wizard over `config` (defaults, or the existing agent's config with `--reconfigure`).
pub fn run(home: &Home, mut config: Config, existing: bool) -> anyhow::Result<Answers> {
    if !std::io::stdin().is_terminal() || !console::Term::stderr().is_term() {
        bail!(
            "setup is interactive but no terminal is attached; for scripts use \
             `automaton setup --yes --name NAME --inference-url URL --model MODEL [--api-key-env VAR]`"
        );
    }
    let _interrupt = InterruptGuard::install();
    let theme = ColorfulTheme::default();
    let home_shown = home.root().display();
    if existing {
        eprintln!("Reconfiguring the agent in {home_shown}. Enter keeps the current value; - empties it.\n");
    } else {
        eprintln!(
            "Setting up a new automaton in {home_shown}.\n\
             It will think with a model you choose, act on this machine, and live on its own Lightning wallet.\n\
             Enter accepts the value in parentheses; - leaves a setting empty.\n"
        );
    }

    // Identity.
    let mut name_prompt = Input::<String>::with_theme(&theme).with_prompt("Agent name");
    if !config.name.is_empty() {
        name_prompt = name_prompt.default(config.name.clone());
    }
    config.name = name_prompt
        .validate_with(|s: &String| config::validate_name(s.trim()))
        .interact_text()
        .map_err(cancelled)?
        .trim()
        .to_string();

    let mut genesis = None;
    if existing {
        eprintln!(
            "  The genesis prompt is kept; edit {} to change it.",
            home.genesis_prompt_path().display()
        );
    } else {
        let answer: String = Input::with_theme(&theme)
            .with_prompt("Genesis prompt: what should this agent do with its life? (Enter for the default, @FILE reads a file)")
            .allow_empty(true)
            .validate_with(|s: &String| genesis_answer(s).map(|_| ()).map_err(|e| e.to_string()))
            .interact_text()
            .map_err(cancelled)?;
        genesis = genesis_answer(&answer)?;
    }

    let creator_name: String = Input::with_theme(&theme)
        .with_prompt("Your name, as the agent's creator (Enter to skip)")
        .with_initial_text(config.creator.name.clone().unwrap_or_default())
        .allow_empty(true)
        .interact_text()
        .map_err(cancelled)?;
    config.creator.name = non_empty(&creator_name);

    let current_id = config
        .creator
        .npub
        .clone()
        .or_else(|| config.creator.node_id.clone())
        .unwrap_or_default();
    let creator_id: String = Input::with_theme(&theme)
        .with_prompt(
            "Your npub or Lightning node id, so the agent can recognise you (Enter to skip)",
        )
        .with_initial_text(current_id)
        .allow_empty(true)
        .validate_with(|s: &String| {
            let s = s.trim();
            if s.is_empty()
                || config::validate_npub(s).is_ok()
                || config::validate_node_id(s).is_ok()
            {
                Ok(())
            } else {
                Err("expected npub1… or a 66-character hex node id".to_string())
            }
        })
        .interact_text()
        .map_err(cancelled)?;
    config.creator.npub = None;
    config.creator.node_id = None;
    if !creator_id.trim().is_empty() {
        set_creator(&mut config, &creator_id)?;
    }

    // Inference.
    let backends = crate::inference::backends();
    let current = backends
        .iter()
        .position(|b| b.kind == config.inference.provider.as_str())
        .unwrap_or(0);
    let labels: Vec<&str> = backends.iter().map(|b| b.label).collect();
    let chosen = Select::with_theme(&theme)
        .with_prompt("Inference backend (arrows, Enter)")
        .items(&labels)
        .default(current)
        .interact()
        .map_err(cancelled)?;
    let backend = &backends[chosen];
    let kind: InferenceKind = backend
        .kind
        .parse()
        .map_err(|e: String| anyhow::anyhow!(e))?;
    let switched = kind != config.inference.provider;
    config.inference.provider = kind;
    config = ask_keys(&theme, config, backend.keys, switched)?;
    if let Some(var) = &config.inference.api_key_env {
        if std::env::var_os(var).is_none_or(|v| v.is_empty()) {
            eprintln!("  Note: {var} is not set in this shell; set it before `automaton run`.");
        }
    }

    // Compute.
    let computes = crate::compute::backends();
    let current = computes
        .iter()
        .position(|b| b.kind == config.compute.provider)
        .unwrap_or(0);
    let labels: Vec<&str> = computes.iter().map(|b| b.label).collect();
    let chosen = Select::with_theme(&theme)
        .with_prompt("Compute: where the agent runs its commands")
        .items(&labels)
        .default(current)
        .interact()
        .map_err(cancelled)?;
    let compute = &computes[chosen];
    let switched = compute.kind != config.compute.provider;
    config.compute.provider = compute.kind.to_string();
    config = ask_keys(&theme, config, compute.keys, switched)?;

    // Money.
    eprintln!("\nSpending limits (sats). Payments above them are refused before anything is paid.");
    config.limits.per_payment_sats = ask_sats(
        &theme,
        "Largest single payment",
        config.limits.per_payment_sats,
    )?;
    config.limits.hourly_sats =
        ask_sats(&theme, "Most spent in any hour", config.limits.hourly_sats)?;
    config.limits.daily_sats = ask_sats(&theme, "Most spent in any day", config.limits.daily_sats)?;
    config.limits.reserve_sats = ask_sats(
        &theme,
        "Reserve: balance the agent never spends below",
        config.limits.reserve_sats,
    )?;

    let mut checked = config.clone();
    checked.resolve_paths(home);
    if let Err(err) = checked.validate("your answers") {
        bail!("{err}; nothing was written");
    }

    eprintln!("\n{}", summary(&config));
    let write = Confirm::with_theme(&theme)
        .with_prompt(format!("Write this agent to {home_shown}?"))
        .default(true)
        .interact()
        .map_err(cancelled)?;
    if !write {
        bail!("setup cancelled; nothing was written");
    }
    Ok(Answers { config, genesis })
}

/// While the wizard asks, Ctrl-C ends setup with a clear word and the cursor restored (a `Select` hides it);
/// nothing has been written yet. Once answers are being written, Ctrl-C waits for the write to finish.
struct InterruptGuard;

static ASKING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

impl InterruptGuard {
    fn install() -> InterruptGuard {
        use std::sync::atomic::Ordering;
        static INSTALLED: std::sync::Once = std::sync::Once::new();
        ASKING.store(true, Ordering::SeqCst);
        INSTALLED.call_once(|| {
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                else {
                    return;
                };
                runtime.block_on(async move {
                    use tokio::signal::unix::{signal, SignalKind};
                    // Registered before the first question is shown, so an early Ctrl-C is caught too.
                    let Ok(mut interrupt) = signal(SignalKind::interrupt()) else {
                        return;
                    };
                    let _ = ready_tx.send(());
                    while interrupt.recv().await.is_some() {
                        if ASKING.load(Ordering::SeqCst) {
                            let _ = console::Term::stderr().show_cursor();
                            eprintln!("\nsetup cancelled; nothing was written");
                            std::process::exit(130);
                        }
                    }
                });
            });
            let _ = ready_rx.recv_timeout(std::time::Duration::from_secs(5));
        });
        InterruptGuard
    }
}

impl Drop for InterruptGuard {
    fn drop(&mut self) {
        ASKING.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Asks each declared key, defaulting to the current value (or the backend's default after a switch).
fn ask_keys(
    theme: &ColorfulTheme,
    mut config: Config,
    keys: &[ConfigKey],
    switched: bool,
) -> anyhow::Result<Config> {
    for key in keys {
        if key.secret {
            // Secrets never pass through the wizard or the config file.
            eprintln!(
                "  {} is a secret: put it in an environment variable or a 0600 file, never in automaton.yaml.",
                key.prompt
            );
            continue;
        }
        let current = current_value(&config, key.name);
        let mut default = if switched || current.is_empty() {
            key.default.map(str::to_string).unwrap_or(current)
        } else {
            current
        };
        // A model server on this machine (ollama, llama.cpp, the lab) normally wants no key at all.
        if key.name == "inference.api_key_env"
            && (switched || config.inference.api_key_env.is_none())
            && is_loopback(&config.inference.base_url)
        {
            default.clear();
        }
        let base = config.clone();
        let mut input = Input::<String>::with_theme(theme)
            .with_prompt(key.prompt)
            .allow_empty(true);
        if !default.is_empty() {
            input = input.default(default);
        }
        let answer = input
            .validate_with(|s: &String| check_key(&base, key.name, emptied(s)).map(|_| ()))
            .interact_text()
            .map_err(cancelled)?;
        config = check_key(&config, key.name, emptied(&answer)).map_err(|e| anyhow::anyhow!(e))?;
    }
    Ok(config)
}

/// Applies one answer and reports only problems with that key, so later questions are not blamed early.
fn check_key(config: &Config, key: &str, answer: &str) -> Result<Config, String> {
    let updated = config
        .with_override(key, answer, "answer")
        .map_err(|e| match e {
            ConfigError::Override { message, .. } => message,
            other => other.to_string(),
        })?;
    match updated.problems().into_iter().find(|(bad, _)| *bad == key) {
        Some((_, reason)) => Err(reason),
        None => Ok(updated),
    }
}

/// `-` is how a person clears a setting that has a default (Enter would keep the default).
fn emptied(answer: &str) -> &str {
    match answer.trim() {
        "-" => "",
        other => other,
    }
}

fn is_loopback(url: &str) -> bool {
    let Some(host) = reqwest::Url::parse(url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_string))
    else {
        return false;
    };
    host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn current_value(config: &Config, key: &str) -> String {
    let mut value = serde_json::to_value(config).unwrap_or(Value::Null);
    for segment in key.split('.') {
        value = value.get(segment).cloned().unwrap_or(Value::Null);
    }
    match value {
        Value::Null => String::new(),
        Value::String(s) => s,
        other => other.to_string(),
    }
}

fn ask_sats(theme: &ColorfulTheme, prompt: &str, current: u64) -> anyhow::Result<u64> {
    Input::<u64>::with_theme(theme)
        .with_prompt(prompt)
        .default(current)
        .interact_text()
        .map_err(cancelled)
}

fn genesis_answer(answer: &str) -> anyhow::Result<Option<String>> {
    let answer = answer.trim();
    if answer.is_empty() {
        return Ok(None);
    }
    if let Some(path) = answer.strip_prefix('@') {
        let text = std::fs::read_to_string(path.trim())
            .with_context(|| format!("cannot read {}", path.trim()))?;
        return check_genesis(text).map(Some);
    }
    check_genesis(answer.to_string()).map(Some)
}

fn non_empty(s: &str) -> Option<String> {
    let s = s.trim();
    (!s.is_empty()).then(|| s.to_string())
}

fn summary(config: &Config) -> String {
    let key = match (
        &config.inference.api_key_env,
        &config.inference.api_key_file,
    ) {
        (Some(var), _) => format!("API key from ${var}"),
        (None, Some(file)) => format!("API key from {}", file.display()),
        (None, None) => "no API key".to_string(),
    };
    let creator = [
        config.creator.name.as_deref(),
        config.creator.npub.as_deref(),
        config.creator.node_id.as_deref(),
    ]
    .into_iter()
    .flatten()
    .collect::<Vec<_>>()
    .join(", ");
    format!(
        "  name:       {}\n  creator:    {}\n  inference:  {} {} at {} ({key})\n  compute:    {}\n  limits:     {} per payment, {} per hour, {} per day, reserve {} (sats)",
        config.name,
        if creator.is_empty() { "(not given)" } else { &creator },
        config.inference.provider,
        config.inference.model,
        config.inference.base_url,
        config.compute.provider,
        config.limits.per_payment_sats,
        config.limits.hourly_sats,
        config.limits.daily_sats,
        config.limits.reserve_sats,
    )
}

fn cancelled(err: dialoguer::Error) -> anyhow::Error {
    match err {
        dialoguer::Error::IO(e) if e.kind() == std::io::ErrorKind::Interrupted => {
            anyhow::anyhow!("setup cancelled; nothing was written")
        }
        dialoguer::Error::IO(e) => {
            anyhow::anyhow!("terminal error during setup: {e}; nothing was written")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_key_blames_only_the_asked_key() {
        let config = Config::default(); // name is empty: invalid, but not the key being asked
        assert!(check_key(&config, "inference.base_url", "http://127.0.0.1:1/v1").is_ok());
        let err = check_key(&config, "inference.base_url", "not a url").unwrap_err();
        assert!(err.contains("not a URL"), "{err}");
        let err = check_key(&config, "compute.exec_timeout_secs", "soon").unwrap_err();
        assert!(err.contains("compute.exec_timeout_secs"), "{err}");
        let updated = check_key(&config, "inference.api_key_env", "").unwrap();
        assert_eq!(updated.inference.api_key_env, None);
    }

    #[test]
    fn loopback_and_dash() {
        assert!(is_loopback("http://127.0.0.1:11434/v1"));
        assert!(is_loopback("http://localhost:8080/v1"));
        assert!(is_loopback("http://[::1]:8080/v1"));
        assert!(!is_loopback("https://api.openai.com/v1"));
        assert_eq!(emptied(" - "), "");
        assert_eq!(emptied("X"), "X");
    }

    #[test]
    fn current_value_reads_dotted_keys() {
        let config = Config::default();
        assert_eq!(current_value(&config, "inference.max_tokens"), "4096");
        assert_eq!(current_value(&config, "compute.workdir"), "");
    }
}
