//! Sliding windows: what the circuit remembers of recent calls.
//!
//! A window only counts; it does not classify calls and does not decide transitions.

use std::time::Duration;

/// The totals a window holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Totals {
    pub(crate) calls: u64,
    pub(crate) failures: u64,
    pub(crate) slow: u64,
}

impl Totals {
    fn add(&mut self, failure: bool, slow: bool) {
        self.calls += 1;
        self.failures += failure as u64;
        self.slow += slow as u64;
    }
}

const FAILURE: u8 = 1;
const SLOW: u8 = 2;

/// The last `n` recorded calls.
#[derive(Debug)]
pub(crate) struct CountWindow {
    ring: Box<[u8]>,
    next: usize,
    filled: usize,
    totals: Totals,
}

impl CountWindow {
    pub(crate) fn new(size: usize) -> Self {
        CountWindow {
            ring: vec![0; size].into_boxed_slice(),
            next: 0,
            filled: 0,
            totals: Totals::default(),
        }
    }

    pub(crate) fn record(&mut self, failure: bool, slow: bool) -> Totals {
        if self.filled == self.ring.len() {
            let old = self.ring[self.next];
            self.totals.calls -= 1;
            self.totals.failures -= (old & FAILURE != 0) as u64;
            self.totals.slow -= (old & SLOW != 0) as u64;
        } else {
            self.filled += 1;
        }
        self.ring[self.next] = (failure as u8 * FAILURE) | (slow as u8 * SLOW);
        self.next = (self.next + 1) % self.ring.len();
        self.totals.add(failure, slow);
        self.totals
    }

    pub(crate) fn totals(&self) -> Totals {
        self.totals
    }

    pub(crate) fn reset(&mut self) {
        self.next = 0;
        self.filled = 0;
        self.totals = Totals::default();
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    index: u64,
    totals: Totals,
}

/// The calls of the last `duration`, in `buckets` buckets of equal width; a bucket is dropped
/// whole once it falls out of the window.
#[derive(Debug)]
pub(crate) struct TimeWindow {
    buckets: Box<[Bucket]>,
    width: u64,
}

impl TimeWindow {
    pub(crate) fn new(duration: Duration, buckets: usize) -> Self {
        let width = (duration.as_nanos() / buckets as u128).clamp(1, u64::MAX as u128) as u64;
        TimeWindow {
            // Index u64::MAX marks a bucket never used.
            buckets: vec![
                Bucket {
                    index: u64::MAX,
                    totals: Totals::default()
                };
                buckets
            ]
            .into_boxed_slice(),
            width,
        }
    }

    pub(crate) fn record(&mut self, now_nanos: u64, failure: bool, slow: bool) -> Totals {
        let index = now_nanos / self.width;
        let n = self.buckets.len();
        let b = &mut self.buckets[(index % n as u64) as usize];
        if b.index != index {
            *b = Bucket {
                index,
                totals: Totals::default(),
            };
        }
        b.totals.add(failure, slow);
        self.totals(now_nanos)
    }

    pub(crate) fn totals(&self, now_nanos: u64) -> Totals {
        let current = now_nanos / self.width;
        let n = self.buckets.len() as u64;
        let mut t = Totals::default();
        for b in self.buckets.iter() {
            if b.index != u64::MAX && b.index <= current && current - b.index < n {
                t.calls += b.totals.calls;
                t.failures += b.totals.failures;
                t.slow += b.totals.slow;
            }
        }
        t
    }

    pub(crate) fn reset(&mut self) {
        for b in self.buckets.iter_mut() {
            b.index = u64::MAX;
            b.totals = Totals::default();
        }
    }
}

/// Consecutive failures since the last success.
#[derive(Debug, Default)]
pub(crate) struct Consecutive {
    pub(crate) failures: u64,
}

/// The window a circuit keeps, chosen by configuration.
#[derive(Debug)]
pub(crate) enum Window {
    Count(CountWindow),
    Time(TimeWindow),
    Consecutive(Consecutive),
}

impl Window {
    /// Records one call and returns the new totals (for consecutive mode: `calls` and
    /// `failures` are both the current run of failures).
    pub(crate) fn record(&mut self, now_nanos: u64, failure: bool, slow: bool) -> Totals {
        match self {
            Window::Count(w) => w.record(failure, slow),
            Window::Time(w) => w.record(now_nanos, failure, slow),
            Window::Consecutive(c) => {
                if failure {
                    c.failures += 1;
                } else {
                    c.failures = 0;
                }
                Totals {
                    calls: c.failures,
                    failures: c.failures,
                    slow: 0,
                }
            }
        }
    }

    pub(crate) fn totals(&self, now_nanos: u64) -> Totals {
        match self {
            Window::Count(w) => w.totals(),
            Window::Time(w) => w.totals(now_nanos),
            Window::Consecutive(c) => Totals {
                calls: c.failures,
                failures: c.failures,
                slow: 0,
            },
        }
    }

    pub(crate) fn reset(&mut self) {
        match self {
            Window::Count(w) => w.reset(),
            Window::Time(w) => w.reset(),
            Window::Consecutive(c) => c.failures = 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn count_window_forgets_the_oldest_call() {
        let mut w = CountWindow::new(3);
        w.record(true, false);
        w.record(false, true);
        let t = w.record(false, false);
        assert_eq!((t.calls, t.failures, t.slow), (3, 1, 1));
        let t = w.record(false, false);
        assert_eq!((t.calls, t.failures, t.slow), (3, 0, 1));
        let t = w.record(false, false);
        assert_eq!((t.calls, t.failures, t.slow), (3, 0, 0));
    }

    #[test]
    fn time_window_drops_whole_buckets() {
        let sec = 1_000_000_000u64;
        let mut w = TimeWindow::new(Duration::from_secs(10), 10);
        w.record(0, true, false);
        w.record(5 * sec, true, false);
        assert_eq!(w.totals(9 * sec).failures, 2);
        // At 10 s the first bucket [0, 1 s) has left the window.
        assert_eq!(w.totals(10 * sec).failures, 1);
        assert_eq!(w.totals(16 * sec).failures, 0);
        // A bucket slot reused after a full turn starts empty.
        let t = w.record(20 * sec, false, false);
        assert_eq!((t.calls, t.failures), (1, 0));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]
        #[test]
        fn count_window_matches_a_plain_recount(
            size in 1usize..20,
            calls in proptest::collection::vec((proptest::bool::ANY, proptest::bool::ANY), 0..100),
        ) {
            let mut w = CountWindow::new(size);
            for (i, &(f, s)) in calls.iter().enumerate() {
                let t = w.record(f, s);
                let recent = &calls[(i + 1).saturating_sub(size)..=i];
                proptest::prop_assert_eq!(t.calls, recent.len() as u64);
                proptest::prop_assert_eq!(t.failures, recent.iter().filter(|c| c.0).count() as u64);
                proptest::prop_assert_eq!(t.slow, recent.iter().filter(|c| c.1).count() as u64);
            }
        }

        #[test]
        fn time_window_counts_exactly_the_buckets_in_reach(
            steps in proptest::collection::vec((0u64..3_000, proptest::bool::ANY), 0..100),
        ) {
            // 10 buckets of 100 ms.
            let width = 100_000_000u64;
            let mut w = TimeWindow::new(Duration::from_secs(1), 10);
            let mut now = 0u64;
            let mut seen: Vec<(u64, bool)> = Vec::new();
            for (ms, failure) in steps {
                now += ms * 1_000_000;
                let t = w.record(now, failure, false);
                seen.push((now, failure));
                let current = now / width;
                let live: Vec<_> = seen.iter().filter(|(at, _)| current - at / width < 10).collect();
                proptest::prop_assert_eq!(t.calls, live.len() as u64);
                proptest::prop_assert_eq!(t.failures, live.iter().filter(|(_, f)| *f).count() as u64);
            }
        }
    }
}
