//! Load bench: the example gateway against a bare axum proxy and the upstream alone.
//!
//! ```sh
//! cargo bench --bench load
//! ```
//!
//! It builds the release binaries of `examples/gateway` and `examples/bare_proxy`, starts a
//! fast upstream stub (this binary again, answering a fixed OpenAI chat completion), the
//! gateway (its own `examples/gateway.toml`, plus one key whose limits the load cannot reach)
//! and the bare proxy, each in its own process, and drives each with the same load from a
//! hyper-based driver in this process (one thread): `LOAD_CONNECTIONS` HTTP/1.1 keep-alive
//! connections (default 32), each sending the next request when the last answer is read,
//! `LOAD_WARMUP` seconds of warm-up (default 2, not counted), then `LOAD_SECONDS` seconds
//! (default 10) measured. It prints requests/s and p50/p99/p99.9 latency for each and the
//! gateway/bare ratios, then a fixed-rate run at 50 % of the bare proxy's measured capacity
//! (latency counted from when each request was due, so a stall is not hidden) and the p99
//! the gateway adds. Beside each run, the server process's CPU time per answered request (all
//! its threads, from `/proc/PID/task/*/schedstat`, over the measured window): on a machine
//! the driver and the servers share, the CPU each request costs the proxy is steadier than the
//! throughput it reaches.
//!
//! The gateway runs with `RUST_LOG=warn` (no per-request log lines); set `LOAD_GATEWAY_LOG`
//! to another filter to measure it with logging.
//!
//! Without `--bench` (as `cargo test --benches` runs it) it does nothing.

use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

/// The environment variable that makes this binary the upstream stub.
const ROLE: &str = "LLM_LAYERS_LOAD_ROLE";

/// The request every connection sends.
const CHAT: &str = r#"{"model":"gpt-4o-mini","messages":[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"Say hello in one word."}],"max_tokens":16}"#;

/// The upstream's answer: a complete OpenAI chat completion.
const COMPLETION: &str = r#"{"id":"chatcmpl-bench","object":"chat.completion","created":1733000000,"model":"gpt-4o-mini-2024-07-18","choices":[{"index":0,"message":{"role":"assistant","content":"Hello!","refusal":null},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":24,"completion_tokens":2,"total_tokens":26,"prompt_tokens_details":{"cached_tokens":0},"completion_tokens_details":{"reasoning_tokens":0}},"system_fingerprint":"fp_bench"}"#;

/// The key the load uses: its own limits, far above what the load can reach, so the rate
/// limiter does all its work and never refuses.
const BENCH_KEY: &str = "sk-load-bench-0123456789abcdef";
const BENCH_KEY_TOML: &str = r#"
[[keys]]
id = "load-bench"
secret = "sk-load-bench-0123456789abcdef"
rpm = 4000000000
tpm = 4000000000
concurrency = 100000
"#;

fn main() {
    if std::env::var_os(ROLE).is_some() {
        return upstream_stub();
    }
    if !std::env::args().any(|a| a == "--bench") {
        println!("load: run with `cargo bench --bench load`");
        return;
    }
    let settings = Settings::from_env();
    let bins = build_examples();
    let up = Server::upstream();
    let config = std::env::temp_dir().join(format!("llm-layers-load-{}.toml", std::process::id()));
    let gateway_toml = include_str!("../examples/gateway.toml");
    std::fs::write(&config, format!("{gateway_toml}{BENCH_KEY_TOML}")).expect("a temp file");
    let log = std::env::var("LOAD_GATEWAY_LOG").unwrap_or_else(|_| "warn".to_owned());
    let gateway = Server::start(
        "gateway",
        Command::new(bins.join("gateway"))
            .args(["--listen", "127.0.0.1:0", "--config"])
            .arg(&config)
            .args(["--upstream", &format!("http://{}/v1", up.addr)])
            .env("RUST_LOG", &log),
    );
    let bare = Server::start(
        "bare_proxy",
        Command::new(bins.join("bare_proxy")).args([
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            &format!("http://{}", up.addr),
        ]),
    );

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    println!(
        "load: {} connections, HTTP/1.1 keep-alive, {} s warm-up + {} s measured per run, \
         POST /v1/chat/completions ({} B body, {} B answer), gateway RUST_LOG={log}",
        settings.connections,
        settings.warmup.as_secs_f64(),
        settings.duration.as_secs_f64(),
        CHAT.len(),
        COMPLETION.len(),
    );
    println!("closed loop (saturation):");
    println!("{}", Stats::header());
    let r_up = rt.block_on(drive(&settings, &up, None));
    println!("{}", r_up.row("upstream"));
    let r_bare = rt.block_on(drive(&settings, &bare, None));
    println!("{}", r_bare.row("bare proxy"));
    let r_gw = rt.block_on(drive(&settings, &gateway, None));
    println!("{}", r_gw.row("gateway"));
    println!(
        "gateway/bare: throughput {:.2}x, p50 {:.2}x, p99 {:.2}x, CPU per request {:.2}x; \
         bare/upstream throughput {:.2}x",
        r_gw.rps() / r_bare.rps(),
        r_gw.pct(50.0) as f64 / r_bare.pct(50.0) as f64,
        r_gw.pct(99.0) as f64 / r_bare.pct(99.0) as f64,
        r_gw.cpu_per_request() / r_bare.cpu_per_request(),
        r_bare.rps() / r_up.rps(),
    );

    let rate = (r_bare.rps() * 0.5).max(1.0);
    println!("fixed rate {rate:.0} req/s (50 % of the bare proxy's capacity):");
    println!("{}", Stats::header());
    let f_bare = rt.block_on(drive(&settings, &bare, Some(rate)));
    println!("{}", f_bare.row("bare proxy"));
    let f_gw = rt.block_on(drive(&settings, &gateway, Some(rate)));
    println!("{}", f_gw.row("gateway"));
    println!(
        "added by the gateway at 50 % load: p50 {:+} us, p99 {:+} us, p99.9 {:+} us, \
         CPU {:+.1} us per request",
        f_gw.pct(50.0) as i64 - f_bare.pct(50.0) as i64,
        f_gw.pct(99.0) as i64 - f_bare.pct(99.0) as i64,
        f_gw.pct(99.9) as i64 - f_bare.pct(99.9) as i64,
        f_gw.cpu_per_request() - f_bare.cpu_per_request(),
    );
    let _ = std::fs::remove_file(&config);
    drop((gateway, bare, up));
}

struct Settings {
    connections: usize,
    warmup: Duration,
    duration: Duration,
}

impl Settings {
    fn from_env() -> Settings {
        let num = |name: &str, default: f64| {
            std::env::var(name)
                .ok()
                .map(|v| v.parse::<f64>().unwrap_or_else(|_| panic!("{name}={v:?}")))
                .unwrap_or(default)
        };
        Settings {
            connections: num("LOAD_CONNECTIONS", 32.0) as usize,
            warmup: Duration::from_secs_f64(num("LOAD_WARMUP", 2.0)),
            duration: Duration::from_secs_f64(num("LOAD_SECONDS", 10.0)),
        }
    }
}

/// The directory of the release examples, built first (`cargo build --release --examples`).
fn build_examples() -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut build = Command::new(cargo);
    // The variables cargo sets for a running bench (package metadata, library paths) would
    // change the fingerprints of the build and make every run rebuild.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if name.starts_with("CARGO_PKG_")
            || name.starts_with("CARGO_MANIFEST_")
            || name.starts_with("CARGO_BIN_")
            || matches!(
                &*name,
                "CARGO_CRATE_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
                    | "CARGO_TARGET_TMPDIR"
                    | "LD_LIBRARY_PATH"
                    | "DYLD_FALLBACK_LIBRARY_PATH"
                    | "OUT_DIR"
            )
        {
            build.env_remove(&*name);
        }
    }
    let status = build
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args([
            "build",
            "--release",
            "--example",
            "gateway",
            "--example",
            "bare_proxy",
        ])
        .status()
        .expect("cargo runs");
    assert!(status.success(), "building the examples failed");
    // This bench runs from `target/release/deps/`; the examples are in `target/release/examples/`.
    let exe = std::env::current_exe().unwrap();
    exe.parent()
        .and_then(|deps| deps.parent())
        .expect("target/release/deps/load-*")
        .join("examples")
}

/// A server process, killed when dropped.
struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Server {
    fn upstream() -> Server {
        Server::start(
            "upstream",
            Command::new(std::env::current_exe().unwrap()).env(ROLE, "upstream"),
        )
    }

    /// Starts `cmd` and waits for its `listening on http://ADDR` line.
    fn start(name: &str, cmd: &mut Command) -> Server {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("{name} starts: {e}"));
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let addr = loop {
            let line = match lines.next() {
                Some(Ok(line)) => line,
                _ => panic!("{name} exited before listening"),
            };
            if let Some(addr) = line.strip_prefix("listening on http://") {
                break addr.trim().parse().expect("an address");
            }
        };
        // Whatever else it prints is read and dropped, so it never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        Server { child, addr }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The upstream stub: a plain hyper HTTP/1.1 server on one thread answering every request,
/// once its body is read, with [`COMPLETION`].
fn upstream_stub() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("listening on http://{}", listener.local_addr().unwrap());
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let _ = req.into_body().collect().await;
                    Ok::<_, Infallible>(
                        Response::builder()
                            .header("content-type", "application/json")
                            .header("x-request-id", "req_bench")
                            .body(Full::new(Bytes::from_static(COMPLETION.as_bytes())))
                            .unwrap(),
                    )
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
}

/// Latencies (microseconds) of the answers measured, and how many were not `200`.
struct Stats {
    latencies: Vec<u32>,
    errors: u64,
    duration: Duration,
    /// The server's CPU time over the measured window.
    cpu: Duration,
}

impl Stats {
    fn rps(&self) -> f64 {
        self.latencies.len() as f64 / self.duration.as_secs_f64()
    }

    /// The server's CPU time per answered request, in microseconds.
    fn cpu_per_request(&self) -> f64 {
        self.cpu.as_secs_f64() * 1e6 / self.latencies.len().max(1) as f64
    }

    /// The `p`th percentile in microseconds (the latencies are sorted).
    fn pct(&self, p: f64) -> u32 {
        if self.latencies.is_empty() {
            return 0;
        }
        let rank = ((p / 100.0) * self.latencies.len() as f64).ceil() as usize;
        self.latencies[rank.clamp(1, self.latencies.len()) - 1]
    }

    fn header() -> String {
        format!(
            "  {:<12} {:>10} {:>9} {:>9} {:>9} {:>7} {:>11}",
            "target", "req/s", "p50 us", "p99 us", "p99.9 us", "errors", "cpu us/req"
        )
    }

    fn row(&self, name: &str) -> String {
        format!(
            "  {:<12} {:>10.0} {:>9} {:>9} {:>9} {:>7} {:>11.1}",
            name,
            self.rps(),
            self.pct(50.0),
            self.pct(99.0),
            self.pct(99.9),
            self.errors,
            self.cpu_per_request()
        )
    }
}

/// Drives `addr` from `settings.connections` keep-alive connections: closed loop (`rate`
/// `None`), or `rate` requests per second in all, spread evenly over the connections, each
/// request's latency counted from when it was due.
async fn drive(settings: &Settings, server: &Server, rate: Option<f64>) -> Stats {
    let addr = server.addr;
    let start = Instant::now() + Duration::from_millis(50);
    let measure_from = start + settings.warmup;
    let until = measure_from + settings.duration;
    // The server's CPU time over the measured window, all its threads.
    let pid = server.child.id();
    let cpu = tokio::spawn(async move {
        tokio::time::sleep_until(measure_from.into()).await;
        let before = cpu_time(pid);
        tokio::time::sleep_until(until.into()).await;
        cpu_time(pid).saturating_sub(before)
    });
    let body = Bytes::from_static(CHAT.as_bytes());
    let authorization = format!("Bearer {BENCH_KEY}");
    let host = addr.to_string();
    let mut tasks = Vec::new();
    for i in 0..settings.connections {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .expect("connects");
        stream.set_nodelay(true).unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("an HTTP/1.1 connection");
        tokio::spawn(conn);
        let (body, authorization, host) = (body.clone(), authorization.clone(), host.clone());
        // Open loop: this connection's requests are due every `period`, staggered.
        let period = rate.map(|r| Duration::from_secs_f64(settings.connections as f64 / r));
        let first = start
            + period.map_or(Duration::ZERO, |p| {
                p.mul_f64(i as f64 / settings.connections as f64)
            });
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(1 << 16);
            let mut errors = 0u64;
            let mut due = first;
            tokio::time::sleep_until(first.into()).await;
            loop {
                if period.is_some() {
                    tokio::time::sleep_until(due.into()).await;
                } else {
                    due = Instant::now();
                }
                if due >= until {
                    break;
                }
                let req = Request::post("/v1/chat/completions")
                    .header("host", &host)
                    .header("authorization", &authorization)
                    .header("content-type", "application/json")
                    .body(Full::new(body.clone()))
                    .unwrap();
                let ok = match sender.send_request(req).await {
                    Ok(res) => {
                        let ok = res.status() == 200;
                        ok & res.into_body().collect().await.is_ok()
                    }
                    Err(_) => false,
                };
                let done = Instant::now();
                if due >= measure_from {
                    if ok {
                        latencies.push((done - due).as_micros().min(u32::MAX as u128) as u32);
                    } else {
                        errors += 1;
                    }
                }
                if !ok && sender.ready().await.is_err() {
                    break;
                }
                if let Some(period) = period {
                    due += period;
                }
            }
            (latencies, errors)
        }));
    }
    let mut stats = Stats {
        latencies: Vec::new(),
        errors: 0,
        duration: settings.duration,
        cpu: Duration::ZERO,
    };
    for task in tasks {
        let (latencies, errors) = task.await.expect("a driver task");
        stats.latencies.extend(latencies);
        stats.errors += errors;
    }
    stats.cpu = cpu.await.expect("the CPU sampler");
    stats.latencies.sort_unstable();
    stats
}

/// The CPU time process `pid` has used so far, all threads (`/proc/PID/task/*/schedstat`, in
/// nanoseconds); zero where there is no `/proc`.
fn cpu_time(pid: u32) -> Duration {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Duration::ZERO;
    };
    let ns: u64 = tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    Duration::from_nanos(ns)
}
