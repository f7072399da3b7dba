//! loopcsi's shared test kit, used by the integration tests (tests/) and by the benchmark
//! (bench/): one CSI client wrapper over the unix socket ([`client`]), the fixtures that run a
//! real driver on a temp socket and state dir, in process ([`driver`]) or as the real binary in
//! a child process ([`process`]), and the leak checks on loop devices and mounts ([`leaks`]).
//!
//! Everything a fixture makes lives under its own temp dir; guards release it in `Drop`, even
//! when a test panics, and touch nothing outside it.

// A fixture that cannot set itself up has nothing better to do than fail the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod client;
pub mod driver;
pub mod leaks;
pub mod metadata;
pub mod process;
pub mod requests;

pub use client::{connect, Clients};
pub use driver::{config_for, serve_in_background, TestDriver};
pub use leaks::{
    every_attached_loop_device, files_in, leftovers_under, release_everything_under, thaw,
    thaw_everything_under, Scratch,
};
pub use metadata::{MetadataClient, Ranges};
pub use requests::*;

pub const MIB: i64 = 1 << 20;
pub const NODE: &str = "test-node-1";

/// Whether this process may grow a mounted ext4 (CAP_SYS_RESOURCE in its effective set):
/// resize2fs needs it online, and some machines drop it.
pub fn has_cap_sys_resource() -> bool {
    const CAP_SYS_RESOURCE: u32 = 24;
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .expect("CapEff in /proc/self/status")
        .trim();
    u64::from_str_radix(hex, 16).unwrap() & (1 << CAP_SYS_RESOURCE) != 0
}

/// `len` pseudo-random bytes determined by `seed` (xorshift64): test data that differs in every
/// 4 KiB block, without a random-number crate.
pub fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}
