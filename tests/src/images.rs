//! A realistic image, generated: the layers of a "python data" container image (a Debian-like
//! base, the python 3.11 standard library with pip, numpy + scipy, pandas + pyarrow, and a small
//! app layer), as uncompressed tars, for tests and benchmarks that need the shape of a real
//! image (tens of thousands of small files, a few large shared objects, symlinks, hard links,
//! whiteouts) without a network or a two-minute `debootstrap`.
//!
//! - [`realistic_layers`]: the layers, base first.
//! - [`entry_point_files`]: the files an `import numpy, pandas` reads, in the order an importer
//!   would read them, for simulated workloads and prefetch lists.
//!
//! The layout (paths, sizes, modes, links) is fixed; the seed only changes file contents.
//! Content is deterministic, generated with a small fast PRNG (not `rand`, whose streams may
//! change between versions), and shaped to compress like the real thing under gzip: python
//! sources and text about 3-5x, `.pyc` about 2-3x, shared objects about 2-3x (a mix of random
//! blocks and blocks built from a small per-file "instruction" dictionary), `.gz` not at all.

use std::collections::HashSet;

/// Bump whenever the generated layout or content changes: caches of converted blobs are keyed
/// by it (with the seed).
pub const REALISTIC_VERSION: u32 = 1;

/// Modification time of every entry (per layer, a day apart).
const MTIME: u64 = 1_700_000_000;
/// Seed of the layout (independent of the content seed, so entry points are stable).
const LAYOUT_SEED: u64 = 0x6c61_7a79_7075_6c6c;

const MULTIARCH: &str = "usr/lib/x86_64-linux-gnu";
const STDLIB: &str = "usr/lib/python3.11";
const SITE: &str = "usr/local/lib/python3.11/site-packages";
const EXT: &str = ".cpython-311-x86_64-linux-gnu.so";

/// The layers of the realistic image, base first, as uncompressed tars.
///
/// Five layers: a Debian-like base system, python 3.11 with pip and setuptools, numpy + scipy,
/// pandas + pyarrow + friends, and an app layer that overwrites `etc/passwd` and `etc/group`,
/// whiteouts a documentation directory and a cache file, and makes `var/lib/apt/lists` opaque.
/// Together: about 22,000 files and 410 MB (see [`realistic_totals`]). Paths are relative
/// (`usr/bin/...`), parents precede children, and every file's content is a function of `seed`
/// and its path. The layers are built in parallel threads, in a second or two.
pub fn realistic_layers(seed: u64) -> Vec<Vec<u8>> {
    let plans = plans();
    std::thread::scope(|s| {
        let handles: Vec<_> = plans
            .iter()
            .enumerate()
            .map(|(i, p)| s.spawn(move || build_tar(p, seed, MTIME + i as u64 * 86_400)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("layer builder panicked"))
            .collect()
    })
}

/// The regular files an `import numpy, pandas` in the realistic image reads, in the order an
/// importer reads them: the interpreter and the shared libraries it loads, the standard library
/// modules (`__pycache__/*.pyc`) and extension modules of start-up, then numpy's, then pandas'
/// (which pulls in pytz, dateutil and pyarrow). About 320 paths, relative to the image root, all
/// regular files of the merged image. Includes three large shared objects: numpy's
/// `_multiarray_umath` (10 MiB), numpy's bundled OpenBLAS (35 MiB) and `libarrow` (40 MiB).
pub fn entry_point_files() -> Vec<String> {
    plans().into_iter().flat_map(|p| p.entry).collect()
}

/// `(file bytes, tar entries)` of the realistic image, summed over its layers (whiteouts
/// included), from the layout alone (no content is generated).
pub fn realistic_totals() -> (u64, usize) {
    let plans = plans();
    let bytes = plans
        .iter()
        .flat_map(|p| &p.items)
        .map(|i| match i {
            Item::File { content, .. } => content.len(),
            _ => 0,
        })
        .sum();
    (bytes, plans.iter().map(|p| p.items.len()).sum())
}

// ---------------------------------------------------------------------------------------------
// Randomness.

/// wyrand: tiny, fast, and stable forever (unlike `rand`'s `StdRng`).
struct Rng(u64);

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn fnv1a(data: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for b in data {
        h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(splitmix(seed))
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0xa076_1d64_78bd_642f);
        let t = u128::from(self.0) * u128::from(self.0 ^ 0xe703_7ed1_a0b4_28db);
        ((t >> 64) as u64) ^ (t as u64)
    }

    /// Uniform in `0..n` (`n > 0`).
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    fn chance(&mut self, pct: u64) -> bool {
        self.below(100) < pct
    }

    /// Log-uniform in `lo..=hi`: many small, few large, like file sizes.
    fn log_uniform(&mut self, lo: u64, hi: u64) -> u64 {
        let f = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        let v = lo as f64 * (hi as f64 / lo as f64).powf(f);
        (v as u64).clamp(lo, hi)
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }

    fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let last = self.next().to_le_bytes();
        rest.copy_from_slice(&last[..rest.len()]);
    }
}

// ---------------------------------------------------------------------------------------------
// Content.

/// What a file holds; generated from the seed and the path when the tar is written.
#[derive(Debug, Clone)]
enum Content {
    /// Python-like source text.
    Python(u64),
    /// Prose (documentation, licences).
    Prose(u64),
    /// `key = value` configuration text.
    Config(u64),
    /// ELF-like binary: `.1` percent of 1 KiB blocks random, the rest from a small per-file
    /// token dictionary.
    Binary(u64, u64),
    /// Compiled python (`.pyc`): magic, bytecode, names and docstrings.
    Pyc(u64),
    /// Already compressed (`.gz`, archives): incompressible.
    Random(u64),
    /// Exactly these bytes.
    Fixed(Vec<u8>),
}

impl Content {
    fn len(&self) -> u64 {
        match self {
            Content::Python(n)
            | Content::Prose(n)
            | Content::Config(n)
            | Content::Binary(n, _)
            | Content::Pyc(n)
            | Content::Random(n) => *n,
            Content::Fixed(v) => v.len() as u64,
        }
    }

    fn generate(&self, out: &mut Vec<u8>, rng: &mut Rng) {
        out.clear();
        let len = self.len() as usize;
        out.reserve(len + 256);
        match self {
            Content::Python(_) => python_source(out, len, rng),
            Content::Prose(_) => prose(out, len, rng),
            Content::Config(_) => config(out, len, rng),
            Content::Binary(_, pct) => binary(out, len, *pct, rng),
            Content::Pyc(_) => pyc(out, len, rng),
            Content::Random(_) => {
                out.resize(len, 0);
                rng.fill(out);
                if len >= 2 {
                    out[0] = 0x1f;
                    out[1] = 0x8b;
                }
            }
            Content::Fixed(v) => out.extend_from_slice(v),
        }
        out.truncate(len);
    }
}

#[rustfmt::skip]
const PY_WORDS: &[&str] = &[
    "self", "value", "result", "data", "index", "array", "dtype", "shape", "axis", "name", "obj",
    "other", "key", "items", "values", "out", "arr", "func", "args", "kwargs", "level", "copy",
    "fill", "mask", "mode", "order", "keys", "frame", "series", "block", "column", "columns",
    "row", "count", "size", "start", "stop", "step", "length", "offset", "buffer", "stream",
    "path", "file", "line", "text", "token", "node", "parent", "child", "cache", "state", "info",
    "config", "options", "default", "method", "kind", "flags", "errors", "message", "warning",
    "limit", "scale", "weights", "sample", "labels", "codes", "categories", "freq", "tz",
    "unit", "periods", "window", "closed", "how", "on", "left", "right", "inner", "join",
    "merge", "concat", "apply", "transform", "reduce", "sum", "mean", "std", "var", "min", "max",
    "result_type", "converter", "validate", "check", "ensure", "maybe", "get", "set", "make",
    "new", "is_list_like", "is_scalar", "np", "pd", "lib", "algos", "missing", "ops", "util",
];

#[rustfmt::skip]
const PY_KEYWORDS: &[&str] = &[
    "None", "True", "False", "isinstance", "len", "range", "list", "dict", "tuple", "int",
    "float", "str", "bool", "object", "type", "super", "getattr", "hasattr", "zip", "enumerate",
];

#[rustfmt::skip]
const PROSE_WORDS: &[&str] = &[
    "the", "of", "a", "to", "is", "in", "and", "for", "be", "this", "that", "an", "are", "with",
    "as", "by", "it", "not", "or", "if", "on", "from", "array", "returns", "input", "parameter",
    "optional", "default", "see", "also", "function", "values", "must", "should", "will", "may",
    "when", "which", "each", "all", "any", "only", "new", "object", "given", "number", "data",
    "result", "value", "type", "index", "elements", "along", "axis", "shape", "same", "other",
    "used", "use", "can", "such", "than", "then", "into", "one", "two", "first", "last",
    "software", "license", "copyright", "without", "warranty", "permission", "granted", "free",
    "distribute", "modify", "under", "terms", "version", "package", "debian", "upstream",
    "changes", "fixed", "bug", "release", "system", "file", "files", "directory", "user",
    "program", "option", "options", "command", "line", "set", "string", "character", "case",
    "error", "raised", "exception", "otherwise", "return", "returned", "method", "class",
    "instance", "attribute", "example", "examples", "note", "notes", "deprecated", "since",
];

fn push_word(out: &mut Vec<u8>, rng: &mut Rng, words: &[&str]) {
    out.extend_from_slice(rng.pick(words).as_bytes());
}

fn ident(out: &mut Vec<u8>, rng: &mut Rng) {
    push_word(out, rng, PY_WORDS);
    if rng.chance(40) {
        out.push(b'_');
        push_word(out, rng, PY_WORDS);
    }
}

fn indent(out: &mut Vec<u8>, n: usize) {
    out.extend(std::iter::repeat_n(b' ', n));
}

fn sentence(out: &mut Vec<u8>, rng: &mut Rng, words: u64) {
    for i in 0..words {
        if i > 0 {
            out.push(b' ');
        }
        push_word(out, rng, PROSE_WORDS);
    }
}

fn python_source(out: &mut Vec<u8>, len: usize, rng: &mut Rng) {
    out.extend_from_slice(b"\"\"\"\n");
    let n = rng.range(8, 30);
    sentence(out, rng, n);
    out.extend_from_slice(b".\n\"\"\"\n\nfrom __future__ import annotations\n\nimport ");
    ident(out, rng);
    out.push(b'\n');
    let mut depth = 0usize;
    while out.len() < len {
        let ind = depth * 4;
        match rng.below(18) {
            0 | 1 => {
                depth = if rng.chance(60) { 1 } else { 0 };
                out.push(b'\n');
                indent(out, depth * 4);
                out.extend_from_slice(b"def ");
                ident(out, rng);
                out.extend_from_slice(b"(self, ");
                ident(out, rng);
                out.extend_from_slice(b", ");
                ident(out, rng);
                out.extend_from_slice(b"=None):\n");
                depth += 1;
                indent(out, depth * 4);
                out.extend_from_slice(b"\"\"\"");
                let n = rng.range(6, 40);
                sentence(out, rng, n);
                out.extend_from_slice(b".\n\n");
                indent(out, depth * 4);
                out.extend_from_slice(b"Parameters\n");
                indent(out, depth * 4);
                out.extend_from_slice(b"----------\n");
                indent(out, depth * 4);
                ident(out, rng);
                out.extend_from_slice(b" : ");
                push_word(out, rng, PY_KEYWORDS);
                out.extend_from_slice(b", optional\n");
                indent(out, depth * 4 + 4);
                let n = rng.range(5, 20);
                sentence(out, rng, n);
                out.extend_from_slice(b".\n");
                indent(out, depth * 4);
                out.extend_from_slice(b"\"\"\"\n");
            }
            2 => {
                out.extend_from_slice(b"\n\nclass ");
                ident(out, rng);
                out.push(b'(');
                push_word(out, rng, PY_KEYWORDS);
                out.extend_from_slice(b"):\n    \"\"\"");
                let n = rng.range(6, 30);
                sentence(out, rng, n);
                out.extend_from_slice(b".\"\"\"\n");
                depth = 1;
            }
            3..=7 => {
                indent(out, ind);
                ident(out, rng);
                out.extend_from_slice(b" = ");
                ident(out, rng);
                out.push(b'.');
                ident(out, rng);
                out.push(b'(');
                ident(out, rng);
                out.extend_from_slice(b", ");
                ident(out, rng);
                out.push(b'=');
                push_word(out, rng, PY_KEYWORDS);
                out.extend_from_slice(b")\n");
            }
            8 | 9 => {
                indent(out, ind);
                out.extend_from_slice(b"if ");
                ident(out, rng);
                out.extend_from_slice(b" is None:\n");
                indent(out, ind + 4);
                ident(out, rng);
                out.extend_from_slice(b" = ");
                ident(out, rng);
                out.push(b'\n');
            }
            10 => {
                indent(out, ind);
                out.extend_from_slice(b"# ");
                let n = rng.range(4, 14);
                sentence(out, rng, n);
                out.push(b'\n');
            }
            11 => {
                indent(out, ind);
                out.extend_from_slice(b"if not isinstance(");
                ident(out, rng);
                out.extend_from_slice(b", ");
                push_word(out, rng, PY_KEYWORDS);
                out.extend_from_slice(b"):\n");
                indent(out, ind + 4);
                out.extend_from_slice(b"raise TypeError(f\"");
                let n = rng.range(3, 10);
                sentence(out, rng, n);
                out.extend_from_slice(b" {type(");
                ident(out, rng);
                out.extend_from_slice(b").__name__}\")\n");
            }
            12 | 13 => {
                indent(out, ind);
                out.extend_from_slice(b"for ");
                ident(out, rng);
                out.extend_from_slice(b" in range(len(");
                ident(out, rng);
                out.extend_from_slice(b")):\n");
                indent(out, ind + 4);
                ident(out, rng);
                out.push(b'[');
                ident(out, rng);
                out.extend_from_slice(b"] += ");
                ident(out, rng);
                out.push(b'\n');
            }
            14 | 15 => {
                indent(out, ind);
                out.extend_from_slice(b"return ");
                ident(out, rng);
                out.push(b'(');
                ident(out, rng);
                out.extend_from_slice(b")\n");
            }
            16 => out.push(b'\n'),
            _ => {
                out.extend_from_slice(b"from .");
                ident(out, rng);
                out.extend_from_slice(b" import ");
                ident(out, rng);
                out.extend_from_slice(b", ");
                ident(out, rng);
                out.push(b'\n');
            }
        }
    }
    finish_text(out, len);
}

fn prose(out: &mut Vec<u8>, len: usize, rng: &mut Rng) {
    let mut col = 0usize;
    while out.len() < len {
        let w = *rng.pick(PROSE_WORDS);
        if col + w.len() > 72 {
            out.push(b'\n');
            col = 0;
            if rng.chance(12) {
                out.push(b'\n');
            }
        } else if col > 0 {
            out.push(b' ');
            col += 1;
        }
        out.extend_from_slice(w.as_bytes());
        col += w.len();
        if rng.chance(8) {
            out.push(b'.');
            col += 1;
        }
    }
    finish_text(out, len);
}

fn config(out: &mut Vec<u8>, len: usize, rng: &mut Rng) {
    out.extend_from_slice(b"# ");
    sentence(out, rng, 9);
    out.push(b'\n');
    while out.len() < len {
        match rng.below(8) {
            0 => {
                out.extend_from_slice(b"\n# ");
                let n = rng.range(3, 12);
                sentence(out, rng, n);
                out.push(b'\n');
            }
            1 => {
                out.push(b'[');
                ident(out, rng);
                out.extend_from_slice(b"]\n");
            }
            _ => {
                ident(out, rng);
                out.extend_from_slice(b" = ");
                if rng.chance(40) {
                    out.extend_from_slice(rng.below(100_000).to_string().as_bytes());
                } else {
                    push_word(out, rng, PROSE_WORDS);
                }
                out.push(b'\n');
            }
        }
    }
    finish_text(out, len);
}

fn finish_text(out: &mut Vec<u8>, len: usize) {
    out.truncate(len);
    if let Some(last) = out.last_mut() {
        *last = b'\n';
    }
}

/// A per-file "instruction set": 64 short byte strings that machine code is made of.
struct Code {
    dict: [[u8; 16]; 64],
    lens: [usize; 64],
}

impl Code {
    fn new(rng: &mut Rng) -> Code {
        let mut code = Code {
            dict: [[0u8; 16]; 64],
            lens: [0usize; 64],
        };
        for (t, l) in code.dict.iter_mut().zip(code.lens.iter_mut()) {
            rng.fill(t);
            *l = rng.range(3, 16) as usize;
        }
        code
    }

    /// Appends "code" up to `end` bytes: tokens, some 4-byte immediates, some zero padding.
    fn emit(&self, out: &mut Vec<u8>, end: usize, rng: &mut Rng) {
        while out.len() < end {
            let r = rng.next();
            let t = (r & 63) as usize;
            out.extend_from_slice(&self.dict[t][..self.lens[t]]);
            if (r >> 8) & 7 == 0 {
                out.extend_from_slice(&(r >> 32).to_le_bytes()[..4]);
            }
            if (r >> 12) & 63 == 0 {
                let zeros = 8 + ((r >> 20) & 31) as usize;
                out.resize(out.len() + zeros, 0);
            }
        }
        out.truncate(end);
    }
}

/// An ELF-like binary: blocks of 1 KiB, `random_pct` percent random (data, compressed
/// sections), the rest code.
fn binary(out: &mut Vec<u8>, len: usize, random_pct: u64, rng: &mut Rng) {
    const BLOCK: usize = 1024;
    let code = Code::new(rng);
    out.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0\x03\0\x3e\0\x01\0\0\0");
    out.resize(len.clamp(24, 64), 0);
    while out.len() < len {
        let end = (out.len() + BLOCK).min(len);
        if rng.chance(random_pct) {
            let start = out.len();
            out.resize(end, 0);
            rng.fill(&mut out[start..]);
        } else {
            code.emit(out, end, rng);
        }
    }
}

fn pyc(out: &mut Vec<u8>, len: usize, rng: &mut Rng) {
    out.extend_from_slice(b"\xa7\x0d\x0d\x0a\0\0\0\0");
    out.extend_from_slice(&(MTIME as u32).to_le_bytes());
    out.extend_from_slice(&(len as u32).to_le_bytes());
    let code = Code::new(rng);
    while out.len() < len {
        // A code object: bytecode, constants, then its names and docstring.
        out.push(0xe3);
        let end = out.len() + rng.range(64, 600) as usize;
        code.emit(out, end, rng);
        if rng.chance(30) {
            let start = out.len();
            out.resize(start + rng.range(8, 48) as usize, 0);
            rng.fill(&mut out[start..]);
        }
        for _ in 0..rng.range(2, 8) {
            out.push(0xda);
            let start = out.len();
            out.push(0);
            ident(out, rng);
            out[start] = (out.len() - start - 1) as u8;
        }
        out.push(0x73);
        let n = rng.range(4, 30);
        sentence(out, rng, n);
    }
}

// ---------------------------------------------------------------------------------------------
// Layout.

#[derive(Debug, Clone)]
enum Item {
    Dir {
        path: String,
        mode: u32,
    },
    File {
        path: String,
        mode: u32,
        uid: u64,
        gid: u64,
        content: Content,
    },
    Symlink {
        path: String,
        target: String,
    },
    Hardlink {
        path: String,
        target: String,
    },
}

/// Syllables of made-up names.
#[rustfmt::skip]
const SYL: &[&str] = &[
    "ab", "ac", "al", "an", "ar", "as", "at", "ba", "be", "bi", "bo", "ca", "ce", "ci", "co",
    "cu", "da", "de", "di", "do", "el", "em", "en", "er", "es", "et", "fa", "fi", "fo", "ga",
    "ge", "gi", "go", "ha", "he", "id", "il", "im", "in", "io", "ir", "is", "ka", "la", "le",
    "li", "lo", "lu", "ma", "me", "mi", "mo", "mu", "na", "ne", "ni", "no", "nu", "ob", "ol",
    "om", "on", "op", "or", "os", "pa", "pe", "pi", "po", "qu", "ra", "re", "ri", "ro", "ru",
    "sa", "se", "si", "so", "su", "ta", "te", "ti", "to", "tu", "ul", "um", "un", "ur", "us",
    "va", "ve", "vi", "vo", "xa", "ya", "za", "zo",
];

/// One layer's entries, parents before children, plus the entry-point files it contributes.
struct Plan {
    items: Vec<Item>,
    dirs: HashSet<String>,
    paths: HashSet<String>,
    entry: Vec<String>,
    rng: Rng,
}

fn parent(path: &str) -> Option<&str> {
    path.rfind('/').map(|i| &path[..i])
}

impl Plan {
    fn new(layer: u64) -> Plan {
        Plan {
            items: Vec::new(),
            dirs: HashSet::new(),
            paths: HashSet::new(),
            entry: Vec::new(),
            rng: Rng::new(LAYOUT_SEED ^ layer.wrapping_mul(0x9e37_79b9_7f4a_7c15)),
        }
    }

    fn dir_mode(&mut self, path: &str, mode: u32) {
        if path.is_empty() || self.dirs.contains(path) {
            return;
        }
        if let Some(p) = parent(path) {
            self.dir(p);
        }
        self.dirs.insert(path.to_string());
        self.paths.insert(path.to_string());
        self.items.push(Item::Dir {
            path: path.to_string(),
            mode,
        });
    }

    fn dir(&mut self, path: &str) {
        self.dir_mode(path, 0o755);
    }

    /// Creates the parents of `path` and tells whether `path` itself is still free.
    fn claim(&mut self, path: &str) -> bool {
        if let Some(p) = parent(path) {
            self.dir(p);
        }
        self.paths.insert(path.to_string())
    }

    fn file_owned(&mut self, path: &str, mode: u32, uid: u64, gid: u64, content: Content) {
        if self.claim(path) {
            self.items.push(Item::File {
                path: path.to_string(),
                mode,
                uid,
                gid,
                content,
            });
        }
    }

    fn file(&mut self, path: &str, mode: u32, content: Content) {
        self.file_owned(path, mode, 0, 0, content);
    }

    /// A file the simulated workload reads.
    fn entry_file(&mut self, path: &str, mode: u32, content: Content) {
        if !self.paths.contains(path) {
            self.file(path, mode, content);
            self.entry.push(path.to_string());
        }
    }

    fn symlink(&mut self, path: &str, target: &str) {
        if self.claim(path) {
            self.items.push(Item::Symlink {
                path: path.to_string(),
                target: target.to_string(),
            });
        }
    }

    fn hardlink(&mut self, path: &str, target: &str) {
        if self.claim(path) {
            self.items.push(Item::Hardlink {
                path: path.to_string(),
                target: target.to_string(),
            });
        }
    }

    /// A made-up lowercase name of 2-4 syllables.
    fn word(&mut self) -> String {
        let n = self.rng.range(2, 4);
        (0..n).map(|_| *self.rng.pick(SYL)).collect()
    }

    /// `dir/<prefix><word><suffix>`, not used yet in this layer.
    fn fresh(&mut self, dir: &str, prefix: &str, suffix: &str) -> String {
        loop {
            let w = self.word();
            let p = format!("{dir}/{prefix}{w}{suffix}");
            if !self.paths.contains(&p) {
                return p;
            }
        }
    }

    /// `count` made-up files `dir/WORDsuffix` of `content(size)`, sizes log-uniform.
    fn bulk(
        &mut self,
        dir: &str,
        suffix: &str,
        count: usize,
        sizes: (u64, u64),
        content: fn(u64) -> Content,
    ) {
        for _ in 0..count {
            let path = self.fresh(dir, "", suffix);
            let size = self.rng.log_uniform(sizes.0, sizes.1);
            self.file(&path, 0o644, content(size));
        }
    }

    fn py_size(&mut self) -> u64 {
        self.rng.log_uniform(1_000, 40_000)
    }

    /// `dir/<module>.py` and its `__pycache__/<module>.cpython-311.pyc`; `module` may contain
    /// slashes. The pyc is an entry point when `imported`.
    fn py_module(&mut self, dir: &str, module: &str, imported: bool) {
        let size = self.py_size();
        self.py_module_sized(dir, module, imported, size);
    }

    fn py_module_sized(&mut self, dir: &str, module: &str, imported: bool, size: u64) {
        let py = format!("{dir}/{module}.py");
        if self.paths.contains(&py) {
            return;
        }
        self.file(&py, 0o644, Content::Python(size));
        let (pdir, name) = match module.rfind('/') {
            Some(i) => (format!("{dir}/{}", &module[..i]), &module[i + 1..]),
            None => (dir.to_string(), module),
        };
        let pyc_size = (size * self.rng.range(55, 90) / 100).max(400);
        let pyc = format!("{pdir}/__pycache__/{name}.cpython-311.pyc");
        if imported {
            self.entry_file(&pyc, 0o644, Content::Pyc(pyc_size));
        } else {
            self.file(&pyc, 0o644, Content::Pyc(pyc_size));
        }
    }

    /// Python modules under `dir`: names ending in `.so` become extension modules
    /// (`NAME.cpython-311-x86_64-linux-gnu.so`, 60 KB - 1.2 MB), the rest sources with pycs.
    fn py_modules(&mut self, dir: &str, modules: &[&str], imported: bool) {
        for m in modules {
            if let Some(ext) = m.strip_suffix(".so") {
                let size = self.rng.log_uniform(60_000, 1_200_000);
                let path = format!("{dir}/{ext}{EXT}");
                if imported {
                    self.entry_file(&path, 0o755, Content::Binary(size, 30));
                } else {
                    self.file(&path, 0o755, Content::Binary(size, 30));
                }
            } else {
                self.py_module(dir, m, imported);
            }
        }
    }

    /// A package directory: `__init__` plus `count` made-up modules, with their pycs.
    fn py_package(&mut self, dir: &str, count: usize) {
        self.py_module(dir, "__init__", false);
        for _ in 0..count {
            let p = self.fresh(dir, "", ".py");
            let module = p[dir.len() + 1..p.len() - 3].to_string();
            let size = self.rng.log_uniform(800, 30_000);
            self.py_module_sized(dir, &module, false, size);
        }
    }

    /// A shared library `dir/libNAME.so.MAJOR.MINOR.PATCH` with its `libNAME.so.MAJOR` symlink.
    fn shared_lib(&mut self, dir: &str, name: &str, size: u64, imported: bool) {
        let major = self.rng.range(0, 9);
        let real = format!(
            "lib{name}.so.{major}.{}.{}",
            self.rng.below(30),
            self.rng.below(9)
        );
        let path = format!("{dir}/{real}");
        if imported {
            self.entry_file(&path, 0o644, Content::Binary(size, 30));
        } else {
            self.file(&path, 0o644, Content::Binary(size, 30));
        }
        self.symlink(&format!("{dir}/lib{name}.so.{major}"), &real);
    }

    fn dist_info(&mut self, name: &str, version: &str, files: u64) {
        let d = format!("{SITE}/{name}-{version}.dist-info");
        self.file(
            &format!("{d}/INSTALLER"),
            0o644,
            Content::Fixed(b"pip\n".to_vec()),
        );
        let metadata = self.rng.range(2_000, 60_000);
        self.file(&format!("{d}/METADATA"), 0o644, Content::Prose(metadata));
        self.file(&format!("{d}/RECORD"), 0o644, Content::Config(files * 110));
        self.file(
            &format!("{d}/WHEEL"),
            0o644,
            Content::Fixed(b"Wheel-Version: 1.0\nRoot-Is-Purelib: false\n".to_vec()),
        );
        let licence = self.rng.range(1_000, 30_000);
        self.file(&format!("{d}/LICENSE.txt"), 0o644, Content::Prose(licence));
    }
}

fn plans() -> Vec<Plan> {
    vec![
        base_layer(),
        python_layer(),
        numpy_scipy_layer(),
        pandas_layer(),
        app_layer(),
    ]
}

#[rustfmt::skip]
const PACKAGES: &[&str] = &[
    "apt", "base-files", "base-passwd", "bash", "bsdutils", "coreutils", "dash", "debconf",
    "debian-archive-keyring", "debianutils", "diffutils", "dpkg", "e2fsprogs", "findutils",
    "gcc-12-base", "gpgv", "grep", "gzip", "hostname", "init-system-helpers", "libacl1",
    "libapt-pkg6.0", "libattr1", "libaudit1", "libblkid1", "libbz2-1.0", "libc-bin", "libc6",
    "libcap-ng0", "libcap2", "libcom-err2", "libcrypt1", "libdb5.3", "libdebconfclient0",
    "libext2fs2", "libffi8", "libgcc-s1", "libgcrypt20", "libgmp10", "libgnutls30",
    "libgpg-error0", "libhogweed6", "libidn2-0", "liblz4-1", "liblzma5", "libmd0", "libmount1",
    "libncursesw6", "libnettle8", "libp11-kit0", "libpam-modules", "libpam-runtime",
    "libpam0g", "libpcre2-8-0", "libreadline8", "libseccomp2", "libselinux1", "libsemanage2",
    "libsepol2", "libsmartcols1", "libsqlite3-0", "libss2", "libssl3", "libstdc++6",
    "libsystemd0", "libtasn1-6", "libtinfo6", "libudev1", "libunistring2", "libuuid1",
    "libxxhash0", "libzstd1", "login", "logsave", "mawk", "mount", "ncurses-base",
    "ncurses-bin", "passwd", "perl-base", "readline-common", "sed", "sysvinit-utils", "tar",
    "tzdata", "usrmerge", "util-linux", "util-linux-extra", "zlib1g", "ca-certificates",
    "openssl", "netbase", "libexpat1", "media-types", "libnsl2", "libtirpc3",
    "libgssapi-krb5-2", "libkrb5-3", "libk5crypto3", "libkrb5support0", "libkeyutils1",
    "libtirpc-common",
];

/// The base system (bookworm-like, plus what a python image installs).
fn base_layer() -> Plan {
    let mut p = Plan::new(1);
    for d in [
        "boot", "dev", "etc", "home", "media", "mnt", "opt", "proc", "run", "srv", "sys", "usr",
        "var",
    ] {
        p.dir(d);
    }
    p.dir_mode("root", 0o700);
    p.dir_mode("tmp", 0o1777);
    p.dir_mode("var/tmp", 0o1777);
    for (l, t) in [
        ("bin", "usr/bin"),
        ("lib", "usr/lib"),
        ("lib64", "usr/lib64"),
        ("sbin", "usr/sbin"),
    ] {
        p.symlink(l, t);
    }

    // The dynamic loader and the libraries an interpreter start loads.
    p.entry_file(
        &format!("{MULTIARCH}/ld-linux-x86-64.so.2"),
        0o755,
        Content::Binary(210_968, 30),
    );
    p.symlink(
        "usr/lib64/ld-linux-x86-64.so.2",
        "../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
    );
    p.file("etc/ld.so.conf", 0o644, Content::Config(34));
    p.entry_file("etc/ld.so.cache", 0o644, Content::Binary(24_000, 20));
    for (name, size) in [
        ("c", 1_922_136),
        ("m", 907_784),
        ("z", 121_280),
        ("bz2", 74_688),
        ("lzma", 166_896),
        ("ffi", 39_032),
        ("expat", 186_304),
        ("uuid", 34_872),
        ("gcc_s", 125_312),
        ("stdc++", 2_190_440),
        ("crypto", 4_709_656),
        ("ssl", 695_656),
    ] {
        p.shared_lib(MULTIARCH, name, size, true);
    }
    for (name, size) in [
        ("perl", 3_872_440),
        ("db-5.3", 1_811_864),
        ("systemd", 908_832),
        ("apt-pkg", 2_113_416),
        ("gnutls", 2_088_744),
        ("sqlite3", 1_455_160),
        ("krb5", 827_936),
    ] {
        p.shared_lib(MULTIARCH, name, size, false);
    }
    for _ in 0..120 {
        let name = p.word();
        let size = p.rng.log_uniform(10_000, 300_000);
        p.shared_lib(MULTIARCH, &name, size, false);
    }
    let binary = |n| Content::Binary(n, 20);
    p.bulk(
        &format!("{MULTIARCH}/gconv"),
        ".so",
        240,
        (10_000, 40_000),
        binary,
    );
    p.file(
        &format!("{MULTIARCH}/gconv/gconv-modules.cache"),
        0o644,
        Content::Binary(26_398, 10),
    );
    for sub in ["", "/File", "/IO", "/Text", "/unicore/lib"] {
        let dir = format!("{MULTIARCH}/perl-base{sub}");
        p.bulk(&dir, ".pm", 110, (500, 50_000), Content::Python);
    }

    // Executables.
    p.file("usr/bin/bash", 0o755, Content::Binary(1_265_648, 30));
    p.file("usr/bin/dash", 0o755, Content::Binary(125_560, 30));
    p.symlink("usr/bin/sh", "dash");
    p.file("usr/bin/perl", 0o755, Content::Binary(3_906_280, 30));
    p.hardlink("usr/bin/perl5.36.0", "usr/bin/perl");
    p.file("usr/bin/gzip", 0o755, Content::Binary(98_136, 30));
    p.hardlink("usr/bin/uncompress", "usr/bin/gzip");
    p.file_owned("usr/bin/passwd", 0o4755, 0, 0, Content::Binary(68_248, 30));
    p.file_owned("usr/bin/wall", 0o2755, 0, 5, Content::Binary(35_048, 30));
    for (dir, count) in [("usr/bin", 360), ("usr/sbin", 130)] {
        for _ in 0..count {
            let path = p.fresh(dir, "", "");
            let size = p.rng.log_uniform(8_000, 120_000);
            p.file(&path, 0o755, Content::Binary(size, 30));
        }
    }
    for _ in 0..50 {
        let path = p.fresh("usr/bin", "", "");
        let name = path["usr/bin/".len()..].to_string();
        p.symlink(&path, &format!("/etc/alternatives/{name}"));
        p.symlink(&format!("etc/alternatives/{name}"), "/usr/bin/bash");
    }

    // /etc.
    p.file("etc/passwd", 0o644, Content::Config(922));
    p.file("etc/group", 0o644, Content::Config(446));
    p.file_owned("etc/shadow", 0o640, 0, 42, Content::Config(501));
    p.file("etc/os-release", 0o644, Content::Config(267));
    p.file(
        "etc/hostname",
        0o644,
        Content::Fixed(b"localhost\n".to_vec()),
    );
    p.file("etc/localtime", 0o644, Content::Binary(114, 50));
    for sub in [
        "",
        "/apt",
        "/apt/apt.conf.d",
        "/default",
        "/init.d",
        "/pam.d",
        "/security",
        "/cron.daily",
        "/logrotate.d",
        "/profile.d",
        "/skel",
        "/systemd/system",
        "/update-motd.d",
        "/dpkg/dpkg.cfg.d",
    ] {
        p.bulk(&format!("etc{sub}"), "", 18, (60, 8_000), Content::Config);
    }
    // CA certificates and their hash symlinks.
    for i in 0..140 {
        let name = p.fresh("usr/share/ca-certificates/mozilla", "", ".crt");
        let size = p.rng.range(1_200, 2_600);
        p.file(&name, 0o644, Content::Random(size));
        let base = name.rsplit('/').next().unwrap_or_default();
        let pem = format!("{}.pem", base.trim_end_matches(".crt"));
        p.symlink(&format!("etc/ssl/certs/{pem}"), &format!("/{name}"));
        p.symlink(&format!("etc/ssl/certs/{:08x}.0", splitmix(i) as u32), &pem);
    }
    p.file(
        "etc/ssl/certs/ca-certificates.crt",
        0o644,
        Content::Prose(213_777),
    );

    // /usr/share: docs, man pages, locales, zoneinfo, terminfo, perl, licences.
    for pkg in PACKAGES {
        let d = format!("usr/share/doc/{pkg}");
        let size = p.rng.log_uniform(800, 40_000);
        p.file(&format!("{d}/copyright"), 0o644, Content::Prose(size));
        let size = p.rng.log_uniform(500, 30_000);
        p.file(
            &format!("{d}/changelog.Debian.gz"),
            0o644,
            Content::Random(size),
        );
        if p.rng.chance(40) {
            let size = p.rng.log_uniform(500, 20_000);
            p.file(&format!("{d}/NEWS.Debian.gz"), 0o644, Content::Random(size));
        }
        let info = format!("var/lib/dpkg/info/{pkg}");
        let size = p.rng.range(200, 20_000);
        p.file(&format!("{info}.list"), 0o644, Content::Config(size));
        let size = p.rng.range(200, 20_000);
        p.file(&format!("{info}.md5sums"), 0o644, Content::Config(size));
        if p.rng.chance(30) {
            let size = p.rng.range(200, 5_000);
            p.file(&format!("{info}.postinst"), 0o755, Content::Config(size));
        }
    }
    for section in ["man1", "man3", "man5", "man7", "man8"] {
        let dir = format!("usr/share/man/{section}");
        p.bulk(&dir, ".gz", 220, (800, 20_000), Content::Random);
    }
    for _ in 0..60 {
        let lang = p.word();
        let dir = format!("usr/share/locale/{lang}/LC_MESSAGES");
        p.bulk(&dir, ".mo", 11, (1_000, 30_000), Content::Prose);
    }
    let zone = |n| Content::Binary(n, 50);
    for region in [
        "Africa",
        "America",
        "Antarctica",
        "Asia",
        "Atlantic",
        "Australia",
        "Europe",
        "Indian",
        "Pacific",
        "Etc",
    ] {
        p.bulk(
            &format!("usr/share/zoneinfo/{region}"),
            "",
            120,
            (110, 3_600),
            zone,
        );
    }
    p.file("usr/share/zoneinfo/UTC", 0o644, Content::Binary(114, 50));
    p.hardlink("usr/share/zoneinfo/Etc/UCT", "usr/share/zoneinfo/UTC");
    p.hardlink("usr/share/zoneinfo/Zulu", "usr/share/zoneinfo/UTC");
    for letter in ["a", "d", "l", "s", "v", "x"] {
        let dir = format!("usr/share/terminfo/{letter}");
        p.bulk(&dir, "", 100, (400, 3_500), zone);
    }
    for sub in ["", "/Pod", "/Unicode", "/Encode", "/unicore"] {
        let dir = format!("usr/share/perl/5.36.0{sub}");
        p.bulk(&dir, ".pm", 160, (500, 40_000), Content::Python);
    }
    p.bulk(
        "usr/share/i18n/locales",
        "",
        400,
        (2_000, 30_000),
        Content::Config,
    );
    p.bulk(
        "usr/share/common-licenses",
        "",
        20,
        (2_000, 35_000),
        Content::Prose,
    );

    // /var: package state, debconf, apt lists (removed again by the app layer).
    p.file("var/lib/dpkg/status", 0o644, Content::Config(412_000));
    p.file(
        "var/cache/debconf/templates.dat",
        0o644,
        Content::Config(1_120_000),
    );
    p.file(
        "var/cache/debconf/templates.dat-old",
        0o644,
        Content::Config(1_090_000),
    );
    p.file(
        "var/cache/debconf/config.dat",
        0o644,
        Content::Config(31_000),
    );
    for name in [
        "deb.debian.org_debian_dists_bookworm_InRelease",
        "deb.debian.org_debian_dists_bookworm_main_binary-amd64_Packages.lz4",
        "deb.debian.org_debian_dists_bookworm-updates_InRelease",
        "deb.debian.org_debian-security_dists_bookworm-security_InRelease",
    ] {
        let size = p.rng.range(50_000, 1_500_000);
        p.file(
            &format!("var/lib/apt/lists/{name}"),
            0o644,
            Content::Config(size),
        );
    }
    p.dir("var/lib/apt/lists/partial");
    p.dir("var/log/apt");
    p.file("var/log/dpkg.log", 0o644, Content::Config(180_000));
    p.dir_mode("var/mail", 0o2775);
    p
}

#[rustfmt::skip]
const STDLIB_IMPORTED: &[&str] = &[
    "encodings/__init__", "encodings/aliases", "encodings/utf_8", "encodings/latin_1", "codecs",
    "io", "abc", "site", "os", "stat", "_collections_abc", "posixpath", "genericpath",
    "_sitebuiltins", "types", "importlib/__init__", "importlib/_abc", "importlib/machinery",
    "importlib/util", "warnings", "enum", "functools", "collections/__init__", "keyword",
    "operator", "reprlib", "re/__init__", "re/_compiler", "re/_parser", "re/_constants",
    "re/_casefix", "copyreg", "contextlib", "typing", "collections/abc", "weakref", "_weakrefset",
    "inspect", "dis", "opcode", "ast", "linecache", "tokenize", "token", "textwrap", "platform",
    "subprocess", "signal", "threading", "selectors", "datetime", "numbers", "decimal",
    "json/__init__", "json/decoder", "json/scanner", "json/encoder", "pickle", "_compat_pickle",
    "struct", "copy", "pathlib", "fnmatch", "ntpath", "urllib/__init__", "urllib/parse",
    "ctypes/__init__", "ctypes/_endian", "base64", "hashlib", "random", "bisect", "string",
    "locale", "tempfile", "shutil", "dataclasses", "traceback", "gettext", "sysconfig",
    "_sysconfigdata__linux_x86_64-linux-gnu", "__future__", "heapq", "importlib/metadata/__init__",
    "email/__init__", "email/parser", "email/feedparser", "email/_policybase", "socket",
];

#[rustfmt::skip]
const STDLIB_EXT_IMPORTED: &[&str] = &[
    "math", "_datetime", "_decimal", "_json", "_struct", "_pickle", "_ctypes", "_hashlib",
    "_random", "_bisect", "_heapq", "_contextvars", "select", "_posixsubprocess", "_opcode",
];

#[rustfmt::skip]
const STDLIB_OTHER: &[&str] = &[
    "aifc", "argparse", "asynchat", "asyncore", "bdb", "cProfile", "cgi", "cgitb", "chunk",
    "cmd", "code", "codeop", "colorsys", "compileall", "configparser", "contextvars", "crypt",
    "difflib", "doctest", "filecmp", "fileinput", "fractions", "ftplib", "getopt", "getpass",
    "glob", "graphlib", "imaplib", "imghdr", "imp", "ipaddress", "mailbox", "mailcap",
    "mimetypes", "modulefinder", "netrc", "nntplib", "nturl2path", "optparse", "pdb",
    "pickletools", "pipes", "pkgutil", "plistlib", "poplib", "pprint", "profile", "pstats",
    "pty", "py_compile", "pyclbr", "pydoc", "queue", "rlcompleter", "runpy", "sched", "shelve",
    "shlex", "smtpd", "smtplib", "sndhdr", "socketserver", "sre_compile", "sre_constants",
    "sre_parse", "ssl", "statistics", "stringprep", "sunau", "symtable", "tabnanny", "tarfile",
    "telnetlib", "this", "timeit", "trace", "tracemalloc", "tty", "turtle", "uu", "wave",
    "webbrowser", "xdrlib", "zipapp", "zipimport", "_markupbase", "_osx_support", "_py_abc",
    "_pyio", "_strptime", "_threading_local", "asyncio/__init__", "asyncio/base_events",
    "asyncio/events", "asyncio/futures", "asyncio/tasks", "asyncio/streams",
    "asyncio/unix_events", "concurrent/__init__", "concurrent/futures/__init__",
    "concurrent/futures/_base", "concurrent/futures/thread", "concurrent/futures/process",
    "logging/__init__", "logging/config", "logging/handlers", "http/__init__", "http/client",
    "http/server", "http/cookies", "html/__init__", "html/parser", "html/entities",
    "xml/__init__", "xml/etree/__init__", "xml/etree/ElementTree", "xml/dom/__init__",
    "xml/dom/minidom", "xml/sax/__init__", "sqlite3/__init__", "sqlite3/dbapi2",
    "unittest/__init__", "unittest/case", "unittest/mock", "urllib/request",
    "urllib/response", "urllib/error", "wsgiref/__init__", "tomllib/__init__",
    "tomllib/_parser", "multiprocessing/__init__", "multiprocessing/context",
    "multiprocessing/pool", "multiprocessing/process", "email/message", "email/generator",
    "email/policy", "email/mime/__init__", "email/mime/text", "email/mime/multipart",
    "ctypes/util", "venv/__init__", "ensurepip/__init__",
];

/// python3.11 from Debian (interpreter, libpython, the standard library with its pycs and
/// lib-dynload extensions), plus pip and setuptools.
fn python_layer() -> Plan {
    let mut p = Plan::new(2);
    p.entry_file("usr/bin/python3.11", 0o755, Content::Binary(6_831_736, 30));
    p.symlink("usr/bin/python3", "python3.11");
    p.symlink("usr/bin/python", "python3");
    p.entry_file(
        &format!("{MULTIARCH}/libpython3.11.so.1.0"),
        0o644,
        Content::Binary(7_375_104, 30),
    );
    p.symlink(
        &format!("{MULTIARCH}/libpython3.11.so.1"),
        "libpython3.11.so.1.0",
    );
    p.file(
        &format!("{MULTIARCH}/libmpdec.so.3"),
        0o644,
        Content::Binary(225_000, 30),
    );
    // ld.so.cache and the package database are rewritten by every apt install.
    p.file("etc/ld.so.cache", 0o644, Content::Binary(25_000, 20));
    p.file("var/lib/dpkg/status", 0o644, Content::Config(431_000));
    for pkg in [
        "python3.11",
        "python3.11-minimal",
        "libpython3.11",
        "libpython3.11-minimal",
        "libpython3.11-stdlib",
        "python3",
        "python3-minimal",
        "libmpdec3",
    ] {
        let size = p.rng.range(2_000, 200_000);
        p.file(
            &format!("var/lib/dpkg/info/{pkg}.list"),
            0o644,
            Content::Config(size),
        );
        let size = p.rng.log_uniform(800, 40_000);
        p.file(
            &format!("usr/share/doc/{pkg}/copyright"),
            0o644,
            Content::Prose(size),
        );
    }

    for m in STDLIB_IMPORTED {
        p.py_module(STDLIB, m, true);
    }
    let dynload = format!("{STDLIB}/lib-dynload");
    for m in STDLIB_EXT_IMPORTED {
        let size = p.rng.log_uniform(20_000, 400_000);
        p.entry_file(
            &format!("{dynload}/{m}{EXT}"),
            0o644,
            Content::Binary(size, 30),
        );
    }
    for _ in 0..50 {
        let path = p.fresh(&dynload, "_", EXT);
        let size = p.rng.log_uniform(20_000, 300_000);
        p.file(&path, 0o644, Content::Binary(size, 30));
    }
    p.py_module_sized(STDLIB, "pydoc_data/topics", false, 729_000);
    p.py_module_sized(STDLIB, "_pydecimal", false, 229_000);
    for m in STDLIB_OTHER {
        p.py_module(STDLIB, m, false);
    }
    for (pkg, n) in [
        ("asyncio", 25),
        ("email", 20),
        ("encodings", 110),
        ("lib2to3", 30),
        ("lib2to3/fixes", 52),
        ("lib2to3/pgen2", 9),
        ("idlelib", 120),
        ("tkinter", 14),
        ("distutils", 30),
        ("distutils/command", 25),
        ("multiprocessing", 20),
        ("xml/dom", 8),
        ("xml/sax", 7),
        ("xmlrpc", 3),
        ("curses", 6),
        ("dbm", 4),
        ("unittest", 10),
        ("turtledemo", 24),
        ("ctypes/macholib", 4),
        ("json", 1),
        ("test/support", 20),
        ("test", 1_100),
    ] {
        p.py_package(&format!("{STDLIB}/{pkg}"), n);
    }
    p.file(
        &format!("{STDLIB}/config-3.11-x86_64-linux-gnu/Makefile"),
        0o644,
        Content::Config(155_000),
    );
    p.bulk(
        "usr/include/python3.11",
        ".h",
        90,
        (500, 40_000),
        Content::Python,
    );
    p.bulk(
        "usr/include/python3.11/cpython",
        ".h",
        60,
        (500, 30_000),
        Content::Python,
    );

    // pip and setuptools, as in the python images.
    for (pkg, subs) in [
        (
            "pip",
            &[
                "_internal",
                "_internal/commands",
                "_internal/operations",
                "_vendor",
                "_vendor/rich",
                "_vendor/pygments",
                "_vendor/urllib3",
                "_vendor/requests",
                "_vendor/pkg_resources",
                "_vendor/packaging",
                "_vendor/chardet",
            ][..],
        ),
        (
            "setuptools",
            &[
                "",
                "command",
                "_distutils",
                "_distutils/command",
                "_vendor",
                "_vendor/packaging",
                "config",
                "extern",
            ][..],
        ),
    ] {
        for sub in subs {
            let dir = format!("{SITE}/{pkg}/{sub}");
            p.py_package(dir.trim_end_matches('/'), 36);
        }
    }
    p.dist_info("pip", "23.3.1", 900);
    p.dist_info("setuptools", "69.0.2", 500);
    p.file("usr/local/bin/pip", 0o755, Content::Python(231));
    p.symlink("usr/local/bin/pip3", "pip");
    p
}

#[rustfmt::skip]
const NUMPY_IMPORTED: &[&str] = &[
    "__init__", "_globals", "_distributor_init", "__config__", "version", "_utils/__init__",
    "_utils/_inspect", "_utils/_convertions", "core/__init__", "core/multiarray", "core/umath",
    "core/overrides", "core/numerictypes", "core/_string_helpers", "core/_type_aliases",
    "core/_dtype", "core/numeric", "core/shape_base", "core/_ufunc_config", "core/arrayprint",
    "core/fromnumeric", "core/_methods", "core/_exceptions", "core/_asarray", "core/einsumfunc",
    "core/function_base", "core/getlimits", "core/_add_newdocs", "core/_internal", "lib/__init__",
    "lib/type_check", "lib/index_tricks", "lib/function_base", "lib/nanfunctions",
    "lib/shape_base", "lib/stride_tricks", "lib/twodim_base", "lib/polynomial", "lib/utils",
    "lib/arraysetops", "lib/npyio", "lib/_datasource", "lib/_iotools", "lib/format",
    "linalg/__init__", "linalg/linalg", "linalg/_umath_linalg.so", "fft/__init__",
    "fft/_pocketfft", "fft/_pocketfft_internal.so", "fft/helper", "polynomial/__init__",
    "polynomial/polynomial", "polynomial/polyutils", "polynomial/_polybase", "random/__init__",
    "random/_pickle", "random/mtrand.so", "random/bit_generator.so", "random/_common.so",
    "random/_bounded_integers.so", "random/_generator.so", "random/_mt19937.so",
    "random/_pcg64.so", "ctypeslib", "ma/__init__", "ma/core", "ma/extras", "matrixlib/__init__",
    "matrixlib/defmatrix", "compat/__init__", "exceptions", "dtypes",
];

/// pip-installed numpy and scipy with their bundled OpenBLAS builds.
fn numpy_scipy_layer() -> Plan {
    let mut p = Plan::new(3);
    let np = format!("{SITE}/numpy");
    let libs = format!("{SITE}/numpy.libs");
    p.entry_file(
        &format!("{np}/core/_multiarray_umath{EXT}"),
        0o755,
        Content::Binary(10 << 20, 30),
    );
    p.entry_file(
        &format!("{libs}/libopenblas64_p-r0-0cf96a72.3.23.dev.so"),
        0o755,
        Content::Binary(35 << 20, 25),
    );
    p.entry_file(
        &format!("{libs}/libgfortran-040039e1.so.5.0.0"),
        0o755,
        Content::Binary(2_686_064, 30),
    );
    p.entry_file(
        &format!("{libs}/libquadmath-96973f99.so.0.0.0"),
        0o755,
        Content::Binary(250_985, 30),
    );
    p.py_modules(&np, NUMPY_IMPORTED, true);
    p.file(
        &format!("{np}/core/_simd{EXT}"),
        0o755,
        Content::Binary(3_527_040, 30),
    );
    for (pkg, n) in [
        ("core", 20),
        ("core/tests", 100),
        ("lib/tests", 40),
        ("linalg/tests", 6),
        ("ma/tests", 10),
        ("random/tests", 12),
        ("polynomial/tests", 10),
        ("f2py", 25),
        ("f2py/tests", 60),
        ("distutils", 40),
        ("distutils/command", 20),
        ("distutils/fcompiler", 18),
        ("typing", 6),
        ("typing/tests", 8),
        ("testing", 6),
        ("testing/_private", 6),
        ("tests", 20),
        ("_typing", 12),
        ("array_api", 16),
        ("doc", 4),
    ] {
        p.py_package(&format!("{np}/{pkg}"), n);
    }
    for sub in ["", "/core", "/lib", "/random", "/fft", "/ma"] {
        p.bulk(
            &format!("{np}{sub}"),
            ".pyi",
            24,
            (500, 30_000),
            Content::Python,
        );
    }
    let headers = format!("{np}/core/include/numpy");
    p.bulk(&headers, ".h", 60, (500, 60_000), Content::Python);
    p.dist_info("numpy", "1.26.4", 1_400);
    p.symlink(
        "usr/local/bin/f2py",
        "/usr/local/lib/python3.11/site-packages/numpy/f2py/f2py2e.py",
    );

    // scipy: ~1,200 modules with pycs, ~50 extension modules, its own OpenBLAS.
    let sp = format!("{SITE}/scipy");
    let splibs = format!("{SITE}/scipy.libs");
    p.file(
        &format!("{splibs}/libopenblasp-r0-23e5df77.3.21.dev.so"),
        0o755,
        Content::Binary(24 << 20, 25),
    );
    p.file(
        &format!("{splibs}/libgfortran-040039e1.so.5.0.0"),
        0o755,
        Content::Binary(2_686_064, 30),
    );
    for sub in [
        "cluster",
        "constants",
        "datasets",
        "fft",
        "fftpack",
        "integrate",
        "interpolate",
        "io",
        "io/matlab",
        "linalg",
        "misc",
        "ndimage",
        "odr",
        "optimize",
        "optimize/_highs",
        "signal",
        "sparse",
        "sparse/linalg",
        "sparse/csgraph",
        "spatial",
        "special",
        "stats",
        "_lib",
    ] {
        let dir = format!("{sp}/{sub}");
        p.py_package(&dir, 22);
        p.py_package(&format!("{dir}/tests"), 28);
        for _ in 0..2 {
            let path = p.fresh(&dir, "_", EXT);
            let size = p.rng.log_uniform(80_000, 800_000);
            p.file(&path, 0o755, Content::Binary(size, 30));
        }
    }
    let data = format!("{sp}/special/tests/data");
    p.bulk(&data, ".npz", 80, (1_000, 200_000), Content::Random);
    p.dist_info("scipy", "1.11.4", 2_300);
    p
}

#[rustfmt::skip]
const PANDAS_IMPORTED: &[&str] = &[
    "__init__", "_typing", "_version", "_config/__init__", "_config/config", "_libs/__init__",
    "_libs/interval.so", "_libs/hashtable.so", "_libs/lib.so", "_libs/missing.so",
    "_libs/tslib.so", "_libs/algos.so", "_libs/groupby.so", "_libs/index.so", "_libs/internals.so",
    "_libs/join.so", "_libs/ops.so", "_libs/parsers.so", "_libs/pandas_datetime.so",
    "_libs/pandas_parser.so", "_libs/window/aggregations.so", "_libs/tslibs/__init__",
    "_libs/tslibs/base.so", "_libs/tslibs/ccalendar.so", "_libs/tslibs/conversion.so",
    "_libs/tslibs/dtypes.so", "_libs/tslibs/fields.so", "_libs/tslibs/nattype.so",
    "_libs/tslibs/np_datetime.so", "_libs/tslibs/offsets.so", "_libs/tslibs/parsing.so",
    "_libs/tslibs/period.so", "_libs/tslibs/timedeltas.so", "_libs/tslibs/timestamps.so",
    "_libs/tslibs/timezones.so", "_libs/tslibs/tzconversion.so", "compat/__init__",
    "compat/_optional", "compat/numpy/__init__", "compat/numpy/function", "compat/pyarrow",
    "core/__init__", "core/algorithms", "core/api", "core/apply", "core/base", "core/common",
    "core/construction", "core/frame", "core/generic", "core/indexing", "core/missing",
    "core/nanops", "core/series", "core/sorting", "core/arrays/__init__", "core/arrays/base",
    "core/arrays/categorical", "core/arrays/datetimelike", "core/arrays/datetimes",
    "core/arrays/masked", "core/arrays/numpy_", "core/arrays/string_", "core/dtypes/__init__",
    "core/dtypes/base", "core/dtypes/cast", "core/dtypes/common", "core/dtypes/dtypes",
    "core/dtypes/missing", "core/groupby/__init__", "core/groupby/groupby",
    "core/indexes/__init__", "core/indexes/api", "core/indexes/base", "core/indexes/datetimes",
    "core/indexes/multi", "core/indexes/range", "core/internals/__init__", "core/internals/blocks",
    "core/internals/managers", "core/reshape/__init__", "core/reshape/concat",
    "core/tools/__init__", "core/tools/datetimes", "core/ops/__init__", "core/ops/array_ops",
    "core/window/__init__", "io/__init__", "io/api", "io/common", "io/formats/__init__",
    "io/formats/format", "io/formats/printing", "util/__init__", "util/_decorators",
    "util/_exceptions", "util/_validators", "errors/__init__", "tseries/__init__",
    "tseries/offsets",
];

#[rustfmt::skip]
const FRIENDS_IMPORTED: &[&str] = &[
    "pytz/__init__", "pytz/exceptions", "pytz/lazy", "pytz/tzinfo", "pytz/tzfile",
    "dateutil/__init__", "dateutil/_version", "dateutil/_common", "dateutil/relativedelta",
    "dateutil/tz/__init__", "dateutil/tz/tz", "dateutil/tz/_common", "dateutil/tz/_factories",
    "dateutil/parser/__init__", "dateutil/parser/_parser", "dateutil/parser/isoparser",
    "dateutil/easter", "six", "pyarrow/__init__", "pyarrow/_generated_version", "pyarrow/util",
    "pyarrow/types",
];

/// pandas, pyarrow, pytz, dateutil, tzdata, six.
fn pandas_layer() -> Plan {
    let mut p = Plan::new(4);
    let pa = format!("{SITE}/pyarrow");
    p.py_modules(SITE, FRIENDS_IMPORTED, true);
    p.entry_file(
        &format!("{pa}/libarrow.so.1400"),
        0o755,
        Content::Binary(40 << 20, 25),
    );
    p.entry_file(
        &format!("{pa}/libarrow_python.so.1400"),
        0o755,
        Content::Binary(2_722_048, 30),
    );
    p.entry_file(
        &format!("{pa}/lib{EXT}"),
        0o755,
        Content::Binary(4_896_312, 30),
    );
    let pd = format!("{SITE}/pandas");
    p.py_modules(&pd, PANDAS_IMPORTED, true);
    for (name, size) in [
        ("libparquet.so.1400", 4_412_104),
        ("libarrow_dataset.so.1400", 2_401_320),
        ("libarrow_acero.so.1400", 1_905_688),
        ("libarrow_substrait.so.1400", 3_105_064),
    ] {
        p.file(&format!("{pa}/{name}"), 0o755, Content::Binary(size, 30));
    }
    for _ in 0..16 {
        let path = p.fresh(&pa, "_", EXT);
        let size = p.rng.log_uniform(100_000, 800_000);
        p.file(&path, 0o755, Content::Binary(size, 30));
    }
    p.py_package(&pa, 40);
    p.py_package(&format!("{pa}/tests"), 90);
    p.bulk(&pa, ".pxd", 120, (500, 30_000), Content::Python);
    for sub in ["", "/compute", "/io", "/util", "/c", "/python/arrow/python"] {
        let dir = format!("{pa}/include/arrow{sub}");
        p.bulk(&dir, ".h", 70, (500, 40_000), Content::Python);
    }
    for (pkg, n) in [
        ("core", 30),
        ("core/arrays", 20),
        ("core/arrays/arrow", 6),
        ("core/arrays/sparse", 5),
        ("core/computation", 12),
        ("core/strings", 4),
        ("io", 20),
        ("io/excel", 10),
        ("io/json", 6),
        ("io/parsers", 6),
        ("io/sas", 6),
        ("plotting", 6),
        ("plotting/_matplotlib", 14),
        ("api", 6),
        ("arrays", 1),
        ("testing", 1),
        ("_testing", 8),
    ] {
        p.py_package(&format!("{pd}/{pkg}"), n);
    }
    for sub in [
        "arithmetic",
        "arrays",
        "base",
        "computation",
        "config",
        "construction",
        "copy_view",
        "dtypes",
        "extension",
        "frame",
        "generic",
        "groupby",
        "indexes",
        "indexing",
        "interchange",
        "internals",
        "io",
        "io/formats",
        "io/parser",
        "io/json",
        "libs",
        "plotting",
        "reductions",
        "resample",
        "reshape",
        "scalar",
        "series",
        "strings",
        "tools",
        "tseries",
        "tslibs",
        "util",
        "window",
    ] {
        p.py_package(&format!("{pd}/tests/{sub}"), 36);
    }
    p.dist_info("pandas", "2.1.4", 2_000);
    p.dist_info("pyarrow", "14.0.2", 1_000);
    p.dist_info("pytz", "2023.3", 620);
    p.dist_info("python_dateutil", "2.8.2", 50);
    p.dist_info("tzdata", "2023.4", 620);
    p.dist_info("six", "1.16.0", 8);
    // Zone files, twice over: pytz's and tzdata's.
    let zone = |n| Content::Binary(n, 50);
    for root in ["pytz/zoneinfo", "tzdata/zoneinfo"] {
        for region in ["Africa", "America", "Asia", "Europe", "Pacific", "Etc"] {
            let dir = format!("{SITE}/{root}/{region}");
            p.bulk(&dir, "", 150, (110, 3_600), zone);
        }
    }
    p
}

/// The application: a few modules and data; `etc/passwd` and `etc/group` overwritten (a user
/// added), `usr/share/doc/perl-base` and `var/cache/debconf/templates.dat-old` deleted,
/// `var/lib/apt/lists` emptied (opaque).
fn app_layer() -> Plan {
    let mut p = Plan::new(5);
    p.file("etc/passwd", 0o644, Content::Config(980));
    p.file("etc/group", 0o644, Content::Config(470));
    p.file(
        "usr/share/doc/.wh.perl-base",
        0o644,
        Content::Fixed(Vec::new()),
    );
    p.file(
        "var/cache/debconf/.wh.templates.dat-old",
        0o644,
        Content::Fixed(Vec::new()),
    );
    p.file(
        "var/lib/apt/lists/.wh..wh..opq",
        0o644,
        Content::Fixed(Vec::new()),
    );
    p.dir("var/lib/apt/lists/partial");
    p.file_owned("app/main.py", 0o755, 1000, 1000, Content::Python(4_200));
    for _ in 0..30 {
        let path = p.fresh("app/service", "", ".py");
        let size = p.py_size();
        p.file_owned(&path, 0o644, 1000, 1000, Content::Python(size));
    }
    p.file_owned(
        "app/requirements.txt",
        0o644,
        1000,
        1000,
        Content::Config(120),
    );
    p.file_owned(
        "app/data/model.bin",
        0o644,
        1000,
        1000,
        Content::Binary(1_800_000, 60),
    );
    p
}

// ---------------------------------------------------------------------------------------------
// Tar output.

fn build_tar(plan: &Plan, seed: u64, mtime: u64) -> Vec<u8> {
    let bytes: u64 = plan
        .items
        .iter()
        .map(|i| match i {
            Item::File { content, .. } => content.len() + 1536,
            _ => 1024,
        })
        .sum();
    let mut b = tar::Builder::new(Vec::with_capacity(bytes as usize + 4096));
    let mut buf = Vec::new();
    for item in &plan.items {
        let mut h = tar::Header::new_gnu();
        h.set_mtime(mtime);
        h.set_uid(0);
        h.set_gid(0);
        h.set_size(0);
        let result = match item {
            Item::Dir { path, mode } => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(*mode);
                b.append_data(&mut h, format!("{path}/"), std::io::empty())
            }
            Item::File {
                path,
                mode,
                uid,
                gid,
                content,
            } => {
                let mut rng = Rng::new(seed ^ fnv1a(path.as_bytes()));
                content.generate(&mut buf, &mut rng);
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_uid(*uid);
                h.set_gid(*gid);
                h.set_size(buf.len() as u64);
                b.append_data(&mut h, path, &buf[..])
            }
            Item::Symlink { path, target } => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                b.append_link(&mut h, path, target)
            }
            Item::Hardlink { path, target } => {
                h.set_entry_type(tar::EntryType::Link);
                h.set_mode(0o644);
                b.append_link(&mut h, path, target)
            }
        };
        result.expect("appending to an in-memory tar");
    }
    b.into_inner().expect("finishing an in-memory tar")
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::io::{Read, Write};

    use super::*;

    fn gz_ratio(data: &[u8]) -> f64 {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(data).unwrap();
        data.len() as f64 / enc.finish().unwrap().len() as f64
    }

    /// The first file whose path ends with `suffix` and that has at least `min` bytes.
    fn sample(layers: &[Vec<u8>], suffix: &str, min: u64) -> Vec<u8> {
        for layer in layers {
            let mut ar = tar::Archive::new(&layer[..]);
            for e in ar.entries().unwrap() {
                let mut e = e.unwrap();
                let p = e.path().unwrap().to_string_lossy().into_owned();
                if p.ends_with(suffix) && e.size() >= min {
                    let mut v = Vec::new();
                    e.read_to_end(&mut v).unwrap();
                    return v;
                }
            }
        }
        panic!("no {suffix} file of {min} bytes or more");
    }

    #[test]
    fn shape_content_and_entry_points() {
        let start = std::time::Instant::now();
        let layers = realistic_layers(7);
        let took = start.elapsed();
        let mut files = 0usize;
        let mut bytes = 0u64;
        let mut kinds: HashMap<String, (usize, u64)> = HashMap::new();
        // The merged image: path -> entry type, whiteouts applied.
        let mut merged: HashMap<String, (tar::EntryType, u64)> = HashMap::new();
        for layer in &layers {
            let mut ar = tar::Archive::new(&layer[..]);
            for e in ar.entries().unwrap() {
                let e = e.unwrap();
                let path = e.path().unwrap().to_string_lossy().into_owned();
                let path = path.trim_end_matches('/').to_string();
                let kind = e.header().entry_type();
                let name = path.rsplit('/').next().unwrap().to_string();
                let parent = path.rsplit_once('/').map(|x| x.0).unwrap_or("").to_string();
                if name == ".wh..wh..opq" {
                    merged.retain(|k, _| !k.starts_with(&format!("{parent}/")));
                    continue;
                }
                if let Some(gone) = name.strip_prefix(".wh.") {
                    let victim = format!("{parent}/{gone}");
                    merged.retain(|k, _| *k != victim && !k.starts_with(&format!("{victim}/")));
                    continue;
                }
                if kind.is_file() {
                    files += 1;
                    bytes += e.size();
                    let ext = name.rsplit_once('.').map(|x| x.1).unwrap_or("").to_string();
                    let k = kinds.entry(ext).or_default();
                    k.0 += 1;
                    k.1 += e.size();
                }
                merged.insert(path, (kind, e.size()));
            }
        }
        let tar_bytes: usize = layers.iter().map(Vec::len).sum();
        println!(
            "{} layers, {files} files, {} MB of file data, {} MB of tar, built in {took:?}",
            layers.len(),
            bytes / 1_000_000,
            tar_bytes / 1_000_000
        );
        for (i, l) in layers.iter().enumerate() {
            println!("  layer {i}: {} MB", l.len() / 1_000_000);
        }
        let mut k: Vec<_> = kinds.into_iter().collect();
        k.sort_by_key(|x| std::cmp::Reverse(x.1 .1));
        for (ext, (n, b)) in k.iter().take(10) {
            println!("  .{ext:10} {n:6} files {:8} KB", b / 1000);
        }
        let py = gz_ratio(&sample(&layers, ".py", 20_000));
        let pyc = gz_ratio(&sample(&layers, ".pyc", 10_000));
        let arrow = gz_ratio(&sample(&layers, "libarrow.so.1400", 0));
        let ext = gz_ratio(&sample(&layers, EXT, 500_000));
        println!("gzip ratios: py {py:.2} pyc {pyc:.2} libarrow {arrow:.2} ext {ext:.2}");

        assert!(layers.len() >= 5);
        assert!(files >= 20_000, "{files} files");
        assert!(bytes >= 300_000_000, "{bytes} bytes");
        assert_eq!(realistic_totals().0, bytes);
        assert!((3.0..6.0).contains(&py), "py {py}");
        assert!((1.8..4.0).contains(&pyc), "pyc {pyc}");
        assert!((2.0..3.0).contains(&arrow), "libarrow {arrow}");

        // Deterministic, and the seed changes content.
        assert_eq!(realistic_layers(7)[4], layers[4]);
        assert_ne!(realistic_layers(8)[4], layers[4]);

        // Entry points: distinct regular files of the merged image.
        let entry = entry_point_files();
        assert!((250..=400).contains(&entry.len()), "{}", entry.len());
        let unique: HashSet<&String> = entry.iter().collect();
        assert_eq!(unique.len(), entry.len(), "duplicate entry points");
        let mut entry_bytes = 0;
        for e in &entry {
            let (kind, size) = merged
                .get(e)
                .copied()
                .unwrap_or_else(|| panic!("{e} missing"));
            assert_eq!(kind, tar::EntryType::Regular, "{e}");
            entry_bytes += size;
        }
        println!(
            "{} entry point files, {} MB",
            entry.len(),
            entry_bytes / 1_000_000
        );
        // Whiteouts took effect.
        assert!(!merged.contains_key("usr/share/doc/perl-base/copyright"));
        assert!(!merged.contains_key("var/cache/debconf/templates.dat-old"));
        assert!(merged.contains_key("var/cache/debconf/templates.dat"));
        assert!(!merged
            .keys()
            .any(|k| k.starts_with("var/lib/apt/lists/deb.")));
    }
}
