//! `Stack::from_toml_str` on any text: it builds, or refuses with a field; never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use llm_layers::stack::Stack;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = Stack::from_toml_str(text) {
        assert!(!e.field().is_empty(), "{e}");
        assert!(!e.message().is_empty(), "{e}");
    }
});
