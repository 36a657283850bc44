//! The OCI runtime (runc; crun where the host supports it), driven through its command line as
//! containerd and podman do. Its state lives under `<root>/runc`, so instances with different
//! roots never see each other's containers.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::config::Settings;

/// One OCI runtime binary and its state directory.
#[derive(Debug, Clone)]
pub struct Runtime {
    binary: String,
    state_root: PathBuf,
}

impl Runtime {
    /// The runtime the settings name.
    pub fn new(settings: &Settings) -> Runtime {
        Runtime {
            binary: settings.runtime.clone(),
            state_root: settings.root.join("runc"),
        }
    }

    /// The binary's path, if it exists (a name is looked up in PATH).
    pub fn locate(&self) -> Option<PathBuf> {
        find_in_path(&self.binary)
    }

    /// The binary as configured.
    pub fn binary(&self) -> &str {
        &self.binary
    }

    /// `runc --root <state> ARGS`.
    pub fn command(&self) -> Command {
        let mut c = Command::new(&self.binary);
        c.arg("--root").arg(&self.state_root);
        c
    }

    /// The container's status (`created`, `running`, `paused`, `stopped`), or `None` when the
    /// runtime does not know it.
    pub fn state(&self, id: &str) -> Option<String> {
        let out = self
            .command()
            .arg("state")
            .arg(id)
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        v.get("status")?.as_str().map(str::to_string)
    }

    /// Sends `signal` (name without SIG, e.g. `TERM`) to the container's init process.
    pub fn kill(&self, id: &str, signal: &str) -> std::io::Result<bool> {
        Ok(self
            .command()
            .arg("kill")
            .arg(id)
            .arg(signal)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?
            .success())
    }

    /// Forgets a stopped container (`delete --force`).
    pub fn delete(&self, id: &str) -> std::io::Result<bool> {
        Ok(self
            .command()
            .arg("delete")
            .arg("--force")
            .arg(id)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?
            .success())
    }

    /// `runc --version`'s first line.
    pub fn version(&self) -> Option<String> {
        let out = Command::new(&self.binary)
            .arg("--version")
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .map(str::to_string)
    }
}

/// `name` if it is a path to an existing file, else its first match in `PATH`.
pub fn find_in_path(name: &str) -> Option<PathBuf> {
    if name.contains('/') {
        let p = Path::new(name);
        return p.is_file().then(|| p.to_path_buf());
    }
    let path = std::env::var_os("PATH")
        .unwrap_or_else(|| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}
