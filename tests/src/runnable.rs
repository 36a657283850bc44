//! What makes a test image runnable by a real OCI runtime: the host's static busybox (Debian's
//! `busybox-static`) with its applets, two users, and an entry point that reads a list of files
//! (the workload's reads) and prints a line that proves it read them.

use serde_json::{json, Value};

/// Busybox applets linked to `/bin/busybox`.
pub const APPLETS: &[&str] = &[
    "sh",
    "echo",
    "cat",
    "id",
    "pwd",
    "sleep",
    "wc",
    "sha256sum",
    "kill",
    "true",
    "false",
    "env",
    "ls",
    "head",
    "xargs",
    "hostname",
    "date",
];

/// Where Debian's `busybox-static` installs the binary.
pub const BUSYBOX: &str = "/bin/busybox";

/// A layer (uncompressed tar) holding `/bin/busybox` and its applets, users `root` and `app`
/// (1000:1000), and `/entry.sh`, which reads every file listed in `/entry.list` and prints
/// `entry: N files` and `sha256sum` of the last one. Panics when busybox is not installed.
pub fn busybox_layer(entry_files: &[String]) -> Vec<u8> {
    let busybox = std::fs::read(BUSYBOX)
        .unwrap_or_else(|e| panic!("{BUSYBOX}: {e}: apt-get install busybox-static"));
    let script = "n=0; last=\n\
                  while read -r f; do cat \"/$f\" >/dev/null || exit 9; n=$((n+1)); last=$f; done < /entry.list\n\
                  echo \"entry: $n files\"\n\
                  sha256sum \"/$last\"\n";
    let mut list = entry_files.join("\n");
    list.push('\n');
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |path: &str, kind: tar::EntryType, mode: u32, data: &[u8], link: Option<&str>| {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_mtime(1_700_000_000);
        h.set_size(data.len() as u64);
        if let Some(l) = link {
            h.set_link_name(l).expect("link name");
        }
        b.append_data(&mut h, path, data).expect("tar append");
    };
    use tar::EntryType::{Directory as D, Regular as F, Symlink as L};
    for (dir, mode) in [
        ("bin", 0o755),
        ("etc", 0o755),
        ("tmp", 0o1777),
        ("proc", 0o555),
        ("sys", 0o555),
        ("dev", 0o755),
        ("data", 0o755),
        ("home", 0o755),
    ] {
        add(dir, D, mode, &[], None);
    }
    add("bin/busybox", F, 0o755, &busybox, None);
    for a in APPLETS {
        add(&format!("bin/{a}"), L, 0o777, &[], Some("busybox"));
    }
    add(
        "etc/passwd",
        F,
        0o644,
        b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n",
        None,
    );
    add("etc/group", F, 0o644, b"root:x:0:\napp:x:1000:\n", None);
    add("entry.sh", F, 0o755, script.as_bytes(), None);
    add("entry.list", F, 0o644, list.as_bytes(), None);
    b.into_inner().expect("tar finish")
}

/// The image config (`config` section) of a runnable test image: `sh /entry.sh`, a PATH and
/// one variable tests can look for.
pub fn runnable_config() -> Value {
    json!({
        "Env": ["PATH=/bin", "IMAGE_VAR=from-image"],
        "Cmd": ["/bin/sh", "/entry.sh"],
        "WorkingDir": "/",
    })
}
