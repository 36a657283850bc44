//! Content digests (`sha256:<hex>`, `sha512:<hex>`) and streaming verification.
//!
//! Every byte lazypull serves is checked against a digest, so the type is small (a fixed array,
//! no heap) and cheap to hash and compare: chunk caches keep millions of them.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest as _, Sha256, Sha512};

/// Digest algorithms lazypull can verify. OCI registers sha256 and sha512.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Algorithm {
    /// SHA-256, what every registry uses today.
    Sha256,
    /// SHA-512, allowed by the OCI image spec.
    Sha512,
}

impl Algorithm {
    /// The algorithm's name as written in a digest string.
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }

    /// Length of the raw hash in bytes.
    pub fn output_len(self) -> usize {
        match self {
            Algorithm::Sha256 => 32,
            Algorithm::Sha512 => 64,
        }
    }
}

/// Why a digest string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    /// No `algorithm:` prefix.
    #[error("invalid digest {0:?}: expected ALGORITHM:HEX (for example sha256:<64 hex digits>)")]
    Format(String),
    /// An algorithm lazypull cannot verify.
    #[error("unsupported digest algorithm {0:?}: only sha256 and sha512 are supported")]
    Algorithm(String),
    /// Wrong length or non-hex (or upper-case) characters.
    #[error("invalid {algorithm} digest {value:?}: expected {expected} lower-case hex digits")]
    Hex {
        /// The algorithm named in the digest.
        algorithm: &'static str,
        /// The offending digest string.
        value: String,
        /// How many hex digits the algorithm needs.
        expected: usize,
    },
}

/// A content digest. Compact (no allocation) so caches and TOCs can hold millions.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    algorithm: Algorithm,
    bytes: [u8; 64],
}

impl Digest {
    /// Builds a digest from raw hash bytes; `bytes.len()` must match the algorithm.
    pub fn from_raw(algorithm: Algorithm, raw: &[u8]) -> Option<Self> {
        if raw.len() != algorithm.output_len() {
            return None;
        }
        let mut bytes = [0u8; 64];
        bytes[..raw.len()].copy_from_slice(raw);
        Some(Digest { algorithm, bytes })
    }

    /// SHA-256 of `data`: the digest every new blob and chunk gets.
    pub fn sha256_of(data: &[u8]) -> Self {
        let mut v = Verifier::new(Algorithm::Sha256);
        v.update(data);
        v.finish()
    }

    /// Computes the digest of `data` with this digest's algorithm and compares.
    pub fn matches(&self, data: &[u8]) -> bool {
        let mut v = Verifier::new(self.algorithm);
        v.update(data);
        v.finish() == *self
    }

    /// The algorithm.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// Raw hash bytes.
    pub fn raw(&self) -> &[u8] {
        &self.bytes[..self.algorithm.output_len()]
    }

    /// Lower-case hex of the hash, without the algorithm prefix (used for file names).
    pub fn hex(&self) -> String {
        hex::encode(self.raw())
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm.as_str(), self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Digest {
    type Err = DigestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (alg, hex_part) = s
            .split_once(':')
            .ok_or_else(|| DigestError::Format(s.to_string()))?;
        let algorithm = match alg {
            "sha256" => Algorithm::Sha256,
            "sha512" => Algorithm::Sha512,
            "" => return Err(DigestError::Format(s.to_string())),
            other => return Err(DigestError::Algorithm(other.to_string())),
        };
        let expected = algorithm.output_len() * 2;
        let bad = || DigestError::Hex {
            algorithm: algorithm.as_str(),
            value: s.to_string(),
            expected,
        };
        if hex_part.len() != expected
            || !hex_part
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(bad());
        }
        let raw = hex::decode(hex_part).map_err(|_| bad())?;
        Digest::from_raw(algorithm, &raw).ok_or_else(bad)
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Incremental hasher for data that arrives in pieces (streamed blobs).
pub struct Verifier {
    state: State,
}

enum State {
    Sha256(Sha256),
    Sha512(Sha512),
}

impl Verifier {
    /// Starts hashing with `algorithm`.
    pub fn new(algorithm: Algorithm) -> Self {
        let state = match algorithm {
            Algorithm::Sha256 => State::Sha256(Sha256::new()),
            Algorithm::Sha512 => State::Sha512(Sha512::new()),
        };
        Verifier { state }
    }

    /// Feeds more bytes.
    pub fn update(&mut self, data: &[u8]) {
        match &mut self.state {
            State::Sha256(h) => h.update(data),
            State::Sha512(h) => h.update(data),
        }
    }

    /// Finishes and returns the digest of everything fed.
    pub fn finish(self) -> Digest {
        match self.state {
            State::Sha256(h) => {
                Digest::from_raw(Algorithm::Sha256, &h.finalize()).expect("sha256 is 32 bytes")
            }
            State::Sha512(h) => {
                Digest::from_raw(Algorithm::Sha512, &h.finalize()).expect("sha512 is 64 bytes")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_round_trip() {
        let d = Digest::sha256_of(b"hello");
        assert_eq!(
            d.to_string(),
            "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert_eq!(d.to_string().parse::<Digest>().unwrap(), d);
        assert!(d.matches(b"hello"));
        assert!(!d.matches(b"hellO"));
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "",
            "sha256",
            ":abc",
            "md5:abcd",
            "sha256:abc",
            "sha256:2CF24DBA5FB0A30E26E83B2AC5B9E29E1B161E5C1FA7425E73043362938B9824",
            "sha256:zzf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824",
        ] {
            assert!(bad.parse::<Digest>().is_err(), "{bad:?} accepted");
        }
    }
}
