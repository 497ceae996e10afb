//! `ApiKeyAuth` and the inner service's readiness: the key lookup and the body read for an
//! allow-list happen before the inner service is polled ready, so a slow lookup or a slow
//! uploader holds no slot of a concurrency limit below; an inner `poll_ready` error is the
//! call's error, final.

mod common_auth;

use std::convert::Infallible;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use common_auth::{store, ACTIVE, MINI, ROTATE_OLD, UNKNOWN};
use futures_util::{poll, Stream};
use http::{Request, Response};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full, StreamBody};
use llm_layers::auth::{ApiKeyAuthLayer, InMemoryKeyStore, KeyHash, KeyStore, LookupResult};
use llm_layers::body::LayerBody;
use tokio::sync::{mpsc, Semaphore};
use tower::limit::ConcurrencyLimitLayer;
use tower::{service_fn, Layer, Service, ServiceBuilder, ServiceExt};

type Sender = mpsc::UnboundedSender<Bytes>;

/// A request body fed by a channel: still uploading until the sender is dropped.
fn upload() -> (
    Sender,
    StreamBody<impl Stream<Item = Result<Frame<Bytes>, Infallible>> + Send + Unpin>,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<Bytes>();
    let frames = futures_util::stream::poll_fn(move |cx| {
        rx.poll_recv(cx)
            .map(|chunk| chunk.map(|b| Ok(Frame::data(b))))
    });
    (tx, StreamBody::new(frames))
}

fn request<B>(key: &str, body: B) -> Request<B> {
    Request::post("/v1/chat/completions")
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .body(body)
        .unwrap()
}

/// The upstream: reads the whole body and answers with it.
async fn read_all<B>(req: Request<B>) -> Result<Response<String>, Infallible>
where
    B: Body,
    B::Error: std::fmt::Debug,
{
    let body = req.into_body().collect().await.unwrap().to_bytes();
    Ok(Response::new(String::from_utf8(body.to_vec()).unwrap()))
}

async fn read<B>(body: B) -> String
where
    B: Body,
    B::Error: std::fmt::Debug,
{
    let bytes = body.collect().await.unwrap().to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}

async fn text<B>(res: Response<B>) -> String
where
    B: Body,
    B::Error: std::fmt::Debug,
{
    read(res.into_body()).await
}

#[tokio::test(start_paused = true)]
async fn a_restricted_key_whose_body_is_still_uploading_holds_no_slot() {
    let svc = ServiceBuilder::new()
        .layer(ApiKeyAuthLayer::new(store()))
        .layer(ConcurrencyLimitLayer::new(1))
        .service(service_fn(read_all));

    // MINI is allowed only some models, so its body is read for the model before the call.
    let (tx, body) = upload();
    tx.send(Bytes::from_static(br#"{"model":"gpt-4o-mini","#))
        .unwrap();
    let mut slow = std::pin::pin!(svc.clone().oneshot(request(MINI, body)));
    assert!(
        poll!(slow.as_mut()).is_pending(),
        "the body is not complete"
    );

    // Meanwhile a second request (a restricted key too, its body complete) gets the slot.
    let (done, body) = upload();
    done.send(Bytes::from_static(br#"{"model":"gpt-4o-mini"}"#))
        .unwrap();
    drop(done);
    let res = tokio::time::timeout(
        Duration::from_secs(60),
        svc.clone().oneshot(request(MINI, body)),
    )
    .await
    .expect("the second request is not held behind the upload")
    .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(text(res).await, r#"{"model":"gpt-4o-mini"}"#);
    assert!(poll!(slow.as_mut()).is_pending(), "still uploading");

    // The upload ends: the first request goes on, its body intact.
    tx.send(Bytes::from_static(br#""messages":[]}"#)).unwrap();
    drop(tx);
    let res = slow.await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(text(res).await, r#"{"model":"gpt-4o-mini","messages":[]}"#);
}

/// The shared keys behind a lookup that waits for `gate` when the key is [`ACTIVE`], as a slow
/// database would.
#[derive(Clone)]
struct GatedStore {
    keys: InMemoryKeyStore,
    gate: Arc<Semaphore>,
}

impl KeyStore for GatedStore {
    type Future = Pin<Box<dyn Future<Output = LookupResult> + Send>>;

    fn lookup(&self, hash: &KeyHash) -> Self::Future {
        let keys = self.keys.clone();
        let gate = Arc::clone(&self.gate);
        let hash = *hash;
        Box::pin(async move {
            if hash == KeyHash::of(ACTIVE.as_bytes()) {
                let _permit = gate.acquire().await.unwrap();
            }
            Ok(keys.get(&hash).cloned())
        })
    }
}

#[tokio::test(start_paused = true)]
async fn a_key_lookup_in_flight_holds_no_slot() {
    let gate = Arc::new(Semaphore::new(0));
    let svc = ServiceBuilder::new()
        .layer(ApiKeyAuthLayer::new(GatedStore {
            keys: store(),
            gate: Arc::clone(&gate),
        }))
        .layer(ConcurrencyLimitLayer::new(1))
        .service(service_fn(read_all));
    let body = || Full::new(Bytes::from_static(br#"{"model":"gpt-4o"}"#));

    let mut slow = std::pin::pin!(svc.clone().oneshot(request(ACTIVE, body())));
    assert!(poll!(slow.as_mut()).is_pending(), "the lookup waits");

    let res = tokio::time::timeout(
        Duration::from_secs(60),
        svc.clone().oneshot(request(ROTATE_OLD, body())),
    )
    .await
    .expect("the second request is not held behind the lookup")
    .unwrap();
    assert_eq!(res.status(), 200);
    assert!(poll!(slow.as_mut()).is_pending(), "still looking up");

    gate.add_permits(1);
    let res = slow.await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(text(res).await, r#"{"model":"gpt-4o"}"#);
}

/// An inner service that is never ready: its `poll_ready` fails. Counts how often it is polled
/// and called.
#[derive(Clone, Default)]
struct NeverReady {
    polls: Arc<AtomicUsize>,
    calls: Arc<AtomicUsize>,
}

impl<B> Service<Request<B>> for NeverReady {
    type Response = Response<String>;
    type Error = &'static str;
    type Future = std::future::Ready<Result<Response<String>, &'static str>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), &'static str>> {
        self.polls.fetch_add(1, Ordering::SeqCst);
        Poll::Ready(Err("the upstream pool is closed"))
    }

    fn call(&mut self, _req: Request<B>) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        std::future::ready(Ok(Response::new(String::new())))
    }
}

#[tokio::test]
async fn an_inner_readiness_error_is_the_calls_error_and_final() {
    let inner = NeverReady::default();
    let mut svc = ApiKeyAuthLayer::new(store()).layer(inner.clone());
    let full = |s: &'static str| Full::new(Bytes::from_static(s.as_bytes()));

    // The layer itself is ready: the inner service is polled only once the key is checked.
    ServiceExt::<Request<Full<Bytes>>>::ready(&mut svc)
        .await
        .expect("the layer is always ready");
    assert_eq!(inner.polls.load(Ordering::SeqCst), 0);

    // A rejection never touches the inner service.
    let res = svc
        .call(request(UNKNOWN, full(r#"{"model":"gpt-4o"}"#)))
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    assert_eq!(inner.polls.load(Ordering::SeqCst), 0);

    // An accepted key: the inner `poll_ready` error comes back unchanged, polled once.
    ServiceExt::<Request<Full<Bytes>>>::ready(&mut svc)
        .await
        .unwrap();
    let err = svc
        .call(request(ACTIVE, full(r#"{"model":"gpt-4o"}"#)))
        .await
        .unwrap_err();
    assert_eq!(err, "the upstream pool is closed");
    assert_eq!(inner.polls.load(Ordering::SeqCst), 1);

    // A restricted key, after its body is read: the same.
    ServiceExt::<Request<Full<Bytes>>>::ready(&mut svc)
        .await
        .unwrap();
    let err = svc
        .call(request(MINI, full(r#"{"model":"gpt-4o-mini"}"#)))
        .await
        .unwrap_err();
    assert_eq!(err, "the upstream pool is closed");
    assert_eq!(inner.polls.load(Ordering::SeqCst), 2);
    assert_eq!(
        inner.calls.load(Ordering::SeqCst),
        0,
        "a failed service is never called"
    );
}

/// A request body that is neither `Send` nor `'static`: it borrows its bytes and holds an `Rc`.
struct LocalBody<'a> {
    data: Option<&'a [u8]>,
    _not_send: PhantomData<Rc<()>>,
}

impl<'a> LocalBody<'a> {
    fn new(data: &'a [u8]) -> Self {
        LocalBody {
            data: Some(data),
            _not_send: PhantomData,
        }
    }
}

impl Body for LocalBody<'_> {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(
            self.data
                .take()
                .map(|d| Ok(Frame::data(Bytes::copy_from_slice(d)))),
        )
    }
}

/// The upstream: answers whether the body is the one the client sent (not bytes the layer
/// produced), and the body.
async fn unread_and_body<B>(req: Request<LayerBody<B>>) -> Result<Response<String>, Infallible>
where
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    let unread = !req.body().is_produced();
    let body = read(req.into_body()).await;
    Ok(Response::new(format!("{unread} {body}")))
}

#[tokio::test]
async fn any_body_is_accepted_and_an_unrestricted_keys_body_is_handed_on_unread() {
    let sent = String::from(r#"{"model":"gpt-4o-mini"}"#);
    let svc = ApiKeyAuthLayer::new(store()).layer(service_fn(unread_and_body));
    let res = svc
        .clone()
        .oneshot(request(ACTIVE, LocalBody::new(sent.as_bytes())))
        .await
        .unwrap();
    assert_eq!(
        text(res).await,
        r#"true {"model":"gpt-4o-mini"}"#,
        "the inner body, untouched"
    );
    let res = svc
        .oneshot(request(MINI, LocalBody::new(sent.as_bytes())))
        .await
        .unwrap();
    assert_eq!(
        text(res).await,
        r#"false {"model":"gpt-4o-mini"}"#,
        "bytes the layer read for the model"
    );
}

/// An inner service that counts its clones and answers when `gate` lets it.
#[derive(Default)]
struct Counted {
    clones: Arc<AtomicUsize>,
    gate: Option<Arc<Semaphore>>,
}

impl Clone for Counted {
    fn clone(&self) -> Self {
        self.clones.fetch_add(1, Ordering::SeqCst);
        Counted {
            clones: Arc::clone(&self.clones),
            gate: self.gate.clone(),
        }
    }
}

impl<B> Service<Request<B>> for Counted {
    type Response = Response<String>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<String>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _req: Request<B>) -> Self::Future {
        let gate = self.gate.clone();
        Box::pin(async move {
            if let Some(gate) = gate {
                gate.acquire().await.unwrap().forget();
            }
            Ok(Response::new("upstream".to_owned()))
        })
    }
}

#[tokio::test]
async fn a_key_decided_within_call_reaches_a_ready_inner_service_without_a_clone() {
    let inner = Counted::default();
    let clones = Arc::clone(&inner.clones);
    let mut svc = ApiKeyAuthLayer::new(store()).layer(inner);
    let full = || Full::new(Bytes::from_static(br#"{"model":"gpt-4o"}"#));
    for _ in 0..3 {
        let res = ServiceExt::<Request<Full<Bytes>>>::ready(&mut svc)
            .await
            .unwrap()
            .call(request(ACTIVE, full()))
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(text(res).await, "upstream");
    }
    assert_eq!(clones.load(Ordering::SeqCst), 0, "no clone per request");

    // A key restricted to some models reads the body first: that takes a clone.
    let res = svc
        .call(request(
            MINI,
            Full::new(Bytes::from_static(br#"{"model":"gpt-4o-mini"}"#)),
        ))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(clones.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn an_inner_service_not_ready_within_call_is_driven_by_the_response_future() {
    // A concurrency limit of one below the layer: the first request holds the slot until the
    // gate opens, so the second finds the inner service not ready when it is called.
    let gate = Arc::new(Semaphore::new(0));
    let inner = Counted {
        clones: Arc::default(),
        gate: Some(Arc::clone(&gate)),
    };
    let mut svc = ApiKeyAuthLayer::new(store()).layer(ConcurrencyLimitLayer::new(1).layer(inner));
    let full = || Full::new(Bytes::from_static(br#"{"model":"gpt-4o"}"#));

    // Boxed, to be dropped once answered: the limit's permit goes with its future.
    let mut first = Box::pin(svc.call(request(ACTIVE, full())));
    assert!(poll!(first.as_mut()).is_pending(), "the upstream waits");
    let mut second = Box::pin(svc.call(request(ROTATE_OLD, full())));
    assert!(
        poll!(second.as_mut()).is_pending(),
        "the slot is taken by the first request"
    );
    // A rejection is answered at once, whatever the inner service's readiness.
    let res = svc.call(request(UNKNOWN, full())).await.unwrap();
    assert_eq!(res.status(), 401);

    gate.add_permits(2);
    let res = first.as_mut().await.unwrap();
    assert_eq!(res.status(), 200);
    drop(first);
    // The second request was woken by the freed slot: its future drives the inner service.
    let res = tokio::time::timeout(Duration::from_secs(5), second.as_mut())
        .await
        .expect("the second request is woken when the slot frees")
        .unwrap();
    assert_eq!(res.status(), 200);
    drop(second);

    // The service left in the layer holds no slot: a third request goes through.
    gate.add_permits(1);
    let res = tokio::time::timeout(Duration::from_secs(5), svc.call(request(ACTIVE, full())))
        .await
        .expect("no slot is held by the layer itself")
        .unwrap();
    assert_eq!(res.status(), 200);
}
