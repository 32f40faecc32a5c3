//! Renting compute over Lightning, as a user does it, against the lab's LNVPS double (real `sshd` machines on
//! 127.0.0.x, renewals invoiced by the lab merchant): `vps create` pays the first period through the agent's budget
//! gate, the VM runs with an IP, `exec --vps` runs a command there over SSH with the host key pinned from LNVPS,
//! `vps renew` extends the expiry, `vps destroy` lets it go.

mod common;

use std::time::Duration;

use automaton_lab::world;
use common::lab_agent::{lab_get, LabAgent};

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_rents_a_vps_over_lightning_and_works_on_it() {
    let world = world::shared();
    let agent = LabAgent::set_up(world, "renter", &[]);
    let running = agent.start();
    agent.wait_ready();
    agent.fund(world, 60_000).await;

    // Prices in sats, the cheapest affordable under the default budget.
    let templates = agent.json(&["vps", "templates", "--json"]);
    let cheapest = templates
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["price_sats"].as_u64())
        .min()
        .expect("templates priced in sats");
    assert!(cheapest < 10_000, "{templates}");
    let images = agent.json(&["vps", "images", "--json"]);
    assert!(!images.as_array().unwrap().is_empty());

    // Rent: no flags needed.
    let vm = agent.json(&["vps", "create", "--json"]);
    let id = vm["id"].as_u64().expect("a VM id");
    assert_eq!(vm["state"], "running", "{vm}");
    let ip = vm["ip"].as_str().expect("an IP").to_string();
    assert!(ip.starts_with("127.0.0."), "{vm}");
    let first_expiry = vm["expires"].as_str().expect("paid until").to_string();

    // The payment went through the gate: a receipt for compute.rent, and the lab saw it paid.
    let rent: Vec<_> = agent
        .receipts()
        .into_iter()
        .filter(|r| r["purpose"] == "compute.rent" && r["direction"] == "out")
        .collect();
    assert_eq!(rent.len(), 1, "{rent:?}");
    assert_eq!(rent[0]["status"], "succeeded");
    assert_eq!(
        vm["payments"],
        serde_json::json!([rent[0]["payment_hash"]]),
        "the receipt is linked to the VM"
    );
    let lab_vm = lab_get(world, &format!("/lab/lnvps/vm/{id}")).await;
    assert_eq!(lab_vm["provisioned"], true, "{lab_vm}");
    assert_eq!(lab_vm["ip"], ip.as_str());

    // Listed, and usable over SSH with the pinned host key.
    let list = agent.json(&["vps", "list", "--json"]);
    let listed = list
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["id"] == id)
        .expect("listed")
        .clone();
    assert_eq!(listed["state"], "running");
    assert_eq!(listed["ip"], ip.as_str());
    assert!(listed["expires"].is_string());
    let out = agent.run(&[
        "exec",
        "--vps",
        &id.to_string(),
        "--",
        "echo",
        "hello from",
        "$HOME",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(stdout.starts_with("hello from /"), "{stdout}");
    assert!(
        stdout.contains(lab_vm["dir"].as_str().unwrap()),
        "the command ran in the VM's home: {stdout} vs {lab_vm}"
    );
    let known_hosts = std::fs::read_to_string(agent.home().join("ssh/known_hosts")).unwrap();
    assert!(known_hosts.contains(&ip), "{known_hosts}");

    // Renewal extends the expiry; a second receipt.
    let renewed = agent.json(&["vps", "renew", &id.to_string(), "--json"]);
    let new_expiry = renewed["expires"].as_str().unwrap();
    let parse = |s: &str| chrono::DateTime::parse_from_rfc3339(s).unwrap();
    assert!(
        parse(new_expiry) > parse(&first_expiry),
        "{first_expiry} -> {new_expiry}"
    );
    let rent_receipts = agent
        .receipts()
        .into_iter()
        .filter(|r| r["purpose"] == "compute.rent" && r["status"] == "succeeded")
        .count();
    assert_eq!(rent_receipts, 2);

    // Let go: not listed, stopped at the lab, its host key forgotten.
    let out = agent.run(&["vps", "destroy", &id.to_string()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list = agent.json(&["vps", "list", "--json"]);
    assert!(
        list.as_array().unwrap().iter().all(|v| v["id"] != id),
        "{list}"
    );
    assert!(
        common::lab_agent::eventually(Duration::from_secs(30), || {
            let rt = tokio::runtime::Handle::current();
            let vm = tokio::task::block_in_place(|| {
                rt.block_on(lab_get(world, &format!("/lab/lnvps/vm/{id}")))
            });
            vm["power_on"] == false
        }),
        "the VM was not stopped"
    );
    let known_hosts = std::fs::read_to_string(agent.home().join("ssh/known_hosts")).unwrap();
    assert!(!known_hosts.contains(&ip), "{known_hosts}");
    let out = agent.run(&["exec", "--vps", &id.to_string(), "--", "true"]);
    assert!(!out.status.success(), "a VM let go is not used");
    running.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_rents_with_its_tool_and_the_heartbeat_renews_before_expiry() {
    let world = world::shared();
    let agent = LabAgent::set_up(world, "tenant", &[]);
    // Funded first, then one turn in which the scripted model calls rent_vps (its creator adds the purpose).
    let running = agent.start();
    agent.wait_ready();
    agent.fund(world, 60_000).await;
    // Renting is off in critical: the funded agent's tier must have left it.
    assert!(
        common::lab_agent::eventually(Duration::from_secs(30), || {
            agent.json(&["status", "--json"])["tier"] != "critical"
        }),
        "still critical after funding:\n{}",
        agent.logs()
    );
    running.stop();
    let prompt = agent.home().join("genesis/prompt.md");
    let purpose = std::fs::read_to_string(&prompt).unwrap();
    std::fs::write(
        &prompt,
        format!("{purpose}\nYou need a machine of your own.\nlab-scenario: rent\n"),
    )
    .unwrap();
    let out = agent.run(&["run", "--turns", "1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let calls = agent.json(&["logs", "--json", "--limit", "5"]);
    let rent_call = calls
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|t| t["tool_calls"].as_array().cloned().unwrap_or_default())
        .find(|c| c["name"] == "rent_vps")
        .expect("the model called rent_vps");
    assert_eq!(
        rent_call["is_error"],
        false,
        "{rent_call}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let list = agent.json(&["vps", "list", "--json"]);
    let vm = list
        .as_array()
        .unwrap()
        .first()
        .expect("a rented VM")
        .clone();
    assert_eq!(vm["state"], "running", "{vm}");
    let id = vm["id"].as_u64().unwrap();
    let first_expiry = vm["expires"].as_str().unwrap().to_string();
    let paid: Vec<_> = agent
        .receipts()
        .into_iter()
        .filter(|r| r["purpose"] == "compute.rent" && r["status"] == "succeeded")
        .collect();
    assert_eq!(paid.len(), 1, "{paid:?}");

    // A lab month is minutes long, so the VM is inside the renewal lead (a day): the heartbeat's task renews it,
    // paying through the running agent.
    let running = agent.start();
    agent.wait_ready();
    let out = agent.run(&["heartbeat", "run", "renew_vps"]);
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    let list = agent.json(&["vps", "list", "--json"]);
    let renewed = list
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["id"] == id)
        .unwrap()
        .clone();
    let parse = |s: &str| chrono::DateTime::parse_from_rfc3339(s).unwrap();
    assert!(
        parse(renewed["expires"].as_str().unwrap()) > parse(&first_expiry),
        "{first_expiry} -> {renewed}"
    );
    let paid = agent
        .receipts()
        .into_iter()
        .filter(|r| r["purpose"] == "compute.rent" && r["status"] == "succeeded")
        .count();
    assert_eq!(paid, 2);

    // In critical the task lets the VM go instead of paying.
    let db = agent.db();
    running.stop();
    db.call_blocking(|c| {
        c.execute(
            "INSERT INTO kv (key, value, updated_at) VALUES (?1, 'critical', '2026-01-01T00:00:00Z') \
             ON CONFLICT(key) DO UPDATE SET value = 'critical'",
            [automaton::money::tiers::TIER_KEY],
        )
    })
    .unwrap();
    let out = agent.run(&["heartbeat", "run", "renew_vps", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("let go"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let list = agent.json(&["vps", "list", "--json"]);
    assert!(list.as_array().unwrap().is_empty(), "{list}");
}
