//! `automaton setup`: create (or with --reconfigure, edit) the agent in a home.

use std::path::PathBuf;

use clap::Args;

use crate::config::{InferenceKind, Override};
use crate::home::Home;
use crate::setup::{self, git::GitOutcome, GenesisSource, SetupRequest};

#[derive(Debug, Args)]
pub struct SetupArgs {
    /// Non-interactive: take every answer from flags, --lab or --config-from (for scripts and parent agents)
    #[arg(short = 'y', long)]
    yes: bool,
    /// Edit the existing agent in place (keeps its genesis prompt, skills and state)
    #[arg(long)]
    reconfigure: bool,
    /// The agent's name
    #[arg(long)]
    name: Option<String>,
    /// Wire protocol of the inference endpoint
    #[arg(long, value_name = "openai|anthropic", value_parser = parse_kind)]
    provider: Option<InferenceKind>,
    /// Base URL of the inference endpoint (e.g. https://api.openai.com/v1, http://127.0.0.1:11434/v1)
    #[arg(long, value_name = "URL")]
    inference_url: Option<String>,
    /// Model name at that endpoint
    #[arg(long)]
    model: Option<String>,
    /// Name of the environment variable holding the API key (the key itself never goes in a file)
    #[arg(long, value_name = "VAR")]
    api_key_env: Option<String>,
    /// A file holding the API key; must be mode 0600
    #[arg(long, value_name = "FILE")]
    api_key_file: Option<PathBuf>,
    /// The genesis prompt: what this agent is for
    #[arg(long, value_name = "TEXT", conflicts_with = "genesis_file")]
    genesis_prompt: Option<String>,
    /// Read the genesis prompt from a file
    #[arg(long, value_name = "FILE")]
    genesis_file: Option<PathBuf>,
    /// The creator: an npub, a Lightning node id, or a name
    #[arg(long)]
    creator: Option<String>,
    /// A message the agent reads on its first run
    #[arg(long, value_name = "TEXT")]
    creator_message: Option<String>,
    /// A YAML fragment of automaton.yaml to start from (how a parent configures a child)
    #[arg(long, value_name = "FILE")]
    config_from: Option<PathBuf>,
    /// The offline world's lab.json (or its directory): network, chain, LSP and the scripted model
    #[arg(long, value_name = "DIR/lab.json")]
    lab: Option<PathBuf>,
    /// Restore the wallet from this file (BIP39 words, or a wallet.json backup) instead of creating a new one
    #[arg(long, value_name = "FILE")]
    mnemonic_file: Option<PathBuf>,
}

fn parse_kind(s: &str) -> Result<InferenceKind, String> {
    s.parse()
}

pub fn execute(home: &Home, overrides: &[Override], args: SetupArgs) -> anyhow::Result<()> {
    super::init_stderr_tracing();
    let lab = args
        .lab
        .map(|p| if p.is_dir() { p.join("lab.json") } else { p });
    let genesis = match (args.genesis_prompt, args.genesis_file) {
        (Some(text), _) => Some(GenesisSource::Text(text)),
        (None, Some(file)) => Some(GenesisSource::File(file)),
        (None, None) => None,
    };
    let request = SetupRequest {
        yes: args.yes,
        reconfigure: args.reconfigure,
        name: args.name,
        provider: args.provider,
        inference_url: args.inference_url,
        model: args.model,
        api_key_env: args.api_key_env,
        api_key_file: args.api_key_file,
        genesis,
        creator: args.creator,
        creator_message: args.creator_message,
        config_from: args.config_from,
        lab,
        overrides: overrides.to_vec(),
        mnemonic_file: args.mnemonic_file,
    };
    let outcome = setup::run(home, &request)?;
    for warning in &outcome.warnings {
        eprintln!("warning: {warning}");
    }
    if let GitOutcome::Skipped(why) = &outcome.git {
        eprintln!("warning: {why}");
    }
    let config = &outcome.config;
    let verb = if outcome.reconfigured {
        "Reconfigured"
    } else {
        "Set up"
    };
    println!("{verb} {} in {}", config.name, home.root().display());
    println!(
        "  thinks with {} at {}",
        config.inference.model, config.inference.base_url
    );
    if let Some(url) = &config.http.public_url {
        println!("  HTTP face   {url}");
    }
    let wallet = &outcome.wallet;
    println!(
        "  node id     {} ({})",
        wallet.node_id, config.wallet.network
    );
    println!("  npub        {}", wallet.npub);
    println!("  wallet      {} (mode 0600)", wallet.path.display());
    if wallet.created {
        show_backup(wallet, args.yes);
    }
    if !outcome.reconfigured {
        let home_flag = format!(" --home {}", home.root().display());
        println!("Start it with: automaton{home_flag} run");
    }
    Ok(())
}

/// The backup warning, and — only for a newly generated wallet, in the interactive wizard, on a terminal — the
/// words themselves, this once. Scripts and logs never see them.
fn show_backup(wallet: &crate::wallet::IdentitySetup, yes: bool) {
    use std::io::IsTerminal;
    let on_terminal = std::io::stdout().is_terminal();
    if wallet.generated && !yes && on_terminal {
        let words = wallet.identity.phrase();
        println!();
        println!("  Write down these words now. They are the only way to recover this agent's money and identity,");
        println!(
            "  and they will not be shown again (they stay in {}):",
            wallet.path.display()
        );
        println!();
        for (i, chunk) in words
            .expose()
            .split(' ')
            .collect::<Vec<_>>()
            .chunks(6)
            .enumerate()
        {
            let line: Vec<String> = chunk
                .iter()
                .enumerate()
                .map(|(j, w)| format!("{:>2}. {w:<9}", i * 6 + j + 1))
                .collect();
            println!("    {}", line.join(" "));
        }
        println!();
    } else {
        println!(
            "  Back up {}: its mnemonic is the only way to recover this agent's money and identity.",
            wallet.path.display()
        );
    }
}
