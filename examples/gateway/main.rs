//! An OpenAI-compatible gateway built from llm-layers.
//!
//! ```sh
//! cargo run --example gateway                      # embedded mock upstream, demo keys
//! UPSTREAM_API_KEY=sk-... cargo run --example gateway -- --listen 127.0.0.1:8080 \
//!     --upstream https://api.openai.com/v1 --config my-gateway.toml
//! ```
//!
//! Without `--upstream` the gateway starts an embedded mock upstream (OpenAI-compatible, with
//! fault injection through the `x-mock-fault` request header) and prints commands to try.
//! Without `--config` it uses `examples/gateway.toml`, compiled in. `--upstream-ca FILE` trusts
//! a private CA (PEM) for an `https://` upstream; `--forward-header NAME` forwards one more
//! client header (see `app.rs` for the default list and why).
//!
//! `--keys FILE` takes the API keys from a key file (the auth layer's `[[keys]]` format)
//! instead of the configuration's `[[keys]]`, and reloads it while the gateway runs: on
//! `SIGHUP` and when the file changes (read every second). A file that is refused (the field
//! is named on stdout) leaves the keys in force; requests in flight finish with the keys they
//! started with.
//!
//! With the feature `metrics` (`cargo run --example gateway --features metrics`), `GET /metrics`
//! answers the layers' metrics in the Prometheus text format (`metrics.rs`).

mod app;
#[cfg(feature = "metrics")]
mod metrics;
mod mock;

use std::net::SocketAddr;

use axum::http::{HeaderValue, Uri};
use llm_layers::auth::{InMemoryKeyStore, ReloadOptions, ReloadOutcome, ReloadableKeyStore};

/// The configuration used without `--config`.
const DEFAULT_CONFIG: &str = include_str!("../gateway.toml");

/// Command-line flags.
struct Args {
    listen: SocketAddr,
    upstream: Option<String>,
    config: Option<String>,
    upstream_ca: Option<String>,
    forward_headers: Vec<String>,
    keys: Option<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        listen: "127.0.0.1:8080".parse().unwrap(),
        upstream: None,
        config: None,
        upstream_ca: None,
        forward_headers: Vec::new(),
        keys: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        match flag.as_str() {
            "--listen" => {
                let v = value("--listen")?;
                args.listen = v.parse().map_err(|e| format!("--listen {v:?}: {e}"))?;
            }
            "--upstream" => args.upstream = Some(value("--upstream")?),
            "--config" => args.config = Some(value("--config")?),
            "--upstream-ca" => args.upstream_ca = Some(value("--upstream-ca")?),
            "--forward-header" => args.forward_headers.push(value("--forward-header")?),
            "--keys" => args.keys = Some(value("--keys")?),
            "-h" | "--help" => {
                println!(
                    "usage: gateway [--listen ADDR] [--upstream URL] [--config FILE] \
                     [--upstream-ca PEM] [--forward-header NAME]... [--keys FILE]"
                );
                println!(
                    "  --keys FILE: API keys from FILE, reloaded on SIGHUP and when it changes"
                );
                println!("  the upstream key is read from UPSTREAM_API_KEY");
                std::process::exit(0);
            }
            other => return Err(format!("unknown flag {other:?} (try --help)")),
        }
    }
    Ok(args)
}

fn fail(message: impl std::fmt::Display) -> ! {
    eprintln!("gateway: {message}");
    std::process::exit(2);
}

/// Prints the demo keys of the configuration and, for the built-in demo keys, commands that
/// show each layer answering.
fn print_demo(config: &str, addr: SocketAddr, commands: bool) {
    let Ok(doc) = config.parse::<toml::Table>() else {
        return;
    };
    let keys = doc.get("keys").and_then(|k| k.as_array());
    println!("demo keys:");
    for key in keys.into_iter().flatten() {
        let field = |name: &str| key.get(name).map(|v| v.to_string());
        let (Some(id), Some(secret)) = (
            key.get("id").and_then(|v| v.as_str()),
            key.get("secret").and_then(|v| v.as_str()),
        ) else {
            continue;
        };
        let mut notes = Vec::new();
        if let Some(m) = field("models") {
            notes.push(format!("models {m}"));
        }
        if let Some(at) = field("expires_at") {
            notes.push(format!("expires {at}"));
        }
        if key.get("revoked").and_then(|v| v.as_bool()) == Some(true) {
            notes.push("revoked".to_owned());
        }
        if let Some(t) = field("tier") {
            notes.push(format!("tier {t}"));
        }
        if let Some(r) = field("rpm") {
            notes.push(format!("{r} requests/min"));
        }
        println!("  {id:<14} {secret}  {}", notes.join(", "));
    }
    let url = format!("http://{addr}");
    let chat = |key: &str, extra: &str, body: &str| {
        format!(
            "curl -s {url}/v1/chat/completions -H 'authorization: Bearer {key}' -H 'content-type: application/json'{extra} -d '{body}'"
        )
    };
    let hello = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;
    if !commands {
        return;
    }
    println!("try:");
    println!("  {}", chat("sk-demo-full-0123456789abcdef", "", hello));
    println!(
        "  {}   # 401",
        chat("sk-demo-expired-0123456789ab", "", hello)
    );
    println!(
        "  {}   # 403",
        chat(
            "sk-demo-mini-0123456789abcdef",
            "",
            r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#
        )
    );
    println!(
        "  {}   # 400",
        chat(
            "sk-demo-full-0123456789abcdef",
            "",
            r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],"temperature":3}"#
        )
    );
    println!(
        "  {}   # 429 on the third",
        chat("sk-demo-free-0123456789abcdef", "", hello)
    );
    println!(
        "  {}   # 502 upstream_blocked",
        chat(
            "sk-demo-full-0123456789abcdef",
            " -H 'x-mock-fault: html403'",
            hello
        )
    );
    println!(
        "  {}   # 200 after 3 attempts",
        chat(
            "sk-demo-full-0123456789abcdef",
            " -i -H 'x-mock-fault: flaky'",
            hello
        )
    );
    println!(
        "  {}   # SSE",
        chat(
            "sk-demo-full-0123456789abcdef",
            " -N",
            r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hi"}]}"#
        )
    );
    println!("  faults: -H 'x-mock-fault: flaky|429|500|503|529|html403|timeout|reset|stream-cut|stream-error'");
}

#[tokio::main]
async fn main() {
    let args = parse_args().unwrap_or_else(|e| fail(e));
    let config = match &args.config {
        Some(path) => std::fs::read_to_string(path)
            .unwrap_or_else(|e| fail(format_args!("cannot read --config {path:?}: {e}"))),
        None => DEFAULT_CONFIG.to_owned(),
    };
    let source = args.config.as_deref().unwrap_or("built-in configuration");
    let (stack, mut gateway) =
        app::load(&config).unwrap_or_else(|e| fail(format_args!("{source}: {e}")));
    for name in &args.forward_headers {
        gateway
            .forward_header("--forward-header", name)
            .unwrap_or_else(|e| fail(e));
    }
    // The keys: `--keys FILE` (reloaded while the gateway runs), else the configuration's.
    let keys = ReloadableKeyStore::new(match &args.keys {
        Some(path) => InMemoryKeyStore::from_toml_file(path)
            .unwrap_or_else(|e| fail(format_args!("--keys: {e}"))),
        None => stack.auth().store().clone(),
    });
    let tls = match &args.upstream_ca {
        Some(path) => {
            app::tls_config(Some(path.as_ref()), "--upstream-ca").unwrap_or_else(|e| fail(e))
        }
        None => gateway
            .tls()
            .unwrap_or_else(|e| fail(format_args!("{source}: {e}"))),
    };
    let (base, mocked): (Uri, bool) = match &args.upstream {
        Some(u) => match u.parse::<Uri>() {
            Ok(uri)
                if matches!(uri.scheme_str(), Some("http" | "https"))
                    && uri.authority().is_some() =>
            {
                (uri, false)
            }
            Ok(_) => fail(format_args!(
                "--upstream {u:?}: expected an http:// or https:// URL such as http://127.0.0.1:9000/v1"
            )),
            Err(e) => fail(format_args!("--upstream {u:?}: {e}")),
        },
        None => {
            let addr = mock::start().await.expect("the mock upstream starts");
            // The mock's faults are chosen with a header of their own.
            gateway
                .forward_header("--forward-header", "x-mock-fault")
                .expect("a valid header name");
            (format!("http://{addr}/v1").parse().unwrap(), true)
        }
    };
    let key = std::env::var("UPSTREAM_API_KEY")
        .ok()
        .and_then(|k| HeaderValue::try_from(format!("Bearer {k}")).ok())
        .map(|mut v| {
            v.set_sensitive(true);
            v
        });
    let listener = match tokio::net::TcpListener::bind(args.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("gateway: cannot listen on {}: {e}", args.listen);
            std::process::exit(1);
        }
    };
    let addr = listener.local_addr().unwrap();
    println!("listening on http://{addr}");

    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,tower_http=debug".into()),
        )
        .init();
    if mocked {
        println!("upstream: embedded mock at {base} (inject faults with the x-mock-fault header)");
        // The demo keys are those in force: the key file's with `--keys`.
        let keys_text = args
            .keys
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok());
        print_demo(
            keys_text.as_deref().unwrap_or(&config),
            addr,
            keys_text.is_none(),
        );
    } else {
        println!("upstream: {base}");
    }
    let _health = app::status::start_health_check(&stack, base.clone(), key.clone(), tls.clone());
    let upstream = app::upstream_with_targets(
        &stack,
        &gateway.forward_headers,
        tls,
        base,
        key,
        &gateway.upstreams,
    )
    .unwrap_or_else(|e| fail(format_args!("{source}: {e}")));
    let app = app::router_with_auth(&stack, &stack.auth().with_store(keys.clone()), upstream)
        .merge(app::status::router(&stack, gateway.admin.as_ref()));
    #[cfg(feature = "metrics")]
    let app = app.merge(metrics::router(
        metrics::install().unwrap_or_else(|e| fail(e)),
    ));
    if let Some(path) = &args.keys {
        let mut reloader = keys
            .watch_file(path, ReloadOptions::new())
            .unwrap_or_else(|e| fail(e));
        let path = path.clone();
        tokio::spawn(async move {
            while let Some(outcome) = reloader.next_outcome().await {
                match outcome {
                    ReloadOutcome::Reloaded(summary) => {
                        println!("keys reloaded from {path}: {summary}")
                    }
                    ReloadOutcome::Refused(e) => {
                        println!("keys refused, the previous keys stay in force: {e}")
                    }
                }
            }
        });
    }
    axum::serve(listener, app).await.unwrap();
}
