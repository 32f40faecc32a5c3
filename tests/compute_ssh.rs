//! The SSH compute backend against a real OpenSSH server on loopback: the conformance suite every backend passes,
//! then what only SSH has: pinned host keys, reconnects, remote kills, idle masters that go away.

mod common;
#[path = "common/sshd.rs"]
mod sshd;

use std::path::Path;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use automaton::compute::ssh::{known_host_keys, SshCompute, SshOptions};
use automaton::compute::{ComputeError, ComputeProvider, ExecOutput, ExecRequest, FileContent};
use sshd::{keygen, process_alive, Sshd};

/// An SSH provider and the server it talks to; the provider goes first, so its master exits before sshd does.
struct Harnessed {
    compute: SshCompute,
    _sshd: Sshd,
}

#[async_trait]
impl ComputeProvider for Harnessed {
    fn kind(&self) -> &'static str {
        self.compute.kind()
    }
    fn workdir(&self) -> &Path {
        self.compute.workdir()
    }
    fn shares_agent_filesystem(&self) -> bool {
        self.compute.shares_agent_filesystem()
    }
    async fn exec(&self, request: ExecRequest) -> Result<ExecOutput, ComputeError> {
        self.compute.exec(request).await
    }
    async fn read_file(&self, path: &Path, max_bytes: usize) -> Result<FileContent, ComputeError> {
        self.compute.read_file(path, max_bytes).await
    }
    async fn write_file(&self, path: &Path, content: &[u8]) -> Result<(), ComputeError> {
        self.compute.write_file(path, content).await
    }
}

automaton::compute_conformance!(|dir: &Path| {
    let sshd = Sshd::start();
    let compute = SshCompute::new(sshd.target(), sshd.options(dir)).expect("ssh provider");
    Harnessed {
        compute,
        _sshd: sshd,
    }
});

fn req(command: &str, timeout: Duration) -> ExecRequest {
    ExecRequest {
        command: command.to_string(),
        timeout,
        output_cap: 4096,
    }
}

async fn poll_until<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    let mut delay = Duration::from_millis(20);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(300));
    }
}

#[tokio::test]
async fn a_changed_host_key_is_refused() {
    let sshd = Sshd::start();
    let work = tempfile::tempdir().unwrap();
    // The known_hosts remembers another key for this host:port, as if the machine had been swapped.
    let other = sshd.dir().join("other_host_key");
    keygen(&other);
    let other_pub = std::fs::read_to_string(other.with_extension("pub")).unwrap();
    let mut target = sshd.target();
    target.known_hosts = sshd.dir().join("swapped_known_hosts");
    automaton::compute::ssh::add_known_host(
        &target.known_hosts,
        "127.0.0.1",
        sshd.port,
        &other_pub,
    )
    .unwrap();
    let compute = SshCompute::new(target.clone(), sshd.options(work.path())).unwrap();
    match compute
        .exec(req("touch ran", Duration::from_secs(10)))
        .await
    {
        Err(ComputeError::HostKeyChanged { host, known_hosts }) => {
            assert!(host.contains(&sshd.port.to_string()));
            assert_eq!(known_hosts, target.known_hosts);
        }
        other => panic!("expected HostKeyChanged, got {other:?}"),
    }
    assert!(
        !work.path().join("ran").exists(),
        "nothing may run on a machine with the wrong key"
    );
    // Handing `connect` the real key does not overwrite the recorded one either.
    match SshCompute::connect(
        target.clone(),
        std::slice::from_ref(&sshd.host_key),
        sshd.options(work.path()),
    )
    .await
    {
        Err(ComputeError::HostKeyChanged { .. }) => {}
        other => panic!("expected HostKeyChanged, got {other:?}"),
    }
    // Once the old entry is removed (the VM really was replaced), the given key is trusted.
    automaton::compute::ssh::remove_known_host(&target.known_hosts, "127.0.0.1", sshd.port)
        .unwrap();
    let compute = SshCompute::connect(
        target.clone(),
        std::slice::from_ref(&sshd.host_key),
        sshd.options(work.path()),
    )
    .await
    .expect("connect with the recorded key");
    let out = compute
        .exec(req("echo hi", Duration::from_secs(10)))
        .await
        .unwrap();
    assert_eq!(out.stdout, "hi\n");
    assert_eq!(
        known_host_keys(&target.known_hosts, "127.0.0.1", sshd.port).unwrap(),
        vec![sshd
            .host_key
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ")]
    );
}

#[tokio::test]
async fn an_unknown_host_is_refused() {
    let sshd = Sshd::start();
    let work = tempfile::tempdir().unwrap();
    let mut target = sshd.target();
    target.known_hosts = sshd.dir().join("empty_known_hosts");
    let compute = SshCompute::new(target, sshd.options(work.path())).unwrap();
    assert!(matches!(
        compute.check().await,
        Err(ComputeError::HostKeyUnknown { .. })
    ));
}

#[tokio::test]
async fn a_missing_key_is_made_and_the_refusal_says_which_line_to_authorise() {
    let sshd = Sshd::start();
    let work = tempfile::tempdir().unwrap();
    let mut target = sshd.target();
    target.key_path = sshd.dir().join("agent-ssh/id_ed25519");
    let compute = SshCompute::new(target.clone(), sshd.options(work.path())).unwrap();
    let message = match compute.check().await {
        Err(ComputeError::Connect { reason, .. }) => reason,
        other => panic!("expected a refused key, got {other:?}"),
    };
    let public = std::fs::read_to_string(target.key_path.with_extension("pub")).unwrap();
    assert!(message.contains(public.trim()), "{message}");
    // Authorised as the message says, the same key gets in.
    let authorized = sshd.dir().join("authorized_keys");
    let mut keys = std::fs::read_to_string(&authorized).unwrap();
    keys.push_str(&public);
    std::fs::write(&authorized, keys).unwrap();
    let out = compute
        .exec(req("echo in", Duration::from_secs(10)))
        .await
        .unwrap();
    assert_eq!(out.stdout, "in\n");
}

#[tokio::test]
async fn a_dropped_connection_is_re_established() {
    let sshd = Sshd::start();
    let work = tempfile::tempdir().unwrap();
    let compute = SshCompute::new(sshd.target(), sshd.options(work.path())).unwrap();
    assert_eq!(
        compute
            .exec(req("echo one", Duration::from_secs(10)))
            .await
            .unwrap()
            .stdout,
        "one\n"
    );
    let master = compute.master_pid().await.expect("a master is running");
    // SAFETY: signalling the ssh master this test's provider started.
    unsafe {
        libc::kill(master as i32, libc::SIGKILL);
    }
    poll_until("the master to die", Duration::from_secs(10), || async {
        !process_alive(master as i32)
    })
    .await;
    let out = compute
        .exec(req("echo two", Duration::from_secs(10)))
        .await
        .expect("exec after the drop");
    assert_eq!(out.stdout, "two\n");
    assert_eq!(compute.reconnects(), 1);
    let again = compute.master_pid().await.expect("a new master");
    assert_ne!(again, master);
}

#[tokio::test]
async fn a_connection_lost_mid_command_is_reported_and_the_next_call_reconnects() {
    let sshd = Sshd::start();
    let work = tempfile::tempdir().unwrap();
    let compute = SshCompute::new(sshd.target(), sshd.options(work.path())).unwrap();
    compute.check().await.unwrap();
    let master = compute.master_pid().await.expect("master");
    let running = compute.exec(req("touch started; sleep 30", Duration::from_secs(60)));
    let killer = async {
        poll_until("the command to start", Duration::from_secs(10), || async {
            work.path().join("started").exists()
        })
        .await;
        // SAFETY: signalling the ssh master this test's provider started.
        unsafe {
            libc::kill(master as i32, libc::SIGKILL);
        }
    };
    let (result, ()) = tokio::join!(running, killer);
    match result {
        Err(ComputeError::Disconnected { .. }) => {}
        other => panic!("expected Disconnected, got {other:?}"),
    }
    let out = compute
        .exec(req("echo back", Duration::from_secs(10)))
        .await
        .unwrap();
    assert_eq!(out.stdout, "back\n");
}

#[tokio::test]
async fn a_command_that_outlives_its_timeout_is_killed_on_the_remote_side() {
    let sshd = Sshd::start();
    let work = tempfile::tempdir().unwrap();
    let compute = SshCompute::new(sshd.target(), sshd.options(work.path())).unwrap();
    let out = compute
        .exec(req(
            "sh -c 'echo $$ > cmd.pid; exec sleep 120' & echo $! > bg.pid; wait",
            Duration::from_secs(4),
        ))
        .await
        .unwrap();
    assert!(out.timed_out, "{out:?}");
    assert_eq!(out.exit_code, None);
    assert_eq!(out.signal, Some(9));
    // The test's sshd runs on this machine, so the remote pids can be checked directly.
    for file in ["cmd.pid", "bg.pid"] {
        let pid: i32 = std::fs::read_to_string(work.path().join(file))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        poll_until(
            &format!("{file} to die"),
            Duration::from_secs(10),
            || async { !process_alive(pid) },
        )
        .await;
    }
}

#[tokio::test]
async fn a_background_job_does_not_hold_the_call_and_survives_it() {
    let sshd = Sshd::start();
    let work = tempfile::tempdir().unwrap();
    let compute = SshCompute::new(sshd.target(), sshd.options(work.path())).unwrap();
    let out = compute
        .exec(req(
            "sleep 30 & echo $! > server.pid; echo started",
            Duration::from_secs(20),
        ))
        .await
        .unwrap();
    assert_eq!(out.exit_code, Some(0));
    assert!(!out.timed_out);
    assert!(
        out.duration < Duration::from_secs(20),
        "the call waited for the background job"
    );
    let pid: i32 = std::fs::read_to_string(work.path().join("server.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        process_alive(pid),
        "a job started on purpose lives on, as with the local backend"
    );
    // SAFETY: cleaning up the process this test started.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
}

#[tokio::test]
async fn without_a_configured_workdir_the_remote_home_is_used() {
    let sshd = Sshd::start();
    let options = SshOptions {
        workdir: None,
        ..sshd.options(Path::new("/"))
    };
    let compute = SshCompute::new(sshd.target(), options).unwrap();
    assert_eq!(compute.workdir(), Path::new("~"));
    let out = compute
        .exec(req("pwd -P", Duration::from_secs(10)))
        .await
        .unwrap();
    // The session's HOME (the test server sets its own; a real one gives the account's home).
    let home = sshd.home();
    let canonical = std::fs::canonicalize(&home).unwrap();
    assert_eq!(out.stdout.trim(), canonical.to_string_lossy());
    assert_eq!(compute.workdir(), home);
}

#[tokio::test]
async fn an_idle_master_exits_by_itself_and_the_next_call_reconnects() {
    let sshd = Sshd::start();
    let work = tempfile::tempdir().unwrap();
    let options = SshOptions {
        idle: Duration::from_secs(1),
        ..sshd.options(work.path())
    };
    let compute = SshCompute::new(sshd.target(), options).unwrap();
    compute
        .exec(req("true", Duration::from_secs(10)))
        .await
        .unwrap();
    let master = compute.master_pid().await.expect("master");
    poll_until(
        "the idle master to exit",
        Duration::from_secs(15),
        || async { !process_alive(master as i32) },
    )
    .await;
    let out = compute
        .exec(req("echo again", Duration::from_secs(10)))
        .await
        .unwrap();
    assert_eq!(out.stdout, "again\n");
}

#[test]
fn automaton_exec_runs_commands_through_the_configured_provider() {
    let sshd = Sshd::start();
    let work = tempfile::tempdir().unwrap();
    let home = common::TestHome::new();
    let port = format!("compute.ssh.port={}", sshd.port);
    let user = format!("compute.ssh.user={}", sshd::current_user());
    let workdir = format!("compute.ssh.workdir={}", work.path().display());
    home.setup_with(
        "http://127.0.0.1:9/v1",
        "test agent",
        &[
            "-c",
            "compute.provider=ssh",
            "-c",
            "compute.ssh.host=127.0.0.1",
            "-c",
            &port,
            "-c",
            &user,
            "-c",
            &workdir,
        ],
    );
    // The agent's own key and pinned host key, where the provider looks for them.
    let ssh_dir = home.root().join("ssh");
    std::fs::create_dir_all(&ssh_dir).unwrap();
    std::fs::copy(&sshd.client_key, ssh_dir.join("id_ed25519")).unwrap();
    std::fs::copy(&sshd.known_hosts, ssh_dir.join("known_hosts")).unwrap();

    let out = home
        .automaton()
        .args(["exec", "--", "echo", "hi", "there;", "pwd"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("hi there\n{}\n", work.path().display())
    );

    let out = home
        .automaton()
        .args(["exec", "--json", "--", "echo oops >&2; exit 3"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON document");
    assert_eq!(report["provider"], "ssh");
    assert_eq!(report["exit_code"], 3);
    assert_eq!(report["stderr"], "oops\n");
    assert!(String::from_utf8_lossy(&out.stderr).contains("exited with status 3"));

    let out = home
        .automaton()
        .args(["exec", "--timeout", "1", "--", "sleep 30"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("timed out after 1s"));

    let out = home
        .automaton()
        .args(["exec", "--provider", "local", "--", "pwd"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        std::fs::canonicalize(home.workspace())
            .unwrap()
            .to_string_lossy()
    );

    let out = home
        .automaton()
        .args(["exec", "--provider", "nope", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown provider"));

    // A machine that changed its key is refused with a message that says so.
    std::fs::write(ssh_dir.join("known_hosts"), "").unwrap();
    let other = sshd.dir().join("other_key");
    keygen(&other);
    automaton::compute::ssh::add_known_host(
        &ssh_dir.join("known_hosts"),
        "127.0.0.1",
        sshd.port,
        &std::fs::read_to_string(other.with_extension("pub")).unwrap(),
    )
    .unwrap();
    let out = home
        .automaton()
        .args(["exec", "--", "touch", "ran"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("differs from the one recorded"));
    assert!(!work.path().join("ran").exists());
}
