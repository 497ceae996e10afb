//! Placeholder until the auth bench lands.
fn main() {}
