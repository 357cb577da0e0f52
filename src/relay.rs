//! The tunnel after the upgrade: one task owns both sockets and the guards, moves
//! bytes both ways as they arrive, and ends the connection the WebSocket way.
//!
//! Memory: nothing is buffered while a connection is idle. A read goes into the
//! worker thread's buffer inside a synchronous function, is walked and written at
//! once; only bytes the receiver cannot take yet are copied to the heap, and that
//! copy is freed as soon as it is written.

use std::cell::RefCell;
use std::future::Future;
use std::io::{self, Read};
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;

use crate::frame::{MAX_HEADER, Walk, Walker, close_code, close_frame};

/// Buffer for one read: large enough to move a typical message in one go.
const READ_BUF: usize = 64 * 1024;

/// How long the relay waits, once it has decided to close, for pending bytes and its
/// close frame to be written and for the client to answer.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Settings a tunnel takes from its pool.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub idle_timeout: Duration,
    pub max_message_size: u64,
}

/// Which end of the tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Backend,
}

/// How a tunnel ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Both ends closed their side; the close frames (if any) were theirs.
    Closed,
    /// The client went away without a close frame (reset or EOF); the backend was sent 1001.
    ClientGone,
    /// The backend went away without a close frame; the client was sent 1011.
    BackendGone,
    /// `Side` sent a message over the pool's limit; both were sent 1009.
    TooBig(Side),
    /// No traffic either way for the pool's idle timeout; both were sent 1001.
    Idle,
    /// wsgate is shutting down; both were sent 1001.
    Shutdown,
}

/// What a tunnel carried, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub end: End,
    pub client_to_backend: Tally,
    pub backend_to_client: Tally,
    /// Who sent the first close frame, if anyone did.
    pub first_close: Option<Side>,
}

/// The shared message and byte counters of one pool, and what this tunnel has
/// added to them. Tallies are added at most once a second (on traffic) and at the
/// end: never an atomic per frame.
pub struct Meter {
    /// Client to backend, backend to client.
    messages: [metrics::Counter; 2],
    bytes: [metrics::Counter; 2],
    /// Messages up, down, bytes up, down, as last added.
    added: [u64; 4],
    last_added: Instant,
}

/// How often a busy tunnel adds its tallies to the shared counters.
const METER_EVERY: Duration = Duration::from_secs(1);

impl Meter {
    pub fn new(pool: &str) -> Meter {
        use crate::metrics::{BACKEND_TO_CLIENT, BYTES, CLIENT_TO_BACKEND, MESSAGES};
        let counter = |name: &'static str, direction: &'static str| metrics::counter!(name, "pool" => pool.to_string(), "direction" => direction);
        Meter {
            messages: [
                counter(MESSAGES, CLIENT_TO_BACKEND),
                counter(MESSAGES, BACKEND_TO_CLIENT),
            ],
            bytes: [
                counter(BYTES, CLIENT_TO_BACKEND),
                counter(BYTES, BACKEND_TO_CLIENT),
            ],
            added: [0; 4],
            last_added: Instant::now(),
        }
    }

    fn add(&mut self, up: &Flow, down: &Flow, now: Instant) {
        let now_counts = [
            up.walker.messages(),
            down.walker.messages(),
            up.bytes,
            down.bytes,
        ];
        for (i, n) in now_counts.iter().enumerate() {
            let delta = n - self.added[i];
            if delta > 0 {
                match i {
                    0 | 1 => self.messages[i].increment(delta),
                    _ => self.bytes[i - 2].increment(delta),
                }
            }
        }
        self.added = now_counts;
        self.last_added = now;
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    pub messages: u64,
    pub bytes: u64,
    /// Status code of the close frame this direction carried, if it carried one.
    pub close_code: Option<u16>,
}

/// One direction's state.
struct Flow {
    walker: Walker,
    /// The start of a frame header whose end has not arrived; held back so that the
    /// receiver stays at a frame boundary until the whole header can be forwarded.
    carry: [u8; MAX_HEADER],
    carry_len: usize,
    /// Read but not yet accepted by the receiver. Empty (no allocation) unless the
    /// receiver is slower than the sender.
    pending: Vec<u8>,
    /// The sender closed its side (read returned 0).
    eof: bool,
    bytes: u64,
}

impl Flow {
    fn new(max_message: u64) -> Flow {
        Flow {
            walker: Walker::new(max_message),
            carry: [0; MAX_HEADER],
            carry_len: 0,
            pending: Vec::new(),
            eof: false,
            bytes: 0,
        }
    }

    fn tally(&self) -> Tally {
        Tally {
            messages: self.walker.messages(),
            bytes: self.bytes,
            close_code: self.walker.close_code(),
        }
    }

    /// Whether wsgate may write a close frame of its own into this direction.
    fn can_inject_close(&self) -> bool {
        self.walker.at_boundary() && self.walker.close_code().is_none()
    }
}

/// Why one step of a flow stopped.
enum Step {
    /// Moved bytes (or had nothing to read); go on.
    Moved,
    /// The sender closed its side.
    Eof,
    /// The sender's message went over the limit.
    TooBig,
    ReadFailed(io::Error),
    WriteFailed(io::Error),
}

/// Reads once from `from`, walks and writes to `to` what it may; what `to` cannot
/// take now goes to `flow.pending`. Synchronous, so the borrowed buffer is never
/// held across an await, nor stored in the connection's future.
///
/// A read that does not fill the buffer took everything the socket had: its
/// readiness is cleared right there, saving the read that would only have
/// returned `WouldBlock`. (Data arriving meanwhile raises a new readiness event;
/// a FIN keeps the socket readable, as closed states are never cleared.)
fn pump(from: &TcpStream, to: &TcpStream, flow: &mut Flow) -> Step {
    READ_BUFFER.with_borrow_mut(|buf| pump_with(buf, from, to, flow))
}

thread_local! {
    /// One read buffer per worker thread, zeroed once: a read never pays for
    /// clearing 64 KiB, and an idle connection holds none of it.
    static READ_BUFFER: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; READ_BUF].into_boxed_slice());
}

fn pump_with(buf: &mut [u8], from: &TcpStream, to: &TcpStream, flow: &mut Flow) -> Step {
    let carried = flow.carry_len;
    buf[..carried].copy_from_slice(&flow.carry[..carried]);
    let space = buf.len() - carried;
    let mut got = None;
    let read = from.try_io(Interest::READABLE, || {
        let n = (&*socket2::SockRef::from(from)).read(&mut buf[carried..])?;
        got = Some(n);
        if n > 0 && n < space {
            Err(io::ErrorKind::WouldBlock.into())
        } else {
            Ok(())
        }
    });
    let n = match (got, read) {
        (Some(0), _) => return Step::Eof,
        (Some(n), _) => n,
        (None, Err(e)) if e.kind() == io::ErrorKind::WouldBlock => return Step::Moved,
        (None, Err(e)) => return Step::ReadFailed(e),
        (None, Ok(())) => return Step::Moved,
    };
    flow.bytes += n as u64;
    let data = &buf[..carried + n];
    flow.carry_len = 0;
    let (forward, too_big) = match flow.walker.walk(data) {
        Walk::Forward { held } => {
            let end = data.len() - held;
            flow.carry[..held].copy_from_slice(&data[end..]);
            flow.carry_len = held;
            (&data[..end], false)
        }
        Walk::TooBig { at } => (&data[..at], true),
    };
    if let Err(e) = write_now(to, forward, &mut flow.pending) {
        return Step::WriteFailed(e);
    }
    if too_big { Step::TooBig } else { Step::Moved }
}

/// Writes as much of `data` as the socket takes without waiting; keeps the rest.
fn write_now(to: &TcpStream, mut data: &[u8], pending: &mut Vec<u8>) -> io::Result<()> {
    while !data.is_empty() {
        match to.try_write(data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                pending.extend_from_slice(data);
                return Ok(());
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes from `pending` what the socket takes now; frees it once empty.
fn flush_now(to: &TcpStream, pending: &mut Vec<u8>) -> io::Result<()> {
    let mut written = 0;
    while written < pending.len() {
        match to.try_write(&pending[written..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    if written == pending.len() {
        *pending = Vec::new();
    } else {
        pending.drain(..written);
    }
    Ok(())
}

/// The backend half of one proxied WebSocket and everything the tunnel keeps:
/// built before the client's upgrade completes, kept in one box that the relay
/// works on in place. Nothing big is moved from one layer of the connection's
/// future to the next, so nothing is stored twice in it.
pub struct Tunnel<G> {
    backend: TcpStream,
    /// Bytes the backend sent right behind its 101.
    backend_early: Bytes,
    limits: Limits,
    /// Released as soon as the backend side is done (its count, presence...).
    guard: Option<G>,
    /// Message and byte counters; `None` with message metrics off.
    meter: Option<Meter>,
    /// Client to backend.
    up: Flow,
    /// Backend to client.
    down: Flow,
}

impl<G> Tunnel<G> {
    pub fn new(
        backend: TcpStream,
        backend_early: Bytes,
        limits: Limits,
        guard: G,
        meter: Option<Meter>,
    ) -> Box<Tunnel<G>> {
        Box::new(Tunnel {
            backend,
            backend_early,
            limits,
            guard: Some(guard),
            meter,
            up: Flow::new(limits.max_message_size),
            down: Flow::new(limits.max_message_size),
        })
    }

    /// Relays between `client` (with the bytes it sent behind its upgrade request)
    /// and the backend until the connection ends, then closes both sockets.
    pub async fn run(
        mut self: Box<Self>,
        client: TcpStream,
        client_early: Bytes,
        shutdown: CancellationToken,
    ) -> Outcome {
        let backend_early = std::mem::take(&mut self.backend_early);
        let t = &mut *self;
        let mut first_close = None;
        let end = match feed_early(
            &client,
            client_early,
            &t.backend,
            backend_early,
            &mut t.up,
            &mut t.down,
        ) {
            Some(end) => end,
            None => {
                relay(
                    &client,
                    &t.backend,
                    &mut t.up,
                    &mut t.down,
                    t.limits.idle_timeout,
                    &shutdown,
                    &mut t.meter,
                    &mut first_close,
                )
                .await
            }
        };
        if let Some(meter) = t.meter.as_mut() {
            meter.add(&t.up, &t.down, Instant::now());
        }
        if first_close.is_none() {
            first_close = match (t.up.walker.close_code(), t.down.walker.close_code()) {
                (Some(_), _) => Some(Side::Client),
                (None, Some(_)) => Some(Side::Backend),
                (None, None) => None,
            };
        }
        let outcome = Outcome {
            end,
            first_close,
            client_to_backend: t.up.tally(),
            backend_to_client: t.down.tally(),
        };
        // After `Closed` both sides have sent and received FIN: nothing to close.
        if end != End::Closed {
            // Boxed: the closing steps take room only in the rare tunnel that is
            // closing, not in every idle one.
            Box::pin(finish(client, t, end)).await;
        }
        outcome
    }
}

/// Closes both sides after `end`: close frames where they belong, FIN, then a
/// bounded wait for each peer to close. The guard is released as soon as the
/// backend side is done, not after the client has finished closing.
async fn finish<G>(mut client: TcpStream, tunnel: &mut Tunnel<G>, end: End) {
    let (to_client, to_backend) = match end {
        End::Closed => (None, None),
        End::ClientGone => (None, Some(close_code::GOING_AWAY)),
        End::BackendGone => (Some(close_code::BACKEND_GONE), None),
        End::TooBig(_) => (
            Some(close_code::MESSAGE_TOO_BIG),
            Some(close_code::MESSAGE_TOO_BIG),
        ),
        End::Idle | End::Shutdown => (Some(close_code::GOING_AWAY), Some(close_code::GOING_AWAY)),
    };
    let Tunnel {
        backend,
        guard,
        up,
        down,
        ..
    } = tunnel;
    let close_backend = async {
        if end != End::BackendGone {
            let mask = fastrand::u32(..).to_be_bytes();
            let closed = close_side(backend, up, to_backend, Some(mask));
            if let Ok(Err(e)) = timeout(CLOSE_GRACE, closed).await {
                tracing::debug!(error = %e, "backend gone while closing");
            }
        }
        drop(guard.take());
    };
    let close_client = async {
        if end != End::ClientGone {
            let closed = close_side(&mut client, down, to_client, None);
            if let Ok(Err(e)) = timeout(CLOSE_GRACE, closed).await {
                tracing::debug!(error = %e, "client gone while closing");
            }
        }
    };
    tokio::join!(close_backend, close_client);
}

/// Ends one side gracefully: writes what is pending, then a close frame with `code`
/// where the receiver is at a frame boundary and has not had one, then FIN; then
/// reads (and drops) until the peer closes, so that our close frame is not lost to
/// a reset caused by unread data. Errors mean the peer is gone: nothing left to do.
async fn close_side(
    stream: &mut TcpStream,
    toward: &mut Flow,
    code: Option<u16>,
    mask: Option<[u8; 4]>,
) -> io::Result<()> {
    if !toward.pending.is_empty() {
        stream.write_all(&toward.pending).await?;
        toward.pending = Vec::new();
    }
    if let Some(code) = code
        && toward.can_inject_close()
    {
        let (frame, len) = close_frame(code, mask);
        stream.write_all(&frame[..len]).await?;
    }
    stream.shutdown().await?;
    loop {
        stream.readable().await?;
        if drain_now(stream)? {
            return Ok(());
        }
    }
}

/// Reads and drops what is there; true at EOF.
fn drain_now(stream: &TcpStream) -> io::Result<bool> {
    READ_BUFFER.with_borrow_mut(|sink| drain_into(sink, stream))
}

fn drain_into(sink: &mut [u8], stream: &TcpStream) -> io::Result<bool> {
    loop {
        match stream.try_read(sink) {
            Ok(0) => return Ok(true),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) => return Err(e),
        }
    }
}

/// Bytes the HTTP layer read along with the handshake go through the walker like
/// any other, first; they are dropped here, so the tunnel holds no HTTP buffer.
fn feed_early(
    client: &TcpStream,
    client_early: Bytes,
    backend: &TcpStream,
    backend_early: Bytes,
    up: &mut Flow,
    down: &mut Flow,
) -> Option<End> {
    for (data, to, flow, side) in [
        (client_early, backend, &mut *up, Side::Client),
        (backend_early, client, &mut *down, Side::Backend),
    ] {
        if data.is_empty() {
            continue;
        }
        flow.bytes += data.len() as u64;
        let step = match flow.walker.walk(&data) {
            Walk::Forward { held } => {
                let end = data.len() - held;
                flow.carry[..held].copy_from_slice(&data[end..]);
                flow.carry_len = held;
                write_now(to, &data[..end], &mut flow.pending).map(|_| false)
            }
            Walk::TooBig { at } => write_now(to, &data[..at], &mut flow.pending).map(|_| true),
        };
        match (step, side) {
            (Ok(true), side) => return Some(End::TooBig(side)),
            (Ok(false), _) => {}
            (Err(_), Side::Client) => return Some(End::BackendGone),
            (Err(_), Side::Backend) => return Some(End::ClientGone),
        }
    }
    None
}

/// What woke the relay.
enum Event {
    Shutdown,
    Idle,
    ClientReadable(io::Result<()>),
    BackendReadable(io::Result<()>),
    BackendWritable(io::Result<()>),
    ClientWritable(io::Result<()>),
}

/// The relay loop proper; returns why it stopped. On `Closed` both sides have
/// sent FIN and every byte was delivered.
///
/// It waits with `poll_*_ready` on the streams it owns (one waker slot each, no
/// waiter list to join and leave per event) and a cancellation future pinned
/// once, so an event costs the system calls that move the bytes and little else.
#[allow(clippy::too_many_arguments)]
async fn relay(
    client: &TcpStream,
    backend: &TcpStream,
    up: &mut Flow,
    down: &mut Flow,
    idle_timeout: Duration,
    shutdown: &CancellationToken,
    meter: &mut Option<Meter>,
    first_close: &mut Option<Side>,
) -> End {
    let mut last_activity = Instant::now();
    let idle = tokio::time::sleep(idle_timeout);
    tokio::pin!(idle);
    let cancelled = shutdown.cancelled();
    tokio::pin!(cancelled);
    // Which side is looked at first when both are readable, for fairness.
    let mut client_first = true;

    loop {
        if up.eof && down.eof && up.pending.is_empty() && down.pending.is_empty() {
            return End::Closed;
        }
        if first_close.is_none() {
            if up.walker.close_code().is_some() {
                *first_close = Some(Side::Client);
            } else if down.walker.close_code().is_some() {
                *first_close = Some(Side::Backend);
            }
        }
        if let Some(m) = meter.as_mut()
            && last_activity.duration_since(m.last_added) >= METER_EVERY
        {
            m.add(up, down, last_activity);
        }
        let read_client = !up.eof && up.pending.is_empty();
        let read_backend = !down.eof && down.pending.is_empty();
        let flush_backend = !up.pending.is_empty();
        let flush_client = !down.pending.is_empty();
        client_first = !client_first;
        let event = std::future::poll_fn(|cx| {
            if cancelled.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Event::Shutdown);
            }
            for client_turn in [client_first, !client_first] {
                if client_turn
                    && read_client
                    && let Poll::Ready(r) = client.poll_read_ready(cx)
                {
                    return Poll::Ready(Event::ClientReadable(r));
                }
                if !client_turn
                    && read_backend
                    && let Poll::Ready(r) = backend.poll_read_ready(cx)
                {
                    return Poll::Ready(Event::BackendReadable(r));
                }
            }
            if flush_backend && let Poll::Ready(r) = backend.poll_write_ready(cx) {
                return Poll::Ready(Event::BackendWritable(r));
            }
            if flush_client && let Poll::Ready(r) = client.poll_write_ready(cx) {
                return Poll::Ready(Event::ClientWritable(r));
            }
            if idle.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Event::Idle);
            }
            Poll::Pending
        })
        .await;
        match event {
            Event::Shutdown => return End::Shutdown,
            Event::Idle => {
                let deadline = last_activity + idle_timeout;
                if Instant::now() >= deadline {
                    return End::Idle;
                }
                idle.as_mut().reset(deadline);
            }
            Event::ClientReadable(ready) => {
                if ready.is_err() {
                    return End::ClientGone;
                }
                last_activity = Instant::now();
                match pump(client, backend, up) {
                    Step::Moved => {}
                    Step::Eof => {
                        up.eof = true;
                        if up.walker.close_code().is_none() {
                            return End::ClientGone;
                        }
                        // With both sides done, closing the sockets sends the FIN.
                        if !down.eof {
                            shutdown_write(backend);
                        }
                    }
                    Step::TooBig => return End::TooBig(Side::Client),
                    Step::ReadFailed(e) => return gone(End::ClientGone, &e),
                    Step::WriteFailed(e) => return gone(End::BackendGone, &e),
                }
            }
            Event::BackendReadable(ready) => {
                if ready.is_err() {
                    return End::BackendGone;
                }
                last_activity = Instant::now();
                match pump(backend, client, down) {
                    Step::Moved => {}
                    Step::Eof => {
                        down.eof = true;
                        if down.walker.close_code().is_none() {
                            return End::BackendGone;
                        }
                        if !up.eof {
                            shutdown_write(client);
                        }
                    }
                    Step::TooBig => return End::TooBig(Side::Backend),
                    Step::ReadFailed(e) => return gone(End::BackendGone, &e),
                    Step::WriteFailed(e) => return gone(End::ClientGone, &e),
                }
            }
            Event::BackendWritable(ready) => {
                if ready.is_err() || flush_now(backend, &mut up.pending).is_err() {
                    return End::BackendGone;
                }
            }
            Event::ClientWritable(ready) => {
                if ready.is_err() || flush_now(client, &mut down.pending).is_err() {
                    return End::ClientGone;
                }
            }
        }
    }
}

fn gone(end: End, error: &io::Error) -> End {
    tracing::debug!(?end, %error, "socket error");
    end
}

/// Sends FIN: the peer has said all it will say, pass that on. (EOF is only taken
/// with nothing pending.) A failure means the receiver is gone already, which its
/// own read or write reports next; there is nothing else to do about it here.
fn shutdown_write(stream: &TcpStream) {
    if let Err(e) = socket2::SockRef::from(stream).shutdown(std::net::Shutdown::Write) {
        tracing::debug!(error = %e, "shutdown after EOF");
    }
}
