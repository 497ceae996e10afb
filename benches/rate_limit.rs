//! Placeholder until the rate_limit bench lands.
fn main() {}
