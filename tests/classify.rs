//! The classifier against the error corpus (`tests/fixtures/errors.jsonl`, documented in its
//! README) and our own additions (`tests/fixtures/extra.jsonl`, same format), plus properties.
//!
//! Every fixture is checked for `expect.code`, `expect.retryable` and `expect.retry_after_ms`.
//! Mismatches are collected and reported together, with ids.
//!
//! Entries whose note starts with `ambiguous:` may be read either way: the expected code, or a
//! code the note names as the other reading (any of the 18 wire codes appearing in the note).
//! With the alternative code, `retryable` must follow that code's rule and the wait must still
//! match. The test prints how many ambiguous entries took the expected reading.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use llm_layers::classify::{
    classify_response, classify_response_at, classify_sse_event, classify_sse_stream, Classifier,
    Rule, MAX_MESSAGE_CHARS,
};
use llm_layers::error::{ApiError, EnvelopeOptions, ErrorCode, UpstreamDetail};
use proptest::prelude::*;
use serde_json::Value;

/// "Now" for date-based waits in fixtures: 2026-11-23T10:00:00Z.
fn fixed_now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_795_428_000)
}

struct Fixture {
    id: String,
    status: StatusCode,
    headers: HeaderMap,
    body: Vec<u8>,
    stream: bool,
    code: ErrorCode,
    retryable: bool,
    wait_ms: Option<u64>,
    ambiguous: bool,
    alternatives: Vec<ErrorCode>,
}

fn load(path: &str) -> Vec<Fixture> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let v: Value = serde_json::from_str(line).unwrap();
            let mut headers = HeaderMap::new();
            for (k, val) in v["headers"].as_object().unwrap() {
                headers.insert(
                    HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    HeaderValue::from_str(val.as_str().unwrap()).unwrap(),
                );
            }
            let note = v["note"].as_str().unwrap_or("");
            let alternatives = if note.starts_with("ambiguous:") {
                ErrorCode::ALL
                    .into_iter()
                    .filter(|c| note.contains(c.as_str()))
                    .collect()
            } else {
                Vec::new()
            };
            let e = &v["expect"];
            Fixture {
                id: v["id"].as_str().unwrap().to_owned(),
                status: StatusCode::from_u16(v["status"].as_u64().unwrap() as u16).unwrap(),
                headers,
                body: v["body"].as_str().unwrap().as_bytes().to_vec(),
                stream: v["stream"].as_bool().unwrap(),
                code: e["code"].as_str().unwrap().parse().unwrap(),
                retryable: e["retryable"].as_bool().unwrap(),
                wait_ms: e["retry_after_ms"].as_u64(),
                ambiguous: note.starts_with("ambiguous:"),
                alternatives,
            }
        })
        .collect()
}

fn classify(f: &Fixture) -> Option<llm_layers::ApiError> {
    if f.stream {
        classify_sse_stream(&f.body)
    } else {
        classify_response_at(f.status, &f.headers, &f.body, fixed_now())
    }
}

/// Checks every fixture of a file; returns (mismatches, ambiguous entries read the expected way,
/// ambiguous entries).
fn check_file(path: &str) -> (Vec<String>, usize, usize) {
    let fixtures = load(path);
    assert!(!fixtures.is_empty());
    let mut bad = Vec::new();
    let (mut amb_primary, mut amb) = (0, 0);
    for f in &fixtures {
        let Some(err) = classify(f) else {
            bad.push(format!("{}: not classified as an error", f.id));
            continue;
        };
        let got = err.code();
        let wait = err.retry_after().map(|d| d.as_millis() as u64);
        let expected_retryable = if got == f.code {
            f.retryable
        } else {
            got.is_retryable()
        };
        if f.ambiguous {
            amb += 1;
            amb_primary += usize::from(got == f.code);
        }
        let code_ok = got == f.code || f.alternatives.contains(&got);
        if !code_ok || err.is_retryable() != expected_retryable || wait != f.wait_ms {
            bad.push(format!(
                "{}: got {} retryable={} wait={:?}; want {} retryable={} wait={:?}; message {:?}",
                f.id,
                got,
                err.is_retryable(),
                wait,
                f.code,
                f.retryable,
                f.wait_ms,
                err.message()
            ));
        }
        if err.message().is_empty() || err.message().chars().count() > MAX_MESSAGE_CHARS {
            bad.push(format!("{}: message length {}", f.id, err.message().len()));
        }
        if err.upstream_status().is_none() && !f.stream {
            bad.push(format!("{}: no upstream status", f.id));
        }
        if err.provider().is_none() {
            bad.push(format!("{}: no provider family", f.id));
        }
        // A stream body handed to classify_response as a whole 200 answer gives the same code.
        if f.stream {
            let whole = classify_response(f.status, &f.headers, &f.body).map(|e| e.code());
            if whole != Some(got) {
                bad.push(format!("{}: classify_response gave {whole:?}", f.id));
            }
        }
    }
    (bad, amb_primary, amb)
}

#[test]
fn corpus_fixtures_all_classify_as_expected() {
    let (bad, amb_primary, amb) = check_file("tests/fixtures/errors.jsonl");
    println!("ambiguous entries read the expected way: {amb_primary}/{amb}");
    assert!(
        bad.is_empty(),
        "{} mismatches:\n{}",
        bad.len(),
        bad.join("\n")
    );
    assert_eq!(load("tests/fixtures/errors.jsonl").len(), 126);
}

#[test]
fn extra_fixtures_all_classify_as_expected() {
    let (bad, _, _) = check_file("tests/fixtures/extra.jsonl");
    assert!(
        bad.is_empty(),
        "{} mismatches:\n{}",
        bad.len(),
        bad.join("\n")
    );
}

/// Every `.jsonl` file of a fixture folder, in name order.
fn jsonl_files(dir: &str) -> Vec<String> {
    let mut files: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    files.sort();
    files
}

/// (entries, mismatches) over every file of a folder.
fn check_dir(dir: &str) -> (usize, Vec<String>) {
    let mut total = 0;
    let mut bad = Vec::new();
    for path in jsonl_files(dir) {
        total += load(&path).len();
        bad.extend(check_file(&path).0);
    }
    (total, bad)
}

/// The bodies gathered from public sources beyond the shared corpus: `tests/fixtures/corpus/`
/// (the part the rules were tuned on) and `tests/fixtures/heldout/` (every fifth body, set
/// aside before any rule was written for them). Both figures are printed; the tuned part must
/// pass at 98 % and the held-out part at 95 %.
#[test]
fn gathered_corpus_pass_rates() {
    let (tuned, tuned_bad) = check_dir("tests/fixtures/corpus");
    let (held, held_bad) = check_dir("tests/fixtures/heldout");
    let rate = |n: usize, bad: usize| 100.0 * (n - bad.min(n)) as f64 / n as f64;
    // A mismatch can list more than one problem for the same entry; count entries.
    let entries = |bad: &[String]| {
        let mut ids: Vec<&str> = bad.iter().filter_map(|b| b.split(':').next()).collect();
        ids.sort_unstable();
        ids.dedup();
        ids.len()
    };
    let (tb, hb) = (entries(&tuned_bad), entries(&held_bad));
    println!(
        "tuned: {}/{tuned} ({:.1} %); held out: {}/{held} ({:.1} %)",
        tuned - tb,
        rate(tuned, tb),
        held - hb,
        rate(held, hb)
    );
    let shared =
        load("tests/fixtures/errors.jsonl").len() + load("tests/fixtures/extra.jsonl").len();
    assert!(
        shared + tuned + held >= 300,
        "{} bodies",
        shared + tuned + held
    );
    assert!(
        rate(tuned, tb) >= 98.0,
        "tuned part below 98 %:\n{}",
        tuned_bad.join("\n")
    );
    assert!(
        rate(held, hb) >= 95.0,
        "held-out part below 95 %:\n{}",
        held_bad.join("\n")
    );
}

fn classify_at(status: u16, headers: &[(&str, &str)], body: &str) -> ApiError {
    let mut h = HeaderMap::new();
    for (k, v) in headers {
        h.insert(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    classify_response_at(
        StatusCode::from_u16(status).unwrap(),
        &h,
        body.as_bytes(),
        fixed_now(),
    )
    .unwrap()
}

/// The rules that read the wait: a short explicit wait makes a billing-worded 429 a rate
/// limit, a calendar window makes a rate-worded 429 a quota, and capacity words make a 429
/// `service_unavailable` unless a wait is stated.
#[test]
fn waits_and_windows_decide_429s() {
    let text = r#"{"error":{"message":"Insufficient balance. Please try again in 3s."}}"#;
    let e = classify_at(429, &[], text);
    assert_eq!(e.code(), ErrorCode::RateLimitExceeded);
    assert_eq!(e.retry_after(), Some(Duration::from_secs(3)));
    let e = classify_at(429, &[], r#"{"error":{"message":"Insufficient balance."}}"#);
    assert_eq!(e.code(), ErrorCode::InsufficientQuota);
    // A long wait leaves billing as it is; a billing type is never overridden.
    let e = classify_at(429, &[("retry-after", "3600")], r#"{"message":"余额不足"}"#);
    assert_eq!(e.code(), ErrorCode::InsufficientQuota);
    let typed =
        r#"{"error":{"message":"quota","type":"insufficient_quota","code":"insufficient_quota"}}"#;
    let e = classify_at(429, &[("retry-after", "2")], typed);
    assert_eq!(e.code(), ErrorCode::InsufficientQuota);

    let monthly = r#"{"error":{"message":"Rate limit reached: 1000 requests per month"}}"#;
    assert_eq!(
        classify_at(429, &[], monthly).code(),
        ErrorCode::InsufficientQuota
    );
    let busy = r#"{"error":{"message":"Selected model is at capacity"}}"#;
    assert_eq!(
        classify_at(429, &[], busy).code(),
        ErrorCode::ServiceUnavailable
    );
    let e = classify_at(429, &[("retry-after", "2")], busy);
    assert_eq!(e.code(), ErrorCode::RateLimitExceeded);
    assert!(e.is_retryable());
}

/// Plain text is read as a message; URL-encoded text is decoded first; edge pages are blocks
/// only by specific fingerprints; Baidu's and MiniMax's errors inside a 200 are errors.
#[test]
fn text_encodings_edges_and_in_band_codes() {
    let e = classify_at(
        400,
        &[],
        "400 This model's maximum context length is 8192 tokens.",
    );
    assert_eq!(e.code(), ErrorCode::ContextLengthExceeded);
    assert_eq!(e.provider(), Some("text"));
    let e = classify_at(
        400,
        &[],
        "error=the%20request%20exceeds%20the%20context%20size",
    );
    assert_eq!(e.code(), ErrorCode::ContextLengthExceeded);
    let e = classify_at(429, &[], "余额不足或无可用资源包,请充值。");
    assert_eq!(e.code(), ErrorCode::InsufficientQuota);
    let e = classify_at(429, &[], "Too many concurrent requests. Limit: 1");
    assert_eq!(e.code(), ErrorCode::ConcurrentLimitExceeded);
    // `<400>` opens text, not markup.
    let e = classify_at(
        400,
        &[],
        "<400> InternalError.Algo.DataInspectionFailed: bad input",
    );
    assert_eq!(e.code(), ErrorCode::ContentPolicyViolation);

    // A bare 403 is not a WAF block; a 401 page with Cloudflare's injected script is a key
    // problem; Akamai's "Access Denied" page is a block.
    assert_eq!(
        classify_at(403, &[], "403").code(),
        ErrorCode::PermissionDenied
    );
    assert_eq!(
        classify_at(403, &[], "Forbidden").code(),
        ErrorCode::PermissionDenied
    );
    let page = "<html><head><title>401 Authorization Required</title></head><body>\
        <script>a.src='/cdn-cgi/challenge-platform/scripts/jsd/main.js'</script></body></html>";
    assert_eq!(classify_at(401, &[], page).code(), ErrorCode::InvalidApiKey);
    let akamai = "<html><head><title>Access Denied</title></head><body>Reference #18.ef</body>";
    assert_eq!(
        classify_at(403, &[], akamai).code(),
        ErrorCode::UpstreamBlocked
    );

    let baidu = r#"{"error_code":17,"error_msg":"Open api daily request limit reached"}"#;
    let e = classify_at(200, &[], baidu);
    assert_eq!(e.code(), ErrorCode::RateLimitExceeded);
    assert!(!e.is_retryable());
    assert_eq!(e.provider(), Some("qianfan"));
    let minimax = r#"{"base_resp":{"status_code":1008,"status_msg":"insufficient balance"}}"#;
    let e = classify_at(200, &[], minimax);
    assert_eq!(e.code(), ErrorCode::InsufficientQuota);
    assert_eq!(e.provider(), Some("minimax"));
    let ok = r#"{"base_resp":{"status_code":0,"status_msg":"success"}}"#;
    assert!(classify_response(StatusCode::OK, &HeaderMap::new(), ok.as_bytes()).is_none());

    // A server-error type on a client-error status does not decide.
    let ollama =
        r#"{"error":{"message":"model \"x\" not found, try pulling it first","type":"api_error"}}"#;
    assert_eq!(
        classify_at(404, &[], ollama).code(),
        ErrorCode::ModelNotSupported
    );
    let disabled = r#"{"type":"error","error":{"type":"invalid_request_error","message":"This organization has been disabled."}}"#;
    assert_eq!(
        classify_at(400, &[], disabled).code(),
        ErrorCode::RevokedApiKey
    );
}

/// The upstream's own code, type and message ride along, scrubbed and bounded, and reach the
/// envelope only when the application asks.
#[test]
fn the_upstreams_own_words_are_kept() {
    let body = r#"{"error":{"message":"Key sk-proj-Zx81kQ0pLm3nB7vC5tY9uW2eR4 is over its limit","type":"tokens","code":"rate_limit_exceeded"}}"#;
    let e = classify_at(429, &[], body);
    let d = e.upstream_detail().expect("detail kept");
    assert_eq!(d.code(), Some("rate_limit_exceeded"));
    assert_eq!(d.kind(), Some("tokens"));
    let m = d.message().unwrap();
    assert!(!m.contains("Zx81kQ0pLm3nB7vC5tY9"), "{m}");
    assert!(m.contains("is over its limit"), "{m}");

    // The innermost error of a nested body is the one kept.
    let nested = r#"{"error":{"message":"Provider returned error","code":429,"metadata":{"raw":"{\"error\":{\"message\":\"slow down\",\"type\":\"rate_limit_error\"}}"}}}"#;
    let d = classify_at(429, &[], nested)
        .upstream_detail()
        .cloned()
        .unwrap();
    assert_eq!(
        (d.kind(), d.message()),
        (Some("rate_limit_error"), Some("slow down"))
    );
    // Google: the reason and gRPC status stand in for code and type.
    let google = r#"{"error":{"code":400,"message":"API key not valid.","status":"INVALID_ARGUMENT","details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"API_KEY_INVALID"}]}}"#;
    let d = classify_at(400, &[], google)
        .upstream_detail()
        .cloned()
        .unwrap();
    assert_eq!(
        (d.code(), d.kind()),
        (Some("API_KEY_INVALID"), Some("INVALID_ARGUMENT"))
    );
    // Plain text is the message; huge values are bounded.
    let huge = "x".repeat(100_000);
    let e = classify_at(500, &[], &huge);
    assert!(
        e.upstream_detail()
            .unwrap()
            .message()
            .unwrap()
            .chars()
            .count()
            <= MAX_MESSAGE_CHARS
    );
    let long_code = format!(
        r#"{{"error":{{"message":"m","code":"{}"}}}}"#,
        "c".repeat(5000)
    );
    let e = classify_at(400, &[], &long_code);
    assert!(e.upstream_detail().unwrap().code().unwrap().len() <= UpstreamDetail::MAX_ID_CHARS);
    // Nothing to keep: an empty body.
    assert!(classify_at(503, &[], "").upstream_detail().is_none());

    // The envelope shows it only on request.
    let e = classify_at(429, &[], body);
    let plain: Value = serde_json::from_slice(e.to_response::<Bytes>().body()).unwrap();
    assert!(plain["error"].get("upstream").is_none(), "{plain}");
    let opts = EnvelopeOptions::new().expose_upstream(true);
    let shown: Value = serde_json::from_slice(e.to_response_with::<Bytes>(&opts).body()).unwrap();
    assert_eq!(shown["error"]["upstream"]["code"], "rate_limit_exceeded");
    assert_eq!(shown["error"]["upstream"]["type"], "tokens");
    assert!(!shown.to_string().contains("Zx81kQ0pLm3nB7vC5tY9"));
    assert_eq!(shown["error"]["code"], "rate_limit_exceeded");
}

/// Application rules run before the built-ins: the first that answers sets the code, the
/// rest of the classification stays; with none answering the result is the built-in one.
#[test]
fn application_rules_run_first() {
    let h = HeaderMap::new();
    let at = |c: &Classifier, status: u16, body: &str| {
        c.classify_response_at(
            StatusCode::from_u16(status).unwrap(),
            &h,
            body.as_bytes(),
            fixed_now(),
        )
        .unwrap()
    };
    let c = Classifier::new()
        .rule(
            Rule::to(ErrorCode::InsufficientQuota)
                .status(403)
                .code("quota_empty"),
        )
        .rule(Rule::to(ErrorCode::ConcurrentLimitExceeded).message("ALL SLOTS ARE BUSY"))
        .rule(Rule::to(ErrorCode::InvalidValue).status(418))
        .rule_fn(|up| {
            (up.classified().code() == ErrorCode::RateLimitExceeded
                && up.headers().contains_key("x-tenant-cap"))
            .then_some(ErrorCode::InsufficientQuota)
        });
    assert!(c.has_rules());
    let relay = r#"{"error":{"message":"Quota empty","code":"QUOTA_EMPTY"}}"#;
    assert_eq!(at(&c, 403, relay).code(), ErrorCode::InsufficientQuota);
    // The status condition holds the rule back on another status.
    assert_eq!(at(&c, 401, relay).code(), ErrorCode::InvalidApiKey);
    // A plain-text answer, matched by its words; the wait the built-ins found is kept.
    let mut hh = HeaderMap::new();
    hh.insert("retry-after", HeaderValue::from_static("3"));
    let e = c
        .classify_response_at(
            StatusCode::SERVICE_UNAVAILABLE,
            &hh,
            b"All slots are busy",
            fixed_now(),
        )
        .unwrap();
    assert_eq!(e.code(), ErrorCode::ConcurrentLimitExceeded);
    assert_eq!(e.retry_after(), Some(Duration::from_secs(3)));
    assert_eq!(e.upstream_status(), Some(StatusCode::SERVICE_UNAVAILABLE));
    // First rule wins: a 418 with the slots words is the message rule's.
    assert_eq!(
        at(&c, 418, "all slots are busy").code(),
        ErrorCode::ConcurrentLimitExceeded
    );
    assert_eq!(at(&c, 418, "teapot").code(), ErrorCode::InvalidValue);

    // No rule answers: exactly the built-in result.
    let daily = r#"{"message":"Too many tokens per day, please wait before trying again."}"#;
    let built_in = classify_at(429, &[], daily);
    assert!(!built_in.is_retryable());
    assert_eq!(at(&c, 429, daily), built_in);
    assert_eq!(
        at(&Classifier::new(), 429, daily),
        classify_at(429, &[], daily)
    );
    // A function rule sees headers and the built-in code; a changed code drops never-fits.
    let mut cap = HeaderMap::new();
    cap.insert("x-tenant-cap", HeaderValue::from_static("1"));
    let e = c
        .classify_response_at(
            StatusCode::TOO_MANY_REQUESTS,
            &cap,
            daily.as_bytes(),
            fixed_now(),
        )
        .unwrap();
    assert_eq!(e.code(), ErrorCode::InsufficientQuota);
    let to_limit =
        Classifier::new().rule(Rule::to(ErrorCode::ServiceUnavailable).message("per day"));
    assert!(at(&to_limit, 429, daily).is_retryable());
    // An empty pattern is no condition; a very long one is cut, not refused.
    let any = Classifier::new().rule(Rule::to(ErrorCode::Timeout).message(""));
    assert_eq!(at(&any, 400, "{}").code(), ErrorCode::Timeout);
    let long = Classifier::new().rule(Rule::to(ErrorCode::Timeout).message("x".repeat(10_000)));
    assert_eq!(at(&long, 400, &"x".repeat(300)).code(), ErrorCode::Timeout);
    assert!(format!("{c:?}").contains("function_rules: 1"));
}

/// Key-like strings in any fixture body (`sk-`, `sk-ant-`, `AIza` followed by a long token)
/// never reach the message.
#[test]
fn no_fixture_key_reaches_a_message() {
    let mut checked = 0;
    for path in ["tests/fixtures/errors.jsonl", "tests/fixtures/extra.jsonl"] {
        for f in load(path) {
            let body = String::from_utf8_lossy(&f.body).into_owned();
            let msg = classify(&f).unwrap().message().to_owned();
            for prefix in ["sk-", "AIza"] {
                let mut from = 0;
                while let Some(i) = body[from..].find(prefix) {
                    let start = from + i;
                    let token: String = body[start..]
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '*'))
                        .collect();
                    from = start + prefix.len();
                    if token.len() >= prefix.len() + 8 {
                        checked += 1;
                        let secret = &token[prefix.len()..token.len() - 4];
                        assert!(!msg.contains(secret), "{}: {msg}", f.id);
                    }
                }
            }
        }
    }
    // OAI-01 (pre-masked by OpenAI), EX-02 and EX-17 carry keys.
    assert!(checked >= 3, "only {checked} keys found");
}

#[test]
fn extras_carry_the_details() {
    let fx = load("tests/fixtures/extra.jsonl");
    let by_id = |id: &str| fx.iter().find(|f| f.id == id).unwrap();

    let e = classify(by_id("EX-02")).unwrap();
    assert_eq!(
        e.message(),
        "Incorrect API key provided: sk-proj-...2eR4. You can find your API key at https://platform.openai.com/account/api-keys."
    );
    assert_eq!(e.provider(), Some("openai"));

    let e = classify(by_id("EX-03")).unwrap();
    assert_eq!(e.upstream_status(), Some(StatusCode::OK));
    assert!(e.message().starts_with("Rate limit reached for gpt-4o"));

    let e = classify(by_id("EX-01")).unwrap();
    assert_eq!(e.provider(), Some("anthropic"));
    assert_eq!(e.upstream_status(), Some(StatusCode::BAD_GATEWAY));

    let e = classify(by_id("EX-20")).unwrap();
    assert_eq!(e.param(), Some("messages"));

    let e = classify(by_id("EX-17")).unwrap();
    assert_eq!(
        e.message(),
        "upstream returned an HTML page (status 401); title: Invalid token sk-ant-...-123"
    );
}

#[test]
fn request_ids_params_and_families_from_the_corpus() {
    let fx = load("tests/fixtures/errors.jsonl");
    let get = |id: &str| classify(fx.iter().find(|f| f.id == id).unwrap()).unwrap();

    assert_eq!(
        get("ANT-02").request_id(),
        Some("req_011CZAY8xEUqbHSEE3BdFtMh")
    );
    assert_eq!(
        get("ANT-03").request_id(),
        Some("req_01RCc7MbLyQNtGKzBTv8VCep")
    );
    assert_eq!(
        get("OAI-02").request_id(),
        Some("7b966b36ddd38909e4767811c768ed99")
    );
    assert_eq!(
        get("BR-01").request_id(),
        Some("ca47a5ce-e260-4824-aa0e-2e62669d5d6e")
    );
    assert_eq!(
        get("GW-07").request_id(),
        Some("914a39d68c290da3e187f827f7e1b771")
    );
    assert_eq!(get("OAI-17").param(), Some("model"));
    assert_eq!(get("AZ-01").param(), Some("prompt"));
    assert_eq!(get("MIS-09").param(), Some("max_completion_tokens"));
    assert_eq!(
        get("GW-02").param(),
        None,
        "the string \"None\" is no parameter"
    );
    assert_eq!(get("ANT-01").provider(), Some("anthropic"));
    assert_eq!(get("GEM-05").provider(), Some("google"));
    assert_eq!(get("GEM-08b").provider(), Some("google"));
    assert_eq!(get("ZP-01").provider(), Some("zhipu"));
    assert_eq!(get("MS-02").provider(), Some("moonshot"));
    assert_eq!(get("DSC-03").provider(), Some("dashscope"));
    assert_eq!(get("BR-01").provider(), Some("bedrock"));
    assert_eq!(get("OL-01").provider(), Some("ollama"));
    assert_eq!(
        get("OR-02").upstream_status(),
        Some(StatusCode::BAD_GATEWAY)
    );
    assert_eq!(get("CDN-13").provider(), Some("html"));
    assert_eq!(
        get("CDN-13").message(),
        "upstream returned an HTML page (status 403, likely a CDN/WAF or geo block); title: Attention Required! | Cloudflare"
    );
    assert_eq!(
        get("CDN-16").message(),
        "upstream returned a plain-text answer (status 503, likely a gateway or load balancer error); first line: upstream connect error or disconnect/reset before headers. reset reason: connection failure"
    );
    assert_eq!(
        get("GEM-08b").message(),
        "API key expired. Please renew the API key."
    );
    assert_eq!(
        get("MIS-03").message(),
        "upstream answered with status 401 and an empty body"
    );
    assert!(get("OAI-10").retry_after().is_none());
}

#[test]
fn normal_answers_are_not_errors() {
    let h = HeaderMap::new();
    let ok = br#"{"id":"chatcmpl-1","object":"chat.completion","choices":[{"message":{"content":"{\"error\": 1}"}}]}"#;
    assert!(classify_response(StatusCode::OK, &h, ok).is_none());
    assert!(classify_response(StatusCode::NO_CONTENT, &h, b"").is_none());
    assert!(classify_response(StatusCode::MOVED_PERMANENTLY, &h, b"<html>").is_none());
    let mut sse = HeaderMap::new();
    sse.insert(
        "content-type",
        HeaderValue::from_static("text/event-stream"),
    );
    let stream = b"data: {\"choices\":[{\"delta\":{\"content\":\"error\"}}]}\n\ndata: [DONE]\n\n";
    assert!(classify_response(StatusCode::OK, &sse, stream).is_none());
    assert!(classify_sse_stream(stream).is_none());
    let mut mixed = HeaderMap::new();
    mixed.insert(
        "content-type",
        HeaderValue::from_static("Text/Event-Stream; charset=utf-8"),
    );
    let failing = b": keep-alive\n\nevent: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"api_error\",\"message\":\"x\"}}\n\n";
    let e = classify_response(StatusCode::OK, &mixed, &failing[..]).unwrap();
    assert_eq!(e.code(), ErrorCode::InternalError);
    assert_eq!(e.upstream_status(), Some(StatusCode::OK));
    assert!(classify_sse_event(b"[DONE]").is_none());
    assert!(classify_sse_event(b"{\"type\":\"ping\"}").is_none());
    assert!(classify_sse_event(b"not json").is_none());
    // A 200 whose JSON opens with an error is one.
    let e = classify_response(
        StatusCode::OK,
        &h,
        br#"[ {"error":{"code":503,"message":"x"}}]"#,
    );
    assert_eq!(e.unwrap().code(), ErrorCode::ServiceUnavailable);
}

#[test]
fn event_error_without_a_known_body_is_an_internal_error() {
    let e = classify_sse_stream(b"event: error\ndata: something broke\n\n").unwrap();
    assert_eq!(e.code(), ErrorCode::InternalError);
    assert_eq!(e.message(), "upstream sent an error event: something broke");
    // A last event without the closing blank line still counts.
    let e = classify_sse_stream(b"data: {\"error\":{\"message\":\"boom\"}}").unwrap();
    assert_eq!(e.message(), "boom");
}

#[test]
fn huge_and_broken_bodies() {
    let h = HeaderMap::new();
    let huge = format!(
        "{{\"error\":{{\"message\":\"{}\"}}}}",
        "x".repeat(2 * 1024 * 1024)
    );
    let e = classify_response(StatusCode::BAD_REQUEST, &h, huge.as_bytes()).unwrap();
    assert_eq!(e.code(), ErrorCode::InvalidValue);
    assert!(e.message().chars().count() <= MAX_MESSAGE_CHARS);
    let e = classify_response(StatusCode::SERVICE_UNAVAILABLE, &h, &[0xff, 0xfe, b'{']).unwrap();
    assert_eq!(e.code(), ErrorCode::ServiceUnavailable);
    let e = classify_response(StatusCode::TOO_MANY_REQUESTS, &h, b"{\"error\":").unwrap();
    assert_eq!(e.code(), ErrorCode::RateLimitExceeded);
    // JSON with no error in it: the status decides, the message says so.
    let e = classify_response(StatusCode::INTERNAL_SERVER_ERROR, &h, b"{\"ok\":false}").unwrap();
    assert_eq!(e.code(), ErrorCode::InternalError);
    assert_eq!(
        e.message(),
        "upstream answered with status 500 (internal_error)"
    );
    let e = classify_response(StatusCode::BAD_GATEWAY, &h, b"null").unwrap();
    assert_eq!(e.code(), ErrorCode::ServiceUnavailable);
}

fn header_strategy() -> impl Strategy<Value = Vec<(&'static str, String)>> {
    let names = prop::sample::select(vec![
        "content-type",
        "retry-after",
        "retry-after-ms",
        "x-ratelimit-reset-tokens",
        "x-ratelimit-remaining-tokens",
        "anthropic-ratelimit-tokens-reset",
        "x-request-id",
        "x-amzn-errortype",
    ]);
    prop::collection::vec((names, "[ -~]{0,40}"), 0..4)
}

fn build_headers(pairs: &[(&'static str, String)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        if let Ok(v) = HeaderValue::from_str(v) {
            h.insert(*k, v);
        }
    }
    h
}

/// Bodies that reach the interesting paths: JSON-ish fragments, HTML, SSE, raw bytes.
fn body_strategy() -> impl Strategy<Value = Vec<u8>> {
    let pieces = prop::sample::select(vec![
        "{",
        "}",
        "[",
        "]",
        "\"error\"",
        ":",
        ",",
        "\"message\"",
        "\"code\"",
        "429",
        "\"1113\"",
        "\"type\"",
        "\"status\"",
        "\"RESOURCE_EXHAUSTED\"",
        "\"details\"",
        "\"retryDelay\"",
        "\"3.5s\"",
        "\"metadata\"",
        "\"raw\"",
        "\\\"",
        "{\\\"error\\\":",
        "try again in 1.5s",
        "<title>",
        "</title>",
        "data: ",
        "event: error",
        "\n\n",
        "\r\n",
        "sk-",
        "é",
        "null",
    ]);
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..512),
        prop::collection::vec(pieces, 0..40).prop_map(|v| v.concat().into_bytes()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn never_panics_and_bounds_messages(
        status in 100u16..600,
        headers in header_strategy(),
        body in body_strategy(),
    ) {
        let status = StatusCode::from_u16(status).unwrap();
        let headers = build_headers(&headers);
        if let Some(e) = classify_response(status, &headers, &body) {
            prop_assert!(e.message().chars().count() <= MAX_MESSAGE_CHARS);
            prop_assert!(!e.message().is_empty());
        }
        if let Some(e) = classify_sse_stream(&body) {
            prop_assert!(e.message().chars().count() <= MAX_MESSAGE_CHARS);
        }
        let _ = classify_sse_event(&body);
    }

    #[test]
    fn planted_keys_never_reach_the_message(
        prefix in prop::sample::select(vec!["sk-", "sk-ant-api03-", "sk-proj-", "AIza", "gsk_"]),
        secret in "[A-Za-z0-9]{16,48}",
        before in prop::sample::select(vec![" ", ": ", "(", "=", "\n", "key:", "Bearer "]),
        template in 0usize..6,
        status in prop::sample::select(vec![200u16, 400, 401, 403, 429, 500, 502]),
    ) {
        let key = format!("{prefix}{secret}");
        let text = format!("Incorrect API key provided{before}{key}. Try again in 2s.");
        let json_str = serde_json::to_string(&text).unwrap();
        let body = match template {
            0 => format!("{{\"error\":{{\"message\":{json_str},\"code\":\"invalid_api_key\"}}}}"),
            1 => {
                let inner = format!("{{\"error\":{{\"message\":{json_str}}}}}");
                format!("{{\"error\":{{\"message\":{}}}}}", serde_json::to_string(&inner).unwrap())
            }
            2 => format!("<html><head><title>{text}</title></head></html>"),
            3 => text.clone(),
            4 => format!("{{\"error\":{{\"message\":\"x\",\"param\":{json_str}}}}}"),
            _ => format!("{{\"message\":{json_str}}}"),
        };
        let status = StatusCode::from_u16(status).unwrap();
        let hidden = &key[prefix.len()..key.len() - 4];
        if let Some(e) = classify_response(status, &HeaderMap::new(), body.as_bytes()) {
            prop_assert!(!e.message().contains(hidden), "{}", e.message());
            prop_assert!(!e.param().unwrap_or("").contains(hidden));
        }
        let sse = format!("data: {body}\n\n");
        if let Some(e) = classify_sse_stream(sse.as_bytes()) {
            prop_assert!(!e.message().contains(hidden), "{}", e.message());
        }
    }
}

#[test]
fn head_only_classification() {
    use llm_layers::classify::classify_head_at;
    let mut h = HeaderMap::new();
    h.insert(
        "x-ratelimit-remaining-requests",
        HeaderValue::from_static("0"),
    );
    h.insert(
        "x-ratelimit-reset-requests",
        HeaderValue::from_static("1.5s"),
    );
    h.insert("x-request-id", HeaderValue::from_static("req_123"));
    let e = classify_head_at(StatusCode::TOO_MANY_REQUESTS, &h, fixed_now()).unwrap();
    assert_eq!(e.code(), ErrorCode::RateLimitExceeded);
    assert_eq!(e.retry_after(), Some(Duration::from_millis(1500)));
    assert_eq!(e.request_id(), Some("req_123"));
    // Reset headers ride along on every answer; they are no wait for other errors.
    let e = classify_head_at(StatusCode::BAD_REQUEST, &h, fixed_now()).unwrap();
    assert_eq!(e.retry_after(), None);
    h.insert(
        "retry-after",
        HeaderValue::from_static("Mon, 23 Nov 2026 10:01:00 GMT"),
    );
    let e = classify_head_at(StatusCode::SERVICE_UNAVAILABLE, &h, fixed_now()).unwrap();
    assert_eq!(e.retry_after(), Some(Duration::from_secs(60)));
    assert!(classify_head_at(StatusCode::OK, &h, fixed_now()).is_none());
}

#[derive(Debug)]
struct Wrapper(Box<dyn std::error::Error + Send + Sync>);

impl std::fmt::Display for Wrapper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("error sending request")
    }
}

impl std::error::Error for Wrapper {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}

#[test]
fn transport_errors_walk_the_source_chain() {
    use llm_layers::classify::classify_transport_error;
    use std::io::{Error, ErrorKind};
    let refused = Wrapper(Box::new(Error::from(ErrorKind::ConnectionRefused)));
    let e = classify_transport_error(&refused);
    assert_eq!(e.code(), ErrorCode::ServiceUnavailable);
    assert_eq!(e.status(), StatusCode::BAD_GATEWAY);
    let timed_out = Wrapper(Box::new(Wrapper(Box::new(Error::from(
        ErrorKind::TimedOut,
    )))));
    assert_eq!(
        classify_transport_error(&timed_out).code(),
        ErrorCode::Timeout
    );
    let reset = Wrapper(Box::new(Error::from(ErrorKind::ConnectionReset)));
    assert_eq!(
        classify_transport_error(&reset).message(),
        "The connection to the upstream was closed before it answered."
    );
}

#[test]
fn an_api_error_in_the_chain_is_its_own_classification() {
    use llm_layers::classify::classify_transport_error;
    let refusal = ApiError::new(
        ErrorCode::UpstreamBlocked,
        "A redirect to http://elsewhere:8080 was not followed.",
    );
    let wrapped = Wrapper(Box::new(Wrapper(Box::new(refusal.clone()))));
    let e = classify_transport_error(&wrapped);
    assert_eq!(e, refusal);
    assert_eq!(e.status(), StatusCode::BAD_GATEWAY);
    assert!(!e.is_retryable());
}

/// The key shapes the scrubber catches, each inside a provider message that reaches the
/// envelope: Zhipu-style `id.secret`, base64 with `/` and `+`, JWTs, and unprefixed keys
/// shorter than 32 characters.
#[test]
fn dotted_slashed_and_short_unprefixed_keys_never_reach_a_message() {
    use llm_layers::classify::scrub_secrets;
    let keys = [
        // Zhipu / GLM: a 32-hex id, a dot, a 16-character secret.
        "c3a2b1d4e5f60718293a4b5c6d7e8f90.AbCdEfGh1jKlMnOp",
        "0f1e2d3c4b5a69788796a5b4c3d2e1f0.xVfQgRbZrWTqMPJh",
        // base64 secrets with `/` and `+`.
        "u7Hk/9sLq+Wd3pXz0aB1cD2eF3gH4iJ5kL6mN7oP8qR9==",
        "wJalrXUtnFEMI/K7MDENG/bPxRfiCY9XAMPLEKEY",
        "Qk3/hZ8+xT2/pL9mWv4/Nc7rYs1/Ud6eBf0g",
        // A JWT (MiniMax and others).
        "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dBjftJeZ4CVPmB92K27uhbUJU1p1r",
        // Unprefixed keys shorter than 32 characters (Baidu-style 24, a bare 16-char secret).
        "q8Zk3LmP0xYv7RtB2nWc9HsD",
        "xVfQ8bZr7TqMPJh2",
        "a8f3K2m9X7q1W5e6r4T0",
    ];
    for key in keys {
        let hidden = &key[..key.len() - 4];
        for text in [
            format!("Invalid API key: {key}. Check your key."),
            format!("api_key={key}"),
            format!("(key {key})"),
            format!("Authorization failed for token \"{key}\""),
        ] {
            let scrubbed = scrub_secrets(&text);
            // No 8 characters of the key in a row survive, bar the last four.
            for w in hidden.as_bytes().windows(8) {
                let w = std::str::from_utf8(w).unwrap();
                assert!(!scrubbed.contains(w), "{key} survived: {scrubbed}");
            }
            assert!(
                scrubbed.contains(&key[key.len() - 4..]),
                "the last four stay to tell keys apart: {scrubbed}"
            );
            let body = serde_json::json!({"error": {"message": text, "code": "1000"}});
            let e = classify_response(
                StatusCode::UNAUTHORIZED,
                &HeaderMap::new(),
                body.to_string().as_bytes(),
            )
            .unwrap();
            for w in hidden.as_bytes().windows(8) {
                let w = std::str::from_utf8(w).unwrap();
                assert!(!e.message().contains(w), "{key}: {}", e.message());
            }
        }
    }
}

/// What the scrubber leaves alone: words, identifiers, model names (with or without an
/// organisation), URLs and paths, request and object ids, durations, numbers.
#[test]
fn words_model_names_urls_and_request_ids_are_left_intact() {
    use llm_layers::classify::scrub_secrets;
    let intact = [
        "The model `gpt-4o-2024-08-06` does not exist or you do not have access to it.",
        "The model `meta-llama/Meta-Llama-3.1-70B-Instruct` does not exist.",
        "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B is overloaded; Qwen2.5-72B-Instruct is not.",
        "mistralai/Mixtral-8x7B-Instruct-v0.1 and claude-3-5-sonnet-20241022 and Baichuan4-Turbo",
        "ft:gpt-4o-mini-2024-07-18:my-org:custom:9sQ2xYzA failed",
        "You can find your API key at https://platform.openai.com/account/api-keys.",
        "See https://us-central1-aiplatform.googleapis.com/v1/projects/my-project-123/locations/us-central1/publishers/google/models/gemini-1.5-pro-002:generateContent",
        "projects/123456789012/locations/us-central1/endpoints/1234567890123456789 not found",
        "Request id: req_011CTy8ZpGxRfL2mNqAbCdEf (chatcmpl-AbC123xYz456QwE789, gen-1700000000-Xy9Zq2Lm8NpR4sTu)",
        "quota metric generate_content_free_tier_input_token_count, method GenerateContentRequest",
        "HTTPStatusCodeBadRequest: AttentionRequired. Please try again in 9m38.016s.",
        "Limit 30000, Used 29000, Requested 1500, version 1.2.3, at 2025-01-01T00:00:30.25Z.",
        "Rate limit reached for gpt-4o in organization org-Ab12Cd34Ef56Gh78Ij90 on tokens.",
        "/v1/chat/completions and /openai/deployments/gpt-4o-prod/chat/completions",
    ];
    for text in intact {
        assert_eq!(scrub_secrets(text), text);
    }
    // A 32-hex request id cannot be told from a 32-hex key (Azure keys look like that): masked.
    assert_eq!(
        scrub_secrets("request e5c949c8ec2c86be225544e5eefcbe4d failed"),
        "request ...be4d failed"
    );
    // Only the key goes: the sentence, its punctuation and a URL around it stay.
    assert_eq!(
        scrub_secrets("Key q8Zk3LmP0xYv7RtB2nWc9HsD. See https://example.com/docs."),
        "Key ...9HsD. See https://example.com/docs."
    );
    assert_eq!(
        scrub_secrets("GET https://example.com/v1/keys/c3a2b1d4e5f60718293a4b5c6d7e8f90/usage"),
        "GET https://example.com/v1/keys/...8f90/usage"
    );
}

/// Every wait source is held to the same one-year cap, and extreme values (year 9999, negative,
/// huge numbers) are refused without a panic or a wrap.
#[test]
fn every_wait_source_is_capped_at_a_year_and_extremes_never_panic() {
    use llm_layers::classify::wait;
    let now = fixed_now();
    let headers = |pairs: &[(&'static str, &str)]| {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    };
    // HTTP-dates: a year from now is the most; year 9999 is garbage, not an 8,000-year wait.
    assert_eq!(
        wait::parse_retry_after("Fri, 31 Dec 9999 23:59:59 GMT", now),
        None
    );
    assert_eq!(
        wait::parse_retry_after("Wed, 23 Nov 2050 10:00:00 GMT", now),
        None
    );
    assert_eq!(
        wait::parse_retry_after("Mon, 23 Nov 2026 10:00:30 GMT", now),
        Some(Duration::from_secs(30))
    );
    assert_eq!(
        wait::from_headers_at(
            &headers(&[("retry-after", "Fri, 31 Dec 9999 23:59:59 GMT")]),
            now
        ),
        None
    );
    // RFC 3339 reset dates, the same cap.
    let far = headers(&[
        ("anthropic-ratelimit-requests-reset", "9999-12-31T23:59:59Z"),
        ("anthropic-ratelimit-requests-remaining", "0"),
    ]);
    assert_eq!(wait::rate_limit_reset_at(&far, now), None);
    let near = headers(&[("anthropic-ratelimit-tokens-reset", "2026-11-23T10:00:30Z")]);
    assert_eq!(
        wait::rate_limit_reset_at(&near, now),
        Some(Duration::from_secs(30))
    );
    // A far date on one limit does not hide a sane one on another.
    let mixed = headers(&[
        ("anthropic-ratelimit-requests-reset", "9999-12-31T23:59:59Z"),
        ("anthropic-ratelimit-tokens-reset", "2026-11-23T10:00:30Z"),
    ]);
    assert_eq!(
        wait::rate_limit_reset_at(&mixed, now),
        Some(Duration::from_secs(30))
    );
    // Through the classifier: a 429 whose only hints are absurd has no wait.
    let e = classify_response_at(
        StatusCode::TOO_MANY_REQUESTS,
        &headers(&[
            ("retry-after", "Fri, 31 Dec 9999 23:59:59 GMT"),
            ("anthropic-ratelimit-requests-reset", "9999-12-31T23:59:59Z"),
        ]),
        br#"{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}"#,
        now,
    )
    .unwrap();
    assert_eq!(e.code(), ErrorCode::RateLimitExceeded);
    assert_eq!(e.retry_after(), None);
    // Numbers: negative, huge, not finite, overlong; none panics, none is accepted.
    for v in [
        "-1",
        "-0.5",
        "1e300",
        "inf",
        "NaN",
        "31622401",
        "18446744073709551616",
        "99999999999999999999999999999999999999",
    ] {
        assert_eq!(wait::parse_retry_after(v, now), None, "{v}");
    }
    for v in [
        "99999999999999999999h",
        "9223372036854775807h9223372036854775807m",
        "8784h1s",
        "1e9s",
        "-5s",
    ] {
        assert_eq!(wait::parse_duration(v), None, "{v}");
    }
    assert_eq!(wait::parse_retry_delay("1e300s"), None);
    assert_eq!(wait::parse_retry_delay("-1s"), None);
    assert_eq!(
        wait::from_text("Please try again in 99999999999999999999999 hours."),
        None
    );
    assert_eq!(
        wait::from_headers_at(&headers(&[("retry-after-ms", "1e30")]), now),
        None
    );
    // The last instant RFC 3339 can write, and the first, parse without overflow.
    assert!(wait::parse_rfc3339("9999-12-31T23:59:60.999999999+00:00").is_some());
    assert!(wait::parse_rfc3339("9999-12-31T00:00:00-23:59").is_some());
    assert_eq!(wait::parse_rfc3339("0000-01-01T00:00:00Z"), None);
    // Exactly a year is still a wait.
    assert_eq!(
        wait::parse_retry_after("31622400", now),
        Some(Duration::from_secs(31_622_400))
    );
}

proptest! {
    /// Zhipu-style `id.secret` keys and unprefixed keys of 20 characters or more that mix
    /// letters and digits never survive, wherever they sit in a sentence.
    #[test]
    fn dotted_and_unprefixed_keys_never_survive(
        id in "[0-9a-f]{32}",
        secret in "[A-Za-z0-9]{16}",
        bare in "[A-Za-z]{1,12}[0-9][A-Za-z0-9]{18,30}",
        before in prop::sample::select(vec![" ", ": ", "=", "(", "\"", "key:", "\n"]),
        after in prop::sample::select(vec!["", ".", ")", ". Retry.", "/", "\","]),
    ) {
        use llm_layers::classify::scrub_secrets;
        for key in [format!("{id}.{secret}"), bare.clone()] {
            let text = format!("Invalid API key{before}{key}{after} Check it.");
            let scrubbed = scrub_secrets(&text);
            for w in key.as_bytes()[..key.len() - 4].windows(8) {
                let w = std::str::from_utf8(w).unwrap();
                prop_assert!(!scrubbed.contains(w), "{} survived: {}", key, scrubbed);
            }
            prop_assert!(scrubbed.ends_with(&format!("{after} Check it.")), "{}", scrubbed);
        }
    }
}

/// A message cut before scrubbing (huge input) does not leave the head of a key at the cut,
/// even when folding whitespace brings the cut inside the bound.
#[test]
fn a_key_cut_by_the_input_bound_leaves_no_fragment() {
    let key = "q8Zk3LmP0xYv7RtB2nWc9HsD";
    for pad in 3_980..4_000 {
        let text = format!("Bad key:{}{key} and more", " ".repeat(pad));
        let body = serde_json::json!({"error": {"message": text}});
        let e = classify_response(
            StatusCode::UNAUTHORIZED,
            &HeaderMap::new(),
            body.to_string().as_bytes(),
        )
        .unwrap();
        assert!(!e.message().contains("q8Zk3"), "{pad}: {}", e.message());
        assert!(e.message().chars().count() <= MAX_MESSAGE_CHARS);
    }
}
