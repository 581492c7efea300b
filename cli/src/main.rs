//! `bursar`: the companion CLI of `bursard` (SPEC §9).
//!
//! Exit codes: 0 success; 1 an error (one line on stderr); 2 a usage error (bad flags);
//! 3 `check` or `reserve` answered `deny`. See `bursar --help`.

use bursar_cli::offline::{Offline, OfflineError};
use bursar_cli::render::{self, now_micros};
use bursar_cli::{csv, policy_toml, resolve_socket, Client, ClientError};
use bursar_schemas::event::EventBody;
use bursar_schemas::policy::{PolicyFile, PricingSection};
use bursar_schemas::wire::{
    CheckRequest, CommitRequest, Decision, DecisionAnswer, Estimate, ExportRequest, ExportedEvent,
    ExtendRequest, ObserveRequest, ObservedQuota, ObservedWindow, RecordRequest, ReleaseRequest,
    ReplayRequest, Request, ReserveRequest, StatusRequest, TailRequest, Usage, UsageAnswer,
};
use bursar_schemas::Labels;
use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};
use serde_json::Value;
use std::collections::BTreeSet;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Exit code of `check` and `reserve` when the answer is `deny`.
const EXIT_DENIED: u8 = 3;
/// Exit code of an error.
const EXIT_ERROR: u8 = 1;

const AFTER_HELP: &str = "\
Socket: --socket, else $BURSAR_SOCKET, else $XDG_RUNTIME_DIR/bursar.sock, else ./bursar.sock.
Offline: with --data-dir DIR, `status`, `export`, `verify`, `tail`, `replay` (dry run),
`policy show` and `tiers` read a stopped daemon's data dir directly.
Money is shown in exact dollars; --json prints the daemon's answers as they are (micro-USD).
Exit codes: 0 ok, 1 error, 2 usage error, 3 `check`/`reserve` denied.";

/// bursar: budgets for LLM agents. Talks to the `bursard` daemon over its Unix socket.
#[derive(Parser, Debug)]
#[command(name = "bursar", version, after_help = AFTER_HELP)]
struct Cli {
    /// The daemon's socket.
    #[arg(long, global = true, env = "BURSAR_SOCKET", value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Machine output: the daemon's answers as JSON (events as JSON Lines).
    #[arg(long, global = true)]
    json: bool,
    /// Offline mode: read a stopped daemon's data dir instead of asking the daemon.
    #[arg(long, global = true, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Budgets at a glance: spent / limit, held, utilization, state, next reset.
    Status(StatusArgs),
    /// Would this call be allowed? Holds nothing, records nothing. Exit 3 on deny.
    Check(CheckArgs),
    /// Hold the worst case of a call before making it. Exit 3 on deny.
    Reserve(ReserveArgs),
    /// Record the actual usage of a reserved call and release its hold.
    Commit(CommitArgs),
    /// Cancel a hold.
    Release(ReleaseArgs),
    /// Give a live hold a new lifetime.
    Extend(ExtendArgs),
    /// Tell the daemon what a provider said about a quota's rate limits (its response headers,
    /// or limits you read elsewhere).
    Observe(ObserveArgs),
    /// Record usage that already happened (no reservation).
    Record(RecordArgs),
    /// Show the last events of the log; -f keeps following new ones.
    Tail(TailArgs),
    /// Export the audit trail as JSON Lines or CSV.
    Export(ExportArgs),
    /// Check the log's hash chain from the first event to the last.
    Verify,
    /// Fold the log again under new prices and show what changes.
    Replay(ReplayArgs),
    /// Spend per hour, day, week or month, grouped by labels: a table, CSV, JSON or a chart.
    Report(ReportArgs),
    /// Copy the intact prefix of a damaged log (--data-dir DIR, daemon stopped) into a new data
    /// dir, and say what was left behind.
    Salvage {
        /// The new data dir (must not exist, or be empty).
        #[arg(long, value_name = "NEW_DIR")]
        to: PathBuf,
    },
    /// Check a policy file, or show the policy in force.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Cost tiers: each with its metadata and the priced models it holds (of the policy in
    /// force, or of --config FILE).
    Tiers(TiersArgs),
    /// Make the daemon read its policy file again (admin only; in cluster mode every
    /// partition's writer reads its node's file).
    Reload,
    /// Cluster mode (SPEC §13).
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Price tables.
    #[command(subcommand)]
    Pricing(PricingCommand),
    /// Print a shell completion script, e.g. `bursar completions bash > ~/.local/share/bash-completion/completions/bursar`.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

#[derive(Subcommand, Debug)]
enum ClusterCommand {
    /// Partitions, their lease holders (writers), and each node's fold and lag.
    Status,
}

#[derive(Subcommand, Debug)]
enum PolicyCommand {
    /// Validate a bursar.toml; errors name the line and the key. Exit 1 when invalid.
    Check {
        /// The policy file.
        file: PathBuf,
    },
    /// A commented starter bursar.toml: on stdout, or written to PATH (never over an existing
    /// file unless --force).
    Init {
        /// Write it here instead of stdout (`-`: stdout).
        path: Option<PathBuf>,
        /// Replace PATH if it exists.
        #[arg(long, requires = "path")]
        force: bool,
    },
    /// Print the policy in force (the last `policy_applied` event of the log) as bursar.toml.
    Show {
        /// Include the full price table.
        #[arg(long)]
        prices: bool,
    },
}

// clap shows these doc comments verbatim as `--help`, where `[pricing]` is the TOML section.
#[allow(rustdoc::broken_intra_doc_links)]
#[derive(Subcommand, Debug)]
enum PricingCommand {
    /// Convert a LiteLLM model_prices_and_context_window.json to [pricing] TOML on stdout.
    Import {
        /// The LiteLLM JSON file.
        file: PathBuf,
    },
}

#[derive(Args, Debug)]
struct StatusArgs {
    /// Keep buckets that carry this label with this value: in their scope (a `group_by` label of
    /// their budget) or pinned by their budget's `match` (repeatable; all must hold).
    #[arg(long = "label", value_name = "K=V", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Keep one budget (an id the policy in force lacks is an error).
    #[arg(long, value_name = "ID")]
    budget: Option<String>,
    /// At most this many buckets, most utilized first (default 1000); a cut table says how many
    /// there were.
    #[arg(long, value_name = "N")]
    limit: Option<usize>,
    /// Refresh until interrupted (Ctrl-C). On a terminal the table is redrawn in place on the
    /// alternate screen, which is left on exit; elsewhere one table follows another.
    #[arg(long)]
    watch: bool,
    /// Seconds between refreshes with --watch.
    #[arg(
        long,
        value_name = "SECONDS",
        default_value_t = 2.0,
        requires = "watch"
    )]
    interval: f64,
    /// Stop after this many refreshes with --watch.
    #[arg(long, value_name = "N", requires = "watch")]
    count: Option<u64>,
}

/// Labels, model and estimate shared by `check` and `reserve`.
#[derive(Args, Debug)]
struct CallArgs {
    /// A label of the call (repeatable), e.g. --label team=search.
    #[arg(long = "label", value_name = "K=V", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// The model (or give --candidate).
    #[arg(long)]
    model: Option<String>,
    /// Input tokens of the prompt.
    #[arg(long, value_name = "N", default_value_t = 0)]
    input_tokens: u64,
    /// Most output tokens the call may produce (default and cap: the model's maximum).
    #[arg(long, value_name = "N")]
    max_output_tokens: Option<u64>,
    /// A fallback candidate model, in order of preference (repeatable).
    #[arg(long = "candidate", value_name = "MODEL")]
    candidates: Vec<String>,
    /// A capability every candidate must have (repeatable), e.g. --require tools.
    #[arg(long = "require", value_name = "CAPABILITY")]
    require: Vec<String>,
    /// Wait in line up to this many milliseconds (at most 60000) when only limits that free up
    /// by themselves stand in the way (a max_concurrent slot, a rolling window, a quota).
    #[arg(long, value_name = "MS")]
    wait_ms: Option<u64>,
}

#[derive(Args, Debug)]
struct CheckArgs {
    #[command(flatten)]
    call: CallArgs,
}

#[derive(Args, Debug)]
struct ReserveArgs {
    #[command(flatten)]
    call: CallArgs,
    /// Id of the hold (default: a generated unique id, printed).
    #[arg(long, value_name = "ID")]
    reservation_id: Option<String>,
    /// Hold lifetime in seconds (default: the policy's reservation_ttl_seconds).
    #[arg(long, value_name = "SECONDS")]
    ttl_seconds: Option<u64>,
}

/// Token counts of a call that happened.
#[derive(Args, Debug)]
struct UsageArgs {
    /// Uncached input tokens.
    #[arg(long, value_name = "N", default_value_t = 0)]
    input_tokens: u64,
    /// Output tokens.
    #[arg(long, value_name = "N", default_value_t = 0)]
    output_tokens: u64,
    /// Cached-input (cache read) tokens.
    #[arg(long, value_name = "N", default_value_t = 0)]
    cached_input_tokens: u64,
    /// Cache-write (cache creation) tokens.
    #[arg(long, value_name = "N", default_value_t = 0)]
    cache_write_tokens: u64,
    /// Number of requests.
    #[arg(long, value_name = "N", default_value_t = 1)]
    requests: u64,
    /// Id of the usage event (default: a generated unique id). Re-sending the same id and
    /// payload counts once.
    #[arg(long, value_name = "ID")]
    event_id: Option<String>,
    /// When the call happened as the client saw it, RFC 3339 (audit only).
    #[arg(long, value_name = "TIME")]
    occurred_at: Option<String>,
    /// The provider's own figure for the cost, in dollars (audit only).
    #[arg(long, value_name = "USD")]
    reported_cost_usd: Option<String>,
}

impl UsageArgs {
    fn usage(&self) -> Usage {
        Usage {
            input_tokens: self.input_tokens,
            output_tokens: self.output_tokens,
            cached_input_tokens: self.cached_input_tokens,
            cache_write_tokens: self.cache_write_tokens,
            requests: self.requests,
        }
    }
}

#[derive(Args, Debug)]
struct RecordArgs {
    /// A label of the call (repeatable), e.g. --label team=search.
    #[arg(long = "label", value_name = "K=V", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// The model.
    #[arg(long)]
    model: String,
    #[command(flatten)]
    usage: UsageArgs,
}

#[derive(Args, Debug)]
struct CommitArgs {
    /// The hold being committed.
    #[arg(long, value_name = "ID")]
    reservation_id: String,
    /// Model, used only when the daemon does not know the reservation.
    #[arg(long)]
    model: Option<String>,
    /// Labels, used only when the daemon does not know the reservation (repeatable).
    #[arg(long = "label", value_name = "K=V", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    #[command(flatten)]
    usage: UsageArgs,
}

#[derive(Args, Debug)]
struct ObserveArgs {
    /// The provider (the derived label `provider` of the calls the quota governs).
    #[arg(long)]
    provider: String,
    /// A label that picks the quota (repeatable), e.g. --label account=prod.
    #[arg(long = "label", value_name = "K=V", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// A response header (repeatable), e.g. --header 'x-ratelimit-remaining-requests: 59'.
    #[arg(long = "header", value_name = "NAME: VALUE", value_parser = parse_header, conflicts_with = "limits")]
    headers: Vec<(String, String)>,
    /// A limit (repeatable): KIND=REMAINING[/LIMIT]@RESET, KIND one of requests, tokens,
    /// input_tokens, output_tokens and RESET an RFC 3339 time, e.g.
    /// --limit requests=0/10000@2026-12-04T10:00:00Z.
    #[arg(long = "limit", value_name = "SPEC", value_parser = parse_limit)]
    limits: Vec<(String, ObservedWindow)>,
}

#[derive(Args, Debug)]
struct ReleaseArgs {
    /// The hold to cancel.
    #[arg(long, value_name = "ID")]
    reservation_id: String,
}

#[derive(Args, Debug)]
struct ExtendArgs {
    /// The hold.
    #[arg(long, value_name = "ID")]
    reservation_id: String,
    /// New lifetime from now, in seconds (at most 86400).
    #[arg(long, value_name = "SECONDS")]
    ttl_seconds: u64,
}

#[derive(Args, Debug)]
struct TailArgs {
    /// Keep following: print new events as they are written, until interrupted.
    #[arg(short = 'f', long)]
    follow: bool,
    /// Start at this seq (default: the last 10 events; with -f, only new ones).
    #[arg(long, value_name = "SEQ", conflicts_with = "lines")]
    from_seq: Option<u64>,
    /// The last N events (default 10; with -f, then the new ones).
    #[arg(short = 'n', long, value_name = "N")]
    lines: Option<u64>,
    /// Only events of these types, e.g. `--type budget_warned,budget_exhausted` (with `-f
    /// --json`: one line per crossing, for alerting scripts). `-n` and `--from-seq` count every
    /// event of the log, before this filter.
    #[arg(long = "type", value_name = "TYPE", value_delimiter = ',')]
    types: Vec<String>,
    /// Cluster mode: only this partition's log (`-n` and `--from-seq` count its events).
    #[arg(long, value_name = "N")]
    partition: Option<u32>,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum Format {
    /// One JSON object per event and line.
    Jsonl,
    /// A header line, then one line per event; text a spreadsheet would run as a formula
    /// (a leading `=`, `+`, `-`, `@`, tab or CR) gets a `'` in front.
    Csv,
}

#[derive(Args, Debug)]
struct ExportArgs {
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Jsonl)]
    format: Format,
    /// Events at or after this time: RFC 3339, or a duration before now (`1h`, `2days`).
    #[arg(long, value_name = "TIME")]
    since: Option<String>,
    /// Events before this time: RFC 3339, or a duration before now.
    #[arg(long, value_name = "TIME")]
    until: Option<String>,
    /// Keep events carrying this label with this value (repeatable; all must hold).
    #[arg(long = "label", value_name = "K=V", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Write to FILE (atomically: a temporary file renamed at the end) instead of stdout.
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    output: Option<PathBuf>,
    /// Cluster mode: only this partition's log, one unbroken hash chain (default: every
    /// partition's, one after the other, each line with its `partition`).
    #[arg(long, value_name = "N")]
    partition: Option<u32>,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum ReportFormat {
    /// A table (with --chart on a terminal, bars too).
    Table,
    /// One line per period and group.
    Csv,
    /// The daemon's answer.
    Json,
    /// A stacked bar chart of cost per period by group.
    Svg,
    /// The same chart as a PNG image.
    Png,
}

#[derive(Args, Debug)]
struct ReportArgs {
    /// Group by these labels, e.g. `team` or `team,user` (also `model`, `provider`, `tier`).
    #[arg(long = "by", value_name = "LABELS", value_delimiter = ',')]
    by: Vec<String>,
    /// Period: hour, day, week (from Monday) or month.
    #[arg(long, value_name = "PERIOD", default_value = "day")]
    every: String,
    /// Periods of this IANA time zone (default UTC), e.g. Europe/Paris.
    #[arg(long, value_name = "ZONE")]
    timezone: Option<String>,
    /// From this time: RFC 3339, or a duration before now (`30d`, `24h`).
    #[arg(long, value_name = "TIME", default_value = "30d")]
    since: String,
    /// Until this time (exclusive): RFC 3339, or a duration before now (default: now).
    #[arg(long, value_name = "TIME")]
    until: Option<String>,
    /// Keep usage carrying this label with this value (repeatable; all must hold).
    #[arg(long = "label", value_name = "K=V", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = ReportFormat::Table)]
    format: ReportFormat,
    /// With the table: a bar chart of cost per period.
    #[arg(long)]
    chart: bool,
    /// Write to FILE instead of stdout (svg and png need it unless stdout is not a terminal).
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    output: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct TiersArgs {
    /// Read the tiers and prices of this bursar.toml (checked as `policy check` does) instead
    /// of the policy in force.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

// As `PricingCommand`: `[pricing]` is the TOML section, in `--help` verbatim.
#[allow(rustdoc::broken_intra_doc_links)]
#[derive(Args, Debug)]
struct ReplayArgs {
    /// New prices: a TOML file with a [pricing] section (as in bursar.toml), or a LiteLLM
    /// JSON price file. Merged over the prices in force.
    #[arg(long, value_name = "FILE", required_unless_present = "policy")]
    pricing: Option<PathBuf>,
    /// What-if: what this bursar.toml would have denied, exhausted and peaked at, had it been
    /// in force (changes nothing; `bursar reload` applies a policy).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["pricing", "apply"])]
    policy: Option<PathBuf>,
    /// The new prices apply to events at or after this time (RFC 3339, or a duration before
    /// now such as `7days`; default: all).
    #[arg(long, value_name = "TIME")]
    since: Option<String>,
    /// Append a pricing_changed event so the live figures follow (admin only).
    #[arg(long)]
    apply: bool,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

fn parse_header(s: &str) -> Result<(String, String), String> {
    match s.split_once(':') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.trim().to_string())),
        _ => Err(format!("expected NAME: VALUE, got {s:?}")),
    }
}

fn parse_limit(s: &str) -> Result<(String, ObservedWindow), String> {
    let bad = || format!("expected KIND=REMAINING[/LIMIT]@RESET, got {s:?}");
    let (kind, rest) = s.split_once('=').ok_or_else(bad)?;
    if !bursar_core::ledger::quotas::LIMIT_NAMES.contains(&kind) {
        return Err(format!(
            "unknown limit {kind:?}: one of requests, tokens, input_tokens, output_tokens"
        ));
    }
    let (counts, reset_at) = rest.split_once('@').ok_or_else(bad)?;
    let (remaining, limit) = match counts.split_once('/') {
        Some((r, l)) => (r, Some(l.parse::<u64>().map_err(|_| bad())?)),
        None => (counts, None),
    };
    let remaining = remaining.parse::<u64>().map_err(|_| bad())?;
    Ok((
        kind.to_string(),
        ObservedWindow {
            limit,
            remaining,
            reset_at: reset_at.to_string(),
        },
    ))
}

fn labels_of(pairs: &[(String, String)]) -> Labels {
    pairs.iter().cloned().collect()
}

/// Why a command failed.
enum Fail {
    /// A message for stderr.
    Msg(String),
    /// Stdout was closed (e.g. `| head`): stop quietly.
    Pipe,
}

impl From<std::io::Error> for Fail {
    fn from(e: std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            Fail::Pipe
        } else {
            Fail::Msg(format!(
                "cannot write output: {}",
                bursar_cli::os_message(&e)
            ))
        }
    }
}

impl From<ClientError> for Fail {
    fn from(e: ClientError) -> Self {
        if let ClientError::Io(io) = &e {
            if io.kind() == std::io::ErrorKind::BrokenPipe {
                return Fail::Msg(
                    "the connection to bursard broke (did the daemon stop?)".to_string(),
                );
            }
        }
        Fail::Msg(e.to_string())
    }
}

impl From<OfflineError> for Fail {
    fn from(e: OfflineError) -> Self {
        Fail::Msg(e.to_string())
    }
}

fn msg(text: impl Into<String>) -> Fail {
    Fail::Msg(text.into())
}

type Res<T> = Result<T, Fail>;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let result = run(&cli, &mut out);
    let flushed = out.flush();
    match result {
        Ok(code) => match flushed {
            Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                eprintln!(
                    "bursar: cannot write output: {}",
                    bursar_cli::os_message(&e)
                );
                ExitCode::from(EXIT_ERROR)
            }
            _ => ExitCode::from(code),
        },
        Err(Fail::Pipe) => ExitCode::SUCCESS,
        Err(Fail::Msg(m)) => {
            eprintln!("bursar: {m}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

/// Where a command gets its data.
enum Source {
    Daemon(PathBuf),
    Offline(PathBuf),
}

fn run(cli: &Cli, out: &mut dyn Write) -> Res<u8> {
    let source = match &cli.data_dir {
        Some(d) => Source::Offline(d.clone()),
        None => Source::Daemon(resolve_socket(cli.socket.as_deref())),
    };
    let json = cli.json;
    let online = |name: &str| -> Res<Client> {
        match &source {
            Source::Daemon(path) => Ok(Client::connect(path)?),
            Source::Offline(_) => Err(msg(format!(
                "`bursar {name}` needs the daemon; --data-dir works with status, export, verify, \
                 tail, replay (dry run), policy show, tiers and salvage"
            ))),
        }
    };
    match &cli.command {
        Command::Status(a) => status(&source, a, json, out),
        Command::Check(a) => {
            let mut c = online("check")?;
            let req = CheckRequest {
                labels: labels_of(&a.call.labels),
                model: a.call.model.clone(),
                estimate: estimate(&a.call),
                candidates: candidates(&a.call),
                require: require(&a.call),
                wait_ms: a.call.wait_ms,
            };
            let v = c.call_raw(&Request::Check(req))?;
            decision_out(None, v, json, out)
        }
        Command::Reserve(a) => {
            let mut c = online("reserve")?;
            let rid = a
                .reservation_id
                .clone()
                .unwrap_or_else(|| bursar_cli::new_id("r"));
            let req = ReserveRequest {
                reservation_id: rid.clone(),
                labels: labels_of(&a.call.labels),
                model: a.call.model.clone(),
                estimate: estimate(&a.call),
                ttl_seconds: a.ttl_seconds,
                candidates: candidates(&a.call),
                require: require(&a.call),
                wait_ms: a.call.wait_ms,
            };
            let v = c.call_raw(&Request::Reserve(req))?;
            decision_out(Some(&rid), v, json, out)
        }
        Command::Commit(a) => {
            let mut c = online("commit")?;
            let eid = a
                .usage
                .event_id
                .clone()
                .unwrap_or_else(|| bursar_cli::new_id("e"));
            let req = CommitRequest {
                reservation_id: a.reservation_id.clone(),
                event_id: eid.clone(),
                usage: a.usage.usage(),
                labels: (!a.labels.is_empty()).then(|| labels_of(&a.labels)),
                model: a.model.clone(),
                occurred_at: a.usage.occurred_at.clone(),
                reported_cost_usd: a.usage.reported_cost_usd.clone(),
                headers: None,
            };
            let v = c.call_raw(&Request::Commit(req))?;
            usage_out("committed", &eid, v, json, out)
        }
        Command::Record(a) => {
            let mut c = online("record")?;
            let eid = a
                .usage
                .event_id
                .clone()
                .unwrap_or_else(|| bursar_cli::new_id("e"));
            let req = RecordRequest {
                event_id: eid.clone(),
                labels: labels_of(&a.labels),
                model: a.model.clone(),
                usage: a.usage.usage(),
                occurred_at: a.usage.occurred_at.clone(),
                reported_cost_usd: a.usage.reported_cost_usd.clone(),
                headers: None,
            };
            let v = c.call_raw(&Request::Record(req))?;
            usage_out("recorded", &eid, v, json, out)
        }
        Command::Release(a) => {
            let mut c = online("release")?;
            let v = c.call_raw(&Request::Release(ReleaseRequest {
                reservation_id: a.reservation_id.clone(),
            }))?;
            if json {
                return json_line(out, &v);
            }
            let seq = v.get("seq").and_then(Value::as_u64).unwrap_or(0);
            writeln!(out, "released {} (seq {seq})", a.reservation_id)?;
            Ok(0)
        }
        Command::Extend(a) => {
            let mut c = online("extend")?;
            let v = c.call_raw(&Request::Extend(ExtendRequest {
                reservation_id: a.reservation_id.clone(),
                ttl_seconds: a.ttl_seconds,
            }))?;
            if json {
                return json_line(out, &v);
            }
            let exp = v.get("expires_at").and_then(Value::as_str).unwrap_or("?");
            let seq = v.get("seq").and_then(Value::as_u64).unwrap_or(0);
            writeln!(
                out,
                "extended {}: expires {exp} (seq {seq})",
                a.reservation_id
            )?;
            Ok(0)
        }
        Command::Observe(a) => {
            let mut c = online("observe")?;
            let (quota, headers) = if a.headers.is_empty() {
                let mut q = ObservedQuota::default();
                for (kind, w) in &a.limits {
                    let slot = match kind.as_str() {
                        "requests" => &mut q.requests,
                        "tokens" => &mut q.tokens,
                        "input_tokens" => &mut q.input_tokens,
                        _ => &mut q.output_tokens,
                    };
                    *slot = Some(w.clone());
                }
                (Some(q), None)
            } else {
                (None, Some(a.headers.iter().cloned().collect()))
            };
            let v = c.call_raw(&Request::Observe(ObserveRequest {
                provider: a.provider.clone(),
                labels: labels_of(&a.labels),
                quota,
                headers,
            }))?;
            if json {
                return json_line(out, &v);
            }
            let quotas: Vec<&str> = v
                .get("quotas")
                .and_then(Value::as_array)
                .map(|q| q.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            if quotas.is_empty() {
                writeln!(out, "nothing observed: no rate limit was read")?;
            } else {
                let seq = v.get("seq").and_then(Value::as_u64).unwrap_or(0);
                writeln!(out, "observed {} (seq {seq})", quotas.join(", "))?;
            }
            if let Some(obs) = v.get("observed").and_then(Value::as_object) {
                for (name, w) in obs {
                    let n = |k: &str| w.get(k).and_then(Value::as_u64);
                    let of = n("limit").map(|l| format!("/{l}")).unwrap_or_default();
                    let reset = w.get("reset_at").and_then(Value::as_str).unwrap_or("?");
                    writeln!(
                        out,
                        "  {name}: {}{of} left until {reset}",
                        n("remaining").unwrap_or(0)
                    )?;
                }
            }
            for i in v
                .get("ignored")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let f = |k: &str| i.get(k).and_then(Value::as_str).unwrap_or("?");
                writeln!(
                    out,
                    "  ignored {}: {:?}: {}",
                    f("header"),
                    f("value"),
                    f("reason")
                )?;
            }
            Ok(0)
        }
        Command::Tail(a) => tail(&source, a, json, out),
        Command::Export(a) => export(&source, a, out),
        Command::Verify => verify(&source, json, out),
        Command::Cluster(ClusterCommand::Status) => {
            cluster_status(online("cluster status")?, json, out)
        }
        Command::Replay(a) => replay(&source, a, json, out),
        Command::Report(a) => report(&source, a, json, out),
        Command::Salvage { to } => salvage(&source, to, json, out),
        Command::Policy(PolicyCommand::Check { file }) => policy_check(file, json, out),
        Command::Policy(PolicyCommand::Init { path, force }) => {
            policy_init(path.as_deref(), *force, out)
        }
        Command::Policy(PolicyCommand::Show { prices }) => policy_show(&source, *prices, json, out),
        Command::Tiers(a) => tiers(&source, a, json, out),
        Command::Reload => {
            let mut c = online("reload")?;
            let before = c.hello(Some("bursar-cli"))?;
            let v = c.call_raw(&Request::Reload)?;
            if json {
                return json_line(out, &v);
            }
            let after = v.get("policy_version").and_then(Value::as_u64).unwrap_or(0);
            if after == before.policy_version {
                writeln!(out, "policy version {after} in force (unchanged)")?;
            } else {
                writeln!(
                    out,
                    "policy version {after} in force (was {})",
                    before.policy_version
                )?;
            }
            Ok(0)
        }
        Command::Pricing(PricingCommand::Import { file }) => pricing_import(file, out),
        Command::Completions { shell } => {
            // Into memory first: `generate` panics when its writer fails (`| head`).
            let mut script = Vec::new();
            clap_complete::generate(*shell, &mut Cli::command(), "bursar", &mut script);
            out.write_all(&script)?;
            Ok(0)
        }
    }
}

fn estimate(a: &CallArgs) -> Estimate {
    Estimate {
        input_tokens: a.input_tokens,
        max_output_tokens: a.max_output_tokens,
    }
}

fn candidates(a: &CallArgs) -> Option<Vec<String>> {
    (!a.candidates.is_empty()).then(|| a.candidates.clone())
}

fn require(a: &CallArgs) -> Option<Vec<String>> {
    (!a.require.is_empty()).then(|| a.require.clone())
}

fn json_line(out: &mut dyn Write, v: &impl serde::Serialize) -> Res<u8> {
    let text = serde_json::to_string(v).map_err(|e| msg(format!("cannot encode JSON: {e}")))?;
    writeln!(out, "{text}")?;
    Ok(0)
}

fn decision_out(rid: Option<&str>, v: Value, json: bool, out: &mut dyn Write) -> Res<u8> {
    let a: DecisionAnswer = bursar_cli::decode_answer(v.clone())?;
    let code = if a.decision == Decision::Deny {
        EXIT_DENIED
    } else {
        0
    };
    if json {
        json_line(out, &v)?;
    } else {
        write!(out, "{}", render::decision_answer(rid, &a, now_micros()))?;
    }
    Ok(code)
}

fn usage_out(verb: &str, eid: &str, v: Value, json: bool, out: &mut dyn Write) -> Res<u8> {
    if json {
        return json_line(out, &v);
    }
    let a: UsageAnswer = bursar_cli::decode_answer(v)?;
    write!(out, "{}", render::usage_answer(verb, eid, &a, now_micros()))?;
    Ok(0)
}

fn open_offline(dir: &Path) -> Res<Offline> {
    Ok(Offline::open(dir)?)
}

fn status(source: &Source, a: &StatusArgs, json: bool, out: &mut dyn Write) -> Res<u8> {
    let req = StatusRequest {
        labels: (!a.labels.is_empty()).then(|| labels_of(&a.labels)),
        budget: a.budget.clone(),
        limit: a.limit,
    };
    let path = match source {
        Source::Offline(dir) => {
            if a.watch {
                return Err(msg(
                    "status --watch needs the daemon (a stopped daemon's data does not change)",
                ));
            }
            let answer = open_offline(dir)?.status(&req, now_micros())?;
            if json {
                return json_line(out, &answer);
            }
            write_status(out, &answer, &req)?;
            return Ok(0);
        }
        Source::Daemon(p) => p,
    };
    let mut client = Client::connect(path)?;
    if !a.watch {
        let v = client.call_raw(&Request::Status(req.clone()))?;
        if json {
            return json_line(out, &v);
        }
        let answer: bursar_schemas::wire::StatusAnswer = bursar_cli::decode_answer(v)?;
        write_status(out, &answer, &req)?;
        return Ok(0);
    }
    let interval = if a.interval.is_finite() && a.interval >= 0.05 {
        Duration::from_secs_f64(a.interval.min(86_400.0))
    } else {
        return Err(msg("--interval must be at least 0.05 seconds"));
    };
    let tty = std::io::stdout().is_terminal();
    // Ctrl-C (or SIGTERM) ends the watch cleanly: the terminal gets its screen back.
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(&stop))
            .map_err(|e| msg(format!("cannot handle signals: {e}")))?;
    }
    let screen = tty && !json;
    if screen {
        write!(out, "{ALT_SCREEN_ENTER}")?;
    }
    let watched = watch_loop(path, client, a, &req, interval, screen, json, &stop, out);
    if screen {
        write!(out, "{ALT_SCREEN_LEAVE}")?;
        out.flush()?;
    }
    watched
}

/// Enter the terminal's alternate screen and hide the cursor (`status --watch` on a terminal).
const ALT_SCREEN_ENTER: &str = "\x1b[?1049h\x1b[?25l";
/// Show the cursor and leave the alternate screen: the shell's screen is as it was.
const ALT_SCREEN_LEAVE: &str = "\x1b[?25h\x1b[?1049l";

/// Refresh `status` every `interval` until `--count` refreshes or `stop` (a signal). On a
/// terminal (`screen`) each frame overwrites the last in place: cursor home, every line cleared
/// to its end after its text, the rest of the screen cleared below the last line. Nothing is
/// blanked first, so the table does not flicker. Elsewhere frames follow one another.
#[allow(clippy::too_many_arguments)]
fn watch_loop(
    path: &Path,
    client: Client,
    a: &StatusArgs,
    req: &StatusRequest,
    interval: Duration,
    screen: bool,
    json: bool,
    stop: &AtomicBool,
    out: &mut dyn Write,
) -> Res<u8> {
    let mut n = 0u64;
    let mut client = Some(client);
    while !stop.load(Ordering::Relaxed) {
        // A daemon that stopped (a restart, an upgrade) is waited for: the watch goes on when
        // it answers again (SPEC §9). An error the daemon answers ends the watch.
        let asked = match client.as_mut() {
            Some(c) => c.call_raw(&Request::Status(req.clone())),
            None => Client::connect(path).and_then(|mut c| {
                let v = c.call_raw(&Request::Status(req.clone()));
                client = Some(c);
                v
            }),
        };
        let v = match asked {
            Ok(v) => Some(v),
            Err(e @ (ClientError::Connect { .. } | ClientError::Io(_) | ClientError::Closed)) => {
                client = None;
                if json {
                    eprintln!("bursar: {e}; waiting for bursard to answer again");
                }
                None
            }
            Err(e) => return Err(e.into()),
        };
        if json {
            if let Some(v) = &v {
                json_line(out, v)?;
            }
        } else {
            let mut frame: Vec<u8> = Vec::new();
            writeln!(
                frame,
                "bursar status at {}  (every {}s; Ctrl-C to stop)",
                bursar_core::time::format_ts(now_micros()),
                interval.as_secs_f64()
            )?;
            match v {
                Some(v) => {
                    let answer: bursar_schemas::wire::StatusAnswer = bursar_cli::decode_answer(v)?;
                    write_status(&mut frame, &answer, req)?;
                }
                None => writeln!(
                    frame,
                    "bursard at {} is not answering (stopped or restarting); waiting for it",
                    path.display()
                )?,
            }
            if screen {
                write!(out, "\x1b[H")?;
                for line in String::from_utf8_lossy(&frame).lines() {
                    writeln!(out, "{line}\x1b[K")?;
                }
                write!(out, "\x1b[J")?;
            } else {
                out.write_all(&frame)?;
                writeln!(out)?;
            }
        }
        out.flush()?;
        n += 1;
        if a.count.is_some_and(|c| n >= c) {
            return Ok(0);
        }
        let until = Instant::now() + interval;
        while !stop.load(Ordering::Relaxed) {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            std::thread::sleep(left.min(Duration::from_millis(50)));
        }
    }
    Ok(0)
}

fn write_status(
    out: &mut dyn Write,
    answer: &bursar_schemas::wire::StatusAnswer,
    req: &StatusRequest,
) -> Res<()> {
    if answer.budgets.is_empty() && !answer.truncated {
        if req.budget.is_some() || req.labels.is_some() {
            writeln!(out, "no bucket matches the filter")?;
        } else {
            writeln!(
                out,
                "no budget has seen any usage yet (record some with `bursar record`)"
            )?;
        }
        write_subscriptions(out, answer)?;
        return Ok(());
    }
    write!(
        out,
        "{}",
        render::budgets_table(&answer.budgets, now_micros())
    )?;
    if answer.truncated {
        writeln!(out, "{}", render::status_cut(answer))?;
    }
    write_subscriptions(out, answer)?;
    Ok(())
}

/// The policy's quotas and subscriptions under the buckets: what each provider last said that
/// still binds; each plan's fee and its current period (its allowances are among the buckets
/// above, as `subscription:ID:N`).
fn write_subscriptions(
    out: &mut dyn Write,
    answer: &bursar_schemas::wire::StatusAnswer,
) -> Res<()> {
    for q in &answer.quotas {
        let limits: Vec<String> = q
            .limits
            .iter()
            .map(|l| {
                let of = l.of.map(|n| format!(" of {n}")).unwrap_or_default();
                format!(
                    "{} {} left{of} until {} (provider said {})",
                    l.limit, l.remaining, l.reset_at, l.observed_remaining
                )
            })
            .collect();
        writeln!(
            out,
            "quota {} ({}): {}",
            q.id,
            q.provider,
            if limits.is_empty() {
                "no observed limit binds".to_string()
            } else {
                limits.join("; ")
            }
        )?;
    }
    for s in &answer.subscriptions {
        writeln!(
            out,
            "subscription {}: {} per {} (this period {} .. {}), allowances: {}",
            s.id,
            bursar_core::money::format_usd(s.fee_micros),
            s.fee_period,
            s.period_start,
            s.period_end,
            if s.allowances.is_empty() {
                "none".to_string()
            } else {
                s.allowances.join(", ")
            }
        )?;
    }
    Ok(())
}

fn print_event(out: &mut dyn Write, e: &ExportedEvent, json: bool) -> Res<()> {
    if json {
        json_line(out, e)?;
    } else {
        writeln!(out, "{}", render::event_line(e))?;
    }
    Ok(())
}

/// `--partition` offline: the data dir given is one log already.
fn offline_partition() -> Fail {
    msg(
        "--partition picks a partition on a cluster node's socket; offline, give that \
         partition's copy with --data-dir DATA/pN",
    )
}

fn tail(source: &Source, a: &TailArgs, json: bool, out: &mut dyn Write) -> Res<u8> {
    match source {
        Source::Offline(_) if a.partition.is_some() => Err(offline_partition()),
        Source::Offline(dir) => {
            if a.follow {
                return Err(msg("tail -f needs the daemon (no events arrive offline)"));
            }
            let mut off = open_offline(dir)?;
            let last = a.lines.unwrap_or(bursard::server::TAIL_DEFAULT_EVENTS);
            if last == 0 && a.from_seq.is_none() {
                return Ok(0);
            }
            let from = a
                .from_seq
                .unwrap_or_else(|| off.head().saturating_sub(last - 1).max(1));
            check_types(&a.types)?;
            for ev in off.events(from, &ExportRequest::default())? {
                let ev = ev?;
                if a.types.is_empty() || a.types.contains(&ev.kind) {
                    print_event(out, &ev, json)?;
                }
            }
            Ok(0)
        }
        Source::Daemon(path) => {
            let mut c = Client::connect(path)?;
            // `-n N`: the daemon's default tail (its last events) gives the head's seq, then the
            // last N are asked for from there.
            let mut partition = a.partition;
            let from_seq = match a.lines {
                None => a.from_seq,
                Some(n) => {
                    let mut head = None;
                    for ev in c.stream(&Request::Tail(TailRequest {
                        from_seq: None,
                        follow: false,
                        types: None,
                        partition: a.partition,
                    }))? {
                        let ev = ev?;
                        if ev.partition != head.and_then(|(p, _)| p) && head.is_some() {
                            return Err(msg(
                                "this daemon is a cluster node with a log per partition: -n \
                                 counts one partition's events; add --partition N",
                            ));
                        }
                        head = Some((ev.partition, ev.seq));
                    }
                    // The partition found (a cluster node whose other partitions are empty).
                    if let Some((Some(p), _)) = head {
                        partition.get_or_insert(p);
                    }
                    let head = head.map(|(_, seq)| seq);
                    match head {
                        Some(h) if n > 0 => Some(h.saturating_sub(n - 1).max(1)),
                        Some(h) => Some(h + 1),
                        None => None,
                    }
                }
            };
            let mut from_seq = from_seq;
            let mut client = Some(c);
            loop {
                let Some(mut c) = client.take() else {
                    // -f and the daemon went away: wait for it to answer again (SPEC §9).
                    std::thread::sleep(Duration::from_millis(200));
                    client = Client::connect(path).ok();
                    continue;
                };
                let mut stream = c.stream(&Request::Tail(TailRequest {
                    from_seq,
                    follow: a.follow,
                    types: (!a.types.is_empty()).then(|| a.types.clone()),
                    partition,
                }))?;
                let mut broke = None;
                for ev in stream.by_ref() {
                    match ev {
                        Ok(ev) => {
                            // A seq counts one partition's events: across partitions (a
                            // cluster node, no --partition), a reconnect shows new events only.
                            from_seq = match (ev.partition, partition) {
                                (Some(_), None) => None,
                                _ => Some(ev.seq + 1),
                            };
                            print_event(out, &ev, json)?;
                            if a.follow {
                                out.flush()?;
                            }
                        }
                        Err(e) => {
                            broke = Some(e);
                            break;
                        }
                    }
                }
                match broke {
                    Some(e @ ClientError::Server(_)) => return Err(e.into()),
                    Some(e) if !a.follow => return Err(e.into()),
                    None if !a.follow => return Ok(0),
                    _ => {}
                }
                eprintln!(
                    "bursar: bursard at {} stopped answering; waiting for it to come back",
                    path.display()
                );
            }
        }
    }
}

/// `--type` names only event types (the daemon checks them too; offline, this does).
fn check_types(types: &[String]) -> Res<()> {
    use bursar_schemas::event::EVENT_KINDS;
    match types.iter().find(|t| !EVENT_KINDS.contains(&t.as_str())) {
        Some(t) => Err(msg(format!(
            "--type {t:?} is not an event type; the types are {}",
            EVENT_KINDS.join(", ")
        ))),
        None => Ok(()),
    }
}

/// How export writes events into its sink.
enum Out<'s> {
    /// JSON Lines.
    Jsonl(&'s mut dyn Write),
    /// CSV.
    Csv(Box<csv::Writer<&'s mut dyn Write>>),
}

/// Export output: stdout, or a temporary file renamed into place at the end.
struct Sink<'a> {
    out: Box<dyn Write + 'a>,
    file: Option<(PathBuf, PathBuf)>,
}

impl<'a> Sink<'a> {
    fn new(output: Option<&Path>, stdout: &'a mut dyn Write) -> Res<Sink<'a>> {
        match output {
            None => Ok(Sink {
                out: Box::new(stdout),
                file: None,
            }),
            Some(path) => {
                let name = path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .ok_or_else(|| msg(format!("-o {}: not a file name", path.display())))?;
                let tmp = path.with_file_name(format!(".{name}.{}.partial", std::process::id()));
                let f = std::fs::File::create(&tmp).map_err(|e| {
                    msg(format!(
                        "cannot create {}: {}",
                        tmp.display(),
                        bursar_cli::os_message(&e)
                    ))
                })?;
                Ok(Sink {
                    out: Box::new(std::io::BufWriter::with_capacity(256 * 1024, f)),
                    file: Some((tmp, path.to_path_buf())),
                })
            }
        }
    }

    fn finish(mut self) -> Res<()> {
        self.out.flush()?;
        if let Some((tmp, path)) = self.file.take() {
            // Make the export durable before it appears under its name.
            std::fs::File::open(&tmp)
                .and_then(|f| f.sync_all())
                .map_err(|e| {
                    msg(format!(
                        "cannot sync {}: {}",
                        tmp.display(),
                        bursar_cli::os_message(&e)
                    ))
                })?;
            std::fs::rename(&tmp, &path).map_err(|e| {
                let _ = std::fs::remove_file(&tmp);
                msg(format!(
                    "cannot move the export into {}: {}",
                    path.display(),
                    bursar_cli::os_message(&e)
                ))
            })?;
        }
        Ok(())
    }
}

impl Drop for Sink<'_> {
    fn drop(&mut self) {
        if let Some((tmp, _)) = &self.file {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

/// A progress line on stderr for long exports, only when stderr is a terminal.
struct Progress {
    on: bool,
    started: Instant,
    last: Instant,
    shown: bool,
}

impl Progress {
    fn new() -> Progress {
        let now = Instant::now();
        Progress {
            on: std::io::stderr().is_terminal(),
            started: now,
            last: now,
            shown: false,
        }
    }

    fn tick(&mut self, n: u64) {
        if !self.on || n % 1024 != 0 {
            return;
        }
        let now = Instant::now();
        if now.duration_since(self.started) < Duration::from_secs(1)
            || now.duration_since(self.last) < Duration::from_millis(250)
        {
            return;
        }
        self.last = now;
        self.shown = true;
        let rate = n as f64 / now.duration_since(self.started).as_secs_f64().max(0.001);
        eprint!("\rexporting: {n} events ({rate:.0}/s)…\x1b[K");
    }

    fn done(&self) {
        if self.shown {
            eprint!("\r\x1b[K");
        }
    }
}

/// A time flag as RFC 3339: given so, or as a duration before now (`1h`, `30m`, `2days`,
/// `1h 30m`).
fn time_flag(flag: &str, t: &Option<String>) -> Res<Option<String>> {
    let Some(t) = t else {
        return Ok(None);
    };
    if bursar_core::time::parse_ts(t).is_some() {
        return Ok(Some(t.clone()));
    }
    let ago = humantime::parse_duration(t).map_err(|_| {
        msg(format!(
            "--{flag}: {t:?} is neither an RFC 3339 time (e.g. 2026-11-23T10:00:00Z) nor a \
             duration before now (e.g. 90m, 24h, 7d)"
        ))
    })?;
    let micros = i64::try_from(ago.as_micros())
        .map_err(|_| msg(format!("--{flag}: {t:?} is too long ago")))?;
    Ok(Some(bursar_core::time::format_ts(
        now_micros().saturating_sub(micros),
    )))
}

fn export(source: &Source, a: &ExportArgs, stdout: &mut dyn Write) -> Res<u8> {
    let (since, until) = (time_flag("since", &a.since)?, time_flag("until", &a.until)?);
    let req = ExportRequest {
        since,
        until,
        labels: (!a.labels.is_empty()).then(|| labels_of(&a.labels)),
        partition: a.partition,
    };
    if a.partition.is_some() && matches!(source, Source::Offline(_)) {
        return Err(offline_partition());
    }
    let mut sink = Sink::new(a.output.as_deref(), stdout)?;
    let mut out = match a.format {
        Format::Csv => Out::Csv(Box::new(csv::Writer::new(&mut *sink.out as &mut dyn Write))),
        Format::Jsonl => Out::Jsonl(&mut *sink.out),
    };
    let mut progress = Progress::new();
    let mut n = 0u64;
    let mut write_one = |out: &mut Out, e: &ExportedEvent| -> Res<()> {
        match out {
            Out::Csv(w) => w.event(e)?,
            Out::Jsonl(w) => {
                serde_json::to_writer(&mut **w, e).map_err(|err| match err.io_error_kind() {
                    Some(std::io::ErrorKind::BrokenPipe) => Fail::Pipe,
                    _ => msg(format!("cannot write output: {err}")),
                })?;
                w.write_all(b"\n")?;
            }
        }
        n += 1;
        progress.tick(n);
        Ok(())
    };
    match source {
        Source::Offline(dir) => {
            let mut off = open_offline(dir)?;
            for ev in off.events(1, &req)? {
                write_one(&mut out, &ev?)?;
            }
        }
        Source::Daemon(path) => {
            let mut c = Client::connect(path)?;
            let mut stream = c.stream(&Request::Export(req))?;
            for ev in stream.by_ref() {
                write_one(&mut out, &ev?)?;
            }
            let sent = stream.end().and_then(|e| e.count);
            if let Some(sent) = sent {
                if sent != n {
                    return Err(msg(format!(
                        "export incomplete: the daemon sent {sent} events, {n} were written"
                    )));
                }
            }
        }
    }
    progress.done();
    if let Out::Csv(w) = &mut out {
        w.flush()?;
    }
    drop(out);
    let to_file = a.output.clone();
    sink.finish()?;
    if let Some(path) = to_file {
        eprintln!("exported {n} events to {}", path.display());
    }
    Ok(0)
}

/// `bursar cluster status`: one line per partition and node.
fn cluster_status(mut c: Client, json: bool, out: &mut dyn Write) -> Res<u8> {
    let answer: bursar_schemas::wire::ClusterStatusAnswer =
        c.call(&bursar_schemas::wire::Request::ClusterStatus)?;
    if json {
        return json_line(out, &answer);
    }
    writeln!(
        out,
        "cluster seen from node {}: {} partitions by label {:?}",
        answer.node,
        answer.partitions.len(),
        answer.partition_by
    )?;
    for p in &answer.partitions {
        writeln!(
            out,
            "p{} ({}): writer {}",
            p.partition,
            p.stream,
            p.holder
                .as_deref()
                .unwrap_or("none (no lease holder: writes are unavailable)")
        )?;
        for n in &p.nodes {
            let fold_lag = match (n.fold_lag_p50_us, n.fold_lag_p99_us) {
                (Some(p50), Some(p99)) => format!(
                    "  follower lag p50 {:.1} ms p99 {:.1} ms",
                    p50 as f64 / 1000.0,
                    p99 as f64 / 1000.0
                ),
                _ => String::new(),
            };
            writeln!(
                out,
                "  {:<20} folded to seq {:<10} lag {} ms{}{}{}",
                n.node,
                n.folded_seq,
                n.lag_ms,
                if n.writer { "  (writer)" } else { "" },
                fold_lag,
                if n.reported_ms_ago > 5000 {
                    format!("  (last report {} s ago)", n.reported_ms_ago / 1000)
                } else {
                    String::new()
                }
            )?;
        }
    }
    Ok(0)
}

fn verify(source: &Source, json: bool, out: &mut dyn Write) -> Res<u8> {
    let answer = match source {
        Source::Offline(dir) => open_offline(dir)?.verify()?,
        Source::Daemon(path) => Client::connect(path)?.verify()?,
    };
    if json {
        return json_line(out, &answer);
    }
    if answer.partitions.is_empty() {
        writeln!(
            out,
            "ok: {} events, hash chain intact from seq 1 to {}; head {}",
            answer.events, answer.events, answer.head
        )?;
        return Ok(0);
    }
    for p in &answer.partitions {
        writeln!(
            out,
            "partition {}: {} events, hash chain intact from seq 1 to {}; head {}",
            p.partition, p.events, p.events, p.head
        )?;
    }
    writeln!(
        out,
        "ok: {} events in {} partitions, every chain intact; cluster head {}",
        answer.events,
        answer.partitions.len(),
        answer.head
    )?;
    Ok(0)
}

fn salvage(source: &Source, to: &Path, json: bool, out: &mut dyn Write) -> Res<u8> {
    let Source::Offline(dir) = source else {
        return Err(msg(
            "`bursar salvage` reads a stopped daemon's data dir: give it with --data-dir DIR",
        ));
    };
    let s = bursard::log::salvage(dir, to).map_err(|e| match e {
        bursard::log::SalvageError::Log(bursard::log::LogError::Locked { .. }) => msg(format!(
            "the data dir {} is in use by a running bursard; stop it first",
            dir.display()
        )),
        other => msg(other.to_string()),
    })?;
    if s.copied == 0 {
        let _ = std::fs::remove_dir_all(&s.to);
        let Some((_, why)) = s.left_behind else {
            return Err(msg(format!(
                "the log in {} is empty: nothing to salvage",
                dir.display()
            )));
        };
        return Err(msg(format!(
            "nothing in {} can be salvaged (the first event already: {why}); restore it from a \
             backup",
            dir.display()
        )));
    }
    if json {
        let v = serde_json::json!({
            "ok": true,
            "to": s.to.display().to_string(),
            "copied": s.copied,
            "left_behind_from": s.left_behind.as_ref().map(|l| l.0),
            "reason": s.left_behind.as_ref().map(|l| l.1.clone()),
            "claimed_head": s.claimed_head,
        });
        return json_line(out, &v);
    }
    writeln!(
        out,
        "salvaged seq 1 to {} ({} events) into {}; its hash chain verifies",
        s.copied,
        s.copied,
        s.to.display()
    )?;
    match &s.left_behind {
        None => writeln!(out, "nothing left behind: the log was intact")?,
        Some((seq, why)) => {
            writeln!(out, "left behind: everything from seq {seq} on ({why})")?;
            match s.claimed_head {
                Some(head) if head >= *seq => writeln!(
                    out,
                    "the damaged store held events up to seq {head}: {} are not in the copy",
                    head - seq + 1
                )?,
                _ => writeln!(out, "how far the damaged store went is unknown")?,
            }
        }
    }
    writeln!(
        out,
        "start bursard with --data-dir {} (it folds the whole log; the old dir is untouched)",
        s.to.display()
    )?;
    Ok(0)
}

/// Read `--pricing FILE`: a LiteLLM JSON file becomes `import = "<absolute path>"`; a TOML
/// file's `[pricing]` section is taken as it is, its `import` made absolute against the file's
/// directory (the daemon reads imports itself).
fn read_pricing_file(path: &Path) -> Res<PricingSection> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        msg(format!(
            "cannot read {}: {}",
            path.display(),
            bursar_cli::os_message(&e)
        ))
    })?;
    let absolute = |p: &Path| -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            std::env::current_dir()
                .map(|d| d.join(p))
                .unwrap_or_else(|_| p.to_path_buf())
        }
    };
    let is_json =
        path.extension().is_some_and(|e| e == "json") || text.trim_start().starts_with('{');
    if is_json {
        let import = bursar_core::pricing::import_litellm(&text)
            .map_err(|e| msg(format!("{}: {e}", path.display())))?;
        if import.table.models.is_empty() {
            return Err(msg(format!(
                "{}: no token-priced models in it (not a LiteLLM price file?)",
                path.display()
            )));
        }
        return Ok(PricingSection {
            import: Some(absolute(path).display().to_string()),
            models: Default::default(),
        });
    }
    // Validate the whole file the way the daemon validates bursar.toml: errors name line and key.
    let file_name = path.display().to_string();
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let resolve = |p: &str| -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            absolute(&base.join(p))
        }
    };
    let read_import = |p: &str| -> Result<String, String> {
        std::fs::read_to_string(resolve(p)).map_err(|e| bursar_cli::os_message(&e))
    };
    if let Err(errs) = bursar_core::policy::parse_policy(&text, &file_name, &read_import) {
        return Err(msg(errs
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("\nbursar: ")));
    }
    let file: PolicyFile =
        toml::from_str(&text).map_err(|e| msg(format!("{file_name}: {}", e.message())))?;
    let mut section = file.pricing;
    if section.import.is_none() && section.models.is_empty() {
        return Err(msg(format!(
            "{file_name}: no [pricing] section (give [pricing.models.\"NAME\"] prices or \
             [pricing] import = \"litellm.json\")"
        )));
    }
    if let Some(i) = &section.import {
        section.import = Some(resolve(i).display().to_string());
    }
    Ok(section)
}

fn replay(source: &Source, a: &ReplayArgs, json: bool, out: &mut dyn Write) -> Res<u8> {
    let since = time_flag("since", &a.since)?;
    if let Some(file) = &a.policy {
        return what_if(source, file, since, json, out);
    }
    let Some(pricing_file) = &a.pricing else {
        return Err(msg(
            "replay needs --pricing FILE (new prices) or --policy FILE (a what-if)",
        ));
    };
    let pricing = read_pricing_file(pricing_file)?;
    let (answer, offline) = match source {
        Source::Offline(dir) => {
            if a.apply {
                return Err(msg(
                    "replay --apply needs the daemon (offline mode never writes to the log); \
                     drop --apply for a dry run",
                ));
            }
            let answer = open_offline(dir)?.replay(&pricing, since.as_deref(), now_micros())?;
            (serde_json::to_value(&answer).unwrap_or(Value::Null), true)
        }
        Source::Daemon(path) => {
            let v = Client::connect(path)?.call_raw(&Request::Replay(ReplayRequest {
                pricing,
                policy: None,
                since: since.clone(),
                apply: a.apply,
            }))?;
            (v, false)
        }
    };
    if json {
        return json_line(out, &answer);
    }
    let a2: bursar_schemas::wire::ReplayAnswer = bursar_cli::decode_answer(answer)?;
    let units = own_units(source, &a2);
    write!(
        out,
        "{}",
        render::replay_answer(&a2, since.as_deref(), offline, &units)
    )?;
    Ok(0)
}

/// `replay --policy FILE`: the what-if of SPEC §11, as tables.
fn what_if(
    source: &Source,
    file: &Path,
    since: Option<String>,
    json: bool,
    out: &mut dyn Write,
) -> Res<u8> {
    let answer = match source {
        Source::Offline(dir) => {
            let loaded = bursard::config::load_policy_file(file).map_err(|e| msg(e.to_string()))?;
            let a = open_offline(dir)?.what_if(&loaded.resolved, since.as_deref())?;
            serde_json::to_value(&a).unwrap_or(Value::Null)
        }
        Source::Daemon(path) => {
            let text = std::fs::read_to_string(file).map_err(|e| {
                msg(format!(
                    "cannot read {}: {}",
                    file.display(),
                    bursar_cli::os_message(&e)
                ))
            })?;
            Client::connect(path)?.call_raw(&Request::Replay(ReplayRequest {
                pricing: Default::default(),
                policy: Some(text),
                since: since.clone(),
                apply: false,
            }))?
        }
    };
    if json {
        return json_line(out, &answer);
    }
    let a: bursar_schemas::wire::WhatIfAnswer = bursar_cli::decode_answer(answer)?;
    write!(
        out,
        "{}",
        render::what_if_answer(&a, &file.display().to_string(), since.as_deref())
    )?;
    Ok(0)
}

fn report(source: &Source, a: &ReportArgs, json: bool, stdout: &mut dyn Write) -> Res<u8> {
    let req = bursar_schemas::wire::ReportRequest {
        group_by: a.by.clone(),
        every: Some(a.every.clone()),
        timezone: a.timezone.clone(),
        since: time_flag("since", &Some(a.since.clone()))?,
        until: time_flag("until", &a.until)?,
        labels: (!a.labels.is_empty()).then(|| labels_of(&a.labels)),
    };
    let v = match source {
        Source::Offline(dir) => {
            serde_json::to_value(open_offline(dir)?.report(&req, now_micros())?)
                .unwrap_or(Value::Null)
        }
        Source::Daemon(path) => Client::connect(path)?.call_raw(&Request::Report(req.clone()))?,
    };
    let format = if json { ReportFormat::Json } else { a.format };
    if matches!(format, ReportFormat::Svg | ReportFormat::Png)
        && a.output.is_none()
        && std::io::stdout().is_terminal()
    {
        return Err(msg(
            "--format svg/png writes an image: give -o FILE (or redirect stdout)",
        ));
    }
    if format == ReportFormat::Json {
        // An error answer is an error, not a report.
        let _: bursar_schemas::wire::ReportAnswer = bursar_cli::decode_answer(v.clone())?;
        let mut sink = Sink::new(a.output.as_deref(), stdout)?;
        json_line(&mut *sink.out, &v)?;
        sink.finish()?;
        return Ok(0);
    }
    let answer: bursar_schemas::wire::ReportAnswer = bursar_cli::decode_answer(v)?;
    let chart = || {
        let (periods, series) = bursar_cli::report::series(&answer);
        let by = if a.by.is_empty() {
            String::new()
        } else {
            format!(" by {}", a.by.join(", "))
        };
        bursar_cli::chart::StackedBars {
            title: format!(
                "Cost per {}{by}, {} ({})",
                answer.every,
                match (periods.first(), periods.last()) {
                    (Some(f), Some(l)) if f != l => format!("{f} to {l}"),
                    (Some(f), _) => f.clone(),
                    _ => "no periods".into(),
                },
                answer.timezone
            ),
            periods,
            series,
        }
    };
    let mut sink = Sink::new(a.output.as_deref(), stdout)?;
    match format {
        ReportFormat::Table | ReportFormat::Json => {
            write!(sink.out, "{}", bursar_cli::report::table(&answer, &a.by))?;
            if a.chart {
                writeln!(sink.out)?;
                write!(
                    sink.out,
                    "{}",
                    bursar_cli::chart::render_terminal(&chart(), terminal_width())
                )?;
            }
        }
        ReportFormat::Csv => bursar_cli::report::write_csv(&answer, &mut *sink.out)?,
        ReportFormat::Svg => {
            let svg = bursar_cli::chart::render_svg(&chart())
                .map_err(|e| msg(format!("cannot draw the chart: {e}")))?;
            sink.out.write_all(svg.as_bytes())?;
        }
        ReportFormat::Png => {
            let png = bursar_cli::chart::render_png(&chart())
                .map_err(|e| msg(format!("cannot draw the chart: {e}")))?;
            sink.out.write_all(&png)?;
        }
    }
    sink.finish()?;
    Ok(0)
}

/// Columns for a chart on the terminal: `$COLUMNS` when the shell exports it, else 100.
fn terminal_width() -> usize {
    std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.trim().parse::<usize>().ok())
        .filter(|&c| (40..=1000).contains(&c))
        .unwrap_or(100)
}

/// For the diff rows of budgets without a dollar limit (tokens, requests or concurrency only),
/// their figures in those units (`render::own_units`), from `status`: the diff itself is in
/// dollars.
fn own_units(source: &Source, a: &bursar_schemas::wire::ReplayAnswer) -> render::OwnUnits {
    let mut found = render::OwnUnits::new();
    if a.diff.is_empty() {
        return found;
    }
    enum Asker {
        Offline(Box<Offline>),
        Daemon(Client),
    }
    // The diff is the answer; these figures only refine how it is shown: when they cannot be
    // had, the rows stay in dollars.
    let mut asker = match source {
        Source::Offline(dir) => match open_offline(dir) {
            Ok(off) => Asker::Offline(Box::new(off)),
            Err(_) => return found,
        },
        Source::Daemon(path) => match Client::connect(path) {
            Ok(c) => Asker::Daemon(c),
            Err(_) => return found,
        },
    };
    let mut ask = |req: &StatusRequest| -> Res<bursar_schemas::wire::StatusAnswer> {
        match &mut asker {
            Asker::Offline(off) => Ok(off.status(req, now_micros())?),
            Asker::Daemon(c) => {
                let v = c.call_raw(&Request::Status(req.clone()))?;
                Ok(bursar_cli::decode_answer(v)?)
            }
        }
    };
    let budgets: BTreeSet<&str> = a.diff.iter().map(|r| r.budget.as_str()).collect();
    for budget in budgets {
        let mut req = StatusRequest {
            labels: None,
            budget: Some(budget.to_string()),
            limit: Some(1),
        };
        // One bucket tells the budget's limits; only a budget without a dollar limit needs all.
        let Ok(first) = ask(&req) else {
            continue;
        };
        if first
            .budgets
            .first()
            .is_none_or(|b| render::own_units(b).is_none())
        {
            continue;
        }
        req.limit = Some(usize::try_from(first.total).unwrap_or(usize::MAX));
        let Ok(all) = ask(&req) else {
            continue;
        };
        for b in all.budgets {
            if let Some(units) = render::own_units(&b) {
                found.insert((b.budget, b.key), units);
            }
        }
    }
    found
}

/// What `policy check` warns about in a valid policy (SPEC §10): a tier named but not defined
/// (in a file without `[tiers.defs]`), a model priced outside its tier's `price_range`. Each is
/// `(key, message)`.
fn policy_warnings(r: &bursar_schemas::policy::ResolvedPolicy) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = bursar_core::tiers::undefined_tiers(&r.tiers)
        .into_iter()
        .map(|u| {
            (
                u.key,
                format!(
                    "tier {:?} is not defined (it has no display name, description or price \
                     range); define it as [tiers.defs.{}]",
                    u.tier,
                    policy_toml::toml_key(&u.tier)
                ),
            )
        })
        .collect();
    out.extend(
        bursar_core::tiers::prices_outside_ranges(r)
            .into_iter()
            .map(|w| {
                (
                    w.key,
                    format!(
                        "model {:?} costs {} per million input tokens, outside the price_range \
                         {}..{} of its tier {:?}",
                        w.model,
                        render::usd(w.input_per_mtok),
                        render::usd(w.range.min_input_per_mtok),
                        render::usd(w.range.max_input_per_mtok),
                        w.tier
                    ),
                )
            }),
    );
    out
}

fn policy_check(file: &Path, json: bool, out: &mut dyn Write) -> Res<u8> {
    match bursard::config::parse_policy_file(file) {
        Ok(p) => {
            let r = &p.resolved;
            let warnings = policy_warnings(r);
            if json {
                return json_line(
                    out,
                    &serde_json::json!({
                        "ok": true,
                        "file": file.display().to_string(),
                        "budgets": r.budgets.iter().map(|b| b.id.clone()).collect::<Vec<_>>(),
                        "priced_models": r.pricing.models.len(),
                        "tiers": bursar_core::tiers::all_tiers(&r.tiers)
                            .into_iter()
                            .map(|t| t.id)
                            .collect::<Vec<_>>(),
                        "warnings": warnings
                            .iter()
                            .map(|(key, message)| serde_json::json!({"key": key, "message": message}))
                            .collect::<Vec<_>>(),
                        "source_hash": p.source_hash,
                    }),
                );
            }
            for (key, message) in &warnings {
                eprintln!("bursar: warning: {}: {key}: {message}", file.display());
            }
            writeln!(
                out,
                "{}: ok ({} budgets: {}; {} priced models; default tier {:?}){}",
                file.display(),
                r.budgets.len(),
                r.budgets
                    .iter()
                    .map(|b| b.id.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                r.pricing.models.len(),
                r.tiers.default,
                match warnings.len() {
                    0 => String::new(),
                    1 => ", 1 warning".to_string(),
                    n => format!(", {n} warnings"),
                }
            )?;
            Ok(0)
        }
        Err(bursard::config::ConfigError::Invalid(errs)) => {
            if json {
                let list: Vec<Value> = errs
                    .iter()
                    .map(|e| {
                        serde_json::json!({"file": e.file, "line": e.line, "key": e.key,
                                           "message": e.message})
                    })
                    .collect();
                json_line(out, &serde_json::json!({"ok": false, "errors": list}))?;
                return Ok(EXIT_ERROR);
            }
            Err(msg(errs
                .iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("\nbursar: ")))
        }
        Err(bursard::config::ConfigError::Read { path, source }) => Err(msg(format!(
            "cannot read {path}: {}",
            bursar_cli::os_message(&source)
        ))),
    }
}

/// The starter policy of `bursar policy init`: the embedded default (a per-model daily meter) and
/// two limits most setups want, commented.
const STARTER_POLICY: &str = include_str!("starter.toml");

fn policy_init(path: Option<&Path>, force: bool, out: &mut dyn Write) -> Res<u8> {
    let path = match path {
        Some(p) if p != Path::new("-") => p,
        _ => {
            out.write_all(STARTER_POLICY.as_bytes())?;
            return Ok(0);
        }
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true);
    if force {
        options.create(true).truncate(true);
    } else {
        // Never over an existing file, even one that appears between a check and the write.
        options.create_new(true);
    }
    let written = options.open(path).and_then(|mut f| {
        f.write_all(STARTER_POLICY.as_bytes())
            .and_then(|()| f.sync_all())
    });
    match written {
        Ok(()) => {
            eprintln!(
                "wrote a starter policy to {}; check it with `bursar policy check {}`",
                path.display(),
                path.display()
            );
            Ok(0)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(msg(format!(
            "{} already exists; pass --force to replace it (or give another path)",
            path.display()
        ))),
        Err(e) => Err(msg(format!(
            "cannot write {}: {}",
            path.display(),
            bursar_cli::os_message(&e)
        ))),
    }
}

fn policy_show(source: &Source, prices: bool, json: bool, out: &mut dyn Write) -> Res<u8> {
    let event = match source {
        Source::Offline(dir) => open_offline(dir)?.last_policy_event()?,
        Source::Daemon(path) => Client::last_policy_event(path)?,
    };
    let Some(event) = event else {
        return Err(msg("the log holds no policy yet"));
    };
    if json {
        return json_line(out, &event);
    }
    let EventBody::PolicyApplied(p) = &event.body else {
        return Err(msg("the last policy event is not a policy_applied"));
    };
    writeln!(
        out,
        "# policy version {}, applied at {} (seq {})\n# from {} (blake3 {})\n# socket, data_dir, \
         socket_mode, socket_group and admin_uids are not logged and not shown.\n",
        p.policy_version, event.time, event.seq, p.source, p.source_hash
    )?;
    write!(out, "{}", policy_toml::policy_to_toml(&p.policy, prices))?;
    Ok(0)
}

/// `bursar tiers`: the tiers of `--config FILE`, else of the policy in force (the last
/// `policy_applied`, from the daemon or a data dir), with the models of its price table.
fn tiers(source: &Source, a: &TiersArgs, json: bool, out: &mut dyn Write) -> Res<u8> {
    let (policy, from) = match &a.config {
        Some(file) => match bursard::config::parse_policy_file(file) {
            Ok(p) => (p.resolved, file.display().to_string()),
            Err(bursard::config::ConfigError::Invalid(errs)) => {
                return Err(msg(errs
                    .iter()
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>()
                    .join("\nbursar: ")))
            }
            Err(bursard::config::ConfigError::Read { path, source }) => {
                return Err(msg(format!(
                    "cannot read {path}: {}",
                    bursar_cli::os_message(&source)
                )))
            }
        },
        None => {
            let event = match source {
                Source::Offline(dir) => open_offline(dir)?.last_policy_event()?,
                Source::Daemon(path) => Client::last_policy_event(path)?,
            };
            let Some(event) = event else {
                return Err(msg("the log holds no policy yet"));
            };
            let EventBody::PolicyApplied(p) = event.body else {
                return Err(msg("the last policy event is not a policy_applied"));
            };
            let from = format!("policy version {} ({})", p.policy_version, p.source);
            (p.policy, from)
        }
    };
    let listing = bursar_core::tiers::listing(&policy);
    if json {
        let tiers: Vec<Value> = listing
            .iter()
            .map(|l| {
                let range = l.tier.price_range;
                serde_json::json!({
                    "id": l.tier.id,
                    "origin": l.tier.origin,
                    "display_name": l.tier.display_name,
                    "description": l.tier.description,
                    "price_range": range,
                    "color": l.tier.color,
                    "icon": l.tier.icon,
                    "default": l.is_default,
                    "models": l.models.iter().map(|m| serde_json::json!({
                        "model": m.model,
                        "provider": m.price.provider,
                        "input_per_mtok": m.price.input_per_mtok,
                        "output_per_mtok": m.price.output_per_mtok,
                        "in_range": range.is_none_or(|r| {
                            (r.min_input_per_mtok..=r.max_input_per_mtok)
                                .contains(&m.price.input_per_mtok)
                        }),
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        return json_line(
            out,
            &serde_json::json!({"ok": true, "source": from, "default": policy.tiers.default,
                                "tiers": tiers}),
        );
    }
    writeln!(
        out,
        "tiers of {from}; default tier {:?}\n",
        policy.tiers.default
    )?;
    write!(out, "{}", render::tiers_table(&listing))?;
    Ok(0)
}

fn pricing_import(file: &Path, out: &mut dyn Write) -> Res<u8> {
    let text = std::fs::read_to_string(file).map_err(|e| {
        msg(format!(
            "cannot read {}: {}",
            file.display(),
            bursar_cli::os_message(&e)
        ))
    })?;
    let import = bursar_core::pricing::import_litellm(&text)
        .map_err(|e| msg(format!("{}: {e}", file.display())))?;
    if import.table.models.is_empty() {
        return Err(msg(format!(
            "{}: no token-priced models in it (not a LiteLLM price file?)",
            file.display()
        )));
    }
    writeln!(
        out,
        "# imported from {} by `bursar pricing import`: {} models (USD per million tokens)\n\
         [pricing]\n",
        file.display(),
        import.table.models.len()
    )?;
    write!(
        out,
        "{}",
        bursar_core::pricing::table_to_toml(&import.table)
    )?;
    if let Some((model, why)) = import.skipped.first() {
        eprintln!(
            "bursar: imported {} models; skipped {} entries that are not token-priced (e.g. {model}: {why})",
            import.table.models.len(),
            import.skipped.len(),
        );
    }
    Ok(0)
}
