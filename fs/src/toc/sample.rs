//! The sample layer every format's writer round-trips: every entry type, ownership, a setuid
//! file, xattrs, hard and symbolic links, devices, a fifo, a whiteout, an opaque directory and
//! a long name, with the assertions any format's reader must satisfy on it. A new format's
//! writer test gets them all by building its blob from [`input_tar`] and calling
//! [`assert_tree`].

use std::collections::BTreeMap;

use tar::EntryType;

use super::{Kind, Layer, NodeId};

/// The modification time of every sample entry.
pub const MTIME: u64 = 1_600_000_000;

/// A GNU header of `kind`, owned by root, dated [`MTIME`].
pub fn header(kind: EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(MTIME);
    h
}

/// Half random, half runs (so it compresses somewhat), different for each `seed`.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = 0x2545_f491_4f6c_dd1du64 ^ seed;
    (0..len)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if (i / 4096) % 2 == 0 {
                x as u8
            } else {
                b'a'
            }
        })
        .collect()
}

/// A path longer than a ustar header holds.
pub fn long_path() -> String {
    format!("usr/share/{}/file.txt", "a".repeat(120))
}

/// The sample tar, with `files` (path, mode, content) added as regular files; one of them must
/// be `usr/bin/big` (mode 0o4755), the target of the sample's links. Returns the tar and every
/// regular file's content by path.
pub fn input_tar(files: Vec<(&str, u32, Vec<u8>)>) -> (Vec<u8>, BTreeMap<String, Vec<u8>>) {
    let mut contents = BTreeMap::new();
    let mut b = tar::Builder::new(Vec::new());
    for dir in ["etc/", "usr/", "usr/bin/", "dev/", "var/", "opt/"] {
        let mut h = header(EntryType::Directory, 0o755, 0);
        b.append_data(&mut h, dir, &[][..]).unwrap();
    }
    let mut add = |b: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32, data: Vec<u8>| {
        let mut h = header(EntryType::Regular, mode, data.len() as u64);
        b.append_data(&mut h, path, &data[..]).unwrap();
        contents.insert(path.to_string(), data);
    };
    let mut h = header(EntryType::Regular, 0o600, 0);
    h.set_uid(1000);
    h.set_gid(1001);
    b.append_data(&mut h, "etc/empty", &[][..]).unwrap();
    b.append_pax_extensions([
        ("SCHILY.xattr.user.foo", &b"bar"[..]),
        (
            "SCHILY.xattr.security.capability",
            &[1, 0, 0, 2, 0, 0x20, 0, 0][..],
        ),
    ])
    .unwrap();
    add(&mut b, "etc/one", 0o644, b"1".to_vec());
    for (path, mode, data) in files {
        add(&mut b, path, mode, data);
    }
    add(&mut b, &long_path(), 0o644, b"long".to_vec());
    contents.insert("etc/empty".into(), Vec::new());
    let mut h = header(EntryType::Symlink, 0o777, 0);
    b.append_link(&mut h, "usr/bin/link", "big").unwrap();
    let mut h = header(EntryType::Link, 0o4755, 0);
    b.append_link(&mut h, "usr/bin/hard", "usr/bin/big")
        .unwrap();
    let mut h = header(EntryType::Char, 0o666, 0);
    h.set_device_major(1).unwrap();
    h.set_device_minor(3).unwrap();
    b.append_data(&mut h, "dev/null", &[][..]).unwrap();
    let mut h = header(EntryType::Block, 0o660, 0);
    h.set_device_major(8).unwrap();
    h.set_device_minor(1).unwrap();
    b.append_data(&mut h, "dev/sda1", &[][..]).unwrap();
    let mut h = header(EntryType::Fifo, 0o644, 0);
    b.append_data(&mut h, "dev/fifo", &[][..]).unwrap();
    let mut h = header(EntryType::Regular, 0o644, 0);
    b.append_data(&mut h, "var/.wh.foo", &[][..]).unwrap();
    let mut h = header(EntryType::Regular, 0o644, 0);
    b.append_data(&mut h, "opt/.wh..wh..opq", &[][..]).unwrap();
    (b.into_inner().unwrap(), contents)
}

/// Asserts that `l` is the sample layer: every file of `contents` with its size, time and
/// content (read through `read`, which must verify chunk digests) and digest, and every other
/// entry of [`input_tar`] with its type, attributes, links and xattrs.
pub fn assert_tree(
    l: &Layer,
    contents: &BTreeMap<String, Vec<u8>>,
    read: &dyn Fn(NodeId) -> Vec<u8>,
) {
    for (path, content) in contents {
        let id = l.resolve(path).unwrap_or_else(|| panic!("{path} missing"));
        let n = l.node(id).unwrap();
        assert_eq!(n.kind, Kind::File, "{path}");
        assert_eq!(n.size, content.len() as u64, "{path}");
        assert_eq!(n.mtime, MTIME as i64, "{path}");
        assert_eq!(read(id), *content, "{path}");
        if !content.is_empty() {
            let digest = lazypull_fetcher::Digest::sha256_of(content);
            assert_eq!(l.file_digest(id), Some(&digest), "{path}");
        }
    }
    assert!(l.chunks(l.resolve("etc/empty").unwrap()).is_empty());
    let empty = l.node(l.resolve("etc/empty").unwrap()).unwrap();
    assert_eq!((empty.mode, empty.uid, empty.gid), (0o600, 1000, 1001));

    let big = l.resolve("usr/bin/big").unwrap();
    assert_eq!(l.node(big).unwrap().mode, 0o4755);
    assert_eq!(l.resolve("usr/bin/hard"), Some(big));
    assert_eq!(l.node(big).unwrap().nlink, 2);
    let link = l.resolve("usr/bin/link").unwrap();
    assert_eq!(l.node(link).unwrap().kind, Kind::Symlink);
    assert_eq!(l.link_target(link), Some(&b"big"[..]));

    let null = l.node(l.resolve("dev/null").unwrap()).unwrap();
    assert_eq!(
        (null.kind, null.dev_major, null.dev_minor, null.mode),
        (Kind::CharDevice, 1, 3, 0o666)
    );
    let sda = l.node(l.resolve("dev/sda1").unwrap()).unwrap();
    assert_eq!(
        (sda.kind, sda.dev_major, sda.dev_minor),
        (Kind::BlockDevice, 8, 1)
    );
    assert_eq!(
        l.node(l.resolve("dev/fifo").unwrap()).unwrap().kind,
        Kind::Fifo
    );

    // Whiteouts as overlayfs sees them.
    let wh = l.node(l.resolve("var/foo").unwrap()).unwrap();
    assert_eq!(
        (wh.kind, wh.dev_major, wh.dev_minor),
        (Kind::CharDevice, 0, 0)
    );
    assert!(l.node(l.resolve("opt").unwrap()).unwrap().opaque);

    let one = l.resolve("etc/one").unwrap();
    let mut x: Vec<(Vec<u8>, Vec<u8>)> = l
        .xattrs(one)
        .map(|(k, v)| (k.to_vec(), v.to_vec()))
        .collect();
    x.sort();
    assert_eq!(
        x,
        vec![
            (
                b"security.capability".to_vec(),
                vec![1, 0, 0, 2, 0, 0x20, 0, 0]
            ),
            (b"user.foo".to_vec(), b"bar".to_vec()),
        ]
    );
}
