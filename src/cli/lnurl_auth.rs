//! `automaton lnurl-auth <LNURL>`: log in to a service with LNURL-auth (LUD-04), signing its challenge with this
//! agent's linking key for the service's domain (LUD-05, from the wallet's mnemonic). Needs only `wallet.json`, so
//! it works whether or not the agent is running.

use clap::Args;
use serde_json::json;

use super::ExitError;
use crate::config::{env_overrides, Config, ConfigError, Override};
use crate::home::Home;
use crate::wallet::Identity;

#[derive(Debug, Args)]
pub struct LnurlAuthArgs {
    /// The service's LNURL (`lnurl1…`, `keyauth://…`, or its https URL with tag=login and k1)
    lnurl: String,
    /// Print {domain, action, linking_key, response} on stdout
    #[arg(long)]
    json: bool,
}

pub fn execute(home: &Home, overrides: &[Override], args: LnurlAuthArgs) -> anyhow::Result<()> {
    super::init_stderr_tracing();
    let config = match Config::load_with(home, &env_overrides(), overrides) {
        Ok(config) => config,
        Err(ConfigError::NotFound { .. }) => return Err(super::not_set_up(home)),
        Err(e) => return Err(e.into()),
    };
    let network = config.wallet.network.clone();
    let request = crate::lnurl::auth::parse_request(&args.lnurl, &network)?;
    eprintln!(
        "signing in to {} ({})",
        request.domain,
        request.action.as_deref().unwrap_or("login")
    );
    let identity = Identity::load(&home.wallet_path())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let outcome = runtime
        .block_on(crate::lnurl::auth::login(&identity, &args.lnurl, &network))
        .map_err(|e| ExitError {
            code: 1,
            message: e.to_string(),
        })?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "domain": outcome.domain,
                "action": outcome.action,
                "linking_key": outcome.linking_key,
                "response": outcome.response,
            }))?
        );
    } else {
        println!(
            "signed in to {} as {} ({})",
            outcome.domain, outcome.linking_key, outcome.action
        );
    }
    Ok(())
}
