//! Rules of your own, run beside the built-in checks.

use bytes::Bytes;

use crate::error::ApiError;
use crate::request::RequestHead;

/// A check of your own on a validated request, added with
/// [`ValidateBuilder::rule`](super::ValidateBuilder::rule) and run after the built-in checks,
/// in the order added.
///
/// It sees the request head — method, URI, headers, and the extensions with the
/// [`RequestView`](crate::request::RequestView) ([`RequestHead::view`]) — and the body
/// bytes, read once by the layer (a cheap handle on the buffer the request is handed on with).
/// `Err` answers the request with that error's envelope, and the inner service never sees it.
///
/// Rules run on the requests the layer validates: `POST` to an LLM endpoint whose body passed
/// the built-in checks. A closure `Fn(&RequestHead<'_>, &Bytes) -> Result<(), ApiError>` is a
/// rule (annotate its argument types).
///
/// ```
/// use bytes::Bytes;
/// use llm_layers::request::RequestHead;
/// use llm_layers::validate::{ValidateRequestLayer, ValidationRule};
/// use llm_layers::{ApiError, ErrorCode};
///
/// /// No streaming for clients of the batch tier.
/// struct NoStreamingForBatch;
///
/// impl ValidationRule for NoStreamingForBatch {
///     fn check(&self, head: &RequestHead<'_>, _body: &Bytes) -> Result<(), ApiError> {
///         let batch = head.headers().get("x-tier").is_some_and(|v| v == "batch");
///         if batch && head.view().is_some_and(|v| v.stream()) {
///             return Err(ApiError::new(ErrorCode::InvalidValue, "The batch tier does not stream.")
///                 .with_param("stream"));
///         }
///         Ok(())
///     }
/// }
///
/// let layer = ValidateRequestLayer::builder()
///     .rule(NoStreamingForBatch)
///     .rule(|_head: &RequestHead<'_>, body: &Bytes| {
///         if body.windows(6).any(|w| w == b"secret") {
///             return Err(ApiError::new(ErrorCode::InvalidValue, "Requests must not name secrets."));
///         }
///         Ok(())
///     })
///     .build()
///     .unwrap();
/// # drop(layer);
/// ```
pub trait ValidationRule: Send + Sync + 'static {
    /// `Ok` when the request may go on, else the error it is answered with.
    fn check(&self, head: &RequestHead<'_>, body: &Bytes) -> Result<(), ApiError>;
}

impl<F> ValidationRule for F
where
    F: Fn(&RequestHead<'_>, &Bytes) -> Result<(), ApiError> + Send + Sync + 'static,
{
    fn check(&self, head: &RequestHead<'_>, body: &Bytes) -> Result<(), ApiError> {
        self(head, body)
    }
}
