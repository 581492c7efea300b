//! Writes the seed corpora under `fuzz/corpus/<target>/` from realistic inputs: the request
//! lines of SPEC §6, the SPEC §4 example policy, log records like the daemon writes, and a slice
//! of the full LiteLLM price file. Run from `fuzz/`: `cargo run --example make_seeds`.

use bursar_core::policy::{default_policy, parse_policy};
use bursar_schemas::event::*;
use bursar_schemas::wire::Usage;
use bursar_schemas::Labels;
use std::path::Path;

const REQUEST_LINES: &[&str] = &[
    r#"{"op":"hello","client":"planner/1.2"}"#,
    r#"{"op":"hello","req":1}"#,
    r#"{"op":"record","event_id":"e-1","labels":{"team":"search"},"model":"gpt-4o","usage":{"input_tokens":1200,"output_tokens":300,"cached_input_tokens":0,"cache_write_tokens":0,"requests":1},"occurred_at":"2026-11-23T10:00:00Z"}"#,
    r#"{"op":"record","req":[1,"x"],"event_id":"e-9","model":"claude-sonnet-4-5","usage":{"input_tokens":5},"reported_cost_usd":"0.0012"}"#,
    r#"{"op":"reserve","reservation_id":"r-7","labels":{"team":"a"},"model":"gpt-4o","estimate":{"input_tokens":1200,"max_output_tokens":800},"ttl_seconds":120,"candidates":["gpt-4o","gpt-4o-mini"],"require":["tools"]}"#,
    r#"{"op":"commit","reservation_id":"r-7","event_id":"e-2","usage":{"input_tokens":1100,"output_tokens":640}}"#,
    r#"{"op":"commit","reservation_id":"r-8","event_id":"e-3","usage":{},"labels":{"team":"b"},"model":"gpt-4o-mini"}"#,
    r#"{"op":"release","reservation_id":"r-7"}"#,
    r#"{"op":"extend","reservation_id":"r-7","ttl_seconds":300}"#,
    r#"{"op":"check","labels":{"team":"a"},"estimate":{"input_tokens":10},"candidates":["o3","gpt-4.1"],"require":["vision","json"]}"#,
    r#"{"op":"status","labels":{"team":"search"},"budget":"team-daily","limit":1000}"#,
    r#"{"op":"tail","from_seq":0,"follow":true}"#,
    r#"{"op":"export","since":"2026-11-01T00:00:00Z","until":"2026-12-01T00:00:00Z","labels":{"team":"a"}}"#,
    r#"{"op":"replay","pricing":{"models":{"gpt-4o":{"input_per_mtok":2.5,"output_per_mtok":"10.00","above_tokens":0,"capabilities":["tools"]}}},"since":"2026-11-01T00:00:00Z","apply":false}"#,
    r#"{"op":"replay","pricing":{"import":"prices.json"},"apply":true,"req":{"n":null}}"#,
    r#"{"op":"verify"}"#,
    r#"{"op":"reload","req":"r"}"#,
    r#"{"op":"record","event_id":"e","model":"m","usage":{"input_tokens":1,"output_token":5}}"#,
    r#"{"op":"launch"}"#,
];

fn usage_body(id: &str) -> EventBody {
    EventBody::UsageRecorded(UsageRecorded {
        event_id: id.into(),
        reservation_id: Some("r-1".into()),
        reservation: ReservationLink::Known,
        late: true,
        labels: Labels::from([
            ("team".into(), "search".into()),
            ("model".into(), "gpt-4o".into()),
        ]),
        model: "gpt-4o".into(),
        usage: Usage {
            input_tokens: 1200,
            output_tokens: 300,
            cached_input_tokens: 70_000,
            cache_write_tokens: 5,
            requests: 1,
        },
        occurred_at: Some("2026-11-23T10:00:00Z".into()),
        reported_cost_usd: Some("0.006".into()),
        payload_digest: [7; 16],
    })
}

fn bodies() -> Vec<EventBody> {
    let labels = Labels::from([("team".into(), "a".into())]);
    let small_policy = parse_policy(
        "[pricing.models.\"m\"]\ninput_per_mtok = 1\noutput_per_mtok = 2\n[[budget]]\nid = \"b\"\nmax_usd = 5\nwindow = \"rolling\"\nwindow_seconds = 3600\n",
        "small.toml",
        &|_| Err("no import".into()),
    )
    .map(|p| p.resolved)
    .unwrap_or_else(|_| default_policy().resolved);
    let mut tiny = small_policy.clone();
    tiny.pricing
        .models
        .retain(|name, _| name == "m" || name == "gpt-4o");
    vec![
        usage_body("e-1"),
        EventBody::ReservationCreated(ReservationCreated {
            reservation_id: "r-1".into(),
            labels: labels.clone(),
            model: "gpt-4o".into(),
            input_tokens: 1200,
            max_output_tokens: 800,
            hold_micros: 11_000,
            expires_at: 1_790_000_000_000_000,
            payload_digest: [1; 16],
        }),
        EventBody::ReservationDenied(ReservationDenied {
            reservation_id: "r-2".into(),
            labels: labels.clone(),
            model: "o3".into(),
            hold_micros: 99_000_000,
            reason: "budget".into(),
            budget: Some("team-daily".into()),
            key: Some("team=a".into()),
            payload_digest: [2; 16],
        }),
        EventBody::ReservationReleased(ReservationReleased {
            reservation_id: "r-1".into(),
            reason: "cancelled".into(),
        }),
        EventBody::ReservationExtended(ReservationExtended {
            reservation_id: "r-1".into(),
            expires_at: 1_790_000_300_000_000,
        }),
        EventBody::ReservationExpired(ReservationExpired {
            reservation_id: "r-1".into(),
        }),
        EventBody::BudgetWarned(BudgetCrossing {
            budget: "team-daily".into(),
            key: "team=a".into(),
            window_start: 1_789_948_800_000_000,
            spent_micros: 45_000_000,
            held_micros: 11_000,
            utilization_ppm: 900_220,
        }),
        EventBody::BudgetExhausted(BudgetCrossing {
            budget: "total".into(),
            key: String::new(),
            window_start: 0,
            spent_micros: 50_000_000,
            held_micros: 0,
            utilization_ppm: 1_000_000,
        }),
        EventBody::PolicyApplied(PolicyApplied {
            policy_version: 2,
            source: "bursar.toml".into(),
            source_hash: "ab".repeat(32),
            policy: tiny.clone(),
        }),
        EventBody::PricingChanged(PricingChanged {
            effective_from: 1_789_948_800_000_000,
            pricing: tiny.pricing,
        }),
    ]
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join(name), bytes)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let corpus = Path::new("corpus");

    let dir = corpus.join("decode_request");
    for (i, line) in REQUEST_LINES.iter().enumerate() {
        write(&dir, &format!("spec-{i:02}"), line.as_bytes())?;
    }

    let dir = corpus.join("decode_record");
    let mut prev = Hash32::default();
    let mut envs = Vec::new();
    for (i, body) in bodies().into_iter().enumerate() {
        let seq = i as u64 + 1;
        let env = Envelope::seal(
            seq,
            1_789_990_000_000_000 + seq as i64,
            Actor {
                uid: 1000,
                gid: 1000,
                pid: 4242,
            },
            prev,
            body,
        )?;
        prev = env.hash;
        write(
            &dir,
            &format!("single-{seq:02}"),
            &encode_record(std::slice::from_ref(&env))?,
        )?;
        envs.push(env);
    }
    // Group-commit frames of several envelopes.
    write(&dir, "frame-3", &encode_record(&envs[..3])?)?;
    write(&dir, "frame-8", &encode_record(&envs[..8])?)?;
    write(&dir, "empty-frame", &encode_record(&[])?)?;

    let dir = corpus.join("policy_parse");
    let spec = std::fs::read("../core/tests/fixtures/spec-example.toml")?;
    write(&dir, "spec-example", &spec)?;
    let spec_text = String::from_utf8(spec)?;
    write(
        &dir,
        "spec-example-json-import",
        spec_text
            .replace("litellm-prices.json\"", "prices.json\"")
            .as_bytes(),
    )?;
    write(
        &dir,
        "spec-example-no-import",
        spec_text
            .replace(
                "import = \"litellm-prices.json\"",
                "import = \"prices.txt\"",
            )
            .as_bytes(),
    )?;
    let policies: &[&str] = &[
        "[[budget]]\nid = \"b\"\nwindow = \"calendar\"\ncalendar = \"month\"\nutc_offset = \"+02:00\"\nmax_usd = \"12.50\"\n",
        "[[budget]]\nid = \"r\"\nwindow = \"rolling\"\nwindow_seconds = 3600\nresolution_seconds = 60\nmax_tokens = 100\nwarn_at = 0.75\nenforce = \"warn\"\n",
        "[daemon]\nsocket_mode = \"0660\"\nsocket_group = \"agents\"\nadmin_uids = [0, 1000]\nunknown_models = \"price_at_max\"\n[tiers]\ndefault = \"small\"\npatterns = [{ match = \"claude-*\", tier = \"big\" }]\n[tiers.caps.big]\nmax_call_usd = 1\n",
        "[pricing.models.\"my-model\"]\ninput_per_mtok = 0.15\noutput_per_mtok = 0.6\nabove_tokens = 128000\ninput_per_mtok_above = 0.3\ncached_input_per_mtok_above = 0.1\n",
        "[daemon]\nsocket = \"a\"\ndata_dir = \n[[budget]]\n",
    ];
    for (i, p) in policies.iter().enumerate() {
        write(&dir, &format!("policy-{i:02}"), p.as_bytes())?;
    }

    let dir = corpus.join("litellm_import");
    write(
        &dir,
        "fixture",
        &std::fs::read("../core/tests/fixtures/litellm-prices.json")?,
    )?;
    // A slice of the real file: chunks of consecutive entries, each a complete JSON object.
    let full = std::fs::read_to_string("/work/shared/data/litellm-model-prices.json")?;
    let all: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&full)?;
    let entries: Vec<_> = all.into_iter().collect();
    for (i, chunk) in entries.chunks(8).step_by(40).enumerate() {
        let obj: serde_json::Map<_, _> = chunk.iter().cloned().collect();
        write(
            &dir,
            &format!("slice-{i:03}"),
            serde_json::to_string_pretty(&obj)?.as_bytes(),
        )?;
    }
    Ok(())
}
