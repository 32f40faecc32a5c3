//! `automaton-lab`: runs the offline world for Automaton-LN.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "automaton-lab",
    version,
    about = "The offline Bitcoin + Lightning world for Automaton-LN"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start the whole lab in the foreground: chain, Lightning peers, control API; writes DIR/lab.json when ready.
    /// Resumes an existing DIR. Ctrl-C or SIGTERM stops it.
    Up {
        /// Directory holding the lab's chain, node storage, logs and lab.json.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Serve only the scripted OpenAI-compatible model (POST /v1/chat/completions, GET /v1/models) until
    /// Ctrl-C or SIGTERM; prints its base URL on stderr.
    Model {
        /// Address to listen on; port 0 picks a free port.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: String,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // ldk-node needs a multi-thread runtime.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::Up { dir } => runtime.block_on(automaton_lab::world::run_up(&dir)),
        Command::Model { listen } => runtime.block_on(automaton_lab::model::cli_main(listen)),
    }
}
