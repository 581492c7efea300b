//! The workload: a realistic policy, labels spread over scopes, and request encoding for both
//! targets (bursar's JSON Lines and the Redis baseline's EVALSHA calls).

use std::io::Write;

/// Model every request names (in the built-in price table).
pub const MODEL: &str = "gpt-4o-mini";
/// Its prices, micro-USD per million tokens (the built-in table's; checked at start).
pub const PRICE_IN: u64 = 150_000;
/// Output price, micro-USD per million tokens.
pub const PRICE_OUT: u64 = 600_000;
/// `max_output_tokens` of every reservation and check.
pub const MAX_OUTPUT: u64 = 800;

/// Limits of the policy, shared by bursar's `bursar.toml` and the Redis scripts. They are
/// generous on purpose: nothing is denied during a run, so both systems do the full work of an
/// allowed request every time.
pub mod limits {
    /// org-monthly: USD per calendar month per org.
    pub const ORG_MONTH_USD: u64 = 10_000_000;
    /// team-daily: USD per day per team.
    pub const TEAM_DAY_USD: u64 = 1_000_000;
    /// user-daily: USD per day per user.
    pub const USER_DAY_USD: u64 = 100_000;
    /// user-daily: requests per day per user.
    pub const USER_DAY_REQUESTS: u64 = 100_000_000;
    /// session: USD over the session's life.
    pub const SESSION_USD: u64 = 50_000;
    /// session: live reservations at once.
    pub const SESSION_CONCURRENT: u64 = 64;
    /// team-tpm: tokens per rolling minute per team.
    pub const TEAM_TPM: u64 = 1_000_000_000_000;
}

/// The bench policy: org, team, user and session budgets and a rolling tokens-per-minute limit.
pub fn policy_toml(socket: &str, data_dir: &str) -> String {
    use limits::*;
    format!(
        r#"# bursar-bench policy: org / team / user / session budgets and a rolling tpm limit.
[daemon]
socket = "{socket}"
data_dir = "{data_dir}"
reservation_ttl_seconds = 300
max_keys_per_budget = 10000000
unknown_models = "deny"

[[budget]]
id = "org-monthly"
match = {{ org = "*" }}
group_by = ["org"]
window = "calendar"
calendar = "month"
max_usd = {ORG_MONTH_USD}
warn_at = 0.9

[[budget]]
id = "team-daily"
group_by = ["team"]
window = "fixed"
window_seconds = 86400
max_usd = {TEAM_DAY_USD}
warn_at = 0.9

[[budget]]
id = "user-daily"
group_by = ["user"]
window = "fixed"
window_seconds = 86400
max_usd = {USER_DAY_USD}
max_requests = {USER_DAY_REQUESTS}
warn_at = 0.9

[[budget]]
id = "session"
group_by = ["session"]
max_usd = {SESSION_USD}
max_concurrent = {SESSION_CONCURRENT}

[[budget]]
id = "team-tpm"
group_by = ["team"]
window = "rolling"
window_seconds = 60
resolution_seconds = 1
max_tokens = {TEAM_TPM}
"#
    )
}

/// The shared seeded generator (`bursar-testkit`): a workload reproduces from its seed.
pub use bursar_testkit::Rng;

/// The labels of one scope: a session of a user of a team of an org.
#[derive(Debug, Clone, Copy)]
pub struct Scope {
    /// Org index.
    pub org: u64,
    /// Team index.
    pub team: u64,
    /// User index.
    pub user: u64,
    /// Session index.
    pub session: u64,
}

/// Scopes: `n` sessions, 4 sessions per user, 100 sessions per team (at least 1 team), 4 orgs.
pub fn scope(i: u64, n: u64) -> Scope {
    let teams = (n / 100).max(1);
    let team = i % teams;
    Scope {
        org: team % 4,
        team,
        user: i / 4,
        session: i,
    }
}

/// Distinct buckets that `n` scopes create under the bench policy (one per scope key and budget).
pub fn buckets_for(n: u64) -> u64 {
    let teams = (n / 100).max(1);
    let orgs = teams.min(4);
    let users = n.div_ceil(4);
    // org-monthly, team-daily, user-daily, session, team-tpm
    orgs + teams + users + n + teams
}

/// One operation a client sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    /// `record`.
    Record,
    /// `reserve` (followed by a `commit` of the same hold).
    Reserve,
    /// `commit`.
    Commit,
    /// `check`.
    Check,
    /// `hello` (client ceiling).
    Hello,
}

impl OpKind {
    /// Index into per-op tables.
    pub fn index(self) -> usize {
        match self {
            OpKind::Record => 0,
            OpKind::Reserve => 1,
            OpKind::Commit => 2,
            OpKind::Check => 3,
            OpKind::Hello => 4,
        }
    }
    /// Name as printed.
    pub fn name(self) -> &'static str {
        match self {
            OpKind::Record => "record",
            OpKind::Reserve => "reserve",
            OpKind::Commit => "commit",
            OpKind::Check => "check",
            OpKind::Hello => "hello",
        }
    }
    /// Ops with their own table rows (a pair row is added separately).
    pub const ALL: [OpKind; 5] = [
        OpKind::Record,
        OpKind::Reserve,
        OpKind::Commit,
        OpKind::Check,
        OpKind::Hello,
    ];
}

/// Which mix of operations a run sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mix {
    /// Only `record`.
    Record,
    /// Only `reserve` + `commit` pairs.
    ReserveCommit,
    /// Only `check`.
    Check,
    /// 70 % check, 20 % reserve+commit, 10 % record.
    Mixed,
    /// Only `hello`: what the client (and the socket path) can do at most.
    Hello,
}

impl Mix {
    /// The next operation to start.
    pub fn pick(self, rng: &mut Rng) -> OpKind {
        match self {
            Mix::Record => OpKind::Record,
            Mix::ReserveCommit => OpKind::Reserve,
            Mix::Check => OpKind::Check,
            Mix::Hello => OpKind::Hello,
            Mix::Mixed => match rng.below(100) {
                0..=69 => OpKind::Check,
                70..=89 => OpKind::Reserve,
                _ => OpKind::Record,
            },
        }
    }
}

/// A concrete request: everything both encoders need.
#[derive(Debug, Clone, Copy)]
pub struct Op {
    /// What it is.
    pub kind: OpKind,
    /// Its scope.
    pub scope: Scope,
    /// Unique number of this op (connection-local counter).
    pub n: u64,
    /// Connection id.
    pub conn: u32,
    /// Input tokens.
    pub input: u64,
    /// Output tokens (actual usage for record/commit).
    pub output: u64,
}

/// Draws ops for one connection.
#[derive(Debug, Clone)]
pub struct OpGen {
    rng: Rng,
    mix: Mix,
    scopes: u64,
    conn: u32,
    counter: u64,
}

impl OpGen {
    /// A generator for connection `conn`.
    pub fn new(mix: Mix, scopes: u64, conn: u32, seed: u64) -> Self {
        OpGen {
            rng: Rng::new(seed ^ (u64::from(conn) << 32) ^ 0x5151),
            mix,
            scopes: scopes.max(1),
            conn,
            counter: 0,
        }
    }

    /// The next op to start.
    pub fn next_op(&mut self) -> Op {
        let kind = self.mix.pick(&mut self.rng);
        self.op_of(kind)
    }

    /// A new op of a given kind.
    pub fn op_of(&mut self, kind: OpKind) -> Op {
        self.counter += 1;
        let i = self.rng.below(self.scopes);
        Op {
            kind,
            scope: scope(i, self.scopes),
            n: self.counter,
            conn: self.conn,
            input: self.rng.range(500, 3000),
            output: self.rng.range(50, MAX_OUTPUT),
        }
    }
}

/// The commit that follows a granted reservation.
pub fn commit_of(reserve: &Op) -> Op {
    Op {
        kind: OpKind::Commit,
        ..*reserve
    }
}

/// Encodes requests for one target.
#[derive(Debug, Clone)]
pub enum Encoder {
    /// bursar JSON Lines; `run` makes ids unique across runs against one daemon.
    Bursar {
        /// Run tag.
        run: u32,
    },
    /// Redis EVALSHA calls.
    Redis {
        /// Run tag.
        run: u32,
        /// SHA1 of each script (`record`, `reserve`, `commit`, `check`).
        shas: crate::resp::ScriptShas,
    },
}

fn labels_json(out: &mut Vec<u8>, s: &Scope) {
    let _ = write!(
        out,
        r#""labels":{{"org":"o{}","team":"t{}","user":"u{}","session":"s{}"}}"#,
        s.org, s.team, s.user, s.session
    );
}

impl Encoder {
    /// Append the request for `op` to `out`.
    pub fn encode(&self, op: &Op, out: &mut Vec<u8>) {
        match self {
            Encoder::Bursar { run } => encode_bursar(*run, op, out),
            Encoder::Redis { run, shas } => crate::resp::encode_op(*run, shas, op, out),
        }
    }
}

fn encode_bursar(run: u32, op: &Op, out: &mut Vec<u8>) {
    let (conn, n) = (op.conn, op.n);
    match op.kind {
        OpKind::Record => {
            let _ = write!(out, r#"{{"op":"record","event_id":"e{run}-{conn}-{n}","#);
            labels_json(out, &op.scope);
            let _ = write!(
                out,
                r#","model":"{MODEL}","usage":{{"input_tokens":{},"output_tokens":{}}}}}"#,
                op.input, op.output
            );
        }
        OpKind::Reserve => {
            let _ = write!(
                out,
                r#"{{"op":"reserve","reservation_id":"r{run}-{conn}-{n}","#
            );
            labels_json(out, &op.scope);
            let _ = write!(
                out,
                r#","model":"{MODEL}","estimate":{{"input_tokens":{},"max_output_tokens":{MAX_OUTPUT}}}}}"#,
                op.input
            );
        }
        OpKind::Commit => {
            let _ = write!(
                out,
                r#"{{"op":"commit","reservation_id":"r{run}-{conn}-{n}","event_id":"c{run}-{conn}-{n}","usage":{{"input_tokens":{},"output_tokens":{}}}}}"#,
                op.input, op.output
            );
        }
        OpKind::Check => {
            let _ = write!(out, r#"{{"op":"check","#);
            labels_json(out, &op.scope);
            let _ = write!(
                out,
                r#","model":"{MODEL}","estimate":{{"input_tokens":{},"max_output_tokens":{MAX_OUTPUT}}}}}"#,
                op.input
            );
        }
        OpKind::Hello => {
            out.extend_from_slice(br#"{"op":"hello","client":"bursar-bench"}"#);
        }
    }
    out.push(b'\n');
}

/// How an answer came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Done (a write: durable and acknowledged); for reserve/check: allowed.
    Ok,
    /// Answered, but denied (reserve/check).
    Denied,
    /// An error answer.
    Error,
}

/// One complete answer at the start of `buf`: its length (including the terminator) and outcome.
pub fn parse_bursar(buf: &[u8]) -> Option<(usize, Outcome)> {
    let end = buf.iter().position(|b| *b == b'\n')?;
    let line = &buf[..end];
    let outcome = if !line.starts_with(br#"{"ok":true"#) {
        Outcome::Error
    } else {
        let head = &line[..line.len().min(96)];
        if find(head, br#""decision":"deny""#) {
            Outcome::Denied
        } else {
            Outcome::Ok
        }
    };
    Some((end + 1, outcome))
}

/// Does `hay` contain `needle`?
pub fn find(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}
