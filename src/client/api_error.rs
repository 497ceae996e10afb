//! Every failure of a reqwest-middleware client as an [`ApiError`].

use http::{Extensions, StatusCode};
use reqwest_middleware::{Middleware, Next};

use super::adapter::sent_credential;
use super::redirect::{api_error_in, followed, origin_hash};
use crate::classify::{classify_response, classify_transport_error, code_for_status};
use crate::error::{ApiError, ErrorCode};
use crate::normalize::DEFAULT_ERROR_BODY_LIMIT;

/// Turns every error answer (`4xx`, `5xx`) and every transport error into
/// `Err(reqwest_middleware::Error::Middleware(..))` holding an [`ApiError`], so callers match
/// on [`ErrorCode`] instead of statuses and body formats. Success answers (and `1xx`/`3xx`)
/// are handed on untouched; a stream stays a stream.
///
/// - An error answer that already carries an [`ApiError`] in its extensions (a normalizer,
///   breaker or rate limiter run through [`TowerMiddleware`](super::TowerMiddleware) further in
///   the chain put it there) gives that error as it is.
/// - Any other error answer is read up to [`body_limit`](Self::body_limit) (1 MiB by
///   default; the classifier works on what was read) and classified with
///   [`classify_response`]: provider JSON formats, HTML block pages (`upstream_blocked`),
///   empty bodies.
/// - A transport error becomes [`classify_transport_error`]'s `service_unavailable`
///   (connection refused or reset) or `timeout`; the `reqwest::Error` stays reachable as the
///   error's source. A request reqwest could not build (an invalid URL) is `invalid_value`.
///   An error that already holds an `ApiError` is handed on unchanged.
///
/// Read the `ApiError` back with [`ApiErrorExt::api_error`]. Put this middleware first
/// (outermost) in the chain: retry and breaker middleware after it see the answers, not the
/// errors.
///
/// # Example
///
/// ```
/// use llm_layers::client::{ApiErrorExt, ApiErrorMiddleware};
/// use llm_layers::ErrorCode;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// // An upstream that is out of quota.
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
/// let base = format!("http://{}", listener.local_addr()?);
/// let upstream = axum::Router::new().fallback(|| async {
///     let body = r#"{"error":{"message":"You exceeded your current quota.","type":"insufficient_quota","code":"insufficient_quota"}}"#;
///     (http::StatusCode::TOO_MANY_REQUESTS, body)
/// });
/// tokio::spawn(async move { axum::serve(listener, upstream).await });
///
/// let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
///     .with(ApiErrorMiddleware::new())
///     .build();
/// let err = client
///     .post(format!("{base}/v1/chat/completions"))
///     .body(r#"{"model":"gpt-4o-mini","messages":[]}"#)
///     .send()
///     .await
///     .unwrap_err();
/// let api = err.api_error().expect("an ApiError");
/// assert_eq!(api.code().status(), 429);
/// assert_eq!(api.upstream_status(), Some(http::StatusCode::TOO_MANY_REQUESTS));
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiErrorMiddleware {
    body_limit: usize,
}

impl Default for ApiErrorMiddleware {
    fn default() -> Self {
        Self::new()
    }
}

impl ApiErrorMiddleware {
    /// Reads error bodies up to 1 MiB.
    pub const fn new() -> Self {
        ApiErrorMiddleware {
            body_limit: DEFAULT_ERROR_BODY_LIMIT,
        }
    }

    /// How much of an error body is read before classifying (the rest is dropped).
    pub const fn body_limit(mut self, bytes: usize) -> Self {
        self.body_limit = bytes;
        self
    }

    /// The [`ApiError`] for an error answer.
    async fn classify(&self, mut res: reqwest::Response) -> ApiError {
        if let Some(err) = res.extensions().get::<ApiError>() {
            return err.clone();
        }
        let status = res.status();
        let mut buf = Vec::new();
        while buf.len() < self.body_limit {
            match res.chunk().await {
                Ok(Some(chunk)) => {
                    let room = self.body_limit - buf.len();
                    buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
                }
                // A body that breaks off is classified on what arrived.
                Ok(None) | Err(_) => break,
            }
        }
        let err = classify_response(status, res.headers(), &buf).unwrap_or_else(|| {
            ApiError::new(
                code_for_status(status),
                format!("upstream answered with status {}", status.as_u16()),
            )
            .with_upstream_status(status)
        });
        tracing::debug!(code = %err.code(), upstream_status = status.as_u16(), "upstream error answer");
        err
    }
}

#[async_trait::async_trait]
impl Middleware for ApiErrorMiddleware {
    async fn handle(
        &self,
        req: reqwest::Request,
        extensions: &mut Extensions,
        next: Next<'_>,
    ) -> reqwest_middleware::Result<reqwest::Response> {
        // A credential header that reqwest keeps on a cross-host redirect, and where it went.
        let sent = sent_credential(req.headers()).map(|header| (header, origin_hash(req.url())));
        match next.run(req, extensions).await {
            Ok(res) if sent.is_some_and(|(_, origin)| origin_hash(res.url()) != origin) => {
                let header = sent.map_or("", |(header, _)| header);
                tracing::error!(
                    origin = ?res.url().origin().ascii_serialization(),
                    header,
                    "the HTTP client followed a redirect to another origin with an API key"
                );
                Err(reqwest_middleware::Error::middleware(followed(
                    res.url(),
                    header,
                )))
            }
            Ok(res) if is_error(res.status()) => Err(reqwest_middleware::Error::middleware(
                self.classify(res).await,
            )),
            Ok(res) => Ok(res),
            Err(err) if err.api_error().is_some() => Err(err),
            Err(err) => {
                let api = transport_api_error(&err);
                tracing::debug!(code = %api.code(), "transport error");
                Err(with_api_error(err, api))
            }
        }
    }
}

fn is_error(status: StatusCode) -> bool {
    status.is_client_error() || status.is_server_error()
}

/// The [`ApiError`] for an error that holds none.
fn transport_api_error(err: &reqwest_middleware::Error) -> ApiError {
    match err {
        reqwest_middleware::Error::Reqwest(e) if e.is_builder() => ApiError::new(
            ErrorCode::InvalidValue,
            "The request could not be built (an invalid URL or header).",
        ),
        _ => classify_transport_error(err),
    }
}

/// `err` with `api` as its outermost context, so it downcasts to the `ApiError` and keeps
/// `err` as its source.
fn with_api_error(err: reqwest_middleware::Error, api: ApiError) -> reqwest_middleware::Error {
    let any = match err {
        reqwest_middleware::Error::Middleware(any) => any,
        reqwest_middleware::Error::Reqwest(e) => match reqwest_middleware::Error::middleware(e) {
            reqwest_middleware::Error::Middleware(any) => any,
            other => return other,
        },
    };
    reqwest_middleware::Error::Middleware(any.context(api))
}

/// Reads the [`ApiError`] out of a `reqwest_middleware::Error`.
///
/// ```
/// use llm_layers::client::ApiErrorExt;
/// use llm_layers::{ApiError, ErrorCode};
///
/// let err = reqwest_middleware::Error::middleware(ApiError::new(ErrorCode::Timeout, "slow"));
/// assert_eq!(err.api_error().map(ApiError::code), Some(ErrorCode::Timeout));
/// assert_eq!(err.into_api_error().code(), ErrorCode::Timeout);
/// ```
pub trait ApiErrorExt {
    /// The [`ApiError`] the error holds, if any (as put there by [`ApiErrorMiddleware`] or any
    /// middleware that returns `reqwest_middleware::Error::middleware(api_error)`).
    fn api_error(&self) -> Option<&ApiError>;

    /// The [`ApiError`] the error holds, else the classification of the error as a transport
    /// error (`service_unavailable`, `timeout`; `invalid_value` for a request reqwest could not
    /// build).
    fn into_api_error(self) -> ApiError;
}

impl ApiErrorExt for reqwest_middleware::Error {
    fn api_error(&self) -> Option<&ApiError> {
        match self {
            reqwest_middleware::Error::Middleware(any) => any.downcast_ref::<ApiError>(),
            // A redirect refused by `redirect_policy` holds its `ApiError` as the source.
            reqwest_middleware::Error::Reqwest(e) => api_error_in(e),
        }
    }

    fn into_api_error(self) -> ApiError {
        match self.api_error() {
            Some(api) => api.clone(),
            None => transport_api_error(&self),
        }
    }
}
