//! Latency samples and the summary printed at the end.

use std::time::Duration;

/// Latencies in nanoseconds, pre-allocated.
#[derive(Debug)]
pub struct Latencies {
    samples: Vec<u64>,
}

impl Latencies {
    /// Room for `n` samples before growing.
    pub fn with_capacity(n: usize) -> Self {
        Latencies {
            samples: Vec::with_capacity(n),
        }
    }

    /// Records one latency.
    pub fn push(&mut self, d: Duration) {
        self.samples
            .push(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    }

    /// Merges another set.
    pub fn extend(&mut self, other: Latencies) {
        self.samples.extend(other.samples);
    }

    /// Percentile `p` (0..=100) in microseconds; sorts in place.
    pub fn percentile_us(&mut self, p: f64) -> f64 {
        if self.samples.is_empty() {
            return 0.0;
        }
        self.samples.sort_unstable();
        let rank = ((p / 100.0) * (self.samples.len() - 1) as f64).round() as usize;
        self.samples[rank.min(self.samples.len() - 1)] as f64 / 1000.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let mut l = Latencies::with_capacity(100);
        for i in 1..=100u64 {
            l.push(Duration::from_micros(i));
        }
        assert_eq!(l.percentile_us(50.0), 51.0);
        assert_eq!(l.percentile_us(99.0), 99.0);
        assert_eq!(l.percentile_us(100.0), 100.0);
        assert_eq!(Latencies::with_capacity(0).percentile_us(50.0), 0.0);
    }
}
