//! `bursard`: the budget ledger daemon. See SPEC §8 and docs/operations.md.

use clap::Parser;
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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let config = match bursard::config::Config::resolve(args.config, args.socket, args.data_dir) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("bursard: {e}");
            return ExitCode::from(2);
        }
    };
    match bursard::run(config, bursard::writer::system_clock()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bursard: {e}");
            ExitCode::from(1)
        }
    }
}
