//! Deterministic test data and its hashes.
//!
//! A stream is a repeating 1 MiB pseudo-random block, each repetition
//! transformed by its index (so blocks differ across the first 64 GiB) and
//! cheap to produce at several GB/s. Receivers hash with SHA-256.

use sha2::{Digest, Sha256};

const BLOCK: usize = 1 << 20;

/// Produces `len` bytes of the stream for `seed`, in chunks.
pub struct Pattern {
    block: Vec<u8>,
    pos: u64,
    len: u64,
}

impl Pattern {
    pub fn new(seed: u64, len: u64) -> Pattern {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut block = vec![0u8; BLOCK];
        for chunk in block.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
        }
        Pattern { block, pos: 0, len }
    }

    /// The next chunk (at most 64 KiB), or None at the end.
    pub fn next_chunk(&mut self, buf: &mut [u8]) -> Option<usize> {
        if self.pos >= self.len {
            return None;
        }
        let off = (self.pos as usize) % BLOCK;
        let rep = self.pos / BLOCK as u64;
        let (add, xor) = (rep as u8, (rep >> 8) as u8);
        let n = buf
            .len()
            .min(BLOCK - off)
            .min((self.len - self.pos) as usize);
        for (d, s) in buf[..n].iter_mut().zip(&self.block[off..off + n]) {
            *d = s.wrapping_add(add) ^ xor;
        }
        self.pos += n as u64;
        Some(n)
    }
}

/// The SHA-256 of the stream (seed, len), as hex.
pub fn expected_hash(seed: u64, len: u64) -> String {
    let mut p = Pattern::new(seed, len);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    while let Some(n) = p.next_chunk(&mut buf) {
        h.update(&buf[..n]);
    }
    hex(&h.finalize())
}

/// Lower-case hex.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A running count and SHA-256 of received bytes.
#[derive(Default)]
pub struct Tally {
    pub count: u64,
    h: Sha256,
}

impl Tally {
    pub fn add(&mut self, b: &[u8]) {
        self.count += b.len() as u64;
        self.h.update(b);
    }
    pub fn finish(self) -> (u64, String) {
        (self.count, hex(&self.h.finalize()))
    }
}
