//! Replayable seeds for randomised tests. Each test's seed mixes a hash of the test's full
//! name with a base seed: the `RQEMU_TEST_SEED` environment variable (decimal or `0x` hex) if
//! set, else a fixed default. The seed is printed when the test starts (libtest shows it with
//! the output of a failing test), so a failure is replayed by running the same test with the
//! printed `RQEMU_TEST_SEED`, and CI can vary the base seed per run.

/// Environment variable overriding the base seed.
pub const ENV: &str = "RQEMU_TEST_SEED";
const DEFAULT_BASE: u64 = 0x5EED_1234_ABCD_0001;

/// The base seed (from [`ENV`] if set and not empty, else the default); panics on an
/// unparsable value.
pub fn base() -> u64 {
    match std::env::var(ENV) {
        Ok(v) if !v.trim().is_empty() => {
            let v = v.trim();
            let parsed = match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => v.parse(),
            };
            parsed.unwrap_or_else(|e| panic!("{ENV}={v:?} is not a u64: {e}"))
        }
        _ => DEFAULT_BASE,
    }
}

/// The seed of test `name` (never 0), announced on stderr with how to replay it.
pub fn for_test(name: &str) -> u64 {
    let base = base();
    // FNV-1a of the name, then a splitmix64 finaliser over name hash ^ base.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    let mut z = h ^ base;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    let seed = z.max(1);
    eprintln!("{name}: seed {seed:#x} (replay: {ENV}={base:#x} cargo test -p rqemu-tcg {name})");
    seed
}
