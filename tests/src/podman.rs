//! A private podman for tests: its own storage, run root and configuration under a temp dir,
//! so tests never touch the host's images and clean up everything they made.

use std::path::Path;
use std::process::{Command, Output, Stdio};

/// `[storage.options]` lines turning on containers/storage partial pulls (zstd:chunked and
/// eStargz read by their TOC).
pub const PARTIAL_PULLS: &str = "pull_options = {enable_partial_images = \"true\", \
                                 use_hard_links = \"false\", ostree_repos = \"\"}\n";

/// `[storage.options]` lines naming an additional layer store at `dir` (keyed by image
/// reference, as lazypull serves it).
pub fn layer_store_options(dir: &Path) -> String {
    format!("additionallayerstores = [\"{}:ref\"]\n", dir.display())
}

/// podman with a private store; `storage_options` go under `[storage.options]`.
pub struct Podman {
    dir: tempfile::TempDir,
}

impl Podman {
    /// Writes storage.conf, containers.conf (the settings this host needs: cgroupfs, file
    /// events, ulimits within the hard limits) and registries.conf (`registry_hosts` over
    /// plain HTTP).
    pub fn new(registry_hosts: &[String], storage_options: &str) -> Podman {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path();
        std::fs::write(
            p.join("storage.conf"),
            format!(
                "[storage]\ndriver = \"overlay\"\ngraphroot = \"{root}\"\nrunroot = \"{run}\"\n\
                 [storage.options]\n{storage_options}",
                root = p.join("root").display(),
                run = p.join("run").display()
            ),
        )
        .expect("storage.conf");
        std::fs::write(
            p.join("containers.conf"),
            "[containers]\ndefault_ulimits = [\"nofile=1024:1024\", \"nproc=4096:4096\"]\n\
             [engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n",
        )
        .expect("containers.conf");
        let mut regs = String::from("unqualified-search-registries = []\n");
        for h in registry_hosts {
            regs.push_str(&format!(
                "[[registry]]\nlocation = \"{h}\"\ninsecure = true\n"
            ));
        }
        std::fs::write(p.join("registries.conf"), regs).expect("registries.conf");
        Podman { dir }
    }

    /// `podman ARGS` against the private store, not started: for callers that time it or
    /// read its output as it comes.
    pub fn command(&self, args: &[&str]) -> Command {
        let p = self.dir.path();
        let mut c = Command::new("podman");
        c.env("CONTAINERS_STORAGE_CONF", p.join("storage.conf"))
            .env("CONTAINERS_CONF", p.join("containers.conf"))
            .env("CONTAINERS_REGISTRIES_CONF", p.join("registries.conf"))
            // No --root/--runroot: podman 4.3 then drops storage.conf's driver options
            // (the additional layer stores among them); storage.conf names both roots.
            .args(args);
        c
    }

    /// Runs `podman ARGS` against the private store (stdin closed).
    pub fn cmd(&self, args: &[&str]) -> Output {
        self.command(args)
            .stdin(Stdio::null())
            .output()
            .expect("running podman")
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self.cmd(&["rm", "-af"]);
        let _ = self.cmd(&["rmi", "-af"]);
        let _ = self.cmd(&["system", "reset", "-f"]);
        let root = self.dir.path().to_string_lossy().into_owned();
        // A container podman failed to remove: its conmon names our root; it goes with
        // everything it started.
        let killed = crate::util::kill_trees_mentioning(&root);
        if killed > 0 {
            eprintln!("podman left {killed} processes behind; killed them");
        }
        // Whatever overlay mounts podman left under its root.
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut points: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split_whitespace().nth(4))
            .filter(|m| m.starts_with(&root))
            .collect();
        points.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in points {
            let _ = Command::new("umount").arg("-l").arg(m).status();
        }
    }
}
