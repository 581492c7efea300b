//! `bursard`: the budget ledger daemon. See SPEC §8 and docs/operations.md.

use clap::Parser;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

/// mimalloc instead of glibc malloc: the writer and recovery allocate on one thread and free
/// on another, which glibc handles poorly (a full replay ran 2.7× slower on it).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// bursar's daemon: a budget ledger for LLM agents over a Unix socket.
#[derive(Parser, Debug)]
#[command(name = "bursard", version, about)]
struct Args {
    /// Policy file (bursar.toml). Without it: the embedded default policy and built-in prices.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Socket path (default: $XDG_RUNTIME_DIR/bursar.sock, else ./bursar.sock).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Data directory (default: ./bursar-data).
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    // Every file the daemon (or sled, later) creates is private to its user (SPEC §7); the
    // socket gets its configured mode explicitly.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                // sled's own lines off: what it meets reaches bursard as an error, which says
                // it once, in bursard's words (a damaged store printed sled's ERROR line
                // first); `RUST_LOG=info,sled=warn` shows them.
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sled=off")),
        )
        .with_writer(|| QuietStderr)
        // Its own complaint about a failed write would go through `eprintln!`, which panics when
        // stderr cannot be written: the thread logging (e.g. the signal thread) would die.
        .log_internal_errors(false)
        .init();
    let config = match bursard::config::Config::resolve(args.config, args.socket, args.data_dir) {
        Ok(c) => c,
        // A start-up failure like any other (SPEC §8: exit 1, one line).
        Err(e) => {
            say(&format!("bursard: {e}"));
            return ExitCode::from(1);
        }
    };
    match bursard::run(config, bursard::writer::system_clock()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            say(&format!("bursard: {e}"));
            ExitCode::from(1)
        }
    }
}

/// stderr for the logs, swallowing write errors: a stderr that can no longer be written (its
/// reader gone, a full disk) must never stop the daemon from serving or obeying signals
/// (SPEC §8). A closed pipe gives `EPIPE` rather than a signal: Rust ignores `SIGPIPE` in every
/// binary before `main`.
struct QuietStderr;

impl Write for QuietStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

/// One line on stderr, never a panic (`eprintln!` panics when stderr cannot be written).
fn say(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}
