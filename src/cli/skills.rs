//! `automaton skills`: list the agent's skills (active or not, and why), show one, enable, disable, install.

use std::io::Write;
use std::path::PathBuf;

use clap::{Args, Subcommand};

use crate::audit::{self, Actor};
use crate::home::Home;
use crate::skills::{self, Library, SkillChange};

#[derive(Debug, Args)]
pub struct SkillsArgs {
    #[command(subcommand)]
    command: SkillsCommand,
}

#[derive(Debug, Subcommand)]
enum SkillsCommand {
    /// List skills: active (in the prompt) or not, and why
    List {
        /// Print one JSON array on stdout
        #[arg(long)]
        json: bool,
    },
    /// Print a skill's SKILL.md with its status
    Show { name: String },
    /// Put a disabled skill back into the prompt
    Enable { name: String },
    /// Keep a skill out of the prompt (it stays installed)
    Disable { name: String },
    /// Install a skill from a folder holding SKILL.md (or from a SKILL.md file)
    Install { path: PathBuf },
}

pub fn execute(home: &Home, args: SkillsArgs) -> anyhow::Result<()> {
    super::init_stderr_tracing();
    if !home.is_set_up() {
        return Err(super::not_set_up(home));
    }
    let library = Library::for_home(home);
    match args.command {
        SkillsCommand::List { json } => {
            let skills = library.skills();
            let mut out = std::io::stdout().lock();
            if json {
                writeln!(out, "{}", serde_json::to_string_pretty(&skills)?)?;
                return Ok(());
            }
            if skills.is_empty() {
                eprintln!("no skills in {}", library.dir().display());
            }
            for s in &skills {
                writeln!(
                    out,
                    "{} {:<32} {}",
                    if s.active { "*" } else { " " },
                    s.dir,
                    s.description.as_deref().unwrap_or("")
                )?;
                if let Some(reason) = &s.reason {
                    writeln!(out, "  {:<32} {}", "", reason)?;
                }
            }
            Ok(())
        }
        SkillsCommand::Show { name } => {
            let skill = library.find(&name)?;
            let text = std::fs::read_to_string(&skill.path).unwrap_or_default();
            let mut out = std::io::stdout().lock();
            writeln!(out, "# {} ({})", skill.dir, skill.path.display())?;
            writeln!(
                out,
                "# {}{}",
                if skill.active { "active" } else { "inactive" },
                skill
                    .reason
                    .as_deref()
                    .map(|r| format!(": {r}"))
                    .unwrap_or_default()
            )?;
            write!(out, "{text}")?;
            Ok(())
        }
        SkillsCommand::Enable { name } => report(skills::set_enabled(
            home,
            &name,
            true,
            &Actor::command("skills enable"),
        )?),
        SkillsCommand::Disable { name } => report(skills::set_enabled(
            home,
            &name,
            false,
            &Actor::command("skills disable"),
        )?),
        SkillsCommand::Install { path } => report(skills::install(
            home,
            &path,
            &Actor::command("skills install"),
        )?),
    }
}

fn report(change: SkillChange) -> anyhow::Result<()> {
    if change.unchanged {
        eprintln!("{}: already so; nothing changed", change.item);
        return Ok(());
    }
    match &change.change {
        Some(id) => println!("{} (change {})", change.item, audit::short(id)),
        None => println!("{}", change.item),
    }
    if let Some(w) = change.warning {
        eprintln!("warning: {w}");
    }
    Ok(())
}
