//! Policy files: `bursar_core::policy::parse_policy` on arbitrary UTF-8 text, with a
//! `read_import` that fails or returns a small fixed LiteLLM file.
//! Properties: `core/tests/props/mod.rs` (`policy`).
#![no_main]

#[path = "../../core/tests/props/mod.rs"]
mod props;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = props::policy(text);
    }
});
