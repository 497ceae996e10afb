//! Running a tower layer inside a reqwest-middleware chain.

use std::fmt;
use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::Extensions;
use reqwest::ResponseBuilderExt;
use reqwest_middleware::{Middleware, Next};
use tokio::sync::{mpsc, oneshot};
use tower_layer::Layer;
use tower_service::Service;

use super::redirect::{api_error_in, followed, origin_hash, API_KEY, X_API_KEY};
use super::BoxError;

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;
type Reply = Result<http::Response<reqwest::Body>, reqwest_middleware::Error>;

/// One request the wrapped service hands to the rest of the chain.
struct Call {
    req: reqwest::Request,
    reply: oneshot::Sender<Reply>,
}

/// Marks a response that went through the rest of the chain and so carries its own URL.
#[derive(Clone, Copy)]
struct HasUrl;

/// Runs a tower [`Layer`] of this crate (or any tower layer) as a reqwest-middleware
/// [`Middleware`].
///
/// For each request, the layer wraps a [`NextService`] that hands requests on to the rest of
/// the middleware chain (and finally to the `reqwest::Client`). The request reaches the layer
/// as an `http::Request<reqwest::Body>`; the layer's response is handed back as a
/// `reqwest::Response`, with its extensions (an [`ApiError`](crate::ApiError) put there by
/// the normalizer, [`Attempts`](crate::ext::Attempts) from the retry layer).
///
/// # The layer and its state
///
/// `layer.layer(..)` is called once per request. The layers of this crate keep their shared
/// state (buckets, circuits, retry budget) behind one `Arc` created when the layer is built, so
/// every request sees the same state. A layer that creates its state in `layer()` (tower's
/// `ConcurrencyLimitLayer` or `RateLimitLayer`) gets fresh state per request and limits nothing
/// here; use a layer whose state is shared (`GlobalConcurrencyLimitLayer`).
///
/// Calls the wrapped service makes to the rest of the chain run one at a time, in the order
/// they were made (a retry layer makes them one after the other anyway), while the layer's own
/// timers keep running: a per-attempt timeout or a deadline cuts an attempt that hangs. An
/// attempt the layer gives up on is dropped, which cancels it.
///
/// # Extensions
///
/// The layer sees the request's own extensions and, under them, a copy of the chain's
/// extensions (what callers set with `reqwest_middleware::RequestBuilder::with_extension`,
/// such as a [`KeyIdentity`](crate::ext::KeyIdentity) for the rate limiter to key on). The
/// layer's response extensions come back on the `reqwest::Response`.
///
/// # Bodies
///
/// A request body built from bytes (`.body(String)`, `.json(..)`) is handed to the layer as
/// such and can be replayed by a retry layer. A streamed response body stays a stream: the
/// layer's body is wrapped with [`reqwest::Body::wrap`] (or handed on as is when the layer did
/// not change its type).
///
/// # Errors
///
/// An `Err` of the wrapped service becomes the middleware's error: a
/// `reqwest_middleware::Error` from the rest of the chain is handed on unchanged, any other
/// error (an [`ApiError`](crate::ApiError) included) as `reqwest_middleware::Error::Middleware`.
/// A request whose URL or body cannot be converted is answered with the `reqwest::Error` of
/// the conversion.
///
/// # Redirects
///
/// Two answers of the rest of the chain reach the layer as an envelope response holding an
/// `upstream_blocked` [`ApiError`](crate::ApiError) (`502`, not retryable, so a retry layer
/// stops): a redirect to another origin refused by [`redirect_policy`](super::redirect_policy),
/// and an answer from another origin than the one an `x-api-key` or `api-key` header was sent
/// to, which means the `reqwest::Client` followed a redirect without that policy and the key
/// has left (logged at `error` level). See [the module docs](super#redirects-and-the-api-key).
///
/// # Example
///
/// ```
/// use llm_layers::auth::{ApiKey, InjectApiKeyLayer};
/// use llm_layers::client::TowerMiddleware;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let auth = InjectApiKeyLayer::bearer(ApiKey::new("sk-upstream-0123456789")?);
/// let http = reqwest::Client::builder()
///     .redirect(llm_layers::client::redirect_policy())
///     .build()?;
/// let client = reqwest_middleware::ClientBuilder::new(http)
///     .with(TowerMiddleware::new(auth))
///     .build();
/// # let _ = client;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct TowerMiddleware<L> {
    layer: L,
}

impl<L> TowerMiddleware<L> {
    /// Runs `layer` in a reqwest-middleware chain.
    pub const fn new(layer: L) -> Self {
        TowerMiddleware { layer }
    }

    /// The layer.
    pub fn get_ref(&self) -> &L {
        &self.layer
    }

    /// The layer, mutably.
    pub fn get_mut(&mut self) -> &mut L {
        &mut self.layer
    }

    /// Unwraps the layer.
    pub fn into_inner(self) -> L {
        self.layer
    }
}

impl<L: fmt::Debug> fmt::Debug for TowerMiddleware<L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TowerMiddleware")
            .field("layer", &self.layer)
            .finish()
    }
}

/// The innermost service of a [`TowerMiddleware`]: hands each request on to the rest of the
/// reqwest-middleware chain.
///
/// It is `Clone`, `Send` and `'static`, as tower layers expect of their inner service. Its
/// requests are `http::Request<reqwest::Body>` (any `B: Into<reqwest::Body>` is accepted), its
/// responses `http::Response<reqwest::Body>` (the streamed body of the answer), its error the
/// chain's `reqwest_middleware::Error`. It is only made by [`TowerMiddleware`].
#[derive(Clone)]
pub struct NextService {
    tx: mpsc::UnboundedSender<Call>,
}

impl fmt::Debug for NextService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NextService").finish_non_exhaustive()
    }
}

/// A request body a layer handed on (the `reqwest::Body` it was given, or bytes it produced),
/// as the next middleware takes it.
impl<B: Into<reqwest::Body>> From<crate::body::LayerBody<B>> for reqwest::Body {
    fn from(body: crate::body::LayerBody<B>) -> Self {
        match body {
            crate::body::LayerBody::Inner { body } => body.into(),
            crate::body::LayerBody::Full { data } => reqwest::Body::from(data.unwrap_or_default()),
        }
    }
}

impl<B: Into<reqwest::Body>> Service<http::Request<B>> for NextService {
    type Response = http::Response<reqwest::Body>;
    type Error = reqwest_middleware::Error;
    type Future = NextFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> NextFuture {
        let req = match reqwest::Request::try_from(req) {
            Ok(req) => req,
            Err(e) => return NextFuture::failed(e.into()),
        };
        let (reply, rx) = oneshot::channel();
        match self.tx.send(Call { req, reply }) {
            Ok(()) => NextFuture {
                state: Some(Ok(rx)),
            },
            Err(_) => NextFuture::failed(reqwest_middleware::Error::middleware(ChainEnded)),
        }
    }
}

/// The response future of [`NextService`].
pub struct NextFuture {
    state: Option<Result<oneshot::Receiver<Reply>, reqwest_middleware::Error>>,
}

impl NextFuture {
    fn failed(err: reqwest_middleware::Error) -> Self {
        NextFuture {
            state: Some(Err(err)),
        }
    }
}

impl fmt::Debug for NextFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NextFuture").finish_non_exhaustive()
    }
}

impl Future for NextFuture {
    type Output = Reply;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Reply> {
        match self.state.as_mut() {
            Some(Ok(rx)) => {
                let out = match std::task::ready!(Pin::new(rx).poll(cx)) {
                    Ok(reply) => reply,
                    Err(_) => Err(reqwest_middleware::Error::middleware(ChainEnded)),
                };
                self.state = None;
                Poll::Ready(out)
            }
            Some(Err(_)) => match self.state.take() {
                Some(Err(e)) => Poll::Ready(Err(e)),
                _ => unreachable!("checked above"),
            },
            None => panic!("NextFuture polled after completion"),
        }
    }
}

/// The request reached a `NextService` after the middleware call it belongs to had ended.
#[derive(Debug)]
struct ChainEnded;

impl fmt::Display for ChainEnded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the middleware call this request belonged to has already ended")
    }
}

impl std::error::Error for ChainEnded {}

#[async_trait::async_trait]
impl<L, S, ResB> Middleware for TowerMiddleware<L>
where
    L: Layer<NextService, Service = S> + Send + Sync + 'static,
    S: Service<http::Request<reqwest::Body>, Response = http::Response<ResB>> + Send,
    S::Future: Send,
    S::Error: Into<BoxError>,
    ResB: http_body::Body + Send + Sync + 'static,
    ResB::Data: Into<Bytes>,
    ResB::Error: Into<BoxError>,
{
    async fn handle(
        &self,
        req: reqwest::Request,
        extensions: &mut Extensions,
        next: Next<'_>,
    ) -> reqwest_middleware::Result<reqwest::Response> {
        let mut req = http::Request::<reqwest::Body>::try_from(req)?;
        if !extensions.is_empty() {
            // What callers set with `RequestBuilder::with_extension` (a `KeyIdentity` for the
            // rate limiter, say) is visible to the layer; the request's own values win.
            let own = std::mem::replace(req.extensions_mut(), extensions.clone());
            req.extensions_mut().extend(own);
        }
        let uri = req.uri().clone();
        let (tx, rx) = mpsc::unbounded_channel();
        let mut svc = self.layer.layer(NextService { tx });
        let call = async move {
            poll_fn(|cx| svc.poll_ready(cx)).await?;
            svc.call(req).await
        };
        match drive(call, rx, extensions, next).await {
            Ok(res) => Ok(into_reqwest(res, &uri)),
            Err(e) => Err(into_chain_error(e.into())),
        }
    }
}

/// Polls the layer's future and, next to it, the calls it makes to the rest of the chain,
/// one at a time (they share `extensions`).
async fn drive<'a, F>(
    call: F,
    mut rx: mpsc::UnboundedReceiver<Call>,
    extensions: &'a mut Extensions,
    next: Next<'a>,
) -> F::Output
where
    F: Future,
{
    let mut call = pin!(call);
    let mut idle: Option<&'a mut Extensions> = Some(extensions);
    let mut inflight: Option<BoxFuture<'a, &'a mut Extensions>> = None;
    poll_fn(move |cx| loop {
        if let Poll::Ready(out) = call.as_mut().poll(cx) {
            return Poll::Ready(out);
        }
        if let Some(fut) = inflight.as_mut() {
            match fut.as_mut().poll(cx) {
                Poll::Ready(ext) => {
                    idle = Some(ext);
                    inflight = None;
                    // The reply may have made the layer's future ready.
                    continue;
                }
                Poll::Pending => return Poll::Pending,
            }
        }
        match rx.poll_recv(cx) {
            Poll::Ready(Some(job)) => {
                let ext = idle
                    .take()
                    .expect("extensions are idle when no call is in flight");
                inflight = Some(forward(next.clone(), job, ext));
            }
            Poll::Ready(None) | Poll::Pending => return Poll::Pending,
        }
    })
    .await
}

/// Runs one call through the rest of the chain and hands the extensions back when it is done.
/// The call is dropped (cancelled) as soon as the layer stops waiting for its answer.
fn forward<'a>(
    next: Next<'a>,
    job: Call,
    extensions: &'a mut Extensions,
) -> BoxFuture<'a, &'a mut Extensions> {
    Box::pin(async move {
        let Call { req, mut reply } = job;
        // A credential header that reqwest keeps on a cross-host redirect, and where it went.
        let sent = sent_credential(req.headers()).map(|header| (header, origin_hash(req.url())));
        let outcome = {
            let mut run = next.run(req, &mut *extensions);
            poll_fn(|cx| {
                if let Poll::Ready(res) = run.as_mut().poll(cx) {
                    return Poll::Ready(Some(res));
                }
                if reply.poll_closed(cx).is_ready() {
                    return Poll::Ready(None);
                }
                Poll::Pending
            })
            .await
        };
        if let Some(res) = outcome {
            let _ = reply.send(checked(res, sent));
        }
        extensions
    })
}

/// The name of a credential header in `headers` that reqwest does not remove on a cross-host
/// redirect (it removes `Authorization` only).
pub(crate) fn sent_credential(headers: &http::HeaderMap) -> Option<&'static str> {
    if headers.contains_key(X_API_KEY) {
        Some("x-api-key")
    } else if headers.contains_key(API_KEY) {
        Some("api-key")
    } else {
        None
    }
}

/// The chain's answer for the layer: a redirect refused by [`redirect_policy`](super::redirect_policy)
/// becomes its envelope, and so does an answer from another origin than the one a credential
/// was sent to (the client followed a redirect without that policy).
fn checked(
    res: reqwest_middleware::Result<reqwest::Response>,
    sent: Option<(&'static str, u64)>,
) -> Reply {
    match res {
        Ok(res) => match sent {
            Some((header, origin)) if origin_hash(res.url()) != origin => {
                let err = followed(res.url(), header);
                tracing::error!(
                    origin = ?res.url().origin().ascii_serialization(),
                    header,
                    "the HTTP client followed a redirect to another origin with an API key"
                );
                Ok(err.to_response())
            }
            _ => Ok(into_http(res)),
        },
        Err(reqwest_middleware::Error::Reqwest(e)) => match api_error_in(&e) {
            Some(api) => Ok(api.to_response()),
            None => Err(reqwest_middleware::Error::Reqwest(e)),
        },
        Err(e) => Err(e),
    }
}

/// `reqwest::Response` to `http::Response`, keeping the response's URL for the way back.
fn into_http(res: reqwest::Response) -> http::Response<reqwest::Body> {
    let url = res.url().clone();
    let mut res = http::Response::from(res);
    add_url(res.extensions_mut(), url);
    res.extensions_mut().insert(HasUrl);
    res
}

/// Stores `url` where `reqwest::Response::from` looks for it.
fn add_url(extensions: &mut Extensions, url: reqwest::Url) {
    if let Ok(carrier) = http::Response::builder().url(url).body(()) {
        extensions.extend(carrier.into_parts().0.extensions);
    }
}

/// The layer's response as a `reqwest::Response`. A response the layer made itself (an
/// envelope) gets the request's URL.
fn into_reqwest<B>(res: http::Response<B>, uri: &http::Uri) -> reqwest::Response
where
    B: http_body::Body + Send + Sync + 'static,
    B::Data: Into<Bytes>,
    B::Error: Into<BoxError>,
{
    let (mut parts, body) = res.into_parts();
    if parts.extensions.remove::<HasUrl>().is_none() {
        if let Ok(url) = reqwest::Url::parse(&uri.to_string()) {
            add_url(&mut parts.extensions, url);
        }
    }
    reqwest::Response::from(http::Response::from_parts(parts, into_body(body)))
}

/// The body as a `reqwest::Body`, without wrapping one that already is.
fn into_body<B>(body: B) -> reqwest::Body
where
    B: http_body::Body + Send + Sync + 'static,
    B::Data: Into<Bytes>,
    B::Error: Into<BoxError>,
{
    let mut slot = Some(body);
    if let Some(same) =
        (&mut slot as &mut dyn std::any::Any).downcast_mut::<Option<reqwest::Body>>()
    {
        if let Some(body) = same.take() {
            return body;
        }
    }
    match slot {
        Some(body) => reqwest::Body::wrap(body),
        None => reqwest::Body::from(Bytes::new()),
    }
}

/// The layer's error as the chain's error.
fn into_chain_error(err: BoxError) -> reqwest_middleware::Error {
    match err.downcast::<reqwest_middleware::Error>() {
        Ok(err) => *err,
        Err(err) => match err.downcast::<reqwest::Error>() {
            Ok(err) => reqwest_middleware::Error::Reqwest(*err),
            Err(err) => match err.downcast::<crate::ApiError>() {
                Ok(err) => reqwest_middleware::Error::middleware(*err),
                Err(err) => reqwest_middleware::Error::middleware(LayerError(err)),
            },
        },
    }
}

/// Another error of the wrapped service: its message, with the error itself as the source.
#[derive(Debug)]
struct LayerError(BoxError);

impl fmt::Display for LayerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl std::error::Error for LayerError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}
