//! Where a child lives: a compute provider (an LNVPS VM over SSH, an SSH host, a Conway sandbox, this machine)
//! and a directory on it holding `bin/automaton` (a copy of the parent's own binary) and `home/` (the child's
//! `AUTOMATON_HOME`). Every command the parent runs there goes through the provider, with `AUTOMATON_HOME` set
//! and the parent's own `AUTOMATON__*` overrides unset.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use sha2::{Digest, Sha256};

use super::{Child, ReplicationError};
use crate::compute::lnvps::VmManager;
use crate::compute::ssh::quote;
use crate::compute::{ComputeProvider, ExecOutput, ExecRequest};
use crate::config::Config;
use crate::home::Home;
use crate::state::Db;

/// The providers a child can be spawned on.
pub const PROVIDERS: [&str; 4] = ["lnvps", "ssh", "local", "conway"];

/// Output kept from a command run at the child's site.
const OUTPUT_CAP: usize = 64 * 1024;

pub struct Site {
    pub compute: Arc<dyn ComputeProvider>,
    /// The child's directory on its machine (absolute).
    pub base: PathBuf,
}

impl Site {
    pub fn bin(&self) -> PathBuf {
        self.base.join("bin").join("automaton")
    }

    pub fn home(&self) -> PathBuf {
        self.base.join("home")
    }

    /// A shell prefix: the parent's overrides dropped, the child's home set.
    fn prelude(&self) -> String {
        format!(
            "for v in $(env | sed -n 's/^\\(AUTOMATON__[A-Za-z0-9_]*\\)=.*/\\1/p'); do unset \"$v\"; done; \
             export AUTOMATON_HOME={}; ",
            quote(&self.home().display().to_string())
        )
    }

    /// Runs a shell command at the site.
    pub async fn sh(
        &self,
        command: &str,
        timeout: Duration,
    ) -> Result<ExecOutput, ReplicationError> {
        let out = self
            .compute
            .exec(ExecRequest {
                command: format!("{}{command}", self.prelude()),
                timeout,
                output_cap: OUTPUT_CAP,
            })
            .await?;
        Ok(out)
    }

    /// Runs `automaton ARGS` as the child; fails with its stderr when it exits non-zero.
    pub async fn automaton(
        &self,
        args: &str,
        timeout: Duration,
    ) -> Result<String, ReplicationError> {
        let bin = quote(&self.bin().display().to_string());
        let out = self.sh(&format!("{bin} {args}"), timeout).await?;
        if out.exit_code == Some(0) {
            return Ok(out.stdout);
        }
        let why = if out.timed_out {
            format!("timed out after {} s", timeout.as_secs())
        } else {
            last_lines(&out.stderr, 6)
        };
        Err(ReplicationError::Failed(format!(
            "`automaton {}` on the child's machine failed: {why}",
            args.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        )))
    }

    /// Runs `automaton ARGS --json` as the child and parses its one JSON document.
    pub async fn automaton_json(
        &self,
        args: &str,
        timeout: Duration,
    ) -> Result<Value, ReplicationError> {
        let stdout = self.automaton(&format!("{args} --json"), timeout).await?;
        serde_json::from_str(stdout.trim()).map_err(|e| {
            ReplicationError::Failed(format!(
                "the child's `automaton {args} --json` is not JSON: {e}"
            ))
        })
    }

    /// Copies the running binary to `bin/automaton` unless the same one (by SHA-256) is there already, and checks
    /// the copy. Refuses a machine of another architecture or OS.
    pub async fn install(
        &self,
        progress: &(dyn Fn(&str) + Send + Sync),
    ) -> Result<String, ReplicationError> {
        let out = self
            .sh("uname -s; uname -m", Duration::from_secs(30))
            .await?;
        let mut lines = out.stdout.lines();
        let (os, arch) = (
            lines.next().unwrap_or("").trim(),
            lines.next().unwrap_or("").trim(),
        );
        if !os.eq_ignore_ascii_case(std::env::consts::OS) || arch != std::env::consts::ARCH {
            return Err(ReplicationError::Failed(format!(
                "the child's machine is {os} {arch}; this binary is for {} {}: install automaton there by hand",
                std::env::consts::OS,
                std::env::consts::ARCH
            )));
        }
        let exe = std::env::current_exe()
            .map_err(|e| ReplicationError::Failed(format!("cannot find this binary: {e}")))?;
        let bytes = tokio::fs::read(&exe)
            .await
            .map_err(|e| ReplicationError::Failed(format!("cannot read {}: {e}", exe.display())))?;
        let sum = hex::encode(Sha256::digest(&bytes));
        if self.remote_sum().await?.as_deref() == Some(sum.as_str()) {
            progress("the same binary is installed already");
            return Ok(sum);
        }
        progress(&format!(
            "copying automaton ({} MB, sha256 {}…)",
            bytes.len() / 1_000_000,
            &sum[..12]
        ));
        let bin = self.bin();
        self.compute.write_file(&bin, &bytes).await?;
        let bin_q = quote(&bin.display().to_string());
        let out = self
            .sh(&format!("chmod 755 {bin_q}"), Duration::from_secs(30))
            .await?;
        if out.exit_code != Some(0) {
            return Err(ReplicationError::Failed(format!(
                "cannot make {} executable: {}",
                bin.display(),
                last_lines(&out.stderr, 3)
            )));
        }
        match self.remote_sum().await? {
            Some(remote) if remote == sum => Ok(sum),
            other => Err(ReplicationError::Failed(format!(
                "the copied binary's checksum is {} instead of {sum}",
                other.unwrap_or_else(|| "unreadable".into())
            ))),
        }
    }

    async fn remote_sum(&self) -> Result<Option<String>, ReplicationError> {
        let bin = quote(&self.bin().display().to_string());
        let out = self
            .sh(
                &format!("[ -f {bin} ] && sha256sum {bin} | cut -d' ' -f1"),
                Duration::from_secs(60),
            )
            .await?;
        Ok(Some(out.stdout.trim().to_string()).filter(|s| s.len() == 64))
    }

    /// Starts `automaton run` so it outlives the session that started it: a systemd user unit where systemd runs
    /// and `AUTOMATON_SUPERVISOR` is unset; otherwise a supervisor loop in its own session, restarting the agent
    /// if it exits, with its pid in `run.pid`. Returns how it was started.
    pub async fn start(&self) -> Result<String, ReplicationError> {
        let script = START_SCRIPT
            .replace("@BASE@", &quote(&self.base.display().to_string()))
            .replace("@UNIT@", &unit_name(&self.base));
        let out = self.sh(&script, Duration::from_secs(60)).await?;
        match out.exit_code {
            Some(0) => Ok(out.stdout.trim().to_string()),
            _ => Err(ReplicationError::Failed(format!(
                "cannot start the child: {}",
                last_lines(&format!("{}{}", out.stdout, out.stderr), 6)
            ))),
        }
    }

    /// Stops the child's `automaton run` (and its supervisor) and waits for it to exit.
    pub async fn stop(&self) -> Result<(), ReplicationError> {
        let script = STOP_SCRIPT
            .replace("@BASE@", &quote(&self.base.display().to_string()))
            .replace("@UNIT@", &unit_name(&self.base));
        let out = self.sh(&script, Duration::from_secs(60)).await?;
        match out.exit_code {
            Some(0) => Ok(()),
            _ => Err(ReplicationError::Failed(format!(
                "cannot stop the child: {}",
                last_lines(&format!("{}{}", out.stdout, out.stderr), 6)
            ))),
        }
    }
}

/// The systemd unit of the child living in `base`.
fn unit_name(base: &Path) -> String {
    let tag: String = hex::encode(Sha256::digest(base.display().to_string().as_bytes()))
        .chars()
        .take(10)
        .collect();
    format!("automaton-{tag}.service")
}

const START_SCRIPT: &str = r#"base=@BASE@; unit=@UNIT@
bin="$base/bin/automaton"; log="$base/run.log"; pidfile="$base/run.pid"
if [ -z "$AUTOMATON_SUPERVISOR" ] && command -v systemctl >/dev/null 2>&1 && systemctl --user show-environment >/dev/null 2>&1; then
  mkdir -p "$HOME/.config/systemd/user"
  # systemd reads `%` as a specifier and splits on spaces: escape and quote the paths.
  ubase=$(printf '%s' "$base" | sed 's/%/%%/g'); ubin=$(printf '%s' "$bin" | sed 's/%/%%/g')
  cat > "$HOME/.config/systemd/user/$unit" <<UNIT
[Unit]
Description=automaton agent in $ubase
[Service]
Environment="AUTOMATON_HOME=$ubase/home"
ExecStart="$ubin" run
Restart=always
RestartSec=5
[Install]
WantedBy=default.target
UNIT
  systemctl --user daemon-reload && systemctl --user enable --now "$unit" || exit 1
  loginctl enable-linger "$(id -un)" >/dev/null 2>&1 || true
  echo "systemd user unit $unit"
  exit 0
fi
if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then echo "already running (pid $(cat "$pidfile"))"; exit 0; fi
touch "$base/supervise"
setsid sh -c 'while [ -f "$2/supervise" ]; do "$1" run >>"$2/run.log" 2>&1; [ -f "$2/supervise" ] && sleep 5; done' sh "$bin" "$base" </dev/null >/dev/null 2>&1 &
echo $! > "$pidfile"
echo "supervised process (pid $(cat "$pidfile"), pid file $pidfile)"
"#;

const STOP_SCRIPT: &str = r#"base=@BASE@; unit=@UNIT@
rm -f "$base/supervise"
if [ -f "$HOME/.config/systemd/user/$unit" ] && command -v systemctl >/dev/null 2>&1; then
  systemctl --user disable --now "$unit" >/dev/null 2>&1 || true
fi
pidfile="$base/run.pid"
if [ -f "$pidfile" ]; then
  pid=$(cat "$pidfile")
  # The supervisor leads its own process group: signal the whole group (dash's kill takes no `--`).
  kill -TERM "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null
  i=0; while kill -0 "-$pid" 2>/dev/null && [ $i -lt 100 ]; do sleep 0.2; i=$((i+1)); done
  kill -KILL "-$pid" 2>/dev/null
  rm -f "$pidfile"
fi
exit 0
"#;

/// The last `n` non-empty lines of a command's output.
fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = lines[lines.len().saturating_sub(n)..].join(" | ");
    if tail.is_empty() {
        "no output".into()
    } else {
        tail
    }
}

/// The compute provider a child of kind `provider` is reached through (without its directory yet).
pub async fn provider_for(
    home: &Home,
    config: &Config,
    db: &Db,
    child: &Child,
) -> Result<Arc<dyn ComputeProvider>, ReplicationError> {
    match child.provider.as_str() {
        "lnvps" => {
            let id = child.vm_id.ok_or_else(|| {
                ReplicationError::Failed(format!("child {} has no VM yet", child.name))
            })?;
            let manager = VmManager::for_home(home, config, db.clone())?;
            Ok(Arc::new(manager.compute(id).await?))
        }
        "local" => Ok(Arc::new(crate::compute::local::LocalCompute::new(
            local_base(home, &child.name),
            &[],
        )?)),
        "ssh" if child.target.is_some() => {
            let t: Value =
                serde_json::from_str(child.target.as_deref().unwrap_or("{}")).map_err(|e| {
                    ReplicationError::Failed(format!("child {}'s SSH target: {e}", child.name))
                })?;
            let target = crate::compute::ssh::SshTarget {
                host: t["host"].as_str().unwrap_or_default().to_string(),
                port: t["port"].as_u64().unwrap_or(22) as u16,
                user: t["user"].as_str().unwrap_or("root").to_string(),
                key_path: PathBuf::from(t["key_path"].as_str().unwrap_or_default()),
                known_hosts: home.ssh_dir().join("known_hosts"),
            };
            Ok(Arc::new(crate::compute::ssh::SshCompute::new(
                target,
                crate::compute::ssh::SshOptions::default(),
            )?))
        }
        kind @ ("ssh" | "conway") => {
            let mut config = config.clone();
            config.compute.provider = kind.to_string();
            Ok(crate::compute::provider_from_config(home, &config)?)
        }
        other => Err(ReplicationError::Refused(format!(
            "unknown provider {other:?} (one of {})",
            PROVIDERS.join(", ")
        ))),
    }
}

/// Where a `local` child lives: inside the parent's home.
pub fn local_base(home: &Home, name: &str) -> PathBuf {
    home.root().join("children").join(name)
}

/// The child's site: its provider and its directory (found once and remembered in the child's row).
pub async fn open(
    home: &Home,
    config: &Config,
    db: &Db,
    child: &Child,
) -> Result<Site, ReplicationError> {
    let compute = provider_for(home, config, db, child).await?;
    let base = match (&child.base_dir, child.provider.as_str()) {
        (Some(dir), _) => PathBuf::from(dir),
        (None, "local") => local_base(home, &child.name),
        (None, kind) => {
            let out = compute
                .exec(ExecRequest {
                    command: "printf %s \"$HOME\"".into(),
                    timeout: Duration::from_secs(30),
                    output_cap: 4096,
                })
                .await?;
            let remote_home = out.stdout.trim().to_string();
            if out.exit_code != Some(0) || !remote_home.starts_with('/') {
                return Err(ReplicationError::Failed(format!(
                    "cannot find the home directory on the child's machine: {}",
                    last_lines(&out.stderr, 3)
                )));
            }
            let dir = if kind == "lnvps" {
                // A VM of its own: one child, at a fixed place.
                format!("{remote_home}/automaton")
            } else {
                format!("{remote_home}/automaton-children/{}", child.name)
            };
            PathBuf::from(dir)
        }
    };
    if child.base_dir.is_none() {
        super::set(
            db,
            &child.name,
            "base_dir",
            base.display().to_string().into(),
        )
        .await?;
    }
    Ok(Site { compute, base })
}
