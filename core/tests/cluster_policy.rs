//! `[cluster]` (SPEC §13) as the policy file says it: each key checked where it stands, and the
//! rule that in cluster mode every budget, subscription and quota lies within one partition.
#![allow(clippy::unwrap_used, clippy::panic)]

use bursar_core::policy::{parse_policy, PolicyError};

fn no_import(path: &str) -> Result<String, String> {
    Err(format!("no such file: {path}"))
}

const CLUSTER: &str = r#"
[cluster]
nats = ["nats://10.0.0.1:4222", "nats://10.0.0.2:4222", "nats://10.0.0.3:4222"]
node = "host-a"
partition_by = "org"
partitions = 4
"#;

/// Two budgets that lie within one partition of a cluster partitioned by `org`: one pins it,
/// one groups by it.
const WITHIN_ONE_PARTITION: &str = r#"[[budget]]
id = "acme-daily"
match = { org = "acme" }
max_usd = 5

[[budget]]
id = "per-org"
group_by = ["org", "team"]
max_usd = 5"#;

/// One allowance of a subscription: 45 requests per 5 hours.
const ALLOWANCE: &str = "[[subscription.allowance]]
window = \"rolling\"
window_seconds = 18000
max_requests = 45";

fn errors(text: &str) -> Vec<PolicyError> {
    match parse_policy(text, "bursar.toml", &no_import) {
        Ok(_) => panic!("expected errors for:\n{text}"),
        Err(errs) => errs,
    }
}

#[test]
fn a_cluster_section_resolves_with_its_defaults() {
    let text = format!(
        "{CLUSTER}\n[[budget]]\nid = \"org-daily\"\ngroup_by = [\"org\", \"team\"]\nmax_usd = 5\n"
    );
    let p = parse_policy(&text, "bursar.toml", &no_import).unwrap();
    let c = p.cluster.unwrap();
    assert_eq!(c.nats.len(), 3);
    assert_eq!(
        (c.node.as_str(), c.partition_by.as_str()),
        ("host-a", "org")
    );
    assert_eq!((c.partitions, c.replicas), (4, 3));
    assert_eq!(c.stream_prefix, "bursar");
    assert_eq!(c.memory_reserve_mib, 64);
    // A node may keep no reserve, or a larger one.
    for (set, want) in [("0", 0), ("256", 256)] {
        let text = text.replace(
            "partitions = 4",
            &format!("partitions = 4\nmemory_reserve_mib = {set}"),
        );
        let c = parse_policy(&text, "bursar.toml", &no_import)
            .unwrap()
            .cluster
            .unwrap();
        assert_eq!(c.memory_reserve_mib, want);
    }
    // Without [cluster], nothing of it.
    let single = parse_policy(
        "[[budget]]\nid = \"t\"\nmax_usd = 1\n",
        "b.toml",
        &no_import,
    );
    assert!(single.unwrap().cluster.is_none());
}

#[test]
fn cluster_mistakes_are_reported_at_their_key() {
    for (replace, with, key) in [
        (
            "nats = [\"nats://10.0.0.1:4222\", \"nats://10.0.0.2:4222\", \"nats://10.0.0.3:4222\"]",
            "nats = []",
            "cluster.nats",
        ),
        (
            "\"nats://10.0.0.2:4222\"",
            "\"http://10.0.0.2:4222\"",
            "cluster.nats[1]",
        ),
        ("node = \"host-a\"", "node = \"host a\"", "cluster.node"),
        (
            "partition_by = \"org\"",
            "partition_by = \"model\"",
            "cluster.partition_by",
        ),
        (
            "partition_by = \"org\"",
            "partition_by = \"Org!\"",
            "cluster.partition_by",
        ),
        ("partitions = 4", "partitions = 0", "cluster.partitions"),
        (
            "partitions = 4",
            "partitions = 4\nreplicas = 7",
            "cluster.replicas",
        ),
        (
            "partitions = 4",
            "partitions = 4\nstream_prefix = \"a.b\"",
            "cluster.stream_prefix",
        ),
        (
            "partitions = 4",
            "partitions = 4\nleader = \"host-a\"",
            "cluster.leader",
        ),
        (
            "partitions = 4",
            "partitions = 4\nmemory_reserve_mib = 5000",
            "cluster.memory_reserve_mib",
        ),
        (
            "partitions = 4",
            "partitions = 4\nmemory_reserve_mib = -1",
            "cluster.memory_reserve_mib",
        ),
    ] {
        let text = CLUSTER.replace(replace, with);
        let errs = errors(&text);
        assert!(
            errs.iter().any(|e| e.key == key),
            "{key} not named for:\n{text}\n{errs:#?}"
        );
    }
}

#[test]
fn in_cluster_mode_a_budget_must_pin_or_group_by_the_partition_label() {
    let policy = format!(
        r#"{CLUSTER}
{WITHIN_ONE_PARTITION}

[[budget]]
id = "everyone"
max_usd = 100

[[budget]]
id = "any-org"
match = {{ org = "*" }}
max_usd = 100

[[subscription]]
id = "chat"
match = {{ account = "chat" }}
fee_usd = 20
fee_period = "month"
{ALLOWANCE}

[[quota]]
id = "openai"
provider = "openai"

[[quota]]
id = "openai-acme"
provider = "openai"
match = {{ org = "acme" }}
"#
    );
    let errs = errors(&policy);
    let keys: Vec<&str> = errs.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "budget[2]",
            "budget[3]",
            "subscription[0].match",
            "quota[0].match"
        ],
        "{errs:#?}"
    );
    let e = &errs[0];
    assert!(e.message.contains("within one partition"), "{}", e.message);
    assert!(e.message.contains("`org`"), "{}", e.message);
    assert!(e.message.contains("\"everyone\""), "{}", e.message);
    assert!(e.line.is_some(), "{e:?}");
    // The same budgets on one host are fine.
    let single = policy.replace(CLUSTER, "");
    parse_policy(&single, "bursar.toml", &no_import).unwrap();
}

/// What a cluster node checks on a policy another node forwarded it (`spanning_partitions`,
/// on the resolved policy) agrees with the file's own check: a file that passes it passes, and
/// each kind of entry that would span partitions is named.
#[test]
fn a_resolved_policy_spans_partitions_exactly_where_its_file_would() {
    use bursar_core::policy::spanning_partitions;
    let within = format!(
        r#"{CLUSTER}
{WITHIN_ONE_PARTITION}

[[subscription]]
id = "acme-chat"
match = {{ org = "acme", account = "chat" }}
fee_usd = 20
fee_period = "month"
{ALLOWANCE}

[[subscription]]
id = "chat-per-org"
match = {{ account = "chat" }}
group_by = ["org"]
fee_usd = 20
fee_period = "month"
{ALLOWANCE}

[[quota]]
id = "openai-acme"
provider = "openai"
match = {{ org = "acme" }}
"#
    );
    let p = parse_policy(&within, "bursar.toml", &no_import).unwrap();
    assert_eq!(spanning_partitions(&p.resolved, "org"), None);
    // Partitioned by another label, the first budget would span partitions.
    let why = spanning_partitions(&p.resolved, "team").unwrap();
    assert!(why.contains("budget \"acme-daily\""), "{why}");

    // Each kind of entry that a cluster's file may not have, alone in a one-host policy.
    for (entry, named) in [
        (
            "[[budget]]\nid = \"everyone\"\nmax_usd = 100\n".to_string(),
            "budget \"everyone\"",
        ),
        (
            format!(
                "[[subscription]]\nid = \"chat\"\nmatch = {{ account = \"chat\" }}\n\
                 fee_usd = 20\nfee_period = \"month\"\n{ALLOWANCE}"
            ),
            "subscription \"chat\"",
        ),
        (
            "[[quota]]\nid = \"openai\"\nprovider = \"openai\"\n".to_string(),
            "quota \"openai\"",
        ),
    ] {
        let p = parse_policy(&entry, "bursar.toml", &no_import).unwrap();
        let why = spanning_partitions(&p.resolved, "org").unwrap();
        assert!(why.contains(named), "{entry}: {why}");
    }
}
