//! The Redis baseline: a minimal RESP client and one Lua script per operation that does what
//! bursar does — check every matching bucket, add the hold or the usage, remember the id for
//! idempotency, and `XADD` the event to a stream as the audit log.
//!
//! Buckets are hashes (`s` spent micros, `h` held micros, `t` tokens, `r` requests, `c` live
//! holds) keyed by budget, scope and window: `org-monthly` uses 30-day months, the daily budgets
//! the UTC day, `session` is cumulative, and the rolling tokens-per-minute limit is the usual
//! Redis "sliding window counter" (this minute plus the previous one weighted by the part of it
//! still inside the window). Time comes from the server (`TIME`), like bursar's daemon clock.

use crate::workload::{limits, Op, OpKind, Outcome, MAX_OUTPUT, MODEL, PRICE_IN, PRICE_OUT};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

/// Shared prelude: window keys, limits and the prices of the request.
const PRELUDE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1])
local day = math.floor(now / 86400)
local month = math.floor(now / 2592000)
local minute = math.floor(now / 60)
local frac = ((now % 60) + tonumber(t[2]) / 1e6) / 60
local bk = { KEYS[1] .. ':' .. month, KEYS[2] .. ':' .. day, KEYS[3] .. ':' .. day, KEYS[4] }
local lim = { tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8]) }
local req_lim, conc_lim, tpm_lim = tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11])
local warn_at = tonumber(ARGV[12])
local tpm_cur = KEYS[5] .. ':' .. minute
local tpm_prev = KEYS[5] .. ':' .. (minute - 1)
local inp, out = tonumber(ARGV[1]), tonumber(ARGV[2])
local pin, pout = tonumber(ARGV[3]), tonumber(ARGV[4])
local function state_of(used, limit, st)
  if used >= limit then return 'exhausted' end
  if st ~= 'exhausted' and used >= warn_at * limit then return 'warn' end
  return st
end
local function would_deny(hold, tok)
  for i = 1, 4 do
    local v = redis.call('HMGET', bk[i], 's', 'h', 'c', 'r')
    local s, h, c, r = tonumber(v[1] or 0), tonumber(v[2] or 0), tonumber(v[3] or 0), tonumber(v[4] or 0)
    if s + h + hold > lim[i] then return 'budget' end
    if i == 3 and r + 1 > req_lim then return 'budget' end
    if i == 4 and c + 1 > conc_lim then return 'budget' end
  end
  local cur = redis.call('HMGET', tpm_cur, 't', 'h')
  local prev = tonumber(redis.call('HGET', tpm_prev, 't') or 0)
  local used = prev * (1 - frac) + tonumber(cur[1] or 0) + tonumber(cur[2] or 0)
  if used + tok > tpm_lim then return 'tpm' end
  return nil
end
"#;

const RECORD: &str = r#"
local cost = math.ceil((inp * pin + out * pout) / 1000000)
local tok = inp + out
if not redis.call('SET', KEYS[6], 'record:' .. cost, 'NX') then return 'duplicate' end
local st = 'ok'
for i = 1, 4 do
  local s = redis.call('HINCRBY', bk[i], 's', cost)
  redis.call('HINCRBY', bk[i], 't', tok)
  redis.call('HINCRBY', bk[i], 'r', 1)
  local h = tonumber(redis.call('HGET', bk[i], 'h') or 0)
  st = state_of(s + h, lim[i], st)
end
redis.call('HINCRBY', tpm_cur, 't', tok)
redis.call('EXPIRE', tpm_cur, 120)
redis.call('XADD', KEYS[8], '*', 'type', 'usage_recorded', 'event_id', ARGV[14], 'labels', ARGV[13],
  'model', ARGV[15], 'input_tokens', inp, 'output_tokens', out, 'cost_micros', cost)
return st
"#;

const RESERVE: &str = r#"
local hold = math.ceil((inp * pin + out * pout) / 1000000)
local tok = inp + out
if redis.call('EXISTS', KEYS[7]) == 1 then return 'duplicate' end
local why = would_deny(hold, tok)
if why then
  redis.call('XADD', KEYS[8], '*', 'type', 'reservation_denied', 'reservation_id', ARGV[14],
    'labels', ARGV[13], 'model', ARGV[15], 'reason', why)
  return 'deny'
end
for i = 1, 4 do
  redis.call('HINCRBY', bk[i], 'h', hold)
  if i == 4 then redis.call('HINCRBY', bk[i], 'c', 1) end
end
redis.call('HINCRBY', tpm_cur, 'h', tok)
redis.call('EXPIRE', tpm_cur, 120)
redis.call('HSET', KEYS[7], 'hold', hold, 'tok', tok, 'k1', bk[1], 'k2', bk[2], 'k3', bk[3],
  'k4', bk[4], 'tpm', tpm_cur)
redis.call('EXPIRE', KEYS[7], 300)
redis.call('XADD', KEYS[8], '*', 'type', 'reservation_created', 'reservation_id', ARGV[14],
  'labels', ARGV[13], 'model', ARGV[15], 'input_tokens', inp, 'max_output_tokens', out,
  'hold_micros', hold)
return 'allow'
"#;

const COMMIT: &str = r#"
local cost = math.ceil((inp * pin + out * pout) / 1000000)
local tok = inp + out
if not redis.call('SET', KEYS[6], 'commit:' .. cost, 'NX') then return 'duplicate' end
local r = redis.call('HMGET', KEYS[7], 'hold', 'tok', 'k1', 'k2', 'k3', 'k4', 'tpm')
if not r[1] then return redis.error_reply('unknown reservation') end
local hold, htok = tonumber(r[1]), tonumber(r[2])
local st = 'ok'
for i = 1, 4 do
  local k = r[2 + i]
  local h = redis.call('HINCRBY', k, 'h', -hold)
  local s = redis.call('HINCRBY', k, 's', cost)
  redis.call('HINCRBY', k, 't', tok)
  redis.call('HINCRBY', k, 'r', 1)
  if i == 4 then redis.call('HINCRBY', k, 'c', -1) end
  st = state_of(s + h, lim[i], st)
end
redis.call('HINCRBY', r[7], 'h', -htok)
redis.call('HINCRBY', tpm_cur, 't', tok)
redis.call('EXPIRE', tpm_cur, 120)
redis.call('DEL', KEYS[7])
redis.call('XADD', KEYS[8], '*', 'type', 'usage_recorded', 'event_id', ARGV[16],
  'reservation_id', ARGV[14], 'labels', ARGV[13], 'model', ARGV[15], 'input_tokens', inp,
  'output_tokens', out, 'cost_micros', cost)
return st
"#;

const CHECK: &str = r#"
local hold = math.ceil((inp * pin + out * pout) / 1000000)
if would_deny(hold, inp + out) then return 'deny' end
return 'allow'
"#;

/// SHA1 of each loaded script.
#[derive(Debug, Clone, Default)]
pub struct ScriptShas {
    /// `record`.
    pub record: String,
    /// `reserve`.
    pub reserve: String,
    /// `commit`.
    pub commit: String,
    /// `check`.
    pub check: String,
}

/// Load the four scripts (SCRIPT LOAD) and return their SHAs.
pub fn load_scripts(socket: &std::path::Path) -> Result<ScriptShas, String> {
    let mut s = UnixStream::connect(socket).map_err(|e| format!("redis connect: {e}"))?;
    let mut load = |body: &str| -> Result<String, String> {
        let script = format!("{PRELUDE}{body}");
        let mut out = Vec::new();
        command(&mut out, &[b"SCRIPT", b"LOAD", script.as_bytes()]);
        s.write_all(&out).map_err(|e| e.to_string())?;
        let reply = read_reply(&mut s)?;
        match reply {
            Reply::Bulk(b) => String::from_utf8(b).map_err(|e| e.to_string()),
            other => Err(format!("SCRIPT LOAD answered {other:?}")),
        }
    };
    Ok(ScriptShas {
        record: load(RECORD)?,
        reserve: load(RESERVE)?,
        commit: load(COMMIT)?,
        check: load(CHECK)?,
    })
}

/// Run one command synchronously (setup and INFO).
pub fn call(socket: &std::path::Path, args: &[&[u8]]) -> Result<Reply, String> {
    let mut s = UnixStream::connect(socket).map_err(|e| format!("redis connect: {e}"))?;
    let mut out = Vec::new();
    command(&mut out, args);
    s.write_all(&out).map_err(|e| e.to_string())?;
    read_reply(&mut s)
}

/// A decoded reply (setup only; the load path uses [`parse_reply`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// `+...`.
    Status(String),
    /// `-...`.
    Error(String),
    /// `:n`.
    Int(i64),
    /// `$n` (or nil).
    Bulk(Vec<u8>),
    /// `*n`.
    Array(usize),
    /// `$-1`.
    Nil,
}

fn read_reply(s: &mut UnixStream) -> Result<Reply, String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some((n, _)) = parse_reply(&buf) {
            return Ok(decode_simple(&buf[..n]));
        }
        let got = s.read(&mut chunk).map_err(|e| e.to_string())?;
        if got == 0 {
            return Err("redis closed the connection".into());
        }
        buf.extend_from_slice(&chunk[..got]);
    }
}

fn decode_simple(b: &[u8]) -> Reply {
    let text = |r: &[u8]| String::from_utf8_lossy(r).trim_end().to_string();
    match b.first() {
        Some(b'+') => Reply::Status(text(&b[1..])),
        Some(b'-') => Reply::Error(text(&b[1..])),
        Some(b':') => Reply::Int(text(&b[1..]).parse().unwrap_or(0)),
        Some(b'$') => {
            let nl = b.iter().position(|c| *c == b'\n').unwrap_or(0);
            let len: i64 = text(&b[1..nl]).parse().unwrap_or(-1);
            if len < 0 {
                Reply::Nil
            } else {
                let start = nl + 1;
                let end = (start + len as usize).min(b.len());
                Reply::Bulk(b[start..end].to_vec())
            }
        }
        Some(b'*') => Reply::Array(text(&b[1..]).parse().unwrap_or(0)),
        _ => Reply::Error("unparseable reply".into()),
    }
}

/// Append a RESP command.
pub fn command(out: &mut Vec<u8>, args: &[&[u8]]) {
    let _ = write!(out, "*{}\r\n", args.len());
    for a in args {
        bulk(out, a);
    }
}

fn bulk(out: &mut Vec<u8>, a: &[u8]) {
    let _ = write!(out, "${}\r\n", a.len());
    out.extend_from_slice(a);
    out.extend_from_slice(b"\r\n");
}

fn bulk_fmt(out: &mut Vec<u8>, scratch: &mut Vec<u8>, args: std::fmt::Arguments<'_>) {
    scratch.clear();
    let _ = scratch.write_fmt(args);
    bulk(out, scratch);
}

/// Append the EVALSHA call for `op`.
pub fn encode_op(run: u32, shas: &ScriptShas, op: &Op, out: &mut Vec<u8>) {
    let (sha, output) = match op.kind {
        OpKind::Record => (&shas.record, op.output),
        OpKind::Reserve => (&shas.reserve, MAX_OUTPUT),
        OpKind::Commit => (&shas.commit, op.output),
        OpKind::Check => (&shas.check, MAX_OUTPUT),
        OpKind::Hello => {
            command(out, &[b"PING"]);
            return;
        }
    };
    let s = &op.scope;
    let (conn, n) = (op.conn, op.n);
    let mut sc = Vec::with_capacity(64);
    out.extend_from_slice(b"*27\r\n");
    bulk(out, b"EVALSHA");
    bulk(out, sha.as_bytes());
    bulk(out, b"8");
    bulk_fmt(out, &mut sc, format_args!("b:org:o{}", s.org));
    bulk_fmt(out, &mut sc, format_args!("b:team:t{}", s.team));
    bulk_fmt(out, &mut sc, format_args!("b:user:u{}", s.user));
    bulk_fmt(out, &mut sc, format_args!("b:sess:s{}", s.session));
    bulk_fmt(out, &mut sc, format_args!("tpm:t{}", s.team));
    match op.kind {
        OpKind::Commit => bulk_fmt(out, &mut sc, format_args!("id:c{run}-{conn}-{n}")),
        _ => bulk_fmt(out, &mut sc, format_args!("id:e{run}-{conn}-{n}")),
    }
    bulk_fmt(out, &mut sc, format_args!("res:r{run}-{conn}-{n}"));
    bulk(out, b"audit");
    bulk_fmt(out, &mut sc, format_args!("{}", op.input));
    bulk_fmt(out, &mut sc, format_args!("{output}"));
    bulk_fmt(out, &mut sc, format_args!("{PRICE_IN}"));
    bulk_fmt(out, &mut sc, format_args!("{PRICE_OUT}"));
    bulk_fmt(
        out,
        &mut sc,
        format_args!("{}", limits::ORG_MONTH_USD * 1_000_000),
    );
    bulk_fmt(
        out,
        &mut sc,
        format_args!("{}", limits::TEAM_DAY_USD * 1_000_000),
    );
    bulk_fmt(
        out,
        &mut sc,
        format_args!("{}", limits::USER_DAY_USD * 1_000_000),
    );
    bulk_fmt(
        out,
        &mut sc,
        format_args!("{}", limits::SESSION_USD * 1_000_000),
    );
    bulk_fmt(out, &mut sc, format_args!("{}", limits::USER_DAY_REQUESTS));
    bulk_fmt(out, &mut sc, format_args!("{}", limits::SESSION_CONCURRENT));
    bulk_fmt(out, &mut sc, format_args!("{}", limits::TEAM_TPM));
    bulk(out, b"0.9");
    bulk_fmt(
        out,
        &mut sc,
        format_args!(
            r#"{{"org":"o{}","team":"t{}","user":"u{}","session":"s{}"}}"#,
            s.org, s.team, s.user, s.session
        ),
    );
    match op.kind {
        OpKind::Record => bulk_fmt(out, &mut sc, format_args!("e{run}-{conn}-{n}")),
        _ => bulk_fmt(out, &mut sc, format_args!("r{run}-{conn}-{n}")),
    }
    bulk(out, MODEL.as_bytes());
    bulk_fmt(out, &mut sc, format_args!("c{run}-{conn}-{n}"));
}

fn line_end(buf: &[u8], from: usize) -> Option<usize> {
    buf.get(from..)?
        .windows(2)
        .position(|w| w == b"\r\n")
        .map(|p| from + p)
}

fn parse_int(b: &[u8]) -> Option<i64> {
    std::str::from_utf8(b).ok()?.parse().ok()
}

/// One complete reply at the start of `buf`: its length and outcome.
pub fn parse_reply(buf: &[u8]) -> Option<(usize, Outcome)> {
    parse_at(buf, 0)
}

fn parse_at(buf: &[u8], at: usize) -> Option<(usize, Outcome)> {
    let tag = *buf.get(at)?;
    let eol = line_end(buf, at + 1)?;
    let head = &buf[at + 1..eol];
    let next = eol + 2;
    match tag {
        b'+' | b':' => Some((next - at, Outcome::Ok)),
        b'-' => Some((next - at, Outcome::Error)),
        b'$' => {
            let len = parse_int(head)?;
            if len < 0 {
                return Some((next - at, Outcome::Ok));
            }
            let end = next + len as usize;
            if buf.len() < end + 2 {
                return None;
            }
            let body = &buf[next..end];
            let outcome = match body {
                b"deny" => Outcome::Denied,
                b"duplicate" => Outcome::Error,
                _ => Outcome::Ok,
            };
            Some((end + 2 - at, outcome))
        }
        b'*' => {
            let n = parse_int(head)?;
            let mut pos = next;
            for _ in 0..n.max(0) {
                let (len, _) = parse_at(buf, pos)?;
                pos += len;
            }
            Some((pos - at, Outcome::Ok))
        }
        _ => Some((buf.len() - at, Outcome::Error)),
    }
}
