//! `NormalizeErrorsLayer` on a `200` body of any bytes cut at any boundaries.
//!
//! Input: a byte seeding the chunk boundaries, a byte choosing the content type (SSE or
//! JSON with `inspect_ok_json`), then the body. The output must not depend on the boundaries,
//! and a body without the word `error` must come out byte for byte (an empty one excepted
//! when inspected: an empty `200` is classified as an error by design).
#![no_main]

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame};
use libfuzzer_sys::fuzz_target;
use llm_layers::normalize::{NormalizeErrorsLayer, NormalizeOptions};
use tower::{Layer, ServiceExt};

struct Chunks(VecDeque<Bytes>);

impl Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.pop_front().map(|c| Ok(Frame::data(c))))
    }
}

fn run(options: NormalizeOptions, content_type: &str, chunks: Vec<Bytes>) -> Vec<u8> {
    let res = Response::builder()
        .status(200)
        .header("content-type", content_type)
        .body(Chunks(chunks.into()))
        .unwrap();
    let mut res = Some(res);
    let svc = NormalizeErrorsLayer::with_options(options).layer(tower::service_fn(
        move |_req: Request<()>| {
            let r = res.take().unwrap();
            async move { Ok::<_, Infallible>(r) }
        },
    ));
    let mut cx = Context::from_waker(Waker::noop());
    let mut fut = std::pin::pin!(svc.oneshot(Request::new(())));
    let Poll::Ready(Ok(res)) = fut.as_mut().poll(&mut cx) else {
        panic!("an in-memory answer is ready at once");
    };
    let mut body = std::pin::pin!(res.into_body());
    let mut out = Vec::new();
    loop {
        match body.as_mut().poll_frame(&mut cx) {
            Poll::Ready(Some(Ok(f))) => {
                if let Ok(d) = f.into_data() {
                    out.extend_from_slice(&d);
                }
            }
            Poll::Ready(Some(Err(e))) => match e {},
            Poll::Ready(None) => return out,
            Poll::Pending => panic!("an in-memory body never waits"),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let [seed, kind, body @ ..] = data else {
        return;
    };
    let (options, content_type) = match kind % 3 {
        0 => (NormalizeOptions::new(), "text/event-stream"),
        1 => (
            NormalizeOptions::new()
                .inspect_ok_json(true)
                .body_limit(usize::from(*kind) + 1),
            "application/json",
        ),
        _ => (NormalizeOptions::new(), "application/json"),
    };
    let mut chunks = Vec::new();
    let mut state = u32::from(*seed) | 1;
    let mut start = 0;
    while start < body.len() {
        state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        let len = 1 + (state >> 16) as usize % 17;
        let end = (start + len).min(body.len());
        chunks.push(Bytes::copy_from_slice(&body[start..end]));
        start = end;
    }
    let cut = run(options, content_type, chunks);
    let whole = run(options, content_type, vec![Bytes::copy_from_slice(body)]);
    assert_eq!(cut, whole, "the output depends on the chunk boundaries");
    let inspected_empty = kind % 3 == 1 && body.trim_ascii().is_empty();
    if !body.windows(5).any(|w| w == b"error") && !inspected_empty {
        assert_eq!(cut, body, "a body without an error changed");
    }
});
