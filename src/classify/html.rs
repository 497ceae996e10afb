//! HTML pages and plain text: CDN/WAF blocks and challenges, load-balancer and proxy error
//! pages, bare `error code: 524`, `404 page not found`.
//!
//! The page never reaches the message: only its `<title>` (or its first line of text) does,
//! scrubbed and bounded, in a sentence that says what the page probably is.

use crate::error::ErrorCode;

use super::envelope::{floor_boundary, Fields};

/// How much of a page is looked at.
const SCAN_BYTES: usize = 16 * 1024;

/// Fingerprints of a CDN/WAF block or challenge page (Cloudflare, Akamai, AWS WAF, relays)
/// that hold anywhere in the page.
const BLOCK_WORDS: &[&str] = &[
    "attention required",
    "just a moment",
    "you have been blocked",
    "request was blocked",
    "request blocked",
    "checking your browser",
    "ddos protection by",
    "web application firewall",
    "error 1020",
    "error code: 1020",
    "error code: 1010",
    "cf-chl-",
    "errors.edgesuite.net",
];

/// Weaker words that name a block only in a page's title or first line (an Akamai "Access
/// Denied" page), or only on a 403/503 (Cloudflare's challenge script is injected into every
/// page it serves, including a plain 401).
const TITLE_BLOCK_WORDS: &[&str] = &["access denied", "captcha", "blocked"];
const CHALLENGE_WORDS: &[&str] = &["challenge-platform", "captcha"];

/// How much of a plain-text answer the rules read as its message.
const TEXT_MESSAGE_BYTES: usize = 4096;

/// Whether `body` looks like an HTML page: an HTML content type, or markup at its start
/// (`<` followed by a letter, `!` or `?`; `<400> …` is text).
pub fn looks_html(content_type: &str, body: &[u8]) -> bool {
    content_type
        .as_bytes()
        .windows(4)
        .any(|w| w.eq_ignore_ascii_case(b"html"))
        || (body.first() == Some(&b'<')
            && body
                .get(1)
                .is_some_and(|b| b.is_ascii_alphabetic() || matches!(b, b'!' | b'?')))
}

/// What a page or plain-text answer is.
pub struct Page {
    /// The code when the page decides alone (HTML, blocks); for plain text, the status code.
    pub code: ErrorCode,
    /// The message, naming what the page is and its title or first line.
    pub message: String,
    /// For plain text that is not a block: the text as a message, for the rules.
    pub fields: Option<Fields>,
}

/// Classifies an HTML page (`html`) or a plain-text answer.
pub fn classify(status: u16, body: &[u8], html: bool) -> Page {
    let text = String::from_utf8_lossy(&body[..body.len().min(SCAN_BYTES)]);
    let text = &text[..floor_boundary(&text, SCAN_BYTES)];
    let lower = text.to_lowercase();
    let title = if html { title(text) } else { None };
    let first = first_line(text, html);
    let head = title
        .as_deref()
        .or(first.as_deref())
        .unwrap_or("")
        .to_lowercase();
    let blocked = BLOCK_WORDS.iter().any(|w| lower.contains(w))
        || TITLE_BLOCK_WORDS.iter().any(|w| head.contains(w))
        || (matches!(status, 403 | 503) && CHALLENGE_WORDS.iter().any(|w| lower.contains(w)));
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
    let detail = match (&title, &first) {
        (Some(t), _) => format!("; title: {t}"),
        (None, Some(l)) => format!("; first line: {l}"),
        (None, None) => String::new(),
    };
    let message = format!("upstream returned {what} (status {status}{hint}){detail}");
    let fields = (!html && !blocked).then(|| {
        let msg = &text[..floor_boundary(text, TEXT_MESSAGE_BYTES)];
        Fields {
            message: Some(msg.to_owned()),
            hay: lower[..floor_boundary(&lower, TEXT_MESSAGE_BYTES)].to_owned(),
            family: "text",
            ..Fields::default()
        }
    });
    Page {
        code,
        message,
        fields,
    }
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
        let p = classify(
            403,
            b"<html><head><title>Attention Required! | Cloudflare</title></head>",
            true,
        );
        let (c, m) = (p.code, p.message);
        assert_eq!(c, ErrorCode::UpstreamBlocked);
        assert_eq!(
            m,
            "upstream returned an HTML page (status 403, likely a CDN/WAF or geo block); title: Attention Required! | Cloudflare"
        );
        let p = classify(502, b"<html><body><h1>Bad &amp; gateway</h1></body>", true);
        let (c, m) = (p.code, p.message);
        assert_eq!(c, ErrorCode::ServiceUnavailable);
        assert!(m.ends_with("first line: Bad & gateway"), "{m}");
        let p = classify(524, b"error code: 524", false);
        let (c, m) = (p.code, p.message);
        assert_eq!(c, ErrorCode::Timeout);
        assert!(m.contains("plain-text") && m.ends_with("first line: error code: 524"));
        let m = classify(500, b"<title>unterminated", true).message;
        assert!(m.ends_with("title: unterminated"), "{m}");
        let m = classify(500, b"", false).message;
        assert_eq!(m, "upstream returned a plain-text answer (status 500)");
    }
}
