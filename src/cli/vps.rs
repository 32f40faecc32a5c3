//! `automaton vps …`: rent VPSes at LNVPS, paid over Lightning by the running agent (through its budget gate), and
//! look after them. Listings work while the agent is stopped; anything that pays needs it running.

use clap::{Args, Subcommand};
use serde_json::{json, Value};

use super::ExitError;
use crate::compute::lnvps::{self, LnvpsClient, RentRequest, RentedVm, SocketPayer, VmManager};
use crate::config::{env_overrides, Config, ConfigError, Override};
use crate::home::Home;
use crate::state::Db;

#[derive(Debug, Args)]
pub struct VpsArgs {
    #[command(subcommand)]
    command: VpsCommand,
}

#[derive(Debug, Subcommand)]
enum VpsCommand {
    /// VM sizes and prices (in sats per renewal, at the server's exchange rate)
    Templates(JsonFlag),
    /// Operating system images
    Images(JsonFlag),
    /// Rent a VM: create it, pay its first period over Lightning, wait until it runs and answers over SSH
    Create(CreateArgs),
    /// The VMs this agent rents: id, state, ip, expires
    List(JsonFlag),
    /// One VM as LNVPS reports it now
    Show(IdArgs),
    /// Pay for one more period of a VM
    Renew(IdArgs),
    /// Stop a VM (it keeps its expiry)
    Stop(IdArgs),
    /// Start a stopped VM
    Start(IdArgs),
    /// A fresh OS on a VM (its disk is wiped; its new host key is pinned on the next connection)
    Reinstall(ReinstallArgs),
    /// Give a VM more CPU, memory or disk: --quote shows the price; otherwise the difference is paid
    Upgrade(UpgradeArgs),
    /// Let a VM go: auto-renewal off, stopped, forgotten here (it lapses at expiry; the API has no delete)
    Destroy(IdArgs),
}

#[derive(Debug, Args)]
struct ReinstallArgs {
    /// The VM id
    id: u64,
    /// Image id [default: the VM's current image]
    #[arg(long)]
    image: Option<u64>,
}

#[derive(Debug, Args)]
struct UpgradeArgs {
    /// The VM id
    id: u64,
    /// CPU cores
    #[arg(long)]
    cpu: Option<u64>,
    /// Memory in MiB
    #[arg(long, value_name = "MIB")]
    memory_mib: Option<u64>,
    /// Disk in GiB
    #[arg(long, value_name = "GIB")]
    disk_gib: Option<u64>,
    /// Only show what it would cost
    #[arg(long)]
    quote: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct JsonFlag {
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct IdArgs {
    /// The VM id
    id: u64,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct CreateArgs {
    /// Template id or name [default: the cheapest in sats]
    #[arg(long)]
    template: Option<String>,
    /// Image id or distribution [default: debian, else ubuntu]
    #[arg(long)]
    image: Option<String>,
    /// Billing periods to pay for at once
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=120))]
    periods: u32,
    #[arg(long)]
    json: bool,
}

pub fn execute(home: &Home, overrides: &[Override], args: VpsArgs) -> anyhow::Result<()> {
    super::init_stderr_tracing();
    let config = match Config::load_with(home, &env_overrides(), overrides) {
        Ok(config) => config,
        Err(ConfigError::NotFound { .. }) => return Err(super::not_set_up(home)),
        Err(err) => return Err(err.into()),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(run(home, &config, args))
}

async fn run(home: &Home, config: &Config, args: VpsArgs) -> anyhow::Result<()> {
    let client = LnvpsClient::for_home(home, config)?;
    let manager = || -> anyhow::Result<VmManager> {
        let db = Db::open(&home.db_path())?;
        Ok(VmManager::new(
            home,
            db,
            LnvpsClient::for_home(home, config)?,
        ))
    };
    match args.command {
        VpsCommand::Templates(a) => {
            let templates = client.templates().await?;
            let mut rows = Vec::new();
            for t in &templates {
                let sats = lnvps::price_sats(&client, &t.cost_plan).await?;
                rows.push(json!({
                    "id": t.id, "name": t.name, "cpu": t.cpu, "memory": t.memory, "disk_size": t.disk_size,
                    "region": t.region.name, "currency": t.cost_plan.currency, "amount": t.cost_plan.amount,
                    "interval": format!("{} {}", t.cost_plan.interval_amount, t.cost_plan.interval_type),
                    "price_sats": sats,
                }));
            }
            super::print_lines(a.json, &Value::Array(rows), |v| {
                format!(
                    "{:>4}  {:<16} {} cpu  {:>5} MiB  {:>6} GiB  {:>8} sats / {}  ({})",
                    v["id"],
                    v["name"].as_str().unwrap_or_default(),
                    v["cpu"],
                    v["memory"].as_u64().unwrap_or(0) >> 20,
                    v["disk_size"].as_u64().unwrap_or(0) >> 30,
                    v["price_sats"]
                        .as_u64()
                        .map(|s| s.to_string())
                        .unwrap_or_else(|| "?".into()),
                    v["interval"].as_str().unwrap_or_default(),
                    v["region"].as_str().unwrap_or_default()
                )
            })
        }
        VpsCommand::Images(a) => {
            let images = serde_json::to_value(client.images().await?)?;
            super::print_lines(a.json, &images, |v| {
                format!(
                    "{:>4}  {} {} {}  (user {})",
                    v["id"],
                    v["distribution"].as_str().unwrap_or_default(),
                    v["version"].as_str().unwrap_or_default(),
                    v["flavour"].as_str().unwrap_or_default(),
                    v["default_username"].as_str().unwrap_or_default()
                )
            })
        }
        VpsCommand::Create(a) => {
            let manager = manager()?;
            let payer = SocketPayer::new(home);
            let spinner = super::spinner("renting a VM");
            let progress = {
                let spinner = spinner.clone();
                move |step: &str| spinner.set_message(step.to_string())
            };
            let request = RentRequest {
                template: a.template,
                image: a.image,
                intervals: a.periods,
            };
            let rented = manager.rent(&request, &payer, &progress).await;
            spinner.finish_and_clear();
            let vm = rented.map_err(|e| {
                let code = payer.failure_code().unwrap_or(1);
                anyhow::Error::from(ExitError {
                    code,
                    message: e.to_string(),
                })
            })?;
            print_vm(a.json, &vm)
        }
        VpsCommand::List(a) => {
            let manager = manager()?;
            let vms = match manager.list(true).await {
                Ok(vms) => vms,
                Err(e) => {
                    eprintln!("LNVPS did not answer ({e}); showing what was last seen");
                    manager.list(false).await?
                }
            };
            let value = serde_json::to_value(&vms)?;
            if !a.json && vms.is_empty() {
                eprintln!("no VMs rented");
                return Ok(());
            }
            super::print_lines(a.json, &value, |v| {
                format!(
                    "{:>6}  {:<9} {:<15} expires {}  {} / {}",
                    v["id"],
                    v["state"].as_str().unwrap_or_default(),
                    v["ip"].as_str().unwrap_or("-"),
                    v["expires"].as_str().unwrap_or("never paid"),
                    v["template"].as_str().unwrap_or_default(),
                    v["image"].as_str().unwrap_or_default()
                )
            })
        }
        VpsCommand::Show(a) => {
            let vm = serde_json::to_value(client.vm(a.id).await?)?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&vm)?);
            } else {
                println!(
                    "VM {}: {}, ip {}, expires {}, auto-renewal {}",
                    a.id,
                    vm["status"]["state"].as_str().unwrap_or("unknown"),
                    vm["ip_assignments"][0]["ip"].as_str().unwrap_or("-"),
                    vm["expires"].as_str().unwrap_or("never paid"),
                    if vm["auto_renewal_enabled"] == true {
                        "on"
                    } else {
                        "off"
                    }
                );
            }
            Ok(())
        }
        VpsCommand::Renew(a) => {
            let manager = manager()?;
            let payer = SocketPayer::new(home);
            let spinner = super::spinner("renewing");
            let progress = {
                let spinner = spinner.clone();
                move |step: &str| spinner.set_message(step.to_string())
            };
            let paid = manager.pay_renewal(a.id, 1, &payer, &progress).await;
            spinner.finish_and_clear();
            paid.map_err(|e| {
                let code = payer.failure_code().unwrap_or(1);
                anyhow::Error::from(ExitError {
                    code,
                    message: e.to_string(),
                })
            })?;
            let vm = manager.client().vm(a.id).await?;
            let value = json!({"id": a.id, "expires": vm.expires, "state": vm.status.state});
            super::print_lines(a.json, &value, |v| {
                format!(
                    "VM {} renewed; expires {}",
                    v["id"],
                    v["expires"].as_str().unwrap_or("?")
                )
            })
        }
        VpsCommand::Stop(a) => power(&client, a, "stop").await,
        VpsCommand::Start(a) => power(&client, a, "start").await,
        VpsCommand::Reinstall(a) => {
            client.reinstall(a.id, a.image).await?;
            // The machine gets a new host key: the pinned one is dropped, the next connection pins the new one.
            if let Some(vm) = manager()?.get(a.id).await? {
                if let Some(ip) = vm.ip {
                    let _ = crate::compute::ssh::remove_known_host(
                        &home.root().join("ssh").join("known_hosts"),
                        &ip,
                        22,
                    );
                }
            }
            println!("VM {}: re-install requested", a.id);
            Ok(())
        }
        VpsCommand::Upgrade(a) => {
            let mut spec = serde_json::Map::new();
            if let Some(cpu) = a.cpu {
                spec.insert("cpu".into(), json!(cpu));
            }
            if let Some(mib) = a.memory_mib {
                spec.insert("memory".into(), json!(mib << 20));
            }
            if let Some(gib) = a.disk_gib {
                spec.insert("disk".into(), json!(gib << 30));
            }
            if spec.is_empty() {
                anyhow::bail!("say what to upgrade: --cpu, --memory-mib and/or --disk-gib");
            }
            let spec = Value::Object(spec);
            if a.quote {
                let quote = client.upgrade_quote(a.id, &spec).await?;
                return super::print_lines(a.json, &quote, |v| {
                    format!(
                        "upgrade now: {} {}; each renewal after: {} {}",
                        v["cost_difference"]["amount"],
                        v["cost_difference"]["currency"]
                            .as_str()
                            .unwrap_or_default(),
                        v["new_renewal_cost"]["amount"],
                        v["new_renewal_cost"]["currency"]
                            .as_str()
                            .unwrap_or_default()
                    )
                });
            }
            let payer = SocketPayer::new(home);
            let paid = manager()?.upgrade(a.id, &spec, &payer).await.map_err(|e| {
                anyhow::Error::from(ExitError {
                    code: payer.failure_code().unwrap_or(1),
                    message: e.to_string(),
                })
            })?;
            let value =
                json!({"id": a.id, "payment_hash": paid.id, "paid_msat": paid.amount + paid.tax});
            super::print_lines(a.json, &value, |v| {
                format!(
                    "VM {} upgraded (payment {})",
                    v["id"],
                    v["payment_hash"].as_str().unwrap_or_default()
                )
            })
        }
        VpsCommand::Destroy(a) => {
            manager()?.release(a.id).await?;
            super::print_lines(a.json, &json!({"id": a.id, "released": true}), |v| {
                format!(
                    "VM {} let go: auto-renewal off, stopped, forgotten here (it lapses at expiry)",
                    v["id"]
                )
            })
        }
    }
}

async fn power(client: &LnvpsClient, a: IdArgs, action: &str) -> anyhow::Result<()> {
    client.power(a.id, action).await?;
    super::print_lines(a.json, &json!({"id": a.id, "action": action}), |v| {
        format!("VM {}: {} requested", v["id"], action)
    })
}

fn print_vm(json: bool, vm: &RentedVm) -> anyhow::Result<()> {
    let value = serde_json::to_value(vm)?;
    super::print_lines(json, &value, |v| {
        format!(
            "VM {} is {} at {} (ssh {}@{}), paid until {}",
            v["id"],
            v["state"].as_str().unwrap_or_default(),
            v["ip"].as_str().unwrap_or("-"),
            v["user"].as_str().unwrap_or_default(),
            v["ip"].as_str().unwrap_or("-"),
            v["expires"].as_str().unwrap_or("?")
        )
    })
}
