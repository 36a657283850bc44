//! Small helpers: free ports, deterministic random data, gzip.

use std::io::Write;
use std::net::TcpListener;

use rand::{RngCore, SeedableRng};

/// Returns a TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, read it, close).
///
/// Another process could take it before the caller binds it; on a test machine that is rare.
/// Servers of this crate that can bind themselves (proxy, token issuer) do so instead.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0 to find a free port");
    listener
        .local_addr()
        .expect("local_addr of a bound listener")
        .port()
}

/// `len` pseudo-random bytes, the same for the same `seed` (ChaCha-based `StdRng`). Fast enough
/// for blobs of hundreds of MiB; incompressible, so gzip does not shrink it.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut data = vec![0u8; len];
    rng.fill_bytes(&mut data);
    data
}

/// Gzip-compresses `data` (one gzip member, default level).
pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(data).expect("gzip into memory");
    enc.finish().expect("finish gzip into memory")
}

/// Tells whether `pid` names a live (not zombie) process, from `/proc/<pid>/stat`.
pub fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name: "123 (name) S ...".
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
            .unwrap_or(false),
        Err(_) => false,
    }
}
