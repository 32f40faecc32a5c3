//! The compute conformance suite against a VM rented from the lab's LNVPS double (a real `sshd` machine on
//! 127.0.0.x, reached over SSH with its host key pinned from the API). The VM is rented once per test binary, paid
//! by the lab's creator through the `RentPayer` seam (the agent's own gate is covered by `tests/lnvps_lab.rs`).

mod common;

use std::path::PathBuf;

use automaton::compute::lnvps::{LnvpsClient, RentPayer, RentRequest, VmManager};
use automaton::compute::ssh::SshCompute;
use automaton::home::Home;
use automaton_lab::world;
use common::lab_agent::{lab_post, LabAgent};

/// The lab's creator pays the renewal invoice.
struct CreatorPays;

#[async_trait::async_trait]
impl RentPayer for CreatorPays {
    async fn pay(&self, bolt11: &str, _purpose: &str) -> Result<String, String> {
        let paid = lab_post(
            world::shared(),
            "/lab/creator/pay",
            serde_json::json!({ "bolt11": bolt11 }),
        )
        .await;
        Ok(paid["payment_hash"]
            .as_str()
            .unwrap_or_default()
            .to_string())
    }
}

/// (agent home, VM id): one agent and one rented VM for the whole binary.
static RENTED: tokio::sync::OnceCell<(LabAgent, u64)> = tokio::sync::OnceCell::const_new();

fn manager(agent: &LabAgent) -> VmManager {
    let home = Home::at(agent.home());
    let config = automaton::config::Config::load(&home).expect("config");
    let db = automaton::state::Db::open(&home.db_path()).expect("db");
    VmManager::new(
        &home,
        db,
        LnvpsClient::for_home(&home, &config).expect("client"),
    )
}

async fn vm_compute(dir: PathBuf) -> SshCompute {
    let (agent, id) = RENTED
        .get_or_init(|| async {
            let agent = LabAgent::set_up(world::shared(), "conformance", &[]);
            let vm = manager(&agent)
                .rent(&RentRequest::default(), &CreatorPays, &|_| {})
                .await
                .expect("rent a lab VM");
            assert_eq!(vm.state, "running");
            (agent, vm.id)
        })
        .await;
    manager(agent)
        .compute_in(*id, Some(dir))
        .await
        .expect("ssh into the VM")
}

automaton::compute_conformance!(async |dir: PathBuf| async move { vm_compute(dir).await });
