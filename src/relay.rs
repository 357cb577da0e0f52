//! The tunnel after the upgrade: one task owns both streams and the guards, moves
//! bytes both ways as they arrive, and ends the connection the WebSocket way.
//!
//! Memory: nothing is buffered while a connection is idle. A read goes into the
//! worker thread's buffer inside a synchronous step, is walked and written at once;
//! only bytes the receiver cannot take yet are copied to the heap, and that copy is
//! freed as soon as it is written.
//!
//! Stream kinds plug in at one seam, [`RelayIo`]: plain TCP implements it with
//! readiness and non-blocking system calls (the fast path); any other stream
//! (TLS, an HTTP/2 stream) through [`Polled`], over its `AsyncRead`/`AsyncWrite`.

use std::cell::RefCell;
use std::future::Future;
use std::io::{self, Read};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};

use crate::balancer::ConnGuard;
use crate::closing::{Order, Reason, Wave};
use crate::frame::{Rules, Walk, Walker, close_code, close_frame};
use crate::presence::PresenceGuard;

/// Buffer for one read: large enough to move a typical message in one go.
const READ_BUF: usize = 64 * 1024;

/// Settings a tunnel takes from its pool.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub idle_timeout: Duration,
    pub max_message_size: u64,
    /// Once a close frame has gone one way, how long the other side has to answer
    /// and close; also how long wsgate waits for a peer to take its own close.
    pub close_timeout: Duration,
    /// Check every frame against RFC 6455 (`[server] strict_frames`).
    pub strict_frames: bool,
    /// The backend's 101 named an extension: RSV bits are allowed.
    pub extensions: bool,
}

impl Limits {
    /// What the walker checks in frames from `sender`.
    fn rules(&self, sender: Side) -> Rules {
        Rules {
            strict: self.strict_frames,
            from_client: sender == Side::Client,
            extensions: self.extensions,
        }
    }
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
    /// Both ends sent close frames and closed their side (on plain TCP the
    /// client's FIN, which may follow the backend's, is left to the kernel).
    Closed,
    /// The client went away without a close frame (reset or EOF); the backend was sent 1001.
    ClientGone,
    /// The backend went away without a close frame; the client was sent 1011.
    BackendGone,
    /// `Side` sent a message over the pool's limit; both were sent 1009.
    TooBig(Side),
    /// `Side` sent a frame that breaks the protocol; both were sent the code
    /// (1002, or 1007 for a close reason that is not UTF-8).
    Broken(Side, u16),
    /// No traffic either way for the pool's idle timeout; both were sent 1001.
    Idle,
    /// The backend drained: the client was sent 1012, the backend 1001.
    Drain,
    /// A close frame went one way and the other side did not answer and close
    /// within the close timeout: both sockets were closed.
    CloseTimeout,
    /// Its backend held more than its share: the client was sent 1012, the
    /// backend 1001.
    Rebalance,
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
    /// From the tunnel's start to both sockets closed.
    pub duration: Duration,
}

/// The shared message and byte counters of one pool, and what this tunnel has
/// added to them. Tallies are added at most once a second (on traffic) and at the
/// end: never an atomic per frame.
pub struct Meter {
    /// The pool's counters: messages up, down, bytes up, down (shared by its
    /// tunnels, made once with the pool: [`crate::metrics::PoolMetrics::traffic`]).
    counters: Arc<[metrics::Counter; 4]>,
    /// Messages up, down, bytes up, down, as last added.
    added: [u64; 4],
    last_added: Instant,
}

/// How often a busy tunnel adds its tallies to the shared counters.
const METER_EVERY: Duration = Duration::from_secs(1);

impl Meter {
    pub fn new(counters: Arc<[metrics::Counter; 4]>) -> Meter {
        Meter {
            counters,
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
                self.counters[i].increment(delta);
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

/// What the relay needs of a stream: read what is there into a borrowed buffer,
/// write with or without waiting, send FIN.
pub trait RelayIo: Send + 'static {
    /// Reads once into `buf`; `Ready(Ok(0))` is EOF. `Pending` registers `cx`.
    fn poll_read_into(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>>;
    /// Writes some of `data`; `Pending` registers `cx` for when it can take more.
    fn poll_write(&mut self, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>>;
    /// Writes what the stream takes now, without waiting; `WouldBlock` when it
    /// takes nothing.
    fn try_write(&mut self, data: &[u8]) -> io::Result<usize> {
        match self.poll_write(&mut Context::from_waker(Waker::noop()), data) {
            Poll::Ready(r) => r,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
    /// Ends this side's sending (FIN). An error means the peer is gone already.
    fn shutdown_write(&mut self) -> io::Result<()>;
    /// Whether the last bytes this side carries and its FIN can go out together
    /// ([`RelayIo::try_write_before_fin`]); where not, the FIN waits for the
    /// sender's.
    fn fin_with_last_write(&self) -> bool {
        false
    }
    /// Like `try_write`, the bytes held for the FIN that follows so that both go
    /// in one segment (`MSG_MORE`) where [`RelayIo::fin_with_last_write`].
    fn try_write_before_fin(&mut self, data: &[u8]) -> io::Result<usize> {
        self.try_write(data)
    }
}

/// The fast path: readiness from the reactor, `read(2)`/`write(2)` straight into
/// and out of the worker's buffer.
impl RelayIo for TcpStream {
    /// A read that does not fill the buffer took everything the socket had: its
    /// readiness is cleared right there, saving the read that would only have
    /// returned `WouldBlock`. (Data arriving meanwhile raises a new readiness event;
    /// a FIN keeps the socket readable, as closed states are never cleared.)
    fn poll_read_into(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        loop {
            ready!(TcpStream::poll_read_ready(self, cx))?;
            let mut got = None;
            let read = self.try_io(Interest::READABLE, || {
                let n = (&*socket2::SockRef::from(&*self)).read(buf)?;
                got = Some(n);
                if n > 0 && n < buf.len() {
                    Err(io::ErrorKind::WouldBlock.into())
                } else {
                    Ok(())
                }
            });
            match (got, read) {
                (Some(n), _) => return Poll::Ready(Ok(n)),
                (None, Err(e)) if e.kind() != io::ErrorKind::WouldBlock => {
                    return Poll::Ready(Err(e));
                }
                // Readiness was stale: cleared, so the next poll registers.
                (None, _) => {}
            }
        }
    }

    fn poll_write(&mut self, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        loop {
            ready!(TcpStream::poll_write_ready(self, cx))?;
            match TcpStream::try_write(self, data) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                written => return Poll::Ready(written),
            }
        }
    }

    fn try_write(&mut self, data: &[u8]) -> io::Result<usize> {
        TcpStream::try_write(self, data)
    }

    fn shutdown_write(&mut self) -> io::Result<()> {
        socket2::SockRef::from(&*self).shutdown(std::net::Shutdown::Write)
    }

    fn fin_with_last_write(&self) -> bool {
        cfg!(target_os = "linux")
    }

    #[cfg(target_os = "linux")]
    fn try_write_before_fin(&mut self, data: &[u8]) -> io::Result<usize> {
        self.try_io(Interest::WRITABLE, || {
            socket2::SockRef::from(&*self)
                .send_with_flags(data, libc::MSG_MORE | libc::MSG_NOSIGNAL)
        })
    }
}

/// A boxed stream relays as itself: a large stream (a TLS session) kept on the heap
/// keeps the future of every tunnel small, the plain-TCP ones included.
impl<T: RelayIo> RelayIo for Box<T> {
    fn poll_read_into(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        (**self).poll_read_into(cx, buf)
    }

    fn poll_write(&mut self, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        (**self).poll_write(cx, data)
    }

    fn try_write(&mut self, data: &[u8]) -> io::Result<usize> {
        (**self).try_write(data)
    }

    fn shutdown_write(&mut self) -> io::Result<()> {
        (**self).shutdown_write()
    }

    fn fin_with_last_write(&self) -> bool {
        (**self).fin_with_last_write()
    }

    fn try_write_before_fin(&mut self, data: &[u8]) -> io::Result<usize> {
        (**self).try_write_before_fin(data)
    }
}

/// Any `AsyncRead + AsyncWrite` stream (TLS, an HTTP/2 stream) as a relay stream.
/// What such a stream buffers inside (a TLS record) is flushed after each write and,
/// when that could not finish, at the next read poll, which every wake-up makes.
pub struct Polled<S> {
    stream: S,
    unflushed: bool,
}

impl<S> Polled<S> {
    pub fn new(stream: S) -> Polled<S> {
        Polled {
            stream,
            unflushed: false,
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> Polled<S> {
    fn flush(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        self.unflushed = match Pin::new(&mut self.stream).poll_flush(cx) {
            Poll::Ready(r) => return r,
            Poll::Pending => true,
        };
        Ok(())
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> RelayIo for Polled<S> {
    fn poll_read_into(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        if self.unflushed {
            self.flush(cx)?;
        }
        let mut read = ReadBuf::new(buf);
        ready!(Pin::new(&mut self.stream).poll_read(cx, &mut read))?;
        Poll::Ready(Ok(read.filled().len()))
    }

    fn poll_write(&mut self, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let n = ready!(Pin::new(&mut self.stream).poll_write(cx, data))?;
        self.flush(cx)?;
        Poll::Ready(Ok(n))
    }

    fn shutdown_write(&mut self) -> io::Result<()> {
        let mut cx = Context::from_waker(Waker::noop());
        match Pin::new(&mut self.stream).poll_shutdown(&mut cx) {
            Poll::Ready(r) => r,
            Poll::Pending => Ok(()),
        }
    }
}

/// Everything one proxied connection holds while it lives. Fields are released in
/// the order they are declared: the backend's count and the presence entry as soon
/// as the backend side is closed ([`Guards::release_backend`]), the client's slot
/// when the tunnel task ends.
pub struct Guards {
    /// One unit of the backend's connection count.
    pub backend: Option<ConnGuard>,
    /// The user's presence entry: its leave goes out together with the count.
    pub presence: Option<PresenceGuard>,
    /// The client connection's slot under `max_connections`, shared by the
    /// requests of one HTTP connection: held until the client socket is closed.
    /// With the client address's slot under `max_connections_per_ip`.
    pub permit: Option<Arc<crate::handler::ConnHold>>,
}

impl Guards {
    /// The backend side is done: give back its count and the presence entry.
    pub fn release_backend(&mut self) {
        self.backend.take();
        self.presence.take();
    }
}

/// One direction's state.
struct Flow {
    walker: Walker,
    /// The start of a frame header (or of a close frame) whose end has not arrived;
    /// held back so that the receiver stays at a frame boundary until the whole of it
    /// can be checked and forwarded. At most [`crate::frame::MAX_HELD`] bytes; its
    /// allocation is kept once made (a few dozen bytes).
    carry: Vec<u8>,
    /// Read but not yet accepted by the receiver. Empty (no allocation) unless the
    /// receiver is slower than the sender.
    pending: Vec<u8>,
    /// The sender closed its side (read returned 0).
    eof: bool,
    /// The receiver was sent FIN with the close frame that ended the closing
    /// handshake, before the sender's own FIN came.
    fin_sent: bool,
    bytes: u64,
}

impl Flow {
    fn new(max_message: u64, rules: Rules) -> Flow {
        Flow {
            walker: Walker::with_rules(max_message, rules),
            carry: Vec::new(),
            pending: Vec::new(),
            eof: false,
            fin_sent: false,
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

    /// Walks `data` (the carried header bytes first) and writes what may go to
    /// `to` now; the verdict when the sender broke the size limit or the protocol.
    /// `answered`: the other direction has carried its close frame already, so a
    /// close frame here ends the closing handshake.
    fn forward<T: RelayIo>(
        &mut self,
        data: &[u8],
        to: &mut T,
        answered: bool,
    ) -> io::Result<Option<Stop>> {
        let closed_before = self.walker.close_code().is_some();
        self.carry.clear();
        let (forward, stop) = match self.walker.walk(data) {
            Walk::Forward { held } => {
                let end = data.len() - held;
                self.carry.extend_from_slice(&data[end..]);
                (&data[..end], None)
            }
            Walk::TooBig { at } => (&data[..at], Some(Stop::TooBig)),
            Walk::Broken { at, code } => (&data[..at], Some(Stop::Broken(code))),
        };
        // The close frame that ends the closing handshake, last in what was read:
        // nothing may follow it, so the receiver's FIN goes with it in one segment,
        // as a WebSocket server closes after its close frame (RFC 6455 §7.1.1),
        // not a round trip later when the sender's FIN arrives.
        let fin_now = answered
            && !closed_before
            && !forward.is_empty()
            && stop.is_none()
            && self.carry.is_empty()
            && self.walker.close_code().is_some()
            && to.fin_with_last_write();
        // All of it taken: the FIN now. Else the rest waits in `pending` and the
        // FIN comes with the sender's, as for any other stream.
        if write_now(to, forward, &mut self.pending, fin_now)? && fin_now {
            shutdown_write(to);
            self.fin_sent = true;
        }
        Ok(stop)
    }
}

/// Why the walker stopped a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    TooBig,
    /// With the close code both ends get.
    Broken(u16),
}

impl Stop {
    fn end(self, side: Side) -> End {
        match self {
            Stop::TooBig => End::TooBig(side),
            Stop::Broken(code) => End::Broken(side, code),
        }
    }
}

/// Why one step of a flow stopped.
enum Step {
    /// Moved bytes; go on.
    Moved,
    /// The sender closed its side.
    Eof,
    /// The sender's message went over the limit, or it broke the protocol.
    Stopped(Stop),
    ReadFailed(io::Error),
    WriteFailed(io::Error),
}

thread_local! {
    /// One read buffer per worker thread, zeroed once: a read never pays for
    /// clearing 64 KiB, and an idle connection holds none of it.
    static READ_BUFFER: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; READ_BUF].into_boxed_slice());
}

/// Reads once from `from` into the worker's buffer, walks and writes to `to` what
/// it may; what `to` cannot take now goes to `flow.pending`. Synchronous, so the
/// borrowed buffer is never held across an await, nor stored in the future.
fn pump<F: RelayIo, T: RelayIo>(
    cx: &mut Context<'_>,
    from: &mut F,
    to: &mut T,
    flow: &mut Flow,
    answered: bool,
) -> Poll<Step> {
    READ_BUFFER.with_borrow_mut(|buf| {
        let carried = flow.carry.len();
        buf[..carried].copy_from_slice(&flow.carry);
        let n = match ready!(from.poll_read_into(cx, &mut buf[carried..])) {
            Ok(0) => return Poll::Ready(Step::Eof),
            Ok(n) => n,
            Err(e) => return Poll::Ready(Step::ReadFailed(e)),
        };
        flow.bytes += n as u64;
        Poll::Ready(match flow.forward(&buf[..carried + n], to, answered) {
            Ok(Some(stop)) => Step::Stopped(stop),
            Ok(None) => Step::Moved,
            Err(e) => Step::WriteFailed(e),
        })
    })
}

/// Whether a close frame the other way would answer `other`'s: read where it is
/// needed, not kept in the relay's future (its size is every idle tunnel's).
fn answered(other: &Flow) -> bool {
    other.walker.close_code().is_some()
}

/// Writes as much of `data` as the stream takes without waiting (held for the
/// FIN that follows when `before_fin`); keeps the rest. True when it took all.
fn write_now<T: RelayIo>(
    to: &mut T,
    mut data: &[u8],
    pending: &mut Vec<u8>,
    before_fin: bool,
) -> io::Result<bool> {
    while !data.is_empty() {
        let written = if before_fin {
            to.try_write_before_fin(data)
        } else {
            to.try_write(data)
        };
        match written {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                pending.extend_from_slice(data);
                return Ok(false);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Writes `pending` until it is empty (then frees it) or the stream is full
/// (`Pending`, with `cx` registered).
fn poll_flush_pending<T: RelayIo>(
    cx: &mut Context<'_>,
    to: &mut T,
    pending: &mut Vec<u8>,
) -> Poll<io::Result<()>> {
    let mut written = 0;
    let polled = loop {
        if written == pending.len() {
            break Poll::Ready(Ok(()));
        }
        match to.poll_write(cx, &pending[written..]) {
            Poll::Ready(Ok(0)) => break Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
            Poll::Ready(Ok(n)) => written += n,
            Poll::Ready(Err(e)) => break Poll::Ready(Err(e)),
            Poll::Pending => break Poll::Pending,
        }
    };
    if written == pending.len() {
        *pending = Vec::new();
    } else {
        pending.drain(..written);
    }
    polled
}

/// Writes all of `data`, waiting for the stream as needed.
async fn write_all<T: RelayIo>(to: &mut T, data: &[u8]) -> io::Result<()> {
    let mut pending = data.to_vec();
    std::future::poll_fn(|cx| poll_flush_pending(cx, to, &mut pending)).await
}

/// Reads and drops until EOF.
async fn drain<T: RelayIo>(from: &mut T) -> io::Result<()> {
    loop {
        let n = std::future::poll_fn(|cx| {
            READ_BUFFER.with_borrow_mut(|sink| from.poll_read_into(cx, sink))
        })
        .await?;
        if n == 0 {
            return Ok(());
        }
    }
}

/// The backend half of one proxied WebSocket, built while the client's upgrade
/// completes; [`Prepared::run`] adds the client and relays.
pub struct Prepared<B> {
    backend: B,
    /// Bytes the backend sent right behind its 101.
    backend_early: Bytes,
    limits: Limits,
    guards: Guards,
    meter: Option<Meter>,
}

impl<B: RelayIo> Prepared<B> {
    pub fn new(
        backend: B,
        backend_early: Bytes,
        limits: Limits,
        guards: Guards,
        meter: Option<Meter>,
    ) -> Box<Prepared<B>> {
        Box::new(Prepared {
            backend,
            backend_early,
            limits,
            guards,
            meter,
        })
    }

    /// Relays between `client` (with the bytes it sent behind its upgrade request)
    /// and the backend until the connection ends, then closes both streams.
    ///
    /// The tunnel is built and the early bytes are relayed here, synchronously:
    /// the returned future, which lives as long as the tunnel (an idle one pays for
    /// every byte of it), holds only the box, the wave and the relay loop's state.
    // Boxed by `new` so that the task holding it until the client's upgrade
    // completes carries 8 bytes, not the whole backend half.
    #[allow(clippy::boxed_local)]
    pub fn run<C: RelayIo>(
        self: Box<Self>,
        client: C,
        client_early: Bytes,
        wave: Arc<Wave>,
    ) -> impl Future<Output = Outcome> + Send {
        let (mut tunnel, backend_early) = (*self).into_tunnel(client);
        let early_end = tunnel.feed_early(client_early, backend_early);
        drive(tunnel, early_end, wave)
    }

    /// Everything the relay keeps, in one box worked on in place: nothing big is
    /// moved from one layer of the connection's future to the next.
    fn into_tunnel<C: RelayIo>(self, client: C) -> (Box<Tunnel<C, B>>, Bytes) {
        let Prepared {
            backend,
            backend_early,
            limits,
            guards,
            meter,
        } = self;
        let now = Instant::now();
        let tunnel = Box::new(Tunnel {
            client,
            backend,
            limits,
            guards,
            meter,
            up: Flow::new(limits.max_message_size, limits.rules(Side::Client)),
            down: Flow::new(limits.max_message_size, limits.rules(Side::Backend)),
            first_close: None,
            last_activity: now,
            first_close_at: None,
            closing: None,
            opened: now,
            wave_heard: None,
        });
        (tunnel, backend_early)
    }
}

/// Both streams of one proxied WebSocket and everything the relay keeps.
struct Tunnel<C, B> {
    client: C,
    backend: B,
    limits: Limits,
    guards: Guards,
    /// Message and byte counters; `None` with message metrics off.
    meter: Option<Meter>,
    /// Client to backend.
    up: Flow,
    /// Backend to client.
    down: Flow,
    /// Who sent the first close frame, once someone has.
    first_close: Option<Side>,
    last_activity: Instant,
    /// When the first close frame was seen: the other side's answer is due
    /// `close_timeout` later.
    first_close_at: Option<Instant>,
    /// Told to close by a wave: how, and when its slot comes.
    closing: Option<(End, Instant)>,
    /// When the tunnel opened: a rebalance closes only tunnels old enough.
    opened: Instant,
    /// The wave's signal count when the tunnel last looked at its wait on it
    /// (`None`: a wait not looked at yet, so not yet among the wave's waiters).
    wave_heard: Option<u64>,
}

/// What woke the relay.
enum Event {
    /// A wave (drain or shutdown) started.
    Wave,
    /// The timer fired: idle, close deadline or the wave's slot.
    Timer,
    ClientRead(Step),
    BackendRead(Step),
    /// What was pending for the backend is written, or writing it failed.
    BackendFlushed(io::Result<()>),
    ClientFlushed(io::Result<()>),
}

/// The tunnel's life after its start: the relay loop, then the close.
async fn drive<C: RelayIo, B: RelayIo>(
    mut tunnel: Box<Tunnel<C, B>>,
    early_end: Option<End>,
    wave: Arc<Wave>,
) -> Outcome {
    tunnel.run(early_end, &wave).await
}

impl<C: RelayIo, B: RelayIo> Tunnel<C, B> {
    async fn run(&mut self, early_end: Option<End>, wave: &Wave) -> Outcome {
        let end = match early_end {
            Some(end) => end,
            None => self.relay(wave).await,
        };
        if let Some(meter) = self.meter.as_mut() {
            meter.add(&self.up, &self.down, Instant::now());
        }
        self.note_first_close();
        let mut outcome = Outcome {
            end,
            first_close: self.first_close,
            client_to_backend: self.up.tally(),
            backend_to_client: self.down.tally(),
            duration: Duration::ZERO,
        };
        // After `Closed` both sides were sent FIN and have sent theirs (or, the
        // client on plain TCP, will: see `client_done`): nothing to close.
        if end != End::Closed {
            // Boxed: the closing steps take room only in the rare tunnel that is
            // closing, not in every idle one.
            Box::pin(self.finish(end)).await;
        }
        outcome.duration = self.opened.elapsed();
        outcome
    }

    /// Bytes the HTTP layer read along with the handshake go through the walker like
    /// any other, first; they are dropped here, so the tunnel holds no HTTP buffer.
    fn feed_early(&mut self, client_early: Bytes, backend_early: Bytes) -> Option<End> {
        if !client_early.is_empty() {
            self.up.bytes += client_early.len() as u64;
            match self.up.forward(&client_early, &mut self.backend, false) {
                Ok(Some(stop)) => return Some(stop.end(Side::Client)),
                Ok(None) => {}
                Err(_) => return Some(End::BackendGone),
            }
        }
        if !backend_early.is_empty() {
            self.down.bytes += backend_early.len() as u64;
            match self.down.forward(&backend_early, &mut self.client, false) {
                Ok(Some(stop)) => return Some(stop.end(Side::Backend)),
                Ok(None) => {}
                Err(_) => return Some(End::ClientGone),
            }
        }
        None
    }

    /// The closing handshake is over and the backend has closed (its FIN read,
    /// passed on to the client with everything before it), on plain TCP both ways:
    /// the client's close frame was the last thing it may send, so its own FIN
    /// need not be waited for. Dropping the socket then sends nothing new (its
    /// FIN went already) and the kernel takes the client's FIN when it comes: one
    /// wake-up and one read fewer per tunnel. A client that sends more after its
    /// close frame breaks the protocol and gets a reset.
    fn client_done(&self) -> bool {
        let (up, down) = (&self.up, &self.down);
        down.eof
            && down.pending.is_empty()
            && up.walker.close_code().is_some()
            && up.pending.is_empty()
            && up.carry.is_empty()
            && self.client.fin_with_last_write()
            && self.backend.fin_with_last_write()
    }

    /// Records who sent the first close frame; true when that just happened.
    fn note_first_close(&mut self) -> bool {
        if self.first_close.is_some() {
            return false;
        }
        self.first_close = if self.up.walker.close_code().is_some() {
            Some(Side::Client)
        } else if self.down.walker.close_code().is_some() {
            Some(Side::Backend)
        } else {
            return false;
        };
        self.first_close_at = Some(Instant::now());
        true
    }

    /// The earliest of: idle timeout, close deadline, the wave's slot.
    fn next_deadline(&self) -> Instant {
        let mut at = self.last_activity + self.limits.idle_timeout;
        if let Some(first) = self.first_close_at {
            at = at.min(first + self.limits.close_timeout);
        }
        if let Some((_, slot)) = self.closing {
            at = at.min(slot);
        }
        at
    }

    /// The relay loop proper; returns why it stopped. On `Closed` every byte was
    /// delivered, both sides were sent FIN and the backend has sent its own.
    ///
    /// It waits with the streams' own poll functions (one waker slot each, no
    /// waiter list to join and leave per event) and a cancellation future pinned
    /// once, so an event costs the system calls that move the bytes and little else.
    async fn relay(&mut self, wave: &Wave) -> End {
        let timer = tokio::time::sleep(self.limits.idle_timeout);
        tokio::pin!(timer);
        let waiting = wave.wait();
        tokio::pin!(waiting);
        // Which side is looked at first when both are readable, for fairness.
        let mut client_first = true;
        loop {
            let (up, down) = (&self.up, &self.down);
            let both_closed =
                up.eof && down.eof && up.pending.is_empty() && down.pending.is_empty();
            if both_closed || self.client_done() {
                return End::Closed;
            }
            if self.note_first_close() {
                timer.as_mut().reset(self.next_deadline());
            }
            if let Some(m) = self.meter.as_mut()
                && self.last_activity.duration_since(m.last_added) >= METER_EVERY
            {
                m.add(&self.up, &self.down, self.last_activity);
            }
            client_first = !client_first;
            let watch_wave = self.closing.is_none();
            // A wave started before this tunnel began to wait on it.
            let event = if watch_wave && wave.is_started() {
                Event::Wave
            } else {
                let wave = watch_wave.then_some(wave);
                self.next_event(client_first, wave, &mut waiting, &mut timer)
                    .await
            };
            let ended = match event {
                Event::Wave => match wave.order() {
                    Order::Close(reason, delay) => {
                        let end = match reason {
                            Reason::Shutdown => End::Shutdown,
                            Reason::Drain => End::Drain,
                            Reason::Rebalance => End::Rebalance,
                        };
                        self.closing = Some((end, Instant::now() + delay));
                        timer.as_mut().reset(self.next_deadline());
                        None
                    }
                    Order::CloseIfOlder(min_age) if self.opened.elapsed() >= min_age => {
                        Some(End::Rebalance)
                    }
                    Order::CloseIfOlder(_) => {
                        // Too young: wait again, behind the others.
                        waiting.set(wave.wait());
                        self.wave_heard = None;
                        None
                    }
                },
                Event::Timer => self.on_timer(timer.as_mut()),
                Event::ClientRead(step) => self.on_read(Side::Client, step),
                Event::BackendRead(step) => self.on_read(Side::Backend, step),
                Event::BackendFlushed(flushed) => flushed.is_err().then_some(End::BackendGone),
                Event::ClientFlushed(flushed) => flushed.is_err().then_some(End::ClientGone),
            };
            if let Some(end) = ended {
                return end;
            }
        }
    }

    /// Waits for the next thing to do; a readable side is read and forwarded
    /// right here, in the same poll. Not an async fn: its future is the poll
    /// function alone, without a copy of the arguments beside it (the relay's
    /// state is part of every idle tunnel's task).
    fn next_event<'a>(
        &'a mut self,
        client_first: bool,
        wave: Option<&'a Wave>,
        cancelled: &'a mut Pin<&mut impl Future<Output = ()>>,
        timer: &'a mut Pin<&mut tokio::time::Sleep>,
    ) -> impl Future<Output = Event> + 'a {
        let Tunnel {
            client,
            backend,
            up,
            down,
            wave_heard,
            ..
        } = self;
        let read_client = !up.eof && up.pending.is_empty();
        let read_backend = !down.eof && down.pending.is_empty();
        let flush_backend = !up.pending.is_empty();
        let flush_client = !down.pending.is_empty();
        std::future::poll_fn(move |cx| {
            // Looked at once to join the waiters, then only when a start or a
            // nudge came since: polling a wait already joined takes the lock
            // every tunnel of the backend shares, and the task's waker stays the
            // one it joined with.
            if let Some(wave) = wave {
                let signals = wave.signals();
                if *wave_heard != Some(signals) {
                    *wave_heard = Some(signals);
                    if cancelled.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Event::Wave);
                    }
                }
            }
            for client_turn in [client_first, !client_first] {
                if client_turn
                    && read_client
                    && let Poll::Ready(step) = pump(cx, client, backend, up, answered(down))
                {
                    return Poll::Ready(Event::ClientRead(step));
                }
                if !client_turn
                    && read_backend
                    && let Poll::Ready(step) = pump(cx, backend, client, down, answered(up))
                {
                    return Poll::Ready(Event::BackendRead(step));
                }
            }
            if flush_backend
                && let Poll::Ready(r) = poll_flush_pending(cx, backend, &mut up.pending)
            {
                return Poll::Ready(Event::BackendFlushed(r));
            }
            if flush_client
                && let Poll::Ready(r) = poll_flush_pending(cx, client, &mut down.pending)
            {
                return Poll::Ready(Event::ClientFlushed(r));
            }
            if timer.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Event::Timer);
            }
            Poll::Pending
        })
    }

    /// The timer fired: the wave's slot came, the close deadline passed, or the
    /// tunnel was idle too long; else (there was traffic meanwhile) wait on.
    fn on_timer(&mut self, timer: Pin<&mut tokio::time::Sleep>) -> Option<End> {
        let now = Instant::now();
        if let Some((end, slot)) = self.closing
            && now >= slot
        {
            return Some(end);
        }
        if let Some(first) = self.first_close_at
            && now >= first + self.limits.close_timeout
        {
            return Some(End::CloseTimeout);
        }
        if now >= self.last_activity + self.limits.idle_timeout {
            return Some(End::Idle);
        }
        timer.reset(self.next_deadline());
        None
    }

    /// What a read from `from` (and the write to the other side) did.
    fn on_read(&mut self, from: Side, step: Step) -> Option<End> {
        self.last_activity = Instant::now();
        let (gone_from, gone_to) = match from {
            Side::Client => (End::ClientGone, End::BackendGone),
            Side::Backend => (End::BackendGone, End::ClientGone),
        };
        match step {
            Step::Moved => None,
            Step::Eof => {
                let (flow, other) = match from {
                    Side::Client => (&mut self.up, &self.down),
                    Side::Backend => (&mut self.down, &self.up),
                };
                flow.eof = true;
                if flow.walker.close_code().is_none() {
                    return Some(gone_from);
                }
                // The sender said all it will say: pass its FIN on (with both
                // sides done, closing the streams sends the FIN instead), unless
                // it went with the close frame that ended the handshake.
                if !other.eof && !flow.fin_sent {
                    match from {
                        Side::Client => shutdown_write(&mut self.backend),
                        Side::Backend => shutdown_write(&mut self.client),
                    }
                }
                None
            }
            Step::Stopped(stop) => Some(stop.end(from)),
            Step::ReadFailed(e) => Some(gone(gone_from, &e)),
            Step::WriteFailed(e) => Some(gone(gone_to, &e)),
        }
    }

    /// Closes both sides after `end`: close frames where they belong, FIN, then a
    /// bounded wait for each peer to close. The backend's count and presence are
    /// released as soon as the backend side is done, not after the client has
    /// finished closing.
    async fn finish(&mut self, end: End) {
        let (to_client, to_backend) = match end {
            // Each side had its chance to close: nothing more to say or wait for.
            End::CloseTimeout => return self.guards.release_backend(),
            End::Closed => (None, None),
            End::ClientGone => (None, Some(close_code::GOING_AWAY)),
            End::BackendGone => (Some(close_code::BACKEND_GONE), None),
            End::TooBig(_) => (
                Some(close_code::MESSAGE_TOO_BIG),
                Some(close_code::MESSAGE_TOO_BIG),
            ),
            End::Broken(_, code) => (Some(code), Some(code)),
            End::Idle | End::Shutdown => {
                (Some(close_code::GOING_AWAY), Some(close_code::GOING_AWAY))
            }
            End::Drain | End::Rebalance => (
                Some(close_code::SERVICE_RESTART),
                Some(close_code::GOING_AWAY),
            ),
        };
        let grace = self.limits.close_timeout;
        let Tunnel {
            client,
            backend,
            guards,
            up,
            down,
            ..
        } = self;
        let close_backend = async {
            if end != End::BackendGone {
                let mask = fastrand::u32(..).to_be_bytes();
                let closed = close_side(backend, up, to_backend, Some(mask));
                if let Ok(Err(e)) = timeout(grace, closed).await {
                    tracing::debug!(error = %e, "backend gone while closing");
                }
            }
            guards.release_backend();
        };
        let close_client = async {
            if end != End::ClientGone {
                let closed = close_side(client, down, to_client, None);
                if let Ok(Err(e)) = timeout(grace, closed).await {
                    tracing::debug!(error = %e, "client gone while closing");
                }
            }
        };
        tokio::join!(close_backend, close_client);
    }
}

/// Ends one side gracefully: writes what is pending, then a close frame with `code`
/// where the receiver is at a frame boundary and has not had one, then FIN; then
/// reads (and drops) until the peer closes, so that our close frame is not lost to
/// a reset caused by unread data. Errors mean the peer is gone: nothing left to do.
async fn close_side<T: RelayIo>(
    stream: &mut T,
    toward: &mut Flow,
    code: Option<u16>,
    mask: Option<[u8; 4]>,
) -> io::Result<()> {
    if !toward.pending.is_empty() {
        let pending = std::mem::take(&mut toward.pending);
        write_all(stream, &pending).await?;
    }
    if let Some(code) = code
        && toward.can_inject_close()
    {
        let (frame, len) = close_frame(code, mask);
        write_all(stream, &frame[..len]).await?;
    }
    stream.shutdown_write()?;
    drain(stream).await
}

fn gone(end: End, error: &io::Error) -> End {
    tracing::debug!(?end, %error, "socket error");
    end
}

/// Sends FIN: the peer has said all it will say, or its close frame ended the
/// closing handshake; pass that on. (EOF is only taken with nothing pending.) A
/// failure means the receiver is gone already, which its
/// own read or write reports next; there is nothing else to do about it here.
fn shutdown_write<T: RelayIo>(stream: &mut T) {
    if let Err(e) = stream.shutdown_write() {
        tracing::debug!(error = %e, "shutdown: the peer is gone already");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{OP_TEXT, encode};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn no_guards() -> Guards {
        Guards {
            backend: None,
            presence: None,
            permit: None,
        }
    }

    /// The seam: a tunnel between two in-memory streams (as TLS or HTTP/2 streams
    /// plug in) walks and relays frames both ways and ends on a close handshake.
    #[tokio::test]
    async fn relays_between_polled_streams() {
        let (client, mut client_peer) = tokio::io::duplex(64);
        let (backend, mut backend_peer) = tokio::io::duplex(64);
        let limits = Limits {
            idle_timeout: Duration::from_secs(5),
            max_message_size: 1024,
            close_timeout: Duration::from_secs(5),
            strict_frames: true,
            extensions: false,
        };
        let prepared = Prepared::new(
            Polled::new(backend),
            Bytes::new(),
            limits,
            no_guards(),
            None,
        );
        let tunnel = tokio::spawn(prepared.run(Polled::new(client), Bytes::new(), Wave::root()));
        // Larger than the duplex buffers: the relay must wait for the reader.
        let payload = vec![b'x'; 500];
        let up = encode(0x80 | OP_TEXT, &payload, Some([1, 2, 3, 4]));
        let mut got = vec![0; up.len()];
        let (wrote, read) = tokio::join!(
            client_peer.write_all(&up),
            backend_peer.read_exact(&mut got)
        );
        wrote.unwrap();
        read.unwrap();
        assert_eq!(got, up);
        let down = encode(0x80 | OP_TEXT, b"hi", None);
        backend_peer.write_all(&down).await.unwrap();
        let mut got = vec![0; down.len()];
        client_peer.read_exact(&mut got).await.unwrap();
        assert_eq!(got, down);
        let (close_up, n) = close_frame(1000, Some([9, 9, 9, 9]));
        client_peer.write_all(&close_up[..n]).await.unwrap();
        client_peer.shutdown().await.unwrap();
        let (close_down, n) = close_frame(1000, None);
        backend_peer.write_all(&close_down[..n]).await.unwrap();
        backend_peer.shutdown().await.unwrap();
        let outcome = tokio::time::timeout(Duration::from_secs(5), tunnel)
            .await
            .expect("tunnel ends")
            .expect("no panic");
        assert_eq!(outcome.end, End::Closed);
        assert_eq!(outcome.first_close, Some(Side::Client));
        assert_eq!(outcome.client_to_backend.messages, 1);
        assert_eq!(outcome.backend_to_client.messages, 1);
    }
}
