//! A lab VM as a real machine: an OpenSSH `sshd` on its own loopback address (127.0.0.x, port 22) with its own
//! host key, the VM's registered SSH key authorised for the lab's Unix user, and its own directory as `HOME`.
//! Stopping it kills the sshd and every process started through it.

use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine;
use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};

use super::model::HostKey;
use super::procs;

/// How long a starting sshd may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    #[error("no sshd binary found (install openssh-server, or set AUTOMATON_LAB_SSHD to its absolute path)")]
    NoSshd,
    #[error("no ssh-keygen binary found (install openssh-client)")]
    NoSshKeygen,
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("sshd for VM {vm_id} did not start: {reason}")]
    SshdFailed { vm_id: u64, reason: String },
    #[error("no free loopback address 127.0.0.2-254 for a lab VM")]
    NoAddress,
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> MachineError {
    let what = what.into();
    move |source| MachineError::Io { what, source }
}

/// What the API shows of a machine (`VmRunningState.state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerState {
    Creating,
    Running,
    Stopped,
}

impl PowerState {
    pub fn as_str(self) -> &'static str {
        match self {
            PowerState::Creating => "creating",
            PowerState::Running => "running",
            PowerState::Stopped => "stopped",
        }
    }
}

#[derive(Debug, Clone)]
pub struct MachineStatus {
    pub state: PowerState,
    pub since: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub sshd_pid: Option<u32>,
    pub last_error: Option<String>,
}

/// One VM's machine. Operations are serialised by the caller (one async lock per machine).
pub struct Machine {
    vm_id: u64,
    dir: PathBuf,
    ip: Ipv4Addr,
    user: String,
    /// Held while the VM exists: a cross-process reservation of its address.
    _ip_lock: File,
    sshd: Option<Child>,
    pub status: MachineStatus,
}

impl Machine {
    /// The marker scope of this VM's processes.
    pub fn scope(vm_id: u64) -> String {
        format!("vm-{vm_id}")
    }

    /// Prepares the machine directory under `dir` (home, host key, init scripts) on `preferred` address if it is
    /// still free, else another one. Blocking (runs ssh-keygen once).
    pub fn create(
        vm_id: u64,
        dir: &Path,
        preferred: Option<u8>,
        taken: &HashSet<u8>,
        authorized_key: &str,
    ) -> Result<Machine, MachineError> {
        let (octet, lock) = allocate_ip(preferred, taken)?;
        std::fs::create_dir_all(dir.join("etc"))
            .map_err(io_err(format!("creating {}", dir.display())))?;
        std::fs::create_dir_all(dir.join("home")).map_err(io_err("creating the VM home"))?;
        let machine = Machine {
            vm_id,
            dir: dir.to_path_buf(),
            ip: Ipv4Addr::new(127, 0, 0, octet),
            user: procs::current_user(),
            _ip_lock: lock,
            sshd: None,
            status: MachineStatus {
                state: PowerState::Stopped,
                since: Utc::now(),
                started_at: None,
                sshd_pid: None,
                last_error: None,
            },
        };
        if !machine.host_key_path().exists() {
            machine.generate_host_key()?;
        }
        machine.write_home_init()?;
        machine.set_authorized_key(authorized_key)?;
        Ok(machine)
    }

    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    pub fn octet(&self) -> u8 {
        self.ip.octets()[3]
    }

    pub fn home(&self) -> PathBuf {
        self.dir.join("home")
    }

    fn host_key_path(&self) -> PathBuf {
        self.dir.join("etc").join("ssh_host_ed25519_key")
    }

    fn generate_host_key(&self) -> Result<(), MachineError> {
        let keygen = procs::find_program(
            "ssh-keygen",
            "AUTOMATON_LAB_SSH_KEYGEN",
            &["/usr/bin/ssh-keygen"],
        )
        .ok_or(MachineError::NoSshKeygen)?;
        let key = self.host_key_path();
        let _ = std::fs::remove_file(&key);
        let _ = std::fs::remove_file(key.with_extension("pub"));
        let out = Command::new(keygen)
            .args(["-q", "-t", "ed25519", "-N", "", "-C"])
            .arg(format!("lnvps-lab-vm-{}", self.vm_id))
            .arg("-f")
            .arg(&key)
            .stdin(Stdio::null())
            .output()
            .map_err(io_err("running ssh-keygen"))?;
        if !out.status.success() {
            return Err(MachineError::SshdFailed {
                vm_id: self.vm_id,
                reason: format!(
                    "ssh-keygen failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            });
        }
        Ok(())
    }

    /// The machine's host keys as the API reports them.
    pub fn host_keys(&self) -> Vec<HostKey> {
        std::fs::read_to_string(self.host_key_path().with_extension("pub"))
            .ok()
            .and_then(|line| host_key_of(&line))
            .into_iter()
            .collect()
    }

    /// Authorises `key_line` (an OpenSSH public key) for the lab user; sshd reads the file on every login, so a
    /// change takes effect at once.
    pub fn set_authorized_key(&self, key_line: &str) -> Result<(), MachineError> {
        let path = self.dir.join("etc").join("authorized_keys");
        write_atomic(&path, format!("{}\n", key_line.trim()).as_bytes())
    }

    /// Sessions start with `HOME` = the VM's directory, and their shells `cd` there once (then drop the flag, so
    /// scripts run later keep their own working directory): bash reads `$HOME/.bashrc` when sshd runs a command,
    /// `$BASH_ENV` otherwise, and login shells read `$HOME/.profile`.
    fn write_home_init(&self) -> Result<(), MachineError> {
        let snippet = "# automaton-lab: start sessions in the VM's home (its HOME), once.\n\
                       if [ -n \"$LAB_VM_CD_HOME\" ]; then unset LAB_VM_CD_HOME; cd \"$HOME\" 2>/dev/null; fi\n";
        write_atomic(&self.dir.join("etc").join("vm-init.sh"), snippet.as_bytes())?;
        for name in [".bashrc", ".profile"] {
            let path = self.home().join(name);
            if !path.exists() {
                write_atomic(&path, snippet.as_bytes())?;
            }
        }
        Ok(())
    }

    fn write_config(&self) -> Result<PathBuf, MachineError> {
        let etc = self.dir.join("etc");
        let home = self.home();
        let config = format!(
            "# automaton-lab LNVPS double: VM {vm}\n\
             ListenAddress {ip}:22\n\
             HostKey \"{hostkey}\"\n\
             AuthorizedKeysFile \"{authorized}\"\n\
             PidFile none\n\
             UsePAM no\n\
             StrictModes no\n\
             PubkeyAuthentication yes\n\
             PasswordAuthentication no\n\
             KbdInteractiveAuthentication no\n\
             PermitRootLogin prohibit-password\n\
             AllowUsers {user}\n\
             PrintMotd no\n\
             UseDNS no\n\
             MaxStartups 100:30:200\n\
             Subsystem sftp internal-sftp -d \"{home}\"\n\
             SetEnv AUTOMATON_SUPERVISOR=pidfile HOME=\"{home}\" LAB_VM_CD_HOME=1 BASH_ENV=\"{init}\" {owner_var}={marker}\n",
            vm = self.vm_id,
            ip = self.ip,
            hostkey = self.host_key_path().display(),
            authorized = etc.join("authorized_keys").display(),
            user = self.user,
            home = home.display(),
            init = etc.join("vm-init.sh").display(),
            owner_var = procs::OWNER_VAR,
            marker = procs::marker(&Self::scope(self.vm_id)),
        );
        // The file name carries this lab's tag: sshd's process title shows it, so the reaper can find the
        // listener (and through it every connection) even though sshd's title hides its environment.
        if let Ok(entries) = std::fs::read_dir(&etc) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().ends_with(".sshd_config") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        let path = etc.join(format!(
            "{}sshd_config",
            procs::cmdline_tag(&Self::scope(self.vm_id))
        ));
        write_atomic(&path, config.as_bytes())?;
        Ok(path)
    }

    /// Is the sshd alive? Notices an sshd that died on its own.
    pub fn refresh(&mut self) -> bool {
        let alive = match self.sshd.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        };
        if !alive && self.status.state == PowerState::Running {
            self.sshd = None;
            self.set_state(PowerState::Stopped);
            self.status.sshd_pid = None;
            self.status.last_error = Some("sshd exited".into());
        }
        alive
    }

    fn set_state(&mut self, state: PowerState) {
        self.status.state = state;
        self.status.since = Utc::now();
    }

    /// Starts the sshd (no-op when running) and waits until it accepts connections. Blocking.
    pub fn start(&mut self) -> Result<(), MachineError> {
        if self.refresh() {
            return Ok(());
        }
        self.set_state(PowerState::Creating);
        match self.start_sshd() {
            Ok(pid) => {
                self.set_state(PowerState::Running);
                self.status.started_at = Some(Utc::now());
                self.status.sshd_pid = Some(pid);
                self.status.last_error = None;
                Ok(())
            }
            Err(e) => {
                self.kill_all();
                self.set_state(PowerState::Stopped);
                self.status.last_error = Some(e.to_string());
                Err(e)
            }
        }
    }

    fn start_sshd(&mut self) -> Result<u32, MachineError> {
        let sshd = procs::find_program("sshd", "AUTOMATON_LAB_SSHD", &["/usr/sbin/sshd"])
            .ok_or(MachineError::NoSshd)?;
        // sshd's privilege separation needs this directory when it runs as root; elsewhere it is not used.
        if !Path::new("/run/sshd").exists() {
            let _ = std::fs::create_dir_all("/run/sshd");
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let _ =
                    std::fs::set_permissions("/run/sshd", std::fs::Permissions::from_mode(0o755));
            }
        }
        let config = self.write_config()?;
        let log_path = self.dir.join("sshd.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io_err(format!("opening {}", log_path.display())))?;
        let log_err = log.try_clone().map_err(io_err("cloning the sshd log"))?;
        let mut command = Command::new(&sshd);
        command
            .arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(&config)
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env(procs::OWNER_VAR, procs::marker(&Self::scope(self.vm_id)))
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        let child = procs::spawn_supervised(command, procs::DeathWatch::Reaper)
            .map_err(io_err(format!("starting {}", sshd.display())))?;
        let pid = child.id();
        self.sshd = Some(child);
        let addr = SocketAddr::from((self.ip, 22));
        let started = Instant::now();
        let mut delay = Duration::from_millis(10);
        loop {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok() {
                return Ok(pid);
            }
            let exited = self
                .sshd
                .as_mut()
                .map(|c| !matches!(c.try_wait(), Ok(None)))
                .unwrap_or(true);
            if exited || started.elapsed() > START_TIMEOUT {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(5).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                return Err(MachineError::SshdFailed {
                    vm_id: self.vm_id,
                    reason: if exited {
                        format!("sshd exited: {}", tail.join(" | "))
                    } else {
                        format!(
                            "not listening on {addr} after {} s",
                            START_TIMEOUT.as_secs()
                        )
                    },
                });
            }
            std::thread::sleep(delay);
            delay = (delay * 2).min(Duration::from_millis(200));
        }
    }

    /// Kills the sshd and every process started through it. Blocking.
    fn kill_all(&mut self) {
        let root = self.sshd.as_ref().map(|c| c.id());
        procs::kill_scope(&Self::scope(self.vm_id), root);
        if let Some(mut child) = self.sshd.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the machine: kills the sshd, its sessions and whatever they started. Blocking.
    pub fn stop(&mut self) {
        self.kill_all();
        self.status.sshd_pid = None;
        self.status.started_at = None;
        self.set_state(PowerState::Stopped);
    }

    /// A fresh OS: stops, wipes the home directory and generates a new host key. Blocking.
    pub fn reinstall(&mut self) -> Result<(), MachineError> {
        self.stop();
        let home = self.home();
        let _ = std::fs::remove_dir_all(&home);
        std::fs::create_dir_all(&home).map_err(io_err("recreating the VM home"))?;
        self.generate_host_key()?;
        self.write_home_init()
    }

    /// Stops the machine and removes its directory. Blocking.
    pub fn destroy(mut self) {
        self.stop();
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            tracing::warn!(vm = self.vm_id, error = %e, "removing a deleted VM's directory failed");
        }
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        if self.sshd.is_some() {
            self.kill_all();
        }
    }
}

/// `ssh-ed25519 AAAA… comment` → the API's host key object.
pub fn host_key_of(pub_line: &str) -> Option<HostKey> {
    let mut fields = pub_line.split_whitespace();
    let key_type = fields.next()?.to_string();
    let blob = fields.next()?.to_string();
    let raw = base64::engine::general_purpose::STANDARD
        .decode(&blob)
        .ok()?;
    Some(HostKey {
        key_type,
        public_key: blob,
        fingerprint_sha256: format!(
            "SHA256:{}",
            base64::engine::general_purpose::STANDARD_NO_PAD.encode(Sha256::digest(&raw))
        ),
    })
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), MachineError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(io_err(format!("writing {}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(io_err(format!("renaming {}", path.display())))
}

/// Directory of the cross-process address reservations (`flock`ed files, released when their process exits).
fn ip_lock_dir() -> PathBuf {
    std::env::temp_dir().join("automaton-lab-vm-addresses")
}

fn lock_ip(octet: u8) -> Option<File> {
    let dir = ip_lock_dir();
    std::fs::create_dir_all(&dir).ok()?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(format!("127.0.0.{octet}.lock")))
        .ok()?;
    use std::os::unix::io::AsRawFd;
    // SAFETY: flock on a file descriptor we own.
    let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
    locked.then_some(file)
}

/// Nothing listens on `127.0.0.x:22` right now.
fn port_free(octet: u8) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::new(127, 0, 0, octet), 22));
    match std::net::TcpListener::bind(addr) {
        Ok(_) => true,
        // Not allowed to bind port 22 (not root): fall back to "nobody answers".
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_err()
        }
        Err(_) => false,
    }
}

/// Picks 127.0.0.x for a VM: `preferred` if still free, else a free one from a random starting point, reserved
/// across processes so two labs on one machine never hand out the same address.
fn allocate_ip(preferred: Option<u8>, taken: &HashSet<u8>) -> Result<(u8, File), MachineError> {
    static ALLOCATING: Mutex<()> = Mutex::new(());
    let _guard = ALLOCATING.lock();
    let usable = |o: u8| (2..=254).contains(&o) && !taken.contains(&o);
    if let Some(o) = preferred.filter(|o| usable(*o)) {
        if let Some(lock) = lock_ip(o) {
            if port_free(o) {
                return Ok((o, lock));
            }
        }
    }
    let start: u8 = {
        use rand::Rng;
        rand::thread_rng().gen_range(2..=254)
    };
    for i in 0..253u16 {
        let o = (2 + ((start as u16 - 2 + i) % 253)) as u8;
        if !usable(o) {
            continue;
        }
        if let Some(lock) = lock_ip(o) {
            if port_free(o) {
                return Ok((o, lock));
            }
        }
    }
    Err(MachineError::NoAddress)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_key_fingerprint_matches_ssh_keygen() {
        // The same key and fingerprint as `ssh-keygen -lf` prints for it.
        let key = host_key_of(
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPPwF2Oob18mTOudLjiJ00REIcI781xZ3NRLqiebcAHO vm",
        )
        .unwrap();
        assert_eq!(key.key_type, "ssh-ed25519");
        assert_eq!(
            key.fingerprint_sha256,
            "SHA256:rh3bMAtiFPHhEyUp3AqUq1l8XRi/dPjW8mzAA0rqhFk"
        );
    }

    #[test]
    fn addresses_are_reserved_once() {
        let (a, _lock_a) = allocate_ip(None, &HashSet::new()).unwrap();
        let (b, _lock_b) = allocate_ip(Some(a), &HashSet::from([a])).unwrap();
        assert_ne!(a, b);
        // Another reservation of `a` while it is held fails.
        assert!(lock_ip(a).is_none() || cfg!(not(target_os = "linux")));
    }
}
