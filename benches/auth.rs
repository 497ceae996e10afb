//! The cost of `ApiKeyAuthLayer` on the success path, against the bare service in the same run.
//!
//! The store holds 100,000 keys; the request carries one of them as a bearer token. The
//! `model_check` case adds a key restricted to `gpt-4o-mini*`, whose body is buffered and
//! parsed; `keep_headers` leaves the client's credential headers on the request instead of
//! stripping them; `unknown_key` is the rejection path; `reloadable_store` and `cache_hit` are
//! the success path over a `ReloadableKeyStore` and a `CachedKeyStore` hit. The `auth_parts`
//! group times the pieces of the success path one by one, and beside them the alternatives
//! measured against them (`sha2`'s `Digest`, a keyed SipHash tag).
//!
//! `AUTH_COUNT=<bare|strip|keep>:<n>` runs `n` calls of one case without criterion or a
//! runtime, for instruction counts under `valgrind --tool=cachegrind --cache-sim=no` (the run
//! with `n` calls minus the run with 0). Valgrind's CPU has no SHA extensions, so `sha2` runs
//! its portable code there: read the counts of everything but `compress256`.
//!
//! The `auth` group counts each call at the pace of the fastest chunk of 200 calls in its
//! sample (see `fastest_chunk`): on a loaded machine, medians of plain wall-clock samples
//! moved by ±50 % from run to run, which hides a difference of 100 ns.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, Criterion};
use http::{Request, Response};
use http_body_util::Full;
use llm_layers::auth::{ApiKeyAuthLayer, CredentialForwarding, InMemoryKeyStore, KeyRecord};
use llm_layers::body::LayerBody;
use tower::{service_fn, Layer, Service, ServiceExt};

const KEYS: usize = 100_000;

/// Calls per timed chunk.
const CHUNK: u64 = 200;

/// Times `iters` calls in chunks of [`CHUNK`] and counts every call at the pace of the fastest
/// chunk. On a shared machine a chunk that lost its time slice to another process measures
/// that process, not the code; the fastest chunk of a sample does not. Every case (the bare
/// service included) is timed this way.
async fn fastest_chunk<F, Fut>(iters: u64, mut call: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut best = Duration::MAX;
    let mut done = 0;
    while done < iters {
        let n = CHUNK.min(iters - done);
        let start = std::time::Instant::now();
        for _ in 0..n {
            call().await;
        }
        best = best.min(start.elapsed() / n as u32);
        done += n;
    }
    best * iters as u32
}

fn secret(i: usize) -> String {
    format!("sk-bench-{i:08}-0123456789abcdefghijklmnopqrstuv")
}

fn store() -> InMemoryKeyStore {
    let records = (0..KEYS).map(|i| {
        let b = KeyRecord::builder(format!("key-{i}"))
            .secret(secret(i))
            .tier("pro");
        let b = if i == 1 {
            b.allow_model("gpt-4o-mini*")
        } else {
            b
        };
        b.build().unwrap()
    });
    InMemoryKeyStore::new(records).unwrap()
}

const BODY: &str =
    r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Hello there"}]}"#;

fn request(auth: &'static str) -> Request<Full<Bytes>> {
    Request::post("/v1/chat/completions")
        .header("authorization", auth)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(BODY.as_bytes())))
        .unwrap()
}

async fn upstream<B>(_req: Request<B>) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(Response::new(Full::new(Bytes::from_static(b"ok"))))
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let bare = service_fn(upstream::<Full<Bytes>>);
    // Behind the layer, the same service takes the body the layer hands on.
    let behind = service_fn(upstream::<LayerBody<Full<Bytes>>>);
    let store = store();
    let authed = ApiKeyAuthLayer::new(store.clone()).layer(behind);
    let keep = ApiKeyAuthLayer::builder(store.clone())
        .forwarding(CredentialForwarding::Keep)
        .build()
        .unwrap()
        .layer(behind);

    let success: &'static str = Box::leak(format!("Bearer {}", secret(KEYS / 2)).into_boxed_str());
    let restricted: &'static str = Box::leak(format!("Bearer {}", secret(1)).into_boxed_str());
    let unknown: &'static str = "Bearer sk-bench-unknown-0123456789abcdefghijklmnop";

    let mut group = c.benchmark_group("auth");
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2));

    group.bench_function("bare_service", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            fastest_chunk(iters, move || {
                let mut svc = bare;
                async move {
                    let res = svc.ready().await.unwrap().call(request(success)).await;
                    assert_eq!(res.unwrap().status(), 200);
                }
            })
        })
    });
    let cases = [
        ("bearer_100k_keys", &authed, success, 200),
        ("bearer_100k_keys_keep_headers", &keep, success, 200),
        ("bearer_100k_keys_model_check", &authed, restricted, 200),
        ("unknown_key_rejected", &authed, unknown, 401),
    ];
    for (name, svc, auth, status) in cases {
        group.bench_function(name, |b| {
            b.to_async(&rt).iter_custom(|iters| {
                fastest_chunk(iters, || {
                    let mut svc = svc.clone();
                    async move {
                        let res = svc.ready().await.unwrap().call(request(auth)).await;
                        assert_eq!(res.unwrap().status(), status);
                    }
                })
            })
        });
    }
    // The success path over the other stores a gateway puts the keys in: the reloadable store
    // (an `ArcSwap` load per lookup) and a hit of `CachedKeyStore` (a mutex and a clock read).
    macro_rules! success_over {
        ($name:expr, $svc:expr) => {
            let svc = $svc;
            group.bench_function($name, |b| {
                b.to_async(&rt).iter_custom(|iters| {
                    fastest_chunk(iters, || {
                        let mut svc = svc.clone();
                        async move {
                            let res = svc.ready().await.unwrap().call(request(success)).await;
                            assert_eq!(res.unwrap().status(), 200);
                        }
                    })
                })
            });
        };
    }
    #[cfg(feature = "reload")]
    success_over!(
        "bearer_100k_keys_reloadable_store",
        ApiKeyAuthLayer::new(llm_layers::auth::ReloadableKeyStore::new(store.clone()))
            .layer(behind)
    );
    let cached = llm_layers::auth::CachedKeyStore::new(store);
    let cached = ApiKeyAuthLayer::new(cached).layer(behind);
    // The first lookup fills the cache; every timed one is a hit.
    let first = rt.block_on(cached.clone().oneshot(request(success)));
    assert_eq!(first.unwrap().status(), 200);
    success_over!("bearer_100k_keys_cache_hit", cached);
    group.finish();
}

/// The pieces of the success path, one by one, to see where the time goes: reading the key
/// from the headers, its SHA-256 digest (and, beside it, the keyed hash a verified-key cache
/// would use instead), the lookup with the constant-time confirmation, and the two extension
/// values handed on (`http::Extensions` allocates the map, its table and one box per value).
fn parts(c: &mut Criterion) {
    use http::Extensions;
    use llm_layers::auth::{extract_api_key, AcceptedHeaders, KeyHash};
    use std::hint::black_box;

    let store = store();
    let key = secret(KEYS / 2);
    let bearer = format!("Bearer {key}");
    let req = request(Box::leak(bearer.into_boxed_str()));
    let hash = KeyHash::of(key.as_bytes());
    let record = store.get(&hash).unwrap().clone();

    let mut group = c.benchmark_group("auth_parts");
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2));
    // Timed like the `auth` group: each call at the pace of the fastest chunk of its sample.
    let mut part = |name: &str, mut f: Box<dyn FnMut() + '_>| {
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut best = Duration::MAX;
                let mut done = 0;
                while done < iters {
                    let n = CHUNK.min(iters - done);
                    let start = std::time::Instant::now();
                    for _ in 0..n {
                        f();
                    }
                    best = best.min(start.elapsed() / n as u32);
                    done += n;
                }
                best * iters as u32
            })
        });
    };
    part(
        "extract_api_key",
        Box::new(|| {
            let key = extract_api_key(black_box(req.headers()), AcceptedHeaders::all());
            black_box(key.map(|k| k.len()).ok());
        }),
    );
    // The three header-map probes `extract_api_key` makes, alone: what reading the key costs
    // before any parsing.
    part(
        "credential_header_probes",
        Box::new(|| {
            let h = black_box(req.headers());
            black_box((
                h.get_all(http::header::AUTHORIZATION).iter().count(),
                h.get_all(llm_layers::auth::X_API_KEY).iter().count(),
                h.get_all(llm_layers::auth::API_KEY).iter().count(),
            ));
        }),
    );
    part(
        "sha256",
        Box::new(|| {
            black_box(KeyHash::of(black_box(key.as_bytes())));
        }),
    );
    // The same digest through `sha2`'s `Digest` (what `KeyHash::of` used before).
    part(
        "sha256_digest_api",
        Box::new(|| {
            use sha2::Digest;
            black_box(<[u8; 32]>::from(sha2::Sha256::digest(black_box(
                key.as_bytes(),
            ))));
        }),
    );
    // What a verified-key cache would hash instead of SHA-256: two keyed 64-bit SipHash-1-3
    // tags (std's `RandomState`), 128 bits between them.
    let (k1, k2) = (
        std::collections::hash_map::RandomState::new(),
        std::collections::hash_map::RandomState::new(),
    );
    part(
        "keyed_siphash_128",
        Box::new(|| {
            use std::hash::BuildHasher;
            let key = black_box(key.as_bytes());
            black_box((k1.hash_one(key), k2.hash_one(key)));
        }),
    );
    // The same two at the length of an OpenAI project key (`sk-proj-` and 156 more bytes):
    // three SHA-256 blocks.
    let long = format!("sk-proj-{}", "aB3".repeat(52));
    part(
        "sha256_164_bytes",
        Box::new(|| {
            black_box(KeyHash::of(black_box(long.as_bytes())));
        }),
    );
    part(
        "keyed_siphash_128_164_bytes",
        Box::new(|| {
            use std::hash::BuildHasher;
            let key = black_box(long.as_bytes());
            black_box((k1.hash_one(key), k2.hash_one(key)));
        }),
    );
    part(
        "lookup_100k",
        Box::new(|| {
            black_box(store.get(black_box(&hash)).map(|r| r.hash().ct_eq(&hash)));
        }),
    );
    part(
        "extensions_identity_and_record",
        Box::new(|| {
            let mut ext = Extensions::new();
            ext.insert(record.identity().clone());
            ext.insert(record.clone());
            black_box(ext);
        }),
    );
    part(
        "identity_clone_drop",
        Box::new(|| {
            black_box(record.identity().clone());
        }),
    );
    group.finish();
}

/// Instruction counts without criterion: `AUTH_COUNT=<case>:<n> target/release/deps/auth-*`
/// makes `n` calls of one case (`bare`, `strip`, `keep`) with no runtime and exits, so that
/// `valgrind --tool=cachegrind --cache-sim=no` over `n` calls minus a run with `n = 0` gives the
/// instructions of `n` calls, free of the machine's load.
fn count(spec: &str) {
    use futures_util::FutureExt;

    let (case, n) = spec.split_once(':').expect("AUTH_COUNT=<case>:<n>");
    let n: usize = n.parse().expect("AUTH_COUNT=<case>:<n>");
    let store = store();
    let behind = service_fn(upstream::<LayerBody<Full<Bytes>>>);
    let forwarding = match case {
        "keep" => CredentialForwarding::Keep,
        _ => CredentialForwarding::Strip,
    };
    let mut authed = ApiKeyAuthLayer::builder(store)
        .forwarding(forwarding)
        .build()
        .unwrap()
        .layer(behind);
    let mut bare = service_fn(upstream::<Full<Bytes>>);
    eprintln!(
        "response future: {} bytes, request: {} bytes",
        std::mem::size_of_val(&authed.call(request("Bearer x"))),
        std::mem::size_of::<Request<Full<Bytes>>>()
    );
    let auth: &'static str = Box::leak(format!("Bearer {}", secret(KEYS / 2)).into_boxed_str());
    for _ in 0..n {
        let status = match case {
            "bare" => bare
                .call(request(auth))
                .now_or_never()
                .map(|r| r.unwrap().status()),
            "strip" | "keep" => authed
                .call(request(auth))
                .now_or_never()
                .map(|r| r.unwrap().status()),
            _ => panic!("unknown case `{case}`: bare, strip or keep"),
        };
        assert_eq!(status, Some(http::StatusCode::OK));
    }
}

criterion_group!(benches, bench, parts);

fn main() {
    if let Ok(spec) = std::env::var("AUTH_COUNT") {
        return count(&spec);
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
