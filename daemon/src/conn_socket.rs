//! A client's socket as a connection thread serves it: registered with the reactor for reading
//! only, written to directly.
//!
//! Why not `tokio::net::UnixStream`: it registers every socket for both directions, and on
//! Linux each time the peer reads what was written to a Unix socket, the writer's socket
//! reports room to write again (`sock_wfree` → `unix_write_space` → `EPOLLOUT`). A thread
//! asleep in `epoll_wait` is woken for it — after every answer a client reads, a wake-up of
//! the connection's thread with nothing to do, an inter-processor interrupt on a VM. Answers are
//! small and a socket's send buffer holds hundreds of them, so a write almost never waits;
//! when one would (a client that does not read), this socket's duplicate is registered for
//! writing until the write goes through.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

/// The reading half (see the module's comment).
pub struct ReadHalf(Arc<AsyncFd<UnixStream>>);

/// The writing half: writes go straight to the socket; only a write that would block
/// registers a duplicate of the socket for writing, dropped once a write goes through.
pub struct WriteHalf {
    socket: Arc<AsyncFd<UnixStream>>,
    waiting: Option<AsyncFd<UnixStream>>,
}

/// Register `stream` (non-blocking) with the current reactor for reading, and split it.
pub fn split(stream: UnixStream) -> std::io::Result<(ReadHalf, WriteHalf)> {
    stream.set_nonblocking(true)?;
    let socket = Arc::new(register(stream, Interest::READABLE)?);
    Ok((
        ReadHalf(socket.clone()),
        WriteHalf {
            socket,
            waiting: None,
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
            if let Some(waiting) = &self.waiting {
                let mut ready = ready!(waiting.poll_write_ready(cx))?;
                match ready.try_io(|s| s.get_ref().write(buf)) {
                    Ok(r) => {
                        self.waiting = None;
                        return Poll::Ready(r);
                    }
                    Err(_) => continue,
                }
            }
            match self.socket.get_ref().write(buf) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    // Registered now, it reports the room that came since the write, if any.
                    let dup = self.socket.get_ref().try_clone()?;
                    self.waiting = Some(register(dup, Interest::WRITABLE)?);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
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
///
/// tokio 1.54 deprecates the safe `AsyncFd::with_interest` for its successor, an `unsafe fn`
/// (tokio-rs/tokio#8587): the registration is sound only if the value keeps returning the same
/// open descriptor for as long as the `AsyncFd` owns it, which tokio cannot check for any `T`.
/// Here `T` is std's `UnixStream`, which owns its descriptor and returns it unchanged until it is
/// dropped, so the condition holds; and this workspace forbids `unsafe` code of its own.
#[allow(deprecated)]
fn register(stream: UnixStream, interest: Interest) -> std::io::Result<AsyncFd<UnixStream>> {
    AsyncFd::with_interest(stream, interest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
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

    #[test]
    fn a_connection_thread_sleeps_on_while_its_client_reads_the_answers() {
        const ANSWERS: usize = 64;
        let (ours, mut client) = UnixStream::pair().expect("a socket pair");
        let serving = std::thread::spawn(move || {
            runtime().block_on(async move {
                let (mut rd, mut wr) = split(ours).expect("registered");
                for i in 0..ANSWERS {
                    wr.write_all(format!("{{\"answer\":{i}}}\n").as_bytes())
                        .await
                        .expect("an answer written");
                }
                // Asleep in the reactor until the client's next request; the client reads the
                // answers meanwhile, one at a time.
                let before = voluntary_switches();
                let mut request = [0u8; 1];
                rd.read_exact(&mut request).await.expect("the request");
                voluntary_switches() - before
            })
        });
        std::thread::sleep(Duration::from_millis(50));
        let mut answers = String::new();
        for i in 0..ANSWERS {
            // Exactly one answer's bytes: each read frees one write's buffer.
            let mut answer = vec![0u8; format!("{{\"answer\":{i}}}\n").len()];
            client.read_exact(&mut answer).expect("an answer");
            answers.push_str(&String::from_utf8_lossy(&answer));
            std::thread::sleep(Duration::from_millis(2));
        }
        client.write_all(b"\n").expect("a request");
        let woken = serving.join().expect("the serving thread");
        let expected: String = (0..ANSWERS)
            .map(|i| format!("{{\"answer\":{i}}}\n"))
            .collect();
        assert_eq!(answers, expected);
        // Once for the request; registered for writing too, it woke after every answer read.
        assert!(
            woken <= 3,
            "the serving thread woke {woken} times while its client read {ANSWERS} answers"
        );
    }

    #[test]
    fn a_write_to_a_client_that_does_not_read_completes_once_it_reads() {
        const BYTES: usize = 8 << 20;
        let (ours, mut client) = UnixStream::pair().expect("a socket pair");
        let serving = std::thread::spawn(move || {
            runtime().block_on(async move {
                let (_rd, mut wr) = split(ours).expect("registered");
                let payload: Vec<u8> = (0..BYTES).map(|i| (i % 251) as u8).collect();
                wr.write_all(&payload).await.map(|()| payload)
            })
        });
        // Far more than a socket's buffer: the write waits for room until the client reads.
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            !serving.is_finished(),
            "8 MiB cannot fit in a socket's buffer"
        );
        let mut got = Vec::new();
        let mut buf = vec![0u8; 64 << 10];
        while got.len() < BYTES {
            let n = client.read(&mut buf).expect("the payload");
            assert!(n > 0, "the connection ended after {} bytes", got.len());
            got.extend_from_slice(&buf[..n]);
        }
        let sent = serving
            .join()
            .expect("the serving thread")
            .expect("written");
        assert!(
            got == sent,
            "the bytes read are the bytes written, in order"
        );
    }

    #[test]
    fn reads_come_in_order_until_the_client_closes() {
        let (ours, mut client) = UnixStream::pair().expect("a socket pair");
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
        let read = runtime().block_on(async move {
            let (mut rd, _wr) = split(ours).expect("registered");
            let mut all = Vec::new();
            rd.read_to_end(&mut all).await.expect("read to the end");
            all
        });
        writer.join().expect("the client");
        let expected: String = (0..200).map(|i| format!("line {i}\n")).collect();
        assert_eq!(String::from_utf8_lossy(&read), expected);
    }
}
