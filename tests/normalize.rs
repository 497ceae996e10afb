//! The normalizer through real HTTP: a stub upstream, a hyper client wrapped by the layer, an
//! axum gateway in front, and reqwest as the caller.

mod common_normalize;

use std::time::Duration;

use bytes::Bytes;
use common_normalize::*;
use futures_util::StreamExt;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use llm_layers::body::LayerBody;
use llm_layers::error::{ApiError, ErrorCode, TypeStyle};
use llm_layers::normalize::{NormalizeErrorsLayer, NormalizeOptions};
use serde_json::Value;
use tower::{Layer, ServiceBuilder, ServiceExt};

async fn json_of(res: reqwest::Response) -> Value {
    let ct = res.headers()["content-type"].to_str().unwrap().to_owned();
    assert_eq!(ct, "application/json");
    res.json().await.unwrap()
}

/// A GET of `path` on the stub upstream, through a gateway whose client is normalized.
async fn through_gateway(path: &str) -> reqwest::Response {
    let upstream = start_upstream().await;
    let gateway = start_gateway(upstream, normalized_client()).await;
    reqwest::get(format!("http://{gateway}/{path}"))
        .await
        .unwrap()
}

#[tokio::test]
async fn every_fixture_becomes_the_expected_envelope_through_http() {
    let upstream = start_upstream().await;
    // Errors inside a 200 (OpenRouter style) need the opt-in inspection of 200 JSON answers.
    let inspecting = NormalizeOptions::new().inspect_ok_json(true);
    let gateway = start_gateway(
        upstream,
        NormalizeErrorsLayer::with_options(inspecting).layer(hyper_client()),
    )
    .await;
    let http = reqwest::Client::new();
    let mut mismatches = Vec::new();
    let fixtures = load_fixtures();
    for f in &fixtures {
        let res = http
            .post(format!("http://{gateway}/fixture/{}", f.id))
            .send()
            .await
            .unwrap();
        let expected: ErrorCode = f.code.parse().unwrap();
        if f.stream {
            // An in-band error stays in-band: the stream is 200 and the error event is an envelope.
            let status = res.status();
            let text = res.text().await.unwrap();
            let rewritten = text
                .lines()
                .filter_map(|l| l.strip_prefix("data: "))
                .filter_map(|d| serde_json::from_str::<Value>(d).ok())
                .find(|v| v["error"]["code"].is_string());
            match rewritten {
                Some(v) if status == 200 && v["error"]["code"] == f.code => {}
                other => mismatches.push(format!("{}: stream gave {status} {other:?}", f.id)),
            }
            continue;
        }
        let status = res.status();
        let Some(should_retry) = res
            .headers()
            .get("x-should-retry")
            .map(|v| v.to_str().unwrap().to_owned())
        else {
            mismatches.push(format!("{}: {status} without x-should-retry", f.id));
            continue;
        };
        let retry_after_ms = res
            .headers()
            .get("retry-after-ms")
            .map(|v| v.to_str().unwrap().parse::<u64>().unwrap());
        let body = json_of(res).await;
        let code = body["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let message = body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let dated = f
            .headers
            .iter()
            .any(|(k, v)| k == "retry-after" && v.contains("GMT"))
            || f.headers
                .iter()
                .any(|(k, _)| k.starts_with("anthropic-ratelimit"));
        // An ambiguous fixture may take either reading, but it is still a valid envelope whose
        // status is its code's.
        let expected_reading = if f.ambiguous {
            code.parse::<ErrorCode>()
                .is_ok_and(|c| c.status() == status)
        } else {
            code == f.code && status == expected.status() && should_retry == f.retryable.to_string()
        };
        let ok = expected_reading
            && (dated || retry_after_ms == f.retry_after_ms)
            && !message.is_empty()
            && !message.contains("<html")
            && !message.contains("<!DOCTYPE");
        if !ok {
            mismatches.push(format!(
                "{}: got {status} {code} x-should-retry={should_retry} retry-after-ms={retry_after_ms:?}, \
                 want {} {} {} {:?}",
                f.id,
                expected.status().as_u16(),
                f.code,
                f.retryable,
                f.retry_after_ms
            ));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} of {} fixtures differ:\n{}",
        mismatches.len(),
        fixtures.len(),
        mismatches.join("\n")
    );
}

#[tokio::test]
async fn html_403_from_a_cdn_becomes_502_upstream_blocked_on_an_axum_router() {
    // The layer on the router itself: the handler answers like a proxied CDN block page.
    let app = axum::Router::new()
        .route(
            "/v1/chat/completions",
            axum::routing::post(|| async {
                Response::builder()
                    .status(403)
                    .header("content-type", "text/html; charset=UTF-8")
                    .body(axum::body::Body::from(
                        "<!DOCTYPE html>\n<html><head><title>Attention Required! | Cloudflare</title></head>\
                         <body><h1>Sorry, you have been blocked</h1></body></html>",
                    ))
                    .unwrap()
            }),
        )
        .layer(NormalizeErrorsLayer::new());
    let addr = serve(app).await;
    let res = reqwest::Client::new()
        .post(format!("http://{addr}/v1/chat/completions"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(res.headers()["x-should-retry"], "false");
    let body = json_of(res).await;
    assert_eq!(body["error"]["code"], "upstream_blocked");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("HTML"), "{message}");
    assert!(!message.contains("<body>"), "{message}");
}

#[tokio::test]
async fn a_429_with_retry_after_ms_1500_announces_2_seconds_and_1500_ms() {
    let res = through_gateway("rate-limited").await;
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(res.headers()["retry-after"], "2");
    assert_eq!(res.headers()["retry-after-ms"], "1500");
    assert_eq!(res.headers()["x-should-retry"], "true");
    // Upstream rate-limit state and request id are kept for the caller.
    assert_eq!(res.headers()["x-ratelimit-remaining-requests"], "0");
    assert_eq!(res.headers()["x-request-id"], "req_abc123");
    let body = json_of(res).await;
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    assert_eq!(body["error"]["type"], "requests");
}

#[tokio::test]
async fn a_200_sse_stream_passes_byte_for_byte() {
    let res = through_gateway("sse-ok").await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    let mut got = Vec::new();
    let mut stream = res.bytes_stream();
    while let Some(chunk) = stream.next().await {
        got.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(String::from_utf8(got).unwrap(), SSE_OK.concat());
}

#[tokio::test]
async fn sse_frames_are_handed_on_chunk_for_chunk() {
    // In-process, so frame boundaries are exactly what the upstream body produced.
    let chunks: Vec<Bytes> = SSE_OK
        .iter()
        .map(|c| Bytes::from_static(c.as_bytes()))
        .collect();
    let sent = chunks.clone();
    let upstream = tower::service_fn(move |_req: Request<Full<Bytes>>| {
        let frames = sent
            .clone()
            .into_iter()
            .map(|c| Ok::<_, std::io::Error>(http_body::Frame::data(c)));
        async move {
            Ok::<_, std::io::Error>(
                Response::builder()
                    .header("content-type", "text/event-stream; charset=utf-8")
                    .body(StreamBody::new(futures_util::stream::iter(frames)))
                    .unwrap(),
            )
        }
    });
    let res = NormalizeErrorsLayer::new()
        .layer(upstream)
        .oneshot(Request::new(Full::default()))
        .await
        .unwrap();
    let mut body = res.into_body();
    let mut frames = Vec::new();
    while let Some(frame) = body.frame().await {
        frames.push(frame.unwrap().into_data().unwrap());
    }
    assert_eq!(frames, chunks);
}

#[tokio::test]
async fn an_in_band_stream_error_is_rewritten_to_the_envelope() {
    let res = through_gateway("sse-error").await;
    assert_eq!(res.status(), 200);
    let text = res.text().await.unwrap();
    let mut events = text.split("\n\n").filter(|e| !e.is_empty());
    assert_eq!(format!("{}\n\n", events.next().unwrap()), SSE_OK[0]);
    let err: Value =
        serde_json::from_str(events.next().unwrap().strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(err["error"]["code"], "internal_error");
    assert_eq!(err["error"]["type"], "server_error");
    assert!(events.next().is_none());
}

#[tokio::test]
async fn a_stream_that_breaks_off_ends_with_an_error_event() {
    let res = through_gateway("sse-cut").await;
    assert_eq!(res.status(), 200);
    // The stream ends cleanly (no transport error for the caller) with an envelope event.
    let text = res.text().await.unwrap();
    // What the upstream flushed before it died is handed on as it came.
    assert!(text.starts_with(SSE_OK[0]), "{text}");
    let last = text.trim_end().rsplit("\n\n").next().unwrap();
    let err: Value = serde_json::from_str(last.strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(err["error"]["code"], "service_unavailable");
}

#[tokio::test]
async fn success_answers_are_untouched() {
    let res = through_gateway("ok-json").await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-request-id"], "req_ok");
    assert!(res.headers().get("x-should-retry").is_none());
    assert_eq!(
        res.text().await.unwrap(),
        r#"{"id":"chatcmpl-1","choices":[]}"#
    );
}

#[tokio::test]
async fn a_refused_connection_is_a_502_service_unavailable_envelope() {
    let gateway = start_gateway(closed_port().await, normalized_client()).await;
    let res = reqwest::get(format!("http://{gateway}/v1/chat/completions"))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(res.headers()["x-should-retry"], "true");
    let body = json_of(res).await;
    assert_eq!(body["error"]["code"], "service_unavailable");
    // The message does not reveal the upstream address.
    assert!(!body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("127.0.0.1"));
}

#[tokio::test]
async fn a_reset_connection_is_a_502_service_unavailable_envelope() {
    let gateway = start_gateway(start_resetting_upstream().await, normalized_client()).await;
    let res = reqwest::get(format!("http://{gateway}/v1/chat/completions"))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::BAD_GATEWAY);
    let body = json_of(res).await;
    assert_eq!(body["error"]["code"], "service_unavailable");
    assert_eq!(
        body["error"]["message"],
        "The connection to the upstream was closed before it answered."
    );
}

#[tokio::test]
async fn an_inner_timeout_is_a_504_timeout_envelope() {
    let upstream = start_upstream().await;
    let client = ServiceBuilder::new()
        .layer(NormalizeErrorsLayer::new())
        .timeout(Duration::from_millis(50))
        .service(hyper_client());
    let res = client
        .oneshot(
            Request::get(format!("http://{upstream}/slow"))
                .body(Full::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(
        res.extensions().get::<ApiError>().unwrap().code(),
        ErrorCode::Timeout
    );
    assert_eq!(res.headers()["x-should-retry"], "true");
}

#[tokio::test]
async fn a_huge_error_body_is_read_only_up_to_the_limit() {
    let upstream = start_upstream().await;
    let client = NormalizeErrorsLayer::with_options(NormalizeOptions::new().body_limit(64 * 1024))
        .layer(hyper_client());
    let res = client
        .oneshot(
            Request::get(format!("http://{upstream}/big-error"))
                .body(Full::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert!(
        body.len() < 4096,
        "the envelope must not carry the page: {} bytes",
        body.len()
    );
    let json: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["error"]["code"], "internal_error");
}

#[tokio::test]
async fn empty_and_binary_error_bodies_are_classified_by_status() {
    let upstream = start_upstream().await;
    for (path, status, code) in [
        (
            "empty-503",
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
        ),
        (
            "binary-500",
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
        ),
    ] {
        let res = normalized_client()
            .oneshot(
                Request::get(format!("http://{upstream}/{path}"))
                    .body(Full::default())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(res.status(), status, "{path}");
        let body = res.into_body().collect().await.unwrap().to_bytes();
        let json: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["error"]["code"], code, "{path}");
    }
}

#[tokio::test]
async fn options_keep_the_upstream_status_and_descriptive_types() {
    let upstream = start_upstream().await;
    let options = NormalizeOptions::new()
        .keep_upstream_status(true)
        .type_style(TypeStyle::Descriptive);
    let client = NormalizeErrorsLayer::with_options(options).layer(hyper_client());
    // ANT-01 is Anthropic's 529 overload.
    let res = client
        .oneshot(
            Request::get(format!("http://{upstream}/fixture/ANT-01"))
                .body(Full::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 529);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    let json: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["error"]["code"], "service_unavailable");
    assert_eq!(json["error"]["type"], "overloaded_error");
}

#[tokio::test]
async fn an_envelope_from_an_inner_layer_is_not_classified_twice() {
    let inner = tower::service_fn(|_req: Request<Full<Bytes>>| async {
        let err = ApiError::new(ErrorCode::ExpiredApiKey, "The key expired.");
        Ok::<_, std::io::Error>(err.to_response::<Full<Bytes>>())
    });
    let res = NormalizeErrorsLayer::new()
        .layer(inner)
        .oneshot(Request::new(Full::default()))
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    assert_eq!(
        res.extensions().get::<ApiError>().unwrap().code(),
        ErrorCode::ExpiredApiKey
    );
    let body = res.into_body().collect().await.unwrap().to_bytes();
    let json: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["error"]["message"], "The key expired.");
}

type FrameStream = StreamBody<
    futures_util::stream::Iter<std::vec::IntoIter<Result<http_body::Frame<Bytes>, std::io::Error>>>,
>;

fn json_200(
    frames: Vec<&'static str>,
) -> impl tower::Service<
    Request<Full<Bytes>>,
    Response = Response<FrameStream>,
    Error = std::io::Error,
> + Clone {
    tower::service_fn(move |_req: Request<Full<Bytes>>| {
        let frames: Vec<_> = frames
            .iter()
            .map(|f| Ok(http_body::Frame::data(Bytes::from_static(f.as_bytes()))))
            .collect();
        std::future::ready(Ok(Response::builder()
            .header("content-type", "application/json")
            .body(StreamBody::new(futures_util::stream::iter(frames)))
            .unwrap()))
    })
}

#[tokio::test]
async fn inspection_hands_a_normal_200_on_frame_for_frame() {
    let frames = vec![
        "{\"id\":\"chatcmpl-1\",",
        "\"choices\":[{\"message\":{\"content\":\"an error\"}}]}",
    ];
    let layer = NormalizeErrorsLayer::with_options(NormalizeOptions::new().inspect_ok_json(true));
    let res = layer
        .layer(json_200(frames.clone()))
        .oneshot(Request::new(Full::default()))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let mut body = res.into_body();
    let mut got = Vec::new();
    while let Some(frame) = body.frame().await {
        got.push(frame.unwrap().into_data().unwrap());
    }
    let want: Vec<Bytes> = frames
        .iter()
        .map(|f| Bytes::from_static(f.as_bytes()))
        .collect();
    assert_eq!(got, want);
}

#[tokio::test]
async fn inspection_turns_an_error_object_in_a_200_into_its_envelope() {
    // The error object arrives in two frames; the envelope carries its code and status.
    let frames = vec![
        "  {\"error\":{\"message\":\"Rate limit reached. Please try",
        " again in 2s.\",\"type\":\"requests\",\"code\":\"rate_limit_exceeded\"}}",
    ];
    let layer = NormalizeErrorsLayer::with_options(NormalizeOptions::new().inspect_ok_json(true));
    let res = layer
        .layer(json_200(frames.clone()))
        .oneshot(Request::new(Full::default()))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(res.headers()["retry-after"], "2");
    assert_eq!(
        res.extensions().get::<ApiError>().unwrap().code(),
        ErrorCode::RateLimitExceeded
    );

    // Without the option, the same answer is handed on as it came.
    let res = NormalizeErrorsLayer::new()
        .layer(json_200(frames))
        .oneshot(Request::new(Full::default()))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert!(res.extensions().get::<ApiError>().is_none());
}

// ---------- bounded error-body reads ----------

type FrameResult = Result<http_body::Frame<Bytes>, std::io::Error>;

/// A body that sends one frame and then nothing, forever.
type Stalling = StreamBody<
    futures_util::stream::Chain<
        futures_util::stream::Iter<std::array::IntoIter<FrameResult, 1>>,
        futures_util::stream::Pending<FrameResult>,
    >,
>;

fn stalling_body(first: &'static str) -> Stalling {
    let head = futures_util::stream::iter([Ok(http_body::Frame::data(Bytes::from_static(
        first.as_bytes(),
    )))]);
    StreamBody::new(head.chain(futures_util::stream::pending()))
}

/// An upstream answering `status` with a `retry-after: 7` header and a body that stalls after
/// its first bytes.
fn stalling_upstream(
    status: u16,
    content_type: &'static str,
    first: &'static str,
) -> impl tower::Service<Request<Full<Bytes>>, Response = Response<Stalling>, Error = std::io::Error>
       + Clone {
    tower::service_fn(move |_req: Request<Full<Bytes>>| {
        std::future::ready(Ok(Response::builder()
            .status(status)
            .header("content-type", content_type)
            .header("retry-after", "7")
            .body(stalling_body(first))
            .unwrap()))
    })
}

#[tokio::test(start_paused = true)]
async fn a_stalled_error_body_is_classified_when_the_read_timeout_fires() {
    let svc = NormalizeErrorsLayer::new().layer(stalling_upstream(
        503,
        "application/json",
        r#"{"error":{"message":"The engine is currently overloaded, please try again later","type":"server_error""#,
    ));
    let start = tokio::time::Instant::now();
    let res = tokio::time::timeout(
        Duration::from_secs(600),
        svc.oneshot(Request::new(Full::default())),
    )
    .await
    .expect("the normalizer waited on a stalled error body")
    .unwrap();
    // The default bound, to the tick of the paused clock.
    assert_eq!(
        start.elapsed(),
        llm_layers::normalize::DEFAULT_ERROR_BODY_TIMEOUT
    );
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    // The head's hint is kept.
    assert_eq!(res.headers()["retry-after"], "7");
    let err = res.extensions().get::<ApiError>().unwrap().clone();
    assert_eq!(err.code(), ErrorCode::ServiceUnavailable);
    // The part of the body that arrived was classified.
    assert!(
        err.message().contains("currently overloaded"),
        "{}",
        err.message()
    );
    let body = res.into_body().collect().await.unwrap().to_bytes();
    let json: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["error"]["code"], "service_unavailable");
}

#[tokio::test(start_paused = true)]
async fn the_error_body_read_timeout_is_configurable() {
    let options = NormalizeOptions::new().error_body_timeout(Some(Duration::from_millis(250)));
    let svc = NormalizeErrorsLayer::with_options(options).layer(stalling_upstream(
        429,
        "text/plain",
        "Too Many Requests: slow",
    ));
    let start = tokio::time::Instant::now();
    let res = tokio::time::timeout(
        Duration::from_secs(600),
        svc.oneshot(Request::new(Full::default())),
    )
    .await
    .expect("the normalizer waited on a stalled error body")
    .unwrap();
    assert_eq!(start.elapsed(), Duration::from_millis(250));
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(res.headers()["retry-after"], "7");
}

#[tokio::test(start_paused = true)]
async fn without_a_read_timeout_a_stalled_error_body_is_waited_for() {
    // `None` is the documented opt-out: the read waits for the body.
    let options = NormalizeOptions::new().error_body_timeout(None);
    let svc = NormalizeErrorsLayer::with_options(options).layer(stalling_upstream(
        503,
        "text/plain",
        "x",
    ));
    let waited = tokio::time::timeout(
        Duration::from_secs(3600),
        svc.oneshot(Request::new(Full::default())),
    )
    .await;
    assert!(waited.is_err());
}

#[tokio::test]
async fn a_503_head_followed_by_a_stalled_body_over_real_http_answers_in_time() {
    let upstream = start_stalling_upstream(
        b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
          content-length: 4096\r\nretry-after: 3\r\n\r\n{\"error\":{\"message\":\"Upstream overloaded",
    )
    .await;
    let options = NormalizeOptions::new().error_body_timeout(Some(Duration::from_millis(200)));
    let gateway = start_gateway(
        upstream,
        NormalizeErrorsLayer::with_options(options).layer(hyper_client()),
    )
    .await;
    let res = tokio::time::timeout(
        Duration::from_secs(30),
        reqwest::get(format!("http://{gateway}/v1/chat/completions")),
    )
    .await
    .expect("the gateway hung on a stalled error body")
    .unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(res.headers()["retry-after"], "3");
    assert_eq!(res.headers()["x-should-retry"], "true");
    let body = json_of(res).await;
    assert_eq!(body["error"]["code"], "service_unavailable");
}

// ---------- HEAD and bodiless answers ----------

#[tokio::test]
async fn head_on_a_get_route_is_a_200_not_an_empty_answer() {
    let (upstream, calls) = start_models_upstream().await;
    for options in [
        NormalizeOptions::new(),
        NormalizeOptions::new().inspect_ok_json(true),
    ] {
        let gateway = start_gateway(
            upstream,
            NormalizeErrorsLayer::with_options(options).layer(hyper_client()),
        )
        .await;
        let res = reqwest::Client::new()
            .head(format!("http://{gateway}/v1/models"))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK, "{options:?}");
        assert!(res.headers().get("x-should-retry").is_none());
        assert_eq!(res.headers()["content-type"], "application/json");
        assert_eq!(
            res.headers()["content-length"],
            MODELS.len().to_string().as_str()
        );
        assert!(res.bytes().await.unwrap().is_empty());
    }
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 2);
    // GET on the same route still works, and an empty GET 200 is still an error.
    let res = through_gateway("fixture/DS-07").await;
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn head_through_retry_and_breaker_is_one_upstream_call_and_a_200() {
    use llm_layers::breaker::{CircuitBreakerLayer, CircuitState, SINGLE_KEY};
    use llm_layers::retry::RetryLayer;
    let (upstream, calls) = start_models_upstream().await;
    let breaker = CircuitBreakerLayer::builder()
        .name("upstream")
        .count_window(4)
        .minimum_calls(1)
        .failure_rate(50.0)
        .seed(3)
        .build()
        .unwrap();
    let handle = breaker.handle();
    let client = ServiceBuilder::new()
        .layer(RetryLayer::builder().seed(3).build().unwrap())
        .layer(breaker)
        // Retry and breaker each hand on a `LayerBody` of what they were given.
        .map_request(|r: Request<LayerBody<LayerBody<Full<Bytes>>>>| r.map(LayerBody::flatten))
        .layer(NormalizeErrorsLayer::new())
        .service(
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<LayerBody<Full<Bytes>>>(),
        );
    for _ in 0..3 {
        let res = client
            .clone()
            .oneshot(
                Request::head(format!("http://{upstream}/v1/models"))
                    .body(Full::default())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert!(res.extensions().get::<ApiError>().is_none());
    }
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 3);
    assert_ne!(handle.state(SINGLE_KEY), Some(CircuitState::Open));
}

#[tokio::test]
async fn bodiless_statuses_pass_untouched() {
    for (method, status) in [
        (http::Method::GET, 204),
        (http::Method::GET, 304),
        (http::Method::HEAD, 200),
        (http::Method::HEAD, 204),
    ] {
        let inner = tower::service_fn(move |_req: Request<Full<Bytes>>| {
            std::future::ready(Ok::<_, std::io::Error>(
                Response::builder()
                    .status(status)
                    .header("content-type", "application/json")
                    .header("content-length", "512")
                    .body(Full::<Bytes>::default())
                    .unwrap(),
            ))
        });
        for options in [
            NormalizeOptions::new(),
            NormalizeOptions::new().inspect_ok_json(true),
        ] {
            let res = NormalizeErrorsLayer::with_options(options)
                .layer(inner)
                .oneshot(
                    Request::builder()
                        .method(method.clone())
                        .body(Full::default())
                        .unwrap(),
                )
                .await
                .unwrap();
            assert_eq!(res.status().as_u16(), status, "{method} {status}");
            assert_eq!(res.headers()["content-length"], "512");
            assert!(res.extensions().get::<ApiError>().is_none());
        }
    }
}

// ---------- bounded SSE lines ----------

#[tokio::test]
async fn an_sse_stream_without_a_newline_passes_byte_for_byte() {
    const SIZE: usize = 8 * 1024 * 1024;
    let mut sent = b"data: ".to_vec();
    sent.resize(SIZE, b'x');
    // An error event after the overlong line is still rewritten.
    sent.extend_from_slice(
        b"\ndata: {\"error\":{\"message\":\"Overloaded\",\"type\":\"server_error\"}}\n\n",
    );
    let sent = Bytes::from(sent);
    let body = sent.clone();
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        axum::routing::post(move || {
            let body = body.clone();
            async move {
                let frames: Vec<Result<Bytes, std::io::Error>> = body
                    .chunks(61_440)
                    .map(|c| Ok(Bytes::copy_from_slice(c)))
                    .collect();
                Response::builder()
                    .header("content-type", "text/event-stream")
                    .body(axum::body::Body::from_stream(futures_util::stream::iter(
                        frames,
                    )))
                    .unwrap()
            }
        }),
    );
    let upstream = serve(app).await;
    let gateway = start_gateway(upstream, normalized_client()).await;
    let res = reqwest::Client::new()
        .post(format!("http://{gateway}/v1/chat/completions"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let got = res.bytes().await.unwrap();
    let line_end = SIZE + 1;
    assert!(got.len() > line_end);
    assert!(
        got[..line_end] == sent[..line_end],
        "the overlong line changed"
    );
    let rest = std::str::from_utf8(&got[line_end..]).unwrap();
    let event: Value =
        serde_json::from_str(rest.trim_end().strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(event["error"]["code"], "service_unavailable");
}

// ---------- 200 JSON inspection ----------

#[tokio::test]
async fn a_responses_object_with_error_null_passes_byte_for_byte() {
    for size in [2 * 1024, 3 * 1024 * 1024] {
        let sent = responses_object(size);
        let body = sent.clone();
        let app = axum::Router::new().route(
            "/v1/responses",
            axum::routing::post(move || {
                let body = body.clone();
                async move {
                    Response::builder()
                        .header("content-type", "application/json")
                        .body(axum::body::Body::from(body))
                        .unwrap()
                }
            }),
        );
        let upstream = serve(app).await;
        let gateway = start_gateway(
            upstream,
            NormalizeErrorsLayer::with_options(NormalizeOptions::new().inspect_ok_json(true))
                .layer(hyper_client()),
        )
        .await;
        let res = reqwest::Client::new()
            .post(format!("http://{gateway}/v1/responses"))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        let got = res.bytes().await.unwrap();
        assert_eq!(got.len(), sent.len(), "{size}");
        assert!(got == sent.as_bytes(), "{size}: the body changed");
    }
}

#[tokio::test(start_paused = true)]
async fn a_responses_object_is_handed_on_at_its_first_frame() {
    // The object's first frame is in; the rest is slow. Its head must not wait for the rest.
    let first: &'static str = r#"{"id":"resp_1","object":"response","created_at":1741476542,"status":"in_progress","error":null,"output":["#;
    let inner = stalling_upstream(200, "application/json", first);
    let svc = NormalizeErrorsLayer::with_options(NormalizeOptions::new().inspect_ok_json(true))
        .layer(inner);
    let res = tokio::time::timeout(
        Duration::from_millis(10),
        svc.oneshot(Request::new(Full::default())),
    )
    .await
    .expect("the head waited for the whole body")
    .unwrap();
    assert_eq!(res.status(), 200);
    let mut body = res.into_body();
    let frame = body.frame().await.unwrap().unwrap();
    assert_eq!(frame.into_data().unwrap(), first.as_bytes());
}

#[tokio::test]
async fn a_suspect_200_over_the_limit_passes_byte_for_byte_with_its_trailers() {
    // Opens like an error object, but it is far larger than the read limit: handed on as it
    // came, every frame and the trailers.
    let mut frames = vec![Bytes::from_static(b"{\"error\":{\"message\":\"")];
    for i in 0..64u8 {
        frames.push(Bytes::from(vec![b'a' + i % 26; 32 * 1024]));
    }
    frames.push(Bytes::from_static(b"\"},\"id\":\"x\"}"));
    let sent: Vec<u8> = frames.concat();
    let app_frames = frames.clone();
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        axum::routing::post(move || {
            let frames = app_frames.clone();
            async move {
                Response::builder()
                    .header("content-type", "application/json")
                    .header("trailer", "x-checksum")
                    .body(with_trailer(frames, "abc123"))
                    .unwrap()
            }
        }),
    );
    let upstream = serve(app).await;
    let options = NormalizeOptions::new()
        .inspect_ok_json(true)
        .body_limit(256 * 1024);
    let client = NormalizeErrorsLayer::with_options(options).layer(hyper_client());
    let res = client
        .oneshot(
            Request::post(format!("http://{upstream}/v1/chat/completions"))
                // The upstream sends trailers only to a client that says it takes them.
                .header("te", "trailers")
                .body(Full::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert!(res.extensions().get::<ApiError>().is_none());
    let mut body = res.into_body();
    let mut got = Vec::new();
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        match frame.unwrap().into_data() {
            Ok(data) => {
                assert!(trailers.is_none(), "data after the trailers");
                got.extend_from_slice(&data);
            }
            Err(frame) => trailers = Some(frame.into_trailers().unwrap()),
        }
    }
    assert_eq!(got.len(), sent.len());
    assert!(got == sent, "the body changed");
    assert_eq!(
        trailers.expect("the trailers were lost")["x-checksum"],
        "abc123"
    );
}

#[tokio::test]
async fn inspection_keeps_trailers_and_frames_of_a_normal_200() {
    let mut trailers = http::HeaderMap::new();
    trailers.insert("x-checksum", http::HeaderValue::from_static("abc"));
    let frames = [
        http_body::Frame::data(Bytes::from_static(b" ")),
        http_body::Frame::data(Bytes::from_static(b"{\"err")),
        http_body::Frame::data(Bytes::from_static(b"or\":null,\"id\":\"1\"}")),
        http_body::Frame::trailers(trailers),
    ];
    let sent = frames
        .iter()
        .filter_map(|f| f.data_ref().cloned())
        .fold(Vec::new(), |mut v, d| {
            v.extend_from_slice(&d);
            v
        });
    let inner = tower::service_fn(move |_req: Request<Full<Bytes>>| {
        let frames: Vec<Result<_, std::io::Error>> = frames
            .iter()
            .map(|f| {
                Ok(match f.data_ref() {
                    Some(d) => http_body::Frame::data(d.clone()),
                    None => http_body::Frame::trailers(f.trailers_ref().unwrap().clone()),
                })
            })
            .collect();
        std::future::ready(Ok::<_, std::io::Error>(
            Response::builder()
                .header("content-type", "application/json")
                .body(StreamBody::new(futures_util::stream::iter(frames)))
                .unwrap(),
        ))
    });
    let res = NormalizeErrorsLayer::with_options(NormalizeOptions::new().inspect_ok_json(true))
        .layer(inner)
        .oneshot(Request::new(Full::default()))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let mut body = res.into_body();
    let mut got = Vec::new();
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        match frame.unwrap().into_data() {
            Ok(data) => got.extend_from_slice(&data),
            Err(frame) => trailers = Some(frame.into_trailers().unwrap()),
        }
    }
    assert_eq!(got, sent);
    assert_eq!(trailers.unwrap()["x-checksum"], "abc");
}

#[tokio::test(start_paused = true)]
async fn a_suspect_200_that_stalls_is_handed_on_after_the_read_timeout() {
    // Opens like an error object, then nothing more: the head goes out when the read timeout
    // fires, with the bytes read so far, and the body goes on as the upstream sends it.
    let first: &'static str = r#"{"error":{"message":"Rate limit reached for requests","#;
    let svc = NormalizeErrorsLayer::with_options(NormalizeOptions::new().inspect_ok_json(true))
        .layer(stalling_upstream(200, "application/json", first));
    let start = tokio::time::Instant::now();
    let res = tokio::time::timeout(
        Duration::from_secs(600),
        svc.oneshot(Request::new(Full::default())),
    )
    .await
    .expect("the head waited on a stalled 200 body")
    .unwrap();
    assert_eq!(
        start.elapsed(),
        llm_layers::normalize::DEFAULT_ERROR_BODY_TIMEOUT
    );
    assert_eq!(res.status(), 200);
    let mut body = res.into_body();
    let frame = body.frame().await.unwrap().unwrap();
    assert_eq!(frame.into_data().unwrap(), first.as_bytes());
}

#[tokio::test]
async fn a_suspect_200_that_breaks_off_is_a_502_envelope() {
    let inner = tower::service_fn(|_req: Request<Full<Bytes>>| {
        let frames: Vec<FrameResult> = vec![
            Ok(http_body::Frame::data(Bytes::from_static(
                b"{\"error\":{\"mess",
            ))),
            Err(std::io::Error::other("connection reset")),
        ];
        std::future::ready(Ok::<_, std::io::Error>(
            Response::builder()
                .header("content-type", "application/json")
                .body(StreamBody::new(futures_util::stream::iter(frames)))
                .unwrap(),
        ))
    });
    let res = NormalizeErrorsLayer::with_options(NormalizeOptions::new().inspect_ok_json(true))
        .layer(inner)
        .oneshot(Request::new(Full::default()))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(res.headers()["x-should-retry"], "true");
    let body = res.into_body().collect().await.unwrap().to_bytes();
    let json: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["error"]["code"], "service_unavailable");
    assert_eq!(
        json["error"]["message"],
        "The upstream's answer broke off before it finished."
    );
}

// ---------- SSE framing under any chunking ----------

/// Runs `chunks` as a `200` event stream through the layer, in process; returns the bytes.
fn through_layer(chunks: Vec<Bytes>, options: NormalizeOptions) -> Vec<u8> {
    use futures_util::FutureExt;
    let inner = tower::service_fn(move |_req: Request<Full<Bytes>>| {
        let frames: Vec<FrameResult> = chunks
            .iter()
            .map(|c| Ok(http_body::Frame::data(c.clone())))
            .collect();
        std::future::ready(Ok::<_, std::io::Error>(
            Response::builder()
                .header("content-type", "text/event-stream")
                .body(StreamBody::new(futures_util::stream::iter(frames)))
                .unwrap(),
        ))
    });
    let res = NormalizeErrorsLayer::with_options(options)
        .layer(inner)
        .oneshot(Request::new(Full::default()))
        .now_or_never()
        .unwrap()
        .unwrap();
    let body = res.into_body().collect().now_or_never().unwrap().unwrap();
    body.to_bytes().to_vec()
}

fn split_at(data: &[u8], cuts: &[usize]) -> Vec<Bytes> {
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (data.len() + 1)).collect();
    cuts.sort_unstable();
    let mut out = Vec::new();
    let mut start = 0;
    for c in cuts.into_iter().chain([data.len()]) {
        out.push(Bytes::copy_from_slice(&data[start..c]));
        start = c;
    }
    out
}

const CLEAN_LINES: [&str; 7] = [
    "event: message_start",
    "data: {\"id\":\"c1\",\"choices\":[{\"delta\":{\"content\":\"an error\"}}]}",
    "data: {\"type\":\"response.created\",\"response\":{\"error\":null}}",
    ": keep-alive",
    "id: 7",
    "",
    "data: [DONE]",
];

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

    #[test]
    fn a_clean_stream_is_byte_identical_under_any_chunking_and_line_endings(
        lines in proptest::collection::vec((0..CLEAN_LINES.len(), 0..3usize), 1..24),
        cuts in proptest::collection::vec(0..4096usize, 0..12),
        limit in proptest::prop_oneof![proptest::strategy::Just(64 * 1024), 0..96usize],
    ) {
        let mut sent = Vec::new();
        for (line, ending) in lines {
            sent.extend_from_slice(CLEAN_LINES[line].as_bytes());
            sent.extend_from_slice([&b"\n"[..], b"\r\n", b"\r"][ending]);
        }
        let options = NormalizeOptions::new().sse_line_limit(limit);
        let got = through_layer(split_at(&sent, &cuts), options);
        proptest::prop_assert_eq!(got, sent);
    }

    #[test]
    fn an_error_event_is_rewritten_the_same_under_any_chunking(
        before in proptest::collection::vec(0..CLEAN_LINES.len(), 0..6),
        ending in 0..3usize,
        cuts in proptest::collection::vec(0..1024usize, 0..8),
    ) {
        let end = [&b"\n"[..], b"\r\n", b"\r"][ending];
        let mut sent = Vec::new();
        for line in before {
            sent.extend_from_slice(CLEAN_LINES[line].as_bytes());
            sent.extend_from_slice(end);
        }
        sent.extend_from_slice(
            b"data: {\"error\":{\"message\":\"Overloaded\",\"type\":\"server_error\"}}",
        );
        sent.extend_from_slice(end);
        sent.extend_from_slice(end);
        let whole = through_layer(vec![Bytes::from(sent.clone())], NormalizeOptions::new());
        proptest::prop_assert!(
            std::str::from_utf8(&whole).unwrap().contains("\"code\":\"service_unavailable\"")
        );
        let got = through_layer(split_at(&sent, &cuts), NormalizeOptions::new());
        proptest::prop_assert_eq!(got, whole);
    }
}

#[tokio::test]
async fn a_200_that_breaks_off_before_its_first_byte_is_a_502_envelope() {
    let inner = tower::service_fn(|_req: Request<Full<Bytes>>| {
        let frames: Vec<FrameResult> = vec![Err(std::io::Error::other("connection reset"))];
        std::future::ready(Ok::<_, std::io::Error>(
            Response::builder()
                .header("content-type", "application/json")
                .body(StreamBody::new(futures_util::stream::iter(frames)))
                .unwrap(),
        ))
    });
    let res = NormalizeErrorsLayer::with_options(NormalizeOptions::new().inspect_ok_json(true))
        .layer(inner)
        .oneshot(Request::new(Full::default()))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::BAD_GATEWAY);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    let json: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["error"]["code"], "service_unavailable");
    assert_eq!(
        json["error"]["message"],
        "The upstream's answer broke off before its first byte."
    );
}

/// A stub upstream with answers that only an application's own rules read right.
async fn start_rules_upstream() -> std::net::SocketAddr {
    use axum::routing::any;
    fn json(status: u16, body: &'static str) -> axum::response::Response {
        Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .header("x-request-id", "req_rules")
            .body(axum::body::Body::from(body))
            .unwrap()
    }
    let app = axum::Router::new()
        .route(
            "/teapot",
            any(|| async {
                json(
                    418,
                    r#"{"error":{"message":"I'm a teapot","type":"teapot","code":"E_TEAPOT"}}"#,
                )
            }),
        )
        .route(
            "/balance",
            any(|| async {
                json(
                    400,
                    r#"{"error":{"message":"Account balance too low","type":"billing","code":"E_BALANCE"}}"#,
                )
            }),
        )
        .route(
            "/slots",
            any(|| async {
                json(
                    500,
                    r#"{"error":{"message":"All slots are busy, try later","type":"server","code":"E_SLOTS"}}"#,
                )
            }),
        )
        .route(
            "/sse-balance",
            any(|| async {
                Response::builder()
                    .header("content-type", "text/event-stream")
                    .body(axum::body::Body::from(concat!(
                        "data: {\"id\":\"chatcmpl-1\",\"choices\":[]}\n\n",
                        "data: {\"error\":{\"message\":\"Account balance too low\",\"type\":\"billing\",\"code\":\"E_BALANCE\"}}\n\n",
                    )))
                    .unwrap()
            }),
        );
    serve(app).await
}

fn app_classifier() -> llm_layers::classify::Classifier {
    use llm_layers::classify::{Classifier, Rule};
    Classifier::new()
        .rule(Rule::to(ErrorCode::ServiceUnavailable).status(418))
        .rule(Rule::to(ErrorCode::InsufficientQuota).code("E_BALANCE"))
        .rule(Rule::to(ErrorCode::ConcurrentLimitExceeded).message("slots are busy"))
}

/// Status, headers (without `date`) and body of `GET path` on `gateway`.
async fn answer_of(
    gateway: std::net::SocketAddr,
    path: &str,
) -> (StatusCode, Vec<(String, String)>, Bytes) {
    let res = reqwest::get(format!("http://{gateway}/{path}"))
        .await
        .unwrap();
    let status = StatusCode::from_u16(res.status().as_u16()).unwrap();
    let mut headers: Vec<(String, String)> = res
        .headers()
        .iter()
        .filter(|(k, _)| k.as_str() != "date")
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_owned()))
        .collect();
    headers.sort();
    (status, headers, res.bytes().await.unwrap())
}

/// The envelope an in-band error event became in a stream.
fn sse_error_of(text: &str) -> Value {
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .find(|v| v["error"].is_object())
        .unwrap_or_else(|| panic!("no error event in {text:?}"))
}

#[tokio::test]
async fn application_rules_change_the_envelope_code_and_status_through_http() {
    let upstream = start_rules_upstream().await;
    let plain = start_gateway(upstream, normalized_client()).await;
    let ruled = start_gateway(
        upstream,
        NormalizeErrorsLayer::new()
            .classifier(app_classifier())
            .layer(hyper_client()),
    )
    .await;
    for (path, code) in [
        ("teapot", ErrorCode::ServiceUnavailable),
        ("balance", ErrorCode::InsufficientQuota),
        ("slots", ErrorCode::ConcurrentLimitExceeded),
    ] {
        let (status, _, body) = answer_of(plain, path).await;
        let plain_json: Value = serde_json::from_slice(&body).unwrap();
        assert_ne!(
            plain_json["error"]["code"],
            code.as_str(),
            "{path}: built-in already says so"
        );
        assert_ne!(status, code.status(), "{path}");

        let res = reqwest::get(format!("http://{ruled}/{path}"))
            .await
            .unwrap();
        assert_eq!(res.status().as_u16(), code.status().as_u16(), "{path}");
        assert_eq!(res.headers()["x-request-id"], "req_rules", "{path}");
        let json = json_of(res).await;
        assert_eq!(json["error"]["code"], code.as_str(), "{path}");
        // The rule changes what the error is, not what is known about it.
        assert_eq!(
            json["error"]["message"], plain_json["error"]["message"],
            "{path}"
        );
        assert!(json["error"].get("upstream").is_none(), "{path}");
    }
    let (status, _, _) = answer_of(ruled, "teapot").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let (status, _, _) = answer_of(ruled, "balance").await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
}

#[tokio::test]
async fn an_application_rule_applies_to_an_in_band_sse_error() {
    let upstream = start_rules_upstream().await;
    let plain = start_gateway(upstream, normalized_client()).await;
    let ruled = start_gateway(
        upstream,
        NormalizeErrorsLayer::new()
            .classifier(app_classifier())
            .layer(hyper_client()),
    )
    .await;
    let (status, _, body) = answer_of(plain, "sse-balance").await;
    assert_eq!(status, StatusCode::OK);
    let before = sse_error_of(std::str::from_utf8(&body).unwrap());
    assert_ne!(before["error"]["code"], "insufficient_quota");

    let (status, headers, body) = answer_of(ruled, "sse-balance").await;
    assert_eq!(status, StatusCode::OK);
    assert!(headers
        .iter()
        .any(|(k, v)| k == "content-type" && v == "text/event-stream"));
    let text = std::str::from_utf8(&body).unwrap();
    // The chunk before the error passes unchanged.
    assert!(
        text.starts_with("data: {\"id\":\"chatcmpl-1\",\"choices\":[]}\n\n"),
        "{text}"
    );
    let after = sse_error_of(text);
    assert_eq!(after["error"]["code"], "insufficient_quota");
    assert_eq!(after["error"]["type"], "insufficient_quota");
    assert_eq!(after["error"]["message"], before["error"]["message"]);
}

#[tokio::test]
async fn with_no_rules_the_output_is_exactly_as_before() {
    use llm_layers::classify::{Classifier, Rule};
    let upstream = start_rules_upstream().await;
    let plain = start_gateway(upstream, normalized_client()).await;
    let empty = start_gateway(
        upstream,
        NormalizeErrorsLayer::new()
            .classifier(Classifier::new())
            .layer(hyper_client()),
    )
    .await;
    // Rules that match none of these answers.
    let unmatched = start_gateway(
        upstream,
        NormalizeErrorsLayer::new()
            .classifier(
                Classifier::new()
                    .rule(Rule::to(ErrorCode::Timeout).status(599))
                    .rule(Rule::to(ErrorCode::Timeout).code("E_NOTHING"))
                    .rule_fn(|_| None),
            )
            .layer(hyper_client()),
    )
    .await;
    for path in ["teapot", "balance", "slots", "sse-balance", "missing"] {
        let want = answer_of(plain, path).await;
        assert_eq!(answer_of(empty, path).await, want, "{path}");
        assert_eq!(answer_of(unmatched, path).await, want, "{path}");
    }
}

#[tokio::test]
async fn expose_upstream_shows_the_upstreams_own_code_type_and_message() {
    let upstream = start_rules_upstream().await;
    let exposing = start_gateway(
        upstream,
        NormalizeErrorsLayer::with_options(NormalizeOptions::new().expose_upstream(true))
            .classifier(app_classifier())
            .layer(hyper_client()),
    )
    .await;
    let want = serde_json::json!({
        "code": "E_BALANCE",
        "type": "billing",
        "message": "Account balance too low",
    });
    let res = reqwest::get(format!("http://{exposing}/balance"))
        .await
        .unwrap();
    assert_eq!(res.status(), 429);
    let json = json_of(res).await;
    assert_eq!(json["error"]["code"], "insufficient_quota");
    assert_eq!(json["error"]["upstream"], want);

    let (_, _, body) = answer_of(exposing, "sse-balance").await;
    let event = sse_error_of(std::str::from_utf8(&body).unwrap());
    assert_eq!(event["error"]["code"], "insufficient_quota");
    assert_eq!(event["error"]["upstream"], want);

    // Off by default: the same answers without the upstream's words.
    let plain = start_gateway(upstream, normalized_client()).await;
    let (_, _, body) = answer_of(plain, "balance").await;
    let json: Value = serde_json::from_slice(&body).unwrap();
    assert!(json["error"].get("upstream").is_none(), "{json}");
    let (_, _, body) = answer_of(plain, "sse-balance").await;
    let event = sse_error_of(std::str::from_utf8(&body).unwrap());
    assert!(event["error"].get("upstream").is_none(), "{event}");
}

// ---------- errors of any type, readiness errors passed on ----------

#[tokio::test(start_paused = true)]
async fn over_tower_timeout_a_slow_upstream_is_a_504_timeout_envelope() {
    let slow = tower::service_fn(|_req: Request<Full<Bytes>>| async {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        Ok::<_, std::io::Error>(Response::new(Full::new(Bytes::from_static(b"late"))))
    });
    let svc = ServiceBuilder::new()
        .layer(NormalizeErrorsLayer::new())
        .layer(tower::timeout::TimeoutLayer::new(Duration::from_secs(2)))
        .service(slow);
    let t0 = tokio::time::Instant::now();
    // The layer's error type is the inner one: `BoxError` over a `Timeout`.
    let res: Result<_, llm_layers::body::BoxError> =
        svc.oneshot(Request::new(Full::default())).await;
    let res = res.unwrap();
    assert_eq!(t0.elapsed(), Duration::from_secs(2));
    assert_eq!(res.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(
        res.extensions().get::<ApiError>().unwrap().code(),
        ErrorCode::Timeout
    );
    let body = res.into_body().collect().await.unwrap().to_bytes();
    let json: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["error"]["code"], "timeout");
}

/// Fails `poll_ready` with its own error; counts the polls; panics when called.
#[derive(Clone, Default)]
struct NeverReady {
    polls: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl tower::Service<Request<Full<Bytes>>> for NeverReady {
    type Response = Response<Full<Bytes>>;
    type Error = std::io::Error;
    type Future = std::future::Ready<Result<Response<Full<Bytes>>, std::io::Error>>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.polls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        std::task::Poll::Ready(Err(std::io::Error::new(
            std::io::ErrorKind::BrokenPipe,
            "worker gone",
        )))
    }

    fn call(&mut self, _req: Request<Full<Bytes>>) -> Self::Future {
        panic!("a service whose poll_ready failed was called")
    }
}

#[tokio::test]
async fn a_poll_ready_error_is_passed_on_unchanged() {
    let inner = NeverReady::default();
    let mut svc = NormalizeErrorsLayer::new().layer(inner.clone());
    let err = match svc.ready().await {
        Ok(_) => panic!("a failed readiness became ready"),
        Err(e) => e,
    };
    // The inner error itself, not an envelope and not a copy of another type.
    assert_eq!(err.kind(), std::io::ErrorKind::BrokenPipe);
    assert_eq!(err.to_string(), "worker gone");
    assert_eq!(inner.polls.load(std::sync::atomic::Ordering::SeqCst), 1);
    // `oneshot` sees the same error and never calls the service.
    let err = NormalizeErrorsLayer::new()
        .layer(NeverReady::default())
        .oneshot(Request::new(Full::default()))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::BrokenPipe);
}

#[tokio::test]
async fn an_infallible_inner_service_keeps_the_layer_infallible() {
    let inner = tower::service_fn(|_req: Request<Full<Bytes>>| async {
        Ok::<_, std::convert::Infallible>(
            Response::builder()
                .status(503)
                .body(Full::default())
                .unwrap(),
        )
    });
    let res: Result<_, std::convert::Infallible> = NormalizeErrorsLayer::new()
        .layer(inner)
        .oneshot(Request::new(Full::default()))
        .await;
    let Ok(res) = res;
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
}
