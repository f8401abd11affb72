//! Deterministic pseudo-random data for tests and benches: the same seed gives the same
//! bytes on every run and machine, different seeds give unrelated bytes, and nothing compresses
//! (so chunking, zstd frames and cache sizes behave as with real binary data). Not for anything
//! that needs unpredictability.

/// xorshift64: a fast generator of well-spread `u64`s.
#[derive(Debug, Clone)]
pub struct XorShift(u64);

impl XorShift {
    /// A generator for `seed`; every seed (0 too) gives a usable, distinct sequence.
    pub fn new(seed: u64) -> XorShift {
        XorShift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// A value in `0..bound` (`bound` > 0; the slight modulo bias does not matter here).
    pub fn below(&mut self, bound: u64) -> u64 {
        self.next_u64() % bound
    }

    /// Fills `buf` with bytes of this sequence.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            *b = (self.next_u64() >> 24) as u8;
        }
    }
}

/// `len` pseudo-random bytes for `seed`.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    XorShift::new(seed).fill(&mut v);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_repeat_and_differ() {
        assert_eq!(pseudo_random(4096, 7), pseudo_random(4096, 7));
        assert_ne!(pseudo_random(4096, 7), pseudo_random(4096, 8));
        assert_ne!(pseudo_random(64, 0), vec![0u8; 64]);
        let mut g = XorShift::new(1);
        assert!((0..1000).all(|_| g.below(10) < 10));
    }
}
