//! `lazypull run` and the container commands through the real daemon, registry, FUSE,
//! overlayfs and runc: output, exit codes, flags, shared layer mounts, clean-up after `--rm`,
//! `rm` and Ctrl-C, recovery after the daemon is killed, and the error cases' messages.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    build_tar, busybox_layer, estargz_layer, lazypull, realistic_image, runnable_config,
    sha256_hex, Lazypull, RealisticImage, E,
};
use lazypull_tests::{gzip, CountingProxy, ImageSpec, Layer, RegistryAuth, TestRegistry};

fn have_runc() -> bool {
    Path::new("/usr/sbin/runc").exists() || Path::new("/usr/bin/runc").exists()
}

/// Pushes `tars` (base first) as `repo:v1` with the runnable config, as eStargz or plain gzip.
async fn push(registry: &TestRegistry, repo: &str, tars: &[Vec<u8>], estargz: bool) {
    let layers: Vec<Layer> = std::thread::scope(|s| {
        let hs: Vec<_> = tars
            .iter()
            .map(|t| {
                s.spawn(move || {
                    if estargz {
                        estargz_layer(t, None).0
                    } else {
                        Layer::new(gzip(t))
                    }
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut spec = ImageSpec::new(layers, "linux", "amd64");
    spec.config = runnable_config();
    registry.pusher().push_image_with(repo, "v1", &spec).await;
}

/// A small runnable image: busybox plus a data layer.
fn small_image() -> Vec<Vec<u8>> {
    let data = build_tar(vec![
        E::Dir("srv", 0o755),
        E::File("srv/hello.txt", 0o644, b"hello from the image\n".to_vec()),
    ]);
    vec![data, busybox_layer(&["srv/hello.txt".to_string()])]
}

/// A registry holding the small image as eStargz, and the image's reference; `None` (after
/// saying so) where runc is missing.
async fn small_app() -> Option<(TestRegistry, String)> {
    if !have_runc() {
        eprintln!("runc not installed; skipping");
        return None;
    }
    let registry = TestRegistry::plain();
    push(&registry, "small/app", &small_image(), true).await;
    let image = format!("{}/small/app:v1", registry.host());
    Some((registry, image))
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Mount points of one kind (`fuse` or `overlay`) under the root.
fn mounts_of(lp: &Lazypull, fstype: &str) -> usize {
    let root = lp.root.path().to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .nth(4)
                .is_some_and(|mp| mp.starts_with(&root))
        })
        .filter(|l| {
            l.split(" - ")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .is_some_and(|t| t.starts_with(fstype))
        })
        .count()
}

fn runc_containers(lp: &Lazypull) -> Vec<String> {
    let out = Command::new("runc")
        .arg("--root")
        .arg(lp.root.path().join("runc"))
        .args(["list", "-q"])
        .output()
        .unwrap();
    stdout(&out)
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn realistic_image_runs_lazily_as_estargz_and_as_plain_gzip() {
    if !have_runc() {
        eprintln!("runc not installed; skipping");
        return;
    }
    let registry = TestRegistry::plain();
    let proxy = CountingProxy::start(&registry.host());
    let RealisticImage { tars, expected, .. } = realistic_image(40);
    let total: u64 = tars.iter().map(|t| t.len() as u64).sum();
    push(&registry, "real/estargz", &tars, true).await;
    push(&registry, "real/gzip", &tars, false).await;

    tokio::task::block_in_place(|| {
        let lp = lazypull(&["--background-fill", "false"]);
        let image = format!("{}/real/estargz:v1", proxy.host());
        let before = proxy.total_body_bytes();
        let out = lp.cmd(&["run", "--rm", &image]);
        assert!(out.status.success(), "{}\n{}", stderr(&out), lp.log());
        assert_eq!(stdout(&out), expected);
        let fetched = proxy.total_body_bytes() - before;
        eprintln!(
            "eStargz run fetched {fetched} of {total} uncompressed bytes ({:.1}%)",
            fetched as f64 * 100.0 / total as f64
        );
        assert!(
            fetched < total / 4,
            "a lazy run fetched {fetched} bytes of a {total}-byte image"
        );

        let image = format!("{}/real/gzip:v1", proxy.host());
        let out = lp.cmd(&["run", "--rm", &image]);
        assert!(out.status.success(), "{}\n{}", stderr(&out), lp.log());
        assert_eq!(stdout(&out), expected);
        assert!(
            lp.log().contains("no eStargz TOC") || lp.log().contains("whole"),
            "the fallback to a whole-layer fetch must be logged:\n{}",
            lp.log()
        );
        let images = lp.ok(&["images"]);
        assert!(
            images.contains("real/gzip") && images.contains("real/estargz"),
            "{images}"
        );
        assert_eq!(
            lp.ok(&["ps", "-a", "-q"]).trim(),
            "",
            "--rm left containers"
        );
        assert_eq!(mounts_of(&lp, "overlay"), 0);
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn exit_codes_and_flags_take_effect() {
    if !have_runc() {
        eprintln!("runc not installed; skipping");
        return;
    }
    let registry = TestRegistry::plain();
    push(&registry, "small/app", &small_image(), true).await;
    let image = format!("{}/small/app:v1", registry.host());
    tokio::task::block_in_place(|| {
        let lp = lazypull(&[]);
        let out = lp.cmd(&["run", "--rm", &image]);
        assert!(out.status.success(), "{}\n{}", stderr(&out), lp.log());
        assert_eq!(
            stdout(&out),
            format!(
                "entry: 1 files\n{}  /srv/hello.txt\n",
                sha256_hex(b"hello from the image\n")
            )
        );

        let out = lp.cmd(&["run", "--rm", &image, "sh", "-c", "exit 3"]);
        assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
        let out = lp.cmd(&["run", "--rm", &image, "false"]);
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));

        let vol = tempfile::tempdir().unwrap();
        std::fs::write(vol.path().join("f"), "from the host\n").unwrap();
        let envfile = vol.path().join("env");
        std::fs::write(&envfile, "# comment\nFROM_FILE=yes\n").unwrap();
        let script = "echo $FOO $FROM_FILE $IMAGE_VAR; pwd; id -u; id -g; cat /data/f; \
                      cat /proc/net/dev | wc -l; hostname; \
                      (echo x > /data/g) 2>/dev/null && echo writable || echo read-only";
        let v = format!("{}:/data:ro", vol.path().display());
        let out = lp.cmd(&[
            "run",
            "--rm",
            "-e",
            "FOO=bar",
            "--env-file",
            envfile.to_str().unwrap(),
            "-w",
            "/tmp",
            "-u",
            "app",
            "-v",
            &v,
            "--net",
            "none",
            "--hostname",
            "box",
            &image,
            "sh",
            "-c",
            script,
        ]);
        assert!(out.status.success(), "{}\n{}", stderr(&out), lp.log());
        assert_eq!(
            stdout(&out),
            "bar yes from-image\n/tmp\n1000\n1000\nfrom the host\n3\nbox\nread-only\n",
            "stderr: {}",
            stderr(&out)
        );
        // With the host network, the host's interfaces are visible.
        let out = lp.cmd(&[
            "run",
            "--rm",
            &image,
            "sh",
            "-c",
            "cat /proc/net/dev | wc -l",
        ]);
        let host_lines = std::fs::read_to_string("/proc/net/dev")
            .unwrap()
            .lines()
            .count();
        assert_eq!(stdout(&out).trim(), host_lines.to_string());

        // Writes go to the container's own upper layer, not the image.
        let out = lp.cmd(&[
            "run",
            "--name",
            "writer",
            &image,
            "sh",
            "-c",
            "echo changed > /srv/hello.txt && cat /srv/hello.txt",
        ]);
        assert_eq!(stdout(&out), "changed\n", "{}", stderr(&out));
        let ps = lp.ok(&["ps", "-a"]);
        assert!(ps.contains("writer") && ps.contains("Exited (0)"), "{ps}");
        let out = lp.cmd(&["run", "--rm", &image, "cat", "/srv/hello.txt"]);
        assert_eq!(stdout(&out), "hello from the image\n");
        lp.ok(&["rm", "writer"]);

        // Killed: 128 + 9.
        let mut child = lp
            .command()
            .args(["run", "--rm", "--name", "victim", &image, "sleep", "100"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_for("the container to run", Duration::from_secs(30), || {
            lp.ok(&["ps"]).contains("victim")
        });
        lp.ok(&["stop", "-t", "1", "victim"]);
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(137));
        assert_eq!(lp.ok(&["ps", "-a", "-q"]).trim(), "");
    });
}

/// `run -d` returns once the container runs (ps shows it at once, never as `exited`), and
/// `rmi -f` stops and removes each container of the image, names it, and leaves no process the
/// daemon does not know about. Repeated: the defect this guards against was a race.
#[tokio::test(flavor = "multi_thread")]
async fn run_detached_returns_running_and_rmi_force_leaves_nothing_behind() {
    let Some((_registry, image)) = small_app().await else {
        return;
    };
    tokio::task::block_in_place(|| {
        let lp = lazypull(&[]);
        for round in 0..3 {
            let name = format!("web{round}");
            let id = lp.ok(&["run", "-d", "--name", &name, &image, "sleep", "300"]);
            let id = id.trim();
            let ps = lp.ok(&["ps"]);
            assert!(
                ps.contains(&name),
                "round {round}: ps right after run -d: {ps}"
            );
            let json = lp.ok(&["ps", "-a", "--json"]);
            let list: serde_json::Value = serde_json::from_str(&json).unwrap();
            let me = list
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["name"] == name.as_str())
                .unwrap_or_else(|| panic!("round {round}: {json}"));
            assert_eq!(me["status"], "running", "round {round}: {json}");
            assert_eq!(runc_containers(&lp), vec![id.to_string()], "round {round}");
            let out = lp.ok(&["rmi", "-f", &image]);
            assert!(
                out.contains(&format!("Removed container: {name}")) && out.contains("Untagged:"),
                "round {round}: {out}"
            );
            assert!(
                runc_containers(&lp).is_empty(),
                "round {round}: a container was left in runc"
            );
            assert_eq!(lp.ok(&["ps", "-a", "-q"]).trim(), "", "round {round}");
            assert_eq!(mounts_of(&lp, "overlay"), 0, "round {round}");
        }
    });
}

/// `prune -a` gives the disk back: every image no container uses goes, and with it every
/// cached chunk no mounted layer can read; an image a container uses stays, with its chunks.
#[tokio::test(flavor = "multi_thread")]
async fn prune_all_removes_unused_images_and_their_cached_chunks() {
    let Some((_registry, image)) = small_app().await else {
        return;
    };
    tokio::task::block_in_place(|| {
        let lp = lazypull(&[]);
        let cache_bytes = || {
            let v: serde_json::Value = serde_json::from_str(&lp.ok(&["info", "--json"])).unwrap();
            v["daemon"]["cache_used_bytes"].as_u64().unwrap()
        };
        assert_eq!(
            lp.ok(&["run", "--rm", &image, "cat", "/srv/hello.txt"]),
            "hello from the image\n"
        );
        lp.ok(&["run", "-d", "--name", "keeper", &image, "sleep", "60"]);
        let before = cache_bytes();
        assert!(before > 0, "reading the image cached its chunks");
        // In use by a container: kept, image and chunks.
        let out = lp.ok(&["prune", "--all"]);
        assert!(!out.contains("Untagged"), "{out}");
        assert!(lp.ok(&["images"]).contains("small/app"));
        assert_eq!(cache_bytes(), before, "{out}");
        lp.ok(&["rm", "-f", "keeper"]);
        // Plain prune keeps the cache (the complaint); prune -a empties it.
        lp.ok(&["prune"]);
        assert_eq!(cache_bytes(), before);
        let out = lp.ok(&["prune", "-a"]);
        assert!(out.contains(&format!("Untagged: {image}")), "{out}");
        assert!(out.contains("cached chunks"), "{out}");
        assert_eq!(lp.ok(&["images", "-q"]).trim(), "");
        assert_eq!(cache_bytes(), 0, "{out}");
        assert_eq!(mounts_of(&lp, "fuse"), 0, "the layers are unmounted");
        // And the image still runs afterwards, fetched again.
        assert_eq!(
            lp.ok(&["run", "--rm", &image, "cat", "/srv/hello.txt"]),
            "hello from the image\n"
        );
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn two_containers_share_layer_mounts_and_rm_cleans_up() {
    if !have_runc() {
        eprintln!("runc not installed; skipping");
        return;
    }
    let registry = TestRegistry::plain();
    push(&registry, "small/app", &small_image(), true).await;
    let image = format!("{}/small/app:v1", registry.host());
    tokio::task::block_in_place(|| {
        let lp = lazypull(&[]);
        let a = lp.ok(&["run", "-d", "--name", "a", &image, "sleep", "60"]);
        let b = lp.ok(&["run", "-d", "--name", "b", &image, "sleep", "60"]);
        assert_eq!(a.trim().len(), 64, "run -d prints the ID: {a}");
        assert_ne!(a, b);
        wait_for("both containers to run", Duration::from_secs(30), || {
            let ps = lp.ok(&["ps"]);
            ps.contains(" a\n") && ps.contains(" b\n")
        });
        assert_eq!(
            mounts_of(&lp, "fuse"),
            2,
            "one FUSE mount per layer, shared"
        );
        assert_eq!(mounts_of(&lp, "overlay"), 2, "one root per container");
        assert_eq!(runc_containers(&lp).len(), 2);
        let out = lp.cmd(&["rm", "a"]);
        assert!(!out.status.success());
        assert!(stderr(&out).contains("is running"), "{}", stderr(&out));
        lp.ok(&["rm", "-f", "a", "b"]);
        assert_eq!(mounts_of(&lp, "overlay"), 0);
        assert!(runc_containers(&lp).is_empty());
        assert_eq!(lp.ok(&["ps", "-a", "-q"]).trim(), "");
        // Detached output goes to the log.
        let id = lp.ok(&["run", "-d", "--name", "c", &image, "echo", "logged line"]);
        wait_for("c to exit", Duration::from_secs(30), || {
            lp.ok(&["ps", "-a"]).contains("Exited (0)")
        });
        assert_eq!(lp.ok(&["logs", "c"]), "logged line\n");
        lp.ok(&["rm", id.trim()]);
        assert!(lp.shutdown(), "{}", lp.log());
        assert!(lp.mounts_under_root().is_empty());
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn ctrl_c_of_a_foreground_run_stops_and_removes_the_container() {
    if !have_runc() {
        eprintln!("runc not installed; skipping");
        return;
    }
    let registry = TestRegistry::plain();
    push(&registry, "small/app", &small_image(), true).await;
    let image = format!("{}/small/app:v1", registry.host());
    tokio::task::block_in_place(|| {
        let lp = lazypull(&[]);
        let mut child = lp
            .command()
            .args([
                "run",
                "--rm",
                "--stop-timeout",
                "1",
                "--name",
                "fg",
                &image,
                "sleep",
                "171",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_for("the container to run", Duration::from_secs(30), || {
            lp.ok(&["ps"]).contains("fg")
        });
        let start = Instant::now();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        )
        .unwrap();
        let status = child.wait().unwrap();
        // `sleep` as PID 1 ignores SIGINT; after the stop timeout it is killed.
        assert_eq!(status.code(), Some(137));
        assert!(start.elapsed() < Duration::from_secs(10));
        assert_eq!(lp.ok(&["ps", "-a", "-q"]).trim(), "");
        assert_eq!(mounts_of(&lp, "overlay"), 0);
        assert!(runc_containers(&lp).is_empty());
        let procs = Command::new("pgrep")
            .args(["-f", "sleep 171"])
            .output()
            .unwrap();
        assert!(
            stdout(&procs).trim().is_empty(),
            "container process left: {}",
            stdout(&procs)
        );
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn daemon_killed_while_a_container_runs_is_restarted_clean() {
    if !have_runc() {
        eprintln!("runc not installed; skipping");
        return;
    }
    let mut registry = TestRegistry::plain();
    push(&registry, "small/app", &small_image(), true).await;
    let image = format!("{}/small/app:v1", registry.host());
    tokio::task::block_in_place(|| {
        let lp = lazypull(&[]);
        lp.ok(&["run", "-d", "--name", "long", &image, "sleep", "60"]);
        wait_for("the container to run", Duration::from_secs(30), || {
            lp.ok(&["ps"]).contains("long")
        });
        // Once the background fill has made the image local, the registry can go: the restart
        // must not need it (the layers' TOCs are saved locally).
        wait_for("the image to be complete", Duration::from_secs(30), || {
            lp.ok(&["images"]).contains("100%")
        });
        registry.kill();
        lp.kill_daemon();
        let out = lp.cmd(&["images"]);
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(
            stderr(&out).contains("started the lazypull daemon"),
            "{}",
            stderr(&out)
        );
        assert!(stdout(&out).contains("small/app"), "{}", stdout(&out));
        assert!(
            stdout(&out).contains("100%"),
            "restored without the registry: {}",
            stdout(&out)
        );
        // Every mount under the root answers: no dead FUSE mount is left.
        for mp in lp.mounts_under_root() {
            if let Err(e) = std::fs::metadata(&mp) {
                panic!("{mp}: {e} (stale mount left)");
            }
        }
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let root = lp.root.path().to_string_lossy().into_owned();
        let fuse = mounts
            .lines()
            .filter(|l| l.contains(&root) && l.contains(" - fuse"))
            .count();
        assert_eq!(fuse, 2, "the image's layers are mounted again");
        // The container record survives; it can be removed.
        assert!(lp.ok(&["ps", "-a"]).contains("long"));
        lp.ok(&["rm", "-f", "long"]);
        assert!(runc_containers(&lp).is_empty());
        let out = lp.cmd(&["run", "--rm", &image, "cat", "/srv/hello.txt"]);
        assert_eq!(stdout(&out), "hello from the image\n", "{}", stderr(&out));
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn errors_say_what_failed_and_exit_non_zero() {
    if !have_runc() {
        eprintln!("runc not installed; skipping");
        return;
    }
    let registry = TestRegistry::plain();
    push(&registry, "small/app", &small_image(), true).await;
    let auth = TestRegistry::start(RegistryAuth::htpasswd("alice", "s3cret"));
    let unknown = Layer::new(b"not a layer at all".to_vec())
        .with_media_type("application/vnd.example.unknown");
    let spec = ImageSpec::new(vec![unknown], "linux", "amd64");
    registry
        .pusher()
        .push_image_with("odd/format", "v1", &spec)
        .await;
    let image = format!("{}/small/app:v1", registry.host());
    tokio::task::block_in_place(|| {
        let lp = lazypull(&["--fetch-timeout", "3"]);
        let check = |args: &[&str], code: i32, needle: &str| {
            let out = lp.cmd(args);
            assert_eq!(out.status.code(), Some(code), "{args:?}: {}", stderr(&out));
            assert!(
                stderr(&out).to_lowercase().contains(&needle.to_lowercase()),
                "{args:?}: expected {needle:?} in: {}",
                stderr(&out)
            );
        };
        check(
            &["run", "--rm", "127.0.0.1:1/nothing:v1"],
            125,
            "127.0.0.1:1",
        );
        check(
            &["run", "--rm", &format!("{}/private/app:v1", auth.host())],
            125,
            "unauthorized",
        );
        check(
            &[
                "run",
                "--rm",
                &format!("{}/small/app:nope", registry.host()),
            ],
            125,
            "not found",
        );
        check(
            &["run", "--rm", &format!("{}/odd/format:v1", registry.host())],
            125,
            "application/vnd.example.unknown",
        );
        check(
            &["--runtime", "/nonexistent/runc", "run", "--rm", &image],
            125,
            "apt-get install runc",
        );
        check(&["rm", "nosuch"], 1, "no such container");
        check(&["rmi", "nosuch:v9"], 1, "no such image");
        // The container's program, as podman reports it: 127 not found, 126 not executable,
        // one line of lazypull's, none of runc's.
        for (args, code, needle) in [
            (
                vec!["run", "--rm", &image, "nosuch"],
                127,
                "`nosuch` not found in the container's $PATH",
            ),
            (
                vec!["run", "--rm", "-d", &image, "/srv/nosuch"],
                127,
                "not found",
            ),
            (
                vec!["run", "--rm", &image, "/srv/hello.txt"],
                126,
                "permission denied",
            ),
            (vec!["run", "--rm", &image, "/srv"], 126, "directory"),
        ] {
            check(&args, code, needle);
            assert!(!stderr(&lp.cmd(&args)).contains("level=error"), "{args:?}");
        }
        assert_eq!(lp.ok(&["ps", "-a", "-q"]).trim(), "", "--rm removed them");
        // -t with no terminal on stdin (the test's stdin is not one): lazypull's own failure.
        check(
            &["run", "--rm", "-t", &image, "true"],
            125,
            "-t needs a terminal",
        );
        // Daemon settings given to a command while the daemon runs are said to change nothing,
        // and a second daemon on the same root says why it exits.
        let out = lp.cmd(&["--cache-mib", "100", "--background-fill", "false", "images"]);
        assert!(out.status.success());
        assert!(
            stderr(&out).contains("--cache-mib, --background-fill change nothing"),
            "{}",
            stderr(&out)
        );
        assert!(!stderr(&lp.cmd(&["images"])).contains("change nothing"));
        let out = lp.cmd(&["serve"]);
        assert_eq!(stdout(&out).trim(), "READY");
        assert!(stderr(&out).contains("already serves"), "{}", stderr(&out));
        // A single-platform image is for its own platform, whatever --platform says.
        check(
            &["pull", "--platform", "linux/s390x", &image],
            1,
            "is an image for linux/amd64, not linux/s390x",
        );
        check(
            &["run", "--rm", "--platform", "linux/s390x", &image],
            125,
            "not linux/s390x",
        );
        let inspected: serde_json::Value =
            serde_json::from_str(&lp.ok(&["inspect", "--platform", "linux/s390x", &image]))
                .unwrap();
        assert_eq!(inspected["platform"], "linux/amd64");
        // A config file that does not parse is `run`'s own failure: 125.
        let bad = lp.root.path().join("bad.toml");
        std::fs::write(&bad, "cache_mib = [").unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_lazypull"))
            .arg("--config")
            .arg(&bad)
            .args(["run", "--rm", &image])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(125), "{}", stderr(&out));
        // Not root.
        let out = Command::new("setpriv")
            .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
            .arg(env!("CARGO_BIN_EXE_lazypull"))
            .args([
                "--config",
                "/dev/null",
                "--root",
                "/tmp/lazypull-nonroot",
                "--address",
            ])
            .arg("/tmp/lazypull-nonroot.sock")
            .args(["run", "--rm", &image])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(125));
        assert!(stderr(&out).contains("needs root"), "{}", stderr(&out));
        // No /dev/fuse (a private mount namespace with an empty /dev).
        let sock = lp.root.path().join("other.sock");
        let out = Command::new("unshare")
            .args(["-m", "sh", "-c"])
            .arg(format!(
                "mount -t tmpfs none /dev && mknod -m 666 /dev/null c 1 3 && exec {} --config /dev/null --root {} --address {} pull {}",
                env!("CARGO_BIN_EXE_lazypull"),
                lp.root.path().join("other").display(),
                sock.display(),
                image
            ))
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        assert!(
            stderr(&out).contains("/dev/fuse is missing"),
            "{}",
            stderr(&out)
        );
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn tty_gives_the_container_a_terminal_and_stdin_passes_through() {
    if !have_runc() || lazypull_tests::util::find_in_path("script").is_none() {
        eprintln!("runc or script not installed; skipping");
        return;
    }
    let registry = TestRegistry::plain();
    push(&registry, "small/app", &small_image(), true).await;
    let image = format!("{}/small/app:v1", registry.host());
    tokio::task::block_in_place(|| {
        let lp = lazypull(&[]);
        lp.ok(&["pull", &image]);
        // `script` gives the command a pseudo-terminal, as an interactive shell would have.
        let cmd = lp.command();
        let mut words: Vec<String> = std::iter::once(cmd.get_program())
            .chain(cmd.get_args())
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        words.extend(
            [
                "run",
                "--rm",
                "-it",
                &image,
                "sh",
                "-c",
                "tty; [ -t 0 ] && echo stdin-is-a-tty; exit 4",
            ]
            .map(str::to_string),
        );
        let cmdline = words
            .iter()
            .map(|w| format!("'{w}'"))
            .collect::<Vec<_>>()
            .join(" ");
        let out = Command::new("script")
            .args(["-qec", &cmdline, "/dev/null"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let text = stdout(&out).replace('\r', "");
        assert!(
            text.contains("/dev/pts/0\nstdin-is-a-tty\n"),
            "{text}\n{}",
            stderr(&out)
        );
        assert_eq!(out.status.code(), Some(4), "{text}");
        // Without -t, stdin passes through with -i.
        let mut child = lp
            .command()
            .args(["run", "--rm", "-i", &image, "sh", "-c", "wc -l"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write as _;
        child.stdin.take().unwrap().write_all(b"a\nb\nc\n").unwrap();
        let out = child.wait_with_output().unwrap();
        assert_eq!(stdout(&out).trim(), "3");
    });
}
