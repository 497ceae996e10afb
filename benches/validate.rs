//! Placeholder until the validate bench lands.
fn main() {}
