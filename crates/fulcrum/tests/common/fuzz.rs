//! What the property tests over byte streams share (`fuzz_parsers.rs`, `fuzz_request_head.rs`): a
//! deterministic configuration, bytes that matter to HTTP parsers, and random edits of valid input.

use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};

/// `default_cases` cases (or `FUZZ_CASES`) from a fixed seed (or `FUZZ_SEED`), nothing persisted.
pub fn config(default_cases: u32) -> Config {
    let env = |name: &str| std::env::var(name).ok().and_then(|v| v.parse().ok());
    Config {
        cases: env("FUZZ_CASES").unwrap_or(default_cases),
        rng_seed: RngSeed::Fixed(
            std::env::var("FUZZ_SEED")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0x5eed_f00d),
        ),
        failure_persistence: None,
        max_shrink_iters: 2048,
        ..Config::default()
    }
}

/// Any byte, or one of `alphabet` (the bytes that matter to the parser under test).
pub fn byte_of(alphabet: &'static [u8]) -> impl Strategy<Value = u8> {
    prop_oneof![any::<u8>(), prop::sample::select(alphabet)]
}

/// Random edits of a byte string: bytes replaced, one run of bytes deleted (turning CRLF into a bare
/// LF, joining lines), and a cut.
#[derive(Debug, Clone)]
pub struct Edits {
    flips: Vec<(prop::sample::Index, u8)>,
    delete: Option<(prop::sample::Index, usize)>,
    cut: Option<prop::sample::Index>,
}

/// Edits whose replacement bytes come from [`byte_of`]`(alphabet)`.
pub fn edits_of(alphabet: &'static [u8]) -> impl Strategy<Value = Edits> {
    (
        prop::collection::vec((any::<prop::sample::Index>(), byte_of(alphabet)), 0..3),
        prop::option::weighted(0.3, (any::<prop::sample::Index>(), 1usize..4)),
        prop::option::weighted(0.15, any::<prop::sample::Index>()),
    )
        .prop_map(|(flips, delete, cut)| Edits { flips, delete, cut })
}

/// `bytes` with `edits` applied.
pub fn mutate(mut bytes: Vec<u8>, edits: &Edits) -> Vec<u8> {
    if !bytes.is_empty() {
        for (at, b) in &edits.flips {
            let i = at.index(bytes.len());
            bytes[i] = *b;
        }
        if let Some((at, n)) = &edits.delete {
            let i = at.index(bytes.len());
            bytes.drain(i..(i + n).min(bytes.len()));
        }
    }
    if let Some(cut) = &edits.cut {
        bytes.truncate(cut.index(bytes.len() + 1));
    }
    bytes
}

/// `Content-Length` values: a plain number (weight `plain`, against 1 for each odd form), or a sign,
/// a list, padding, leading zeros, hex, two numbers, an overflow or a non-ASCII digit.
pub fn length_value(plain: u32) -> impl Strategy<Value = String> {
    let n = prop_oneof![0u64..20, any::<u64>()];
    prop_oneof![
        plain => n.clone().prop_map(|n| n.to_string()),
        1 => n.clone().prop_map(|n| format!("+{n}")),
        1 => n.clone().prop_map(|n| format!("-{n}")),
        1 => n.clone().prop_map(|n| format!("{n}, {n}")),
        1 => (n.clone(), n.clone()).prop_map(|(a, b)| format!("{a},{b}")),
        1 => n.clone().prop_map(|n| format!(" {n}\t")),
        1 => n.clone().prop_map(|n| format!("00{n}")),
        1 => n.clone().prop_map(|n| format!("0x{n}")),
        1 => n.prop_map(|n| format!("{n} {n}")),
        1 => prop::sample::select(vec!["", ",", "99999999999999999999999", "18446744073709551616", "1e3", "\u{663}"])
            .prop_map(str::to_owned),
    ]
}
