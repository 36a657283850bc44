//! The FUSE keeper: a small process that holds a duplicate of every layer mount's `/dev/fuse`
//! descriptor, so a daemon killed with SIGKILL (or crashed) does not take its mounts down with
//! it. The kernel keeps a FUSE connection alive while any process holds its
//! descriptor; containers' reads of files not read before then wait instead of failing with
//! "Transport endpoint is not connected", and the next daemon takes the same connections over
//! ([`lazypull_fs::fuse::LayerMount::take_over`]) and answers them.
//!
//! The daemon starts the keeper (`lazypull fuse-keeper`, its own process group, so it outlives
//! the daemon) or connects to the one a previous daemon started, at `<root>/fuse-keeper.sock`.
//! Protocol: one `SOCK_SEQPACKET` message per command, text lines, descriptors as
//! `SCM_RIGHTS`:
//!
//! - `PUT\n<key>\n<meta>` + descriptor: hold it under `key` (the mount point; `meta` is the
//!   kernel's FUSE_INIT offer), replacing an earlier one;
//! - `DROP\n<key>`: close it (the layer was unmounted);
//! - `LIST`: answered by one `FD\n<key>\n<meta>` + descriptor message per held entry, then
//!   `END`;
//! - `QUIT`: close everything and exit (the daemon stopped cleanly).
//!
//! A connection whose mount went away (the kernel aborted it) is dropped by itself. Without any
//! daemon connected for `grace`, the keeper closes everything and exits: a daemon that never
//! comes back must not leave containers waiting forever (their reads then fail with ENOTCONN).

use std::collections::BTreeMap;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use lazypull_fetcher::Reference;
use lazypull_fs::takeover::KernelOffer;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{
    accept, bind, connect, listen, recvmsg, sendmsg, setsockopt, socket, sockopt, AddressFamily,
    Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, UnixAddr,
};
use nix::sys::time::TimeVal;
use parking_lot::Mutex;

use super::store::LayerRecord;

/// Largest message: a key and a meta line (the layer's annotations can be long).
const MAX_MSG: usize = 64 << 10;
/// Longest a send or receive on a keeper socket may block: a stopped or frozen peer must not
/// hang the daemon (or the keeper).
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a keeper waits for its first daemon.
const FIRST_CONTACT: Duration = Duration::from_secs(30);

/// The keeper socket of a root.
pub fn socket_path(root: &Path) -> PathBuf {
    root.join("fuse-keeper.sock")
}

fn seqpacket() -> nix::Result<OwnedFd> {
    socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
}

fn send(sock: BorrowedFd<'_>, msg: &str, fd: Option<BorrowedFd<'_>>) -> nix::Result<()> {
    let raw: Vec<RawFd> = fd.iter().map(|f| f.as_raw_fd()).collect();
    let cmsg: Vec<ControlMessage> = if raw.is_empty() {
        Vec::new()
    } else {
        vec![ControlMessage::ScmRights(&raw)]
    };
    sendmsg::<()>(
        sock.as_raw_fd(),
        &[IoSlice::new(msg.as_bytes())],
        &cmsg,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map(|_| ())
}

/// One message and the descriptors that came with it; `None` at end of stream.
fn recv(sock: BorrowedFd<'_>) -> nix::Result<Option<(String, Vec<OwnedFd>)>> {
    let mut buf = vec![0u8; MAX_MSG];
    let mut space = nix::cmsg_space!([RawFd; 4]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            fds.extend(raw.into_iter().map(owned));
        }
    }
    if msg.flags.contains(MsgFlags::MSG_TRUNC) {
        return Err(nix::errno::Errno::EMSGSIZE);
    }
    let n = msg.bytes;
    if n == 0 && fds.is_empty() {
        return Ok(None);
    }
    Ok(Some((String::from_utf8_lossy(&buf[..n]).into_owned(), fds)))
}

/// Takes ownership of a descriptor received with `SCM_RIGHTS`.
#[allow(unsafe_code)]
fn owned(fd: RawFd) -> OwnedFd {
    use std::os::fd::FromRawFd;
    // SAFETY: `fd` was installed in this process by recvmsg for this message alone; no other
    // value owns it.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Runs the keeper on `socket` until told to quit, or until no daemon has been connected for
/// `grace`.
pub fn run(socket: &Path, grace: Duration) -> Result<()> {
    let listener = seqpacket().context("creating the keeper socket")?;
    let addr = UnixAddr::new(socket)
        .with_context(|| format!("keeper socket path {}", socket.display()))?;
    let _ = std::fs::remove_file(socket);
    bind(listener.as_raw_fd(), &addr).with_context(|| format!("binding {}", socket.display()))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))?;
    listen(&listener, Backlog::new(8)?)?;
    tracing::info!(socket = %socket.display(), "FUSE keeper ready");

    let mut held: BTreeMap<String, (String, OwnedFd)> = BTreeMap::new();
    let mut clients: Vec<OwnedFd> = Vec::new();
    let started = Instant::now();
    let mut ever_connected = false;
    let mut alone_since = Instant::now();
    loop {
        if clients.is_empty() {
            let alone = alone_since.elapsed();
            if !ever_connected && held.is_empty() && started.elapsed() > FIRST_CONTACT {
                break;
            }
            if ever_connected && held.is_empty() {
                break;
            }
            if !held.is_empty() && alone > grace {
                tracing::warn!(
                    mounts = held.len(),
                    "no lazypull daemon came back within {}s; letting go of its FUSE mounts \
                     (their pending reads fail)",
                    grace.as_secs()
                );
                break;
            }
        }
        let keys: Vec<String> = held.keys().cloned().collect();
        let (ready, gone) = {
            let mut fds = vec![PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
            fds.extend(
                clients
                    .iter()
                    .map(|c| PollFd::new(c.as_fd(), PollFlags::POLLIN)),
            );
            // No POLLIN on the FUSE descriptors: they are readable whenever requests wait for
            // the daemon. POLLERR (connection aborted: the mount is gone) is always reported.
            fds.extend(
                held.values()
                    .map(|(_, fd)| PollFd::new(fd.as_fd(), PollFlags::empty())),
            );
            match poll(&mut fds, PollTimeout::from(1000u16)) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e).context("poll"),
            }
            let is =
                |f: &PollFd, flags: PollFlags| f.revents().is_some_and(|r| r.intersects(flags));
            let ready: Vec<bool> = fds
                .iter()
                .map(|f| {
                    is(
                        f,
                        PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR,
                    )
                })
                .collect();
            let gone: Vec<String> = fds[1 + clients.len()..]
                .iter()
                .zip(&keys)
                .filter(|(f, _)| {
                    is(
                        f,
                        PollFlags::POLLERR | PollFlags::POLLHUP | PollFlags::POLLNVAL,
                    )
                })
                .map(|(_, k)| k.clone())
                .collect();
            (ready, gone)
        };
        for k in gone {
            tracing::debug!(mount = %k, "FUSE connection ended; dropped");
            held.remove(&k);
        }
        if ready[0] {
            match accept(listener.as_raw_fd()) {
                Ok(fd) => {
                    let client = owned(fd);
                    if let Err(e) = set_timeouts(&client) {
                        tracing::warn!(error = %e, "keeper: socket timeouts");
                    }
                    clients.push(client);
                    ever_connected = true;
                }
                Err(e) => tracing::warn!(error = %e, "keeper accept"),
            }
        }
        let mut closed = Vec::new();
        let mut quit = false;
        for (i, c) in clients.iter().enumerate() {
            if !ready.get(1 + i).copied().unwrap_or(false) {
                continue;
            }
            match recv(c.as_fd()) {
                Ok(Some((msg, fds))) => {
                    if serve_one(c.as_fd(), &msg, fds, &mut held) {
                        quit = true;
                    }
                }
                Ok(None) | Err(_) => closed.push(i),
            }
        }
        if quit {
            tracing::info!("FUSE keeper stopping (daemon stopped)");
            return Ok(());
        }
        for i in closed.into_iter().rev() {
            clients.remove(i);
            if clients.is_empty() {
                alone_since = Instant::now();
                if !held.is_empty() {
                    tracing::warn!(
                        mounts = held.len(),
                        "lazypull daemon disconnected; holding its FUSE mounts for the next one"
                    );
                }
            }
        }
    }
    let _ = std::fs::remove_file(socket);
    Ok(())
}

/// Handles one command; true for QUIT.
fn serve_one(
    client: BorrowedFd<'_>,
    msg: &str,
    mut fds: Vec<OwnedFd>,
    held: &mut BTreeMap<String, (String, OwnedFd)>,
) -> bool {
    let mut lines = msg.splitn(3, '\n');
    match (lines.next(), lines.next(), lines.next()) {
        (Some("PUT"), Some(key), meta) if fds.len() == 1 => {
            let fd = fds.remove(0);
            held.insert(key.to_string(), (meta.unwrap_or("").to_string(), fd));
        }
        (Some("DROP"), Some(key), _) => {
            held.remove(key);
        }
        (Some("LIST"), _, _) => {
            for (key, (meta, fd)) in held.iter() {
                if send(client, &format!("FD\n{key}\n{meta}"), Some(fd.as_fd())).is_err() {
                    return false;
                }
            }
            let _ = send(client, "END", None);
        }
        (Some("QUIT"), _, _) => return true,
        _ => tracing::warn!(message = %msg.lines().next().unwrap_or(""), "keeper: unknown message"),
    }
    false
}

/// A live mount a previous daemon left with the keeper, ready to be taken over.
pub struct Inherited {
    /// The connection.
    pub device: OwnedFd,
    /// What the kernel offered in FUSE_INIT.
    pub offer: KernelOffer,
    /// The layer it serves and the image it was read for, so it can be reopened even when no
    /// image or snapshot names it.
    pub layer: Option<(Reference, LayerRecord)>,
    /// Which layer model the mount was served from (see [`model_fingerprint`]); a successor
    /// takes the mount over only if it opens the same model, since the kernel's node ids and
    /// the open-file journal are positions in it. `None` from keepers of older versions.
    pub model: Option<String>,
}

/// What identifies the layer model a mount serves: the TOC it was built from and whether it
/// is the registry's (lazy) or a local copy's. A layer whose TOC is refused after an upgrade
/// is served from a local copy with other node ids, so its live mount cannot be taken over.
pub fn model_fingerprint(opened: &lazypull_fs::open::OpenedLayer) -> String {
    let kind = match opened.served {
        lazypull_fs::open::Served::Lazy => "lazy",
        lazypull_fs::open::Served::Local { .. } => "local",
    };
    format!("{kind}:{}", opened.toc_digest)
}

/// The layer part of a keeper entry's meta.
#[derive(serde::Serialize, serde::Deserialize)]
struct LayerMeta {
    reference: String,
    layer: LayerRecord,
    #[serde(default)]
    model: Option<String>,
}

impl Inherited {
    /// The meta stored with a mount: the offer on the first line, then the layer as JSON.
    pub fn encode(
        offer: KernelOffer,
        reference: &Reference,
        layer: Option<&LayerRecord>,
        model: &str,
    ) -> String {
        let json = layer
            .and_then(|l| {
                serde_json::to_string(&LayerMeta {
                    reference: reference.to_string(),
                    layer: l.clone(),
                    model: Some(model.to_string()),
                })
                .ok()
            })
            .unwrap_or_default();
        format!("{}\n{json}", offer.encode())
    }

    /// The inverse of [`Inherited::encode`]; `None` without a valid offer (the layer part is
    /// optional).
    pub fn decode(meta: &str, device: OwnedFd) -> Option<Inherited> {
        let (offer, json) = meta.split_once('\n').unwrap_or((meta, ""));
        let offer = KernelOffer::decode(offer)?;
        let meta = serde_json::from_str::<LayerMeta>(json).ok();
        let model = meta.as_ref().and_then(|m| m.model.clone());
        let layer = meta.and_then(|m| Some((m.reference.parse().ok()?, m.layer)));
        Some(Inherited {
            device,
            offer,
            layer,
            model,
        })
    }
}

/// One mount a keeper handed back.
pub struct Kept {
    /// Its mount point.
    pub mountpoint: PathBuf,
    /// What the kernel offered in FUSE_INIT (encoded).
    pub meta: String,
    /// The connection.
    pub device: OwnedFd,
}

/// The daemon's connection to its keeper. It remembers what it handed over, so a keeper that
/// dies while the daemon runs (killed by hand, an OOM kill) is replaced and given every mount
/// again ([`Keeper::watch`]) instead of leaving the mounts unprotected until the next restart.
pub struct Keeper {
    path: PathBuf,
    grace: Duration,
    conn: Mutex<Conn>,
}

/// The live connection and what the keeper at its other end holds.
struct Conn {
    sock: OwnedFd,
    /// Bumped on each replacement, so a watcher acts on a hang-up only once.
    generation: u64,
    /// Set by [`Keeper::quit`]: the keeper's exit is expected then.
    quitting: bool,
    /// Some mount could not be handed to the current keeper; the watcher tries again.
    incomplete: bool,
    /// Mount point -> (meta, a duplicate of the connection), to hand a new keeper.
    held: BTreeMap<PathBuf, (String, OwnedFd)>,
}

impl Keeper {
    /// Connects to the root's keeper, starting one (`exe fuse-keeper`) if none answers.
    pub fn connect_or_start(root: &Path, grace: Duration) -> Result<Keeper> {
        let path = socket_path(root);
        let sock = connect_or_spawn(&path, grace)?;
        Ok(Keeper::with_socket(path, grace, sock))
    }

    fn with_socket(path: PathBuf, grace: Duration, sock: OwnedFd) -> Keeper {
        Keeper {
            path,
            grace,
            conn: Mutex::new(Conn {
                sock,
                generation: 0,
                quitting: false,
                incomplete: false,
                held: BTreeMap::new(),
            }),
        }
    }

    /// Connects to a running keeper only (tests run one in a thread).
    #[cfg(test)]
    fn connect(path: &Path) -> Result<Keeper> {
        let sock = connect_to(path)?;
        Ok(Keeper::with_socket(
            path.to_path_buf(),
            Duration::from_secs(60),
            sock,
        ))
    }

    /// Watches the connection from a thread of its own and replaces a keeper that went away
    /// (its socket hung up) at once, rather than at the next mount, which may never come. The
    /// thread ends with the last `Arc` of the keeper or after [`Keeper::quit`].
    pub fn watch(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("keeper-watch".into())
            .spawn(move || watch(weak))
            .map(|_| ())
            .unwrap_or_else(|e| tracing::warn!(error = %e, "cannot watch the FUSE keeper"));
    }

    /// Every mount the keeper holds (it keeps holding them).
    pub fn list(&self) -> Result<Vec<Kept>> {
        let conn = self.conn.lock();
        let sock = conn.sock.as_fd();
        send(sock, "LIST", None).context("asking the FUSE keeper")?;
        let mut out = Vec::new();
        loop {
            let Some((msg, mut fds)) = recv(sock).context("reading from the FUSE keeper")? else {
                bail!("the FUSE keeper closed the connection");
            };
            if msg == "END" {
                return Ok(out);
            }
            let mut lines = msg.splitn(3, '\n');
            if let (Some("FD"), Some(key), Some(meta), 1) =
                (lines.next(), lines.next(), lines.next(), fds.len())
            {
                out.push(Kept {
                    mountpoint: PathBuf::from(key),
                    meta: meta.to_string(),
                    device: fds.remove(0),
                });
            }
        }
    }

    /// Hands the keeper a duplicate of a mount's connection; if the keeper is gone, starts a new
    /// one and hands it every mount.
    pub fn put(&self, mountpoint: &Path, meta: &str, device: BorrowedFd<'_>) -> Result<()> {
        let msg = put_message(mountpoint, meta);
        if msg.len() > MAX_MSG {
            bail!(
                "the mount's description ({} bytes) is longer than the FUSE keeper takes ({MAX_MSG})",
                msg.len()
            );
        }
        let dup = device
            .try_clone_to_owned()
            .context("duplicating a FUSE connection for the keeper")?;
        let generation = {
            let mut conn = self.conn.lock();
            conn.held
                .insert(mountpoint.to_path_buf(), (meta.to_string(), dup));
            let (_, dup) = &conn.held[mountpoint];
            if send(conn.sock.as_fd(), &msg, Some(dup.as_fd())).is_ok() {
                return Ok(());
            }
            conn.generation
        };
        self.replace(generation)
            .context("handing a mount to the FUSE keeper")
    }

    /// Tells the keeper a mount is gone.
    pub fn forget(&self, mountpoint: &Path) {
        let mut conn = self.conn.lock();
        conn.held.remove(mountpoint);
        let msg = format!("DROP\n{}", mountpoint.display());
        if let Err(e) = send(conn.sock.as_fd(), &msg, None) {
            tracing::debug!(error = %e, "telling the FUSE keeper a mount went");
        }
    }

    /// Stops the keeper (the daemon stops cleanly, its mounts are gone).
    pub fn quit(&self) {
        let mut conn = self.conn.lock();
        conn.quitting = true;
        conn.held.clear();
        let _ = send(conn.sock.as_fd(), "QUIT", None);
    }

    /// Starts a new keeper in place of the one of `generation` (gone) and hands it every held
    /// mount. Reaching the new keeper can take seconds, so it happens without the lock; if
    /// someone else replaced it meanwhile, there is nothing left to do.
    fn replace(&self, generation: u64) -> Result<()> {
        let held = {
            let conn = self.conn.lock();
            // A hang-up after QUIT is the keeper doing as told (quit sets the flag before it
            // sends QUIT, under this lock): starting another would leave one behind.
            if conn.quitting || conn.generation != generation {
                return Ok(());
            }
            conn.held.len()
        };
        tracing::warn!(
            mounts = held,
            "the FUSE keeper went away; starting a new one"
        );
        let sock = connect_or_spawn(&self.path, self.grace)?;
        let mut conn = self.conn.lock();
        if conn.quitting || conn.generation != generation {
            return Ok(());
        }
        conn.sock = sock;
        conn.generation += 1;
        hand_over_all(&mut conn)?;
        tracing::info!(
            mounts = conn.held.len(),
            "a new FUSE keeper holds the mounts"
        );
        Ok(())
    }
}

/// Sends every held mount to the current keeper (PUT replaces, so repeating one is harmless);
/// on failure the connection is marked incomplete for the watcher to try again.
fn hand_over_all(conn: &mut Conn) -> Result<()> {
    let mut failed = Vec::new();
    for (mountpoint, (meta, dup)) in &conn.held {
        if let Err(e) = send(
            conn.sock.as_fd(),
            &put_message(mountpoint, meta),
            Some(dup.as_fd()),
        ) {
            failed.push(format!("{}: {e}", mountpoint.display()));
            if e == nix::errno::Errno::EAGAIN {
                // Timed out: the keeper is stuck; do not hold the lock for every mount.
                break;
            }
        }
    }
    conn.incomplete = !failed.is_empty();
    if failed.is_empty() {
        Ok(())
    } else {
        bail!(
            "{} of {} mounts not handed to the FUSE keeper ({})",
            failed.len(),
            conn.held.len(),
            failed.join("; ")
        )
    }
}

fn put_message(mountpoint: &Path, meta: &str) -> String {
    format!("PUT\n{}\n{meta}", mountpoint.display())
}

/// The watcher thread's loop (see [`Keeper::watch`]).
fn watch(keeper: std::sync::Weak<Keeper>) {
    loop {
        let (generation, sock) = {
            let Some(k) = keeper.upgrade() else { return };
            let conn = k.conn.lock();
            if conn.quitting {
                return;
            }
            match conn.sock.try_clone() {
                Ok(sock) => (conn.generation, sock),
                Err(_) => return,
            }
        };
        // Only hang-ups (always reported; a peer's close sets POLLHUP on a seqpacket socket):
        // POLLIN would also fire for LIST answers meant for the daemon.
        let mut fds = [PollFd::new(sock.as_fd(), PollFlags::empty())];
        let hung_up = match poll(&mut fds, PollTimeout::from(1000u16)) {
            Ok(_) => fds[0]
                .revents()
                .is_some_and(|r| r.intersects(PollFlags::POLLHUP | PollFlags::POLLERR)),
            Err(_) => false,
        };
        let Some(k) = keeper.upgrade() else { return };
        if !hung_up {
            let mut conn = k.conn.lock();
            if conn.incomplete && !conn.quitting && conn.generation == generation {
                if let Err(e) = hand_over_all(&mut conn) {
                    tracing::warn!(error = %crate::report::chain(&e), "retrying in 1 s");
                }
            }
            continue;
        }
        if let Err(e) = k.replace(generation) {
            tracing::warn!(error = %crate::report::chain(&e),
                "cannot replace the FUSE keeper; retrying in 1 s");
            std::thread::sleep(Duration::from_secs(1));
        }
    }
}

/// Connects to the keeper at `path`, starting one if none answers.
fn connect_or_spawn(path: &Path, grace: Duration) -> Result<OwnedFd> {
    if let Ok(sock) = connect_to(path) {
        return Ok(sock);
    }
    let exe = std::env::current_exe().context("finding the lazypull executable")?;
    let mut child = std::process::Command::new(exe);
    child
        .arg("fuse-keeper")
        .arg("--socket")
        .arg(path)
        .arg("--grace")
        .arg(grace.as_secs().to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        // Its own process group: it must outlive the daemon, also a daemon killed with its
        // group.
        .process_group(0);
    let mut child = child.spawn().context("starting the FUSE keeper")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(sock) = connect_to(path) {
            // Reap it when it exits while the daemon still runs.
            std::thread::spawn(move || {
                let _ = child.wait();
            });
            return Ok(sock);
        }
        if let Ok(Some(status)) = child.try_wait() {
            bail!("the FUSE keeper exited at start ({status})");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "the FUSE keeper did not open {} within 10 s",
                path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn connect_to(path: &Path) -> Result<OwnedFd> {
    let sock = seqpacket()?;
    connect(sock.as_raw_fd(), &UnixAddr::new(path)?)?;
    set_timeouts(&sock)?;
    Ok(sock)
}

fn set_timeouts(sock: &OwnedFd) -> nix::Result<()> {
    let t = TimeVal::new(IO_TIMEOUT.as_secs() as _, 0);
    setsockopt(sock, sockopt::SendTimeout, &t)?;
    setsockopt(sock, sockopt::ReceiveTimeout, &t)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A keeper thread: descriptors handed to it come back from LIST, survive the client's
    /// disconnect, are gone after DROP, and QUIT ends it.
    #[test]
    fn holds_lists_drops_and_quits() {
        let dir = tempfile::tempdir().unwrap();
        let path = socket_path(dir.path());
        let p = path.clone();
        let keeper = std::thread::spawn(move || run(&p, Duration::from_secs(60)));
        let deadline = Instant::now() + Duration::from_secs(5);
        let k = loop {
            if let Ok(k) = Keeper::connect(&path) {
                break k;
            }
            assert!(Instant::now() < deadline, "keeper did not start");
            std::thread::sleep(Duration::from_millis(10));
        };
        let (r, w) = nix::unistd::pipe().unwrap();
        let rec = LayerRecord {
            digest: format!("sha256:{}", "ab".repeat(32)),
            size: 7,
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
            annotations: Default::default(),
        };
        let reference: Reference = "127.0.0.1:5000/x/y:v1".parse().unwrap();
        let offer = KernelOffer {
            minor: 41,
            capabilities: 1,
        };
        let meta = Inherited::encode(offer, &reference, Some(&rec), "lazy:sha256:00");
        k.put(Path::new("/mnt/a b"), &meta, r.as_fd()).unwrap();
        k.put(Path::new("/mnt/c"), "7.41:2", r.as_fd()).unwrap();
        // Too long for one message: refused with a reason, not cut short.
        let err = k
            .put(Path::new("/mnt/big"), &"x".repeat(MAX_MSG), r.as_fd())
            .unwrap_err();
        assert!(
            crate::report::chain(&err).contains("longer than"),
            "{err:#}"
        );
        drop(r);
        drop(k);
        // A new daemon finds both; the descriptor is the same pipe.
        let k = Keeper::connect(&path).unwrap();
        let kept = k.list().unwrap();
        let keys: Vec<_> = kept.iter().map(|m| m.mountpoint.clone()).collect();
        assert_eq!(
            keys,
            vec![PathBuf::from("/mnt/a b"), PathBuf::from("/mnt/c")]
        );
        assert_eq!(kept[0].meta, meta);
        nix::unistd::write(&w, b"x").unwrap();
        let mut b = [0u8; 1];
        assert_eq!(
            nix::unistd::read(kept[0].device.as_raw_fd(), &mut b).unwrap(),
            1
        );
        assert_eq!(&b, b"x");
        let first = kept.into_iter().next().unwrap();
        let inherited = Inherited::decode(&first.meta, first.device).unwrap();
        assert_eq!(inherited.offer, offer);
        assert_eq!(inherited.layer, Some((reference, rec)));
        assert_eq!(inherited.model.as_deref(), Some("lazy:sha256:00"));
        k.forget(Path::new("/mnt/a b"));
        let kept = k.list().unwrap();
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].mountpoint, PathBuf::from("/mnt/c"));
        k.quit();
        keeper.join().unwrap().unwrap();
    }
}
