//! HTML pages and plain text: CDN/WAF blocks and challenges, load-balancer and proxy error
//! pages, bare `error code: 524`, `404 page not found`.
//!
//! The page never reaches the message: only its `<title>` (or its first line of text) does,
//! scrubbed and bounded, in a sentence that says what the page probably is.

use crate::error::ErrorCode;

use super::envelope::floor_boundary;

/// How much of a page is looked at.
const SCAN_BYTES: usize = 16 * 1024;

/// Words of a CDN/WAF block or challenge page (Cloudflare, Akamai, AWS WAF, relays).
const BLOCK_WORDS: &[&str] = &[
    "attention required",
    "just a moment",
    "you have been blocked",
    "request was blocked",
    "request blocked",
    "access denied",
    "cf-challenge",
    "challenge-platform",
    "captcha",
    "checking your browser",
    "ddos protection",
    "web application firewall",
    "error 1020",
];

/// Whether `body` looks like an HTML page.
pub fn looks_html(content_type: &str, body: &[u8]) -> bool {
    content_type.to_ascii_lowercase().contains("html") || body.first() == Some(&b'<')
}

/// Classifies an HTML page (`html`) or a plain-text answer; returns the code and the message.
pub fn classify(status: u16, body: &[u8], html: bool) -> (ErrorCode, String) {
    let text = String::from_utf8_lossy(&body[..body.len().min(SCAN_BYTES)]);
    let text = &text[..floor_boundary(&text, SCAN_BYTES)];
    let lower = text.to_lowercase();
    let title = if html { title(text) } else { None };
    let blocked = BLOCK_WORDS.iter().any(|w| lower.contains(w));
    let code = if blocked {
        ErrorCode::UpstreamBlocked
    } else {
        super::code_for_status_u16(status)
    };
    let hint = match code {
        ErrorCode::UpstreamBlocked => ", likely a CDN/WAF or geo block",
        ErrorCode::Timeout => ", likely a gateway or CDN timeout",
        ErrorCode::ServiceUnavailable => ", likely a gateway or load balancer error",
        _ => "",
    };
    let what = if html {
        "an HTML page"
    } else {
        "a plain-text answer"
    };
    let detail = match (&title, first_line(text, html)) {
        (Some(t), _) => format!("; title: {t}"),
        (None, Some(l)) => format!("; first line: {l}"),
        (None, None) => String::new(),
    };
    let msg = format!("upstream returned {what} (status {status}{hint}){detail}");
    (code, msg)
}

/// The text of the first `<title>`, entities decoded, whitespace folded.
fn title(text: &str) -> Option<String> {
    let lower = text.to_ascii_lowercase();
    let open = lower.find("<title")?;
    let start = open + lower[open..].find('>')? + 1;
    let end = lower[start..]
        .find("</title")
        .map_or(text.len().min(start + 300), |e| start + e);
    let end = floor_boundary(text, end);
    let t = decode_entities(text.get(start..end)?);
    let t = t.split_whitespace().collect::<Vec<_>>().join(" ");
    (!t.is_empty()).then_some(t)
}

/// The first non-empty line of text, tags removed for HTML, at most 200 characters.
fn first_line(text: &str, html: bool) -> Option<String> {
    let plain = if html {
        strip_tags(text)
    } else {
        text.to_owned()
    };
    let line = plain.lines().map(str::trim).find(|l| !l.is_empty())?;
    Some(line.chars().take(200).collect())
}

fn strip_tags(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_tag = false;
    for c in text.chars() {
        match c {
            '<' => in_tag = true,
            '>' if in_tag => {
                in_tag = false;
                out.push('\n');
            }
            c if !in_tag => out.push(c),
            _ => {}
        }
    }
    decode_entities(&out)
}

fn decode_entities(s: &str) -> String {
    s.replace("&amp;", "&")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&nbsp;", " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn titles_and_lines() {
        let (c, m) = classify(
            403,
            b"<html><head><title>Attention Required! | Cloudflare</title></head>",
            true,
        );
        assert_eq!(c, ErrorCode::UpstreamBlocked);
        assert_eq!(
            m,
            "upstream returned an HTML page (status 403, likely a CDN/WAF or geo block); title: Attention Required! | Cloudflare"
        );
        let (c, m) = classify(502, b"<html><body><h1>Bad &amp; gateway</h1></body>", true);
        assert_eq!(c, ErrorCode::ServiceUnavailable);
        assert!(m.ends_with("first line: Bad & gateway"), "{m}");
        let (c, m) = classify(524, b"error code: 524", false);
        assert_eq!(c, ErrorCode::Timeout);
        assert!(m.contains("plain-text") && m.ends_with("first line: error code: 524"));
        let (_, m) = classify(500, b"<title>unterminated", true);
        assert!(m.ends_with("title: unterminated"), "{m}");
        let (_, m) = classify(500, b"", false);
        assert_eq!(m, "upstream returned a plain-text answer (status 500)");
    }
}
