//! Backoff between attempts: exponential growth with a choice of jitter.

use std::time::Duration;

use super::config::config_error;
use super::ConfigError;

/// How the exponential delay is randomized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Jitter {
    /// No randomness: exactly `min(cap, base * 2^(n-1))`.
    None,
    /// "Full jitter": uniform in `[0, min(cap, base * 2^(n-1))]`. The default: it spreads a herd
    /// of clients best.
    #[default]
    Full,
    /// "Equal jitter": half the exponential delay plus a uniform part of the other half.
    Equal,
    /// "Decorrelated jitter": uniform in `[base, 3 * previous delay]`, capped.
    Decorrelated,
}

/// Exponential backoff with jitter, between `base` and `cap`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    jitter: Jitter,
}

impl Default for Backoff {
    /// 0.5 s base, 8 s cap, full jitter.
    fn default() -> Self {
        Backoff {
            base: Duration::from_millis(500),
            cap: Duration::from_secs(8),
            jitter: Jitter::Full,
        }
    }
}

impl Backoff {
    /// Exponential backoff from `base` up to `cap` with the given jitter. `base` must be
    /// positive and `cap` at least `base`.
    pub fn new(base: Duration, cap: Duration, jitter: Jitter) -> Result<Self, ConfigError> {
        if base.is_zero() {
            return Err(config_error("backoff.base", "must be positive"));
        }
        if cap < base {
            return Err(config_error("backoff.cap", "must be at least the base"));
        }
        Ok(Backoff { base, cap, jitter })
    }

    /// The first delay's upper bound.
    pub fn base(&self) -> Duration {
        self.base
    }

    /// The largest delay.
    pub fn cap(&self) -> Duration {
        self.cap
    }

    /// The jitter.
    pub fn jitter(&self) -> Jitter {
        self.jitter
    }

    /// The un-jittered delay before retry number `retry` (1 for the first retry):
    /// `min(cap, base * 2^(retry-1))`. Every jittered delay is at most this.
    pub fn ceiling(&self, retry: u32) -> Duration {
        let shift = retry.saturating_sub(1).min(31);
        self.base.saturating_mul(1u32 << shift).min(self.cap)
    }

    /// The delay before retry number `retry` (1 for the first retry). `prev` is the previous
    /// delay (used by [`Jitter::Decorrelated`]; pass `Duration::ZERO` for the first retry).
    pub fn delay(&self, retry: u32, prev: Duration, rng: &mut fastrand::Rng) -> Duration {
        match self.jitter {
            Jitter::None => self.ceiling(retry),
            Jitter::Full => uniform(rng, Duration::ZERO, self.ceiling(retry)),
            Jitter::Equal => {
                let c = self.ceiling(retry);
                let half = c / 2;
                half + uniform(rng, Duration::ZERO, c - half)
            }
            Jitter::Decorrelated => {
                let prev = prev.max(self.base);
                let hi = prev.saturating_mul(3).min(self.cap);
                uniform(rng, self.base, hi.max(self.base)).min(self.cap)
            }
        }
    }
}

/// Uniform in `[lo, hi]` with nanosecond resolution.
pub(crate) fn uniform(rng: &mut fastrand::Rng, lo: Duration, hi: Duration) -> Duration {
    if hi <= lo {
        return lo;
    }
    let span = (hi - lo).as_nanos().min(u64::MAX as u128) as u64;
    lo + Duration::from_nanos(rng.u64(0..=span))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceilings_double_up_to_the_cap() {
        let b = Backoff::default();
        assert_eq!(b.ceiling(1), Duration::from_millis(500));
        assert_eq!(b.ceiling(2), Duration::from_secs(1));
        assert_eq!(b.ceiling(5), Duration::from_secs(8));
        assert_eq!(b.ceiling(100), Duration::from_secs(8));
    }

    #[test]
    fn jitters_stay_in_bounds() {
        let mut rng = fastrand::Rng::with_seed(7);
        for jitter in [
            Jitter::None,
            Jitter::Full,
            Jitter::Equal,
            Jitter::Decorrelated,
        ] {
            let b =
                Backoff::new(Duration::from_millis(100), Duration::from_secs(2), jitter).unwrap();
            let mut prev = Duration::ZERO;
            for n in 1..=10 {
                let d = b.delay(n, prev, &mut rng);
                assert!(d <= b.cap(), "{jitter:?} {d:?}");
                match jitter {
                    Jitter::Decorrelated => assert!(d >= b.base()),
                    Jitter::Equal => assert!(d >= b.ceiling(n) / 2 && d <= b.ceiling(n)),
                    _ => assert!(d <= b.ceiling(n)),
                }
                prev = d;
            }
        }
    }

    #[test]
    fn bad_settings_name_the_field() {
        let e = Backoff::new(Duration::ZERO, Duration::from_secs(1), Jitter::Full).unwrap_err();
        assert_eq!(e.field(), "backoff.base");
        let e =
            Backoff::new(Duration::from_secs(2), Duration::from_secs(1), Jitter::Full).unwrap_err();
        assert_eq!(e.field(), "backoff.cap");
    }
}
