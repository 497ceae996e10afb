//! Waits: how long the upstream asks the caller to wait before trying again.
//!
//! Every parser here rounds fractions of a millisecond up, so a wait is never shortened, and
//! answers `None` for input it does not understand rather than guessing. Every source, dates
//! included, is held to one cap: a wait beyond one year (366 days) is garbage and read as no
//! wait at all (`None`), as are negative, non-finite and overflowing numbers; a date in the
//! past is a zero wait. No input panics or wraps, whatever its size.
//!
//! | source | example | parser |
//! |---|---|---|
//! | `retry-after-ms` | `1500` | [`from_headers`] |
//! | `retry-after` | `3`, `0.5`, `Wed, 21 Oct 2015 07:28:10 GMT` | [`parse_retry_after`] |
//! | `x-ratelimit-reset-requests` / `-tokens` | `1s`, `6m0s`, `20ms`, `1h2m3.5s` | [`parse_duration`] |
//! | `anthropic-ratelimit-*-reset` | `2025-01-01T00:00:30Z` | [`parse_rfc3339`] |
//! | Gemini `RetryInfo.retryDelay` | `37s`, `0.5s` | [`parse_retry_delay`] |
//! | message text | `Please try again in 1.574s`, `retry after 20 seconds` | [`from_text`] |
//!
//! ```
//! use std::time::Duration;
//! use llm_layers::classify::wait;
//!
//! assert_eq!(wait::parse_duration("6m0s"), Some(Duration::from_secs(360)));
//! assert_eq!(wait::from_text("Please try again in 9m38.016s."), Some(Duration::from_millis(578_016)));
//! assert_eq!(wait::parse_retry_delay("0.5s"), Some(Duration::from_millis(500)));
//! ```

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::HeaderMap;

/// The longest wait any parser accepts (one year); anything longer is treated as garbage.
const MAX_WAIT: Duration = Duration::from_secs(366 * 24 * 3600);

/// The wait announced by the response headers, in this order: `retry-after-ms`, then
/// `retry-after` (delta-seconds, fractional seconds, or an HTTP-date).
pub fn from_headers(headers: &HeaderMap) -> Option<Duration> {
    from_headers_at(headers, SystemTime::now())
}

/// [`from_headers`] with an explicit "now", for HTTP-date values.
pub fn from_headers_at(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    if let Some(ms) = header_str(headers, "retry-after-ms").and_then(parse_millis) {
        return Some(ms);
    }
    header_str(headers, "retry-after").and_then(|v| parse_retry_after(v, now))
}

/// The reset time of the exhausted rate limit, from OpenAI-style `x-ratelimit-reset-requests` /
/// `x-ratelimit-reset-tokens` (durations such as `6m0s`) and Anthropic-style
/// `anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-reset` (RFC 3339 dates,
/// relative to `now`).
///
/// When a matching `…-remaining-…` header says `0`, only the exhausted limits count; otherwise
/// the longest reset is taken, so the wait is never too short. These headers come with every
/// answer, so the classifier reads them only for rate-limit errors, after every other source.
pub fn rate_limit_reset_at(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    const OPENAI: [(&str, &str); 2] = [
        (
            "x-ratelimit-reset-requests",
            "x-ratelimit-remaining-requests",
        ),
        ("x-ratelimit-reset-tokens", "x-ratelimit-remaining-tokens"),
    ];
    const ANTHROPIC: [(&str, &str); 4] = [
        (
            "anthropic-ratelimit-requests-reset",
            "anthropic-ratelimit-requests-remaining",
        ),
        (
            "anthropic-ratelimit-tokens-reset",
            "anthropic-ratelimit-tokens-remaining",
        ),
        (
            "anthropic-ratelimit-input-tokens-reset",
            "anthropic-ratelimit-input-tokens-remaining",
        ),
        (
            "anthropic-ratelimit-output-tokens-reset",
            "anthropic-ratelimit-output-tokens-remaining",
        ),
    ];
    let mut exhausted: Option<Duration> = None;
    let mut any: Option<Duration> = None;
    let candidates = OPENAI
        .iter()
        .map(|(r, rem)| (*r, *rem, false))
        .chain(ANTHROPIC.iter().map(|(r, rem)| (*r, *rem, true)));
    for (reset, remaining, is_date) in candidates {
        let Some(v) = header_str(headers, reset) else {
            continue;
        };
        let wait = if is_date {
            parse_rfc3339(v).and_then(|at| until(at, now))
        } else {
            parse_duration(v).or_else(|| parse_retry_after(v, now))
        };
        let Some(wait) = wait else { continue };
        any = Some(any.map_or(wait, |a| a.max(wait)));
        if header_str(headers, remaining) == Some("0") {
            exhausted = Some(exhausted.map_or(wait, |e| e.max(wait)));
        }
    }
    exhausted.or(any)
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

fn parse_millis(v: &str) -> Option<Duration> {
    // Whole milliseconds (the usual form) are exact; a float would round large values up.
    if let Ok(ms) = v.trim().parse::<u64>() {
        let wait = Duration::from_millis(ms);
        return (wait <= MAX_WAIT).then_some(wait);
    }
    let ms: f64 = v.parse().ok()?;
    from_secs_f64(ms / 1000.0)
}

/// Seconds as a float to a duration rounded up to the millisecond; `None` when negative, not
/// finite or beyond a year.
fn from_secs_f64(secs: f64) -> Option<Duration> {
    if !secs.is_finite() || secs < 0.0 || secs > MAX_WAIT.as_secs_f64() {
        return None;
    }
    // Round to the nanosecond first so binary noise (1.574 * 1000 = 1574.0000000000002) does
    // not add a millisecond, then round up to the millisecond.
    let nanos = (secs * 1e9).round() as u64;
    Some(ceil_ms(Duration::from_nanos(nanos)))
}

/// Rounds a duration up to a whole number of milliseconds.
fn ceil_ms(d: Duration) -> Duration {
    let ms = d.as_nanos().div_ceil(1_000_000);
    Duration::from_millis(u64::try_from(ms).unwrap_or(u64::MAX))
}

/// Parses a `retry-after` value: delta-seconds (fractions allowed) or an HTTP-date relative to
/// `now` (a date in the past is a zero wait, one more than a year ahead is `None`).
pub fn parse_retry_after(v: &str, now: SystemTime) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<f64>() {
        return from_secs_f64(secs);
    }
    let at = httpdate::parse_http_date(v).ok()?;
    until(at, now)
}

/// The wait until a date: zero for a date in the past, `None` beyond the one-year cap, rounded
/// up to the millisecond like every other wait.
fn until(at: SystemTime, now: SystemTime) -> Option<Duration> {
    let wait = at.duration_since(now).unwrap_or(Duration::ZERO);
    (wait <= MAX_WAIT).then(|| ceil_ms(wait))
}

/// Parses a Go-style duration as sent in `x-ratelimit-reset-*` headers and rate-limit
/// messages: one or more `<number><unit>` parts with units `h`, `m`, `s`, `ms`, `us`/`µs`,
/// `ns` (`1s`, `6m0s`, `20ms`, `1h2m3.5s`, `17.359s`). Rounds up to the millisecond.
pub fn parse_duration(v: &str) -> Option<Duration> {
    let v = v.trim();
    if v.is_empty() {
        return None;
    }
    let mut rest = v;
    let mut total = 0.0f64;
    while !rest.is_empty() {
        let (num, after) = split_number(rest)?;
        let unit_len = after
            .char_indices()
            .find(|(_, c)| !c.is_alphabetic())
            .map_or(after.len(), |(i, _)| i);
        let factor = match &after[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        total += num * factor;
        rest = &after[unit_len..];
    }
    from_secs_f64(total)
}

/// Parses a protobuf JSON duration as in Gemini's `RetryInfo.retryDelay` (`"37s"`, `"0.5s"`).
pub fn parse_retry_delay(v: &str) -> Option<Duration> {
    let secs: f64 = v.trim().strip_suffix('s')?.parse().ok()?;
    from_secs_f64(secs)
}

/// Splits a leading unsigned decimal number (`12`, `1.574`) off `s`.
fn split_number(s: &str) -> Option<(f64, &str)> {
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() && bytes[i].is_ascii_digit() {
        i += 1;
    }
    if i == 0 {
        return None;
    }
    if i < bytes.len() && bytes[i] == b'.' {
        let mut j = i + 1;
        while j < bytes.len() && bytes[j].is_ascii_digit() {
            j += 1;
        }
        if j > i + 1 {
            i = j;
        }
    }
    Some((s[..i].parse().ok()?, &s[i..]))
}

/// The wait hinted in a message: the first duration after `try again in`, `try again after`,
/// `retry in`, `retry after` or `wait for`, written either Go-style (`1.574s`, `6ms`,
/// `9m38.016s`) or in words (`1 seconds`, `20 seconds`, `2 minutes`, `500 milliseconds`).
/// Rounds up to the millisecond.
pub fn from_text(text: &str) -> Option<Duration> {
    if text.bytes().any(|b| b.is_ascii_uppercase()) {
        from_lower_text(&text.to_ascii_lowercase())
    } else {
        from_lower_text(text)
    }
}

/// [`from_text`] for text already in lower case (the classifier's), without a copy.
pub(crate) fn from_lower_text(lower: &str) -> Option<Duration> {
    const TRIGGERS: [&str; 5] = [
        "try again in",
        "try again after",
        "retry in",
        "retry after",
        "wait for",
    ];
    // Every trigger holds "try" or "wait": most messages hold neither.
    if !(lower.contains("try") || lower.contains("wait")) {
        return None;
    }
    let mut best: Option<(usize, Duration)> = None;
    for trigger in TRIGGERS {
        let mut from = 0;
        while let Some(pos) = lower[from..].find(trigger) {
            let at = from + pos;
            from = at + trigger.len();
            if best.is_some_and(|(b, _)| b <= at) {
                break;
            }
            if let Some(d) = duration_words(&lower[from..]) {
                best = Some((at, d));
                break;
            }
        }
    }
    best.map(|(_, d)| d)
}

/// Parses a duration at the start of `s` (after spaces): Go-style parts or `<n> <unit word>`.
fn duration_words(s: &str) -> Option<Duration> {
    let mut rest = s.trim_start();
    let mut total = 0.0f64;
    let mut parts = 0;
    while let Some((num, after)) = split_number(rest) {
        let after_space = after.trim_start_matches(' ');
        let unit_len = after_space
            .char_indices()
            .find(|(_, c)| !c.is_ascii_alphabetic())
            .map_or(after_space.len(), |(i, _)| i);
        let factor = match &after_space[..unit_len] {
            "h" | "hr" | "hrs" | "hour" | "hours" => 3600.0,
            "m" | "min" | "mins" | "minute" | "minutes" => 60.0,
            "s" | "sec" | "secs" | "second" | "seconds" => 1.0,
            "ms" | "millisecond" | "milliseconds" => 1e-3,
            _ => break,
        };
        total += num * factor;
        parts += 1;
        rest = &after_space[unit_len..];
        // Go-style parts follow each other without a space ("9m38.016s").
        if !rest.starts_with(|c: char| c.is_ascii_digit()) {
            break;
        }
    }
    if parts == 0 {
        return None;
    }
    from_secs_f64(total)
}

/// Parses an RFC 3339 timestamp (`2025-01-01T00:00:30Z`, `2025-01-01t00:00:30.25+02:00`).
///
/// Strict: four-digit year, two-digit fields, a `T`, `t` or space separator, an optional
/// fraction, and `Z`/`z` or a `±hh:mm` offset; days are checked against the month (leap years
/// included). A leap second (`:60`) is read as `:59`. Dates before 1970 are rejected. Digits
/// beyond the nanosecond round up, so a wait read from the date is never shortened.
pub fn parse_rfc3339(v: &str) -> Option<SystemTime> {
    let at = rfc3339(v).ok()?;
    let b = v.trim().as_bytes();
    let frac = match b.get(19..) {
        Some([b'.', rest @ ..]) => rest,
        _ => &[],
    };
    let mut extra = frac.iter().take_while(|d| d.is_ascii_digit()).skip(9);
    if extra.any(|d| *d != b'0') {
        return at.checked_add(Duration::from_nanos(1)).or(Some(at));
    }
    Some(at)
}

/// RFC 3339 text to a [`SystemTime`], shared by the wait parsers and key expiry.
///
/// The calendar work is the `time` crate's (already in the dependency graph, and with
/// `default-features = false` plus `parsing` it brings no further crates); only the rules
/// the crate does not share are kept here: the separator must be `T`, `t` or a space (the
/// crate takes any byte), a leap second `:60` reads as `:59` with its fraction kept
/// anywhere in the day (the crate turns it into `:59.999999999` and only at the end of a
/// month), and the instant must not precede 1970. Digits beyond the nanosecond are
/// truncated. No input panics: years are four digits (0000 to 9999), offsets under a day.
pub(crate) fn rfc3339(text: &str) -> Result<SystemTime, &'static str> {
    use time::error::{Parse, ParseFromDescription};
    use time::format_description::well_known::Rfc3339;

    const SHAPE: &str = "expected an RFC 3339 timestamp such as 2026-01-31T23:59:59Z";
    let text = text.trim();
    let b = text.as_bytes();
    if !matches!(b.get(10), Some(b'T' | b't' | b' ')) {
        return Err(SHAPE);
    }
    let leap;
    let text = if b.get(16..19) == Some(b":60") {
        leap = format!("{}59{}", &text[..17], &text[19..]);
        leap.as_str()
    } else {
        text
    };
    let at = time::OffsetDateTime::parse(text, &Rfc3339).map_err(|e| match e {
        Parse::TryFromParsed(_) => "the date, time or UTC offset is out of range",
        Parse::ParseFromDescription(ParseFromDescription::InvalidComponent(
            "offset hour" | "offset minute",
        )) => "expected `Z` or a UTC offset such as +02:00 after the time",
        _ => SHAPE,
    })?;
    let secs = u64::try_from(at.unix_timestamp())
        .map_err(|_| "timestamps before 1970 are not supported")?;
    Ok(UNIX_EPOCH + Duration::new(secs, at.nanosecond()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Option<Duration> {
        Some(Duration::from_millis(n))
    }

    #[test]
    fn header_waits() {
        let mut h = HeaderMap::new();
        h.insert("retry-after", "3".parse().unwrap());
        assert_eq!(from_headers(&h), Some(Duration::from_secs(3)));
        h.insert("retry-after-ms", "1500".parse().unwrap());
        assert_eq!(from_headers(&h), Some(Duration::from_millis(1500)));
        h.insert("retry-after-ms", "0.4".parse().unwrap());
        assert_eq!(from_headers(&h), ms(1));
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_480);
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:27:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-1", now), None);
        assert_eq!(parse_retry_after("NaN", now), None);
        assert_eq!(parse_retry_after("1e300", now), None);
    }

    #[test]
    fn go_durations() {
        assert_eq!(parse_duration("1s"), ms(1000));
        assert_eq!(parse_duration("6m0s"), ms(360_000));
        assert_eq!(parse_duration("20ms"), ms(20));
        assert_eq!(parse_duration("1h2m3.5s"), ms(3_723_500));
        assert_eq!(parse_duration("17.359s"), ms(17_359));
        assert_eq!(parse_duration("1.574s"), ms(1574));
        assert_eq!(parse_duration("0.0001s"), ms(1));
        assert_eq!(parse_duration("1500us"), ms(2));
        assert_eq!(parse_duration(""), None);
        assert_eq!(parse_duration("5"), None);
        assert_eq!(parse_duration("5x"), None);
        assert_eq!(parse_duration("s"), None);
        assert_eq!(parse_duration("1.s"), None);
    }

    #[test]
    fn retry_delays() {
        assert_eq!(parse_retry_delay("37s"), ms(37_000));
        assert_eq!(parse_retry_delay("0.5s"), ms(500));
        assert_eq!(parse_retry_delay("0.0005s"), ms(1));
        assert_eq!(parse_retry_delay("37"), None);
    }

    #[test]
    fn text_hints() {
        assert_eq!(from_text("Please try again in 1.574s. Visit"), ms(1574));
        assert_eq!(from_text("Please try again in 6ms."), ms(6));
        assert_eq!(
            from_text("Please try again in 9m38.016s. Need"),
            ms(578_016)
        );
        assert_eq!(from_text("please try again after 1 seconds"), ms(1000));
        assert_eq!(from_text("Please retry after 20 seconds."), ms(20_000));
        assert_eq!(from_text("Try again in 60 seconds. ..."), ms(60_000));
        assert_eq!(from_text("Please retry in 36.429760048s."), ms(36_430));
        assert_eq!(from_text("retry after 86400 seconds"), ms(86_400_000));
        assert_eq!(from_text("wait for 2 minutes"), ms(120_000));
        assert_eq!(from_text("Please try again later."), None);
        // A later trigger with a number still counts when the first has none.
        assert_eq!(
            from_text("Try again later, or retry after 3 seconds"),
            ms(3000)
        );
        assert_eq!(from_text("no hint here"), None);
        assert_eq!(from_text("try again in"), None);
    }

    #[test]
    fn rfc3339_dates() {
        let t =
            |s| parse_rfc3339(s).map(|t| t.duration_since(UNIX_EPOCH).unwrap().as_millis() as u64);
        assert_eq!(t("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(t("2015-10-21T07:28:00Z"), Some(1_445_412_480_000));
        assert_eq!(t("2015-10-21t09:28:00+02:00"), Some(1_445_412_480_000));
        assert_eq!(t("2015-10-21T06:28:00-01:00"), Some(1_445_412_480_000));
        assert_eq!(t("2015-10-21 07:28:00.25Z"), Some(1_445_412_480_250));
        assert_eq!(t("2024-02-29T00:00:00Z"), Some(1_709_164_800_000));
        assert_eq!(t("2016-12-31T23:59:60Z"), Some(1_483_228_799_000));
        assert_eq!(t("2023-02-29T00:00:00Z"), None);
        assert_eq!(t("2100-02-29T00:00:00Z"), None);
        assert_eq!(t("2000-02-29T00:00:00Z"), Some(951_782_400_000));
        assert_eq!(t("2024-13-01T00:00:00Z"), None);
        assert_eq!(t("2024-04-31T00:00:00Z"), None);
        assert_eq!(t("2024-01-01T24:00:00Z"), None);
        assert_eq!(t("2024-01-01T00:00:00"), None);
        assert_eq!(t("2024-01-01T00:00:00+0100"), None);
        assert_eq!(t("2024-01-01T00:00:00.Z"), None);
        assert_eq!(t("1969-12-31T23:59:59Z"), None);
        assert_eq!(t("2024-1-01T00:00:00Z"), None);
        assert_eq!(t("not a date at all!!"), None);
        assert_eq!(
            t("2024-01-01T00:00:00.1234567891Z").unwrap(),
            1_704_067_200_123
        );
    }

    #[test]
    fn rfc3339_edges() {
        let t = |s: &str| {
            parse_rfc3339(s).map(|t| {
                let d = t.duration_since(UNIX_EPOCH).unwrap();
                (d.as_secs(), d.subsec_nanos())
            })
        };
        // Only `T`, `t` or a space separates date and time.
        assert_eq!(t("2024-01-01x00:00:00Z"), None);
        assert_eq!(t("2024-01-01_00:00:00Z"), None);
        assert_eq!(t("2024-01-01é00:00:00Z"), None);
        // A leap second reads as :59 wherever it falls, its fraction kept.
        assert_eq!(
            t("2024-01-01T12:00:60.5Z"),
            Some((1_704_110_459, 500_000_000))
        );
        assert_eq!(t("2024-01-01T12:00:61Z"), None);
        // Digits beyond the nanosecond round up, however many there are.
        let long = format!("2024-01-01T00:00:00.000000000{}1Z", "0".repeat(10_000));
        assert_eq!(t(&long), Some((1_704_067_200, 1)));
        let nines = format!("2024-01-01T00:00:00.{}Z", "9".repeat(10_000));
        assert_eq!(t(&nines), Some((1_704_067_201, 0)));
        assert_eq!(
            t("2024-01-01T00:00:00.1000000000Z"),
            Some((1_704_067_200, 100_000_000))
        );
        // The far end: a local 9999 date behind UTC lands in the year 10000, without panic.
        assert_eq!(t("9999-12-31T23:59:59-23:59"), Some((253_402_387_139, 0)));
        assert!(t("9999-12-31T23:59:60.999999999-23:59").is_some());
        assert_eq!(t("0000-01-01T00:00:00+23:59"), None);
        assert_eq!(t("-001-01-01T00:00:00Z"), None);
        assert_eq!(t("+2024-01-01T00:00:00Z"), None);
        assert_eq!(t("2024-01-01T00:00:00-00:00"), Some((1_704_067_200, 0)));
        assert_eq!(t("2024-01-01T00:00:00+24:00"), None);
        assert_eq!(t("2024-01-01T00:00:00+00:60"), None);
        assert_eq!(t("2024-01-01T00:00:00Z "), Some((1_704_067_200, 0)));
        assert_eq!(t("2024-01-01T00:00:00Zjunk"), None);
        assert_eq!(t("  2024-01-01T00:00:00+01:00"), Some((1_704_063_600, 0)));
    }

    #[test]
    fn reset_headers() {
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let mut h = HeaderMap::new();
        assert_eq!(rate_limit_reset_at(&h, now), None);
        h.insert("x-ratelimit-reset-requests", "6m0s".parse().unwrap());
        h.insert("x-ratelimit-reset-tokens", "20ms".parse().unwrap());
        // Nothing says which limit is exhausted: the longest wait.
        assert_eq!(rate_limit_reset_at(&h, now), ms(360_000));
        h.insert("x-ratelimit-remaining-tokens", "0".parse().unwrap());
        h.insert("x-ratelimit-remaining-requests", "12".parse().unwrap());
        assert_eq!(rate_limit_reset_at(&h, now), ms(20));

        let mut a = HeaderMap::new();
        a.insert(
            "anthropic-ratelimit-tokens-reset",
            "2023-11-14T22:13:50Z".parse().unwrap(),
        );
        assert_eq!(rate_limit_reset_at(&a, now), ms(30_000));
        a.insert(
            "anthropic-ratelimit-requests-reset",
            "2023-11-14T22:13:10Z".parse().unwrap(),
        );
        a.insert(
            "anthropic-ratelimit-requests-remaining",
            "0".parse().unwrap(),
        );
        assert_eq!(rate_limit_reset_at(&a, now), Some(Duration::ZERO));
    }
}
