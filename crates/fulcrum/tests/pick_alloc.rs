//! A pick never allocates: a counting global allocator watches 10 000 picks of every algorithm.
//!
//! A test binary of its own, because it replaces the global allocator. Allocations are counted per
//! thread, so the test harness's own threads do not disturb the count.

// A `GlobalAlloc` impl is unsafe by definition; it only forwards to the system allocator.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use fulcrum::balance::{hash_key, Loads, Selector, SelectorOptions, ServerSpec};
use fulcrum::config::Algorithm;

struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: every call is forwarded unchanged to `System`; the counter is a const-initialised
// thread-local without destructor, so touching it never allocates or re-enters the allocator.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.with(|a| a.set(a.get() + 1));
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.with(|a| a.set(a.get() + 1));
        // SAFETY: same contract as our caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

/// Some servers busy, one slow, one down.
struct Mixed {
    in_flight: Vec<u64>,
    latency_ns: Vec<u64>,
    available: Vec<bool>,
}

impl Loads for Mixed {
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

#[test]
fn picks_of_every_algorithm_do_not_allocate() {
    // The counter works: building a vector is seen.
    let before = allocations();
    std::hint::black_box(vec![0u8; 16]);
    assert_eq!(allocations() - before, 1);

    // 64 servers take the exact paths; 1,000 the sampled, ring-backed and indexed ones.
    for n in [64usize, 1_000] {
        picks_do_not_allocate(n);
    }
}

fn picks_do_not_allocate(n: usize) {
    let names: Vec<String> = (0..n).map(|i| format!("10.0.0.{i}:80")).collect();
    let servers: Vec<ServerSpec<'_>> = names
        .iter()
        .enumerate()
        .map(|(i, id)| ServerSpec {
            id,
            weight: 1 + (i as u32 % 4),
        })
        .collect();
    let loads = Mixed {
        in_flight: (0..n as u64).map(|i| i * 7 % 11).collect(),
        latency_ns: (0..n as u64).map(|i| 1_000_000 + i * 10_000).collect(),
        available: (0..n).map(|i| i % 9 != 4).collect(),
    };
    let bounded = SelectorOptions {
        hash_balance_factor: Some(125),
        ..SelectorOptions::default()
    };
    for opts in [SelectorOptions::default(), bounded] {
        for algorithm in Algorithm::ALL {
            let selector = Selector::new(algorithm, &servers, &opts);
            let before = allocations();
            let mut sum = 0usize;
            for k in 0..10_000u64 {
                let key = (k % 3 != 0).then(|| hash_key(&k.to_le_bytes()));
                let mut candidates = selector.pick(key, &loads);
                sum += candidates.next().unwrap_or(0);
                sum += candidates.next().unwrap_or(0);
            }
            assert_eq!(
                allocations() - before,
                0,
                "{} allocated during picks",
                algorithm.as_str()
            );
            assert!(sum > 0);
        }
    }
}
