//! LiteLLM price files: `bursar_core::pricing::import_litellm` on arbitrary UTF-8 text.
//! Properties: `core/tests/props/mod.rs` (`litellm`).
#![no_main]

#[path = "../../core/tests/props/mod.rs"]
mod props;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = props::litellm(text);
    }
});
