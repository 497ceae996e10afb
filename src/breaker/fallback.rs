//! The fallback chain's targets and the typed services of other upstreams.
//!
//! A [`Target`] is one entry of the chain: a model on the guarded upstream
//! ([`Target::model`], a `Target<SameUpstream>`) or another upstream's service
//! ([`Target::upstream`], a `Target<OtherUpstream<S>>`), optionally with the model rewritten.
//! The services of other upstreams are kept on the layer, typed: every one is an `S`, the
//! layer is a `CircuitBreakerLayer<ServiceFallback<S>>`, and it is a service only when `S`
//! takes the guarded service's requests and answers its responses and errors. A target of
//! another service type does not compile ([`AddTarget`] has no such impl).

use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;
use std::task::{Context, Poll};

use tower_service::Service;

/// No fallback service: the type a [`CircuitBreakerLayer`](super::CircuitBreakerLayer) has
/// until [`fallback_service`](super::CircuitBreakerLayerBuilder::fallback_service) or an
/// upstream [`Target`] sets one.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoFallback;

/// The services of other upstreams, as
/// [`fallback_service`](super::CircuitBreakerLayerBuilder::fallback_service) and
/// [`fallback_target`](super::CircuitBreakerLayerBuilder::fallback_target) keep them: the
/// layer is a `CircuitBreakerLayer<ServiceFallback<S>>`. Cloning it clones an `Arc`.
#[derive(Debug)]
pub struct ServiceFallback<S>(pub(crate) Arc<[S]>);

impl<S> Clone for ServiceFallback<S> {
    fn clone(&self) -> Self {
        ServiceFallback(self.0.clone())
    }
}

impl<S> ServiceFallback<S> {
    /// The first fallback service.
    pub fn get_ref(&self) -> &S {
        &self.0[0]
    }

    /// Every fallback service, in the order of the chain.
    pub fn services(&self) -> &[S] {
        &self.0
    }
}

/// The service type of [`NoFallback`]: never called, as a layer without fallback services has
/// no step that would call one.
pub struct NoService<Res, E>(PhantomData<fn() -> (Res, E)>);

impl<Res, E> Clone for NoService<Res, E> {
    fn clone(&self) -> Self {
        NoService(PhantomData)
    }
}

impl<Res, E> std::fmt::Debug for NoService<Res, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NoService")
    }
}

impl<Req, Res, E> Service<Req> for NoService<Res, E> {
    type Response = Res;
    type Error = E;
    type Future = std::future::Pending<Result<Res, E>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), E>> {
        Poll::Pending
    }

    fn call(&mut self, _req: Req) -> Self::Future {
        std::future::pending()
    }
}

/// What the breaker needs of its fallback services: implemented for [`NoFallback`] and for
/// [`ServiceFallback<S>`] when `S: Service<Req, Response = Res, Error = E>`, so a fallback
/// service must take the guarded service's requests and answer its responses and errors.
/// Not meant to be implemented by hand.
pub trait Fallback<Req, Res, E> {
    /// The type of one fallback service.
    type Service: Service<Req, Response = Res, Error = E, Future = Self::Future>;
    /// Its call's future.
    type Future: Future<Output = Result<Res, E>>;

    /// A clone of the fallback service at `index` (in the order of the chain), if any.
    fn service(&self, index: usize) -> Option<Self::Service>;
}

impl<Req, Res, E> Fallback<Req, Res, E> for NoFallback {
    type Service = NoService<Res, E>;
    type Future = std::future::Pending<Result<Res, E>>;

    fn service(&self, _index: usize) -> Option<Self::Service> {
        None
    }
}

impl<S, Req, Res, E> Fallback<Req, Res, E> for ServiceFallback<S>
where
    S: Service<Req, Response = Res, Error = E> + Clone,
{
    type Service = S;
    type Future = S::Future;

    fn service(&self, index: usize) -> Option<S> {
        self.0.get(index).cloned()
    }
}

/// The upstream of a [`Target::model`]: the guarded service itself.
#[derive(Debug, Clone, Copy, Default)]
pub struct SameUpstream;

/// The upstream of a [`Target::upstream`]: another service, of type `S`.
#[derive(Debug, Clone)]
pub struct OtherUpstream<S>(pub(crate) S);

/// The upstream of a [`Target::named_upstream`]: a name, bound to a service later by
/// [`CircuitBreakerLayer::bind_upstreams`](super::CircuitBreakerLayer::bind_upstreams) (how
/// the TOML stack names upstreams the application defines).
#[derive(Debug, Clone, Copy, Default)]
pub struct NamedUpstream;

/// One entry of the fallback chain (see
/// [`fallback_target`](super::CircuitBreakerLayerBuilder::fallback_target)).
///
/// Its name is what `x-llm-layers-fallback` and the envelopes show, and the key of its own
/// circuit: the model for [`Target::model`] (behind the upstream with
/// [`CircuitKey::UpstreamAndModel`](super::CircuitKey::UpstreamAndModel), so it is the same
/// circuit as that model's own), the upstream's name for [`Target::upstream`], `name/model`
/// when the model is rewritten there too. [`Target::name`] sets another.
///
/// ```
/// use llm_layers::breaker::Target;
///
/// let small = Target::model("gpt-4o-mini");
/// assert_eq!(&*small.target_name(), "gpt-4o-mini");
/// let azure = Target::upstream("azure", ()).with_model("gpt-4o").larger_context();
/// assert_eq!(&*azure.target_name(), "azure/gpt-4o");
/// ```
#[derive(Debug, Clone)]
pub struct Target<U = SameUpstream> {
    pub(crate) name: Option<Arc<str>>,
    pub(crate) upstream: Option<Arc<str>>,
    pub(crate) model: Option<Arc<str>>,
    pub(crate) larger_context: bool,
    pub(crate) on_content_policy: bool,
    pub(crate) via: U,
}

impl Target<SameUpstream> {
    /// The guarded upstream with the JSON body's `model` rewritten to `model`.
    pub fn model(model: impl Into<Arc<str>>) -> Self {
        Target {
            name: None,
            upstream: None,
            model: Some(model.into()),
            larger_context: false,
            on_content_policy: false,
            via: SameUpstream,
        }
    }
}

impl<S> Target<OtherUpstream<S>> {
    /// Another upstream: the request goes to `service` (its body unchanged unless
    /// [`Target::with_model`](Target::with_model) rewrites the model). `name` names it in
    /// the header, envelopes and events; never put a URL with credentials there.
    pub fn upstream(name: impl Into<Arc<str>>, service: S) -> Self {
        Target {
            name: None,
            upstream: Some(name.into()),
            model: None,
            larger_context: false,
            on_content_policy: false,
            via: OtherUpstream(service),
        }
    }

    /// Rewrites the body's `model` to `model` on this upstream.
    pub fn with_model(mut self, model: impl Into<Arc<str>>) -> Self {
        self.model = Some(model.into());
        self
    }
}

impl Target<NamedUpstream> {
    /// Another upstream known by `name` only: its service is given later, by
    /// [`CircuitBreakerLayer::bind_upstreams`](super::CircuitBreakerLayer::bind_upstreams).
    /// Until then (on a layer never bound) the target is skipped.
    pub fn named_upstream(name: impl Into<Arc<str>>) -> Self {
        Target {
            name: None,
            upstream: Some(name.into()),
            model: None,
            larger_context: false,
            on_content_policy: false,
            via: NamedUpstream,
        }
    }

    /// Rewrites the body's `model` to `model` on this upstream.
    pub fn with_model(mut self, model: impl Into<Arc<str>>) -> Self {
        self.model = Some(model.into());
        self
    }
}

impl<U> Target<U> {
    /// Marks the target as a model with a larger context window: a request the one before
    /// refused with `context_length_exceeded` goes to such targets only.
    pub fn larger_context(mut self) -> Self {
        self.larger_context = true;
        self
    }

    /// Marks the target as the alternative for content-policy refusals: a request the one
    /// before refused with `content_policy_violation` goes to such targets only.
    pub fn on_content_policy(mut self) -> Self {
        self.on_content_policy = true;
        self
    }

    /// Names the target (the header value, the key of its circuit) instead of its
    /// model or upstream.
    pub fn name(mut self, name: impl Into<Arc<str>>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// The target's name: [`Target::name`], else `upstream/model`, the upstream or the model.
    pub fn target_name(&self) -> Arc<str> {
        if let Some(n) = &self.name {
            return n.clone();
        }
        match (&self.upstream, &self.model) {
            (Some(u), Some(m)) => Arc::from(format!("{u}/{m}")),
            (Some(u), None) => u.clone(),
            (None, Some(m)) => m.clone(),
            (None, None) => Arc::from(""),
        }
    }
}

/// Adding a target's upstream to the layer's fallback services: implemented for the pairs
/// that keep every service of one type, so a target of another type does not compile. Not
/// meant to be implemented by hand.
///
/// ```compile_fail,E0277
/// use std::convert::Infallible;
/// use bytes::Bytes;
/// use http::{Request, Response};
/// use http_body_util::Full;
/// use llm_layers::body::LayerBody;
/// use llm_layers::breaker::{CircuitBreakerLayer, Target};
///
/// let a = tower::service_fn(|_: Request<LayerBody<Full<Bytes>>>| async {
///     Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
/// });
/// let b = tower::service_fn(|_: Request<LayerBody<Full<Bytes>>>| async {
///     Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
/// });
/// // Two closures are two types: the second target does not fit the first's services.
/// let _ = CircuitBreakerLayer::builder()
///     .fallback_target(Target::upstream("a", a))
///     .fallback_target(Target::upstream("b", b));
/// ```
pub trait AddTarget<U> {
    /// The fallback services once the target's is added.
    type Out;
    /// Adds the target's upstream service, if it has one: the new services and the index of
    /// the added one.
    fn add(self, via: U) -> (Self::Out, Option<usize>);
}

impl AddTarget<SameUpstream> for NoFallback {
    type Out = NoFallback;
    fn add(self, _via: SameUpstream) -> (NoFallback, Option<usize>) {
        (self, None)
    }
}

impl AddTarget<NamedUpstream> for NoFallback {
    type Out = NoFallback;
    fn add(self, _via: NamedUpstream) -> (NoFallback, Option<usize>) {
        (self, None)
    }
}

impl<S> AddTarget<SameUpstream> for ServiceFallback<S> {
    type Out = ServiceFallback<S>;
    fn add(self, _via: SameUpstream) -> (ServiceFallback<S>, Option<usize>) {
        (self, None)
    }
}

impl<S> AddTarget<OtherUpstream<S>> for NoFallback {
    type Out = ServiceFallback<S>;
    fn add(self, via: OtherUpstream<S>) -> (ServiceFallback<S>, Option<usize>) {
        (ServiceFallback(Arc::from(vec![via.0])), Some(0))
    }
}

impl<S: Clone> AddTarget<OtherUpstream<S>> for ServiceFallback<S> {
    type Out = ServiceFallback<S>;
    fn add(self, via: OtherUpstream<S>) -> (ServiceFallback<S>, Option<usize>) {
        let mut all = self.0.to_vec();
        let index = all.len();
        all.push(via.0);
        (ServiceFallback(Arc::from(all)), Some(index))
    }
}
