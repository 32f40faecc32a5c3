//! The SSH compute backend: commands and files on a machine the agent reaches over SSH, through one multiplexed
//! connection of the system `ssh` client (the `openssh` crate), with strict host keys from the home's
//! `ssh/known_hosts`, the agent's own key, and a reconnect when the connection drops.
//!
//! Killing the local `ssh` does not stop a remote command, so every command runs on the remote side under
//! `timeout -s KILL`, which kills the command's whole process group there. A small POSIX `sh` wrapper also writes
//! two in-band markers (tagged with a random nonce) on stderr: one when the command starts (so a failed attempt to
//! reach the connection can be retried without running anything twice) and one with its exit status (so a
//! background job that keeps the output open does not hold the call until its timeout).

use std::io;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use openssh::{ControlPersist, KnownHosts, Session, SessionBuilder, Stdio};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::Mutex;

use super::capture::{CapBuffer, Marker, MarkerScanner};
use super::{ComputeError, ComputeProvider, ExecOutput, ExecRequest, FileContent};
use crate::config::keys::ConfigKey;

pub const KIND: &str = "ssh";

const KEYS: &[ConfigKey] = &[
    ConfigKey {
        name: "compute.ssh.host",
        prompt: "SSH host (name or address; its host key must be in the home's ssh/known_hosts)",
        default: None,
        secret: false,
    },
    ConfigKey {
        name: "compute.ssh.port",
        prompt: "SSH port",
        default: Some("22"),
        secret: false,
    },
    ConfigKey {
        name: "compute.ssh.user",
        prompt: "SSH user",
        default: Some("root"),
        secret: false,
    },
    ConfigKey {
        name: "compute.ssh.key_path",
        prompt: "Private key (relative paths start in the home)",
        default: Some("ssh/id_ed25519"),
        secret: false,
    },
    ConfigKey {
        name: "compute.ssh.workdir",
        prompt: "Remote working directory (empty: the remote user's home)",
        default: None,
        secret: false,
    },
    ConfigKey {
        name: "compute.exec_timeout_secs",
        prompt: "Default timeout for one command, in seconds",
        default: Some("60"),
        secret: false,
    },
];

/// The config keys the setup wizard asks for this backend.
pub fn config_keys() -> &'static [ConfigKey] {
    KEYS
}

/// How long the multiplexing master may sit idle before it exits on its own. It is started detached (`ssh -f`),
/// so this bounds how long it can outlive an agent that was killed.
pub const DEFAULT_IDLE: Duration = Duration::from_secs(300);
/// How long to wait for the TCP connection and the SSH handshake.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
/// Extra time the local side waits past a command's timeout before giving up on the remote side's answer.
const REMOTE_GRACE: Duration = Duration::from_secs(10);
/// How long to keep reading after the command exited while its background jobs keep the output open.
const OUTPUT_GRACE: Duration = Duration::from_millis(200);
/// Time limit of one file read or write.
const FILE_TIMEOUT: Duration = Duration::from_secs(120);

/// Concurrent commands per connection (below sshd's default `MaxSessions` of 10).
const MAX_CHANNELS: usize = 8;

// Exit statuses of the file scripts (the numbers appear in the scripts below).
const ST_NOT_FOUND: i32 = 70;
const ST_IS_DIR: i32 = 71;
const ST_DENIED: i32 = 72;

/// Where and as whom to connect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SshTarget {
    pub host: String,
    pub port: u16,
    pub user: String,
    /// The private key (its `.pub` beside it).
    pub key_path: PathBuf,
    /// The only host keys trusted (normally the home's `ssh/known_hosts`).
    pub known_hosts: PathBuf,
}

impl SshTarget {
    /// `user@host:port`, for messages.
    pub fn display(&self) -> String {
        format!("{}@{}:{}", self.user, self.host, self.port)
    }
}

/// Tuning of an SSH provider.
#[derive(Clone, Debug)]
pub struct SshOptions {
    /// Remote working directory; `None`: the remote user's home (learnt on the first connection).
    pub workdir: Option<PathBuf>,
    /// `ControlPersist`: idle time after which the master exits.
    pub idle: Duration,
    pub connect_timeout: Duration,
}

impl Default for SshOptions {
    fn default() -> Self {
        SshOptions {
            workdir: None,
            idle: DEFAULT_IDLE,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        }
    }
}

/// One live multiplexed connection.
struct Connection {
    session: Session,
}

impl Connection {
    /// The master answers on its control socket; a killed master leaves the socket file behind but refuses.
    fn is_alive(&self) -> bool {
        std::os::unix::net::UnixStream::connect(self.session.control_socket()).is_ok()
    }
}

/// Runs commands on a machine over SSH.
pub struct SshCompute {
    target: SshTarget,
    options: SshOptions,
    /// The configured workdir, or `~` until the first connection learns the remote home.
    workdir: PathBuf,
    discovered_workdir: OnceLock<PathBuf>,
    connection: Mutex<Option<Arc<Connection>>>,
    /// A short directory for the control socket (socket paths are limited to ~108 bytes), and the client config.
    control_dir: tempfile::TempDir,
    reconnects: std::sync::atomic::AtomicU32,
    /// sshd allows 10 sessions per connection (`MaxSessions`); more concurrent commands wait for a channel.
    channels: tokio::sync::Semaphore,
}

impl std::fmt::Debug for SshCompute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshCompute")
            .field("target", &self.target)
            .field("workdir", &self.workdir())
            .finish_non_exhaustive()
    }
}

impl SshCompute {
    /// A provider that connects on first use (and again whenever the connection has dropped).
    pub fn new(target: SshTarget, options: SshOptions) -> Result<SshCompute, ComputeError> {
        if let Some(w) = &options.workdir {
            if w.is_relative() {
                return Err(ComputeError::Config(format!(
                    "the SSH working directory must be absolute, not {}",
                    w.display()
                )));
            }
        }
        let control_dir = tempfile::Builder::new()
            .prefix("automaton-ssh-")
            .tempdir_in("/tmp")
            .map_err(|e| ComputeError::io("create", Path::new("/tmp/automaton-ssh-*"), e))?;
        let config = control_dir.path().join("config");
        std::fs::write(&config, CLIENT_CONFIG)
            .map_err(|e| ComputeError::io("write", &config, e))?;
        Ok(SshCompute {
            workdir: options
                .workdir
                .clone()
                .unwrap_or_else(|| PathBuf::from("~")),
            target,
            options,
            discovered_workdir: OnceLock::new(),
            connection: Mutex::new(None),
            control_dir,
            reconnects: Default::default(),
            channels: tokio::sync::Semaphore::new(MAX_CHANNELS),
        })
    }

    /// Records `host_keys` (lines such as `ssh-ed25519 AAAA…`, as a provider publishes them) for the target in its
    /// `known_hosts`, then connects now. A recorded key that differs from a given one of the same type is an
    /// error: remove the old entry first (`remove_known_host`) when the machine was really replaced.
    pub async fn connect(
        target: SshTarget,
        host_keys: &[String],
        options: SshOptions,
    ) -> Result<SshCompute, ComputeError> {
        for key in host_keys {
            add_known_host(&target.known_hosts, &target.host, target.port, key)?;
        }
        let compute = SshCompute::new(target, options)?;
        compute.check().await?;
        Ok(compute)
    }

    pub fn target(&self) -> &SshTarget {
        &self.target
    }

    /// Connects if needed and checks the connection works.
    pub async fn check(&self) -> Result<(), ComputeError> {
        self.connection().await.map(|_| ())
    }

    /// How many times the connection was re-established after it dropped.
    pub fn reconnects(&self) -> u32 {
        self.reconnects.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The pid of the local multiplexing master, when one is running.
    pub async fn master_pid(&self) -> Option<u32> {
        let conn = self.connection.lock().await.clone()?;
        let out = tokio::process::Command::new("ssh")
            .arg("-S")
            .arg(conn.session.control_socket())
            .args(["-O", "check", "none"])
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .ok()?;
        let text = String::from_utf8_lossy(&out.stderr);
        let pid = text.split("pid=").nth(1)?;
        pid.chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse()
            .ok()
    }

    /// Closes the connection (the master exits). The next call reconnects.
    pub async fn disconnect(&self) {
        if let Some(conn) = self.connection.lock().await.take() {
            if let Ok(conn) = Arc::try_unwrap(conn) {
                let _ = conn.session.close().await;
            }
        }
    }

    /// The live connection, made or remade as needed.
    async fn connection(&self) -> Result<Arc<Connection>, ComputeError> {
        let mut slot = self.connection.lock().await;
        if let Some(conn) = slot.as_ref() {
            if conn.is_alive() {
                return Ok(conn.clone());
            }
            tracing::info!(target = %self.target.display(), "ssh connection dropped; reconnecting");
            self.reconnects
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            *slot = None;
        }
        let conn = Arc::new(self.open().await?);
        *slot = Some(conn.clone());
        Ok(conn)
    }

    async fn open(&self) -> Result<Connection, ComputeError> {
        let t = &self.target;
        // The agent's own key: made on first use, so the error below can show the line to authorise.
        ensure_keypair(&t.key_path, "automaton")?;
        let idle = NonZeroUsize::new(self.options.idle.as_secs().max(1) as usize)
            .unwrap_or(NonZeroUsize::MIN);
        let mut builder = SessionBuilder::default();
        builder
            .user(t.user.clone())
            .port(t.port)
            .keyfile(&t.key_path)
            .known_hosts_check(KnownHosts::Strict)
            .user_known_hosts_file(&t.known_hosts)
            .config_file(self.control_dir.path().join("config"))
            .control_directory(self.control_dir.path())
            .control_persist(ControlPersist::IdleFor(idle))
            .connect_timeout(self.options.connect_timeout)
            .server_alive_interval(Duration::from_secs(15));
        let session = builder
            .connect(&t.host)
            .await
            .map_err(|e| self.connect_error(e))?;
        let conn = Connection { session };
        if self.discovered_workdir.get().is_none() {
            self.discover(&conn).await?;
        }
        Ok(conn)
    }

    /// Learns the remote home (the default workdir) and checks `timeout` exists there.
    async fn discover(&self, conn: &Connection) -> Result<(), ComputeError> {
        let probe =
            "printf '%s\\n' \"$HOME\"; command -v timeout >/dev/null 2>&1 && echo timeout-ok";
        let out = conn
            .session
            .raw_command(format!("sh -c {}", quote(probe)))
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(|e| self.remote_error("probe the remote machine", e))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let mut lines = text.lines();
        let home = lines.next().unwrap_or_default().trim().to_string();
        if !lines.any(|l| l == "timeout-ok") {
            return Err(ComputeError::Remote {
                provider: KIND,
                message: format!(
                    "{} has no `timeout` command (coreutils or busybox), so commands there cannot be time-limited",
                    self.target.display()
                ),
            });
        }
        let workdir = match &self.options.workdir {
            Some(w) => w.clone(),
            None if home.starts_with('/') => PathBuf::from(home),
            None => PathBuf::from("/"),
        };
        let _ = self.discovered_workdir.set(workdir);
        Ok(())
    }

    fn connect_error(&self, err: openssh::Error) -> ComputeError {
        let text = error_text(&err);
        let host = self.target.display();
        if text.contains("IDENTIFICATION HAS CHANGED")
            || text.contains("has changed and you have requested strict")
        {
            ComputeError::HostKeyChanged {
                host,
                known_hosts: self.target.known_hosts.clone(),
            }
        } else if text.contains("Host key verification failed")
            || text.contains("host key is known")
        {
            ComputeError::HostKeyUnknown {
                host,
                known_hosts: self.target.known_hosts.clone(),
            }
        } else if text.contains("Permission denied") {
            let public = std::fs::read_to_string(self.target.key_path.with_extension("pub"))
                .map(|l| l.trim().to_string())
                .unwrap_or_default();
            ComputeError::Connect {
                target: host,
                reason: format!(
                    "the server refused the agent's key {}; authorise it by adding this line to \
                     ~{}/.ssh/authorized_keys there: {public}",
                    self.target.key_path.display(),
                    self.target.user,
                ),
            }
        } else {
            ComputeError::Connect {
                target: host,
                reason: last_line(&text),
            }
        }
    }

    fn remote_error(&self, what: &str, err: openssh::Error) -> ComputeError {
        ComputeError::Remote {
            provider: KIND,
            message: format!(
                "could not {what} on {}: {}",
                self.target.display(),
                error_text(&err)
            ),
        }
    }

    /// Runs `script` (POSIX sh, with `args`) remotely, feeding `stdin`, capturing stdout up to `stdout_cap` and
    /// stderr up to `stderr_cap`, and waiting at most `limit` for the exit marker. Retries once on a fresh
    /// connection when the command provably never started.
    async fn run(
        &self,
        script: &str,
        args: &[&str],
        stdin: Option<&[u8]>,
        stdout_cap: usize,
        stderr_cap: usize,
        limit: Duration,
    ) -> Result<RemoteRun, ComputeError> {
        let mut attempt = 0;
        loop {
            let conn = self.connection().await?;
            let run = self
                .run_once(&conn, script, args, stdin, stdout_cap, stderr_cap, limit)
                .await?;
            // A wrapper that never started ran nothing (typically the master went away between the liveness check
            // and the command), so one more try on a fresh connection cannot run anything twice.
            if run.started || attempt > 0 {
                return Ok(run);
            }
            attempt += 1;
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn run_once(
        &self,
        conn: &Connection,
        script: &str,
        args: &[&str],
        stdin: Option<&[u8]>,
        stdout_cap: usize,
        stderr_cap: usize,
        limit: Duration,
    ) -> Result<RemoteRun, ComputeError> {
        let _channel = self
            .channels
            .acquire()
            .await
            .map_err(|_| ComputeError::Disconnected {
                target: self.target.display(),
                detail: "the provider is shutting down".to_string(),
            })?;
        let started_at = Instant::now();
        let tag = format!("\x1fautomaton-{}", nonce());
        let mut line = format!("sh -c {} automaton {}", quote(script), quote(&tag));
        for a in args {
            line.push(' ');
            line.push_str(&quote(a));
        }
        let mut child = conn
            .session
            .raw_command(line)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .await
            .map_err(|e| self.remote_error("start the command", e))?;
        let writer = match (stdin, child.stdin().take()) {
            (Some(bytes), Some(mut pipe)) => {
                let bytes = bytes.to_vec();
                Some(tokio::spawn(async move {
                    let r = pipe.write_all(&bytes).await;
                    let _ = pipe.shutdown().await;
                    r
                }))
            }
            _ => None,
        };
        let (marker_tx, mut marker_rx) = tokio::sync::mpsc::unbounded_channel();
        let stop = tokio_util::sync::CancellationToken::new();
        let out_task = child
            .stdout()
            .take()
            .map(|r| tokio::spawn(read_stream(r, stdout_cap, None, stop.clone())));
        let err_task = child.stderr().take().map(|r| {
            tokio::spawn(read_stream(
                r,
                stderr_cap,
                Some((MarkerScanner::new(&tag), marker_tx)),
                stop.clone(),
            ))
        });

        let mut wait = Box::pin(child.wait());
        let deadline = tokio::time::sleep(limit);
        tokio::pin!(deadline);
        let mut started = false;
        let mut status = None;
        let mut ssh_done = false;
        let mut gave_up = false;
        loop {
            tokio::select! {
                marker = marker_rx.recv() => match marker {
                    Some(Marker::Started) => started = true,
                    Some(Marker::Exited(s)) => {
                        status = Some(s);
                        break;
                    }
                    None => {
                        // stderr closed; the ssh process is about to end.
                        let _ = tokio::time::timeout(OUTPUT_GRACE, &mut wait).await;
                        ssh_done = true;
                        break;
                    }
                },
                _ = &mut wait => {
                    ssh_done = true;
                    break;
                }
                _ = &mut deadline => {
                    gave_up = true;
                    break;
                }
            }
        }
        if status.is_some() && !ssh_done {
            // Background jobs of the command may keep its output open; give them a moment, then stop listening.
            ssh_done = tokio::time::timeout(OUTPUT_GRACE, &mut wait).await.is_ok();
        }
        let _ = ssh_done;
        // Dropping the wait future kills the local ssh (kill_on_drop); the remote side is bounded by `timeout`.
        drop(wait);
        let collect = async {
            let out = match out_task {
                Some(h) => h.await.unwrap_or_default(),
                None => Default::default(),
            };
            let err = match err_task {
                Some(h) => h.await.unwrap_or_default(),
                None => Default::default(),
            };
            (out, err)
        };
        tokio::pin!(collect);
        let (out, err) = match tokio::time::timeout(OUTPUT_GRACE, &mut collect).await {
            Ok(v) => v,
            Err(_) => {
                stop.cancel();
                collect.await
            }
        };
        // Markers that arrived after the loop stopped listening.
        while let Ok(m) = marker_rx.try_recv() {
            match m {
                Marker::Started => started = true,
                Marker::Exited(s) => status = status.or(Some(s)),
            }
        }
        if let Some(w) = writer {
            if let Ok(Err(e)) = w.await {
                if status.is_none() {
                    return Err(ComputeError::Remote {
                        provider: KIND,
                        message: format!("could not send data to {}: {e}", self.target.display()),
                    });
                }
            }
        }
        Ok(RemoteRun {
            started: started || status.is_some(),
            status,
            gave_up,
            stdout: out.0,
            stdout_cut: out.1,
            stderr: err.0,
            stderr_cut: err.1,
            elapsed: started_at.elapsed(),
        })
    }

    fn remote_path(&self, path: &Path) -> String {
        path.to_string_lossy().into_owned()
    }

    /// A run that ended without an exit status: the connection broke (or the remote side never answered).
    fn lost(&self, run: &RemoteRun) -> ComputeError {
        let detail = String::from_utf8_lossy(&run.stderr);
        let detail = last_line(&detail);
        ComputeError::Disconnected {
            target: self.target.display(),
            detail: if detail.is_empty() {
                "no answer".to_string()
            } else {
                detail
            },
        }
    }
}

/// What one remote run produced.
#[derive(Debug, Default)]
struct RemoteRun {
    /// The wrapper started (the command may have run).
    started: bool,
    /// The wrapper's exit status, when its exit marker arrived.
    status: Option<i32>,
    /// The local side stopped waiting.
    gave_up: bool,
    stdout: Vec<u8>,
    stdout_cut: bool,
    stderr: Vec<u8>,
    stderr_cut: bool,
    elapsed: Duration,
}

/// Reads a stream to its end (or until `stop`), capped, optionally pulling markers out of it first.
async fn read_stream<R: AsyncRead + Unpin>(
    mut reader: R,
    cap: usize,
    mut markers: Option<(MarkerScanner, tokio::sync::mpsc::UnboundedSender<Marker>)>,
    stop: tokio_util::sync::CancellationToken,
) -> (Vec<u8>, bool) {
    let mut buffer = CapBuffer::new(cap);
    let mut chunk = vec![0u8; 8192];
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            n = reader.read(&mut chunk) => match n {
                Ok(0) | Err(_) => break,
                Ok(n) => match markers.as_mut() {
                    Some((scanner, tx)) => {
                        let (bytes, found) = scanner.feed(&chunk[..n]);
                        buffer.push(&bytes);
                        for m in found {
                            let _ = tx.send(m);
                        }
                    }
                    None => buffer.push(&chunk[..n]),
                },
            },
        }
    }
    if let Some((scanner, _)) = markers {
        buffer.push(&scanner.finish());
    }
    buffer.finish()
}

/// Options for every connection: nothing from the operator's own `~/.ssh/config`, the system known hosts or an
/// agent; only the home's `known_hosts` and the configured key.
const CLIENT_CONFIG: &str = "\
GlobalKnownHostsFile /dev/null
CheckHostIP no
HashKnownHosts no
UpdateHostKeys no
IdentityAgent none
AddKeysToAgent no
PasswordAuthentication no
KbdInteractiveAuthentication no
ForwardAgent no
ForwardX11 no
ServerAliveCountMax 3
LogLevel ERROR
";

/// Prints the start marker, enters the workdir, runs `$4` under `timeout -s KILL $3` (which kills the command's
/// process group on expiry), then prints the exit marker. `$1` = tag, `$2` = workdir, `$3` = seconds.
const EXEC_SCRIPT: &str = r#"t=$1; w=$2
printf '%s:start\n' "$t" >&2
case $w in "~") w=$HOME;; "~/"*) w=$HOME/${w#"~/"};; esac
mkdir -p -- "$w" 2>/dev/null
if ! cd -- "$w"; then printf '\n%s:%s\n' "$t" 1 >&2; exit 1; fi
timeout -s KILL "$3" sh -c "$4" </dev/null
s=$?
printf '\n%s:%s\n' "$t" "$s" >&2
exit "$s""#;

/// `$2` = path, `$3` = most bytes to send. Prints the size on a line, then the bytes.
const READ_SCRIPT: &str = r#"t=$1; p=$2
printf '%s:start\n' "$t" >&2
case $p in "~") p=$HOME;; "~/"*) p=$HOME/${p#"~/"};; esac
r() { printf '\n%s:%s\n' "$t" "$1" >&2; exit "$1"; }
[ -e "$p" ] || r 70
[ -d "$p" ] && r 71
[ -r "$p" ] || r 72
n=$(wc -c < "$p") || r 73
printf '%s\n' $n
head -c "$3" < "$p" || r 73
r 0"#;

/// `$2` = path; the content arrives on stdin. A symlink at the target is refused, like the local backend does.
const WRITE_SCRIPT: &str = r#"t=$1; p=$2
printf '%s:start\n' "$t" >&2
case $p in "~") p=$HOME;; "~/"*) p=$HOME/${p#"~/"};; esac
r() { printf '\n%s:%s\n' "$t" "$1" >&2; exit "$1"; }
d=$(dirname -- "$p")
mkdir -p -- "$d" || r 73
[ -L "$p" ] && r 72
[ -d "$p" ] && r 71
cat > "$p" || r 73
r 0"#;

#[async_trait]
impl ComputeProvider for SshCompute {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn workdir(&self) -> &Path {
        self.discovered_workdir
            .get()
            .map(PathBuf::as_path)
            .unwrap_or(&self.workdir)
    }

    fn shares_agent_filesystem(&self) -> bool {
        false
    }

    async fn exec(&self, request: ExecRequest) -> Result<ExecOutput, ComputeError> {
        let started = Instant::now();
        let workdir = self.remote_path(self.workdir());
        let secs = format!("{:.3}", request.timeout.as_secs_f64().max(0.001));
        let run = self
            .run(
                EXEC_SCRIPT,
                &[&workdir, &secs, &request.command],
                None,
                request.output_cap,
                request.output_cap,
                request.timeout + REMOTE_GRACE,
            )
            .await?;
        let (exit_code, signal, timed_out) = match run.status {
            Some(s) if s > 128 && s <= 128 + 64 => {
                let signal = s - 128;
                // `timeout -s KILL` kills itself with the group, so its parent sees 128 + 9.
                let timed_out = signal == libc::SIGKILL && run.elapsed >= request.timeout;
                (None, Some(signal), timed_out)
            }
            Some(s) => (Some(s), None, false),
            None if run.gave_up => (None, None, true),
            None => return Err(self.lost(&run)),
        };
        Ok(ExecOutput {
            exit_code,
            signal,
            stdout: String::from_utf8_lossy(&run.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&run.stderr).into_owned(),
            stdout_truncated: run.stdout_cut,
            stderr_truncated: run.stderr_cut,
            timed_out,
            duration: started.elapsed(),
        })
    }

    async fn read_file(&self, path: &Path, max_bytes: usize) -> Result<FileContent, ComputeError> {
        let remote = self.remote_path(path);
        let max = max_bytes.to_string();
        let run = self
            .run(
                READ_SCRIPT,
                &[&remote, &max],
                None,
                // The size line, then the bytes; twice the room so nothing is ever cut in the middle.
                max_bytes.saturating_add(32).saturating_mul(2),
                4096,
                FILE_TIMEOUT,
            )
            .await?;
        match run.status {
            Some(0) => {
                let newline = run.stdout.iter().position(|&b| b == b'\n').ok_or_else(|| {
                    ComputeError::Remote {
                        provider: KIND,
                        message: format!("no size in the answer for {}", path.display()),
                    }
                })?;
                let size = std::str::from_utf8(&run.stdout[..newline])
                    .ok()
                    .and_then(|s| s.trim().parse::<u64>().ok())
                    .ok_or_else(|| ComputeError::Remote {
                        provider: KIND,
                        message: format!("bad size in the answer for {}", path.display()),
                    })?;
                let mut bytes = run.stdout[newline + 1..].to_vec();
                bytes.truncate(max_bytes);
                Ok(FileContent { bytes, size })
            }
            Some(status) => Err(self.file_error("read", path, status, &run)),
            None => Err(self.lost(&run)),
        }
    }

    async fn write_file(&self, path: &Path, content: &[u8]) -> Result<(), ComputeError> {
        let remote = self.remote_path(path);
        let run = self
            .run(
                WRITE_SCRIPT,
                &[&remote],
                Some(content),
                4096,
                4096,
                FILE_TIMEOUT,
            )
            .await?;
        match run.status {
            Some(0) => Ok(()),
            Some(status) => Err(self.file_error("write", path, status, &run)),
            None => Err(self.lost(&run)),
        }
    }
}

impl SshCompute {
    fn file_error(
        &self,
        op: &'static str,
        path: &Path,
        status: i32,
        run: &RemoteRun,
    ) -> ComputeError {
        let path = path.to_path_buf();
        match status {
            ST_NOT_FOUND => ComputeError::NotFound { path },
            ST_IS_DIR => ComputeError::IsDirectory { path },
            ST_DENIED => ComputeError::PermissionDenied { path },
            _ => {
                let stderr = String::from_utf8_lossy(&run.stderr);
                let reason = last_line(&stderr);
                ComputeError::Io {
                    op,
                    path,
                    source: io::Error::other(if reason.is_empty() {
                        format!("remote status {status}")
                    } else {
                        reason
                    }),
                }
            }
        }
    }
}

/// The whole text of an openssh error, including its source (where ssh's own message is).
fn error_text(err: &openssh::Error) -> String {
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

fn last_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .unwrap_or_default()
        .to_string()
}

/// Quotes a word for a POSIX shell.
pub fn quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', r"'\''"))
}

fn nonce() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The name `known_hosts` uses for a host: `host` on port 22, `[host]:port` otherwise.
pub fn known_hosts_name(host: &str, port: u16) -> String {
    if port == 22 {
        host.to_string()
    } else {
        format!("[{host}]:{port}")
    }
}

/// Parses a public host key line (`type base64 [comment]`) into `type base64`.
fn normalise_key(key: &str) -> Result<(String, String), ComputeError> {
    let mut parts = key.split_whitespace();
    let (Some(kind), Some(blob)) = (parts.next(), parts.next()) else {
        return Err(ComputeError::Config(format!(
            "not an SSH public key: {key:?} (expected `type base64`)"
        )));
    };
    let known_kind = kind.starts_with("ssh-")
        || kind.starts_with("ecdsa-")
        || kind.starts_with("sk-")
        || kind.starts_with("rsa-");
    let base64 = !blob.is_empty()
        && blob
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/' || b == b'=');
    if !known_kind || !base64 {
        return Err(ComputeError::Config(format!(
            "not an SSH public key: {key:?} (expected `type base64`)"
        )));
    }
    Ok((kind.to_string(), blob.to_string()))
}

/// Entries of `known_hosts` whose host field names `name` (comma-separated lists are understood).
fn entry_matches(line: &str, name: &str) -> bool {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') || line.starts_with('@') {
        return false;
    }
    line.split_whitespace()
        .next()
        .is_some_and(|hosts| hosts.split(',').any(|h| h == name))
}

/// Serialises edits of known_hosts files within this process; other processes are kept out by a lock file.
static KNOWN_HOSTS_EDIT: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn edit_known_hosts<R>(
    path: &Path,
    edit: impl FnOnce(Vec<String>) -> Result<(Vec<String>, R), ComputeError>,
) -> Result<R, ComputeError> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
    let _guard = KNOWN_HOSTS_EDIT.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| ComputeError::io("create directory", dir, e))?;
        }
    }
    let lock_path = path.with_extension("lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock_path)
        .map_err(|e| ComputeError::io("open", &lock_path, e))?;
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
        .map_err(|e| ComputeError::io("lock", &lock_path, e.into()))?;
    let current = match std::fs::read_to_string(path) {
        Ok(text) => text.lines().map(str::to_string).collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(ComputeError::io("read", path, e)),
    };
    let (lines, result) = edit(current)?;
    let mut text = lines.join("\n");
    if !text.is_empty() {
        text.push('\n');
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).map_err(|e| ComputeError::io("write", &tmp, e))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| ComputeError::io("chmod", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| ComputeError::io("rename", path, e))?;
    Ok(result)
}

/// Trusts `key` for `host:port` in the `known_hosts` file at `path` (created 0600, its directory 0700). Returns
/// false when the same key was already there. A different key of the same type already recorded for that host is
/// refused with [`ComputeError::HostKeyChanged`].
pub fn add_known_host(path: &Path, host: &str, port: u16, key: &str) -> Result<bool, ComputeError> {
    let (kind, blob) = normalise_key(key)?;
    let name = known_hosts_name(host, port);
    edit_known_hosts(path, |mut lines| {
        for line in lines.iter().filter(|l| entry_matches(l, &name)) {
            let mut parts = line.split_whitespace().skip(1);
            let (k, b) = (
                parts.next().unwrap_or_default(),
                parts.next().unwrap_or_default(),
            );
            if k == kind {
                if b == blob {
                    return Ok((lines, false));
                }
                return Err(ComputeError::HostKeyChanged {
                    host: name.clone(),
                    known_hosts: path.to_path_buf(),
                });
            }
        }
        lines.push(format!("{name} {kind} {blob}"));
        Ok((lines, true))
    })
}

/// Forgets every key recorded for `host:port` (when its machine goes away). Returns how many entries went.
pub fn remove_known_host(path: &Path, host: &str, port: u16) -> Result<usize, ComputeError> {
    if !path.exists() {
        return Ok(0);
    }
    let name = known_hosts_name(host, port);
    edit_known_hosts(path, |lines| {
        let before = lines.len();
        let kept: Vec<String> = lines
            .into_iter()
            .filter(|l| !entry_matches(l, &name))
            .collect();
        let removed = before - kept.len();
        Ok((kept, removed))
    })
}

/// The keys (`type base64`) recorded for `host:port`.
pub fn known_host_keys(path: &Path, host: &str, port: u16) -> Result<Vec<String>, ComputeError> {
    let name = known_hosts_name(host, port);
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(ComputeError::io("read", path, e)),
    };
    Ok(text
        .lines()
        .filter(|l| entry_matches(l, &name))
        .map(|l| {
            l.split_whitespace()
                .skip(1)
                .take(2)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect())
}

/// Makes sure an ed25519 key pair exists at `path` (0600, `.pub` beside it), creating it with `ssh-keygen` when
/// missing, and returns the public key line (what a server or a VPS provider is given).
pub fn ensure_keypair(path: &Path, comment: &str) -> Result<String, ComputeError> {
    use std::os::unix::fs::DirBuilderExt;
    let public = path.with_extension("pub");
    if !path.exists() {
        if let Some(dir) = path.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| ComputeError::io("create directory", dir, e))?;
        }
        let out = std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
            .arg(path)
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(ComputeError::Spawn)?;
        if !out.status.success() {
            return Err(ComputeError::Io {
                op: "create key",
                path: path.to_path_buf(),
                source: io::Error::other(last_line(&String::from_utf8_lossy(&out.stderr))),
            });
        }
    }
    if !public.exists() {
        // A private key put there by hand, without its `.pub`: derive the public half from it.
        let out = std::process::Command::new("ssh-keygen")
            .arg("-y")
            .arg("-f")
            .arg(path)
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(ComputeError::Spawn)?;
        if !out.status.success() {
            return Err(ComputeError::Io {
                op: "read key",
                path: path.to_path_buf(),
                source: io::Error::other(last_line(&String::from_utf8_lossy(&out.stderr))),
            });
        }
        return Ok(String::from_utf8_lossy(&out.stdout).trim().to_string());
    }
    let line =
        std::fs::read_to_string(&public).map_err(|e| ComputeError::io("read", &public, e))?;
    Ok(line.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_A: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl";
    const KEY_B: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBp1ZgGyq2JzK7bQX6yH4mW3oJ5Y8c9dTfGk1sLrV2Nn";

    #[test]
    fn names_follow_known_hosts_rules() {
        assert_eq!(known_hosts_name("10.0.0.1", 22), "10.0.0.1");
        assert_eq!(known_hosts_name("127.0.0.1", 2222), "[127.0.0.1]:2222");
    }

    #[test]
    fn quoting_survives_quotes() {
        assert_eq!(quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn known_hosts_add_is_idempotent_refuses_a_changed_key_and_forgets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ssh/known_hosts");
        assert!(add_known_host(&path, "127.0.0.5", 22, &format!("{KEY_A} root@vm")).unwrap());
        assert!(!add_known_host(&path, "127.0.0.5", 22, KEY_A).unwrap());
        assert!(matches!(
            add_known_host(&path, "127.0.0.5", 22, KEY_B),
            Err(ComputeError::HostKeyChanged { .. })
        ));
        assert!(add_known_host(&path, "127.0.0.5", 2222, KEY_B).unwrap());
        assert_eq!(
            known_host_keys(&path, "127.0.0.5", 22).unwrap(),
            vec![KEY_A]
        );
        assert_eq!(remove_known_host(&path, "127.0.0.5", 22).unwrap(), 1);
        assert!(known_host_keys(&path, "127.0.0.5", 22).unwrap().is_empty());
        assert_eq!(
            known_host_keys(&path, "127.0.0.5", 2222).unwrap(),
            vec![KEY_B]
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(
            add_known_host(&path, "h", 22, "not a key"),
            Err(ComputeError::Config(_))
        ));
    }
}
