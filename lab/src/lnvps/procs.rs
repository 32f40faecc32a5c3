//! Processes the lab starts on behalf of its doubles (a VM's `sshd`, a Conway sandbox's commands): spawned in their
//! own session from one long-lived thread with `PR_SET_PDEATHSIG`, tagged with an environment marker, and killed
//! as a whole (marker, process group and parent chain) when their VM or sandbox stops, when the lab shuts down, or
//! — through a small reaper process — when the lab process dies, even by SIGKILL.

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Mutex, OnceLock};
use std::time::Duration;

/// Every process started for a VM or sandbox carries `AUTOMATON_LAB_OWNER=<token>/<scope>`: sshd sets it on its
/// sessions (`SetEnv`) and children inherit it, so a process that detached itself (`setsid`, double fork) is still
/// found. The token is per lab process, so two labs on one machine never kill each other's processes.
pub const OWNER_VAR: &str = "AUTOMATON_LAB_OWNER";

/// This process's token (random, hex).
pub fn owner_token() -> &'static str {
    static TOKEN: OnceLock<String> = OnceLock::new();
    TOKEN.get_or_init(|| {
        use rand::RngCore;
        let mut bytes = [0u8; 12];
        rand::thread_rng().fill_bytes(&mut bytes);
        hex::encode(bytes)
    })
}

/// The marker value of one scope (`vm-3`, `sandbox-…`).
pub fn marker(scope: &str) -> String {
    format!("{}/{scope}", owner_token())
}

/// A tag for the command line of a process whose environment cannot be read back: sshd rewrites its process title
/// over the memory `/proc/PID/environ` shows, so its marker is lost there, but its title keeps its arguments. A
/// scope's sshd gets its config file named with this tag.
pub fn cmdline_tag(scope: &str) -> String {
    format!("lab-{}-{scope}.", owner_token())
}

type SpawnReply = mpsc::Sender<io::Result<Child>>;

/// `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits, not the process. Tokio's blocking
/// threads come and go, so every supervised child is forked from this one thread, which lives as long as the
/// process.
fn spawner() -> &'static Mutex<mpsc::Sender<(Command, SpawnReply)>> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<(Command, SpawnReply)>>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<(Command, SpawnReply)>();
        let spawned = std::thread::Builder::new()
            .name("lab-spawner".into())
            .spawn(move || {
                for (mut command, reply) in rx {
                    let _ = reply.send(command.spawn());
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "could not start the lab's spawner thread");
        }
        Mutex::new(tx)
    })
}

/// How a supervised process dies with the lab.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeathWatch {
    /// The kernel kills it at once (`PR_SET_PDEATHSIG`). Its own children are orphaned and found by their marker.
    Kernel,
    /// The reaper kills it *and its descendants* (found through their parent chain while it still lives). For
    /// processes whose children carry no readable marker (sshd). Falls back to `Kernel` without a reaper.
    Reaper,
}

/// Spawns `command` in a new session (its own process group), to die with the lab as `watch` says. Starts the
/// reaper on first use. Blocking, but only for the fork.
pub fn spawn_supervised(mut command: Command, watch: DeathWatch) -> io::Result<Child> {
    let death_signal = !ensure_reaper() || watch == DeathWatch::Kernel;
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: only async-signal-safe calls (setsid, prctl, getppid) between fork and exec.
    unsafe {
        command.pre_exec(move || {
            if libc::setsid() == -1 {
                return Err(io::Error::last_os_error());
            }
            if death_signal {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                    return Err(io::Error::last_os_error());
                }
                // The lab died between fork and prctl: the signal will never come, so do not start.
                if libc::getppid() != parent {
                    return Err(io::Error::other("the lab process exited"));
                }
            }
            Ok(())
        });
    }
    let (tx, rx) = mpsc::channel();
    spawner()
        .lock()
        .map_err(|_| io::Error::other("the lab's spawner lock is poisoned"))?
        .send((command, tx))
        .map_err(|_| io::Error::other("the lab's spawner thread is gone"))?;
    rx.recv()
        .map_err(|_| io::Error::other("the lab's spawner thread is gone"))?
}

/// The reaper: `sh` blocked on reading a pipe only this process holds. When the lab process is gone (however it
/// died) the read returns, and it kills every process carrying this lab's marker or command-line tag, with all
/// their descendants, until none is left. It ignores INT/TERM/HUP so a Ctrl-C on the terminal does not take it
/// down before it has done its job. The token comes in the environment, never literally on a command line, so
/// the reaper and its helpers never match themselves.
const REAPER_SCRIPT: &str = r#"trap '' INT TERM HUP PIPE
read -r _ || true
t="$LAB_REAPER_TOKEN"
[ -n "$t" ] || exit 0
round=0
while [ "$round" -lt 50 ]; do
  all=""
  table=""
  for d in /proc/[0-9]*; do
    p=${d#/proc/}
    [ "$p" = "$$" ] && continue
    read -r s < "$d/stat" 2>/dev/null || continue
    s=${s##*) }
    case "$s" in Z*|X*) continue ;; esac
    pp=${s#* }
    pp=${pp%% *}
    table="$table $p:$pp"
    # Bracketed patterns, so no grep ever matches its own command line.
    if grep -q -a "AUTOMATON_LAB_OWNER=$t[/]" "$d/environ" 2>/dev/null \
      || grep -q -a "lab-$t[-]" "$d/cmdline" 2>/dev/null; then
      all="$all $p"
    fi
  done
  [ -n "$all" ] || break
  changed=1
  while [ "$changed" -eq 1 ]; do
    changed=0
    for entry in $table; do
      p=${entry%%:*}
      pp=${entry##*:}
      case " $all " in *" $p "*) continue ;; esac
      case " $all " in *" $pp "*) all="$all $p" ; changed=1 ;; esac
    done
  done
  kill -9 $all 2>/dev/null
  round=$((round + 1))
  sleep 0.1
done
"#;

/// Starts the reaper once per process; true when it runs. Failing to start it is logged, not fatal: shutdown
/// still kills everything, and supervised processes fall back to the kernel's death signal.
pub fn ensure_reaper() -> bool {
    static REAPER: OnceLock<Option<std::process::ChildStdin>> = OnceLock::new();
    REAPER
        .get_or_init(|| {
            let mut command = Command::new("/bin/sh");
            command
                .arg("-c")
                .arg(REAPER_SCRIPT)
                .arg("automaton-lab-reaper")
                .env_remove(OWNER_VAR)
                .env("LAB_REAPER_TOKEN", owner_token())
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            // Its own session, so signals for the lab's terminal group do not reach it; no death signal, since
            // it must outlive the lab.
            // SAFETY: setsid is async-signal-safe.
            unsafe {
                command.pre_exec(|| {
                    libc::setsid();
                    Ok(())
                });
            }
            match command.spawn() {
                // The write end stays open in this static until the process exits; the child handle is dropped
                // (the reaper is reparented when the lab exits).
                Ok(mut child) => {
                    // On a normal exit (a test binary ending with its shared world never dropped) clean up at
                    // once, rather than leave it to the reaper's slower shell scan.
                    extern "C" fn kill_at_exit() {
                        kill_all_scopes();
                    }
                    // SAFETY: registering a plain `extern "C" fn()` with atexit.
                    unsafe {
                        libc::atexit(kill_at_exit);
                    }
                    child.stdin.take()
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not start the lab's process reaper");
                    None
                }
            }
        })
        .is_some()
}

/// One process as `/proc` shows it.
struct ProcInfo {
    ppid: i32,
    pgrp: i32,
    /// A zombie: dead, only waiting to be reaped.
    zombie: bool,
}

fn read_stat(pid: i32) -> Option<ProcInfo> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ppid pgrp …`; comm may hold spaces and parentheses, so split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let zombie = matches!(fields.next()?, "Z" | "X");
    let ppid = fields.next()?.parse().ok()?;
    let pgrp = fields.next()?.parse().ok()?;
    Some(ProcInfo { ppid, pgrp, zombie })
}

fn environ_has(pid: i32, matches: &dyn Fn(&[u8]) -> bool) -> bool {
    std::fs::read(format!("/proc/{pid}/environ"))
        .map(|env| env.split(|b| *b == 0).any(matches))
        .unwrap_or(false)
}

fn cmdline_contains(pid: i32, needle: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| {
            let c = String::from_utf8_lossy(&c).replace('\0', " ");
            c.contains(needle)
        })
        .unwrap_or(false)
}

fn all_pids() -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .collect()
}

/// Live processes that are `root`-like (by `is_root`) or in `root_group`'s process group, plus all their
/// descendants. Never this process.
fn collect(is_root: &dyn Fn(i32) -> bool, root_group: Option<i32>) -> BTreeSet<i32> {
    let me = std::process::id() as i32;
    let stats: HashMap<i32, ProcInfo> = all_pids()
        .into_iter()
        .filter(|p| *p > 1 && *p != me)
        .filter_map(|p| read_stat(p).map(|s| (p, s)))
        .filter(|(_, s)| !s.zombie)
        .collect();
    let mut found: BTreeSet<i32> = stats
        .iter()
        .filter(|(p, s)| root_group.is_some_and(|g| s.pgrp == g || **p == g) || is_root(**p))
        .map(|(p, _)| *p)
        .collect();
    loop {
        let more: Vec<i32> = stats
            .iter()
            .filter(|(p, s)| !found.contains(p) && found.contains(&s.ppid))
            .map(|(p, _)| *p)
            .collect();
        if more.is_empty() {
            return found;
        }
        found.extend(more);
    }
}

/// Every live process of `scope`: carrying its marker or command-line tag, in `root`'s process group, or
/// descending from any of those.
pub fn scope_pids(scope: &str, root: Option<u32>) -> BTreeSet<i32> {
    let wanted = format!("{OWNER_VAR}={}", marker(scope)).into_bytes();
    let tag = cmdline_tag(scope);
    let me = std::process::id() as i32;
    let root = root.map(|r| r as i32).filter(|r| *r > 1 && *r != me);
    collect(
        &|p| environ_has(p, &|kv| kv == wanted.as_slice()) || cmdline_contains(p, &tag),
        root,
    )
}

fn kill_until_gone(what: &str, find: &dyn Fn() -> BTreeSet<i32>) {
    for _ in 0..100 {
        let pids = find();
        if pids.is_empty() {
            return;
        }
        for pid in &pids {
            // SAFETY: kill(2) on a process carrying our marker or tag, or descending from one.
            unsafe {
                libc::kill(*pid, libc::SIGKILL);
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    tracing::warn!(what, "lab processes survived 100 kill rounds");
}

/// SIGKILLs every process of `scope` (see [`scope_pids`]) until none is left; processes forking while they are
/// killed are caught by the next round. Blocking: call from a blocking context.
pub fn kill_scope(scope: &str, root: Option<u32>) {
    kill_until_gone(scope, &|| scope_pids(scope, root));
}

/// Kills every process any double of this lab process started (all scopes), with their descendants.
pub fn kill_all_scopes() {
    let prefix = format!("{OWNER_VAR}={}/", owner_token()).into_bytes();
    let tag = format!("lab-{}-", owner_token());
    kill_until_gone("all scopes", &|| {
        collect(
            &|p| environ_has(p, &|kv| kv.starts_with(&prefix)) || cmdline_contains(p, &tag),
            None,
        )
    });
}

/// Finds an executable: an absolute `override_var` value, else the first of `candidates` that exists, else `name`
/// on `PATH`.
pub fn find_program(name: &str, override_var: &str, candidates: &[&str]) -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(override_var).map(PathBuf::from) {
        return path.is_absolute().then_some(path);
    }
    for c in candidates {
        if Path::new(c).is_file() {
            return Some(PathBuf::from(c));
        }
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// The Unix user the lab runs as (what `whoami` prints).
pub fn current_user() -> String {
    // SAFETY: getpwuid returns a pointer into static storage or null; the name is copied out at once.
    unsafe {
        let pw = libc::getpwuid(libc::geteuid());
        if !pw.is_null() && !(*pw).pw_name.is_null() {
            if let Ok(name) = std::ffi::CStr::from_ptr((*pw).pw_name).to_str() {
                return name.to_string();
            }
        }
    }
    std::env::var("USER").unwrap_or_else(|_| "root".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kills_a_scope_including_detached_descendants() {
        let scope = format!("test-{}", std::process::id());
        let mut command = Command::new("/bin/sh");
        // A child that detaches into its own session keeps the marker but leaves the process group.
        command
            .arg("-c")
            .arg("setsid sleep 300 & sleep 300")
            .env(OWNER_VAR, marker(&scope))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut child = spawn_supervised(command, DeathWatch::Kernel).expect("spawn");
        let root = child.id();
        let started = std::time::Instant::now();
        // sh (or the sleep it execs into) and the detached sleep.
        while scope_pids(&scope, Some(root)).len() < 2 {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "children never started"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        kill_scope(&scope, Some(root));
        let _ = child.wait();
        assert!(scope_pids(&scope, Some(root)).is_empty());
        assert!(scope_pids(&scope, None).is_empty());
    }

    /// The reaper script, run for a made-up token: closing its pipe kills marked processes (detached ones too),
    /// tagged ones and their unmarked descendants, and nothing else.
    #[test]
    fn the_reaper_kills_marked_and_tagged_processes_and_their_descendants() {
        let token = format!("test{}", std::process::id());
        let spawn = |cmd: &mut Command| {
            cmd.stdout(Stdio::null())
                .stderr(Stdio::null())
                .stdin(Stdio::null());
            // SAFETY: setsid is async-signal-safe.
            unsafe {
                cmd.pre_exec(|| {
                    libc::setsid();
                    Ok(())
                });
            }
            cmd.spawn().expect("spawn")
        };
        let mut marked = spawn(
            Command::new("/bin/sh")
                .arg("-c")
                .arg("setsid sleep 300 & sleep 300")
                .env(OWNER_VAR, format!("{token}/vm-1")),
        );
        // Tagged by its command line, with a child that clears its environment.
        let mut tagged = spawn(
            Command::new("/bin/sh")
                .arg("-c")
                .arg("env -i sleep 300 & sleep 300")
                .arg(format!("lab-{token}-vm-2.sshd_config"))
                .env_remove(OWNER_VAR),
        );
        let mut bystander = spawn(Command::new("sleep").arg("300").env_remove(OWNER_VAR));
        let roots = [marked.id() as i32, tagged.id() as i32];
        let family = || collect(&|p| roots.contains(&p), None);
        let started = std::time::Instant::now();
        while family().len() < 4 {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "children never started"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let members = family();

        let mut reaper = Command::new("/bin/sh")
            .arg("-c")
            .arg(REAPER_SCRIPT)
            .env("LAB_REAPER_TOKEN", &token)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("reaper");
        drop(reaper.stdin.take());
        assert!(reaper.wait().expect("reaper exits").success());
        let _ = marked.wait();
        let _ = tagged.wait();
        let alive = |p: i32| read_stat(p).is_some_and(|s| !s.zombie);
        for p in members {
            assert!(!alive(p), "process {p} survived the reaper");
        }
        assert!(
            matches!(bystander.try_wait(), Ok(None)),
            "an unrelated process was killed"
        );
        let _ = bystander.kill();
        let _ = bystander.wait();
    }

    #[test]
    fn stat_parsing_survives_odd_command_names() {
        let me = std::process::id() as i32;
        let info = read_stat(me).expect("own stat");
        assert!(info.ppid > 0);
        assert!(info.pgrp > 0);
    }
}
