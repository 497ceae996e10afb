//! Redirects and the API key: a reqwest redirect policy that never takes a key to another
//! origin, and the check that catches a client built without it.

use std::hash::{Hash, Hasher};

use http::{HeaderName, StatusCode};
use reqwest::redirect::{Attempt, Policy};
use reqwest::Url;

use crate::error::{ApiError, ErrorCode};

/// Anthropic's key header, which reqwest keeps on a cross-host redirect.
pub(crate) const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
/// Azure OpenAI's key header, which reqwest keeps on a cross-host redirect.
pub(crate) const API_KEY: HeaderName = HeaderName::from_static("api-key");

/// How many redirects [`redirect_policy`] follows in one chain.
pub const MAX_REDIRECTS: usize = 10;

/// A reqwest redirect policy for clients that send an API key: it follows up to
/// [`MAX_REDIRECTS`] redirects that stay on the origin (scheme, host and port) of the request,
/// and refuses one to any other origin, so the key is never sent there.
///
/// reqwest follows redirects inside the `Client`, below every middleware, and removes only
/// `Authorization` (and cookies) on a cross-host redirect: an `x-api-key` (Anthropic) or
/// `api-key` (Azure OpenAI) header set by [`InjectApiKeyLayer`](crate::auth::InjectApiKeyLayer)
/// or by the caller goes on to the new host, and after a `307`/`308` the request body (the
/// prompt) goes with it. No middleware can change that, so the client itself must be built
/// with this policy:
///
/// ```
/// let http = reqwest::Client::builder()
///     .redirect(llm_layers::client::redirect_policy())
///     .build()?;
/// # Ok::<(), reqwest::Error>(())
/// ```
///
/// A refused redirect fails the request with an error holding an [`ApiError`]
/// `upstream_blocked` (`502`, not retryable) that names the other origin (never the path or
/// query, which may hold secrets). [`ApiErrorExt::api_error`](super::ApiErrorExt::api_error)
/// reads it; a layer run through [`TowerMiddleware`](super::TowerMiddleware) sees it as the
/// envelope response, so a retry layer does not try again. A client built without this
/// policy is caught after the fact: see [`TowerMiddleware`](super::TowerMiddleware).
pub fn redirect_policy() -> Policy {
    Policy::custom(|attempt: Attempt<'_>| {
        let Some(first) = attempt.previous().first() else {
            return attempt.follow();
        };
        if !same_origin(first, attempt.url()) {
            let err = refused(attempt.url());
            return attempt.error(err);
        }
        if attempt.previous().len() > MAX_REDIRECTS {
            return attempt.error("too many redirects");
        }
        attempt.follow()
    })
}

/// Whether two URLs share scheme, host and port.
fn same_origin(a: &Url, b: &Url) -> bool {
    a.scheme() == b.scheme()
        && a.host_str() == b.host_str()
        && a.port_or_known_default() == b.port_or_known_default()
}

/// A fingerprint of a URL's origin, for comparing two origins without keeping a copy.
pub(crate) fn origin_hash(url: &Url) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    url.scheme().hash(&mut h);
    url.host_str().hash(&mut h);
    url.port_or_known_default().hash(&mut h);
    h.finish()
}

/// The error of a redirect to `to` that was not followed.
fn refused(to: &Url) -> ApiError {
    ApiError::new(
        ErrorCode::UpstreamBlocked,
        format!(
            "The upstream redirected to another origin ({}); the redirect was not followed, so \
             the API key was not sent there.",
            to.origin().ascii_serialization()
        ),
    )
    .with_status(StatusCode::BAD_GATEWAY)
    .with_provider("redirect")
}

/// The error for an answer from another origin than the request's, to which the client sent
/// the `header` credential: the client followed a redirect without [`redirect_policy`].
pub(crate) fn followed(to: &Url, header: &str) -> ApiError {
    ApiError::new(
        ErrorCode::UpstreamBlocked,
        format!(
            "The HTTP client followed a redirect to another origin ({}) and sent the `{header}` \
             header there; the answer is refused. Build the reqwest client with \
             `.redirect(llm_layers::client::redirect_policy())`.",
            to.origin().ascii_serialization()
        ),
    )
    .with_status(StatusCode::BAD_GATEWAY)
    .with_provider("redirect")
}

/// The [`ApiError`] in an error's source chain, if any.
pub(crate) fn api_error_in<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a ApiError> {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(api) = e.downcast_ref::<ApiError>() {
            return Some(api);
        }
        cur = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins() {
        let u = |s: &str| Url::parse(s).unwrap();
        assert!(same_origin(
            &u("https://a.example/x"),
            &u("https://a.example:443/y?q")
        ));
        assert!(!same_origin(
            &u("https://a.example/"),
            &u("http://a.example/")
        ));
        assert!(!same_origin(
            &u("http://127.0.0.1:1/"),
            &u("http://localhost:1/")
        ));
        assert!(!same_origin(
            &u("http://127.0.0.1:1/"),
            &u("http://127.0.0.1:2/")
        ));
        assert_eq!(
            origin_hash(&u("https://a.example/x")),
            origin_hash(&u("https://a.example:443/y"))
        );
        assert_ne!(
            origin_hash(&u("http://127.0.0.1:1/")),
            origin_hash(&u("http://127.0.0.1:2/"))
        );
        let err = refused(&u("https://evil.example/steal?api-key=sk-secret"));
        assert!(err.message().contains("https://evil.example"), "{err:?}");
        assert!(!err.message().contains("sk-secret"), "{err:?}");
        assert!(!err.is_retryable());
    }
}
