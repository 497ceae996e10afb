//! Request validation: refuse a malformed LLM request at the edge, with the error the client
//! would have got from the provider, before it costs a round trip, a rate-limit token or money.
//!
//! Clients send requests the provider will refuse: a `temperature` of `"hot"`, a message with
//! role `"bot"`, `messages` posted to the legacy `/v1/completions`, a prompt longer than the
//! model's context window, a model the gateway does not serve. Validating at the edge answers
//! them at once, in the same OpenAI-style envelope, and keeps them from reaching the layers
//! behind (rate limits, breakers, retries) and the upstream.
//!
//! [`ValidateRequestLayer`] checks `POST` requests to `/v1/chat/completions`,
//! `/v1/completions`, `/v1/embeddings` and `/v1/responses` (matched on the end of the path, so
//! prefixes and Azure-style deployment paths work). The path is matched as an upstream that
//! decodes paths routes it ([`normalize_path`](crate::request::normalize_path)):
//! `/v1/chat/%63ompletions` and `/v1/models/../chat/completions` are validated as chat
//! completions. Every other request (`GET /v1/models`, say) passes through untouched and
//! unbuffered. The body is read once, at most [`body_limit`](ValidateBuilder::body_limit)
//! bytes, through the crate's one buffering future ([`EnsureView`](crate::request::EnsureView)),
//! parsed into a [`RequestView`](crate::request::RequestView) that is stored in the request
//! extensions for later layers, and handed on byte for byte. Unknown fields pass untouched.
//!
//! # Rules
//!
//! * **One typed pass, no tree.** The view is a typed parse that reads only the fields layers
//!   use; when this layer parses the body, the fields its checks read (each parameter's JSON
//!   kind and number, each chat message's role and content kind) are gathered in that same
//!   pass, so the body is read once. A view an earlier layer parsed is checked from the bytes
//!   it keeps ([`RequestView::bytes`](crate::request::RequestView::bytes), the same buffer the
//!   request is handed on with), with a typed parse of the checks' fields alone. No
//!   `serde_json::Value` of the body is built, and no second copy of it is kept. A body broken
//!   only in a field the checks read (a number beyond `f64` in `temperature`) is refused with
//!   the same error either way.
//! * **Any body, one body type back.** The layer takes any request body
//!   ([`http_body::Body`]: hyper's `Incoming`, axum's `Body`, `Full`), and hands the inner
//!   service a [`LayerBody`](crate::body::LayerBody): the body untouched when the layer did not
//!   read it, the bytes it read otherwise. Its own rejections and the inner service's answers
//!   come back as [`LayerBody`](crate::body::LayerBody) too. The inner error type is kept.
//! * **Readiness is not held while the body arrives.** [`Validate`] is always ready; each call
//!   reads and checks the body first, then drives a fresh clone of the inner service to
//!   readiness and calls it. Behind a concurrency limit, a client that uploads slowly holds no
//!   slot while it uploads. A `poll_ready` error of the inner service is the call's error, and
//!   that service is not polled again. A refused request never touches the inner service.
//! * **The body limit holds whoever parsed first.** A view an earlier layer stored (the auth
//!   layer, for a key restricted to some models) is reused without reading the body again; the
//!   request is still refused `413` when its `content-length`, the body's known size, or the
//!   length the view recorded
//!   ([`RequestView::body_len`](crate::request::RequestView::body_len)) is over this layer's
//!   limit. A stored view that kept no body ([`RequestView::parse`](crate::request::RequestView::parse)
//!   on a slice) is reused too; the body is then read here for the checks of its fields.
//! * **Every model the upstream may use is checked** against
//!   [`allowed_models`](ValidateBuilder::allowed_models): the Azure-style deployment the path
//!   names (`/openai/deployments/{name}/...`, which the upstream serves whatever the body says),
//!   the body's `model`, and each of an OpenRouter-style `models` array
//!   ([`RequestView::models`](crate::request::RequestView::models)). The first one not allowed
//!   is refused, with `param` `model` (deployment or `model`) or `models`. A stored view built
//!   without the path is checked (and handed on) with the path's deployment. A request to a
//!   deployment path needs no body `model`; the context window is the routed model's
//!   ([`routed_model`](crate::request::RequestView::routed_model)).
//!
//! | failure | status | `code` | `param` |
//! |---|---|---|---|
//! | `content-type` missing or not `application/json` (parameters allowed) | 400 | `invalid_value` | null |
//! | body longer than the limit | 413 | `request_too_large` | null |
//! | body not JSON, or not an object (message gives line and column) | 400 | `invalid_value` | null |
//! | `messages` sent to `/v1/completions`, `prompt` to `/v1/chat/completions` | 400 | `invalid_value` | `messages` / `prompt` |
//! | no `model` (unless the path names a deployment); no `messages` (chat), `prompt` (completions), `input` (embeddings, responses) | 400 | `missing_required_field` | the field |
//! | `temperature` ∉ [0, 2], `top_p` ∉ [0, 1], `presence_penalty`/`frequency_penalty` ∉ [−2, 2], `n` < 1, `max_tokens`/`max_completion_tokens`/`max_output_tokens` < 1, a wrong JSON type (`"stream":"yes"`, `messages` not an array) | 400 | `invalid_value` | the field |
//! | a chat message that is not an object, has a role outside `system`, `user`, `assistant`, `tool`, `developer`, `function`, lacks `content` (an assistant message may omit it when it has `tool_calls`), or a `tool` message without `tool_call_id` | 400 | `invalid_value` | `messages[3].role`, `messages[3].content`, ... |
//! | `models` not a list of non-empty strings (with the parameter checks or an allow-list) | 400 | `invalid_value` | `models` |
//! | a model outside [`allowed_models`](ValidateBuilder::allowed_models): the path's deployment, `model`, or one of `models` (the message lists the accepted ones) | 400 | `model_not_supported` | `model` / `models` |
//! | estimated prompt tokens plus `max_tokens` beyond the model's context window | 400 | `context_length_exceeded` | `messages` / `prompt` / `input` |
//!
//! Each check can be switched off on the [`ValidateBuilder`]. Rules of your own
//! ([`ValidationRule`], or a closure, added with [`rule`](ValidateBuilder::rule)) run after the
//! built-in checks, in the order added, on the same requests, and see the request head (with
//! the view) and the body bytes; one that fails answers with its
//! [`ApiError`](crate::ApiError)'s envelope. The prompt size is an estimate
//! from a [`TokenEstimator`](crate::request::TokenEstimator): by default the fast
//! [`CharEstimator`](crate::request::CharEstimator) (one token per CJK character, about four
//! Latin characters per token); with the `tiktoken` feature, the exact
//! `TiktokenEstimator` in [`crate::request`] for OpenAI models. Context windows
//! come from [`DEFAULT_CONTEXT_WINDOWS`] and [`context_window`](ValidateBuilder::context_window).
//!
//! # Example
//!
//! ```
//! use axum::{body::Body, routing::post, Router};
//! use http::{Request, StatusCode};
//! use llm_layers::validate::ValidateRequestLayer;
//! use tower::ServiceExt;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let validate = ValidateRequestLayer::builder()
//!     .allowed_models(["gpt-4o", "gpt-4o-mini"])
//!     .build()
//!     .expect("valid configuration");
//! let app = Router::new()
//!     .route("/v1/chat/completions", post(|| async { "upstream answer" }))
//!     .layer(validate);
//!
//! let request = |body: &'static str| {
//!     Request::post("/v1/chat/completions")
//!         .header("content-type", "application/json")
//!         .body(Body::from(body))
//!         .unwrap()
//! };
//!
//! let ok = app
//!     .clone()
//!     .oneshot(request(r#"{"model":"gpt-4o","messages":[{"role":"user","content":"Hi"}]}"#))
//!     .await
//!     .unwrap();
//! assert_eq!(ok.status(), StatusCode::OK);
//!
//! let bad = app
//!     .oneshot(request(r#"{"model":"gpt-4o","temperature":3,"messages":[{"role":"user","content":"Hi"}]}"#))
//!     .await
//!     .unwrap();
//! assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
//! let body = axum::body::to_bytes(bad.into_body(), 1 << 16).await.unwrap();
//! let envelope: serde_json::Value = serde_json::from_slice(&body).unwrap();
//! assert_eq!(envelope["error"]["code"], "invalid_value");
//! assert_eq!(envelope["error"]["param"], "temperature");
//! # }
//! ```

mod config;
mod future;
mod layer;
#[cfg(test)]
mod reference;
mod rule;
mod rules;
mod service;

pub use config::{
    ConfigError, ValidateBuilder, DEFAULT_CONTEXT_WINDOWS, DEFAULT_MAX_LISTED_MODELS,
};
pub use future::ResponseFuture;
pub use layer::ValidateRequestLayer;
pub use rule::ValidationRule;
pub use service::Validate;
