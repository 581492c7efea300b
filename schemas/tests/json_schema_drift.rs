//! The committed JSON Schema files must match the types. Regenerate with
//! `BURSAR_BLESS=1 cargo test -p bursar-schemas --test json_schema_drift`.

use std::path::PathBuf;

#[test]
fn committed_json_schemas_match_the_types() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("json");
    let bless = std::env::var_os("BURSAR_BLESS").is_some();
    let mut stale = Vec::new();
    let generated = bursar_schemas::jsonschema::all();
    for (name, text) in &generated {
        let path = dir.join(name);
        if bless {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(&path, text).unwrap();
            continue;
        }
        match std::fs::read_to_string(&path) {
            Ok(on_disk) if &on_disk == text => {}
            _ => stale.push(name.to_string()),
        }
    }
    // No leftover files for types that no longer exist.
    for entry in std::fs::read_dir(&dir).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        if !generated.iter().any(|(n, _)| *n == name) {
            stale.push(format!("{name} (no longer generated)"));
        }
    }
    assert!(
        stale.is_empty(),
        "schemas/json is out of date: {stale:?}; run BURSAR_BLESS=1 cargo test -p bursar-schemas --test json_schema_drift"
    );
}
