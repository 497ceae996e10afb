//! The proptest settings every property file shares.

use proptest::prelude::ProptestConfig;
use proptest::test_runner::FileFailurePersistence;

/// `PROPTEST_CASES` cases (default 10,000), failures kept beside the test file in
/// `*.proptest-regressions`, and room for the generators' filters at any case count.
pub fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    ProptestConfig {
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        // Generators filter a few percent of their values; allow that at any case count.
        max_local_rejects: cases.max(65_536),
        max_global_rejects: (cases / 10).max(1024),
        ..ProptestConfig::with_cases(cases)
    }
}
