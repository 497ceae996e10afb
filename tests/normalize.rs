//! The normalizer through real HTTP: a stub upstream, a hyper client wrapped by the layer, an
//! axum gateway in front, and reqwest as the caller.

mod common_normalize;

use std::time::Duration;

use bytes::Bytes;
use common_normalize::*;
use futures_util::StreamExt;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
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
