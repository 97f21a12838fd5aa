//! What one client may make the server hold, and for how long.
//!
//! A connection's idle cost is about 3 KB; these limits keep a hostile or careless
//! client from making it much more:
//! - a message (and frame) larger than [`Limits::max_message_bytes`] is refused
//!   with 1009, so no buffer grows past about that size;
//! - a message left unfinished (a frame cut short, or a fragmented message whose
//!   last fragment never comes) is closed with 1008 once it has stayed unfinished
//!   for a whole heartbeat; [`Meter`] sees it on the wire, which tungstenite hides;
//! - a client sending more than [`MAX_CLIENT_PINGS_PER_SECOND`] pings is closed
//!   with 1008: tungstenite answers each one with a pong outside the server's
//!   bounded queue;
//! - a client whose writes make no progress for [`SLOW_READER_AFTER`] is dropped;
//!   the kernel send buffer and tungstenite's write buffer are both kept small
//!   ([`SEND_BUFFER_BYTES`], [`MAX_WRITE_BUFFER_BYTES`]), so that takes little;
//! - optionally, a connection older than [`Limits::max_lifetime`] is told to
//!   reconnect, so no client holds the task's protection forever.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// Most pings a client may send within one second before it is closed with 1008.
pub const MAX_CLIENT_PINGS_PER_SECOND: u8 = 10;
/// A client whose writes make no progress this long is dropped as a slow reader.
pub const SLOW_READER_AFTER: Duration = Duration::from_secs(10);
/// Once a connection is closing, how long a stalled write may take before the
/// connection is dropped: a client that does not read will not read the goodbye.
pub const CLOSING_WRITE_AFTER: Duration = Duration::from_secs(2);
/// The kernel send buffer asked for each connection (Linux doubles it, and counts
/// it against the task's memory). Left alone, loopback and fast links let it grow
/// to megabytes for a client that never reads; the server's messages are a few
/// dozen bytes each.
pub const SEND_BUFFER_BYTES: usize = 4 * 1024;
/// The most bytes tungstenite may hold unsent for one client; the server's own
/// messages are a few dozen bytes, a pong at most 127.
pub const MAX_WRITE_BUFFER_BYTES: usize = 4 * 1024;

/// Per-connection limits that come from the settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The largest message (and frame) accepted; larger ones get 1009.
    pub max_message_bytes: usize,
    /// After this long a client is told to reconnect; `None`: never.
    pub max_lifetime: Option<Duration>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_bytes: 1024,
            max_lifetime: None,
        }
    }
}

/// What the wire shows of one connection's incoming frames, shared between the
/// socket wrapper ([`Metered`]) that watches the bytes and the connection that acts.
#[derive(Debug, Default)]
pub struct Meter {
    /// Set once the HTTP request has been answered with 101: from then on the bytes
    /// are websocket frames.
    websocket: AtomicBool,
    /// 0 while every message is complete; otherwise the number of the unfinished
    /// stretch, so that one lasting across two heartbeats can be told from two
    /// short ones.
    unfinished: AtomicU64,
}

impl Meter {
    /// Starts reading frames: call it before the 101 goes out.
    pub fn start_websocket(&self) {
        self.websocket.store(true, Ordering::Relaxed);
    }

    /// The current unfinished stretch, or `None` when every message is complete.
    #[must_use]
    pub fn unfinished(&self) -> Option<u64> {
        match self.unfinished.load(Ordering::Relaxed) {
            0 => None,
            n => Some(n),
        }
    }

    pub(crate) fn set_unfinished(&self, stretch: Option<u64>) {
        self.unfinished
            .store(stretch.unwrap_or(0), Ordering::Relaxed);
    }
}

/// Follows client frames byte by byte: where each frame ends, and whether a
/// fragmented message is still open. Only headers are looked at; payloads are
/// skipped.
#[derive(Debug, Default)]
pub(crate) struct FrameScanner {
    state: Scan,
    fin: bool,
    opcode: u8,
    masked: bool,
    len: u64,
    /// A data frame without FIN came, and its final continuation has not.
    fragmented: bool,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Scan {
    #[default]
    First,
    Second,
    Length(u8),
    Mask(u8),
    Payload,
}

impl FrameScanner {
    /// True when no frame is cut short and no fragmented message is open.
    pub(crate) fn finished(&self) -> bool {
        self.state == Scan::First && !self.fragmented
    }

    pub(crate) fn feed(&mut self, mut bytes: &[u8]) {
        while let Some((&byte, rest)) = bytes.split_first() {
            match self.state {
                Scan::First => {
                    self.fin = byte & 0x80 != 0;
                    self.opcode = byte & 0x0f;
                    self.state = Scan::Second;
                }
                Scan::Second => {
                    self.masked = byte & 0x80 != 0;
                    match byte & 0x7f {
                        126 => self.start_length(2),
                        127 => self.start_length(8),
                        n => {
                            self.len = u64::from(n);
                            self.after_length();
                        }
                    }
                }
                Scan::Length(left) => {
                    self.len = (self.len << 8) | u64::from(byte);
                    if left > 1 {
                        self.state = Scan::Length(left - 1);
                    } else {
                        self.after_length();
                    }
                }
                Scan::Mask(left) => {
                    if left > 1 {
                        self.state = Scan::Mask(left - 1);
                    } else {
                        self.after_mask();
                    }
                }
                Scan::Payload => {
                    let take = usize::try_from(self.len)
                        .unwrap_or(usize::MAX)
                        .min(bytes.len());
                    self.len -= take as u64;
                    bytes = &bytes[take..];
                    if self.len == 0 {
                        self.end_frame();
                    }
                    continue;
                }
            }
            bytes = rest;
        }
    }

    fn start_length(&mut self, bytes: u8) {
        self.len = 0;
        self.state = Scan::Length(bytes);
    }

    fn after_length(&mut self) {
        if self.masked {
            self.state = Scan::Mask(4);
        } else {
            self.after_mask();
        }
    }

    fn after_mask(&mut self) {
        if self.len == 0 {
            self.end_frame();
        } else {
            self.state = Scan::Payload;
        }
    }

    fn end_frame(&mut self) {
        match self.opcode {
            // Text or binary: a message of several frames stays open until FIN.
            1 | 2 => self.fragmented = !self.fin,
            // A continuation closes the message with FIN.
            0 if self.fin => self.fragmented = false,
            _ => {}
        }
        self.state = Scan::First;
    }
}

/// A socket whose incoming websocket frames are followed by a [`Meter`].
#[derive(Debug)]
pub struct Metered<T> {
    inner: T,
    meter: Arc<Meter>,
    scanner: FrameScanner,
    stretches: u64,
}

impl<T> Metered<T> {
    /// Wraps `inner`; `meter` is where the connection reads what was seen.
    pub fn new(inner: T, meter: Arc<Meter>) -> Self {
        Self {
            inner,
            meter,
            scanner: FrameScanner::default(),
            stretches: 0,
        }
    }

    fn observe(&mut self, bytes: &[u8]) {
        if bytes.is_empty() || !self.meter.websocket.load(Ordering::Relaxed) {
            return;
        }
        let was_finished = self.scanner.finished();
        self.scanner.feed(bytes);
        match (was_finished, self.scanner.finished()) {
            (true, false) => {
                self.stretches += 1;
                self.meter.set_unfinished(Some(self.stretches));
            }
            (false, true) => self.meter.set_unfinished(None),
            _ => {}
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Metered<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = result {
            let this = &mut *self;
            this.observe(&buf.filled()[before..]);
        }
        result
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Metered<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Counts a client's pings within the current second.
#[derive(Debug)]
pub(crate) struct PingRate {
    since: Instant,
    count: u8,
}

impl PingRate {
    pub(crate) fn new() -> Self {
        Self {
            since: Instant::now(),
            count: 0,
        }
    }

    /// Counts one ping; false once the client has sent too many this second.
    pub(crate) fn allow(&mut self) -> bool {
        let now = Instant::now();
        if now.duration_since(self.since) >= Duration::from_secs(1) {
            self.since = now;
            self.count = 0;
        }
        self.count = self.count.saturating_add(1);
        self.count <= MAX_CLIENT_PINGS_PER_SECOND
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(fin: bool, opcode: u8, payload_len: usize) -> Vec<u8> {
        let mut f = vec![if fin { 0x80 } else { 0 } | opcode];
        match payload_len {
            n @ 0..=125 => f.push(0x80 | u8::try_from(n).unwrap()),
            n @ 126..=0xffff => {
                f.push(0x80 | 126);
                f.extend_from_slice(&u16::try_from(n).unwrap().to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(&[1, 2, 3, 4]);
        f.extend(std::iter::repeat_n(b'x', payload_len));
        f
    }

    fn finished_after(chunks: &[&[u8]]) -> bool {
        let mut scanner = FrameScanner::default();
        for chunk in chunks {
            scanner.feed(chunk);
        }
        scanner.finished()
    }

    #[test]
    fn whole_frames_of_every_length_leave_nothing_unfinished() {
        for len in [0, 4, 125, 126, 1000, 70_000] {
            let f = frame(true, 1, len);
            assert!(finished_after(&[&f]), "length {len}");
            // Byte by byte too.
            let mut scanner = FrameScanner::default();
            for b in &f {
                scanner.feed(std::slice::from_ref(b));
            }
            assert!(scanner.finished(), "length {len}, byte by byte");
        }
    }

    #[test]
    fn a_frame_cut_short_is_unfinished() {
        let f = frame(true, 1, 300);
        for cut in [1, 2, 3, 5, 8, 100, f.len() - 1] {
            assert!(!finished_after(&[&f[..cut]]), "cut at {cut}");
        }
    }

    #[test]
    fn a_fragmented_message_is_unfinished_until_its_last_fragment() {
        let first = frame(false, 1, 10);
        let middle = frame(false, 0, 10);
        let ping = frame(true, 9, 4);
        let last = frame(true, 0, 10);
        assert!(!finished_after(&[&first]));
        assert!(!finished_after(&[&first, &ping, &middle]));
        assert!(finished_after(&[&first, &ping, &middle, &last]));
        let two: Vec<u8> = [frame(true, 2, 3), frame(true, 1, 3)].concat();
        assert!(finished_after(&[&two]));
    }

    #[tokio::test]
    async fn the_meter_numbers_each_unfinished_stretch() {
        let meter = Arc::new(Meter::default());
        let mut metered = Metered::new(tokio::io::empty(), Arc::clone(&meter));
        metered.observe(&frame(false, 1, 4));
        assert_eq!(
            meter.unfinished(),
            None,
            "nothing is followed before the 101"
        );
        meter.start_websocket();
        metered.observe(&frame(false, 1, 4));
        assert_eq!(meter.unfinished(), Some(1));
        metered.observe(&frame(true, 9, 0));
        assert_eq!(
            meter.unfinished(),
            Some(1),
            "a ping in between changes nothing"
        );
        metered.observe(&frame(true, 0, 4));
        assert_eq!(meter.unfinished(), None);
        metered.observe(&frame(true, 1, 4)[..3]);
        assert_eq!(meter.unfinished(), Some(2));
    }

    #[tokio::test(start_paused = true)]
    async fn pings_are_limited_per_second() {
        let mut rate = PingRate::new();
        for _ in 0..MAX_CLIENT_PINGS_PER_SECOND {
            assert!(rate.allow());
        }
        assert!(!rate.allow());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(rate.allow());
    }
}
