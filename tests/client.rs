//! reqwest-middleware clients built from the crate's layers, against a real upstream on a
//! real socket.
#![cfg(feature = "reqwest")]

mod common_client;

use std::time::Duration;

use common_client::{refused_addr, Answer, Stub};
use llm_layers::auth::{ApiKey, InjectApiKeyLayer};
use llm_layers::breaker::{CircuitBreakerLayer, CircuitState, SINGLE_KEY};
use llm_layers::client::{ApiErrorExt, ApiErrorMiddleware, TowerMiddleware};
use llm_layers::normalize::NormalizeErrorsLayer;
use llm_layers::{ApiError, ErrorCode};
use reqwest_middleware::{ClientBuilder, ClientWithMiddleware};

const SECRET: &str = "sk-upstream-secret-5f3c9a7e1d2b";

fn builder() -> ClientBuilder {
    ClientBuilder::new(reqwest::Client::new())
}

const CHAT: &str = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;

async fn post(
    client: &ClientWithMiddleware,
    url: &str,
) -> reqwest_middleware::Result<reqwest::Response> {
    client.post(url).body(CHAT).send().await
}

#[tokio::test]
async fn html_403_is_upstream_blocked_and_not_retried() {
    let stub = Stub::start(vec![Answer::html_403()]).await;
    let client = builder()
        .with(ApiErrorMiddleware::new())
        .with(TowerMiddleware::new(NormalizeErrorsLayer::new()))
        .build();
    let err = post(&client, &stub.url("/v1/chat/completions"))
        .await
        .unwrap_err();
    let api = err.api_error().expect("an ApiError");
    assert_eq!(api.code(), ErrorCode::UpstreamBlocked);
    assert_eq!(api.status(), 502);
    assert_eq!(api.upstream_status(), Some(http::StatusCode::FORBIDDEN));
    assert!(!api.is_retryable());
    assert_eq!(stub.calls(), 1);
}

#[tokio::test]
async fn html_403_is_classified_without_a_normalizer() {
    let stub = Stub::start(vec![Answer::html_403()]).await;
    let client = builder().with(ApiErrorMiddleware::new()).build();
    let err = post(&client, &stub.url("/v1/chat/completions"))
        .await
        .unwrap_err();
    assert!(err.is_middleware());
    assert_eq!(
        err.api_error().map(ApiError::code),
        Some(ErrorCode::UpstreamBlocked)
    );
    assert!(
        err.to_string().starts_with("upstream_blocked (502)"),
        "{err}"
    );
}

#[tokio::test]
async fn provider_json_error_keeps_its_code() {
    let stub = Stub::start(vec![Answer::json(
        401,
        r#"{"error":{"message":"Incorrect API key provided: sk-abc***xyz.","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}"#,
    )])
    .await;
    let client = builder().with(ApiErrorMiddleware::new()).build();
    let err = post(&client, &stub.url("/v1/chat/completions"))
        .await
        .unwrap_err();
    let api = err.into_api_error();
    assert_eq!(api.code(), ErrorCode::InvalidApiKey);
    assert_eq!(api.status(), 401);
}

#[tokio::test]
async fn refused_connection_is_service_unavailable() {
    let url = format!("http://{}/v1/chat/completions", refused_addr().await);
    let client = builder().with(ApiErrorMiddleware::new()).build();
    let err = post(&client, &url).await.unwrap_err();
    let api = err.api_error().expect("an ApiError").clone();
    assert_eq!(api.code(), ErrorCode::ServiceUnavailable);
    assert!(api.is_retryable());
    // The reqwest error stays reachable as the source.
    let source = std::error::Error::source(&err).expect("a source");
    let reqwest_err = source
        .downcast_ref::<reqwest::Error>()
        .expect("the reqwest error");
    assert!(reqwest_err.is_connect());
    // The message names the failure, not the address.
    assert!(!api.message().contains("127.0.0.1"), "{}", api.message());
}

#[tokio::test]
async fn refused_connection_through_the_normalizer_is_service_unavailable() {
    let url = format!("http://{}/v1/chat/completions", refused_addr().await);
    let client = builder()
        .with(ApiErrorMiddleware::new())
        .with(TowerMiddleware::new(NormalizeErrorsLayer::new()))
        .build();
    let err = post(&client, &url).await.unwrap_err();
    let api = err.api_error().expect("an ApiError");
    assert_eq!(api.code(), ErrorCode::ServiceUnavailable);
    assert_eq!(api.status(), 502);
    assert_eq!(api.provider(), Some("transport"));
}

#[tokio::test]
async fn invalid_url_is_invalid_value() {
    let client = builder().with(ApiErrorMiddleware::new()).build();
    let err = client.post("http://").body(CHAT).send().await.unwrap_err();
    // reqwest-middleware builds the request before any middleware runs; `into_api_error` still
    // classifies what it returns.
    assert_eq!(err.into_api_error().code(), ErrorCode::InvalidValue);
}

#[tokio::test]
async fn injected_key_is_sent_and_never_in_debug() {
    let stub = Stub::start(vec![Answer::ok()]).await;
    let inject = TowerMiddleware::new(InjectApiKeyLayer::bearer(ApiKey::new(SECRET).unwrap()));
    let shown = format!("{inject:?}");
    let client = builder()
        .with(ApiErrorMiddleware::new())
        .with(inject)
        .build();
    let res = client
        .post(stub.url("/v1/chat/completions"))
        .bearer_auth("sk-caller-key-that-must-not-leak")
        .body(CHAT)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    // The caller's own key is replaced, not sent next to the injected one.
    assert_eq!(stub.keys(), vec![Some(format!("Bearer {SECRET}"))]);
    assert!(shown.contains("redacted"), "{shown}");
    for text in [shown, format!("{client:?}"), format!("{:#?}", res)] {
        assert!(!text.contains(SECRET), "{text}");
        assert!(!text.contains("5f3c9a7e1d2b"), "{text}");
    }
}

#[tokio::test]
async fn success_passes_through_with_its_url_and_body() {
    let stub = Stub::start(vec![Answer::ok().header("x-request-id", "req_123")]).await;
    let client = builder()
        .with(ApiErrorMiddleware::new())
        .with(TowerMiddleware::new(NormalizeErrorsLayer::new()))
        .build();
    let url = stub.url("/v1/chat/completions");
    let res = post(&client, &url).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.url().as_str(), url);
    assert_eq!(res.headers()["x-request-id"], "req_123");
    assert_eq!(
        res.text().await.unwrap(),
        r#"{"id":"chatcmpl-1","choices":[]}"#
    );
    assert_eq!(stub.bodies(), vec![CHAT.as_bytes().to_vec()]);
}

#[tokio::test]
async fn stream_passes_through_chunk_by_chunk() {
    let stub = Stub::start(vec![]).await;
    let chunks = stub.stream_chunks();
    let client = builder()
        .with(ApiErrorMiddleware::new())
        .with(TowerMiddleware::new(InjectApiKeyLayer::bearer(
            ApiKey::new(SECRET).unwrap(),
        )))
        .with(TowerMiddleware::new(NormalizeErrorsLayer::new()))
        .build();
    let first = "data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\n\n";
    let second = "data: {\"choices\":[{\"delta\":{\"content\":\"lo\"}}]}\n\n";
    // The first chunk is sent before the request; the second only after the client has read
    // the first, so the client cannot have waited for the whole body.
    chunks.send(first.into()).unwrap();
    let mut res = post(&client, &stub.url("/stream")).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    let got = res.chunk().await.unwrap().expect("the first chunk");
    assert_eq!(got, first.as_bytes());
    chunks.send(second.into()).unwrap();
    chunks.send("data: [DONE]\n\n".into()).unwrap();
    drop(chunks);
    let mut rest = Vec::new();
    while let Some(c) = res.chunk().await.unwrap() {
        rest.extend_from_slice(&c);
    }
    assert_eq!(rest, format!("{second}data: [DONE]\n\n").as_bytes());
}

#[tokio::test]
async fn breaker_opens_and_stops_calling_the_upstream() {
    let stub = Stub::start(vec![Answer::overloaded()]).await;
    let breaker = CircuitBreakerLayer::builder()
        .name("upstream")
        .count_window(10)
        .minimum_calls(3)
        .failure_rate(50.0)
        .open_duration(Duration::from_secs(60))
        .seed(7)
        .build()
        .unwrap();
    let handle = breaker.handle();
    let client = builder()
        .with(ApiErrorMiddleware::new())
        .with(TowerMiddleware::new(breaker))
        .with(TowerMiddleware::new(NormalizeErrorsLayer::new()))
        .build();
    let url = stub.url("/v1/chat/completions");
    for _ in 0..3 {
        let err = post(&client, &url).await.unwrap_err();
        assert_eq!(
            err.api_error().unwrap().code(),
            ErrorCode::ServiceUnavailable
        );
    }
    assert_eq!(stub.calls(), 3);
    assert_eq!(handle.state(SINGLE_KEY), Some(CircuitState::Open));
    for _ in 0..3 {
        let err = post(&client, &url).await.unwrap_err();
        let api = err.api_error().unwrap();
        assert_eq!(api.code(), ErrorCode::ServiceUnavailable);
        assert!(
            api.message().contains("Circuit breaker 'upstream' is open"),
            "{}",
            api.message()
        );
        assert!(api.retry_after().is_some());
    }
    assert_eq!(
        stub.calls(),
        3,
        "an open circuit does not call the upstream"
    );
    assert_eq!(handle.metrics(SINGLE_KEY).unwrap().rejections, 3);
}

#[tokio::test]
async fn layer_timer_cuts_a_hanging_call() {
    // The layer's own timer runs while the rest of the chain is waiting for the upstream.
    let stub = Stub::start(vec![Answer::ok().after(Duration::from_secs(30))]).await;
    let client = builder()
        .with(ApiErrorMiddleware::new())
        .with(TowerMiddleware::new(tower::timeout::TimeoutLayer::new(
            Duration::from_millis(50),
        )))
        .build();
    let err = post(&client, &stub.url("/v1/chat/completions"))
        .await
        .unwrap_err();
    assert_eq!(err.api_error().unwrap().code(), ErrorCode::Timeout);
    assert_eq!(stub.calls(), 1);
}

#[tokio::test]
async fn errors_from_a_layer_without_api_error_middleware_pass_through() {
    let url = format!("http://{}/v1/chat/completions", refused_addr().await);
    let client = builder()
        .with(TowerMiddleware::new(InjectApiKeyLayer::bearer(
            ApiKey::new(SECRET).unwrap(),
        )))
        .build();
    let err = post(&client, &url).await.unwrap_err();
    // The chain's own reqwest error comes back unchanged.
    match err {
        reqwest_middleware::Error::Reqwest(e) => assert!(e.is_connect()),
        other => panic!("expected the reqwest error, got {other:?}"),
    }
}

#[cfg(feature = "rate-limit")]
mod rate_limit {
    use super::*;
    use llm_layers::rate_limit::{Limits, OnLimit, Quota, RateLimitLayer};

    fn limit(mode: OnLimit) -> RateLimitLayer {
        RateLimitLayer::builder()
            .limits(Limits::new().requests(Quota::per_second(20).burst(1)))
            .mode(mode)
            .build()
            .unwrap()
    }

    #[tokio::test]
    async fn wait_mode_paces_requests_instead_of_rejecting() {
        let stub = Stub::start(vec![Answer::ok()]).await;
        let client = builder()
            .with(ApiErrorMiddleware::new())
            .with(TowerMiddleware::new(limit(OnLimit::Wait(
                Duration::from_secs(5),
            ))))
            .with(TowerMiddleware::new(NormalizeErrorsLayer::new()))
            .build();
        let url = stub.url("/v1/chat/completions");
        for _ in 0..3 {
            let res = post(&client, &url).await.unwrap();
            assert_eq!(res.status(), 200);
            assert_eq!(res.headers()["x-ratelimit-limit-requests"], "1");
        }
        assert_eq!(stub.calls(), 3);
    }

    #[tokio::test]
    async fn chain_extensions_reach_the_layer() {
        use llm_layers::ext::KeyIdentity;
        use llm_layers::rate_limit::BucketKey;

        let stub = Stub::start(vec![Answer::ok()]).await;
        let limit = RateLimitLayer::builder()
            .key_by(BucketKey::api_key())
            .limits(Limits::new().requests(Quota::per_minute(1).burst(1)))
            .build()
            .unwrap();
        let handle = limit.handle();
        let client = builder()
            .with(ApiErrorMiddleware::new())
            .with(TowerMiddleware::new(limit))
            .build();
        let url = stub.url("/v1/chat/completions");
        let call = |key: &'static str| {
            client
                .post(&url)
                .with_extension(KeyIdentity::new(key))
                .body(CHAT)
                .send()
        };
        assert_eq!(call("team-a").await.unwrap().status(), 200);
        // Each key has its own bucket: team-b is not limited by team-a's request.
        assert_eq!(call("team-b").await.unwrap().status(), 200);
        let err = call("team-a").await.unwrap_err();
        assert_eq!(
            err.api_error().unwrap().code(),
            ErrorCode::RateLimitExceeded
        );
        assert_eq!(handle.tracked_keys(), 2);
        assert_eq!(stub.calls(), 2);
    }

    #[tokio::test]
    async fn reject_mode_answers_rate_limit_exceeded_without_calling() {
        let stub = Stub::start(vec![Answer::ok()]).await;
        let client = builder()
            .with(ApiErrorMiddleware::new())
            .with(TowerMiddleware::new(limit(OnLimit::Reject)))
            .build();
        let url = stub.url("/v1/chat/completions");
        assert_eq!(post(&client, &url).await.unwrap().status(), 200);
        let err = post(&client, &url).await.unwrap_err();
        let api = err.api_error().expect("an ApiError");
        assert_eq!(api.code(), ErrorCode::RateLimitExceeded);
        assert!(api
            .retry_after()
            .is_some_and(|w| w <= Duration::from_millis(50)));
        assert_eq!(stub.calls(), 1);
    }
}

mod retry {
    use std::sync::{Arc, Mutex};

    use super::*;
    use llm_layers::ext::Attempts;
    use llm_layers::retry::{Backoff, Jitter, RetryLayer, RetryLayerBuilder};

    /// Retries with short backoff, recording each scheduled wait.
    fn retry() -> (RetryLayerBuilder, Arc<Mutex<Vec<Duration>>>) {
        let waits = Arc::new(Mutex::new(Vec::new()));
        let seen = waits.clone();
        let builder = RetryLayer::builder()
            .max_attempts(3)
            .backoff(
                Backoff::new(
                    Duration::from_millis(1),
                    Duration::from_millis(5),
                    Jitter::Full,
                )
                .unwrap(),
            )
            .seed(11)
            .on_retry(move |e| seen.lock().unwrap().push(e.delay()));
        (builder, waits)
    }

    fn client(retry: RetryLayer) -> ClientWithMiddleware {
        builder()
            .with(ApiErrorMiddleware::new())
            .with(TowerMiddleware::new(retry))
            .with(TowerMiddleware::new(NormalizeErrorsLayer::new()))
            .build()
    }

    #[tokio::test]
    async fn two_503s_then_200_is_retried_to_success() {
        let stub = Stub::start(vec![
            Answer::overloaded(),
            Answer::overloaded(),
            Answer::ok(),
        ])
        .await;
        let (retry, waits) = retry();
        let client = client(retry.build().unwrap());
        let url = stub.url("/v1/chat/completions");
        let res = post(&client, &url).await.unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(res.extensions().get::<Attempts>(), Some(&Attempts(3)));
        assert_eq!(res.headers()["x-llm-layers-attempts"], "3");
        assert_eq!(res.url().as_str(), url);
        assert_eq!(stub.calls(), 3);
        assert_eq!(waits.lock().unwrap().len(), 2);
        // The body was replayed intact on every attempt.
        assert_eq!(stub.bodies(), vec![CHAT.as_bytes().to_vec(); 3]);
    }

    #[tokio::test]
    async fn one_middleware_runs_a_whole_stack() {
        let stub = Stub::start(vec![Answer::overloaded(), Answer::ok()]).await;
        let (retry, waits) = retry();
        let stack = (
            retry.build().unwrap(),
            CircuitBreakerLayer::builder().build().unwrap(),
            InjectApiKeyLayer::bearer(ApiKey::new(SECRET).unwrap()),
            NormalizeErrorsLayer::new(),
        );
        let client = builder()
            .with(ApiErrorMiddleware::new())
            .with(TowerMiddleware::new(stack))
            .build();
        let res = post(&client, &stub.url("/v1/chat/completions"))
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(res.extensions().get::<Attempts>(), Some(&Attempts(2)));
        assert_eq!(waits.lock().unwrap().len(), 1);
        let sent = Some(format!("Bearer {SECRET}"));
        assert_eq!(stub.keys(), vec![sent.clone(), sent]);
    }

    #[tokio::test]
    async fn service_builder_stack_works_too() {
        let stub = Stub::start(vec![Answer::overloaded(), Answer::ok()]).await;
        let (retry, _) = retry();
        let stack = tower::ServiceBuilder::new()
            .layer(retry.build().unwrap())
            .layer(NormalizeErrorsLayer::new())
            .into_inner();
        let client = builder().with(TowerMiddleware::new(stack)).build();
        let res = post(&client, &stub.url("/v1/chat/completions"))
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(stub.calls(), 2);
    }

    #[tokio::test]
    async fn attempt_timeout_cancels_a_hanging_attempt_and_retries() {
        let hang = Answer::ok().after(Duration::from_secs(30));
        let stub = Stub::start(vec![hang, Answer::ok()]).await;
        let (retry, waits) = retry();
        let retry = retry
            .attempt_timeout(Duration::from_millis(100))
            .build()
            .unwrap();
        let res = client(retry)
            .post(stub.url("/v1/chat/completions"))
            .body(CHAT)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(res.extensions().get::<Attempts>(), Some(&Attempts(2)));
        assert_eq!(stub.calls(), 2);
        assert_eq!(waits.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn retry_after_ms_hint_is_honoured() {
        let limited = Answer::json(
            429,
            r#"{"error":{"message":"Rate limit reached for requests","type":"requests","param":null,"code":"rate_limit_exceeded"}}"#,
        )
        .header("retry-after-ms", "50");
        let stub = Stub::start(vec![limited, Answer::ok()]).await;
        let (retry, waits) = retry();
        let client = client(retry.hint_jitter(Duration::from_millis(5)).build().unwrap());
        let res = post(&client, &stub.url("/v1/chat/completions"))
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(res.extensions().get::<Attempts>(), Some(&Attempts(2)));
        assert_eq!(stub.calls(), 2);
        // The wait scheduled is the server's (plus at most the hint jitter), not the 1-5 ms
        // backoff.
        let waits = waits.lock().unwrap().clone();
        assert_eq!(waits.len(), 1);
        assert!(
            waits[0] >= Duration::from_millis(50) && waits[0] <= Duration::from_millis(55),
            "{waits:?}"
        );
    }

    #[tokio::test]
    async fn rate_limit_with_long_hint_is_not_retried() {
        let limited = Answer::json(
            429,
            r#"{"error":{"message":"Rate limit reached","type":"requests","param":null,"code":"rate_limit_exceeded"}}"#,
        )
        .header("retry-after", "3600");
        let stub = Stub::start(vec![limited]).await;
        let (retry, waits) = retry();
        let client = client(retry.build().unwrap());
        let err = post(&client, &stub.url("/v1/chat/completions"))
            .await
            .unwrap_err();
        assert_eq!(
            err.api_error().unwrap().code(),
            ErrorCode::RateLimitExceeded
        );
        assert_eq!(stub.calls(), 1);
        assert!(waits.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn html_403_is_upstream_blocked_and_not_retried() {
        let stub = Stub::start(vec![Answer::html_403(), Answer::ok()]).await;
        let (retry, waits) = retry();
        let client = client(retry.build().unwrap());
        let err = post(&client, &stub.url("/v1/chat/completions"))
            .await
            .unwrap_err();
        let api = err.api_error().expect("an ApiError");
        assert_eq!(api.code(), ErrorCode::UpstreamBlocked);
        assert_eq!(stub.calls(), 1);
        assert!(waits.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn refused_connection_is_retried_then_service_unavailable() {
        let url = format!("http://{}/v1/chat/completions", refused_addr().await);
        let (retry, waits) = retry();
        let client = client(retry.build().unwrap());
        let err = post(&client, &url).await.unwrap_err();
        let api = err.api_error().expect("an ApiError");
        assert_eq!(api.code(), ErrorCode::ServiceUnavailable);
        assert_eq!(waits.lock().unwrap().len(), 2, "three attempts were made");
    }

    #[tokio::test]
    async fn open_breaker_inside_retry_stops_the_calls() {
        let stub = Stub::start(vec![Answer::overloaded()]).await;
        let breaker = CircuitBreakerLayer::builder()
            .count_window(10)
            .minimum_calls(2)
            .failure_rate(50.0)
            .open_duration(Duration::from_secs(120))
            .seed(3)
            .build()
            .unwrap();
        let (retry, _) = retry();
        let client = builder()
            .with(ApiErrorMiddleware::new())
            .with(TowerMiddleware::new(retry.build().unwrap()))
            .with(TowerMiddleware::new(breaker))
            .with(TowerMiddleware::new(NormalizeErrorsLayer::new()))
            .build();
        let url = stub.url("/v1/chat/completions");
        let err = post(&client, &url).await.unwrap_err();
        assert_eq!(
            err.api_error().unwrap().code(),
            ErrorCode::ServiceUnavailable
        );
        // Two attempts opened the circuit; the third was answered by the breaker.
        assert_eq!(stub.calls(), 2);
        let err = post(&client, &url).await.unwrap_err();
        assert!(err.api_error().unwrap().message().contains("is open"));
        assert_eq!(stub.calls(), 2);
    }
}

#[tokio::test]
async fn layer_errors_become_middleware_errors() {
    let stub = Stub::start(vec![Answer::ok().after(Duration::from_secs(30))]).await;
    let client = builder()
        .with(TowerMiddleware::new(tower::timeout::TimeoutLayer::new(
            Duration::from_millis(20),
        )))
        .build();
    let err = post(&client, &stub.url("/v1/chat/completions"))
        .await
        .unwrap_err();
    assert!(err.is_middleware());
    assert!(err.api_error().is_none());
    assert_eq!(err.to_string(), "request timed out");
    assert_eq!(err.into_api_error().code(), ErrorCode::Timeout);
}

#[tokio::test]
async fn envelopes_of_an_llm_layers_gateway_keep_their_code() {
    // A client in front of a gateway built from this crate gets the gateway's own code back,
    // whichever of the 18 it is.
    for code in ErrorCode::ALL {
        let envelope = ApiError::new(code, "from the gateway").to_response::<bytes::Bytes>();
        let (parts, body) = envelope.into_parts();
        let answer = Answer::json(parts.status.as_u16(), std::str::from_utf8(&body).unwrap())
            .header(
                "x-should-retry",
                parts.headers["x-should-retry"].to_str().unwrap(),
            );
        let stub = Stub::start(vec![answer]).await;
        let client = builder()
            .with(ApiErrorMiddleware::new())
            .with(TowerMiddleware::new(NormalizeErrorsLayer::new()))
            .build();
        let err = post(&client, &stub.url("/v1/chat/completions"))
            .await
            .unwrap_err();
        let api = err.api_error().expect("an ApiError");
        assert_eq!(api.code(), code, "{code}");
        assert_eq!(api.status(), code.status(), "{code}");
    }
}

#[tokio::test]
async fn concurrent_calls_of_a_layer_are_all_answered() {
    // A layer that sends two calls at once (as a hedging layer would): both reach the
    // upstream, one after the other, and neither waits forever.
    use tower::{Service, ServiceExt};
    type Req = http::Request<reqwest::Body>;

    let stub = Stub::start(vec![Answer::ok()]).await;
    let both = tower::layer::layer_fn(|inner: llm_layers::client::NextService| {
        tower::service_fn(move |req: http::Request<reqwest::Body>| {
            let mut a = inner.clone();
            let mut b = inner.clone();
            async move {
                let (parts, body) = req.into_parts();
                let bytes = http_body_util::BodyExt::collect(body).await?.to_bytes();
                let first =
                    http::Request::from_parts(parts.clone(), reqwest::Body::from(bytes.clone()));
                let second = http::Request::from_parts(parts, reqwest::Body::from(bytes));
                let (x, y) = futures_util::future::join(
                    ServiceExt::<Req>::ready(&mut a).await.unwrap().call(first),
                    ServiceExt::<Req>::ready(&mut b).await.unwrap().call(second),
                )
                .await;
                assert_eq!(x?.status(), 200);
                y.map_err(Box::<dyn std::error::Error + Send + Sync>::from)
            }
        })
    });
    let client = builder().with(TowerMiddleware::new(both)).build();
    let res = post(&client, &stub.url("/v1/chat/completions"))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(stub.calls(), 2);
    assert_eq!(stub.bodies(), vec![CHAT.as_bytes().to_vec(); 2]);
}

/// Redirects: the key must never reach another origin. reqwest follows redirects inside the
/// client and keeps every header but `Authorization` on a cross-host redirect.
mod redirects {
    use super::*;
    use llm_layers::client::redirect_policy;
    use llm_layers::retry::{Backoff, Jitter, RetryLayer};

    /// A second upstream, and a first one that redirects every call to it with `status`.
    /// The second is reached as `localhost`, the first as `127.0.0.1`: two origins.
    async fn two_origins(status: u16) -> (Stub, Stub) {
        let second = Stub::start(vec![Answer::ok()]).await;
        let target = second.url_on("localhost", "/v1/messages");
        let first = Stub::start(vec![Answer::json(status, "").header("location", &target)]).await;
        (first, second)
    }

    /// A retry layer with no waits to speak of.
    fn retry() -> RetryLayer {
        RetryLayer::builder()
            .max_attempts(3)
            .backoff(
                Backoff::new(
                    Duration::from_millis(1),
                    Duration::from_millis(2),
                    Jitter::Full,
                )
                .unwrap(),
            )
            .build()
            .unwrap()
    }

    fn layers() -> [(InjectApiKeyLayer, &'static str); 3] {
        let key = || ApiKey::new(SECRET).unwrap();
        [
            (InjectApiKeyLayer::x_api_key(key()), "x-api-key"),
            (InjectApiKeyLayer::api_key(key()), "api-key"),
            (InjectApiKeyLayer::bearer(key()), "authorization"),
        ]
    }

    /// No header of `stub`'s requests holds the key.
    fn assert_no_key(stub: &Stub) {
        for headers in stub.headers() {
            for (name, value) in &headers {
                let value = value.to_str().unwrap_or("");
                assert!(!value.contains(SECRET), "{name}: {value}");
            }
        }
    }

    #[tokio::test]
    async fn a_cross_origin_redirect_is_refused_and_the_key_stays_home() {
        for status in [307, 308, 302] {
            for (layer, header) in layers() {
                let (first, second) = two_origins(status).await;
                let http = reqwest::Client::builder()
                    .redirect(redirect_policy())
                    .build()
                    .unwrap();
                let client = ClientBuilder::new(http)
                    .with(ApiErrorMiddleware::new())
                    .with(TowerMiddleware::new(retry()))
                    .with(TowerMiddleware::new(layer))
                    .build();
                let err = post(&client, &first.url("/v1/messages")).await.unwrap_err();
                let api = err.api_error().unwrap_or_else(|| panic!("{err:?}"));
                assert_eq!(api.code(), ErrorCode::UpstreamBlocked, "{api:?}");
                assert_eq!(api.status(), 502);
                assert!(!api.is_retryable());
                let origin = format!(
                    "http://localhost:{}",
                    second.url("").rsplit(':').next().unwrap()
                );
                assert!(api.message().contains(&origin), "{}", api.message());
                assert!(!api.message().contains(SECRET));
                assert_eq!(second.calls(), 0, "{status} {header}");
                assert_no_key(&second);
                // The first upstream got the key, once: a refused redirect is not retried.
                assert_eq!(first.calls(), 1, "{status} {header}");
                let sent = first.headers()[0][header].to_str().unwrap().to_owned();
                assert!(sent.ends_with(SECRET), "{sent}");
            }
        }
    }

    #[tokio::test]
    async fn a_redirect_on_the_same_origin_is_followed_with_the_key() {
        let stub = Stub::start(vec![
            Answer::json(307, "").header("location", "/v1/other"),
            Answer::ok(),
        ])
        .await;
        let http = reqwest::Client::builder()
            .redirect(redirect_policy())
            .build()
            .unwrap();
        let client = ClientBuilder::new(http)
            .with(ApiErrorMiddleware::new())
            .with(TowerMiddleware::new(InjectApiKeyLayer::x_api_key(
                ApiKey::new(SECRET).unwrap(),
            )))
            .build();
        let res = post(&client, &stub.url("/v1/messages")).await.unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(res.url().path(), "/v1/other");
        let headers = stub.headers();
        assert_eq!(headers.len(), 2);
        for h in &headers {
            assert_eq!(h["x-api-key"], SECRET);
        }
        // With 307 the body went along too.
        assert_eq!(stub.bodies()[1], CHAT.as_bytes());
    }

    #[tokio::test]
    async fn too_many_redirects_on_the_same_origin_stop() {
        let stub = Stub::start(vec![Answer::json(302, "").header("location", "/v1/again")]).await;
        let http = reqwest::Client::builder()
            .redirect(redirect_policy())
            .build()
            .unwrap();
        let err = http.get(stub.url("/v1/models")).send().await.unwrap_err();
        assert!(err.is_redirect(), "{err:?}");
        assert_eq!(stub.calls(), llm_layers::client::MAX_REDIRECTS + 1);
    }

    #[tokio::test]
    async fn a_key_set_by_the_caller_is_covered_too() {
        // No inject layer: the caller sets the header, the error middleware reads the refusal.
        let (first, second) = two_origins(307).await;
        let http = reqwest::Client::builder()
            .redirect(redirect_policy())
            .build()
            .unwrap();
        let client = ClientBuilder::new(http)
            .with(ApiErrorMiddleware::new())
            .build();
        let err = client
            .post(first.url("/v1/messages"))
            .header("x-api-key", SECRET)
            .body(CHAT)
            .send()
            .await
            .unwrap_err();
        assert_eq!(err.into_api_error().code(), ErrorCode::UpstreamBlocked);
        assert_eq!(second.calls(), 0);
    }

    #[tokio::test]
    async fn a_client_without_the_policy_is_caught_and_its_answer_refused() {
        // reqwest's default policy follows the redirect and sends `x-api-key` along, before
        // any middleware can see it: the answer from the other origin is refused, loudly.
        for (layer, header) in layers().into_iter().take(2) {
            let (first, second) = two_origins(307).await;
            let client = builder()
                .with(ApiErrorMiddleware::new())
                .with(TowerMiddleware::new(retry()))
                .with(TowerMiddleware::new(layer))
                .build();
            let err = post(&client, &first.url("/v1/messages")).await.unwrap_err();
            let api = err.api_error().unwrap_or_else(|| panic!("{err:?}"));
            assert_eq!(api.code(), ErrorCode::UpstreamBlocked, "{api:?}");
            assert!(
                api.message().contains("redirect_policy()"),
                "{}",
                api.message()
            );
            assert!(api.message().contains(header), "{}", api.message());
            assert!(!api.message().contains(SECRET));
            // Not retried: the key is not sent there again.
            assert_eq!(second.calls(), 1);
        }
    }

    #[tokio::test]
    async fn the_tower_layer_over_hyper_util_does_not_follow_redirects() {
        use http_body_util::Full;
        use hyper_util::client::legacy::Client;
        use tower::{Layer, ServiceExt};

        let (first, second) = two_origins(307).await;
        let http: Client<_, Full<bytes::Bytes>> =
            Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
        let client = InjectApiKeyLayer::x_api_key(ApiKey::new(SECRET).unwrap()).layer(http);
        let req = http::Request::post(first.url("/v1/messages"))
            .body(Full::new(bytes::Bytes::from_static(CHAT.as_bytes())))
            .unwrap();
        let res = client.oneshot(req).await.unwrap();
        // hyper-util hands the redirect back; nothing follows it.
        assert_eq!(res.status(), 307);
        assert!(res.headers()["location"]
            .to_str()
            .unwrap()
            .starts_with("http://localhost:"));
        assert_eq!(first.headers()[0]["x-api-key"], SECRET);
        assert_eq!(second.calls(), 0);
    }
}

/// tower-http's `FollowRedirect` over the tower `InjectApiKeyLayer`: the layer sets the key on
/// every hop, so only a same-origin policy keeps it home.
mod follow_redirect {
    use super::*;
    use http_body_util::Full;
    use hyper_util::client::legacy::Client;
    use tower::{ServiceBuilder, ServiceExt};
    use tower_http::follow_redirect::policy::SameOrigin;
    use tower_http::follow_redirect::FollowRedirectLayer;

    async fn get<S>(svc: S, url: String) -> u16
    where
        S: tower::Service<
            http::Request<Full<bytes::Bytes>>,
            Response = http::Response<hyper::body::Incoming>,
        >,
        S::Error: std::fmt::Debug,
    {
        let req = http::Request::get(url).body(Full::default()).unwrap();
        svc.oneshot(req).await.unwrap().status().as_u16()
    }

    #[tokio::test]
    async fn only_the_same_origin_policy_keeps_the_key_home() {
        let http: Client<_, Full<bytes::Bytes>> =
            Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
        let inject = || InjectApiKeyLayer::x_api_key(ApiKey::new(SECRET).unwrap());

        // The default policy follows, and the key is set again for the other origin.
        let second = Stub::start(vec![Answer::ok()]).await;
        let to = second.url_on("localhost", "/v1/models");
        let first = Stub::start(vec![Answer::json(302, "").header("location", &to)]).await;
        let svc = ServiceBuilder::new()
            .layer(FollowRedirectLayer::new())
            .layer(inject())
            .service(http.clone());
        assert_eq!(get(svc, first.url("/v1/models")).await, 200);
        assert_eq!(second.headers()[0]["x-api-key"], SECRET);

        // `SameOrigin` hands the redirect back.
        let second = Stub::start(vec![Answer::ok()]).await;
        let to = second.url_on("localhost", "/v1/models");
        let first = Stub::start(vec![Answer::json(302, "").header("location", &to)]).await;
        let svc = ServiceBuilder::new()
            .layer(FollowRedirectLayer::with_policy(SameOrigin::new()))
            .layer(inject())
            .service(http);
        assert_eq!(get(svc, first.url("/v1/models")).await, 302);
        assert_eq!(second.calls(), 0);
    }
}
