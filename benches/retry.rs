//! Placeholder until the retry bench lands.
fn main() {}
