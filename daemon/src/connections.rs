//! The threads that serve client connections: each runs a tokio runtime of its own thread
//! (current-thread), and a connection is served from start to end on the thread that has the
//! fewest when it is accepted.
//!
//! Not one multi-thread runtime: there, a task woken by the socket or by the writer often ran
//! on another worker than the one woken for it, and a worker that found work woke a parked one
//! to steal more — more wake-ups and context switches per request than requests. On a VM a
//! wake-up of a sleeping thread is an inter-processor interrupt on both sides. Served this way,
//! `bursar-bench record` (64 connections, depth 1) went from 42,249 / 46,413 to 51,215 /
//! 54,225 events/s (2.71× / 2.93× Redis to 3.30× / 3.39×) in two interleaved pairs
//! (benches/README.md, "Connections on threads of their own"). A thread cannot take another's
//! connections when it is busy; with connections placed by count, many agents spread evenly,
//! and what takes long (`report`, `status`, `verify`, a dry-run `replay`, a stream's reads and
//! rendering) runs on blocking threads.

use crate::conn_socket::{ReadHalf, WriteHalf};
use std::os::unix::net::UnixStream as StdStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How many threads serve connections (as many as the multi-thread runtime had workers).
pub const CONNECTION_THREADS: usize = 2;

/// At a stop, a thread's tasks are dropped at once (tokio's shutdown of a current-thread
/// runtime); this is how long it waits for the work its connections started on blocking threads,
/// and, a second more, how long [`ConnectionThreads::stop`] waits for a thread that is busy.
const STOP_WAIT: Duration = Duration::from_secs(2);

/// Most blocking threads of all connection threads together (tokio's default for one runtime,
/// what the one multi-thread runtime had), shared out evenly.
const BLOCKING_THREADS: usize = 512;

/// The connection threads.
pub struct ConnectionThreads {
    threads: Vec<ConnectionThread>,
    /// Set by the first [`stop_begin`](ConnectionThreads::stop_begin): until when
    /// [`stop`](ConnectionThreads::stop) waits for a thread.
    stop_deadline: Option<std::time::Instant>,
}

struct ConnectionThread {
    handle: tokio::runtime::Handle,
    /// Connections served on it now.
    live: Arc<AtomicUsize>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    /// Disconnected when the thread ends.
    ended: std::sync::mpsc::Receiver<()>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Takes one off its thread's count when the connection's task ends (or is dropped).
struct Live(Arc<AtomicUsize>);

impl Drop for Live {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl ConnectionThreads {
    /// Start `n` threads (at least one), named `bursar-conn-<i>`.
    pub fn start(n: usize) -> std::io::Result<ConnectionThreads> {
        let mut threads = Vec::new();
        let n = n.max(1);
        let blocking = (BLOCKING_THREADS / n).max(1);
        for i in 0..n {
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
            let (ended_tx, ended) = std::sync::mpsc::channel::<()>();
            let thread = std::thread::Builder::new()
                .name(format!("bursar-conn-{i}"))
                .spawn(move || {
                    let _ended = ended_tx;
                    let rt = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .max_blocking_threads(blocking)
                        .build()
                    {
                        Ok(rt) => rt,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = ready_tx.send(Ok(rt.handle().clone()));
                    rt.block_on(async {
                        let _ = stop_rx.await;
                    });
                    rt.shutdown_timeout(STOP_WAIT);
                })?;
            let handle = match ready_rx.recv() {
                Ok(Ok(h)) => h,
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(std::io::Error::other("a connection thread did not start")),
            };
            threads.push(ConnectionThread {
                handle,
                live: Arc::new(AtomicUsize::new(0)),
                stop: Some(stop_tx),
                ended,
                thread: Some(thread),
            });
        }
        Ok(ConnectionThreads {
            threads,
            stop_deadline: None,
        })
    }

    /// Serve `stream` with `serve` on the thread that has the fewest connections.
    pub fn serve<F, Fut>(&self, stream: StdStream, serve: F)
    where
        F: FnOnce(ReadHalf, WriteHalf) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let Some(t) = self
            .threads
            .iter()
            .min_by_key(|t| t.live.load(Ordering::Relaxed))
        else {
            return;
        };
        t.live.fetch_add(1, Ordering::Relaxed);
        let live = Live(t.live.clone());
        t.handle.spawn(async move {
            let _live = live;
            // Registered with the reactor of the thread that serves it.
            match crate::conn_socket::split(stream) {
                Ok((rd, wr)) => serve(rd, wr).await,
                Err(e) => tracing::warn!("cannot serve a connection: {e}"),
            }
        });
    }

    /// Tell every thread to stop: each drops its connections' tasks as soon as it is free, and
    /// waits up to `STOP_WAIT` for their blocking work. [`stop`](ConnectionThreads::stop)
    /// waits for them, until the deadline returned (set by the first call).
    pub fn stop_begin(&mut self) -> std::time::Instant {
        for t in &mut self.threads {
            if let Some(s) = t.stop.take() {
                let _ = s.send(());
            }
        }
        *self
            .stop_deadline
            .get_or_insert_with(|| std::time::Instant::now() + STOP_WAIT + Duration::from_secs(1))
    }

    /// Stop every thread and wait until each has, at most `STOP_WAIT` and a second from the
    /// first [`stop_begin`](ConnectionThreads::stop_begin): a thread still busy then (in a
    /// request's synchronous work) is left to end on its own.
    pub fn stop(mut self) {
        let deadline = self.stop_begin();
        for (i, t) in self.threads.iter_mut().enumerate() {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match t.ended.recv_timeout(left) {
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    tracing::warn!("connection thread {i} is still busy; not waiting for it");
                    t.thread = None;
                }
                _ => {
                    if let Some(j) = t.thread.take() {
                        let _ = j.join();
                    }
                }
            }
        }
    }
}

impl Drop for ConnectionThreads {
    fn drop(&mut self) {
        let _ = self.stop_begin();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::sync::Mutex;

    /// Serves a connection until its client closes it, noting (`id`, the thread serving it).
    fn serve_noting(
        threads: &ConnectionThreads,
        served_on: &Arc<Mutex<Vec<(usize, String)>>>,
        id: usize,
    ) -> StdStream {
        let (client, server) = StdStream::pair().unwrap();
        server.set_nonblocking(true).unwrap();
        let served_on = served_on.clone();
        threads.serve(server, move |mut stream, _| async move {
            let name = std::thread::current().name().unwrap_or("").to_string();
            served_on.lock().unwrap().push((id, name));
            let mut buf = [0u8; 16];
            while let Ok(n) = tokio::io::AsyncReadExt::read(&mut stream, &mut buf).await {
                if n == 0 {
                    break;
                }
            }
        });
        client
    }

    fn wait_until(mut done: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(std::time::Instant::now() < deadline, "timed out");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn connections_are_spread_over_the_threads_and_a_closed_one_frees_its_place() {
        let threads = ConnectionThreads::start(2).unwrap();
        let served_on = Arc::new(Mutex::new(Vec::new()));
        let clients: Vec<StdStream> = (0..4)
            .map(|id| serve_noting(&threads, &served_on, id))
            .collect();
        wait_until(|| served_on.lock().unwrap().len() == 4);
        let count = |name: &str| {
            served_on
                .lock()
                .unwrap()
                .iter()
                .filter(|(_, n)| n.as_str() == name)
                .count()
        };
        assert_eq!(count("bursar-conn-0"), 2);
        assert_eq!(count("bursar-conn-1"), 2);
        // The two on thread 0 close: the next two go there.
        let live = |i: usize| threads.threads[i].live.load(Ordering::Relaxed);
        let on_0: Vec<usize> = served_on
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, n)| n == "bursar-conn-0")
            .map(|(id, _)| *id)
            .collect();
        let kept: Vec<StdStream> = clients
            .into_iter()
            .enumerate()
            .filter(|(id, _)| !on_0.contains(id))
            .map(|(_, c)| c)
            .collect();
        wait_until(|| live(0) == 0);
        assert_eq!(live(1), 2);
        let more: Vec<StdStream> = (4..6)
            .map(|id| serve_noting(&threads, &served_on, id))
            .collect();
        wait_until(|| served_on.lock().unwrap().len() == 6);
        assert_eq!(count("bursar-conn-0"), 4);
        assert_eq!(count("bursar-conn-1"), 2);
        drop((kept, more));
        threads.stop();
    }

    /// `stop` on a thread of its own: how long it took, or `None` if it had not returned
    /// after `within`.
    fn stop_within(threads: ConnectionThreads, within: Duration) -> Option<Duration> {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let t = std::time::Instant::now();
            threads.stop();
            let _ = tx.send(t.elapsed());
        });
        rx.recv_timeout(within).ok()
    }

    #[test]
    fn a_stop_does_not_wait_for_a_client_that_keeps_its_connection_open() {
        let threads = ConnectionThreads::start(2).unwrap();
        let served_on = Arc::new(Mutex::new(Vec::new()));
        let mut client = serve_noting(&threads, &served_on, 0);
        wait_until(|| served_on.lock().unwrap().len() == 1);
        // A stop that waited for the connection would take STOP_WAIT and a second.
        let took = stop_within(threads, STOP_WAIT);
        assert!(took.is_some(), "the stop waited for the open connection");
        // The connection's task was dropped: the client reads the end of the stream.
        let mut buf = [0u8; 1];
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        assert_eq!(client.read(&mut buf).unwrap(), 0);
    }

    #[test]
    fn a_stop_leaves_a_thread_stuck_in_synchronous_work_behind_in_bounded_time() {
        let threads = ConnectionThreads::start(2).unwrap();
        let (started_tx, started) = std::sync::mpsc::channel();
        let (_client, server) = StdStream::pair().unwrap();
        server.set_nonblocking(true).unwrap();
        threads.serve(server, move |_, _| async move {
            let _ = started_tx.send(());
            // Work that never yields to the runtime, longer than any stop should wait.
            std::thread::sleep(Duration::from_secs(60));
        });
        started.recv_timeout(Duration::from_secs(10)).unwrap();
        let took = stop_within(threads, STOP_WAIT + Duration::from_secs(5));
        let took = took.expect("the stop waited for the busy thread");
        assert!(
            took >= STOP_WAIT + Duration::from_secs(1),
            "returned before the busy thread had its time: {took:?}"
        );
    }
}
