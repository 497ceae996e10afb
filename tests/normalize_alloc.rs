//! The normalizer allocates nothing on the success path: a counting allocator watches one call.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::convert::Infallible;

use bytes::Bytes;
use futures_util::FutureExt;
use http::{Request, Response};
use http_body_util::Full;
use llm_layers::normalize::NormalizeErrorsLayer;
use tower::{Layer, Service, ServiceExt};

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
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
        }
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn count<T>(f: impl FnOnce() -> T) -> (T, usize) {
    ALLOCATIONS.with(|a| a.set(0));
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
