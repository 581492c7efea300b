//! Stored log records: `bursar_schemas::event::decode_record` on arbitrary bytes.
//! Properties: `schemas/tests/props/mod.rs` (`record`).
#![no_main]

#[path = "../../schemas/tests/props/mod.rs"]
mod props;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = props::record(data);
});
