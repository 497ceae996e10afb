//! Messages: key-like strings masked, whitespace folded, length bounded.

/// The longest message the classifier produces, in characters (an ellipsis included).
pub const MAX_MESSAGE_CHARS: usize = 500;

/// Known key prefixes, longest first so `sk-ant-` wins over `sk-`. `eyJ` opens every JWT
/// (base64 of `{"`); `AKID` is a Tencent Cloud secret id.
const KEY_PREFIXES: [&str; 15] = [
    "sk-ant-", "sk-proj-", "sk-or-", "sk-", "gsk_", "xai-", "AIza", "AKID", "hf_", "r8_", "pplx-",
    "eyJ", "ak-", "AKIA", "ASIA",
];

/// Prefixes of ids that are not secrets and that people quote to support: request, response,
/// completion, message, tool-call, organisation, project, file, batch and job ids. A token
/// opening with one is left as it is (unless it also holds a known key prefix).
const ID_PREFIXES: [&str; 20] = [
    "req_",
    "req-",
    "chatcmpl-",
    "cmpl-",
    "resp_",
    "msg_",
    "toolu_",
    "call_",
    "org-",
    "proj_",
    "file-",
    "file_",
    "batch_",
    "ftjob-",
    "run_",
    "asst_",
    "thread_",
    "vs_",
    "user-",
    "gen-",
];

/// The shortest unprefixed token masked as a whole for its length alone.
const LONG_SECRET: usize = 32;
/// The shortest alphanumeric run masked for looking random.
const SHORT_SECRET: usize = 16;
/// The shortest alphanumeric run masked for mixing letters and digits alone.
const MIXED_RUN: usize = 20;

/// A run of these characters is one token for key detection. `*` counts so a key the provider
/// already half-masked (`sk-VKMIs****wjh3`) is masked as a whole; `.` and `/` count so a
/// Zhipu-style `id.secret`, a JWT and a base64 secret holding `/` or `+` are one token.
fn is_token_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '*' | '+' | '=' | '.' | '/')
}

/// Masks key-like tokens in `text`, keeping what is around them.
///
/// A token is a run of ASCII letters, digits and `_ - * + = . /`; a trailing `.` or `/`
/// (sentence punctuation, a path's last slash) is not part of it. A token is masked, as
/// `prefix...last4` or `...last4`, when:
///
/// 1. it holds a known key prefix (`sk-`, `sk-ant-`, `AIza`, `gsk_`, `eyJ`, ...) at its start or
///    after a character that is not alphanumeric, followed by at least 8 characters;
/// 2. it follows `Bearer ` and has at least 12 characters;
/// 3. it is at least 32 characters long, mixes letters and digits, and looks random: at least
///    a quarter of its neighbouring alphanumeric pairs change class (upper case, lower case,
///    digit; a capital followed by a small letter is no change). UUIDs, Zhipu `id.secret`
///    keys, JWTs and base64 secrets do; model names with an organisation
///    (`meta-llama/Meta-Llama-3.1-70B-Instruct`) do not;
/// 4. it holds a run of letters and digits (nothing between) of at least 20 characters mixing
///    letters and digits (hex secrets), or of at least 16 characters of two classes that looks
///    random as in rule 3: unprefixed keys shorter than 32 characters
///    (`q8Zk3LmP0xYv7RtB2nWc9HsD`). Words and identifiers (`GenerateContentRequest`) and
///    model names (`gpt-4o-2024-08-06`, `Qwen2.5-72B-Instruct`) do not. A key of fewer than
///    32 characters without digits is not reliably told from a word.
///
/// 5. it follows a word naming the credential (`key`, `provided`, `token`, `secret`,
///    `api_key`, `password`) and at most three separators (`API key provided: ...`, `key=...`),
///    has at least 12 characters and is not a plain lower-case word: there any shape is a key
///    (base64 with `/`, short unprefixed keys without digits).
///
/// Paths and URLs (a token opening with `/`, as `//host/...` after `https:`) are judged piece
/// by piece between slashes, so only the secret piece goes. Tokens opening with an id prefix
/// (`req_`, `chatcmpl-`, `org-`, `file-`, ...) are kept for rules 3 and 4: request ids stay
/// readable. A 32-hex request id without a prefix cannot be told from a 32-hex key and is
/// masked.
pub fn scrub(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find(is_token_char) {
        out.push_str(&rest[..start]);
        let tail = &rest[start..];
        let end = tail.find(|c| !is_token_char(c)).unwrap_or(tail.len());
        let run = &tail[..end];
        let token = run.trim_end_matches(['.', '/']);
        let named =
            token.len() >= 12 && (after_key_word(&out) || after_bearer(&out)) && !is_word(token);
        if token.is_empty() {
            out.push_str(run);
        } else if named {
            // Quoted where a key is named: a key whatever its shape, masked as a whole (a
            // known prefix at its start stays readable).
            if let Some(p) = KEY_PREFIXES
                .iter()
                .find(|p| token.starts_with(**p) && token.len() >= p.len() + 8)
            {
                out.push_str(p);
            }
            out.push_str("...");
            out.push_str(last4(token));
        } else if token.starts_with('/') {
            // A path or the rest of a URL: each piece on its own.
            for (i, piece) in token.split('/').enumerate() {
                if i > 0 {
                    out.push('/');
                }
                if !piece.is_empty() {
                    mask_token(piece, false, &mut out);
                }
            }
        } else {
            let bearer = after_bearer(&out);
            mask_token(token, bearer, &mut out);
        }
        out.push_str(&run[token.len()..]);
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

/// Words that name the credential right before the token (`Incorrect API key provided: ...`,
/// `key=...`, `invalid token '...'`).
const KEY_WORDS: [&str; 8] = [
    "key", "provided", "token", "secret", "api-key", "api_key", "apikey", "password",
];

/// Whether `out` ends with a word of [`KEY_WORDS`] and at most three separators
/// (`: `, ` (`, `='`, `:\n`).
fn after_key_word(out: &str) -> bool {
    let t = out.trim_end_matches([' ', ':', '=', '(', '\'', '"', '\n', '\t']);
    if !(1..=3).contains(&(out.len() - t.len())) {
        return false;
    }
    KEY_WORDS.iter().any(|w| {
        t.len() >= w.len()
            && t.is_char_boundary(t.len() - w.len())
            && t[t.len() - w.len()..].eq_ignore_ascii_case(w)
            && !t[..t.len() - w.len()].ends_with(|c: char| c.is_ascii_alphanumeric())
    })
}

/// A plain word (lower-case letters, an optional capital first): not a credential.
fn is_word(token: &str) -> bool {
    let mut chars = token.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_lowercase() || c == '-' || c == '_')
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

/// Upper case, lower case, digit, or anything else.
fn class(b: u8) -> u8 {
    match b {
        b'A'..=b'Z' => 1,
        b'a'..=b'z' => 2,
        b'0'..=b'9' => 3,
        _ => 0,
    }
}

/// Neighbouring alphanumeric pairs in `s`, and how many of them change class. An upper-case
/// letter followed by a lower-case one is no change: that is how a capitalised word reads.
fn pairs_and_changes(s: &[u8]) -> (usize, usize) {
    let (mut pairs, mut changes) = (0, 0);
    for w in s.windows(2) {
        let (a, b) = (class(w[0]), class(w[1]));
        if a != 0 && b != 0 {
            pairs += 1;
            changes += usize::from(a != b && !(a == 1 && b == 2));
        }
    }
    (pairs, changes)
}

/// Rule 3: long, letters and digits, random-looking.
fn is_long_secret(token: &str) -> bool {
    let b = token.as_bytes();
    if b.len() < LONG_SECRET
        || !b.iter().any(u8::is_ascii_digit)
        || !b.iter().any(u8::is_ascii_alphabetic)
    {
        return false;
    }
    let (pairs, changes) = pairs_and_changes(b);
    changes * 4 >= pairs
}

/// Rule 4: an alphanumeric run of at least [`MIXED_RUN`] characters mixing letters and digits,
/// or of at least [`SHORT_SECRET`] characters that looks random.
fn has_secret_run(token: &str) -> bool {
    token
        .as_bytes()
        .split(|b| !b.is_ascii_alphanumeric())
        .filter(|run| run.len() >= SHORT_SECRET)
        .any(|run| {
            let digits = run.iter().any(u8::is_ascii_digit);
            let letters = run.iter().any(u8::is_ascii_alphabetic);
            if run.len() >= MIXED_RUN && digits && letters {
                return true;
            }
            let classes = [1u8, 2, 3]
                .iter()
                .filter(|c| run.iter().any(|b| class(*b) == **c))
                .count();
            let (pairs, changes) = pairs_and_changes(run);
            classes >= 2 && changes * 4 >= pairs
        })
}

/// The shortest token any rule masks: the shortest key prefix and 8 more characters (a
/// bearer token needs 12, the other rules 16 or more).
const MIN_MASKED: usize = 3 + 8;

fn mask_token(token: &str, bearer: bool, out: &mut String) {
    // Most tokens are words: too short for any rule.
    if token.len() < MIN_MASKED {
        out.push_str(token);
        return;
    }
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
    let is_id = ID_PREFIXES.iter().any(|p| token.starts_with(p));
    let secret = !is_id && (is_long_secret(token) || has_secret_run(token));
    if secret || (bearer && token.len() >= 12) {
        out.push_str("...");
        out.push_str(last4(token));
        return;
    }
    out.push_str(token);
}

/// Scrubs `text`, folds runs of whitespace (newlines included) into one space, trims, and cuts
/// it to [`MAX_MESSAGE_CHARS`] characters, ending a cut message with `…`. A huge input is cut
/// first, before a token, so the head of a key is never left at the cut.
pub fn finish(text: &str) -> String {
    // Cut the input first so a huge message costs no more than a bounded one.
    let mut cut = text;
    if cut.len() > MAX_MESSAGE_CHARS * 8 {
        let mut i = MAX_MESSAGE_CHARS * 8;
        while !cut.is_char_boundary(i) {
            i -= 1;
        }
        cut = &cut[..i];
        // A token the cut went through may be the head of a key too short to be told from a
        // word: drop it.
        if text[i..].starts_with(is_token_char) {
            cut = cut.trim_end_matches(is_token_char);
        }
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
