//! A client's socket as a connection thread serves it: registered with the reactor for reading
//! only, written to directly.
//!
//! Why not `tokio::net::UnixStream`: it registers every socket for both directions, and on
//! Linux each time the peer reads what was written to a Unix socket, the writer's socket
//! reports room to write again (`sock_wfree` → `unix_write_space` → `EPOLLOUT`). A thread
//! asleep in `epoll_wait` is woken for it — after every answer a client reads, a wake-up of
//! the connection's thread with nothing to do, an inter-processor interrupt on a VM. Answers are
//! small and a socket's send buffer holds hundreds of them, so a write almost never waits.
//! When one would (a client that does not read), a duplicate of the socket is registered for
//! writing, and kept for the rest of the connection: a client that stopped reading once (a slow
//! `tail` or `export`) likely does again, and its wake-ups matter less than a descriptor
//! opened and closed per buffer.
//!
//! Each connection thus takes one descriptor, two once it has had to wait; with none left for
//! the duplicate (the process at its limit), the write is tried again after [`ROOM_RETRY`],
//! doubled up to [`ROOM_RETRY_MAX`] while it lasts, rather than the connection dropped.
//!
//! A direct write does not count against tokio's cooperative budget as tokio's own writes do
//! (reads and waits for readiness do); every loop that writes to a connection also awaits a
//! channel (the answers, a stream's lines), which does.

use std::future::Future;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

/// How long a write that would block waits before it tries again when no descriptor could be
/// had to wait on.
pub const ROOM_RETRY: Duration = Duration::from_millis(2);

/// The longest pause between such tries.
pub const ROOM_RETRY_MAX: Duration = Duration::from_millis(100);

/// The reading half (see the module's comment).
pub struct ReadHalf(Arc<AsyncFd<UnixStream>>);

/// The writing half: writes go straight to the socket until one would block (see the module's
/// comment).
pub struct WriteHalf {
    socket: Arc<AsyncFd<UnixStream>>,
    room: Room,
    /// The next pause if no duplicate can be had.
    retry: Duration,
}

/// How the writing half waits for room in the socket's buffer.
enum Room {
    /// It never had to: nothing is registered for writing.
    Unneeded,
    /// A duplicate of the socket registered for writing, kept from the first wait on.
    Registered(AsyncFd<UnixStream>),
    /// No duplicate could be had: try again after a pause.
    Retry(Pin<Box<tokio::time::Sleep>>),
}

impl ReadHalf {
    /// Whether the peer has hung up: closed the connection, not only its writing side (a
    /// client that half-closes still reads what it is owed). `poll` says `POLLHUP` on a Unix
    /// stream socket only once both directions are shut down — by the peer's `close`, or by
    /// its `shutdown` of both; never shut down this side's writing before every answer owed is
    /// written, or a client that half-closed would look gone.
    pub fn peer_hung_up(&self) -> bool {
        use rustix::event::{poll, PollFd, PollFlags, Timespec};
        let mut fds = [PollFd::new(self.0.get_ref(), PollFlags::empty())];
        let now = Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        poll(&mut fds, Some(&now)).is_ok() && fds[0].revents().contains(PollFlags::HUP)
    }
}

/// Register `stream` (made non-blocking) with the current reactor for reading, and split it.
pub fn split(stream: UnixStream) -> std::io::Result<(ReadHalf, WriteHalf)> {
    stream.set_nonblocking(true)?;
    let socket = Arc::new(register(stream, Interest::READABLE)?);
    Ok((
        ReadHalf(socket.clone()),
        WriteHalf {
            socket,
            room: Room::Unneeded,
            retry: ROOM_RETRY,
        },
    ))
}

impl AsyncRead for ReadHalf {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        loop {
            let mut ready = ready!(self.0.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            let wanted = unfilled.len();
            match ready.try_io(|s| s.get_ref().read(unfilled)) {
                Ok(Ok(n)) => {
                    if n > 0 && n < wanted {
                        // Drained (as tokio's own streams assume): the next read waits for the
                        // next readiness instead of trying once more. Cleared only if no
                        // readiness came since this one.
                        ready.clear_ready();
                    }
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) if e.kind() == ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                // Would block: its readiness cleared, wait for the next.
                Err(_) => continue,
            }
        }
    }
}

impl AsyncWrite for WriteHalf {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        loop {
            if let Room::Retry(pause) = &mut self.room {
                ready!(pause.as_mut().poll(cx));
                self.room = Room::Unneeded;
            }
            let written = match &self.room {
                Room::Registered(dup) => {
                    let mut ready = ready!(dup.poll_write_ready(cx))?;
                    match ready.try_io(|s| s.get_ref().write(buf)) {
                        Ok(r) => r,
                        // Would block: its readiness cleared, wait for the next.
                        Err(_) => continue,
                    }
                }
                _ => self.socket.get_ref().write(buf),
            };
            match written {
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                // Only a direct write gets here: from now on, wait for room.
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    let dup = self.socket.get_ref().try_clone();
                    // Registered now, it reports the room that came since the write, if any.
                    self.room = match dup.and_then(|d| register(d, Interest::WRITABLE)) {
                        Ok(dup) => {
                            self.retry = ROOM_RETRY;
                            Room::Registered(dup)
                        }
                        Err(e) => {
                            tracing::debug!("no descriptor to wait for room on ({e}); retrying");
                            let pause = self.retry;
                            self.retry = (pause * 2).min(ROOM_RETRY_MAX);
                            Room::Retry(Box::pin(tokio::time::sleep(pause)))
                        }
                    };
                }
                r => return Poll::Ready(r),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(self.socket.get_ref().shutdown(std::net::Shutdown::Write))
    }
}

/// `stream` registered with the current reactor for `interest`.
fn register(stream: UnixStream, interest: Interest) -> std::io::Result<AsyncFd<UnixStream>> {
    #[allow(unsafe_code)]
    // SAFETY: `register_with_interest` asks that the value's `as_raw_fd()` be an open
    // descriptor that stays open, the same, and of the same file for as long as the `AsyncFd`
    // owns it. std's `UnixStream` owns its descriptor (an `OwnedFd`; a duplicate is a descriptor
    // of its own on the same file description), returns it unchanged, and
    // closes it only when dropped, which the `AsyncFd` does after deregistering it; nothing
    // here takes the stream out (`into_inner`) or replaces it (`get_mut`). (tokio 1.54 made the
    // safe `with_interest` deprecated for this call, tokio-rs/tokio#8587.)
    let registered = unsafe { AsyncFd::register_with_interest(stream, interest) };
    registered.map_err(std::io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Longest any of these tests waits for the other side (a hang fails instead).
    const PATIENCE: Duration = Duration::from_secs(20);

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
    }

    /// `f` served on a thread of its own, as a connection thread serves its connections, given
    /// up on after [`PATIENCE`].
    fn serve<T: Send + 'static, F: Future<Output = T> + 'static>(
        f: impl FnOnce() -> F + Send + 'static,
    ) -> std::thread::JoinHandle<Option<T>> {
        std::thread::spawn(move || {
            runtime().block_on(async move { tokio::time::timeout(PATIENCE, f()).await.ok() })
        })
    }

    /// Once the serving side signals on `started` that its write (far larger than a socket's
    /// buffer) has begun, the write is still waiting 100 ms later.
    fn assert_still_writing<T>(
        started: &std::sync::mpsc::Receiver<()>,
        serving: &std::thread::JoinHandle<T>,
    ) {
        started.recv_timeout(PATIENCE).expect("the write started");
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            !serving.is_finished(),
            "a write larger than the socket's buffer finished while nobody read"
        );
    }

    fn client_with_patience(client: &UnixStream) {
        client.set_read_timeout(Some(PATIENCE)).expect("a timeout");
        client.set_write_timeout(Some(PATIENCE)).expect("a timeout");
    }

    /// Voluntary context switches of the calling thread so far.
    fn voluntary_switches() -> u64 {
        let status = std::fs::read_to_string("/proc/thread-self/status").expect("own status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("voluntary_ctxt_switches in /proc/thread-self/status")
    }

    fn answer(i: usize) -> String {
        format!("{{\"answer\":{i}}}\n")
    }

    #[test]
    fn a_connection_thread_sleeps_on_while_its_client_reads_the_answers() {
        const ANSWERS: usize = 64;
        let (ours, mut client) = UnixStream::pair().expect("a socket pair");
        client_with_patience(&client);
        let (counting, counting_rx) = std::sync::mpsc::channel();
        let serving = serve(move || async move {
            let (mut rd, mut wr) = split(ours).expect("registered");
            for i in 0..ANSWERS {
                wr.write_all(answer(i).as_bytes()).await.expect("written");
            }
            // Asleep in the reactor until the client's next request; the client reads the
            // answers meanwhile, one at a time.
            let before = voluntary_switches();
            let _ = counting.send(());
            let mut request = [0u8; 1];
            rd.read_exact(&mut request).await.expect("the request");
            voluntary_switches() - before
        });
        counting_rx
            .recv_timeout(PATIENCE)
            .expect("the answers written");
        let mut answers = String::new();
        for i in 0..ANSWERS {
            // Exactly one answer's bytes: each read frees one write's buffer.
            let mut one = vec![0u8; answer(i).len()];
            client.read_exact(&mut one).expect("an answer");
            answers.push_str(&String::from_utf8_lossy(&one));
            std::thread::sleep(Duration::from_millis(2));
        }
        client.write_all(b"\n").expect("a request");
        let woken = serving.join().expect("the serving thread");
        let woken = woken.expect("the request arrived");
        assert_eq!(answers, (0..ANSWERS).map(answer).collect::<String>());
        // Once for the request; registered for writing too (tokio's own halves), 65 times.
        assert!(
            woken <= 3,
            "the serving thread woke {woken} times while its client read {ANSWERS} answers"
        );
    }

    #[test]
    fn a_write_to_a_client_that_does_not_read_completes_once_it_reads() {
        const BYTES: usize = 8 << 20;
        let (ours, mut client) = UnixStream::pair().expect("a socket pair");
        client_with_patience(&client);
        let (started, started_rx) = std::sync::mpsc::channel();
        let serving = serve(move || async move {
            let (_rd, mut wr) = split(ours).expect("registered");
            let payload: Vec<u8> = (0..BYTES).map(|i| (i % 251) as u8).collect();
            let _ = started.send(());
            // Twice: the second write starts with room registered for already.
            for _ in 0..2 {
                wr.write_all(&payload).await.expect("written");
            }
            payload
        });
        // Far more than a socket's buffer: the write waits for room until the client reads.
        assert_still_writing(&started_rx, &serving);
        let mut got = Vec::new();
        let mut buf = vec![0u8; 64 << 10];
        while got.len() < 2 * BYTES {
            let n = client.read(&mut buf).expect("the payload");
            assert!(n > 0, "the connection ended after {} bytes", got.len());
            got.extend_from_slice(&buf[..n]);
        }
        let sent = serving.join().expect("the serving thread");
        let sent = sent.expect("the writes completed");
        assert!(
            got[..BYTES] == sent[..] && got[BYTES..] == sent[..],
            "bytes in order"
        );
    }

    #[test]
    fn a_write_waiting_for_a_client_that_goes_away_fails_rather_than_waits() {
        let (ours, client) = UnixStream::pair().expect("a socket pair");
        let (started, started_rx) = std::sync::mpsc::channel();
        let serving = serve(move || async move {
            let (_rd, mut wr) = split(ours).expect("registered");
            let payload = vec![7u8; 8 << 20];
            let _ = started.send(());
            wr.write_all(&payload).await
        });
        assert_still_writing(&started_rx, &serving);
        drop(client);
        let written = serving.join().expect("the serving thread");
        let written = written.expect("the write ended when the client went away");
        let e = written.expect_err("nobody read the bytes");
        assert_eq!(e.kind(), ErrorKind::BrokenPipe, "{e}");
    }

    #[test]
    fn reads_come_in_order_until_the_client_closes() {
        let (ours, mut client) = UnixStream::pair().expect("a socket pair");
        client_with_patience(&client);
        let writer = std::thread::spawn(move || {
            for i in 0..200 {
                client
                    .write_all(format!("line {i}\n").as_bytes())
                    .expect("a line");
                if i % 50 == 0 {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        });
        let serving = serve(move || async move {
            let (mut rd, _wr) = split(ours).expect("registered");
            let mut all = Vec::new();
            rd.read_to_end(&mut all).await.expect("read to the end");
            all
        });
        writer.join().expect("the client");
        let read = serving.join().expect("the serving thread");
        let read = read.expect("the end of the stream");
        let expected: String = (0..200).map(|i| format!("line {i}\n")).collect();
        assert_eq!(String::from_utf8_lossy(&read), expected);
    }
}
