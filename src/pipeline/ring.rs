//! The last N values of a measurement, in a buffer allocated once: the budget controller's
//! recent costs and the run's latency samples both keep one.

/// The last `capacity` values pushed; once full, each push overwrites the oldest. Pushing
/// never allocates.
#[derive(Debug, Clone)]
pub struct Ring<T> {
    values: Vec<T>,
    capacity: usize,
    /// Once full, the index of the oldest value, which the next push replaces.
    oldest: usize,
}

impl<T: Copy> Ring<T> {
    pub fn with_capacity(capacity: usize) -> Self {
        assert!(capacity > 0, "a ring holds at least one value");
        Self {
            values: Vec::with_capacity(capacity),
            capacity,
            oldest: 0,
        }
    }

    pub fn push(&mut self, v: T) {
        if self.values.len() < self.capacity {
            self.values.push(v);
        } else {
            self.values[self.oldest] = v;
            self.oldest = (self.oldest + 1) % self.capacity;
        }
    }

    /// The values held, in no particular order.
    pub fn values(&self) -> &[T] {
        &self.values
    }
}

#[cfg(test)]
mod tests {
    use super::Ring;

    #[test]
    fn keeps_the_last_capacity_values_in_the_first_buffer() {
        let mut ring = Ring::with_capacity(3);
        let buffer = ring.values().as_ptr();
        for (pushed, held) in [
            (1, vec![1]),
            (2, vec![1, 2]),
            (3, vec![1, 2, 3]),
            (4, vec![2, 3, 4]),
            (5, vec![3, 4, 5]),
            (6, vec![4, 5, 6]),
            (7, vec![5, 6, 7]),
        ] {
            ring.push(pushed);
            let mut values = ring.values().to_vec();
            values.sort_unstable();
            assert_eq!(values, held, "after pushing {pushed}");
        }
        assert_eq!(ring.values().as_ptr(), buffer, "the ring reallocated");
    }
}
