//! Messages: key-like strings masked, whitespace folded, length bounded.

/// The longest message the classifier produces, in characters (an ellipsis included).
pub const MAX_MESSAGE_CHARS: usize = 500;

/// Known key prefixes, longest first so `sk-ant-` wins over `sk-`.
const KEY_PREFIXES: [&str; 13] = [
    "sk-ant-", "sk-proj-", "sk-or-", "sk-", "gsk_", "xai-", "AIza", "hf_", "r8_", "pplx-", "ak-",
    "AKIA", "ASIA",
];

/// A run of these characters is one token for key detection. `*` counts so a key the provider
/// already half-masked (`sk-VKMIs****wjh3`) is masked as a whole.
fn is_token_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '*' | '+' | '=')
}

/// Masks key-like tokens in `text`: a known key prefix followed by at least 8 characters
/// becomes `prefix...last4`; a token after `Bearer ` of at least 12 characters, and any token
/// of at least 32 characters mixing letters and digits (hex or base64 secrets), becomes
/// `...last4`.
pub fn scrub(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find(is_token_char) {
        out.push_str(&rest[..start]);
        let tail = &rest[start..];
        let end = tail.find(|c| !is_token_char(c)).unwrap_or(tail.len());
        let token = &tail[..end];
        mask_token(token, after_bearer(&out), &mut out);
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

fn after_bearer(out: &str) -> bool {
    let t = out.trim_end_matches(' ');
    t.len() < out.len()
        && t.len() >= 6
        && t.is_char_boundary(t.len() - 6)
        && t[t.len() - 6..].eq_ignore_ascii_case("bearer")
}

fn last4(token: &str) -> &str {
    // Tokens are ASCII, so byte slicing is safe.
    &token[token.len().saturating_sub(4)..]
}

fn mask_token(token: &str, bearer: bool, out: &mut String) {
    // A known prefix at the start of the run or after a non-alphanumeric character
    // (`=sk-...`, `key:sk-...` inside one run).
    let found = (0..token.len())
        .filter(|&i| i == 0 || !token.as_bytes()[i - 1].is_ascii_alphanumeric())
        .find_map(|i| {
            let p = KEY_PREFIXES
                .iter()
                .find(|p| token[i..].starts_with(**p) && token.len() - i >= p.len() + 8)?;
            Some((i, *p))
        });
    if let Some((i, prefix)) = found {
        out.push_str(&token[..i]);
        out.push_str(prefix);
        out.push_str("...");
        out.push_str(last4(token));
        return;
    }
    let long_secret = token.len() >= 32
        && token.bytes().any(|b| b.is_ascii_digit())
        && token.bytes().any(|b| b.is_ascii_alphabetic());
    if long_secret || (bearer && token.len() >= 12) {
        out.push_str("...");
        out.push_str(last4(token));
        return;
    }
    out.push_str(token);
}

/// Scrubs `text`, folds runs of whitespace (newlines included) into one space, trims, and cuts
/// it to [`MAX_MESSAGE_CHARS`] characters, ending a cut message with `…`.
pub fn finish(text: &str) -> String {
    // Cut the input first so a huge message costs no more than a bounded one.
    let mut cut = text;
    if cut.len() > MAX_MESSAGE_CHARS * 8 {
        let mut i = MAX_MESSAGE_CHARS * 8;
        while !cut.is_char_boundary(i) {
            i -= 1;
        }
        cut = &cut[..i];
    }
    let scrubbed = scrub(cut);
    let mut out = String::with_capacity(scrubbed.len().min(MAX_MESSAGE_CHARS * 4));
    let mut chars = 0;
    let mut pending_space = false;
    let mut truncated = cut.len() < text.len();
    for c in scrubbed.chars() {
        if c.is_whitespace() || c.is_control() {
            pending_space = !out.is_empty();
            continue;
        }
        let need = if pending_space { 2 } else { 1 };
        if chars + need > MAX_MESSAGE_CHARS - 1 {
            truncated = true;
            break;
        }
        if pending_space {
            out.push(' ');
            chars += 1;
            pending_space = false;
        }
        out.push(c);
        chars += 1;
    }
    if truncated {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_keys() {
        assert_eq!(
            scrub("Incorrect API key provided: sk-VKMIs*****************wjh3. You"),
            "Incorrect API key provided: sk-...wjh3. You"
        );
        assert_eq!(
            scrub("key sk-ant-api03-abcdefghijklmnopqrstuvwxyz012345 bad"),
            "key sk-ant-...2345 bad"
        );
        assert_eq!(
            scrub("AIzaSyA1234567890abcdefghijklmnopqrstu"),
            "AIza...rstu"
        );
        assert_eq!(
            scrub("Authorization: Bearer abcdefghijklmnop"),
            "Authorization: Bearer ...mnop"
        );
        assert_eq!(scrub("id e5c949c8ec2c86be225544e5eefcbe4d."), "id ...be4d.");
        // Short or word-like tokens stay.
        assert_eq!(
            scrub("Bearer sk-... and sk-false"),
            "Bearer sk-... and sk-false"
        );
        assert_eq!(
            scrub("generate_content_free_tier_input_token_count"),
            "generate_content_free_tier_input_token_count"
        );
        assert_eq!(scrub("Your api key: ****cd15"), "Your api key: ****cd15");
        assert_eq!(scrub("über sk-ÄÖ"), "über sk-ÄÖ");
        assert_eq!(scrub("key=sk-abcdefghij1234"), "key=sk-...1234");
        assert_eq!(scrub("mask-abcdefghij1234"), "mask-abcdefghij1234");
    }

    #[test]
    fn bounds_and_folds() {
        assert_eq!(finish("  a\n\n  b\r\n c  "), "a b c");
        let long = "word ".repeat(1000);
        let f = finish(&long);
        assert!((MAX_MESSAGE_CHARS - 5..=MAX_MESSAGE_CHARS).contains(&f.chars().count()));
        assert!(f.ends_with('…'));
        let wide = "é".repeat(10_000);
        assert!(finish(&wide).chars().count() <= MAX_MESSAGE_CHARS);
        assert_eq!(finish(""), "");
    }
}
