//! One Conway sandbox on this machine: a directory (its home and working directory), commands run in their own
//! process group with a timeout, files confined to the directory, and exposed ports as local TCP proxies.

use std::io::Read;
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::lnvps::procs;

/// Each of stdout and stderr keeps at most this much of a command's output.
pub const MAX_OUTPUT: usize = 4 * 1024 * 1024;
/// Exit code reported for a command killed at its timeout (as `timeout(1)` does).
pub const TIMEOUT_EXIT: i32 = 124;

/// What a command did.
#[derive(Debug, Clone)]
pub struct ExecOutcome {
    pub stdout: String,
    pub stderr: String,
    pub exit_code: i32,
    pub timed_out: bool,
}

/// The marker scope of a sandbox's processes.
pub fn scope(id: &str) -> String {
    format!("sandbox-{id}")
}

fn shell() -> &'static str {
    if Path::new("/bin/bash").exists() {
        "/bin/bash"
    } else {
        "/bin/sh"
    }
}

/// Runs `command` with `bash -c` in `dir` (also `HOME`), in its own process group, for at most `timeout`; on
/// timeout the whole group is killed and the output so far returned. Blocking.
pub fn exec(
    id: &str,
    dir: &Path,
    command: &str,
    timeout: Duration,
) -> std::io::Result<ExecOutcome> {
    let mut cmd = Command::new(shell());
    cmd.arg("-c")
        .arg(command)
        .current_dir(dir)
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("HOME", dir)
        .env("LANG", "C.UTF-8")
        .env("CONWAY_SANDBOX_ID", id)
        // Nothing run in a lab sandbox installs a real system service on the lab host.
        .env("AUTOMATON_SUPERVISOR", "pidfile")
        .env(procs::OWNER_VAR, procs::marker(&scope(id)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = procs::spawn_supervised(cmd, procs::DeathWatch::Kernel)?;
    let pgid = child.id() as i32;
    let collect = |pipe: Option<Box<dyn Read + Send>>| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let out = Arc::clone(&buf);
        let handle = pipe.map(|mut pipe| {
            std::thread::spawn(move || {
                let mut chunk = [0u8; 8192];
                loop {
                    match pipe.read(&mut chunk) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if let Ok(mut b) = out.lock() {
                                let room = MAX_OUTPUT.saturating_sub(b.len());
                                b.extend_from_slice(&chunk[..n.min(room)]);
                            }
                        }
                    }
                }
            })
        });
        (buf, handle)
    };
    let (stdout, out_thread) = collect(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let (stderr, err_thread) = collect(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let started = Instant::now();
    let mut timed_out = false;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed() >= timeout {
            timed_out = true;
            // SAFETY: kill(2) on the command's own process group (it was started with setsid).
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
            break child.wait()?;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    // Background children may keep the pipes open: wait a moment for the rest of the output, not for them.
    let deadline = Instant::now() + Duration::from_millis(200);
    for t in [out_thread, err_thread].into_iter().flatten() {
        while !t.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let text = |b: &Arc<Mutex<Vec<u8>>>| {
        b.lock()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    };
    let exit_code = if timed_out {
        TIMEOUT_EXIT
    } else {
        use std::os::unix::process::ExitStatusExt;
        status
            .code()
            .or_else(|| status.signal().map(|s| 128 + s))
            .unwrap_or(-1)
    };
    Ok(ExecOutcome {
        stdout: text(&stdout),
        stderr: text(&stderr),
        exit_code,
        timed_out,
    })
}

/// Resolves a path given to the file routes: relative to the sandbox directory, or absolute inside it. `..` may
/// not climb out. `None` when the path leaves the sandbox (the lab has no filesystem of its own to offer).
pub fn resolve(dir: &Path, path: &str) -> Option<PathBuf> {
    let given = Path::new(path);
    let joined = if given.is_absolute() {
        given.to_path_buf()
    } else {
        dir.join(given)
    };
    let mut normal = PathBuf::new();
    for c in joined.components() {
        match c {
            Component::ParentDir => {
                if !normal.pop() {
                    return None;
                }
            }
            Component::CurDir => {}
            other => normal.push(other.as_os_str()),
        }
    }
    (normal.starts_with(dir) && normal != dir).then_some(normal)
}

/// A port exposed as a local TCP proxy `127.0.0.1:PROXY → 127.0.0.1:port`.
pub struct Exposed {
    pub public_url: String,
    cancel: CancellationToken,
}

impl Exposed {
    /// Starts the proxy.
    pub async fn start(port: u16) -> std::io::Result<Exposed> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let public_url = format!("http://{}", listener.local_addr()?);
        let cancel = CancellationToken::new();
        let stop = cancel.clone();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = stop.cancelled() => break,
                    a = listener.accept() => a,
                };
                let Ok((mut inbound, _)) = accepted else {
                    continue;
                };
                let stop = stop.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", port)).await else {
                        return;
                    };
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    }
                });
            }
        });
        Ok(Exposed { public_url, cancel })
    }
}

impl Drop for Exposed {
    /// Closing the listener and every open connection: the URL stops answering.
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_stay_inside_the_sandbox() {
        let dir = Path::new("/lab/conway/sandboxes/s1");
        assert_eq!(resolve(dir, "a/b.txt"), Some(dir.join("a/b.txt")));
        assert_eq!(resolve(dir, "./a/../b.txt"), Some(dir.join("b.txt")));
        assert_eq!(
            resolve(dir, "/lab/conway/sandboxes/s1/x"),
            Some(dir.join("x"))
        );
        assert_eq!(resolve(dir, "../s2/x"), None);
        assert_eq!(resolve(dir, "/etc/passwd"), None);
        assert_eq!(resolve(dir, "/lab/conway/sandboxes/s1/../s2/x"), None);
        assert_eq!(resolve(dir, "."), None);
    }

    #[test]
    fn exec_reports_exit_codes_output_and_timeouts() {
        let dir = tempfile::tempdir().unwrap();
        let out = exec(
            "t1",
            dir.path(),
            "echo out; echo err >&2; pwd; exit 3",
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(out.exit_code, 3);
        assert_eq!(out.stdout, format!("out\n{}\n", dir.path().display()));
        assert_eq!(out.stderr, "err\n");
        let started = Instant::now();
        let out = exec(
            "t1",
            dir.path(),
            "echo before; sleep 30; echo after",
            Duration::from_secs(2),
        )
        .unwrap();
        assert!(out.timed_out);
        assert_eq!(out.exit_code, TIMEOUT_EXIT);
        assert_eq!(out.stdout, "before\n");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
