//! Protected paths: resolving a path the way the kernel would (every symlink, `..` after symlinks, dangling links)
//! and refusing it when it lands on the wallet, the state DB, the constitution, the config or key files.
//!
//! Both sides are resolved at check time: the wallet may not exist yet, the home may sit behind a symlink, and a
//! protected file may be reached through a hard link, which is caught by comparing device and inode.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

/// Symlink hops before giving up, as Linux's `MAXSYMLINKS`.
const MAX_SYMLINK_HOPS: u32 = 40;

/// Why a path may not be touched.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PathRefusal {
    #[error("{requested} is protected ({protected}); the agent's tools may not read or write it")]
    Protected {
        requested: PathBuf,
        protected: PathBuf,
    },
    #[error("cannot resolve {requested}: {reason}")]
    Unresolvable { requested: PathBuf, reason: String },
}

/// The set of paths the agent's file tools refuse.
#[derive(Clone, Debug, Default)]
pub struct ProtectedPaths {
    paths: Vec<PathBuf>,
}

impl ProtectedPaths {
    pub fn new(paths: Vec<PathBuf>) -> ProtectedPaths {
        ProtectedPaths { paths }
    }

    pub fn paths(&self) -> &[PathBuf] {
        &self.paths
    }

    /// Resolves an absolute `path` and returns the resolved path when it is not protected. Callers act on the
    /// returned path, never on the original, so a symlink cannot be swapped in between check and use without
    /// the write's `O_NOFOLLOW` noticing.
    pub fn check(&self, path: &Path) -> Result<PathBuf, PathRefusal> {
        let resolved = resolve(path).map_err(|e| PathRefusal::Unresolvable {
            requested: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let target_identity = std::fs::metadata(&resolved)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        for protected in &self.paths {
            let protected_resolved = resolve(protected).unwrap_or_else(|_| lexical(protected));
            let hit = resolved == protected_resolved
                || resolved.starts_with(&protected_resolved)
                || resolved == lexical(protected)
                || resolved.starts_with(lexical(protected))
                || match (target_identity, std::fs::metadata(&protected_resolved)) {
                    (Some(id), Ok(meta)) => meta.is_file() && id == (meta.dev(), meta.ino()),
                    _ => false,
                };
            if hit {
                return Err(PathRefusal::Protected {
                    requested: path.to_path_buf(),
                    protected: protected.clone(),
                });
            }
        }
        Ok(resolved)
    }

    /// Whether a command line names a protected file directly. A tripwire against the obvious, not a sandbox:
    /// `exec` runs a shell and can always be more clever than a string match.
    pub fn mentioned_in(&self, command: &str) -> Option<&Path> {
        self.paths.iter().map(PathBuf::as_path).find(|p| {
            let full = p.to_string_lossy();
            if command.contains(full.as_ref()) {
                return true;
            }
            // Bare names that only mean one thing (`wallet.json`, `state.db`); generic ones like `node` are not
            // matched, or every mention of the word would be refused.
            match p.file_name().map(|n| n.to_string_lossy().into_owned()) {
                Some(name) if name.contains('.') && name.len() > 4 => command.contains(&name),
                _ => false,
            }
        })
    }
}

/// Lexical normalisation of an absolute path (`.` dropped, `..` pops), for paths that cannot be resolved.
pub fn lexical(path: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::RootDir | Component::Prefix(_) => out = PathBuf::from("/"),
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
        }
    }
    out
}

/// Resolves an absolute path like `realpath(3)`, except that missing components are allowed (the rest of the
/// path is then taken lexically) and dangling symlinks are followed to where they point, so writing through a
/// link to a not-yet-existing wallet is caught.
pub fn resolve(path: &Path) -> std::io::Result<PathBuf> {
    if !path.is_absolute() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "path must be absolute",
        ));
    }
    let mut pending: VecDeque<OsString> = components(path);
    let mut out = PathBuf::from("/");
    let mut hops = 0u32;
    // Once a component is missing, nothing below it can be a symlink.
    let mut missing = false;
    while let Some(part) = pending.pop_front() {
        if part == "/" {
            out = PathBuf::from("/");
            continue;
        }
        if part == "." {
            continue;
        }
        if part == ".." {
            out.pop();
            continue;
        }
        let candidate = out.join(&part);
        if missing {
            out = candidate;
            continue;
        }
        match std::fs::symlink_metadata(&candidate) {
            Ok(meta) if meta.file_type().is_symlink() => {
                hops += 1;
                if hops > MAX_SYMLINK_HOPS {
                    return Err(std::io::Error::from_raw_os_error(libc::ELOOP));
                }
                let target = std::fs::read_link(&candidate)?;
                let mut front = components(&target);
                if !target.is_absolute() {
                    // Relative to the directory holding the link, which is `out`.
                    front.retain(|c| c != "/");
                }
                while let Some(c) = front.pop_back() {
                    pending.push_front(c);
                }
            }
            Ok(_) => out = candidate,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                missing = true;
                out = candidate;
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {
                missing = true;
                out = candidate;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

fn components(path: &Path) -> VecDeque<OsString> {
    path.components()
        .map(|c| match c {
            Component::RootDir | Component::Prefix(_) => OsString::from("/"),
            Component::CurDir => OsString::from("."),
            Component::ParentDir => OsString::from(".."),
            Component::Normal(n) => n.to_os_string(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    struct Fixture {
        _dir: tempfile::TempDir,
        home: PathBuf,
        work: PathBuf,
        guard: ProtectedPaths,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().expect("tmp");
        let home = dir.path().join("home");
        let work = home.join("workspace");
        std::fs::create_dir_all(&work).expect("mkdir");
        std::fs::create_dir_all(home.join("genesis")).expect("mkdir");
        std::fs::write(home.join("state.db"), "db").expect("write");
        std::fs::write(home.join("genesis/constitution.md"), "laws").expect("write");
        let guard = ProtectedPaths::new(vec![
            home.join("wallet.json"), // does not exist yet
            home.join("state.db"),
            home.join("genesis/constitution.md"),
            home.join("node"),
        ]);
        Fixture {
            _dir: dir,
            home,
            work,
            guard,
        }
    }

    #[test]
    fn plain_and_dotdot_paths() {
        let f = fixture();
        assert!(f.guard.check(&f.home.join("state.db")).is_err());
        assert!(f.guard.check(&f.work.join("../state.db")).is_err());
        assert!(f
            .guard
            .check(&f.work.join("./x/../../genesis/./constitution.md"))
            .is_err());
        assert!(f.guard.check(&f.home.join("wallet.json")).is_err());
        assert!(f.guard.check(&f.home.join("node/keys_seed")).is_err());
        assert!(f.guard.check(&f.work.join("notes.md")).is_ok());
        assert!(f.guard.check(&f.home.join("genesis/prompt.md")).is_ok());
    }

    #[test]
    fn symlink_tricks() {
        let f = fixture();
        // A link to the home, then into it.
        symlink(&f.home, f.work.join("up")).expect("symlink");
        assert!(f.guard.check(&f.work.join("up/state.db")).is_err());
        // A dangling link to the wallet that does not exist yet: writing through it would create the wallet.
        symlink(f.home.join("wallet.json"), f.work.join("w")).expect("symlink");
        assert!(f.guard.check(&f.work.join("w")).is_err());
        // A relative link followed by `..`: resolved against the link's target, like the kernel does.
        std::fs::create_dir_all(f.home.join("a/b")).expect("mkdir");
        symlink("../../genesis", f.home.join("a/b/g")).expect("symlink");
        assert!(f
            .guard
            .check(&f.work.join("../a/b/g/constitution.md"))
            .is_err());
        symlink(f.home.join("genesis"), f.work.join("gen")).expect("symlink");
        assert!(f.guard.check(&f.work.join("gen/../state.db")).is_err());
        // A chain of links.
        symlink(f.work.join("w"), f.work.join("w2")).expect("symlink");
        assert!(f.guard.check(&f.work.join("w2")).is_err());
        // A loop is refused, not followed forever.
        symlink(f.work.join("loop"), f.work.join("loop")).expect("symlink");
        assert!(matches!(
            f.guard.check(&f.work.join("loop")),
            Err(PathRefusal::Unresolvable { .. })
        ));
    }

    #[test]
    fn hard_links_are_caught() {
        let f = fixture();
        std::fs::hard_link(f.home.join("state.db"), f.work.join("copy.db")).expect("link");
        assert!(f.guard.check(&f.work.join("copy.db")).is_err());
    }

    #[test]
    fn the_home_behind_a_symlink_is_still_protected() {
        let f = fixture();
        let alias = f._dir.path().join("alias");
        symlink(&f.home, &alias).expect("symlink");
        let guard = ProtectedPaths::new(vec![alias.join("state.db")]);
        assert!(guard.check(&f.home.join("state.db")).is_err());
        let guard = ProtectedPaths::new(vec![f.home.join("state.db")]);
        assert!(guard.check(&alias.join("state.db")).is_err());
    }

    #[test]
    fn commands_naming_protected_files() {
        let f = fixture();
        assert!(f.guard.mentioned_in("cat ../wallet.json").is_some());
        assert!(f
            .guard
            .mentioned_in(&format!("rm {}", f.home.join("state.db").display()))
            .is_some());
        assert!(f.guard.mentioned_in("ls node_modules").is_none());
        assert!(f.guard.mentioned_in("echo hi").is_none());
    }
}
