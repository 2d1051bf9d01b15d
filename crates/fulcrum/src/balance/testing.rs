//! Test helpers: loads held in plain vectors.

use super::Loads;

/// Loads set by the test.
#[derive(Debug, Clone)]
pub(super) struct FixedLoads {
    pub(super) in_flight: Vec<u64>,
    pub(super) latency_ns: Vec<u64>,
    pub(super) available: Vec<bool>,
}

impl FixedLoads {
    /// `n` available servers, idle, without latency samples.
    pub(super) fn idle(n: usize) -> Self {
        FixedLoads {
            in_flight: vec![0; n],
            latency_ns: vec![0; n],
            available: vec![true; n],
        }
    }

    /// Available servers with these in-flight counts.
    pub(super) fn in_flight(in_flight: &[u64]) -> Self {
        FixedLoads {
            in_flight: in_flight.to_vec(),
            ..Self::idle(in_flight.len())
        }
    }

    /// Available idle servers with these latency estimates.
    pub(super) fn latency(latency_ns: &[u64]) -> Self {
        FixedLoads {
            latency_ns: latency_ns.to_vec(),
            ..Self::idle(latency_ns.len())
        }
    }
}

impl Loads for FixedLoads {
    fn len(&self) -> usize {
        self.available.len()
    }

    fn in_flight(&self, i: usize) -> u64 {
        self.in_flight[i]
    }

    fn latency_ns(&self, i: usize) -> u64 {
        self.latency_ns[i]
    }

    fn available(&self, i: usize) -> bool {
        self.available[i]
    }
}
