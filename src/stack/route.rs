//! A route's edge stack as one layer: auth, validation and rate limit, each present or not.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tower_layer::{Layer, Stack};
use tower_service::Service;

use crate::auth::{ApiKeyAuthLayer, InMemoryKeyStore};
use crate::body::BoxError;
use crate::ext::Route;
use crate::rate_limit::RateLimitLayer;
use crate::validate::ValidateRequestLayer;

/// A layer that is there or not, decided at run time: with `Some(layer)` its service is the
/// layer's, with `None` the inner service itself. Both answer with one response type
/// ([`ToggleBody`]), so the choice needs no boxing.
#[derive(Debug, Clone)]
pub struct Toggle<L>(pub Option<L>);

impl<L, S> Layer<S> for Toggle<L>
where
    L: Layer<S>,
{
    type Service = ToggleService<L::Service, S>;

    fn layer(&self, inner: S) -> Self::Service {
        match &self.0 {
            Some(layer) => ToggleService::On(layer.layer(inner)),
            None => ToggleService::Off(inner),
        }
    }
}

/// The service of a [`Toggle`]: the layer's service, or the inner service alone.
#[derive(Debug, Clone)]
pub enum ToggleService<A, S> {
    /// The layer is there.
    On(A),
    /// The layer is not: the inner service.
    Off(S),
}

impl<A, S, ReqBody, BA, BS, E> Service<Request<ReqBody>> for ToggleService<A, S>
where
    A: Service<Request<ReqBody>, Response = Response<BA>, Error = E>,
    S: Service<Request<ReqBody>, Response = Response<BS>, Error = E>,
{
    type Response = Response<ToggleBody<BA, BS>>;
    type Error = E;
    type Future = ToggleFuture<A::Future, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), E>> {
        match self {
            ToggleService::On(a) => a.poll_ready(cx),
            ToggleService::Off(s) => s.poll_ready(cx),
        }
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        match self {
            ToggleService::On(a) => ToggleFuture::on(a.call(req)),
            ToggleService::Off(s) => ToggleFuture::off(s.call(req)),
        }
    }
}

pin_project! {
    /// The response future of a [`ToggleService`].
    pub struct ToggleFuture<FA, FS> {
        #[pin]
        inner: Branch<FA, FS>,
    }
}

pin_project! {
    #[project = BranchProj]
    enum Branch<FA, FS> {
        On { #[pin] fut: FA },
        Off { #[pin] fut: FS },
    }
}

impl<FA, FS> ToggleFuture<FA, FS> {
    fn on(fut: FA) -> Self {
        ToggleFuture {
            inner: Branch::On { fut },
        }
    }

    fn off(fut: FS) -> Self {
        ToggleFuture {
            inner: Branch::Off { fut },
        }
    }
}

impl<FA, FS, BA, BS, E> Future for ToggleFuture<FA, FS>
where
    FA: Future<Output = Result<Response<BA>, E>>,
    FS: Future<Output = Result<Response<BS>, E>>,
{
    type Output = Result<Response<ToggleBody<BA, BS>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().inner.project() {
            BranchProj::On { fut } => fut.poll(cx).map_ok(|res| res.map(ToggleBody::layer)),
            BranchProj::Off { fut } => fut.poll(cx).map_ok(|res| res.map(ToggleBody::inner)),
        }
    }
}

pin_project! {
    /// The response body of a [`ToggleService`]: the layer's body, or the inner service's.
    /// Its errors are boxed.
    pub struct ToggleBody<A, B> {
        #[pin]
        inner: BodyBranch<A, B>,
    }
}

pin_project! {
    #[project = BodyBranchProj]
    enum BodyBranch<A, B> {
        Layer { #[pin] body: A },
        Inner { #[pin] body: B },
    }
}

impl<A, B> ToggleBody<A, B> {
    /// A body of the layer's service.
    pub fn layer(body: A) -> Self {
        ToggleBody {
            inner: BodyBranch::Layer { body },
        }
    }

    /// A body of the inner service.
    pub fn inner(body: B) -> Self {
        ToggleBody {
            inner: BodyBranch::Inner { body },
        }
    }
}

/// Bytes a layer produced (an envelope), as a body of the inner kind.
impl<A, B: From<Bytes>> From<Bytes> for ToggleBody<A, B> {
    fn from(bytes: Bytes) -> Self {
        ToggleBody::inner(B::from(bytes))
    }
}

impl<A, B> Body for ToggleBody<A, B>
where
    A: Body,
    B: Body<Data = A::Data>,
    A::Error: Into<BoxError>,
    B::Error: Into<BoxError>,
{
    type Data = A::Data;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        match self.project().inner.project() {
            BodyBranchProj::Layer { body } => body
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(Into::into))),
            BodyBranchProj::Inner { body } => body
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(Into::into))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            BodyBranch::Layer { body } => body.is_end_stream(),
            BodyBranch::Inner { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            BodyBranch::Layer { body } => body.size_hint(),
            BodyBranch::Inner { body } => body.size_hint(),
        }
    }
}

/// The layers of [`RouteLayer`], outermost last (tower's [`Stack`] order): rate limit
/// innermost, then validation, then auth outermost.
pub type EdgeLayers<A> =
    Stack<Toggle<RateLimitLayer>, Stack<Toggle<ValidateRequestLayer>, Toggle<A>>>;

/// One route's whole edge stack as a single layer, from
/// [`Stack::route_layer`](super::Stack::route_layer): auth (outermost), validation, rate
/// limit, each as the route's `[routes."/path"]` entry says (on, off, or with its own
/// settings).
///
/// One `.layer(..)` call on an axum `MethodRouter` (`post(handler).layer(route_layer)`), so
/// there is no chain of `.layer(a).layer(b)` for the compiler to infer (E0283). Cloning it is
/// cheap and shares the layers' state (buckets, key store).
///
/// Its service leaves the route's template in the request extensions
/// ([`Route`](crate::ext::Route)), before auth, for the `route` label of the layers' metrics
/// (with the `metrics` feature; without it nothing is inserted).
#[derive(Debug, Clone)]
pub struct RouteLayer<A = ApiKeyAuthLayer<InMemoryKeyStore>> {
    pub(super) route: Route,
    pub(super) auth: Option<A>,
    pub(super) validate: Option<ValidateRequestLayer>,
    pub(super) rate_limit: Option<RateLimitLayer>,
}

impl<A> RouteLayer<A> {
    /// The same route stack with another auth layer (for instance the stack's auth settings
    /// over a reloadable store, [`ApiKeyAuthLayer::with_store`]); a route without auth stays
    /// without.
    pub fn with_auth<B>(self, auth: B) -> RouteLayer<B> {
        RouteLayer {
            route: self.route,
            auth: self.auth.map(|_| auth),
            validate: self.validate,
            rate_limit: self.rate_limit,
        }
    }

    /// The route's template, as its requests carry it ([`Route`]).
    pub fn route(&self) -> &Route {
        &self.route
    }

    /// Whether the route is authenticated.
    pub fn has_auth(&self) -> bool {
        self.auth.is_some()
    }

    /// Whether the route's requests are validated.
    pub fn has_validate(&self) -> bool {
        self.validate.is_some()
    }

    /// Whether the route is rate limited.
    pub fn has_rate_limit(&self) -> bool {
        self.rate_limit.is_some()
    }
}

impl<A: Clone> RouteLayer<A> {
    /// The same layers as a tower [`Stack`] of [`Toggle`]s.
    pub fn layers(&self) -> EdgeLayers<A> {
        Stack::new(
            Toggle(self.rate_limit.clone()),
            Stack::new(Toggle(self.validate.clone()), Toggle(self.auth.clone())),
        )
    }
}

impl<A, S> Layer<S> for RouteLayer<A>
where
    A: Clone,
    EdgeLayers<A>: Layer<S>,
{
    type Service = SetRoute<<EdgeLayers<A> as Layer<S>>::Service>;

    fn layer(&self, inner: S) -> Self::Service {
        SetRoute {
            route: self.route.clone(),
            inner: self.layers().layer(inner),
        }
    }
}

/// The service of a [`RouteLayer`]: its edge layers, with the route's [`Route`] put in each
/// request's extensions first (with the `metrics` feature; without it the request is handed
/// on untouched).
#[derive(Debug, Clone)]
pub struct SetRoute<S> {
    route: Route,
    inner: S,
}

impl<S> SetRoute<S> {
    /// The route this service marks its requests with.
    pub fn route(&self) -> &Route {
        &self.route
    }
}

impl<S, ReqBody> Service<Request<ReqBody>> for SetRoute<S>
where
    S: Service<Request<ReqBody>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> S::Future {
        #[cfg(feature = "metrics")]
        let req = {
            let mut req = req;
            req.extensions_mut().insert(self.route.clone());
            req
        };
        self.inner.call(req)
    }
}
