//! Waits: how long the upstream asks the caller to wait before trying again.

use std::time::{Duration, SystemTime};

use http::HeaderMap;

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

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

fn parse_millis(v: &str) -> Option<Duration> {
    let ms: f64 = v.parse().ok()?;
    (ms.is_finite() && ms >= 0.0 && ms < 1e15)
        .then(|| Duration::from_micros((ms * 1000.0).ceil() as u64))
}

/// Parses a `retry-after` value: delta-seconds (fractions allowed) or an HTTP-date relative to
/// `now` (a date in the past is a zero wait).
pub fn parse_retry_after(v: &str, now: SystemTime) -> Option<Duration> {
    if let Ok(secs) = v.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0 && secs < 1e12)
            .then(|| Duration::from_millis((secs * 1000.0).ceil() as u64));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_waits() {
        let mut h = HeaderMap::new();
        h.insert("retry-after", "3".parse().unwrap());
        assert_eq!(from_headers(&h), Some(Duration::from_secs(3)));
        h.insert("retry-after-ms", "1500".parse().unwrap());
        assert_eq!(from_headers(&h), Some(Duration::from_millis(1500)));
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_480);
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now),
            Some(Duration::from_secs(10))
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }
}
