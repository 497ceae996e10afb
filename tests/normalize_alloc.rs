//! The normalizer allocates nothing on the success path, and an event stream cannot make it
//! hold more than its line limit: a counting allocator watches the calls.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::convert::Infallible;

use bytes::Bytes;
use futures_util::FutureExt;
use http::{Request, Response};
use http_body_util::BodyExt;
use http_body_util::Full;
use llm_layers::normalize::{NormalizeErrorsLayer, NormalizeOptions};
use tower::{Layer, Service, ServiceExt};

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
    // Bytes allocated minus bytes freed on this thread while counting, and the highest value.
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn grow(by: isize) {
    let _ = LIVE.try_with(|l| {
        l.set(l.get() + by);
        let _ = PEAK.try_with(|p| p.set(p.get().max(l.get())));
    });
}

struct Counting;

// SAFETY: every call is forwarded unchanged to the system allocator; the wrapper only counts
// allocations made on the current thread while counting is switched on. `try_with` keeps it
// sound during thread teardown. Counting allocations needs a global allocator, and that trait
// is unsafe to implement; the crate itself forbids unsafe code.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.try_with(Cell::get).unwrap_or(false) {
            let _ = ALLOCATIONS.try_with(|a| a.set(a.get() + 1));
            grow(layout.size() as isize);
        }
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if COUNTING.try_with(Cell::get).unwrap_or(false) {
            grow(-(layout.size() as isize));
        }
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTING.try_with(Cell::get).unwrap_or(false) {
            let _ = ALLOCATIONS.try_with(|a| a.set(a.get() + 1));
            grow(new_size as isize - layout.size() as isize);
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn count<T>(f: impl FnOnce() -> T) -> (T, usize) {
    ALLOCATIONS.with(|a| a.set(0));
    LIVE.with(|l| l.set(0));
    PEAK.with(|p| p.set(0));
    COUNTING.with(|c| c.set(true));
    let out = f();
    COUNTING.with(|c| c.set(false));
    (out, ALLOCATIONS.with(Cell::get))
}

#[test]
fn the_success_path_allocates_nothing_beyond_the_inner_service() {
    // The counter sees allocations: a control.
    let (boxed, n) = count(|| Box::new([0u8; 32]));
    drop(boxed);
    assert_eq!(n, 1);

    let inner = tower::service_fn(|_req: Request<Full<Bytes>>| {
        std::future::ready(Ok::<_, Infallible>(Response::new(Full::new(
            Bytes::from_static(b"{}"),
        ))))
    });
    let mut bare = inner;
    let mut layered = NormalizeErrorsLayer::new().layer(inner);
    let run = |svc: &mut dyn FnMut() -> usize| {
        // Warm up once (lazy statics, thread locals), then measure.
        svc();
        svc()
    };
    let mut bare_call = || {
        let req = Request::new(Full::default());
        let (res, n) = count(|| {
            let svc = bare.ready().now_or_never().unwrap().unwrap();
            svc.call(req).now_or_never().unwrap().unwrap()
        });
        drop(res);
        n
    };
    let bare_allocs = run(&mut bare_call);
    let mut layered_call = || {
        let req = Request::new(Full::default());
        let (res, n) = count(|| {
            let svc = layered.ready().now_or_never().unwrap().unwrap();
            svc.call(req).now_or_never().unwrap().unwrap()
        });
        drop(res);
        n
    };
    let layered_allocs = run(&mut layered_call);
    assert_eq!(
        layered_allocs,
        bare_allocs,
        "the normalizer added {} allocations per successful call",
        layered_allocs as isize - bare_allocs as isize
    );
}

/// The highest number of bytes live at once during the last [`count`].
fn peak() -> isize {
    PEAK.with(Cell::get)
}

type Frames = http_body_util::StreamBody<
    futures_util::stream::Iter<std::vec::IntoIter<Result<http_body::Frame<Bytes>, Infallible>>>,
>;

/// A normalized `200` event stream of `chunks`, driven to its end without a runtime. `sink`
/// sees each data frame handed on (it must not allocate). Returns the allocations made while
/// the frames were polled and the most bytes live at once.
fn drive_sse(
    chunks: Vec<Bytes>,
    options: NormalizeOptions,
    mut sink: impl FnMut(&[u8]),
) -> (usize, isize) {
    let inner = tower::service_fn(move |_req: Request<Full<Bytes>>| {
        let frames: Vec<_> = chunks
            .iter()
            .map(|c| Ok(http_body::Frame::data(c.clone())))
            .collect();
        let body: Frames = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
        std::future::ready(Ok::<_, Infallible>(
            Response::builder()
                .header("content-type", "text/event-stream")
                .body(body)
                .unwrap(),
        ))
    });
    let mut svc = NormalizeErrorsLayer::with_options(options).layer(inner);
    let svc = svc.ready().now_or_never().unwrap().unwrap();
    let mut body = svc
        .call(Request::new(Full::default()))
        .now_or_never()
        .unwrap()
        .unwrap()
        .into_body();
    let ((), allocations) = count(|| {
        while let Some(frame) = body.frame().now_or_never().unwrap() {
            let frame = frame.unwrap();
            sink(frame.data_ref().unwrap());
        }
    });
    (allocations, peak())
}

#[test]
fn whole_sse_lines_pass_without_allocating_whatever_their_line_ending() {
    for ending in ["\n", "\r\n", "\r"] {
        let chunks: Vec<Bytes> = (0..50)
            .map(|i| {
                let data = format!(
                    "data: {{\"id\":\"c{i}\",\"choices\":[{{\"delta\":{{\"content\":\"x\"}}}}]}}{ending}{ending}"
                );
                Bytes::from(data)
            })
            .collect();
        let sent = chunks.concat();
        let mut out = Vec::with_capacity(2 * sent.len());
        let (allocations, _) = drive_sse(chunks, NormalizeOptions::new(), |d| {
            out.extend_from_slice(d)
        });
        assert_eq!(out, sent, "{ending:?}");
        assert_eq!(allocations, 0, "{ending:?}: frames allocated");
    }
}

#[test]
fn a_64_mib_event_stream_without_a_newline_holds_at_most_the_line_limit() {
    // Small chunks, so that the start of the line is held up to the limit before it passes.
    static CHUNK: [u8; 1000] = [b'x'; 1000];
    let mut chunks = vec![Bytes::from_static(b"data: ")];
    chunks.extend((0..64 * 1024 * 1024 / 1000).map(|_| Bytes::from_static(&CHUNK)));
    let total: usize = chunks.iter().map(Bytes::len).sum();
    for limit in [None, Some(4 * 1024)] {
        let options = match limit {
            None => NormalizeOptions::new(),
            Some(n) => NormalizeOptions::new().sse_line_limit(n),
        };
        let line_limit = limit.unwrap_or(llm_layers::normalize::DEFAULT_SSE_LINE_LIMIT);
        // Checked as it goes by: a copy of the output would be the 64 MiB measured.
        let mut seen = 0usize;
        let mut same = true;
        let (_, peak_live) = drive_sse(chunks.clone(), options, |d| {
            for (i, &b) in d.iter().enumerate() {
                let want = b"data: ".get(seen + i).copied().unwrap_or(b'x');
                same &= b == want;
            }
            seen += d.len();
        });
        assert_eq!(seen, total);
        assert!(same, "the bytes changed");
        println!("{peak_live} bytes held at most with a {line_limit}-byte line limit");
        // The held start of the line, with the allocator's rounding up: never the stream.
        assert!(
            peak_live <= 2 * line_limit as isize + 4096,
            "held {peak_live} bytes with a {line_limit}-byte line limit"
        );
    }
}
