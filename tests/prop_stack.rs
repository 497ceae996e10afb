//! Property tests of `Stack::from_toml_str`: any document builds, or is refused with a
//! `ConfigError` that names a field of the document and quotes no secret; never a panic.
//!
//! Run with `PROPTEST_CASES=<n>` to change the number of cases (10 000 by default).

mod common_prop;
use common_prop::config;
use std::collections::BTreeSet;

use llm_layers::stack::Stack;
use proptest::prelude::*;

/// What a value of a key should be.
#[derive(Debug, Clone, Copy)]
enum Ty {
    Int,
    Float,
    Str,
    Bool,
    Strings,
    Table,
    Secret,
}

fn int() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            0i128,
            1,
            -1,
            2,
            10,
            100,
            300_000,
            300_001,
            65_535,
            65_536,
            i128::from(i32::MAX),
            i128::from(u32::MAX),
            i128::from(u32::MAX) + 1,
            i128::from(i64::MAX),
            i128::from(i64::MIN),
            1 << 53,
        ])
        .prop_map(|n| n.to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        (0u64..100_000).prop_map(|n| n.to_string()),
    ]
}

fn float() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "0.0",
            "-0.0",
            "1e308",
            "-1e308",
            "5e-324",
            "nan",
            "inf",
            "-inf",
            "+inf",
            "50.0",
            "100.0",
            "100.000001",
            "0.5",
            "1.0",
            "0.000001",
            "99.99999999999999",
        ])
        .prop_map(str::to_owned),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| format!("{f:?}")),
    ]
}

fn string() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "",
            "full",
            "equal",
            "decorrelated",
            "none",
            "single",
            "model",
            "upstream",
            "upstream_and_model",
            "gpt-4o-mini",
            "gpt-4o*",
            "pro",
            "free",
            "2026-12-31T23:59:59Z",
            "2026-12-31T23:59:59+01:00",
            "1969-01-01T00:00:00Z",
            "9999-12-31T23:59:59Z",
            "not a date",
            "*",
            "\u{0}",
        ])
        .prop_map(str::to_owned),
        "\\PC{0,16}",
    ]
    .prop_map(|s| serde_json::to_string(&s).unwrap())
}

fn secret() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_-]{0,40}".prop_map(|s| format!("\"sk-Qz7{s}\""))
}

fn value_of(ty: Ty) -> BoxedStrategy<String> {
    let right = match ty {
        Ty::Int => int().boxed(),
        Ty::Float => prop_oneof![float(), int()].boxed(),
        Ty::Str => string().boxed(),
        Ty::Bool => any::<bool>().prop_map(|b| b.to_string()).boxed(),
        Ty::Strings => prop::collection::vec(string(), 0..4)
            .prop_map(|v| format!("[{}]", v.join(", ")))
            .boxed(),
        Ty::Table => prop::collection::vec(("[a-z][a-z0-9-]{0,8}", int()), 0..3)
            .prop_map(|v| {
                let mut seen = BTreeSet::new();
                let items: Vec<String> = v
                    .into_iter()
                    .filter(|(k, _)| seen.insert(k.clone()))
                    .map(|(k, n)| format!("\"{k}\" = {n}"))
                    .collect();
                format!("{{ {} }}", items.join(", "))
            })
            .boxed(),
        Ty::Secret => secret().boxed(),
    };
    let wrong = prop_oneof![
        int(),
        float(),
        string(),
        Just("true".to_owned()),
        Just("[1, 2]".to_owned()),
        Just("{ a = 1 }".to_owned()),
        Just("2026-12-31T23:59:59Z".to_owned()),
    ];
    prop_oneof![4 => right, 1 => wrong].boxed()
}

type Schema = &'static [(&'static str, Ty)];

const KEYS: Schema = &[
    ("id", Ty::Str),
    ("secret", Ty::Secret),
    ("sha256", Ty::Str),
    ("expires_at", Ty::Str),
    ("revoked", Ty::Bool),
    ("models", Ty::Strings),
    ("tier", Ty::Str),
    ("rpm", Ty::Int),
    ("tpm", Ty::Int),
    ("concurrency", Ty::Int),
    ("labels", Ty::Table),
];
const VALIDATION: Schema = &[
    ("allowed_models", Ty::Strings),
    ("context_windows", Ty::Table),
    ("body_limit", Ty::Int),
];
const RATE_LIMIT: Schema = &[("wait_ms", Ty::Int)];
const LIMITS: Schema = &[
    ("rpm", Ty::Int),
    ("burst", Ty::Int),
    ("tpm", Ty::Int),
    ("concurrency", Ty::Int),
];
const RETRY: Schema = &[
    ("max_attempts", Ty::Int),
    ("backoff_base_ms", Ty::Int),
    ("backoff_cap_ms", Ty::Int),
    ("jitter", Ty::Str),
    ("deadline_ms", Ty::Int),
    ("max_retry_after_ms", Ty::Int),
    ("budget_ratio", Ty::Float),
    ("budget_min_per_sec", Ty::Int),
    ("budget_ttl_ms", Ty::Int),
    ("mark_exhausted", Ty::Bool),
    ("idempotency_keys", Ty::Bool),
    ("seed", Ty::Int),
];
const BREAKER: Schema = &[
    ("name", Ty::Str),
    ("key_by", Ty::Str),
    ("window", Ty::Int),
    ("minimum_calls", Ty::Int),
    ("failure_rate", Ty::Float),
    ("upstream", Ty::Str),
    ("open_ms", Ty::Int),
    ("max_open_ms", Ty::Int),
    ("half_open_probes", Ty::Int),
    ("slow_call_ms", Ty::Int),
    ("slow_call_rate", Ty::Float),
    ("call_timeout_ms", Ty::Int),
    ("fallback_model", Ty::Str),
    ("seed", Ty::Int),
];
const UPSTREAM: Schema = &[("attempt_timeout_ms", Ty::Int)];
const ROUTE: Schema = &[
    ("auth", Ty::Bool),
    ("validate", Ty::Bool),
    ("rate_limit", Ty::Bool),
];

/// One table of the document: its header and `key = value` lines.
#[derive(Debug, Clone)]
struct Table {
    header: String,
    /// The TOML path of the table, as errors name it.
    path: String,
    lines: Vec<(String, String)>,
    /// The keys the table may have.
    schema: Schema,
}

fn table(header: String, path: String, schema: Schema) -> impl Strategy<Value = Table> {
    let entries: Vec<BoxedStrategy<Option<(String, String)>>> = schema
        .iter()
        .map(|(k, ty)| {
            proptest::option::weighted(0.4, value_of(*ty))
                .prop_map(move |v| v.map(|v| ((*k).to_owned(), v)))
                .boxed()
        })
        .collect();
    entries.prop_map(move |e| Table {
        header: header.clone(),
        path: path.clone(),
        lines: e.into_iter().flatten().collect(),
        schema,
    })
}

/// A document of the stack's own tables with values of the right type, the wrong type and
/// extreme sizes, routes that switch layers and routes that override their settings.
fn document() -> impl Strategy<Value = Vec<Table>> {
    let keys = prop::collection::vec(Just(()), 0..3).prop_flat_map(|v| {
        (0..v.len())
            .map(|i| table("[[keys]]".to_owned(), format!("keys[{i}]"), KEYS))
            .collect::<Vec<_>>()
    });
    let tiers = prop::collection::btree_set("[a-z]{1,5}", 0..3).prop_flat_map(|names| {
        names
            .into_iter()
            .map(|n| {
                table(
                    format!("[rate_limit.tiers.{n}]"),
                    format!("rate_limit.tiers.{n}"),
                    LIMITS,
                )
            })
            .collect::<Vec<_>>()
    });
    let routes = prop::collection::btree_set("/?[a-z0-9/_.-]{0,10}", 0..3).prop_flat_map(|paths| {
        paths
            .into_iter()
            .map(|p| {
                table(
                    format!("[routes.\"{p}\"]"),
                    format!("routes.\"{p}\""),
                    ROUTE,
                )
            })
            .collect::<Vec<_>>()
    });
    // Routes whose sections override the top-level ones (`[routes."/A".retry]`, ...); their
    // paths cannot collide with those above.
    let overrides = prop::collection::btree_set("/[A-Z]{1,3}", 0..3).prop_flat_map(|paths| {
        paths
            .into_iter()
            .map(|p| {
                let section = |name: &str, schema: Schema| {
                    proptest::option::weighted(
                        0.5,
                        table(
                            format!("[routes.\"{p}\".{name}]"),
                            format!("routes.\"{p}\".{name}"),
                            schema,
                        ),
                    )
                };
                (
                    section("validate", VALIDATION),
                    section("rate_limit", RATE_LIMIT),
                    section("rate_limit.defaults", LIMITS),
                    section("retry", RETRY),
                    section("breaker", BREAKER),
                    section("upstream", UPSTREAM),
                )
                    .prop_map(|(v, r, d, re, b, u)| {
                        [v, r, d, re, b, u]
                            .into_iter()
                            .flatten()
                            .collect::<Vec<_>>()
                    })
            })
            .collect::<Vec<_>>()
    });
    let single = |name: &'static str, schema: Schema| {
        proptest::option::weighted(0.5, table(format!("[{name}]"), name.to_owned(), schema))
    };
    (
        keys,
        single("validation", VALIDATION),
        single("rate_limit", RATE_LIMIT),
        single("rate_limit.defaults", LIMITS),
        tiers,
        single("retry", RETRY),
        single("breaker", BREAKER),
        single("upstream", UPSTREAM),
        routes,
        overrides,
    )
        .prop_map(|(keys, v, r, d, tiers, re, b, u, routes, overrides)| {
            let mut out = keys;
            out.extend([v, r, d].into_iter().flatten());
            out.extend(tiers);
            out.extend([re, b, u].into_iter().flatten());
            out.extend(routes);
            out.extend(overrides.into_iter().flatten());
            out
        })
}

fn render(doc: &[Table]) -> String {
    let mut s = String::new();
    for t in doc {
        s.push_str(&t.header);
        s.push('\n');
        for (k, v) in &t.lines {
            s.push_str(&format!("{k} = {v}\n"));
        }
        s.push('\n');
    }
    s
}

/// Whether `field` names something the document has: a table, a key of it (written or
/// missing), or a place inside a value written in it (an inline table's key, an array's
/// item).
fn names_a_field(doc: &[Table], field: &str) -> bool {
    doc.iter().any(|t| {
        field == t.path
            || t.schema
                .iter()
                .any(|(k, _)| field == format!("{}.{k}", t.path))
            || t.lines.iter().any(|(k, v)| {
                let key = format!("{}.{k}", t.path);
                field == key
                    || (v.starts_with('{')
                        && field.strip_prefix(&key).is_some_and(|r| r.starts_with('.')))
                    || (v.starts_with('[')
                        && field.strip_prefix(&key).is_some_and(|r| r.starts_with('[')))
            })
    })
}

/// Fragments that make TOML of every kind, well-formed or not.
fn garbage() -> impl Strategy<Value = String> {
    let pieces = prop::sample::select(vec![
        "[",
        "]",
        "[[",
        "]]",
        "keys",
        "retry",
        "breaker",
        "rate_limit",
        "tiers",
        "routes",
        "upstream",
        "validation",
        "defaults",
        ".",
        "=",
        " = ",
        "\"",
        "'",
        "\"\"\"",
        "\n",
        "\r\n",
        "#",
        "1",
        "-1",
        "1e999",
        "nan",
        "inf",
        "18446744073709551616",
        "true",
        "{",
        "}",
        ",",
        "max_attempts",
        "open_ms",
        "rpm",
        "burst",
        "secret",
        "id",
        "secret = \"sk-Qz7secretsecret\"",
        "secret = \"sk-Qz7secret",
        "secret = 'sk-Qz7secret\\u'",
        "\\u0000",
        "\\",
        "é",
        "\u{0}",
        "\t",
        "2026-12-31T23:59:59Z",
        "\"/v1\"",
        "0x10",
        "1_000",
    ]);
    prop_oneof![
        prop::collection::vec(pieces, 0..40).prop_map(|v| v.concat()),
        any::<String>(),
    ]
}

fn check_refusal(err: &llm_layers::config::ConfigError) -> Result<(), TestCaseError> {
    prop_assert_eq!(err.layer(), "configuration");
    prop_assert!(!err.field().is_empty(), "{}", err);
    prop_assert!(!err.message().is_empty(), "{}", err);
    prop_assert!(!err.to_string().contains("Qz7"), "quotes a secret: {}", err);
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    /// Any text: builds, or a refusal with a field and a message; never a panic.
    #[test]
    fn any_text_builds_or_is_refused(text in garbage()) {
        if let Err(e) = Stack::from_toml_str(&text) {
            check_refusal(&e)?;
        }
    }

    /// A document of the stack's tables, values of any type and size: builds, or is refused
    /// naming a key or table the document has, without quoting a secret.
    #[test]
    fn documents_build_or_name_their_field(doc in document()) {
        let text = render(&doc);
        if let Err(e) = Stack::from_toml_str(&text) {
            check_refusal(&e)?;
            prop_assert!(
                names_a_field(&doc, e.field()),
                "the error names `{}`, not a field of the document: {}\n{}",
                e.field(),
                e,
                text
            );
        }
    }
}
