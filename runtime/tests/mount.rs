//! `lazypull mount` end to end: real registry, real FUSE, real overlayfs, the real binary.
//!
//! Images are built here from generated files, converted to eStargz, pushed to a registry the
//! test starts, mounted lazily, and compared entry by entry with a plain extraction of the same
//! layers.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{
    build_tar, lazypull, push_estargz, sample_base_layer, sample_top_layer, sha256_hex, E,
};
use lazypull_tests::tree::{apply_layers, describe_tree, diff_trees};
use lazypull_tests::{random_bytes, CountingProxy, TestRegistry};

fn read_all_files(root: &Path) -> usize {
    let mut n = 0;
    for (p, info) in describe_tree(root) {
        if info.kind == "file" {
            std::fs::read(root.join(&p)).unwrap();
            n += 1;
        }
    }
    n
}

#[tokio::test(flavor = "multi_thread")]
async fn mounted_image_equals_extracted_layers() {
    let registry = TestRegistry::plain();
    let (base, top) = (sample_base_layer(), sample_top_layer());
    push_estargz(&registry, "lazy/app", &[&base, &top]).await;

    let expected_dir = tempfile::tempdir().unwrap();
    apply_layers(&[base, top], expected_dir.path());
    let expected = describe_tree(expected_dir.path());

    let mnt = tempfile::tempdir().unwrap();
    let mut lp = lazypull(&["--background-fill", "false"]);
    let image = format!("{}/lazy/app:v1", registry.host());
    tokio::task::block_in_place(|| lp.mount(&image, mnt.path()));
    let actual = tokio::task::block_in_place(|| describe_tree(mnt.path()));
    let diffs = diff_trees(&expected, &actual);
    assert!(
        diffs.is_empty(),
        "mount differs from extraction:\n{}",
        diffs.join("\n")
    );
    assert!(expected.len() > 20);
    // Hard links share an inode through the mount, too.
    use std::os::unix::fs::MetadataExt;
    let a = std::fs::metadata(mnt.path().join("usr/bin/tool")).unwrap();
    let b = std::fs::metadata(mnt.path().join("usr/bin/tool-link")).unwrap();
    assert_eq!(a.ino(), b.ino());
    assert_eq!(a.nlink(), 2);

    tokio::task::block_in_place(|| {
        lp.umount(mnt.path());
        // The image stays pulled (its layers mounted) until `rmi`; the daemon's shutdown
        // leaves no mount behind.
        assert_eq!(layer_mounts(lp.root.path()), 2);
        assert!(lp.shutdown(), "daemon did not stop:\n{}", lp.log());
    });
    assert!(
        lp.mounts_under_root().is_empty(),
        "mounts left behind: {:?}",
        lp.mounts_under_root()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn reading_one_small_file_fetches_little_and_fill_makes_it_local() {
    let mut registry = TestRegistry::plain();
    let tar = build_tar(vec![
        E::Dir("data", 0o755),
        E::File("data/huge.bin", 0o644, random_bytes(40 << 20, 7)),
        E::File("data/other.bin", 0o644, random_bytes(10 << 20, 8)),
        E::File("hello.txt", 0o644, b"hello, lazily\n".to_vec()),
    ]);
    let (_, blobs) = push_estargz(&registry, "lazy/big", &[&tar]).await;
    let blob_size = blobs[0].len() as u64;
    let proxy = CountingProxy::start(&registry.host());

    // Laziness: no background fill, read one small file.
    let mnt = tempfile::tempdir().unwrap();
    let mut lp = lazypull(&["--background-fill", "false"]);
    let image = format!("{}/lazy/big:v1", proxy.host());
    tokio::task::block_in_place(|| lp.mount(&image, mnt.path()));
    let hello = std::fs::read(mnt.path().join("hello.txt")).unwrap();
    assert_eq!(hello, b"hello, lazily\n");
    let fetched = proxy.total_body_bytes();
    assert!(
        fetched * 20 < blob_size,
        "fetched {fetched} of {blob_size} bytes to read one small file"
    );
    tokio::task::block_in_place(|| lp.umount(mnt.path()));
    drop(lp);

    // Background fill: the layer becomes complete, then reads work with the registry gone.
    let mnt = tempfile::tempdir().unwrap();
    let mut lp = lazypull(&[]);
    tokio::task::block_in_place(|| {
        lp.mount(&image, mnt.path());
        lp.wait_complete(Duration::from_secs(60));
    });
    registry.kill();
    drop(proxy);
    let expected_dir = tempfile::tempdir().unwrap();
    apply_layers(&[tar], expected_dir.path());
    let diffs = tokio::task::block_in_place(|| {
        diff_trees(
            &describe_tree(expected_dir.path()),
            &describe_tree(mnt.path()),
        )
    });
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
    assert_eq!(
        tokio::task::block_in_place(|| read_all_files(mnt.path())),
        3
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn corrupt_chunk_gives_eio_for_its_file_only() {
    let registry = TestRegistry::plain();
    let good = random_bytes(300_000, 21);
    let victim = random_bytes(300_000, 22);
    let tar = build_tar(vec![
        E::File("good.bin", 0o644, good.clone()),
        E::File("victim.bin", 0o644, victim.clone()),
    ]);
    let (pushed, mut blobs) = push_estargz(&registry, "lazy/corrupt", &[&tar]).await;
    let blob = blobs.remove(0);
    // Flip a byte inside victim.bin's compressed data (found through our own reader's TOC).
    let toc = lazypull_fs::estargz::open_toc(
        &blob,
        0,
        blob.len() as u64,
        None,
        &lazypull_fs::estargz::ReaderConfig::default(),
    )
    .unwrap();
    let node = toc.layer.resolve("victim.bin").unwrap();
    let chunk = toc.layer.chunks(node)[0];
    let path = registry.blob_data_path(&pushed.layer_digests[0]);
    let mut stored = std::fs::read(&path).unwrap();
    let at = (chunk.blob_offset + chunk.blob_len / 2) as usize;
    stored[at] ^= 0xff;
    std::fs::write(&path, &stored).unwrap();

    let mnt = tempfile::tempdir().unwrap();
    let mut lp = lazypull(&["--background-fill", "false"]);
    let image = format!("{}/lazy/corrupt:v1", registry.host());
    tokio::task::block_in_place(|| lp.mount(&image, mnt.path()));
    let err = std::fs::read(mnt.path().join("victim.bin")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc_eio()), "{err}");
    assert_eq!(std::fs::read(mnt.path().join("good.bin")).unwrap(), good);
    assert!(
        lp.log().contains("verification"),
        "no log of the bad chunk:\n{}",
        lp.log()
    );
}

fn libc_eio() -> i32 {
    5
}

#[tokio::test(flavor = "multi_thread")]
async fn registry_down_fails_reads_in_bounded_time_then_recovers() {
    let mut registry = TestRegistry::plain();
    // Larger than the 1 MiB tail read that finds the TOC (whose chunks get cached), so
    // second.bin's first chunk is only in the registry.
    let first = random_bytes(2_500_000, 31);
    let second = random_bytes(2_500_000, 32);
    let tar = build_tar(vec![
        E::File("first.bin", 0o644, first.clone()),
        E::File("second.bin", 0o644, second.clone()),
    ]);
    push_estargz(&registry, "lazy/down", &[&tar]).await;
    let mnt = tempfile::tempdir().unwrap();
    let mut lp = lazypull(&["--background-fill", "false", "--fetch-timeout", "3"]);
    let image = format!("{}/lazy/down:v1", registry.host());
    tokio::task::block_in_place(|| lp.mount(&image, mnt.path()));
    assert_eq!(std::fs::read(mnt.path().join("first.bin")).unwrap(), first);

    registry.kill();
    let start = Instant::now();
    let err =
        tokio::task::block_in_place(|| std::fs::read(mnt.path().join("second.bin"))).unwrap_err();
    let waited = start.elapsed();
    assert_eq!(err.raw_os_error(), Some(libc_eio()), "{err}");
    assert!(
        waited < Duration::from_secs(12),
        "read failed only after {waited:?}"
    );
    // Cached data keeps working with the registry down.
    assert_eq!(std::fs::read(mnt.path().join("first.bin")).unwrap(), first);

    registry.restart();
    let got = tokio::task::block_in_place(|| std::fs::read(mnt.path().join("second.bin"))).unwrap();
    assert_eq!(got, second, "read after the registry came back");
}

#[tokio::test(flavor = "multi_thread")]
async fn stat_storm_stays_fast_while_a_read_is_stalled() {
    let registry = TestRegistry::plain();
    let big = random_bytes(6 << 20, 41);
    let mut entries = vec![
        E::File("big.bin", 0o644, big.clone()),
        E::Dir("many", 0o755),
    ];
    let names: Vec<String> = (0..200).map(|i| format!("many/f{i}")).collect();
    for n in &names {
        entries.push(E::File(n, 0o644, b"x".to_vec()));
    }
    let tar = build_tar(entries);
    push_estargz(&registry, "lazy/stall", &[&tar]).await;
    let proxy = CountingProxy::start(&registry.host());
    let mnt = tempfile::tempdir().unwrap();
    let mut lp = lazypull(&["--background-fill", "false"]);
    let image = format!("{}/lazy/stall:v1", proxy.host());
    tokio::task::block_in_place(|| lp.mount(&image, mnt.path()));

    proxy.set_delay(Duration::from_secs(3));
    let path = mnt.path().join("big.bin");
    let reader = std::thread::spawn(move || std::fs::read(path));
    std::thread::sleep(Duration::from_millis(300));
    let start = Instant::now();
    for i in 0..1000 {
        let p = mnt.path().join(&names[i % names.len()]);
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 1);
    }
    let storm = start.elapsed();
    assert!(
        !reader.is_finished(),
        "the read was not stalled; the test proves nothing"
    );
    assert!(storm < Duration::from_secs(1), "1,000 stats took {storm:?}");
    let got = tokio::task::block_in_place(|| reader.join().unwrap().unwrap());
    assert!(got == big, "stalled read returned wrong data");
}

/// FUSE mounts under `root` (the layer mounts of a mount server).
fn layer_mounts(root: &Path) -> usize {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let root = root.to_str().unwrap();
    mounts
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .nth(4)
                .is_some_and(|mp| mp.starts_with(root))
        })
        .filter(|l| l.contains(" - fuse"))
        .count()
}

#[tokio::test(flavor = "multi_thread")]
async fn layers_shared_between_images_are_mounted_once() {
    let registry = TestRegistry::plain();
    let base = build_tar(vec![E::File("base.txt", 0o644, b"shared base".to_vec())]);
    let top1 = build_tar(vec![E::File("one.txt", 0o644, b"image one".to_vec())]);
    let top2 = build_tar(vec![E::File("two.txt", 0o644, b"image two".to_vec())]);
    for (repo, top) in [("lazy/one", &top1), ("lazy/two", &top2)] {
        push_estargz(&registry, repo, &[&base, top]).await;
    }
    let (m1, m2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut lp = lazypull(&[]);
    let root = lp.root.path().to_path_buf();
    tokio::task::block_in_place(|| {
        lp.mount(&format!("{}/lazy/one:v1", registry.host()), m1.path());
        lp.mount(&format!("{}/lazy/two:v1", registry.host()), m2.path());
    });
    assert_eq!(
        layer_mounts(&root),
        3,
        "the shared base layer must be mounted once"
    );
    assert_eq!(
        std::fs::read(m1.path().join("base.txt")).unwrap(),
        b"shared base"
    );
    assert_eq!(
        std::fs::read(m2.path().join("two.txt")).unwrap(),
        b"image two"
    );
    assert!(!m1.path().join("two.txt").exists());

    tokio::task::block_in_place(|| {
        lp.umount(m1.path());
        assert_eq!(layer_mounts(&root), 3, "umount keeps the image pulled");
        let out = lp.ok(&["rmi", &format!("{}/lazy/one:v1", registry.host())]);
        assert!(out.contains("Untagged"), "{out}");
    });
    assert_eq!(
        layer_mounts(&root),
        2,
        "image two's layers must stay mounted"
    );
    assert_eq!(
        std::fs::read(m2.path().join("base.txt")).unwrap(),
        b"shared base"
    );
    tokio::task::block_in_place(|| {
        lp.umount(m2.path());
        lp.ok(&["rmi", &format!("{}/lazy/two:v1", registry.host())]);
    });
    assert_eq!(layer_mounts(&root), 0);
}

/// Waits up to `timeout` for a reader thread; fails the test if it is still blocked.
fn join_within<T>(t: std::thread::JoinHandle<T>, timeout: Duration, what: &str) -> T {
    let start = Instant::now();
    while !t.is_finished() {
        assert!(
            start.elapsed() < timeout,
            "{what} still blocked after {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    t.join().unwrap()
}

/// Issue 6: a daemon killed with SIGKILL leaves its FUSE connections with the keeper, so reads
/// of files nobody read yet wait instead of failing; the next daemon takes the same mounts over
/// and answers them, including a read the killed daemon had taken and was fetching, and a new
/// open of a file that is still open in passthrough mode (which must reuse its backing id).
#[tokio::test(flavor = "multi_thread")]
async fn killed_daemon_mounts_stay_alive_and_the_next_daemon_takes_them_over() {
    let registry = TestRegistry::plain();
    // One chunk: once read, it is a complete local file (passthrough on the next open).
    let a = random_bytes(1 << 20, 51);
    let b = random_bytes(2 << 20, 52);
    let slow = random_bytes(3 << 20, 53);
    let tar = build_tar(vec![
        E::File("a.bin", 0o644, a.clone()),
        E::File("b.bin", 0o644, b.clone()),
        E::File("slow.bin", 0o644, slow.clone()),
        E::File("note.txt", 0o644, b"written before the crash\n".to_vec()),
    ]);
    push_estargz(&registry, "lazy/takeover", &[&tar]).await;
    let proxy = CountingProxy::start(&registry.host());
    let mnt = tempfile::tempdir().unwrap();
    let mut lp = lazypull(&["--background-fill", "false"]);
    let image = format!("{}/lazy/takeover:v1", proxy.host());
    tokio::task::block_in_place(|| {
        lp.mount(&image, mnt.path());
        // Read whole, a.bin is complete and local: its next open is a passthrough one.
        assert!(std::fs::read(mnt.path().join("a.bin")).unwrap() == a);
        let mut held = std::fs::File::open(mnt.path().join("a.bin")).unwrap();
        let mut first = [0u8; 16];
        std::io::Read::read_exact(&mut held, &mut first).unwrap();
        assert_eq!(first, a[..16]);
        // The journal (24-byte records: tag, node, fh, backing id) shows the open handle went
        // passthrough; otherwise this test would not cover reusing its backing id.
        let journal_dir = lp.root.path().join("journal");
        let journal: Vec<u8> = std::fs::read_dir(&journal_dir)
            .unwrap()
            .flat_map(|e| std::fs::read(e.unwrap().path()).unwrap())
            .collect();
        assert!(
            journal
                .chunks_exact(24)
                .any(|r| r[0] == 1 && r[16..20] != [0, 0, 0, 0]),
            "no passthrough handle in the journal ({} bytes)",
            journal.len()
        );

        // A read the daemon takes, then waits on the (slowed) registry for.
        proxy.set_delay(Duration::from_secs(2));
        let p = mnt.path().join("slow.bin");
        let in_flight = std::thread::spawn(move || std::fs::read(p));
        std::thread::sleep(Duration::from_millis(500));
        assert!(!in_flight.is_finished(), "the read was not in flight");

        lp.kill_daemon();
        assert!(lp.keeper_pid().is_some(), "no FUSE keeper: {}", lp.log());
        proxy.set_delay(Duration::ZERO);

        // A file nobody read yet: the read waits for the next daemon instead of failing.
        let p = mnt.path().join("b.bin");
        let waiting = std::thread::spawn(move || std::fs::read(p));
        std::thread::sleep(Duration::from_secs(1));
        if waiting.is_finished() {
            panic!(
                "read with the daemon dead did not wait: {:?}",
                waiting.join().unwrap().map(|v| v.len())
            );
        }

        let restart = Instant::now();
        let out = lp.cmd(&["images"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let got = join_within(waiting, Duration::from_secs(30), "the waiting read");
        eprintln!(
            "takeover: the waiting read returned {:?} after the restart began",
            restart.elapsed()
        );
        assert!(got.unwrap() == b, "waiting read returned wrong data");
        let got = join_within(in_flight, Duration::from_secs(30), "the in-flight read");
        assert!(
            got.unwrap() == slow,
            "the read the killed daemon had taken returned wrong data"
        );
        // The open file reads on, and a new open of it (same inode, passthrough) works.
        let mut rest = Vec::new();
        std::io::Read::read_to_end(&mut held, &mut rest).unwrap();
        assert!(
            rest == a[16..],
            "held file read wrong data after the takeover"
        );
        assert!(std::fs::read(mnt.path().join("a.bin")).unwrap() == a);
        assert_eq!(
            std::fs::read(mnt.path().join("note.txt")).unwrap(),
            b"written before the crash\n"
        );
        let log = lp.log();
        assert!(log.contains("took over a live layer mount"), "{log}");
        drop(held);
        lp.umount(mnt.path());
        assert!(lp.shutdown(), "daemon did not stop:\n{}", lp.log());
        let start = Instant::now();
        while lp.keeper_pid().is_some() {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "the keeper outlived a clean shutdown"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // Its exit on QUIT must not look like a death that needs a replacement.
        let log = lp.log();
        assert!(!log.contains("keeper went away"), "{log}");
    });
    assert!(
        lp.mounts_under_root().is_empty(),
        "mounts left behind: {:?}",
        lp.mounts_under_root()
    );
}

/// A keeper killed while the daemon runs is replaced at once and handed every mount again, so
/// a daemon crash after that still leaves the mounts alive for the next daemon.
#[tokio::test(flavor = "multi_thread")]
async fn a_killed_keeper_is_replaced_and_holds_the_mounts_again() {
    let registry = TestRegistry::plain();
    let data = random_bytes(1 << 20, 61);
    let tar = build_tar(vec![E::File("unread.bin", 0o644, data.clone())]);
    push_estargz(&registry, "lazy/keeper-killed", &[&tar]).await;
    let mnt = tempfile::tempdir().unwrap();
    let mut lp = lazypull(&["--background-fill", "false"]);
    let image = format!("{}/lazy/keeper-killed:v1", registry.host());
    tokio::task::block_in_place(|| {
        lp.mount(&image, mnt.path());
        let first = lp.keeper_pid().expect("no FUSE keeper");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(first as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        let start = Instant::now();
        let second = loop {
            match lp.keeper_pid() {
                Some(pid) if pid != first => break pid,
                _ => {}
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "no new keeper 10 s after the first was killed:\n{}",
                lp.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        eprintln!(
            "keeper {first} killed; {second} replaced it after {:?}",
            start.elapsed()
        );
        // Give the replacement the moment it needs to receive the mounts.
        std::thread::sleep(Duration::from_millis(300));

        lp.kill_daemon();
        let p = mnt.path().join("unread.bin");
        let waiting = std::thread::spawn(move || std::fs::read(p));
        std::thread::sleep(Duration::from_secs(1));
        if waiting.is_finished() {
            panic!(
                "read with the daemon dead did not wait (the new keeper does not hold the \
                 mount): {:?}",
                waiting.join().unwrap().map(|v| v.len())
            );
        }
        let out = lp.cmd(&["images"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let got = join_within(waiting, Duration::from_secs(30), "the waiting read");
        assert!(got.unwrap() == data, "waiting read returned wrong data");
        let log = lp.log();
        assert!(log.contains("starting a new one"), "{log}");
        lp.umount(mnt.path());
        assert!(lp.shutdown(), "daemon did not stop:\n{}", lp.log());
    });
    assert!(
        lp.mounts_under_root().is_empty(),
        "mounts left behind: {:?}",
        lp.mounts_under_root()
    );
}

/// A chunk cache on a full disk costs refetches, never a read: verified chunks that cannot be
/// stored are served from memory, and the log says (once, not per chunk) why.
#[tokio::test(flavor = "multi_thread")]
async fn reads_succeed_when_the_cache_disk_is_full() {
    let registry = TestRegistry::plain();
    let big = random_bytes(6 << 20, 61);
    let small = b"small file\n".to_vec();
    let tar = build_tar(vec![
        E::Dir("data", 0o755),
        E::File("data/big.bin", 0o644, big.clone()),
        E::File("data/small.txt", 0o644, small.clone()),
    ]);
    push_estargz(&registry, "lazy/fullcache", &[&tar]).await;
    let mut lp = lazypull(&["--background-fill", "false"]);
    // A 1 MiB cache filesystem, filled up before the daemon starts. It lives outside the root
    // (the daemon detaches whatever is mounted under its root at start) and the root's cache
    // directory points to it.
    struct Tmpfs(tempfile::TempDir);
    impl Drop for Tmpfs {
        fn drop(&mut self) {
            let _ = nix::mount::umount2(self.0.path(), nix::mount::MntFlags::MNT_DETACH);
        }
    }
    let small_fs = Tmpfs(tempfile::tempdir().unwrap());
    let cache = small_fs.0.path().to_path_buf();
    nix::mount::mount(
        Some("tmpfs"),
        &cache,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=1m"),
    )
    .expect("mounting a small tmpfs for the cache");
    std::os::unix::fs::symlink(&cache, lp.root.path().join("cache")).unwrap();
    let filler = std::fs::write(cache.join("filler"), vec![0u8; 2 << 20]);
    assert!(filler.is_err(), "the 1 MiB cache filesystem took 2 MiB");
    let mnt = tempfile::tempdir().unwrap();
    let image = format!("{}/lazy/fullcache:v1", registry.host());
    tokio::task::block_in_place(|| {
        lp.mount(&image, mnt.path());
        for _ in 0..2 {
            let got = std::fs::read(mnt.path().join("data/big.bin"))
                .unwrap_or_else(|e| panic!("read with a full cache: {e}\n{}", lp.log()));
            assert_eq!(sha256_hex(&got), sha256_hex(&big));
            assert_eq!(
                std::fs::read(mnt.path().join("data/small.txt")).unwrap(),
                small
            );
        }
        let log = lp.log();
        let warnings = log.matches("a verified chunk could not be cached").count();
        assert!(
            (1..=3).contains(&warnings),
            "{warnings} cache warnings (expected one per 10 s):\n{log}"
        );
        lp.umount(mnt.path());
    });
}

/// Asserts that `path` under `root` holds exactly `want`.
fn assert_file(root: &Path, path: &str, want: &[u8]) {
    let got = std::fs::read(root.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
    assert!(
        got == want,
        "{path}: {} bytes differ from the {} expected",
        got.len(),
        want.len()
    );
}

/// Waits until the daemon's log says `what`.
async fn wait_log(lp: &lazypull_tests::Lazypull, what: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !lp.log().contains(what) {
        assert!(
            Instant::now() < deadline,
            "never logged {what:?}:\n{}",
            lp.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `path` exists and parses as JSON.
fn wait_json(path: &Path, timeout: Duration) -> serde_json::Value {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = std::fs::read(path)
            .ok()
            .and_then(|d| serde_json::from_slice(&d).ok())
        {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_first_start_is_learned_and_the_next_cold_start_prefetches_it() {
    let mut registry = TestRegistry::plain();
    let (first, second, never) = (
        random_bytes(3 << 20, 21),
        random_bytes(1 << 20, 22),
        random_bytes(24 << 20, 23),
    );
    let tar = build_tar(vec![
        E::Dir("data", 0o755),
        E::File("data/never.bin", 0o644, never.clone()),
        E::File("data/first.bin", 0o644, first.clone()),
        E::File("data/second.bin", 0o644, second.clone()),
    ]);
    let (pushed, blobs) = push_estargz(&registry, "lazy/learned", &[&tar]).await;
    let layer = lazypull_tests::Digest::sha256_of(&blobs[0]).to_string();
    let proxy = CountingProxy::start(&registry.host());
    let image = format!("{}/lazy/learned:v1", proxy.host());
    let mut lp = lazypull(&["--background-fill", "false", "--fetch-timeout", "3"]);
    let profile_path = lp
        .root
        .path()
        .join("profiles")
        .join(format!("{}.json", pushed.manifest_digest.hex()));

    // The first start: read two files, in this order.
    let mnt = tempfile::tempdir().unwrap();
    tokio::task::block_in_place(|| {
        lp.mount(&image, mnt.path());
        assert_file(mnt.path(), "data/second.bin", &second);
        assert_file(mnt.path(), "data/first.bin", &first);
    });
    let profile = tokio::task::block_in_place(|| wait_json(&profile_path, Duration::from_secs(20)));
    let files: Vec<(&str, &str)> = profile["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| (f["layer"].as_str().unwrap(), f["path"].as_str().unwrap()))
        .collect();
    assert_eq!(
        files,
        [
            (layer.as_str(), "data/second.bin"),
            (layer.as_str(), "data/first.bin")
        ],
        "{profile}"
    );
    assert_eq!(profile["image"], pushed.manifest_digest.to_string());

    // The node shows it, and publishes it next to the image; a fresh node prefetches it
    // without a read.
    let shown = tokio::task::block_in_place(|| lp.ok(&["profile", "show", &image]));
    assert_eq!(
        shown,
        format!("{layer} /data/second.bin\n{layer} /data/first.bin\n")
    );
    tokio::task::block_in_place(|| lp.ok(&["profile", "push", &image]));
    let mut fresh = lazypull(&["--background-fill", "false", "--fetch-timeout", "3"]);
    let fresh_mnt = tempfile::tempdir().unwrap();
    let before = proxy.total_body_bytes();
    tokio::task::block_in_place(|| fresh.mount(&image, fresh_mnt.path()));
    let wanted = (first.len() + second.len()) as u64;
    wait_log(&fresh, "profile prefetch done", Duration::from_secs(30)).await;
    let fetched = proxy.total_body_bytes() - before;
    assert!(
        fetched >= wanted && fetched < wanted + (4 << 20),
        "the fresh node fetched {fetched} bytes for {wanted} bytes of profiled files"
    );
    assert!(
        fresh
            .log()
            .contains("found a prefetch profile published next to the image"),
        "{}",
        fresh.log()
    );

    // A profile only ever names files: entries the image does not have, in a layer it does not
    // have, or with `..` (names are looked up in the layer's own tree, never a host path), are
    // skipped.
    let mut edited = profile.clone();
    let bogus = [
        serde_json::json!({"layer": layer, "path": "../../etc/passwd"}),
        serde_json::json!({"layer": layer, "path": "data/missing.bin"}),
        serde_json::json!({"layer": format!("sha256:{}", "0".repeat(64)), "path": "data/never.bin"}),
    ];
    let list = edited["files"].as_array_mut().unwrap();
    for (i, b) in bogus.into_iter().enumerate() {
        list.insert(i, b);
    }
    std::fs::write(&profile_path, serde_json::to_vec(&edited).unwrap()).unwrap();

    // A cold start elsewhere in time: image removed, cache gone, new daemon, same root.
    tokio::task::block_in_place(|| {
        lp.umount(mnt.path());
        lp.ok(&["rmi", &image]);
        assert!(lp.shutdown(), "daemon did not stop:\n{}", lp.log());
    });
    std::fs::remove_dir_all(lp.root.path().join("cache")).unwrap();
    let before = proxy.total_body_bytes();
    let mnt = tempfile::tempdir().unwrap();
    tokio::task::block_in_place(|| lp.mount(&image, mnt.path()));
    // Nothing reads, yet the two files arrive.
    wait_log(&lp, "profile prefetch done", Duration::from_secs(30)).await;
    let fetched = proxy.total_body_bytes() - before;
    assert!(
        fetched >= wanted && fetched < wanted + (4 << 20),
        "the prefetch fetched {fetched} bytes for {wanted} bytes of profiled files"
    );
    // With the registry gone, the profiled files read back exactly; the others cannot.
    registry.kill();
    drop(proxy);
    tokio::task::block_in_place(|| {
        assert_file(mnt.path(), "data/first.bin", &first);
        assert_file(mnt.path(), "data/second.bin", &second);
        let err = std::fs::read(mnt.path().join("data/never.bin")).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc_eio()), "{err}");
        assert_file(fresh_mnt.path(), "data/first.bin", &first);
        assert_file(fresh_mnt.path(), "data/second.bin", &second);
    });
    // Without the terminal colours of the log's fields.
    let log: String = lp
        .log()
        .split('\x1b')
        .map(|part| match part.strip_prefix('[') {
            Some(rest) => rest.split_once('m').map_or(rest, |(_, text)| text),
            None => part,
        })
        .collect();
    assert!(
        log.contains("files=2 of=5"),
        "the profile's bad entries were not skipped:\n{log}"
    );
    assert!(!log.contains("panicked"), "{log}");
}
