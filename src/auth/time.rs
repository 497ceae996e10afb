//! RFC 3339 timestamps for key expiry: parsing from configuration and printing in messages.
//!
//! Both go through the `time` crate (the parse is the one [`crate::classify::wait`] uses), so
//! the crate holds no calendar code of its own. `time` rather than `jiff` or `chrono`: it is
//! already in the dependency graph, and with `default-features = false` and only `parsing` it
//! adds no further crates, where `chrono` brings its own and `jiff` is much larger to build.

use std::time::{SystemTime, UNIX_EPOCH};

/// Parses an RFC 3339 timestamp (`2026-01-31T23:59:59Z`, `2026-01-31T23:59:59.5+02:00`) at or
/// after 1970, with the same rules as [`crate::classify::wait::parse_rfc3339`] (digits beyond
/// the nanosecond are dropped), and says what is wrong with any other text.
pub(crate) fn parse_rfc3339(text: &str) -> Result<SystemTime, &'static str> {
    crate::classify::wait::rfc3339(text)
}

/// Formats a time as RFC 3339 in UTC, to the second (`2026-01-31T23:59:59Z`); a time before
/// 1970 is rounded down to its second. A time the format cannot write (after the year 9999)
/// prints as its whole Unix seconds, which key stores read back as such.
pub(crate) fn format_rfc3339(t: SystemTime) -> String {
    let secs = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => {
            let d = e.duration();
            let whole = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
            -whole - i64::from(d.subsec_nanos() > 0)
        }
    };
    match time::OffsetDateTime::from_unix_timestamp(secs) {
        Ok(at) if at.year() >= 0 => format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
            at.year(),
            u8::from(at.month()),
            at.day(),
            at.hour(),
            at.minute(),
            at.second()
        ),
        _ => secs.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn round_trips_and_offsets() {
        let t = parse_rfc3339("2026-01-31T23:59:59Z").unwrap();
        assert_eq!(
            t.duration_since(UNIX_EPOCH).unwrap().as_secs(),
            1_769_903_999
        );
        assert_eq!(format_rfc3339(t), "2026-01-31T23:59:59Z");
        assert_eq!(
            parse_rfc3339("2026-02-01T01:59:59+02:00").unwrap(),
            t,
            "offsets are applied"
        );
        let frac = parse_rfc3339("1970-01-01T00:00:01.25Z").unwrap();
        assert_eq!(frac, UNIX_EPOCH + Duration::from_millis(1250));
        assert_eq!(
            format_rfc3339(parse_rfc3339("2024-02-29t12:00:00Z").unwrap()),
            "2024-02-29T12:00:00Z"
        );
        assert_eq!(
            format_rfc3339(UNIX_EPOCH - Duration::from_millis(500)),
            "1969-12-31T23:59:59Z"
        );
        assert_eq!(
            format_rfc3339(parse_rfc3339("9999-12-31T23:59:59Z").unwrap()),
            "9999-12-31T23:59:59Z"
        );
    }

    #[test]
    fn extremes_format_without_panicking() {
        // The year 10000 in UTC, from a 9999 date behind UTC: written as Unix seconds.
        let far = parse_rfc3339("9999-12-31T23:59:59-23:59").unwrap();
        assert_eq!(format_rfc3339(far), "253402387139");
        assert_eq!(
            format_rfc3339(UNIX_EPOCH + Duration::from_secs(i64::MAX as u64)),
            i64::MAX.to_string()
        );
        let _ = format_rfc3339(UNIX_EPOCH - Duration::from_secs(1 << 40));
        assert_eq!(
            parse_rfc3339("2026-01-31 23:59:60.5Z").unwrap(),
            UNIX_EPOCH + Duration::new(1_769_903_999, 500_000_000)
        );
        assert_eq!(
            parse_rfc3339("2026-01-31T23:59:59x"),
            Err("expected `Z` or a UTC offset such as +02:00 after the time")
        );
        assert_eq!(
            parse_rfc3339("1969-12-31T23:59:59Z"),
            Err("timestamps before 1970 are not supported")
        );
        assert_eq!(
            parse_rfc3339("2026-02-30T00:00:00Z"),
            Err("the date, time or UTC offset is out of range")
        );
    }

    #[test]
    fn rejects_bad_input_without_panicking() {
        for bad in [
            "",
            "2026-01-31",
            "2026-13-01T00:00:00Z",
            "2025-02-29T00:00:00Z",
            "2026-01-31T24:00:00Z",
            "2026-01-31T23:59:59",
            "2026-01-31T23:59:59+2:00",
            "1969-12-31T23:59:59Z",
            "2026-01-31T23:59:59.Z",
            "２０２６-01-31T23:59:59Z",
        ] {
            assert!(parse_rfc3339(bad).is_err(), "{bad}");
        }
    }
}
