//! The chaos suite's parts: the fault-injecting upstream, the gateway's stack with the
//! suite's measuring points, the clients and what each of them is owed, the log capture and
//! the counting allocator.
#![allow(dead_code)]

pub mod alloc;
pub mod client;
pub mod logs;
pub mod observe;
pub mod stack;
pub mod upstream;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};

/// The seed: `CHAOS_SEED` (decimal or `0x` hex), else a fixed one.
pub fn seed() -> u64 {
    match std::env::var("CHAOS_SEED") {
        Ok(s) => {
            let s = s.trim();
            match s.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => s.parse(),
            }
            .unwrap_or_else(|e| panic!("CHAOS_SEED={s:?}: {e}"))
        }
        Err(_) => 0x11_C4A0_5EED,
    }
}

/// A count from the environment, else `default`.
pub fn env_count(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(s) => s
            .trim()
            .replace('_', "")
            .parse()
            .unwrap_or_else(|e| panic!("{name}={s:?}: {e}")),
        Err(_) => default,
    }
}

static SERIAL: Mutex<()> = Mutex::new(());

/// The tests of this binary run one at a time: they share the allocator's counters, the log
/// capture and the panic counter.
pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

static PANICS: AtomicU64 = AtomicU64::new(0);
static HOOK: OnceLock<()> = OnceLock::new();

/// Counts every panic in any thread or task of the process (after the default report).
pub fn count_panics() {
    HOOK.get_or_init(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            previous(info);
        }));
    });
}

/// Panics counted so far.
pub fn panics() -> u64 {
    PANICS.load(Ordering::SeqCst)
}
