//! Taking over a live FUSE connection from a daemon that died, so its mounts survive the crash.
//!
//! A FUSE mount lives as long as some process holds its `/dev/fuse` descriptor. When the daemon
//! keeps a duplicate of every layer's descriptor in a separate keeper process, a daemon killed
//! with SIGKILL leaves the connections alive: the kernel queues the requests of running
//! containers instead of failing them, and the next daemon picks the descriptors up and serves
//! the same superblocks again. Overlays stacked on the layers, open files and memory maps in
//! running containers never notice more than a pause.
//!
//! Three things make the new daemon a correct successor, and this module holds them:
//!
//! - **The handshake.** The kernel sent `FUSE_INIT` once, to the old daemon; fuser's session
//!   insists on one. [`take_over_session`] answers fuser's handshake with a synthetic
//!   `FUSE_INIT` that repeats what the kernel offered the first time ([`KernelOffer`], which the
//!   first daemon stored next to the descriptor), over a socket pair, and then moves the real
//!   descriptor into the session's slot. The filesystem therefore makes the same decisions
//!   (passthrough on or off) as the first time; the kernel never sees the reply.
//! - **Requests the old daemon had read but not answered** (a read waiting on the network when
//!   it was killed) would otherwise wait forever. [`resend_unanswered`] asks the kernel (>= 6.9,
//!   `FUSE_NOTIFY_RESEND`) to queue them again for the new reader.
//! - **The files the kernel still has open** ([`OpenJournal`]). A file opened with passthrough
//!   pins its inode to one backing file; a later open of that inode must name the very same
//!   backing id or the kernel fails it with EIO. The journal records every open handle (and its
//!   backing id) in a small file, so the successor knows them.
//!
//! Inode numbers need no saving: they are positions in the layer model, which is rebuilt
//! identically from the same TOC.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;

use fuser::{Config, Filesystem, Session, SessionACL};

use crate::toc::NodeId;

/// What the kernel offered in its one `FUSE_INIT` for a connection: enough to answer a
/// successor's handshake the same way. Stored as text next to the kept descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelOffer {
    /// The kernel's FUSE protocol minor version (major is 7).
    pub minor: u32,
    /// The capability bits the kernel offered (`flags | flags2 << 32`).
    pub capabilities: u64,
}

impl KernelOffer {
    /// `7.<minor>:<capabilities in hex>`.
    pub fn encode(&self) -> String {
        format!("7.{}:{:x}", self.minor, self.capabilities)
    }

    /// The inverse of [`KernelOffer::encode`]; `None` for anything else.
    pub fn decode(s: &str) -> Option<KernelOffer> {
        let (version, caps) = s.trim().split_once(':')?;
        let minor = version.strip_prefix("7.")?.parse().ok()?;
        let capabilities = u64::from_str_radix(caps, 16).ok()?;
        Some(KernelOffer {
            minor,
            capabilities,
        })
    }
}

const FUSE_INIT: u32 = 26;
/// `FUSE_INIT_EXT`: the high 32 capability bits travel in `flags2`.
const FUSE_INIT_EXT: u64 = 1 << 30;
/// `fuse_in_header` (40 bytes) + `fuse_init_in` (64 bytes).
const INIT_LEN: usize = 104;
/// Readahead the synthetic offer names; the kernel keeps the value it negotiated first.
const OFFER_READAHEAD: u32 = 128 << 10;
/// `FUSE_NOTIFY_RESEND` (kernel 6.9).
const FUSE_NOTIFY_RESEND: i32 = 7;

/// The bytes of a `FUSE_INIT` request repeating `offer`.
fn init_request(offer: KernelOffer) -> [u8; INIT_LEN] {
    let mut b = [0u8; INIT_LEN];
    let caps = offer.capabilities | FUSE_INIT_EXT;
    b[0..4].copy_from_slice(&(INIT_LEN as u32).to_le_bytes());
    b[4..8].copy_from_slice(&FUSE_INIT.to_le_bytes());
    b[8..16].copy_from_slice(&1u64.to_le_bytes()); // unique
                                                   // nodeid, uid, gid, pid, padding: zero.
    b[40..44].copy_from_slice(&7u32.to_le_bytes());
    b[44..48].copy_from_slice(&offer.minor.to_le_bytes());
    b[48..52].copy_from_slice(&OFFER_READAHEAD.to_le_bytes());
    b[52..56].copy_from_slice(&(caps as u32).to_le_bytes());
    b[56..60].copy_from_slice(&((caps >> 32) as u32).to_le_bytes());
    b
}

/// A fuser session serving `device`, a `/dev/fuse` connection whose `FUSE_INIT` an earlier
/// process already answered. The session is handed a socket for its handshake, which gets
/// the synthetic `FUSE_INIT`; once the handshake is done the socket's descriptor number is
/// replaced by the connection (dup3), so every later read, reply and passthrough ioctl of
/// the session goes to the kernel.
#[allow(unsafe_code)]
pub fn take_over_session<FS: Filesystem>(
    filesystem: FS,
    device: OwnedFd,
    offer: KernelOffer,
    acl: SessionACL,
    config: Config,
) -> io::Result<Session<FS>> {
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(io::Error::from)?;
    let mut ours = File::from(ours);
    ours.write_all(&init_request(offer))?;
    let session = Session::from_fd(filesystem, theirs, acl, config)?;
    let slot = session.as_fd().as_raw_fd();
    // SAFETY: `slot` is the descriptor the session owns (the socket end it was given) and stays
    // open while `session` lives; dup3 atomically makes that number refer to the FUSE
    // connection instead and closes the socket end. `device` is a valid descriptor we own.
    let r = unsafe { libc::dup3(device.as_raw_fd(), slot, libc::O_CLOEXEC) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    drop(device);
    drop(ours);
    Ok(session)
}

/// Asks the kernel to queue again every request that a previous reader of `device` took but
/// never answered (it was killed while waiting on the network, say). Kernels before 6.9 refuse
/// (EINVAL): such requests then stay unanswered until the mount goes.
pub fn resend_unanswered(device: BorrowedFd<'_>) -> io::Result<()> {
    // fuse_out_header: len, error (the notify code), unique 0.
    let mut hdr = [0u8; 16];
    hdr[0..4].copy_from_slice(&16u32.to_le_bytes());
    hdr[4..8].copy_from_slice(&FUSE_NOTIFY_RESEND.to_le_bytes());
    nix::unistd::write(device, &hdr)
        .map(|_| ())
        .map_err(io::Error::from)
}

/// One open file handle as the kernel holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JournalHandle {
    /// The inode's node.
    pub node: NodeId,
    /// The passthrough backing id it was opened with, `None` when opened in cached mode.
    pub backing: Option<u32>,
}

const REC: usize = 24;
const TAG_OPEN: u8 = 1;
const TAG_RELEASE: u8 = 2;

/// The open handles of one mount, in a file a successor daemon can read (records of 24 bytes:
/// tag, node, fh, backing id; appended, and emptied whenever no handle is open). Writes go to
/// the page cache, which outlives a killed process. A write error turns the journal off (with
/// a warning) rather than failing opens: the cost is only that a successor may refuse to take
/// the mount over.
#[derive(Debug)]
pub struct OpenJournal {
    file: Option<File>,
}

impl OpenJournal {
    /// Opens (creating) the journal at `path` and returns the handles it records as open,
    /// leaving the file rewritten to hold exactly those.
    pub fn open(path: &Path) -> io::Result<(OpenJournal, BTreeMap<u64, JournalHandle>)> {
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
        let open = replay(&bytes);
        // Rewritten beside and renamed over: a kill halfway leaves the old records, never
        // none (the next daemon needs the backing ids).
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".new");
        let tmp = std::path::PathBuf::from(tmp);
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .truncate(false)
            .open(&tmp)?;
        file.set_len(0)?;
        let mut journal = OpenJournal { file: Some(file) };
        for (fh, h) in &open {
            journal.opened(*fh, h.node, h.backing);
        }
        if journal.file.is_none() {
            return Err(io::Error::other("cannot rewrite the open-file journal"));
        }
        std::fs::rename(&tmp, path)?;
        Ok((journal, open))
    }

    /// A journal that records nothing.
    pub fn disabled() -> OpenJournal {
        OpenJournal { file: None }
    }

    fn append(&mut self, rec: [u8; REC]) {
        if let Some(f) = &mut self.file {
            if let Err(e) = f.write_all(&rec) {
                tracing::warn!(error = %e, "open-file journal disabled; a restarted daemon cannot take this mount over");
                self.file = None;
            }
        }
    }

    /// Records an open handle.
    pub fn opened(&mut self, fh: u64, node: NodeId, backing: Option<u32>) {
        self.append(record(TAG_OPEN, fh, node, backing.unwrap_or(0)));
    }

    /// Records a released handle; `none_left` empties the file.
    pub fn released(&mut self, fh: u64, none_left: bool) {
        if none_left {
            if let Some(f) = &self.file {
                if f.set_len(0).is_ok() {
                    return;
                }
            }
        }
        self.append(record(TAG_RELEASE, fh, 0, 0));
    }
}

fn record(tag: u8, fh: u64, node: NodeId, backing: u32) -> [u8; REC] {
    let mut r = [0u8; REC];
    r[0] = tag;
    r[4..8].copy_from_slice(&node.to_le_bytes());
    r[8..16].copy_from_slice(&fh.to_le_bytes());
    r[16..20].copy_from_slice(&backing.to_le_bytes());
    r
}

/// The handles a journal's records leave open. A torn last record and unknown tags are
/// ignored: the journal is advisory and never trusted to be well formed.
pub fn replay(bytes: &[u8]) -> BTreeMap<u64, JournalHandle> {
    let mut open = BTreeMap::new();
    for r in bytes.chunks_exact(REC) {
        let word = |a: usize| u32::from_le_bytes([r[a], r[a + 1], r[a + 2], r[a + 3]]);
        let fh = u64::from_le_bytes(r[8..16].try_into().unwrap_or([0; 8]));
        match r[0] {
            TAG_OPEN => {
                let backing = word(16);
                open.insert(
                    fh,
                    JournalHandle {
                        node: word(4),
                        backing: (backing != 0).then_some(backing),
                    },
                );
            }
            TAG_RELEASE => {
                open.remove(&fh);
            }
            _ => {}
        }
    }
    open
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn offer_round_trips_and_rejects_garbage() {
        let o = KernelOffer {
            minor: 45,
            capabilities: 0x2_0000_1234,
        };
        assert_eq!(KernelOffer::decode(&o.encode()), Some(o));
        for bad in ["", "7.x:1", "8.1:1", "7.1", "7.1:zz"] {
            assert_eq!(KernelOffer::decode(bad), None, "{bad}");
        }
    }

    #[test]
    fn init_request_layout() {
        let b = init_request(KernelOffer {
            minor: 41,
            capabilities: 1 << 37 | 1,
        });
        assert_eq!(u32::from_le_bytes(b[0..4].try_into().unwrap()), 104);
        assert_eq!(u32::from_le_bytes(b[4..8].try_into().unwrap()), FUSE_INIT);
        assert_eq!(u32::from_le_bytes(b[40..44].try_into().unwrap()), 7);
        assert_eq!(u32::from_le_bytes(b[44..48].try_into().unwrap()), 41);
        let flags = u32::from_le_bytes(b[52..56].try_into().unwrap());
        let flags2 = u32::from_le_bytes(b[56..60].try_into().unwrap());
        assert_eq!(
            u64::from(flags) | u64::from(flags2) << 32,
            1 << 37 | 1 << 30 | 1
        );
    }

    #[test]
    fn journal_survives_reopen_and_empties_when_nothing_is_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let (mut j, open) = OpenJournal::open(&path).unwrap();
        assert!(open.is_empty());
        j.opened(1, 10, Some(3));
        j.opened(2, 11, None);
        j.released(1, false);
        drop(j);
        let (mut j, open) = OpenJournal::open(&path).unwrap();
        assert_eq!(
            open.into_iter().collect::<Vec<_>>(),
            vec![(
                2,
                JournalHandle {
                    node: 11,
                    backing: None
                }
            )]
        );
        // Rewritten with exactly the open handle.
        assert_eq!(std::fs::metadata(&path).unwrap().len(), REC as u64);
        j.released(2, true);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
    }

    proptest! {
        /// Replay equals a model of the same opens and releases, and never panics on noise.
        #[test]
        fn replay_matches_model(ops in proptest::collection::vec((any::<bool>(), 0u64..8, 0u32..50, 0u32..4), 0..60), noise in proptest::collection::vec(any::<u8>(), 0..100)) {
            let mut bytes = Vec::new();
            let mut model = BTreeMap::new();
            for (open, fh, node, backing) in ops {
                if open {
                    bytes.extend_from_slice(&record(TAG_OPEN, fh, node, backing));
                    model.insert(fh, JournalHandle { node, backing: (backing != 0).then_some(backing) });
                } else {
                    bytes.extend_from_slice(&record(TAG_RELEASE, fh, 0, 0));
                    model.remove(&fh);
                }
            }
            prop_assert_eq!(replay(&bytes), model);
            let _ = replay(&noise);
        }
    }
}
