//! A real OpenSSH server for tests: `/usr/sbin/sshd -D` on a random loopback port, with its own host key, one
//! authorised client key, `UsePAM no`, `StrictModes no` and `Subsystem sftp internal-sftp`. Sessions get their own
//! empty `HOME` (as the lab's VMs do): bash reads `$HOME/.bashrc` when sshd runs a command, and the account's real
//! rc files (a `pyenv init` on this machine) print their own noise under load. It dies with the test:
//! killed on drop, and (PR_SET_PDEATHSIG) when the thread that started it ends.

#![allow(dead_code)] // each test binary uses a different part of the harness

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use automaton::compute::ssh::{add_known_host, ensure_keypair, SshOptions, SshTarget};

/// A running sshd and the files a client needs to reach it.
pub struct Sshd {
    child: Child,
    dir: tempfile::TempDir,
    pub port: u16,
    /// The server's public host key (`ssh-ed25519 AAAA…`).
    pub host_key: String,
    /// The client's private key (authorised on the server).
    pub client_key: PathBuf,
    /// A `known_hosts` trusting this server.
    pub known_hosts: PathBuf,
}

impl Sshd {
    /// Starts a server; panics with sshd's own words when it cannot.
    pub fn start() -> Sshd {
        assert!(
            Path::new("/usr/sbin/sshd").exists(),
            "the SSH tests need /usr/sbin/sshd (Debian: apt-get install openssh-server)"
        );
        // sshd's privilege-separation directory; it refuses to start without it.
        let _ = std::fs::create_dir_all("/run/sshd");
        let dir = tempfile::tempdir().expect("tmp");
        let host_key_path = dir.path().join("host_ed25519");
        keygen(&host_key_path);
        let host_key = std::fs::read_to_string(host_key_path.with_extension("pub"))
            .expect("host pub")
            .trim()
            .to_string();
        let client_key = dir.path().join("client/id_ed25519");
        let client_pub = ensure_keypair(&client_key, "automaton-test").expect("client key");
        let home = dir.path().join("home");
        std::fs::create_dir_all(&home).expect("session home");
        let authorized = dir.path().join("authorized_keys");
        std::fs::write(&authorized, format!("{client_pub}\n")).expect("authorized_keys");

        let mut last_error = String::new();
        for _ in 0..5 {
            let port = free_port();
            let config = dir.path().join("sshd_config");
            std::fs::write(
                &config,
                format!(
                    "Port {port}\nListenAddress 127.0.0.1\nHostKey {host}\nPidFile none\nAuthorizedKeysFile {auth}\n\
                     UsePAM no\nStrictModes no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
                     PubkeyAuthentication yes\nPermitRootLogin prohibit-password\nSubsystem sftp internal-sftp\n\
                     LogLevel ERROR\nSetEnv HOME=\"{home}\"\n",
                    home = home.display(),
                    host = host_key_path.display(),
                    auth = authorized.display(),
                ),
            )
            .expect("sshd_config");
            let log = dir.path().join("sshd.log");
            let mut command = Command::new("/usr/sbin/sshd");
            command
                .args(["-D", "-e", "-f"])
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).expect("log"));
            // SAFETY: prctl(PR_SET_PDEATHSIG) in the forked child before exec; async-signal-safe.
            unsafe {
                command.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    Ok(())
                });
            }
            let mut child = command.spawn().expect("spawn sshd");
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut delay = Duration::from_millis(10);
            loop {
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    let known_hosts = dir.path().join("client/known_hosts");
                    add_known_host(&known_hosts, "127.0.0.1", port, &host_key)
                        .expect("known_hosts");
                    return Sshd {
                        child,
                        dir,
                        port,
                        host_key,
                        client_key,
                        known_hosts,
                    };
                }
                if let Ok(Some(_)) = child.try_wait() {
                    last_error = std::fs::read_to_string(&log).unwrap_or_default();
                    break;
                }
                assert!(Instant::now() < deadline, "sshd did not listen within 10 s");
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_millis(200));
            }
        }
        panic!("sshd would not start: {last_error}");
    }

    /// A target for this server as the current user.
    pub fn target(&self) -> SshTarget {
        SshTarget {
            host: "127.0.0.1".to_string(),
            port: self.port,
            user: current_user(),
            key_path: self.client_key.clone(),
            known_hosts: self.known_hosts.clone(),
        }
    }

    /// Options with `workdir` as the remote working directory.
    pub fn options(&self, workdir: &Path) -> SshOptions {
        SshOptions {
            workdir: Some(workdir.to_path_buf()),
            idle: Duration::from_secs(60),
            ..Default::default()
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The sessions' `HOME`.
    pub fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fresh ed25519 key pair (for host keys, or to impersonate a replaced machine).
pub fn keygen(path: &Path) {
    let status = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(path)
        .stdin(Stdio::null())
        .status()
        .expect("ssh-keygen");
    assert!(status.success(), "ssh-keygen failed");
}

pub fn current_user() -> String {
    let out = Command::new("id").arg("-un").output().expect("id -un");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

/// Whether a process is alive on this machine (the test's sshd runs here, so remote pids are local pids).
pub fn process_alive(pid: i32) -> bool {
    // SAFETY: kill(2) with signal 0 only checks for existence and permission.
    unsafe { libc::kill(pid, 0) == 0 }
}
