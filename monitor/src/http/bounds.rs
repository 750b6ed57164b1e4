//! What a client can make the endpoint hold, bounded: connections (past
//! `MAX_CONNECTIONS`, or `MAX_CONNECTIONS_PER_PEER` of one address, the oldest idle one
//! goes), the bytes and time of a request's head, the scrapes answered at once, and the
//! time a response may wait on a reader that does not read.

use std::{
    collections::{BTreeMap, HashMap},
    convert::Infallible,
    net::IpAddr,
    pin::Pin,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use http_body_util::Full;
use hyper::body::{Body, Bytes, Frame, SizeHint};
use log::debug;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::{OwnedSemaphorePermit, Semaphore},
    task::AbortHandle,
    time::Sleep,
};

/// Scrapes being answered at once (encoded and not all written): what responses may
/// hold of the agent's memory is this many expositions.
const RESPONDING: usize = 16;
/// Of those, the most one peer may have.
const RESPONDING_PER_PEER: usize = 4;

/// A response's body, and the turn it holds until its last byte is written (or its
/// connection is gone): the body is dropped then.
pub struct Reply {
    body: Full<Bytes>,
    pub turn: Option<Turn>,
}

/// A scrape's turn: its peer's and one of all.
pub struct Turn {
    _peer: OwnedSemaphorePermit,
    _all: OwnedSemaphorePermit,
}

impl Reply {
    pub fn new(body: Bytes) -> Self {
        Self {
            body: Full::new(body),
            turn: None,
        }
    }
}

/// The turns to answer scrapes: `RESPONDING` of all, `RESPONDING_PER_PEER` of one peer.
pub struct Turns {
    all: Arc<Semaphore>,
    /// Each peer's share: a pod that reads its scrapes a byte at a time holds a few,
    /// never a well-behaved Prometheus's.
    peers: Mutex<HashMap<IpAddr, Arc<Semaphore>>>,
}

impl Default for Turns {
    fn default() -> Self {
        Self {
            all: Arc::new(Semaphore::new(RESPONDING)),
            peers: Mutex::default(),
        }
    }
}

impl Turns {
    /// Waits for a turn to answer a scrape of `peer`.
    pub async fn take(&self, peer: IpAddr) -> Option<Turn> {
        let mine = {
            let mut peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
            // Peers with no turn taken or awaited are forgotten.
            peers.retain(|_, s| Arc::strong_count(s) > 1);
            Arc::clone(
                peers
                    .entry(peer)
                    .or_insert_with(|| Arc::new(Semaphore::new(RESPONDING_PER_PEER))),
            )
        };
        let peer_turn = mine.acquire_owned().await.ok()?;
        let all = Arc::clone(&self.all).acquire_owned().await.ok()?;
        Some(Turn {
            _peer: peer_turn,
            _all: all,
        })
    }
}

impl Body for Reply {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// How long a client may take over its TLS handshake or its request's headers.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// The read buffer of a connection, and so the most bytes a request's head may have
/// (hyper's least): Prometheus sends a few hundred.
pub const MAX_HEAD_BYTES: usize = 8192;
pub const MAX_HEADERS: usize = 32;
/// How long a response may wait on a client that reads none of it.
const WRITE_STALL: Duration = Duration::from_secs(10);
/// Connections served at once. Past it the oldest idle one (else the oldest) is closed
/// for the newcomer: clients that hold connections open cannot shut the probes or a
/// scrape out, nor grow the agent (each costs at most its read buffer, its TLS state and
/// its place in the queue for a turn).
pub const MAX_CONNECTIONS: usize = 1024;
/// Connections of one address at once (a pod has one): past it that address's oldest
/// idle one (else its oldest) is closed. A pod that floods the port churns its own
/// connections, never the kubelet's or Prometheus's.
pub const MAX_CONNECTIONS_PER_PEER: usize = 16;

/// One connection being served: its peer, its task, and whether a request of its is
/// being answered (a connection that only holds its place, reading a request or idle
/// between two, is what is closed to make room).
struct Open {
    peer: IpAddr,
    task: AbortHandle,
    busy: Arc<AtomicBool>,
}

/// The connections being served, by the order they came in.
#[derive(Default)]
pub struct Connections {
    open: Mutex<(u64, BTreeMap<u64, Open>)>,
}

impl Connections {
    /// Makes room for one more from `peer`: while that peer holds
    /// `MAX_CONNECTIONS_PER_PEER`, closes its oldest idle connection (else its oldest);
    /// then, while `MAX_CONNECTIONS` are open, the oldest idle of all (else the oldest).
    pub fn make_room(&self, peer: IpAddr) {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        open.1.retain(|_, c| !c.task.is_finished());
        while open.1.values().filter(|c| c.peer == peer).count() >= MAX_CONNECTIONS_PER_PEER {
            close_oldest(&mut open.1, |c| c.peer == peer);
        }
        while open.1.len() >= MAX_CONNECTIONS {
            close_oldest(&mut open.1, |_| true);
        }
    }

    pub fn add(&self, peer: IpAddr, task: AbortHandle, busy: Arc<AtomicBool>) {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let id = open.0;
        open.0 += 1;
        open.1.insert(id, Open { peer, task, busy });
    }
}

/// Closes the oldest idle connection of those `of` picks, else the oldest of them.
fn close_oldest(open: &mut BTreeMap<u64, Open>, of: impl Fn(&Open) -> bool) {
    let idle = open
        .iter()
        .find(|(_, c)| of(c) && !c.busy.load(Ordering::Acquire))
        .map(|(id, _)| *id);
    let id = idle.or_else(|| open.iter().find(|(_, c)| of(c)).map(|(id, _)| *id));
    if let Some(c) = id.and_then(|id| open.remove(&id)) {
        c.task.abort();
    }
}

/// Marks a connection busy while a request of its is answered.
pub struct Busy(Arc<AtomicBool>);

impl Busy {
    pub fn new(flag: &Arc<AtomicBool>) -> Self {
        flag.store(true, Ordering::Release);
        Self(Arc::clone(flag))
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// A connection whose writes fail once they have waited on the reader for `WRITE_STALL`
/// without it taking `MIN_PROGRESS` bytes: a reader that stops reading, or reads a
/// byte at a time, does not hold its response (and its turn) for ever.
pub struct Stalls<I> {
    io: I,
    stalled: Option<Pin<Box<Sleep>>>,
    /// Bytes written since the stall timer was set.
    progress: usize,
}

/// What a reader must take within `WRITE_STALL` once it has kept a write waiting.
const MIN_PROGRESS: usize = 16 * 1024;

impl<I> Stalls<I> {
    pub fn new(io: I) -> Self {
        Self {
            io,
            stalled: None,
            progress: 0,
        }
    }

    /// `n` bytes written: the stall timer is cleared once the reader took enough.
    fn wrote(&mut self, n: usize) {
        if self.stalled.is_some() {
            self.progress += n;
            if self.progress >= MIN_PROGRESS {
                self.stalled = None;
                self.progress = 0;
            }
        }
    }

    /// `Pending` from the connection: fails it once it has been pending too long.
    fn pending<T>(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<T>> {
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(WRITE_STALL)));
        match stalled.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::ErrorKind::TimedOut.into())),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Stalls<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Stalls<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match Pin::new(&mut self.io).poll_write(cx, buf) {
            Poll::Pending => self.pending(cx),
            Poll::Ready(Ok(n)) => {
                self.wrote(n);
                Poll::Ready(Ok(n))
            }
            failed @ Poll::Ready(_) => failed,
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match Pin::new(&mut self.io).poll_flush(cx) {
            Poll::Pending => self.pending(cx),
            ready @ Poll::Ready(_) => ready,
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match Pin::new(&mut self.io).poll_write_vectored(cx, bufs) {
            Poll::Pending => self.pending(cx),
            Poll::Ready(Ok(n)) => {
                self.wrote(n);
                Poll::Ready(Ok(n))
            }
            failed @ Poll::Ready(_) => failed,
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Bounds what the kernel holds of a connection's responses for a reader that does not
/// read (socket memory is charged to the pod too).
pub fn limit_send_buffer(stream: &tokio::net::TcpStream) {
    use std::os::fd::AsRawFd as _;
    let bytes: libc::c_int = SEND_BUFFER;
    // SAFETY: setsockopt on the stream's own descriptor with an int option.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&raw const bytes).cast(),
            libc::socklen_t::try_from(size_of::<libc::c_int>()).unwrap_or(4),
        )
    };
    if rc != 0 {
        debug!("SO_SNDBUF: {}", std::io::Error::last_os_error());
    }
}

/// Bytes of a connection's send buffer (the kernel doubles it).
const SEND_BUFFER: libc::c_int = 32 * 1024;

/// Connections the kernel completes and queues for `accept` (capped by
/// `net.core.somaxconn`, 4096 by default). A flood of a thousand connections at once must
/// not fill the queue: past it the kernel drops the next SYN, and the kubelet's probe
/// behind it waits a second for the retransmission, its whole default timeout.
const LISTEN_BACKLOG: u32 = 4096;

/// The endpoint's listening socket, with room in its accept queue for a flood.
pub fn listen(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}
