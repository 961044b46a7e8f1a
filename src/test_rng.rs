//! Seeded pseudo-random numbers for the unit tests: the same inputs on every run and machine.

/// xorshift32; quality is irrelevant for test inputs.
pub(crate) struct TestRng(u32);

impl TestRng {
    pub fn new(seed: u32) -> Self {
        Self(seed.wrapping_mul(2_654_435_761) | 1)
    }

    /// Uniform in [0, 1), on a 2^-24 grid.
    pub fn unit(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 17;
        self.0 ^= self.0 << 5;
        (self.0 >> 8) as f32 / (1u32 << 24) as f32
    }
}
