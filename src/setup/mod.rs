//! First-run setup: turns answers (wizard) or flags (`--yes`) into a complete home, and never destroys one.
//!
//! Layers for setup: existing `automaton.yaml` (with `--reconfigure`) or defaults → `--lab` → `--config-from`
//! → flags → `-c key=value` → the wizard's answers. Nothing is written until every input has been read and the
//! resulting config validated, so bad input loses nothing. Setup never contacts the inference endpoint.

pub mod defaults;
pub mod git;
pub mod lab;
pub mod wizard;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use crate::config::{self, Config, InferenceKind, Override};
use crate::home::Home;
use crate::state::Db;

/// Longest genesis prompt accepted: it is sent with every turn, so its size is a recurring cost.
pub const MAX_GENESIS_CHARS: usize = 4000;

/// Where the genesis prompt comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GenesisSource {
    Text(String),
    File(PathBuf),
}

/// Everything `automaton setup` was told on the command line.
#[derive(Clone, Debug, Default)]
pub struct SetupRequest {
    /// Non-interactive: take every answer from flags and defaults.
    pub yes: bool,
    /// Edit an existing agent in place instead of refusing.
    pub reconfigure: bool,
    pub name: Option<String>,
    pub provider: Option<InferenceKind>,
    pub inference_url: Option<String>,
    pub model: Option<String>,
    pub api_key_env: Option<String>,
    pub api_key_file: Option<PathBuf>,
    pub genesis: Option<GenesisSource>,
    /// npub, node id, or a plain name.
    pub creator: Option<String>,
    pub creator_message: Option<String>,
    pub config_from: Option<PathBuf>,
    pub lab: Option<PathBuf>,
    pub overrides: Vec<Override>,
    /// Restore the wallet from this file (the mnemonic words, or a `wallet.json` backup) instead of generating one.
    pub mnemonic_file: Option<PathBuf>,
}

/// What setup did, for the closing summary.
#[derive(Clone, Debug)]
pub struct SetupOutcome {
    pub config: Config,
    pub reconfigured: bool,
    pub git: git::GitOutcome,
    pub warnings: Vec<String>,
    /// The agent's wallet: node id, npub, and whether setup just created it.
    pub wallet: crate::wallet::IdentitySetup,
}

/// Runs setup on `home`. Interactive unless `request.yes`.
pub fn run(home: &Home, request: &SetupRequest) -> anyhow::Result<SetupOutcome> {
    let existing = home.is_set_up();
    if existing && !request.reconfigure {
        let name = Config::from_yaml(
            &std::fs::read_to_string(home.config_path()).unwrap_or_default(),
            &home.config_path(),
        )
        .map(|c| format!(" ({})", c.name))
        .unwrap_or_default();
        bail!(
            "an agent{name} is already set up in {}; nothing was changed. Use `automaton setup --reconfigure` \
             to edit it in place, or choose another home with --home",
            home.root().display()
        );
    }
    if request.reconfigure && !existing {
        bail!(
            "--reconfigure: there is no agent in {} yet; run `automaton setup` without --reconfigure",
            home.root().display()
        );
    }
    if !existing {
        refuse_foreign_directory(home)?;
    }
    if request.reconfigure && request.genesis.is_some() {
        bail!(
            "--reconfigure keeps the genesis prompt; to change it, edit {} (it is tracked in the home's git history)",
            home.genesis_prompt_path().display()
        );
    }

    let mut config = if existing {
        let path = home.config_path();
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        // The file alone: env overrides are for one process and must not be baked into the file.
        Config::from_yaml(&text, &path)?
    } else {
        // A newborn sells one thing from the start: a node-signed attestation of its status (21 sats, plain GET).
        let mut config = Config::default();
        config.http.services = vec![crate::config::services::status_attestation()];
        config
    };
    let mut given = Given {
        name: existing,
        base_url: existing,
        model: existing,
    };

    if let Some(lab_path) = &request.lab {
        let layer = lab::overlay(lab_path)?;
        given.note(&layer);
        config = config.merged(layer, &lab_path.display().to_string())?;
    }
    if let Some(path) = &request.config_from {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read --config-from {}", path.display()))?;
        let layer = Config::yaml_layer(&text, path)?;
        given.note(&layer);
        config = config.merged(layer, &path.display().to_string())?;
    }
    apply_flags(&mut config, request, &mut given)?;
    for o in &request.overrides {
        config =
            config.with_override(&o.key, &o.value, &format!("flag -c {}={}", o.key, o.value))?;
        given.note_key(&o.key);
    }
    if let Some(lab_path) = &request.lab {
        lab::apply_paid_model(&mut config, lab_path)?;
    }

    // Read (and check) a restore file before anything is written: bad input loses nothing.
    let restored = match &request.mnemonic_file {
        Some(path) => Some(crate::wallet::Identity::from_restore_file(path)?),
        None => None,
    };
    if let Some(restored) = &restored {
        if home.wallet_path().exists() {
            let existing = crate::wallet::Identity::load(&home.wallet_path())?;
            if existing.node_id() != restored.node_id() {
                bail!(
                    "{} already holds a different wallet; setup never replaces a wallet (move it away first if you \
                     really mean to); nothing was written",
                    home.wallet_path().display()
                );
            }
        }
    }

    let mut genesis = match &request.genesis {
        Some(GenesisSource::Text(text)) => Some(check_genesis(text.clone())?),
        Some(GenesisSource::File(path)) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read --genesis-file {}", path.display()))?;
            Some(check_genesis(text)?)
        }
        None => None,
    };

    if request.yes {
        let mut missing = Vec::new();
        if !given.name {
            missing.push("--name");
        }
        if !given.base_url {
            missing.push("--inference-url");
        }
        if !given.model {
            missing.push("--model");
        }
        if !missing.is_empty() {
            bail!(
                "setup --yes needs {} (or --lab DIR/lab.json / --config-from FILE providing them); nothing was written",
                missing.join(", ")
            );
        }
    } else {
        let answers = wizard::run(home, config, existing)?;
        config = answers.config;
        if answers.genesis.is_some() {
            genesis = answers.genesis;
        }
    }

    pick_http_port(&mut config)?;
    let mut resolved = config.clone();
    resolved.resolve_paths(home);
    resolved
        .validate("setup")
        .map_err(|err| anyhow::anyhow!("{err}; nothing was written"))?;
    let warnings = check_secrets(&resolved)?;

    let wallet = write_home(home, &config, genesis.as_deref(), existing, restored)?;
    if let Some(lab_path) = &request.lab {
        lab::write_secrets(home, lab_path)?;
    }
    // Same shape as every other change in `automaton logs --changes`: the item, then who made it.
    let message = if existing {
        crate::audit::message(
            &crate::audit::Actor::command("setup --reconfigure"),
            &format!("reconfigure {}", config.name),
        )
    } else {
        crate::audit::message(
            &crate::audit::Actor::command("setup"),
            &format!("setup: {} is born", config.name),
        )
    };
    // The agent is complete without its history; a git failure must not make a finished setup look failed.
    let git = git::commit(home, &message).unwrap_or_else(|err| {
        git::GitOutcome::Skipped(format!("the home's git history was not updated: {err}"))
    });
    Ok(SetupOutcome {
        config,
        reconfigured: existing,
        git,
        warnings,
        wallet,
    })
}

/// What a home may already hold before `automaton.yaml` exists: leftovers of an interrupted setup.
const SETUP_ENTRIES: &[&str] = &[
    ".git",
    ".gitignore",
    "genesis",
    "skills",
    "logs",
    "workspace",
    "heartbeat.yaml",
    "state.db",
    "state.db-wal",
    "state.db-shm",
    "state.db-journal",
    "agent.lock",
    "wallet.json",
    "node",
];

/// Refuses to turn a directory that holds something else (a mistyped `--home ~/projects`) into an agent's
/// home: setup makes it private (0700) and a git repository, which its owner did not ask for.
fn refuse_foreign_directory(home: &Home) -> anyhow::Result<()> {
    let entries = match std::fs::read_dir(home.root()) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(err) if err.kind() == std::io::ErrorKind::NotADirectory => {
            bail!("{} is a file, not a directory", home.root().display())
        }
        Err(err) => {
            return Err(err).with_context(|| format!("cannot read {}", home.root().display()))
        }
    };
    let mut foreign: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| {
            !SETUP_ENTRIES.contains(&name.as_str()) && !name.starts_with(".automaton.yaml.tmp")
        })
        .collect();
    if foreign.is_empty() {
        return Ok(());
    }
    foreign.sort();
    foreign.truncate(5);
    bail!(
        "{} already holds other files ({}) and no agent; choose a new or empty directory with --home; nothing was written",
        home.root().display(),
        foreign.join(", ")
    )
}

/// Which required settings some explicit layer provided (so `--yes` never silently runs on OpenAI defaults).
struct Given {
    name: bool,
    base_url: bool,
    model: bool,
}

impl Given {
    fn note(&mut self, layer: &serde_json::Value) {
        if layer.get("name").is_some() {
            self.name = true;
        }
        if let Some(inference) = layer.get("inference") {
            self.base_url |= inference.get("base_url").is_some();
            self.model |= inference.get("model").is_some();
        }
    }

    fn note_key(&mut self, key: &str) {
        match key {
            "name" => self.name = true,
            "inference.base_url" => self.base_url = true,
            "inference.model" => self.model = true,
            _ => {}
        }
    }
}

fn apply_flags(config: &mut Config, r: &SetupRequest, given: &mut Given) -> anyhow::Result<()> {
    if let Some(name) = &r.name {
        config.name = name.trim().to_string();
        given.name = true;
    }
    if let Some(kind) = r.provider {
        if kind != config.inference.provider {
            config.inference.provider = kind;
            // Switching protocol without naming an endpoint means "that provider's usual endpoint".
            if let Some(info) = crate::inference::backends()
                .into_iter()
                .find(|b| b.kind == kind.as_str())
            {
                if r.inference_url.is_none() {
                    config.inference.base_url = info.default_base_url.to_string();
                }
                if r.model.is_none() {
                    config.inference.model = info.default_model.to_string();
                }
            }
        }
    }
    if let Some(url) = &r.inference_url {
        config.inference.base_url = url.trim().to_string();
        given.base_url = true;
    }
    if let Some(model) = &r.model {
        config.inference.model = model.trim().to_string();
        given.model = true;
    }
    if let Some(var) = &r.api_key_env {
        let var = var.trim();
        config.inference.api_key_env = (!var.is_empty()).then(|| var.to_string());
    }
    if let Some(file) = &r.api_key_file {
        config.inference.api_key_file = Some(file.clone());
    }
    if let Some(creator) = &r.creator {
        set_creator(config, creator)?;
    }
    if let Some(message) = &r.creator_message {
        config.creator.message = Some(message.clone());
    }
    Ok(())
}

/// `--creator` takes an npub, a node id, or a name, and files it where it belongs.
pub fn set_creator(config: &mut Config, creator: &str) -> anyhow::Result<()> {
    let creator = creator.trim();
    if creator.is_empty() {
        return Ok(());
    }
    if creator.starts_with("npub") {
        config::validate_npub(creator).map_err(|e| anyhow::anyhow!("--creator: {e}"))?;
        config.creator.npub = Some(creator.to_string());
    } else if creator.len() == 66 && creator.chars().all(|c| c.is_ascii_hexdigit()) {
        config::validate_node_id(creator).map_err(|e| anyhow::anyhow!("--creator: {e}"))?;
        config.creator.node_id = Some(creator.to_string());
    } else {
        config.creator.name = Some(creator.to_string());
    }
    Ok(())
}

/// Checks a genesis prompt's size and content; returns it with a trailing newline.
pub fn check_genesis(text: String) -> anyhow::Result<String> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        bail!("the genesis prompt is empty");
    }
    let chars = trimmed.chars().count();
    if chars > MAX_GENESIS_CHARS {
        bail!(
            "the genesis prompt has {chars} characters; at most {MAX_GENESIS_CHARS} are allowed (it is sent with every turn)"
        );
    }
    Ok(format!("{trimmed}\n"))
}

/// Records a free loopback port for the agent's HTTP face, unless one is configured.
fn pick_http_port(config: &mut Config) -> anyhow::Result<()> {
    if config.http.listen.is_none() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")
            .context("cannot find a free loopback port for the agent's HTTP face")?;
        let addr = listener.local_addr()?;
        config.http.listen = Some(addr.to_string());
        if config.http.public_url.is_none() {
            config.http.public_url = Some(format!("http://{addr}"));
        }
    }
    Ok(())
}

/// A key file readable by others is refused now, not at the first turn; a key not yet in the environment is
/// only a warning, because setup often runs before the secret is provisioned.
fn check_secrets(config: &Config) -> anyhow::Result<Vec<String>> {
    let mut warnings = Vec::new();
    if let Some(path) = &config.inference.api_key_file {
        if path.exists() {
            config::read_secret_file(path)?;
        } else {
            warnings.push(format!(
                "API key file {} does not exist yet; create it with mode 0600 before `automaton run`",
                path.display()
            ));
        }
    } else if let Some(var) = &config.inference.api_key_env {
        if std::env::var_os(var).is_none_or(|v| v.is_empty()) {
            warnings.push(format!(
                "{var} is not set in this environment; set it before `automaton run`"
            ));
        }
    }
    Ok(warnings)
}

fn write_home(
    home: &Home,
    config: &Config,
    genesis: Option<&str>,
    existing: bool,
    restored: Option<crate::wallet::Identity>,
) -> anyhow::Result<crate::wallet::IdentitySetup> {
    let root = home.root();
    std::fs::create_dir_all(root).with_context(|| format!("cannot create {}", root.display()))?;
    if !existing {
        // The home holds the wallet and everything the agent did: private to its user.
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot set permissions on {}", root.display()))?;
    }
    for dir in [
        home.genesis_dir(),
        home.skills_dir(),
        home.logs_dir(),
        home.workspace_dir(),
    ] {
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
    }

    if !existing || !home.genesis_prompt_path().exists() {
        let text = genesis.unwrap_or(defaults::GENESIS_PROMPT);
        write_new(&home.genesis_prompt_path(), text, 0o644)?;
    }
    if !home.constitution_path().exists() {
        write_new(&home.constitution_path(), defaults::CONSTITUTION, 0o444)?;
    }
    if !home.heartbeat_path().exists() {
        write_new(&home.heartbeat_path(), defaults::HEARTBEAT_EXAMPLE, 0o644)?;
    }
    for (name, text) in defaults::SKILLS {
        let dir = home.skills_dir().join(name);
        // A skill the agent or its creator changed is theirs; reconfigure only restores missing ones.
        if !dir.exists() {
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            write_new(&dir.join("SKILL.md"), text, 0o644)?;
        }
    }
    // The wallet comes before the config: a rerun of an interrupted setup finds and keeps it.
    let wallet = crate::wallet::identity::ensure(&home.wallet_path(), restored)?;
    let db = Db::open(&home.db_path())?;
    // Records the constitution's hash (a new home) or checks it (reconfigure): `run` refuses altered laws.
    crate::genesis::check_constitution(home, &db)?;
    crate::wallet::record_identity(&db, &wallet.node_id, &wallet.npub, &config.wallet.network)?;
    // Written last: its presence is what marks the home as set up, so an interrupted setup can simply rerun.
    config.write(home)?;
    Ok(wallet)
}

fn write_new(path: &Path, text: &str, mode: u32) -> anyhow::Result<()> {
    config::write_atomic(path, text.as_bytes(), mode)
        .with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creator_is_sorted_by_shape() {
        let mut c = Config::default();
        set_creator(&mut c, &format!("npub1{}", "q".repeat(58))).unwrap();
        set_creator(&mut c, &format!("02{}", "a".repeat(64))).unwrap();
        set_creator(&mut c, "Ada Lovelace").unwrap();
        assert!(c.creator.npub.is_some());
        assert!(c.creator.node_id.is_some());
        assert_eq!(c.creator.name.as_deref(), Some("Ada Lovelace"));
        assert!(set_creator(&mut c, "npub1short").is_err());
    }

    #[test]
    fn genesis_limits() {
        assert!(check_genesis("  ".into()).is_err());
        assert!(check_genesis("x".repeat(MAX_GENESIS_CHARS + 1)).is_err());
        assert_eq!(check_genesis("be useful".into()).unwrap(), "be useful\n");
    }
}
