//! Kernel mounts the daemon makes: overlay stacks of layer mounts, and the clean-up of mounts a
//! killed daemon left behind.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use nix::mount::{mount, umount2, MntFlags, MsFlags};

/// Stacks layer mounts (top first) read-only at `target`: overlayfs for several layers, a
/// read-only bind mount for one. This is the inspection view (`lazypull mount`), so it is
/// also `nosuid,nodev`: an image's set-user-ID binaries and device nodes must not become the
/// host's. Container roots ([`mount_writable_stack`]) keep both: a container's set-id
/// programs must work, and its devices are governed by the runtime spec and runc's device
/// cgroup.
pub fn mount_readonly_stack(top_first: &[PathBuf], target: &Path) -> Result<()> {
    if let [only] = top_first {
        mount(
            Some(only.as_path()),
            target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .with_context(|| format!("bind-mounting {} at {}", only.display(), target.display()))?;
        mount(
            None::<&str>,
            target,
            None::<&str>,
            MsFlags::MS_BIND
                | MsFlags::MS_REMOUNT
                | MsFlags::MS_RDONLY
                | MsFlags::MS_NOSUID
                | MsFlags::MS_NODEV,
            None::<&str>,
        )
        .with_context(|| format!("making {} read-only", target.display()))?;
        return Ok(());
    }
    let opts = format!("lowerdir={}", join(top_first));
    mount(
        Some("overlay"),
        target,
        Some("overlay"),
        MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(opts.as_str()),
    )
    .with_context(|| format!("mounting overlayfs at {}", target.display()))
}

/// A container's writable root: the layers (top first) under `upper`, with `work` as
/// overlayfs's scratch directory.
pub fn mount_writable_stack(
    top_first: &[PathBuf],
    upper: &Path,
    work: &Path,
    target: &Path,
) -> Result<()> {
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        join(top_first),
        upper.display(),
        work.display()
    );
    if opts.len() > 4000 {
        anyhow::bail!(
            "too many layers ({}) for one overlayfs mount option page",
            top_first.len()
        );
    }
    mount(
        Some("overlay"),
        target,
        Some("overlay"),
        MsFlags::empty(),
        Some(opts.as_str()),
    )
    .with_context(|| format!("mounting the container root at {}", target.display()))
}

fn join(dirs: &[PathBuf]) -> String {
    dirs.iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(":")
}

/// Unmounts `target`, lazily if it is busy.
pub fn unmount(target: &Path) -> Result<()> {
    umount2(target, MntFlags::empty())
        .or_else(|_| umount2(target, MntFlags::MNT_DETACH))
        .with_context(|| format!("unmounting {}", target.display()))
}

/// Mount points at or below `dir` (deepest first), from `/proc/self/mountinfo`.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let prefix = dir.to_string_lossy();
    let mut out: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .map(unescape)
        .filter(|mp| {
            mp == prefix.as_ref()
                || (mp.starts_with(prefix.as_ref())
                    && mp.as_bytes().get(prefix.len()) == Some(&b'/'))
        })
        .map(PathBuf::from)
        .collect();
    out.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    out.dedup();
    out
}

/// Whether `path` is a mount point.
pub fn is_mounted(path: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let p = path.to_string_lossy();
    info.lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .any(|mp| unescape(mp) == p.as_ref())
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Detaches every mount at or below `dir`: what a killed daemon left (FUSE mounts whose
/// server is gone answer "Transport endpoint is not connected", and overlays on top of them).
/// Mounts in `keep` (live FUSE mounts about to be taken over) stay. Returns how many were
/// removed.
pub fn clean_stale(dir: &Path, keep: &std::collections::HashSet<std::path::PathBuf>) -> usize {
    let mut n = 0;
    for mp in mounts_under(dir) {
        if keep.contains(&mp) {
            continue;
        }
        match umount2(&mp, MntFlags::MNT_DETACH) {
            Ok(()) => {
                n += 1;
                tracing::info!(mountpoint = %mp.display(), "removed a stale mount");
            }
            Err(e) => {
                tracing::warn!(mountpoint = %mp.display(), error = %e, "cannot remove a stale mount")
            }
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape(r"/a\040b"), "/a b");
        assert_eq!(unescape(r"/a\134"), r"/a\");
        assert_eq!(unescape(r"/plain"), "/plain");
        assert_eq!(unescape(r"/end\04"), r"/end\04");
    }
}
