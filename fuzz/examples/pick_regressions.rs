//! Picks a handful of interesting inputs from a minimised corpus: the smallest input of each
//! outcome class (each op decoded, each error code and field, each event kind, each policy error
//! key, each LiteLLM skip reason). Prints `class<TAB>path`. Run from `fuzz/`:
//! `cargo run --example pick_regressions -- <target>`.

#[path = "../../core/tests/props/mod.rs"]
mod core_props;
#[path = "../../schemas/tests/props/mod.rs"]
mod schemas_props;

use std::collections::BTreeMap;

const KNOWN_FIELDS: &[&str] = &[
    "op",
    "client",
    "event_id",
    "labels",
    "model",
    "usage",
    "occurred_at",
    "reported_cost_usd",
    "reservation_id",
    "estimate",
    "ttl_seconds",
    "candidates",
    "require",
    "budget",
    "limit",
    "from_seq",
    "follow",
    "since",
    "until",
    "pricing",
    "apply",
    "import",
    "models",
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "requests",
    "max_output_tokens",
    "provider",
    "input_per_mtok",
    "output_per_mtok",
    "above_tokens",
    "capabilities",
];

fn class(target: &str, bytes: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(bytes);
    Some(match target {
        "decode_request" => match schemas_props::request_line(bytes) {
            Ok(r) => format!("ok {}", r.op()),
            Err(e) => {
                // Group errors by code, nesting depth and whether the field is a real one.
                let field = e.field.unwrap_or_default();
                let last = field.rsplit('.').next().unwrap_or("");
                let known = KNOWN_FIELDS.contains(&last);
                let depth = field.matches('.').count().min(3);
                format!(
                    "err {:?} depth={depth} known={known} {}",
                    e.code,
                    if known { last } else { "" }
                )
            }
        },
        "decode_record" => match schemas_props::record(bytes) {
            Some(envs) => {
                let kinds: Vec<&str> = envs.iter().map(|e| e.body.kind()).collect();
                format!("ok {}", kinds.join(","))
            }
            None => {
                let e = bursar_schemas::event::decode_record(bytes).err()?;
                // Group by error kind (and bincode's error variant), not by numbers in it.
                let msg = e.to_string();
                let kind: String = msg
                    .chars()
                    .filter(|c| c.is_alphabetic() || *c == ' ' || *c == ':')
                    .take(60)
                    .collect();
                format!("err {kind}")
            }
        },
        "policy_parse" => match core_props::policy(text.ok()?) {
            Ok(p) => format!("ok budgets={}", p.resolved.budgets.len().min(2)),
            Err(errs) => {
                // Group by the kind of the first error: the first words of its message.
                let words: Vec<&str> = errs[0]
                    .message
                    .split(|c: char| !c.is_ascii_alphabetic())
                    .filter(|w| !w.is_empty())
                    .take(4)
                    .collect();
                format!("err {}", words.join(" "))
            }
        },
        "litellm_import" => match core_props::litellm(text.ok()?) {
            Ok(i) => match i.skipped.first() {
                Some((_, reason)) => {
                    format!("skip {}", reason.split(['"', ':']).next().unwrap_or(""))
                }
                None => format!("ok models={}", i.table.models.len().min(2)),
            },
            Err(_) => "err".to_string(),
        },
        _ => return None,
    })
}

fn main() -> std::io::Result<()> {
    let target = std::env::args().nth(1).unwrap_or_default();
    let mut best: BTreeMap<String, (usize, String)> = BTreeMap::new();
    for entry in std::fs::read_dir(format!("corpus/{target}"))? {
        let path = entry?.path();
        let bytes = std::fs::read(&path)?;
        if let Some(c) = class(&target, &bytes) {
            let candidate = (bytes.len(), path.display().to_string());
            let slot = best.entry(c).or_insert(candidate.clone());
            if candidate < *slot {
                *slot = candidate;
            }
        }
    }
    for (c, (_, path)) in best {
        println!("{c}\t{path}");
    }
    Ok(())
}
