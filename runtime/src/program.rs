//! The container's program, found in its root before the OCI runtime is asked to start it.
//!
//! runc reports a missing or non-executable program as its own failure (exit 1, a
//! `time=… level=error msg=…` line), which a user cannot tell from the program failing. podman
//! answers 127 (not found) and 126 (cannot be executed) with one clear line, and so does
//! `lazypull run`: the program is looked up here, in the container's root and its `$PATH`, with
//! symbolic links resolved inside that root as the container would see them. Only metadata is
//! read, which a lazily mounted root answers from its TOC.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

/// Most symbolic links followed while resolving one path (as Linux's `MAXSYMLINKS`).
const MAX_LINKS: usize = 40;

/// Why the program cannot be started; the exit code is podman's for the same case.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProgramError {
    /// Nothing of that name exists (in any `$PATH` directory, for a bare name).
    #[error("executable file `{program}` not found {place}")]
    NotFound {
        /// The program as given.
        program: String,
        /// Where it was looked for.
        place: String,
    },
    /// It exists but is a directory or has no execute permission.
    #[error("`{program}` cannot be executed: {why}")]
    NotExecutable {
        /// The program as given.
        program: String,
        /// Why not.
        why: &'static str,
    },
}

impl ProgramError {
    /// The exit code podman gives for this failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            ProgramError::NotFound { .. } => 127,
            ProgramError::NotExecutable { .. } => 126,
        }
    }
}

/// Checks that `program` (the first argument of the container's process) can be executed in
/// the container whose root is `rootfs`, with `cwd` its working directory and `path` the
/// `$PATH` of its environment. Lookup problems other than "not there" (an unreadable
/// directory, say) are left for the runtime to report.
pub fn check(
    rootfs: &Path,
    program: &str,
    cwd: &str,
    path: Option<&str>,
) -> Result<(), ProgramError> {
    let candidates: Vec<PathBuf> = if program.contains('/') {
        vec![Path::new(cwd).join(program)]
    } else {
        path.unwrap_or("")
            .split(':')
            .filter(|d| !d.is_empty())
            .map(|d| Path::new(d).join(program))
            .collect()
    };
    let mut not_executable = None;
    for candidate in &candidates {
        let Some(host) = resolve(rootfs, candidate) else {
            continue;
        };
        match std::fs::metadata(&host) {
            Ok(m) if m.is_dir() => not_executable = Some("it is a directory"),
            Ok(m) if m.permissions().mode() & 0o111 == 0 => {
                not_executable = Some("permission denied (no execute permission)")
            }
            Ok(_) => return Ok(()),
            Err(_) => {}
        }
        // A bare name goes on to the next `$PATH` entry, as execvp does.
    }
    if let Some(why) = not_executable {
        return Err(ProgramError::NotExecutable {
            program: program.to_string(),
            why,
        });
    }
    let place = if program.contains('/') {
        "in the container".to_string()
    } else {
        format!("in the container's $PATH ({})", path.unwrap_or(""))
    };
    Err(ProgramError::NotFound {
        program: program.to_string(),
        place,
    })
}

/// The host path of `path` (absolute inside the container) in the root `rootfs`, following
/// symbolic links as the container would: an absolute target starts again at the root, and
/// `..` never leaves it. `None` when a component does not exist or links loop.
fn resolve(rootfs: &Path, path: &Path) -> Option<PathBuf> {
    let mut pending: Vec<Vec<u8>> = components(path);
    pending.reverse();
    let mut inside: Vec<Vec<u8>> = Vec::new();
    let mut links = 0;
    while let Some(name) = pending.pop() {
        match name.as_slice() {
            b"." => continue,
            b".." => {
                inside.pop();
                continue;
            }
            _ => {}
        }
        let mut host = rootfs.to_path_buf();
        host.extend(inside.iter().map(|c| OsStr::from_bytes(c)));
        host.push(OsStr::from_bytes(&name));
        let meta = std::fs::symlink_metadata(&host).ok()?;
        if meta.file_type().is_symlink() {
            links += 1;
            if links > MAX_LINKS {
                return None;
            }
            let target = std::fs::read_link(&host).ok()?;
            if target.is_absolute() {
                inside.clear();
            }
            let mut more = components(&target);
            more.reverse();
            pending.extend(more);
        } else {
            inside.push(name);
        }
    }
    let mut host = rootfs.to_path_buf();
    host.extend(inside.iter().map(|c| OsStr::from_bytes(c)));
    Some(host)
}

/// The named components of a path (`.` and `..` kept, the root dropped).
fn components(path: &Path) -> Vec<Vec<u8>> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.as_bytes().to_vec()),
            Component::ParentDir => Some(b"..".to_vec()),
            Component::CurDir => Some(b".".to_vec()),
            Component::RootDir | Component::Prefix(_) => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn root() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        std::fs::create_dir_all(r.join("usr/bin")).unwrap();
        std::fs::create_dir_all(r.join("srv")).unwrap();
        std::fs::write(r.join("usr/bin/tool"), b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(
            r.join("usr/bin/tool"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        std::fs::write(r.join("srv/data"), b"x").unwrap();
        std::fs::set_permissions(r.join("srv/data"), std::fs::Permissions::from_mode(0o644))
            .unwrap();
        symlink("usr/bin", r.join("bin")).unwrap();
        // An absolute link must resolve inside the root, not on the host.
        symlink("/usr/bin/tool", r.join("srv/abs-link")).unwrap();
        symlink("/etc/passwd", r.join("srv/host-file")).unwrap();
        symlink("loop", r.join("srv/loop")).unwrap();
        dir
    }

    #[test]
    fn finds_programs_by_path_and_by_name() {
        let r = root();
        let p = Some("/usr/local/bin:/bin");
        assert_eq!(check(r.path(), "tool", "/", p), Ok(()));
        assert_eq!(check(r.path(), "/bin/tool", "/", p), Ok(()));
        assert_eq!(check(r.path(), "/srv/abs-link", "/", p), Ok(()));
        assert_eq!(check(r.path(), "../usr/bin/tool", "/srv", p), Ok(()));
        assert_eq!(check(r.path(), "/../../usr/bin/tool", "/", p), Ok(()));
    }

    #[test]
    fn missing_and_unexecutable_programs_get_podmans_codes() {
        let r = root();
        let p = Some("/usr/local/bin:/bin");
        let e = check(r.path(), "nosuch", "/", p).unwrap_err();
        assert_eq!(e.exit_code(), 127);
        assert!(e.to_string().contains("$PATH (/usr/local/bin:/bin)"), "{e}");
        assert_eq!(
            check(r.path(), "tool", "/", Some("/srv"))
                .unwrap_err()
                .exit_code(),
            127
        );
        assert_eq!(
            check(r.path(), "tool", "/", None).unwrap_err().exit_code(),
            127
        );
        // /etc/passwd exists on the host but not in this root.
        assert_eq!(
            check(r.path(), "/srv/host-file", "/", p)
                .unwrap_err()
                .exit_code(),
            127
        );
        assert_eq!(
            check(r.path(), "/srv/loop", "/", p)
                .unwrap_err()
                .exit_code(),
            127
        );
        let e = check(r.path(), "/srv/data", "/", p).unwrap_err();
        assert_eq!(e.exit_code(), 126);
        assert!(e.to_string().contains("permission denied"), "{e}");
        let e = check(r.path(), "/srv", "/", p).unwrap_err();
        assert_eq!(e.exit_code(), 126);
        assert!(e.to_string().contains("directory"), "{e}");
    }
}
