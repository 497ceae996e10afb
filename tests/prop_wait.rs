//! Property tests of the wait-hint parsers (`classify::wait`): `retry-after`, `retry-after-ms`,
//! `x-ratelimit-reset-*`, `anthropic-ratelimit-*-reset`, `retryDelay` and message hints.
//!
//! Run with `PROPTEST_CASES=<n>` to change the number of cases (10 000 by default).

mod common_prop;
use common_prop::config;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderName, HeaderValue};
use llm_layers::classify::wait;
use proptest::prelude::*;

/// The longest wait any parser accepts: one year.
const CAP: Duration = Duration::from_secs(366 * 24 * 3600);
const MS: Duration = Duration::from_millis(1);
/// 9999-12-31T23:59:59Z, the last second an HTTP-date can name.
const LAST_SECOND: u64 = 253_402_300_799;

fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

/// Strings close to what the parsers read, and any text.
fn hint_text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "\\PC{0,40}",
        "[0-9]{1,25}(\\.[0-9]{0,12})?",
        "[ \t]*-?[0-9]{0,8}(\\.[0-9]{0,8})?([eE][+-]?[0-9]{1,4})?[ \t]*|NaN|inf|-inf|Infinity|\\+1",
        "(-?[0-9]{1,14}(\\.[0-9]{0,9})?(h|m|s|ms|us|µs|ns|x|)){1,5}",
        "[0-9]{4}-[01][0-9]-[0-3][0-9][Tt ][0-2][0-9]:[0-5][0-9]:[0-6][0-9](\\.[0-9]{0,12})?(Z|z|[+-][0-2][0-9]:[0-5][0-9]|)",
        (0u64..=LAST_SECOND).prop_map(|s| httpdate::fmt_http_date(at(s))),
        "(try again in|retry after|wait for|retry in|try again after) [0-9]{1,14}(\\.[0-9]{1,9})? ?(h|m|s|ms|hours?|minutes?|seconds?|milliseconds?|secs?|mins?|hrs?)[ .]",
    ]
}

/// The wait the parsers must answer for a duration given in parts, rounded up to the ms.
fn ceil_ms(nanos: u128) -> Duration {
    Duration::from_millis(nanos.div_ceil(1_000_000) as u64)
}

/// `got` is the exact wait rounded up to the millisecond, one millisecond of float noise
/// allowed on top: never shorter.
fn close_above(got: Duration, exact_nanos: u128) -> bool {
    let want = ceil_ms(exact_nanos);
    got >= want && got <= want + MS
}

/// Year, month, day, hour, minute, second of a time, read from its HTTP-date.
fn civil(t: SystemTime) -> (u32, u32, u32, u32, u32, u32) {
    // "Sun, 06 Nov 1994 08:49:37 GMT"
    let s = httpdate::fmt_http_date(t);
    let month = match &s[8..11] {
        "Jan" => 1,
        "Feb" => 2,
        "Mar" => 3,
        "Apr" => 4,
        "May" => 5,
        "Jun" => 6,
        "Jul" => 7,
        "Aug" => 8,
        "Sep" => 9,
        "Oct" => 10,
        "Nov" => 11,
        _ => 12,
    };
    let n = |r: std::ops::Range<usize>| s[r].parse::<u32>().unwrap();
    (n(12..16), month, n(5..7), n(17..19), n(20..22), n(23..25))
}

proptest! {
    #![proptest_config(config())]

    /// Any text: no panic, and no parser answers a wait above the one-year cap.
    #[test]
    fn no_parser_answers_above_the_cap(text in hint_text(), now in 0u64..=LAST_SECOND) {
        let now = at(now);
        for (name, got) in [
            ("parse_retry_after", wait::parse_retry_after(&text, now)),
            ("parse_duration", wait::parse_duration(&text)),
            ("parse_retry_delay", wait::parse_retry_delay(&text)),
            ("from_text", wait::from_text(&text)),
        ] {
            if let Some(w) = got {
                prop_assert!(w <= CAP, "{} answered {:?} for {:?}", name, w, text);
            }
        }
        let _ = wait::parse_rfc3339(&text);
    }

    /// Any header values: no panic, and the header waits stay within the cap.
    #[test]
    fn header_waits_stay_within_the_cap(
        values in prop::collection::vec((0usize..10, hint_text()), 0..5),
        now in 0u64..=LAST_SECOND,
    ) {
        const NAMES: [&str; 10] = [
            "retry-after",
            "retry-after-ms",
            "x-ratelimit-reset-requests",
            "x-ratelimit-reset-tokens",
            "x-ratelimit-remaining-requests",
            "x-ratelimit-remaining-tokens",
            "anthropic-ratelimit-requests-reset",
            "anthropic-ratelimit-tokens-reset",
            "anthropic-ratelimit-output-tokens-reset",
            "anthropic-ratelimit-tokens-remaining",
        ];
        let mut h = HeaderMap::new();
        for (i, v) in &values {
            if let Ok(v) = HeaderValue::from_str(v) {
                h.append(HeaderName::from_static(NAMES[*i]), v);
            }
        }
        let now = at(now);
        if let Some(w) = wait::from_headers_at(&h, now) {
            prop_assert!(w <= CAP, "from_headers_at answered {:?} for {:?}", w, h);
        }
        if let Some(w) = wait::rate_limit_reset_at(&h, now) {
            prop_assert!(w <= CAP, "rate_limit_reset_at answered {:?} for {:?}", w, h);
        }
    }

    /// `retry-after` in whole seconds is that wait; `retry-after-ms` wins over it.
    #[test]
    fn retry_after_seconds_and_ms(secs in 0u64..=CAP.as_secs(), ms in 0u64..=CAP.as_millis() as u64) {
        let now = at(1_700_000_000);
        prop_assert_eq!(wait::parse_retry_after(&secs.to_string(), now), Some(Duration::from_secs(secs)));
        let mut h = HeaderMap::new();
        h.insert("retry-after", HeaderValue::from(secs));
        prop_assert_eq!(wait::from_headers_at(&h, now), Some(Duration::from_secs(secs)));
        h.insert("retry-after-ms", HeaderValue::from(ms));
        prop_assert_eq!(wait::from_headers_at(&h, now), Some(Duration::from_millis(ms)));
    }

    /// Fractional seconds round up to the millisecond, never down.
    #[test]
    fn fractional_retry_after_rounds_up(secs in 0u64..=CAP.as_secs() - 1, frac in "[0-9]{1,9}") {
        let text = format!("{secs}.{frac}");
        let nanos = u128::from(secs) * 1_000_000_000
            + format!("{frac:0<9}").parse::<u128>().unwrap();
        let got = wait::parse_retry_after(&text, at(0)).unwrap();
        prop_assert!(close_above(got, nanos), "{} gave {:?}", text, got);
        let delay = wait::parse_retry_delay(&format!("{text}s")).unwrap();
        prop_assert!(close_above(delay, nanos), "{}s gave {:?}", text, delay);
    }

    /// An HTTP-date is the time from `now` to it (zero when past), within the cap.
    #[test]
    fn http_dates_are_relative_to_now(now in 0u64..=LAST_SECOND, date in 0u64..=LAST_SECOND) {
        let got = wait::parse_retry_after(&httpdate::fmt_http_date(at(date)), at(now));
        let want = Duration::from_secs(date.saturating_sub(now));
        if want <= CAP {
            prop_assert_eq!(got, Some(want));
        } else {
            prop_assert!(got.is_none_or(|w| w <= CAP), "{:?} for a date {:?} ahead", got, want);
        }
    }

    /// Go-style durations (`1h2m3.5s`, `20ms`) are their value, rounded up to the ms.
    #[test]
    fn go_durations_are_their_value(
        h in 0u64..9000, m in 0u64..200, s in 0u64..200, frac in proptest::option::of("[0-9]{1,6}"),
        ms in proptest::option::of(0u64..5000),
        order in 0u8..3,
    ) {
        let (frac_text, frac_nanos) = match &frac {
            Some(f) => (format!(".{f}"), format!("{f:0<9}").parse::<u128>().unwrap()),
            None => (String::new(), 0),
        };
        let text = match order {
            0 => format!("{h}h{m}m{s}{frac_text}s"),
            1 => format!("{m}m{s}{frac_text}s"),
            _ => format!("{s}{frac_text}s"),
        };
        let text = match ms {
            Some(ms) => format!("{text}{ms}ms"),
            None => text,
        };
        let h = if order == 0 { h } else { 0 };
        let m = if order <= 1 { m } else { 0 };
        let exact = (u128::from(h) * 3600 + u128::from(m) * 60 + u128::from(s)) * 1_000_000_000
            + frac_nanos
            + u128::from(ms.unwrap_or(0)) * 1_000_000;
        let got = wait::parse_duration(&text);
        if exact <= CAP.as_nanos() - 1_000_000 {
            let got = got.unwrap();
            prop_assert!(close_above(got, exact), "{} gave {:?}", text, got);
            // The same duration, quoted in a message.
            let hint = wait::from_text(&format!("Rate limit reached. Please try again in {text}. Visit"));
            prop_assert_eq!(hint, Some(got), "{}", text);
        } else {
            prop_assert!(got.is_none_or(|w| w <= CAP), "{} gave {:?}", text, got);
        }
    }

    /// Waits in words (`retry after 20 seconds`) are their value.
    #[test]
    fn worded_waits_are_their_value(
        n in 0u64..100_000,
        unit in prop::sample::select(vec![("milliseconds", 1u64), ("seconds", 1000), ("minutes", 60_000), ("hours", 3_600_000)]),
        trigger in prop::sample::select(vec!["try again in", "Try again after", "retry in", "Please retry after", "wait for"]),
        before in "[a-z ,.]{0,20}",
    ) {
        let text = format!("{before} {trigger} {n} {} and so on", unit.0);
        let want = Duration::from_millis(n * unit.1);
        let got = wait::from_text(&text);
        if want <= CAP {
            prop_assert_eq!(got, Some(want), "{}", text);
        } else {
            prop_assert!(got.is_none_or(|w| w <= CAP));
        }
    }

    /// RFC 3339 timestamps, in UTC or with an offset, name the instant they write.
    #[test]
    fn rfc3339_round_trips(
        secs in 0u64..=LAST_SECOND - 2 * 86_400,
        nanos in 0u32..1_000_000_000,
        offset_min in -(23 * 60 + 59)..=(23i64 * 60 + 59),
        sep in prop::sample::select(vec!['T', 't', ' ']),
        zulu in prop::sample::select(vec!["Z", "z"]),
    ) {
        let t = at(secs) + Duration::from_nanos(u64::from(nanos));
        let local = (secs as i64 + offset_min * 60).max(0) as u64;
        let offset_min = local as i64 - secs as i64;
        prop_assume!(offset_min % 60 == 0);
        let offset_min = offset_min / 60;
        let (y, mo, d, h, mi, s) = civil(at(local));
        let frac = if nanos == 0 { String::new() } else { format!(".{nanos:09}") };
        let base = format!("{y:04}-{mo:02}-{d:02}{sep}{h:02}:{mi:02}:{s:02}{frac}");
        let offset = if offset_min == 0 {
            zulu.to_owned()
        } else {
            let sign = if offset_min < 0 { '-' } else { '+' };
            let a = offset_min.abs();
            format!("{sign}{:02}:{:02}", a / 60, a % 60)
        };
        let text = format!("{base}{offset}");
        prop_assert_eq!(wait::parse_rfc3339(&text), Some(t), "{}", text);
    }

    /// An Anthropic reset timestamp is a wait from `now`, within the cap.
    #[test]
    fn anthropic_resets_stay_within_the_cap(now in 0u64..=LAST_SECOND, ahead in 0u64..LAST_SECOND) {
        let reset = now.saturating_add(ahead).min(LAST_SECOND);
        let (y, mo, d, h, mi, s) = civil(at(reset));
        let mut hm = HeaderMap::new();
        hm.insert(
            "anthropic-ratelimit-tokens-reset",
            HeaderValue::from_str(&format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z")).unwrap(),
        );
        let got = wait::rate_limit_reset_at(&hm, at(now));
        let want = Duration::from_secs(reset - now);
        if want <= CAP {
            prop_assert_eq!(got, Some(want));
        } else {
            prop_assert!(got.is_none_or(|w| w <= CAP), "{:?} for a reset {:?} ahead", got, want);
        }
    }
}
