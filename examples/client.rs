//! A reqwest-middleware client built from llm-layers, talking to the gateway example.
//!
//! ```sh
//! cargo run --example gateway                                   # in one terminal
//! cargo run --example client --features reqwest                 # in another
//! LLM_API_KEY=sk-... cargo run --example client --features reqwest -- --base http://127.0.0.1:8080
//! ```
//!
//! The stack, outermost first: every failure as an `ApiError` → rate limit (waits, so the
//! client paces itself) → retry (honours `retry-after-ms`) → circuit breaker → key injection →
//! normalizer. It makes a normal request, a streaming request, a request the mock upstream
//! answers with `429` (retried after the hint) and one it answers with an HTML `403` page (a
//! typed `upstream_blocked` error, not retried).

use std::time::Duration;

use llm_layers::auth::{ApiKey, InjectApiKeyLayer};
use llm_layers::breaker::CircuitBreakerLayer;
use llm_layers::client::{ApiErrorExt, ApiErrorMiddleware, TowerMiddleware};
use llm_layers::normalize::NormalizeErrorsLayer;
use llm_layers::rate_limit::{Limits, OnLimit, Quota, RateLimitLayer};
use llm_layers::retry::RetryLayer;
use reqwest_middleware::{ClientBuilder, ClientWithMiddleware};

/// The full-access key of the gateway example's demo configuration.
const DEMO_KEY: &str = "sk-demo-full-0123456789abcdef";

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn parse_base() -> Result<String, String> {
    let mut base = "http://127.0.0.1:8080".to_owned();
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        match flag.as_str() {
            "--base" => base = args.next().ok_or("--base needs a URL")?,
            "-h" | "--help" => {
                println!("usage: client [--base URL]   (key from LLM_API_KEY)");
                std::process::exit(0);
            }
            other => return Err(format!("unknown flag {other:?} (try --help)")),
        }
    }
    Ok(base.trim_end_matches('/').to_owned())
}

fn client(key: ApiKey) -> Result<ClientWithMiddleware, BoxError> {
    let rate_limit = RateLimitLayer::builder()
        .limits(Limits::new().requests(Quota::per_second(5).burst(5)))
        .mode(OnLimit::Wait(Duration::from_secs(10)))
        .build()?;
    let retry = RetryLayer::builder()
        .max_attempts(3)
        .on_retry(|event| {
            println!(
                "    attempt {} failed with {}; retrying in {} ms",
                event.attempt(),
                event.error().code(),
                event.delay().as_millis()
            );
        })
        .build()?;
    let breaker = CircuitBreakerLayer::builder()
        .name("gateway")
        .minimum_calls(5)
        .failure_rate(50.0)
        .open_duration(Duration::from_secs(30))
        .build()?;
    // Redirects to another origin are refused, so the key never goes there.
    let http = reqwest::Client::builder()
        .redirect(llm_layers::client::redirect_policy())
        .build()?;
    Ok(ClientBuilder::new(http)
        .with(ApiErrorMiddleware::new())
        .with(TowerMiddleware::new(rate_limit))
        .with(TowerMiddleware::new(retry))
        .with(TowerMiddleware::new(breaker))
        .with(TowerMiddleware::new(InjectApiKeyLayer::bearer(key)))
        .with(TowerMiddleware::new(NormalizeErrorsLayer::new()))
        .build())
}

fn chat(stream: bool) -> String {
    serde_json::json!({
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "Say hello."}],
        "stream": stream,
    })
    .to_string()
}

fn report(err: &reqwest_middleware::Error) {
    match err.api_error() {
        Some(api) => println!(
            "  -> error {} (status {}, retryable: {}, wait: {:?}): {}",
            api.code(),
            api.status().as_u16(),
            api.is_retryable(),
            api.retry_after(),
            api.message()
        ),
        None => println!("  -> error without an ApiError: {err}"),
    }
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let base = parse_base().map_err(|e| -> BoxError { e.into() })?;
    let key = match std::env::var("LLM_API_KEY") {
        Ok(k) => ApiKey::new(k)?,
        Err(_) => ApiKey::new(DEMO_KEY)?,
    };
    println!("key: {key:?}");
    let client = client(key)?;
    let url = format!("{base}/v1/chat/completions");

    println!("1. a normal request");
    match client
        .post(&url)
        .header("content-type", "application/json")
        .body(chat(false))
        .send()
        .await
    {
        Ok(res) => {
            let status = res.status();
            let body: serde_json::Value = res.json().await?;
            println!(
                "  -> {status}: {}",
                body["choices"][0]["message"]["content"]
            );
        }
        Err(e) => report(&e),
    }

    println!("2. a streaming request");
    match client
        .post(&url)
        .header("content-type", "application/json")
        .body(chat(true))
        .send()
        .await
    {
        Ok(mut res) => {
            println!(
                "  -> {} {:?}",
                res.status(),
                res.headers().get("content-type")
            );
            let mut n = 0;
            while let Some(chunk) = res.chunk().await? {
                n += 1;
                println!(
                    "    chunk {n}: {}",
                    String::from_utf8_lossy(&chunk).trim_end()
                );
            }
        }
        Err(e) => report(&e),
    }

    println!("3. an upstream that answers 429 with retry-after-ms");
    let res = client
        .post(&url)
        .header("content-type", "application/json")
        .header("x-mock-fault", "429")
        .body(chat(false))
        .send()
        .await;
    match res {
        Ok(res) => println!("  -> {}", res.status()),
        Err(e) => report(&e),
    }

    println!("4. an upstream behind a CDN that answers with an HTML block page");
    let res = client
        .post(&url)
        .header("content-type", "application/json")
        .header("x-mock-fault", "html403")
        .body(chat(false))
        .send()
        .await;
    match res {
        Ok(res) => println!("  -> {}", res.status()),
        Err(e) => report(&e),
    }
    Ok(())
}
