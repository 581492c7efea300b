//! `bursard` as a library: the log, the writer and the server, so tests can drive them in-process.
//!
//! The path of one request: [`server`] decodes a line → [`writer`] (one thread) decides and
//! folds it through `bursar_core::ledger` → [`log`] appends and syncs the batch → the answer goes
//! back in request order.

pub mod cluster;
pub mod config;
pub mod conn_socket;
pub mod connections;
pub mod log;
pub mod memory;
pub mod metrics;
pub mod server;
pub mod streams;
pub mod writer;

use config::Config;
use log::{LogError, LogStore, SledLog};
use sd_notify::NotifyState;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use writer::{Clock, Job, Shared};

/// Why the daemon could not run.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Configuration problem.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// The data directory could not be used.
    #[error("{0}")]
    Log(#[from] LogError),
    /// The socket could not be set up.
    #[error("socket {path}: {message}")]
    Socket {
        /// The socket path.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// Anything else at start-up.
    #[error("{0}")]
    Start(String),
}

/// Open the data directory (created 0700 if missing) and its log.
pub fn open_store(data_dir: &Path) -> Result<SledLog, DaemonError> {
    if !data_dir.exists() {
        std::fs::create_dir_all(data_dir).map_err(|e| {
            DaemonError::Start(format!(
                "cannot create data dir {}: {e}",
                data_dir.display()
            ))
        })?;
        let _ = std::fs::set_permissions(data_dir, std::fs::Permissions::from_mode(0o700));
    }
    Ok(SledLog::open(data_dir)?)
}

/// Refuse a socket path a live daemon answers on, or that holds something other than a
/// socket. Writes nothing: it runs before the data dir is opened. Returns whether a (stale)
/// socket file is there.
fn check_socket_path(path: &Path) -> Result<bool, DaemonError> {
    let err = |message: String| DaemonError::Socket {
        path: path.display().to_string(),
        message,
    };
    let Ok(meta) = path.symlink_metadata() else {
        return Ok(false);
    };
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(err(
            "another daemon is listening on it; not touching it".into()
        ));
    }
    use std::os::unix::fs::FileTypeExt;
    if !meta.file_type().is_socket() {
        return Err(err(
            "exists and is not a socket; refusing to replace it".into()
        ));
    }
    Ok(true)
}

/// Replace a stale socket file; refuse when a live daemon answers on it.
fn prepare_socket_path(path: &Path) -> Result<(), DaemonError> {
    let err = |message: String| DaemonError::Socket {
        path: path.display().to_string(),
        message,
    };
    if check_socket_path(path)? {
        tracing::info!("replacing stale socket {}", path.display());
        std::fs::remove_file(path).map_err(|e| err(format!("cannot remove stale socket: {e}")))?;
    }
    if let Some(parent) = path.parent() {
        if !parent.as_os_str().is_empty() && !parent.exists() {
            std::fs::create_dir_all(parent)
                .map_err(|e| err(format!("cannot create its directory: {e}")))?;
        }
    }
    Ok(())
}

/// A socket bound under a temporary name, not yet under its own: removed when dropped before
/// [`publish`](BoundSocket::publish).
struct BoundSocket {
    listener: Option<std::os::unix::net::UnixListener>,
    tmp: PathBuf,
    path: PathBuf,
}

impl BoundSocket {
    /// Rename the socket into place; clients can connect from now on.
    fn publish(mut self) -> Result<std::os::unix::net::UnixListener, DaemonError> {
        std::fs::rename(&self.tmp, &self.path).map_err(|e| DaemonError::Socket {
            path: self.path.display().to_string(),
            message: format!("cannot move into place: {e}"),
        })?;
        self.listener.take().ok_or_else(|| DaemonError::Socket {
            path: self.path.display().to_string(),
            message: "published twice".into(),
        })
    }
}

impl Drop for BoundSocket {
    fn drop(&mut self) {
        if self.listener.is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Bind the socket with its final mode: bind under a temporary name and set mode and group;
/// [`BoundSocket::publish`] then renames it into place, so it never appears with looser
/// permissions, and never before the daemon is ready to write.
fn bind_socket(path: &Path, mode: u32, group: Option<&str>) -> Result<BoundSocket, DaemonError> {
    let err = |message: String| DaemonError::Socket {
        path: path.display().to_string(),
        message,
    };
    prepare_socket_path(path)?;
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "bursar.sock".into());
    let tmp = path.with_file_name(format!(".{file_name}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let listener = std::os::unix::net::UnixListener::bind(&tmp)
        .map_err(|e| err(format!("cannot bind: {e}")))?;
    let bound = BoundSocket {
        listener: Some(listener),
        tmp,
        path: path.to_path_buf(),
    };
    std::fs::set_permissions(&bound.tmp, std::fs::Permissions::from_mode(mode))
        .map_err(|e| err(format!("cannot set mode: {e}")))?;
    if let Some(g) = group {
        let gid = group_id(g).ok_or_else(|| err(format!("unknown socket_group {g:?}")))?;
        std::os::unix::fs::chown(&bound.tmp, None, Some(gid))
            .map_err(|e| err(format!("cannot set group {g:?}: {e}")))?;
    }
    Ok(bound)
}

/// Look a group name (or number) up in /etc/group.
fn group_id(name: &str) -> Option<u32> {
    if let Ok(n) = name.parse() {
        return Some(n);
    }
    let text = std::fs::read_to_string("/etc/group").ok()?;
    text.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next()? == name).then_some(())?;
        f.nth(1)?.parse().ok()
    })
}

/// The metrics endpoint of `[daemon] metrics_listen`, bound, with its metrics (SPEC §12).
fn cfg_metrics(
    config: &Config,
) -> Result<Option<(std::net::TcpListener, metrics::Metrics)>, DaemonError> {
    let d = &config.policy.daemon;
    let Some(addr) = d.metrics_listen else {
        return Ok(None);
    };
    let listener = metrics::bind(addr).map_err(DaemonError::Start)?;
    let m = metrics::Metrics::new(d.metrics_max_buckets, config.data_dir.clone())
        .map_err(|e| DaemonError::Start(e.to_string()))?;
    Ok(Some((listener, m)))
}

/// Run the daemon until SIGTERM/SIGINT. Blocks.
pub fn run(config: Config, clock: Clock) -> Result<(), DaemonError> {
    let (stop, _) = tokio::sync::watch::channel(false);
    run_with(config, clock, true, None, stop)
}

/// Run with options, for tests: signal handling on or off, an injected log store (fault
/// injection), and a `stop` sender that shuts the daemon down like SIGTERM when set to true.
pub fn run_with(
    config: Config,
    clock: Clock,
    install_signals: bool,
    store: Option<Box<dyn LogStore>>,
    stop_tx: tokio::sync::watch::Sender<bool>,
) -> Result<(), DaemonError> {
    // Check what can be checked before anything is written: a daemon refused because its
    // socket is in use creates no data dir and appends nothing.
    check_socket_path(&config.socket)?;
    memory::recovery_starts();
    if let Some(settings) = config.policy.cluster.clone() {
        return run_cluster(config, settings, clock, install_signals, stop_tx);
    }
    let store: Box<dyn LogStore> = match store {
        Some(s) => s,
        None => Box::new(open_store(&config.data_dir)?),
    };
    let started = std::time::Instant::now();
    notify_systemd(&[NotifyState::Status("rebuilding state from the log")]);
    let (ledger, folded_past_snapshot) = writer::recover_counted(store.as_ref()).map_err(|e| {
        DaemonError::Start(format!(
            "cannot rebuild state from the log: {e}; nothing was served. `bursar salvage \
             --data-dir {} --to NEW_DIR` copies the intact events before the damage into a new \
             data dir (see docs/operations.md)",
            config.data_dir.display()
        ))
    })?;
    let head = store.head().map(|h| h.0).unwrap_or(0);
    if ledger.last_seq() != head {
        return Err(DaemonError::Start(format!(
            "state folds to seq {} but the log ends at {head}",
            ledger.last_seq()
        )));
    }
    tracing::info!(
        "state rebuilt: {head} events, {} buckets, {} live holds in {:?}",
        ledger.bucket_count(),
        ledger.live_holds(),
        started.elapsed()
    );
    // Recovery's buffers (the snapshot's bytes, the decoded chunks of the log) are freed: give
    // their pages back before serving, or the daemon keeps them (see `memory`).
    memory::recovery_done();
    let clock = watch_clock(clock, (ledger.last_seq() > 0).then(|| ledger.last_ts()));
    let metrics = cfg_metrics(&config)?.map(|(listener, m)| (listener, Arc::new(m)));
    let mut shared = Shared::new(ledger, store);
    shared.folded_past_snapshot = std::sync::atomic::AtomicU64::new(folded_past_snapshot);
    shared.metrics = metrics.as_ref().map(|(_, m)| m.clone());
    shared.max_waiters = std::sync::atomic::AtomicUsize::new(config.policy.daemon.max_waiters);
    let shared = Arc::new(shared);
    let cfg = Arc::new(config);
    // Bound (under a temporary name) before the writer appends `policy_applied`; published once
    // the writer runs.
    let bound = bind_socket(&cfg.socket, cfg.socket_mode, cfg.socket_group.as_deref())?;
    let reload_cfg = cfg.clone();
    let reload = Arc::new(move || reload_cfg.reload_policy().map_err(|e| e.to_string()));
    let (writer, writer_thread) = writer::start(shared.clone(), &cfg.policy, clock.clone(), reload)
        .map_err(DaemonError::Start)?;

    let stop_rx = stop_tx.subscribe();

    // Signals are handled before the socket appears under its name: a SIGHUP sent once it is
    // there (a deploy tool waiting for it) must not meet SIGHUP's default action, exit.
    let signals_thread = if install_signals {
        let w = writer.clone();
        Some(spawn_signal_thread(
            stop_tx.clone(),
            Box::new(move || {
                let own = config::own_actor();
                let job = Job::Reload {
                    policy: None,
                    actor: own,
                    req: None,
                    reply: None,
                };
                if w.submit(job).is_err() {
                    tracing::error!("SIGHUP: the writer is not accepting jobs");
                }
            }),
        )?)
    } else {
        None
    };
    let std_listener = bound.publish()?;
    std_listener
        .set_nonblocking(true)
        .map_err(|e| DaemonError::Start(format!("socket: {e}")))?;
    let ctx = server::Ctx {
        shared: shared.clone(),
        writer: writer.clone(),
        admin_uids: cfg.admin_uids.clone(),
        clock,
        shutdown: stop_rx,
        dry_run_busy: Default::default(),
        cluster: None,
    };
    let listening = format!(
        "bursard {} listening on {} (data dir {})",
        env!("CARGO_PKG_VERSION"),
        cfg.socket.display(),
        cfg.data_dir.display()
    );
    let scope = metrics::Scope::Single(shared.clone());
    let serving = serve_until_stopped(&cfg, std_listener, ctx, metrics, scope, &listening)?;
    // Drain: let the writer finish what is queued, sync, snapshot, stop.
    notify_systemd(&[
        NotifyState::Stopping,
        NotifyState::Status("stopping: draining the writer"),
    ]);
    tracing::info!("stopping: draining the writer");
    let _ = writer.submit(Job::Shutdown);
    drop(writer);
    let _ = writer_thread.join();
    finish(serving, &cfg, signals_thread);
    Ok(())
}

/// Run a cluster node (SPEC §13) until SIGTERM/SIGINT: every partition's local copy folded and
/// followed, leases taken and renewed, the socket served. See [`cluster`].
fn run_cluster(
    config: Config,
    settings: bursar_core::policy::ClusterSettings,
    clock: Clock,
    install_signals: bool,
    stop_tx: tokio::sync::watch::Sender<bool>,
) -> Result<(), DaemonError> {
    // Bound before anything else, so that a taken port stops the node with a clear error.
    let metrics = cfg_metrics(&config)?.map(|(listener, m)| (listener, Arc::new(m)));
    notify_systemd(&[NotifyState::Status("cluster: folding every partition")]);
    let cfg = Arc::new(config);
    let clock = watch_clock(clock, None);
    let cluster = cluster::Cluster::open(
        cfg.clone(),
        settings.clone(),
        clock.clone(),
        metrics.as_ref().map(|(_, m)| m.clone()),
    )?;
    // Started once the copies are folded (their fold gives its freed memory back).
    let reserve = memory::MemoryReserve::start(settings.memory_reserve_mib)
        .map_err(|e| DaemonError::Start(format!("cannot start the memory reserve: {e}")))?;
    let coordinator = cluster.start_coordinator().map_err(DaemonError::Start)?;
    let bound = bind_socket(&cfg.socket, cfg.socket_mode, cfg.socket_group.as_deref())?;
    let stop_rx = stop_tx.subscribe();
    // Signals first, as on a single host.
    let signals_thread = if install_signals {
        let c = cluster.clone();
        Some(spawn_signal_thread(
            stop_tx.clone(),
            Box::new(move || {
                let c = c.clone();
                let own = config::own_actor();
                std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build();
                    if let Ok(rt) = rt {
                        let line = rt.block_on(c.reload_on_signal(own));
                        tracing::info!("SIGHUP: {line}");
                    }
                });
            }),
        )?)
    } else {
        None
    };
    let std_listener = bound.publish()?;
    std_listener
        .set_nonblocking(true)
        .map_err(|e| DaemonError::Start(format!("socket: {e}")))?;
    let ctx = server::Ctx {
        shared: cluster.parts[0].shared.clone(),
        writer: writer::WriterHandle::closed(),
        admin_uids: cfg.admin_uids.clone(),
        clock,
        shutdown: stop_rx,
        dry_run_busy: Default::default(),
        cluster: Some(cluster.clone()),
    };
    let listening = format!(
        "bursard {} (cluster node {}, {} partitions by {:?}) listening on {}",
        env!("CARGO_PKG_VERSION"),
        settings.node,
        settings.partitions,
        settings.partition_by,
        cfg.socket.display()
    );
    let scope = metrics::Scope::Cluster(cluster.clone());
    let serving = serve_until_stopped(&cfg, std_listener, ctx, metrics, scope, &listening)?;
    notify_systemd(&[NotifyState::Stopping]);
    drop(reserve);
    tracing::info!("stopping: draining the partitions' writers, giving their leases back");
    cluster.stop_coordinating();
    let _ = coordinator.join();
    cluster.stop();
    finish(serving, &cfg, signals_thread);
    Ok(())
}

/// What both modes do once their state is ready: serve the socket (and the metrics endpoint)
/// on a runtime of their own until shutdown, telling systemd when serving starts. Returns the
/// runtime and the connection threads, still up, for the caller's drain (writers, leases)
/// before [`finish`].
fn serve_until_stopped(
    cfg: &Config,
    std_listener: std::os::unix::net::UnixListener,
    ctx: server::Ctx,
    metrics: Option<(std::net::TcpListener, Arc<metrics::Metrics>)>,
    scope: metrics::Scope,
    listening: &str,
) -> Result<Serving, DaemonError> {
    // Connections are served on threads of their own (`connections`); this runtime accepts
    // them and serves the metrics endpoint.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| DaemonError::Start(format!("cannot start the runtime: {e}")))?;
    let threads = connections::ConnectionThreads::start(connections::CONNECTION_THREADS)
        .map_err(|e| DaemonError::Start(format!("cannot start the connection threads: {e}")))?;
    let ctx = Arc::new(ctx);
    tracing::info!("{listening}");
    if let Some(metrics) = metrics {
        serve_metrics(&runtime, metrics, scope, &ctx);
    }
    // Ready: the socket is under its name and listening (a connect succeeds from now on, and
    // is served as soon as the runtime below runs), the state is rebuilt from the log, and
    // SIGTERM is handled (a stop right after READY=1 is a clean one).
    notify_systemd(&[
        NotifyState::Ready,
        NotifyState::Status(&format!("serving on {}", cfg.socket.display())),
    ]);
    runtime.block_on(async {
        match tokio::net::UnixListener::from_std(std_listener) {
            Ok(listener) => server::serve(listener, ctx, &threads).await,
            Err(e) => tracing::error!("socket: {e}"),
        }
    });
    Ok(Serving { runtime, threads })
}

/// What serves the socket, still up after [`serve_until_stopped`] returns: connections keep
/// being answered while the caller drains.
struct Serving {
    runtime: tokio::runtime::Runtime,
    threads: connections::ConnectionThreads,
}

/// The end of a stop, once the caller drained: the runtime's and the connection threads' tasks
/// dropped (their blocking work waited for up to 2 s, a busy connection thread up to 3 s from
/// here), the socket's name removed, the signal thread let go.
fn finish(serving: Serving, cfg: &Config, signals_thread: Option<std::thread::JoinHandle<()>>) {
    let Serving {
        runtime,
        mut threads,
    } = serving;
    let _ = threads.stop_begin();
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    threads.stop();
    let _ = std::fs::remove_file(&cfg.socket);
    drop(signals_thread);
    tracing::info!("stopped");
}

/// Serve the metrics endpoint (bound at start) on `runtime` until shutdown.
fn serve_metrics(
    runtime: &tokio::runtime::Runtime,
    (listener, m): (std::net::TcpListener, Arc<metrics::Metrics>),
    scope: metrics::Scope,
    ctx: &server::Ctx,
) {
    tracing::info!(
        "metrics at http://{}/metrics",
        listener
            .local_addr()
            .map_or_else(|_| "?".to_string(), |a| a.to_string())
    );
    runtime.spawn(metrics::serve(
        listener,
        scope,
        m,
        ctx.clock.clone(),
        ctx.shutdown.clone(),
    ));
}

/// Tell the service manager how the daemon is doing, when it asked to be told: systemd sets
/// `NOTIFY_SOCKET` for a `Type=notify` unit (examples/systemd/bursard.service); without it this
/// does nothing. A failed notification is logged, never fatal: the daemon serves either way
/// (systemd then times the start out and says so). The `sd-notify` crate sends one datagram per
/// call to the path in `NOTIFY_SOCKET` (what systemd's system and user managers set); it does
/// not reach abstract-namespace sockets (`@…`), which some container managers use.
fn notify_systemd(states: &[NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!("cannot notify the service manager through $NOTIFY_SOCKET: {e}");
    }
}

/// A forward step of the wall clock larger than this between two readings (the daemon reads
/// it at least every [`writer::REAPER_TICK`]) is logged as a warning: ledger time follows the
/// clock, so windows roll over and holds expire as if that time had passed.
pub const CLOCK_JUMP_WARN_SECONDS: i64 = 3600;
/// At start, a wall clock this far past the log's last event is logged as a warning (a daemon
/// stopped for a while is normal; a clock set years ahead is not). A clock behind the last event
/// by more than [`CLOCK_JUMP_WARN_SECONDS`] is logged too: ledger time stands still until the
/// clock catches up.
pub const CLOCK_START_GAP_WARN_SECONDS: i64 = 30 * 86_400;

/// `seconds` as a short human duration ("3650 days", "2 h 5 min").
fn human_seconds(seconds: i64) -> String {
    let s = seconds.unsigned_abs();
    match s {
        s if s >= 2 * 86_400 => format!("{} days", s / 86_400),
        s if s >= 3600 => format!("{} h {} min", s / 3600, s % 3600 / 60),
        s => format!("{} min {} s", s / 60, s % 60),
    }
}

/// Wrap the daemon's clock so that jumps are logged (SPEC §2: the daemon's clock decides
/// windows). Checks the first reading against the log's last event, then every reading against
/// the highest one before it: a forward jump beyond [`CLOCK_JUMP_WARN_SECONDS`] is logged once,
/// when it happens. Steps back are not logged while running: ledger time already stands still
/// until the clock catches up (`Ledger::effective_now`).
fn watch_clock(inner: Clock, last_event_ts: Option<bursar_schemas::TsMicros>) -> Clock {
    use bursar_core::time::format_ts;
    use std::sync::atomic::{AtomicI64, Ordering};
    let first = inner();
    if let Some(last) = last_event_ts {
        let ahead = first.saturating_sub(last) / 1_000_000;
        if ahead > CLOCK_START_GAP_WARN_SECONDS {
            tracing::warn!(
                "clock jump: the wall clock ({}) is {} past the log's last event ({}); ledger time \
                 follows the clock: windows that ended since roll over and holds expire. If the \
                 clock is wrong, stop the daemon and fix it",
                format_ts(first),
                human_seconds(ahead),
                format_ts(last)
            );
        } else if -ahead > CLOCK_JUMP_WARN_SECONDS {
            tracing::warn!(
                "clock behind: the wall clock ({}) is {} before the log's last event ({}); ledger \
                 time stands still at the last event until the clock catches up",
                format_ts(first),
                human_seconds(ahead),
                format_ts(last)
            );
        }
    }
    let highest = Arc::new(AtomicI64::new(first));
    Arc::new(move || {
        let now = inner();
        let before = highest.fetch_max(now, Ordering::Relaxed);
        let jump = now.saturating_sub(before) / 1_000_000;
        if jump > CLOCK_JUMP_WARN_SECONDS {
            tracing::warn!(
                "clock jump: the wall clock jumped {} forward (from {} to {}); ledger time follows \
                 it: windows that ended in between roll over and holds due in between expire",
                human_seconds(jump),
                format_ts(before),
                format_ts(now)
            );
        }
        now
    })
}

fn spawn_signal_thread(
    stop: tokio::sync::watch::Sender<bool>,
    on_hup: Box<dyn Fn() + Send>,
) -> Result<std::thread::JoinHandle<()>, DaemonError> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])
        .map_err(|e| DaemonError::Start(format!("cannot install signal handlers: {e}")))?;
    std::thread::Builder::new()
        .name("bursar-signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                if sig == SIGHUP {
                    tracing::info!("SIGHUP: reloading the policy");
                    on_hup();
                } else {
                    tracing::info!("signal {sig}: shutting down");
                    stop.send_replace(true);
                    break;
                }
            }
        })
        .map_err(|e| DaemonError::Start(format!("cannot start the signal thread: {e}")))
}

/// Default paths, for the CLI.
pub fn default_paths() -> (PathBuf, PathBuf) {
    (
        config::default_socket_path(),
        PathBuf::from(config::DEFAULT_DATA_DIR),
    )
}
