//! The retry budget shared by every clone of one layer.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use super::config::config_error;
use super::ConfigError;

const UNIT: u64 = 1000;
const SLOTS: usize = 10;

/// A retry budget in the manner of Finagle and tower's `TpsBudget`: every request deposits
/// `ratio` of a retry, every retry withdraws one, and deposits expire after `ttl`. On top,
/// `min_per_sec` retries per second are always allowed, so a quiet service can still retry.
///
/// Under a total outage the upstream then sees about `(1 + ratio)` times the offered load
/// (plus the small floor) instead of `max_attempts` times.
///
/// The budget reads [`tokio::time::Instant`], so it follows a paused test clock. It is
/// lock-free: ten time slots of atomic counters. Under heavy contention it is approximate
/// (concurrent withdrawals may overdraw by the number of racing retries).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryBudget {
    ttl: Duration,
    min_per_sec: u32,
    ratio: f32,
}

impl Default for RetryBudget {
    /// 10 s window, 10 retries per second floor, 20 % of requests.
    fn default() -> Self {
        RetryBudget {
            ttl: Duration::from_secs(10),
            min_per_sec: 10,
            ratio: 0.2,
        }
    }
}

impl RetryBudget {
    /// A budget over a `ttl` window (1 s to 60 s) allowing `ratio` retries per request
    /// (0 to 1000) plus a floor of `min_per_sec` retries per second.
    pub fn new(ttl: Duration, min_per_sec: u32, ratio: f32) -> Result<Self, ConfigError> {
        if ttl < Duration::from_secs(1) || ttl > Duration::from_secs(60) {
            return Err(config_error("budget.ttl", "must be between 1 s and 60 s"));
        }
        if !(0.0..=1000.0).contains(&ratio) {
            return Err(config_error(
                "budget.ratio",
                "must be between 0 and 1000 retries per request",
            ));
        }
        Ok(RetryBudget {
            ttl,
            min_per_sec,
            ratio,
        })
    }

    /// The window over which deposits count.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Retries per second always allowed.
    pub fn min_per_sec(&self) -> u32 {
        self.min_per_sec
    }

    /// Retries allowed per request.
    pub fn ratio(&self) -> f32 {
        self.ratio
    }
}

#[derive(Debug, Default)]
struct Slot {
    epoch: AtomicU64,
    deposits: AtomicU64,
    withdrawals: AtomicU64,
}

/// The live budget: one per layer, behind the layer's `Arc`.
#[derive(Debug)]
pub(crate) struct Budget {
    start: Instant,
    slot_nanos: u64,
    deposit_units: u64,
    reserve_units: u64,
    slots: [Slot; SLOTS],
}

impl Budget {
    pub(crate) fn new(cfg: &RetryBudget) -> Self {
        let slot_nanos = (cfg.ttl.as_nanos() / SLOTS as u128).max(1) as u64;
        Budget {
            start: Instant::now(),
            slot_nanos,
            deposit_units: (f64::from(cfg.ratio) * UNIT as f64).round() as u64,
            reserve_units: u64::from(cfg.min_per_sec)
                .saturating_mul(cfg.ttl.as_secs())
                .saturating_mul(UNIT),
            slots: Default::default(),
        }
    }

    fn epoch(&self, now: Instant) -> u64 {
        // u64 nanoseconds last 584 years; a u128 division would cost more than the rest.
        let elapsed = now.saturating_duration_since(self.start).as_nanos() as u64;
        elapsed / self.slot_nanos + 1
    }

    fn slot(&self, epoch: u64) -> &Slot {
        let slot = &self.slots[(epoch % SLOTS as u64) as usize];
        let seen = slot.epoch.load(Ordering::Acquire);
        if seen < epoch
            && slot
                .epoch
                .compare_exchange(seen, epoch, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            slot.deposits.store(0, Ordering::Release);
            slot.withdrawals.store(0, Ordering::Release);
        }
        slot
    }

    /// Records one request.
    pub(crate) fn deposit(&self, now: Instant) {
        self.slot(self.epoch(now))
            .deposits
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Takes one retry if the balance allows it.
    pub(crate) fn withdraw(&self, now: Instant) -> bool {
        let epoch = self.epoch(now);
        let slot = self.slot(epoch);
        if self.balance_at(epoch) < UNIT as i128 {
            return false;
        }
        slot.withdrawals.fetch_add(1, Ordering::AcqRel);
        true
    }

    fn balance_at(&self, epoch: u64) -> i128 {
        let oldest = epoch.saturating_sub(SLOTS as u64 - 1);
        let mut balance = self.reserve_units as i128;
        for s in &self.slots {
            let e = s.epoch.load(Ordering::Acquire);
            if e >= oldest && e <= epoch {
                balance += s.deposits.load(Ordering::Acquire) as i128 * self.deposit_units as i128;
                balance -= s.withdrawals.load(Ordering::Acquire) as i128 * UNIT as i128;
            }
        }
        balance
    }

    #[cfg(test)]
    fn balance(&self, now: Instant) -> i128 {
        self.balance_at(self.epoch(now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn deposits_fund_retries_and_expire() {
        let b = Budget::new(&RetryBudget::new(Duration::from_secs(10), 0, 0.5).unwrap());
        let now = Instant::now();
        assert!(
            !b.withdraw(now),
            "an empty budget with no floor allows nothing"
        );
        for _ in 0..10 {
            b.deposit(now);
        }
        assert_eq!(b.balance(now), 5 * UNIT as i128);
        let mut granted = 0;
        while b.withdraw(now) {
            granted += 1;
        }
        assert_eq!(granted, 5);
        tokio::time::advance(Duration::from_secs(11)).await;
        let later = Instant::now();
        assert_eq!(b.balance(later), 0, "old deposits and withdrawals expired");
    }

    #[tokio::test(start_paused = true)]
    async fn the_floor_refills_with_time() {
        let b = Budget::new(&RetryBudget::new(Duration::from_secs(1), 3, 0.0).unwrap());
        let mut granted = 0;
        while b.withdraw(Instant::now()) {
            granted += 1;
        }
        assert_eq!(granted, 3);
        tokio::time::advance(Duration::from_millis(1100)).await;
        assert!(b.withdraw(Instant::now()));
    }

    #[test]
    fn bad_budgets_name_the_field() {
        assert_eq!(
            RetryBudget::new(Duration::ZERO, 1, 0.2)
                .unwrap_err()
                .field(),
            "budget.ttl"
        );
        assert_eq!(
            RetryBudget::new(Duration::from_secs(5), 1, -1.0)
                .unwrap_err()
                .field(),
            "budget.ratio"
        );
    }
}
