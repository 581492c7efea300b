//! Request lines from clients: `bursar_schemas::wire::decode_request` on arbitrary bytes.
//! Properties: `schemas/tests/props/mod.rs` (`request_line`).
#![no_main]

#[path = "../../schemas/tests/props/mod.rs"]
mod props;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = props::request_line(data);
});
