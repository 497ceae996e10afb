//! Property tests of the normalizer's body framing: SSE streams and `200` JSON answers cut at
//! random chunk boundaries, with LF, CRLF or CR line ends, through `NormalizeErrorsLayer`.
//!
//! The bodies are polled by hand with a no-op waker (every chunk is released one at a time),
//! so each case costs microseconds and the test sees what was handed on after each chunk.
//!
//! Run with `PROPTEST_CASES=<n>` to change the number of cases (10 000 by default).

mod common_prop;
use common_prop::config;
use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame};
use llm_layers::classify::classify_sse_event;
use llm_layers::error::{ApiError, TypeStyle};
use llm_layers::normalize::{NormalizeErrorsLayer, NormalizeOptions};
use proptest::prelude::*;
use tower::{Layer, ServiceExt};

/// A tenth of the cases, at least 1 000, for the properties whose cases are large.
fn config_tenth() -> ProptestConfig {
    let c = config();
    ProptestConfig {
        cases: (c.cases / 10).max(1000),
        ..c
    }
}

// ---------- a body fed by hand ----------

/// An upstream body whose chunks are handed out only once released; `Pending` before.
struct Feed {
    chunks: VecDeque<Bytes>,
    /// Chunks released so far; `chunks.len() + 1` also releases the end of the body.
    released: Arc<AtomicUsize>,
    taken: usize,
}

impl Body for Feed {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let released = self.released.load(Ordering::SeqCst);
        if self.taken >= released {
            return Poll::Pending;
        }
        match self.chunks.pop_front() {
            Some(c) => {
                self.taken += 1;
                Poll::Ready(Some(Ok(Frame::data(c))))
            }
            None => Poll::Ready(None),
        }
    }
}

/// Cuts `data` at the given points (sorted, deduplicated, empty chunks allowed at the ends).
fn chunks(data: &[u8], cuts: &[prop::sample::Index], empty: bool) -> Vec<Bytes> {
    let mut at: Vec<usize> = cuts.iter().map(|i| i.index(data.len() + 1)).collect();
    at.sort_unstable();
    if !empty {
        at.dedup();
    }
    let mut out = Vec::with_capacity(at.len() + 1);
    let mut start = 0;
    for a in at {
        out.push(Bytes::copy_from_slice(&data[start..a]));
        start = a;
    }
    out.push(Bytes::copy_from_slice(&data[start..]));
    out
}

/// What came out after each released chunk, and in total.
struct Run {
    /// `(input bytes released, output bytes handed on)` after each chunk.
    progress: Vec<(usize, usize)>,
    out: Vec<u8>,
    status: u16,
    envelope: Option<ApiError>,
}

/// Sends one request through `NormalizeErrorsLayer` to an upstream answering `200` with the
/// given content type and body chunks, releasing one chunk at a time.
fn run(options: NormalizeOptions, content_type: &str, parts: Vec<Bytes>) -> Run {
    let released = Arc::new(AtomicUsize::new(0));
    let lens: Vec<usize> = parts.iter().map(Bytes::len).collect();
    let total_chunks = parts.len();
    let body = Feed {
        chunks: parts.into(),
        released: released.clone(),
        taken: 0,
    };
    let res = Response::builder()
        .status(200)
        .header("content-type", content_type)
        .body(body)
        .unwrap();
    let mut res = Some(res);
    let svc = NormalizeErrorsLayer::with_options(options).layer(tower::service_fn(
        move |_req: Request<()>| {
            let r = res.take().expect("one call");
            async move { Ok::<_, Infallible>(r) }
        },
    ));
    let mut cx = Context::from_waker(Waker::noop());
    let mut fut = std::pin::pin!(svc.oneshot(Request::new(())));
    let mut fed = 0usize;
    let mut in_bytes = 0usize;
    let mut progress = Vec::new();
    // The head may wait for body frames (`inspect_ok_json`).
    let res = loop {
        if let Poll::Ready(r) = fut.as_mut().poll(&mut cx) {
            break r.unwrap();
        }
        assert!(fed <= total_chunks, "the head never came");
        if fed < total_chunks {
            in_bytes += lens[fed];
        }
        fed += 1;
        released.store(fed, Ordering::SeqCst);
    };
    let status = res.status().as_u16();
    let envelope = res.extensions().get::<ApiError>().cloned();
    let mut body = std::pin::pin!(res.into_body());
    let mut out = Vec::new();
    loop {
        match body.as_mut().poll_frame(&mut cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Ok(d) = frame.into_data() {
                    out.extend_from_slice(&d);
                }
            }
            Poll::Ready(Some(Err(e))) => match e {},
            Poll::Ready(None) => break,
            Poll::Pending => {
                progress.push((in_bytes, out.len()));
                assert!(fed <= total_chunks, "the body never ended");
                if fed < total_chunks {
                    in_bytes += lens[fed];
                }
                fed += 1;
                released.store(fed, Ordering::SeqCst);
            }
        }
    }
    progress.push((in_bytes, out.len()));
    Run {
        progress,
        out,
        status,
        envelope,
    }
}

// ---------- SSE streams ----------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    Lf,
    CrLf,
    Cr,
    Mixed,
}

/// Text that a model may well produce, the word `error` included.
fn content() -> impl Strategy<Value = String> {
    prop_oneof![
        "\\PC{0,24}",
        prop::sample::select(vec![
            "error",
            "\"error\"",
            "{\"error\":{\"message\":\"x\"}}",
            "data: {\"error\":1}",
            "event: error",
            "[DONE]",
            "an error occurred in the code",
            "error: retry after 3 seconds",
            "",
            "\u{2028}",
        ])
        .prop_map(str::to_owned),
    ]
}

fn json(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

/// The lines of one normal (non-error) event.
fn normal_event() -> impl Strategy<Value = Vec<String>> {
    (0u8..9, content(), content()).prop_map(|(kind, a, b)| match kind {
        0 => vec![format!(
            r#"data: {{"id":"chatcmpl-1","object":"chat.completion.chunk","choices":[{{"index":0,"delta":{{"content":{}}}}}]}}"#,
            json(&a)
        )],
        1 => vec![
            "event: content_block_delta".to_owned(),
            format!(
                r#"data: {{"type":"content_block_delta","index":0,"delta":{{"type":"text_delta","text":{}}}}}"#,
                json(&a)
            ),
        ],
        2 => vec![format!(
            r#"data: {{"type":"response.created","response":{{"id":"resp_1","error":null,"output_text":{}}}}}"#,
            json(&a)
        )],
        3 => vec!["data: [DONE]".to_owned()],
        4 => vec![format!(": ping {}", a.replace(['\r', '\n'], " "))],
        5 => vec!["id: 7".to_owned(), "retry: 3000".to_owned(), format!("data:{}", json(&a))],
        // Data split over two lines.
        6 => vec![format!("data: {{\"text\":{},", json(&a)), format!("data: \"more\":{}}}", json(&b))],
        7 => vec![format!(
            r#"data: {{"choices":[{{"delta":{{"tool_calls":[{{"function":{{"arguments":{}}}}}]}}}}],"usage":null}}"#,
            json(&format!("{{\"error\":{}}}", json(&a)))
        )],
        _ => vec![format!("event: {}", a.replace(['\r', '\n'], " ")), "data: {}".to_owned()],
    })
}

/// The lines of one in-band error event, in the shapes providers send.
fn error_event() -> impl Strategy<Value = Vec<String>> {
    (0u8..5, "[A-Za-z ]{1,30}").prop_map(|(kind, msg)| match kind {
        0 => vec![format!(
            r#"data: {{"error":{{"message":{},"type":"server_error","param":null,"code":null}}}}"#,
            json(&msg)
        )],
        1 => vec![
            "event: error".to_owned(),
            format!(
                r#"data: {{"type":"error","error":{{"type":"overloaded_error","message":{}}}}}"#,
                json(&msg)
            ),
        ],
        2 => vec![format!(
            r#"data: {{"type":"response.failed","response":{{"id":"resp_1","error":{{"code":"server_error","message":{}}}}}}}"#,
            json(&msg)
        )],
        3 => vec![format!(
            r#"data:{{"error":{{"code":429,"message":{},"status":"RESOURCE_EXHAUSTED"}}}}"#,
            json(&msg)
        )],
        _ => vec![format!(
            r#"data: {{"error":{{"message":{},"type":"rate_limit_error","code":"rate_limit_exceeded"}}}}"#,
            json(&msg)
        )],
    })
}

fn ending() -> impl Strategy<Value = Ending> {
    prop::sample::select(vec![Ending::Lf, Ending::CrLf, Ending::Cr, Ending::Mixed])
}

/// One line of the stream: its text and its line end.
#[derive(Debug, Clone)]
struct Line {
    text: String,
    end: &'static str,
    /// Whether the line belongs to an error event.
    error: bool,
}

/// Lays out the events (each followed by a blank line) with the given line ends; `picks`
/// chooses the line end of each line in the mixed mode.
fn layout(events: &[(bool, Vec<String>)], ending: Ending, picks: &[u8]) -> Vec<Line> {
    let mut lines = Vec::new();
    let mut i = 0usize;
    let mut end = || {
        i += 1;
        match ending {
            Ending::Lf => "\n",
            Ending::CrLf => "\r\n",
            Ending::Cr => "\r",
            Ending::Mixed => ["\n", "\r\n", "\r"][usize::from(picks[i % picks.len()] % 3)],
        }
    };
    for (error, ev) in events {
        for l in ev {
            lines.push(Line {
                text: l.clone(),
                end: end(),
                error: *error,
            });
        }
        lines.push(Line {
            text: String::new(),
            end: end(),
            error: false,
        });
    }
    lines
}

/// The stream the normalizer must hand on: each `data:` line of an error event becomes
/// `data: <envelope>` with the same line end; every other byte stays (the lines of normal
/// events above all, even when a line alone looks like an error). Returns the bytes and,
/// for each line, `(input offset after it, output offset after it)`, and the number of lines
/// rewritten.
/// The input of a laid-out stream and what must come out of it.
struct Expected {
    input: Vec<u8>,
    out: Vec<u8>,
    /// `(input offset, output offset)` after each line.
    marks: Vec<(usize, usize)>,
    /// The lines rewritten to the envelope.
    rewritten: usize,
}

fn expected(lines: &[Line]) -> Expected {
    let mut input = Vec::new();
    let mut out = Vec::new();
    let mut marks = Vec::new();
    let mut rewritten = 0;
    for l in lines {
        input.extend_from_slice(l.text.as_bytes());
        input.extend_from_slice(l.end.as_bytes());
        let err = l
            .text
            .strip_prefix("data:")
            .filter(|_| l.error)
            .and_then(|p| classify_sse_event(p.trim_start().as_bytes()));
        match err {
            Some(e) => {
                rewritten += 1;
                out.extend_from_slice(b"data: ");
                out.extend_from_slice(&e.envelope(TypeStyle::OpenAi));
            }
            None => out.extend_from_slice(l.text.as_bytes()),
        }
        out.extend_from_slice(l.end.as_bytes());
        marks.push((input.len(), out.len()));
    }
    Expected {
        input,
        out,
        marks,
        rewritten,
    }
}

/// Checks a run against the expected stream: same bytes in the end, and after each chunk a
/// prefix of them that covers every line completed in what was released (a line counts as
/// complete once a byte after it has arrived, or the body has ended).
fn check_stream(
    run: &Run,
    want: &[u8],
    marks: &[(usize, usize)],
    total_in: usize,
) -> Result<(), TestCaseError> {
    prop_assert_eq!(run.status, 200);
    prop_assert!(
        run.out == want,
        "output differs\n  got:  {:?}\n  want: {:?}",
        String::from_utf8_lossy(&run.out),
        String::from_utf8_lossy(want)
    );
    for &(in_len, out_len) in &run.progress {
        let due = marks
            .iter()
            .filter(|(i, _)| *i < in_len || (*i == in_len && in_len == total_in))
            .map(|(_, o)| *o)
            .max()
            .unwrap_or(0);
        prop_assert!(
            out_len >= due,
            "after {} input bytes only {} of the {} due output bytes were handed on",
            in_len,
            out_len,
            due
        );
    }
    Ok(())
}

/// The most an SSE line may hold back (the issue asks for a cap; 64 KiB is what the rate
/// limiter uses for its meter, this allows four times that).
const HELD_MAX: usize = 256 * 1024;

fn sse_options() -> NormalizeOptions {
    NormalizeOptions::new()
}

proptest! {
    #![proptest_config(config())]

    /// A stream without an error event comes out byte for byte as it went in, whatever the
    /// chunk boundaries and line ends, each line handed on once it is complete.
    #[test]
    fn sse_without_errors_is_byte_identical(
        events in prop::collection::vec(normal_event(), 0..8),
        ending in ending(),
        picks in prop::collection::vec(any::<u8>(), 1..16),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..12),
        empty in any::<bool>(),
    ) {
        let events: Vec<(bool, Vec<String>)> = events.into_iter().map(|e| (false, e)).collect();
        let lines = layout(&events, ending, &picks);
        let Expected {
            input,
            out: want,
            marks,
            rewritten,
        } = expected(&lines);
        prop_assert_eq!(rewritten, 0);
        prop_assert_eq!(&input, &want);
        let run = run(sse_options(), "text/event-stream", chunks(&input, &cuts, empty));
        check_stream(&run, &want, &marks, input.len())?;
    }

    /// In-band error events are rewritten to the envelope form, everything else stays, with
    /// any chunk boundaries and line ends.
    #[test]
    fn sse_error_events_are_rewritten(
        before in prop::collection::vec(normal_event(), 0..4),
        errors in prop::collection::vec(error_event(), 1..3),
        after in prop::collection::vec(normal_event(), 0..3),
        ending in ending(),
        picks in prop::collection::vec(any::<u8>(), 1..16),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..12),
        content_type in prop::sample::select(vec!["text/event-stream", "text/event-stream; charset=utf-8", "TEXT/EVENT-STREAM"]),
    ) {
        let events: Vec<(bool, Vec<String>)> = before
            .iter()
            .map(|e| (false, e.clone()))
            .chain(errors.iter().map(|e| (true, e.clone())))
            .chain(after.iter().map(|e| (false, e.clone())))
            .collect();
        let lines = layout(&events, ending, &picks);
        let Expected {
            input,
            out: want,
            marks,
            rewritten,
        } = expected(&lines);
        prop_assert_eq!(rewritten, errors.len(), "every error event is one rewritten line");
        let run = run(sse_options(), content_type, chunks(&input, &cuts, false));
        check_stream(&run, &want, &marks, input.len())?;
    }

    /// A `200` JSON answer that is no error comes out byte for byte with `inspect_ok_json`
    /// on, whatever the read limit and the chunk boundaries (a Responses API object carries
    /// `"error":null` near its start).
    #[test]
    fn ok_json_without_error_is_byte_identical(
        text in content(),
        pad in 0usize..600,
        limit in 1usize..700,
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
        shape in 0u8..3,
    ) {
        let filler = "x".repeat(pad);
        let body = match shape {
            0 => format!(r#"{{"error":null,"id":"resp_1","object":"response","output_text":{},"pad":"{filler}"}}"#, json(&text)),
            1 => format!(r#"{{"id":"resp_1","object":"response","status":"completed","error":null,"output_text":{},"pad":"{filler}"}}"#, json(&text)),
            _ => format!(r#"{{"id":"chatcmpl-1","choices":[{{"message":{{"content":{}}}}}],"pad":"{filler}"}}"#, json(&text)),
        };
        let options = NormalizeOptions::new().inspect_ok_json(true).body_limit(limit);
        let run = run(options, "application/json", chunks(body.as_bytes(), &cuts, false));
        prop_assert!(run.envelope.is_none(), "{:?}", run.envelope);
        prop_assert_eq!(run.status, 200);
        prop_assert!(
            run.out == body.as_bytes(),
            "output differs (limit {})\n  got:  {:?}\n  want: {:?}",
            limit,
            String::from_utf8_lossy(&run.out),
            body
        );
    }

    /// Any other `200` body (no SSE, no inspection) is handed on byte for byte.
    #[test]
    fn other_bodies_pass_through(
        body in prop::collection::vec(any::<u8>(), 0..512),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
        content_type in prop::sample::select(vec!["application/json", "text/plain", "application/octet-stream"]),
    ) {
        let run = run(NormalizeOptions::new(), content_type, chunks(&body, &cuts, true));
        prop_assert_eq!(run.status, 200);
        prop_assert_eq!(run.out, body);
    }
}

proptest! {
    // Each case moves a quarter of a MiB through the normalizer: a tenth of the cases.
    #![proptest_config(config_tenth())]

    /// A line longer than any sane event (over 256 KiB, no line end yet) is not held back
    /// whole: the normalizer keeps a bounded buffer and hands the bytes on, and the stream
    /// still comes out byte for byte.
    #[test]
    fn sse_long_lines_are_not_held(
        unit in "[a-zA-Z0-9 ]{1,16}",
        extra in 1usize..(64 * 1024),
        parts in 2usize..8,
        ending in prop::sample::select(vec!["", "\n", "\r\n", "\n\n"]),
    ) {
        let len = HELD_MAX + extra;
        let mut line = String::with_capacity(len + unit.len() + 16);
        line.push_str("data: ");
        line.push_str(&unit.repeat(len / unit.len() + 1));
        line.push_str(ending);
        let input = line.into_bytes();
        let size = input.len().div_ceil(parts);
        let pieces: Vec<Bytes> = input.chunks(size).map(Bytes::copy_from_slice).collect();
        let run = run(sse_options(), "text/event-stream", pieces);
        prop_assert!(run.out == input, "output differs");
        for &(in_len, out_len) in &run.progress {
            prop_assert!(
                in_len - out_len <= HELD_MAX,
                "{} bytes held back after {} bytes in",
                in_len - out_len,
                in_len
            );
        }
    }
}
