//! What one client may make the server hold, and for how long.
//!
//! A connection's idle cost is about 2.5 KB; these limits keep a hostile or careless
//! client from making it much more:
//! - a message larger than [`Limits::max_message_bytes`] is refused with 1009 as
//!   soon as a frame header announces it, before any of that frame's payload is
//!   read: [`Metered`] follows the frame headers on the wire, adds up the fragments
//!   of a message, and hands nothing of the refused frame to tungstenite, which
//!   would otherwise reserve and read a whole fragment before checking the
//!   message's size;
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
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
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
    /// 0 until the HTTP request has been answered with 101; from then on the bytes
    /// are websocket frames, and this is the largest message accepted.
    max_message: AtomicU64,
    /// 0 while every message is complete; otherwise the number of the unfinished
    /// stretch, so that one lasting across two heartbeats can be told from two
    /// short ones.
    unfinished: AtomicU64,
}

impl Meter {
    /// Starts reading frames, refusing any message over `max_message_bytes` from
    /// the header that announces it: call it before the 101 goes out.
    pub fn start_websocket(&self, max_message_bytes: usize) {
        let max = u64::try_from(max_message_bytes).unwrap_or(u64::MAX).max(1);
        self.max_message.store(max, Ordering::Relaxed);
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

/// Follows client frames byte by byte: where each frame ends, whether a fragmented
/// message is still open, and how large its header says the message is. Only
/// headers are looked at; payloads are skipped.
#[derive(Debug, Default)]
pub(crate) struct FrameScanner {
    state: Scan,
    fin: bool,
    opcode: u8,
    masked: bool,
    /// The current frame's length while its header is read; then what is left of
    /// its payload.
    len: u64,
    /// A data frame without FIN came, and its final continuation has not.
    fragmented: bool,
    /// The payload announced so far for the current data message, all its fragments:
    /// control frames in between are not part of it.
    message: u64,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Scan {
    #[default]
    First,
    Second,
    Length(u8),
    Mask(u8),
    Payload,
    /// A header announced too much; nothing more is followed.
    Refused,
}

/// A frame whose header took a message over the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Oversize {
    /// Where, in the bytes fed, that frame begins; 0 when its header began in
    /// bytes fed before.
    pub(crate) at: usize,
    /// The size its header announced, the message's earlier fragments included.
    pub(crate) size: u64,
}

impl FrameScanner {
    /// True when no frame is cut short and no fragmented message is open.
    pub(crate) fn finished(&self) -> bool {
        self.state == Scan::First && !self.fragmented
    }

    /// The size announced by the frame that was refused, once one was.
    pub(crate) fn refused(&self) -> Option<u64> {
        (self.state == Scan::Refused).then_some(self.message)
    }

    /// Follows `bytes`; fails at the first frame whose header announces a message
    /// (or a control frame) over `max_message` bytes, and follows nothing after it.
    pub(crate) fn feed(&mut self, bytes: &[u8], max_message: u64) -> Result<(), Oversize> {
        let mut frame_start = 0;
        let mut at = 0;
        while let Some(&byte) = bytes.get(at) {
            match self.state {
                Scan::First => {
                    frame_start = at;
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
                            self.after_length(max_message, frame_start)?;
                        }
                    }
                }
                Scan::Length(left) => {
                    self.len = (self.len << 8) | u64::from(byte);
                    if left > 1 {
                        self.state = Scan::Length(left - 1);
                    } else {
                        self.after_length(max_message, frame_start)?;
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
                        .min(bytes.len() - at);
                    self.len -= take as u64;
                    at += take;
                    if self.len == 0 {
                        self.end_frame();
                    }
                    continue;
                }
                Scan::Refused => {
                    return Err(Oversize {
                        at: 0,
                        size: self.message,
                    });
                }
            }
            at += 1;
        }
        Ok(())
    }

    fn start_length(&mut self, bytes: u8) {
        self.len = 0;
        self.state = Scan::Length(bytes);
    }

    /// The frame's length is known: refuse it here if it takes its message (or, for
    /// a control frame, itself) over the limit.
    fn after_length(&mut self, max_message: u64, frame_start: usize) -> Result<(), Oversize> {
        // A continuation adds to the message it continues; a control frame stands
        // alone, in the middle of a message or not.
        let size = if self.opcode == 0 {
            self.message.saturating_add(self.len)
        } else {
            self.len
        };
        if self.opcode & 0x8 == 0 {
            self.message = size;
        }
        if size > max_message {
            self.message = size;
            self.state = Scan::Refused;
            return Err(Oversize {
                at: frame_start,
                size,
            });
        }
        if self.masked {
            self.state = Scan::Mask(4);
        } else {
            self.after_mask();
        }
        Ok(())
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

/// What reading a [`Metered`] socket fails with once the client has announced a
/// message over the limit; the connection answers it with close code 1009.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a message of {size} bytes announced, over the limit of {max}")]
pub struct MessageTooBig {
    /// The size announced, the message's earlier fragments included.
    pub size: u64,
    /// `MAX_MESSAGE_BYTES`.
    pub max: u64,
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

    fn observe(&mut self, bytes: &[u8]) -> Result<(), Oversize> {
        let max = self.meter.max_message.load(Ordering::Relaxed);
        if bytes.is_empty() || max == 0 {
            return Ok(());
        }
        let was_finished = self.scanner.finished();
        self.scanner.feed(bytes, max)?;
        match (was_finished, self.scanner.finished()) {
            (true, false) => {
                self.stretches += 1;
                self.meter.set_unfinished(Some(self.stretches));
            }
            (false, true) => self.meter.set_unfinished(None),
            _ => {}
        }
        Ok(())
    }

    fn too_big(&self, size: u64) -> io::Error {
        let max = self.meter.max_message.load(Ordering::Relaxed);
        io::Error::new(io::ErrorKind::InvalidData, MessageTooBig { size, max })
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Metered<T> {
    /// Reads what the client sent, up to the first frame that takes a message over
    /// the limit; the read after that fails with [`MessageTooBig`]. So tungstenite
    /// never sees that frame's header, and reserves nothing for its payload.
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(size) = self.scanner.refused() {
            return Poll::Ready(Err(self.too_big(size)));
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.inner).poll_read(cx, buf))?;
        let this = &mut *self;
        if let Err(refused) = this.observe(&buf.filled()[before..]) {
            buf.set_filled(before + refused.at);
            if refused.at == 0 {
                return Poll::Ready(Err(this.too_big(refused.size)));
            }
        }
        Poll::Ready(Ok(()))
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
            scanner.feed(chunk, u64::MAX).unwrap();
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
                scanner.feed(std::slice::from_ref(b), u64::MAX).unwrap();
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
        metered.observe(&frame(false, 1, 4)).unwrap();
        assert_eq!(
            meter.unfinished(),
            None,
            "nothing is followed before the 101"
        );
        meter.start_websocket(1024);
        metered.observe(&frame(false, 1, 4)).unwrap();
        assert_eq!(meter.unfinished(), Some(1));
        metered.observe(&frame(true, 9, 0)).unwrap();
        assert_eq!(
            meter.unfinished(),
            Some(1),
            "a ping in between changes nothing"
        );
        metered.observe(&frame(true, 0, 4)).unwrap();
        assert_eq!(meter.unfinished(), None);
        metered.observe(&frame(true, 1, 4)[..3]).unwrap();
        assert_eq!(meter.unfinished(), Some(2));
    }

    /// Where `bytes`, fed in chunks of `chunk` bytes, are refused at a limit of 100:
    /// the offset in the whole at which nothing more was let through, and the size
    /// announced.
    fn refused_at(bytes: &[u8], chunk: usize) -> Option<(usize, u64)> {
        let mut scanner = FrameScanner::default();
        let mut offset = 0;
        for piece in bytes.chunks(chunk) {
            if let Err(refused) = scanner.feed(piece, 100) {
                assert_eq!(scanner.refused(), Some(refused.size));
                assert_eq!(
                    scanner.feed(b"more", 100),
                    Err(Oversize {
                        at: 0,
                        size: refused.size
                    }),
                    "nothing is followed after a refusal"
                );
                return Some((offset + refused.at, refused.size));
            }
            offset += piece.len();
        }
        assert_eq!(scanner.refused(), None);
        None
    }

    /// Asserts that `bytes` are refused for `size` at the frame starting at `start`,
    /// whose length ends `header` bytes in: everything before the frame is let
    /// through, and of the frame at most the part of its header that came in an
    /// earlier chunk.
    fn assert_refused(bytes: &[u8], start: usize, header: usize, size: u64) {
        for chunk in [1, 3, 7, 1000] {
            let (at, announced) = refused_at(bytes, chunk).expect("refused");
            assert_eq!(announced, size, "chunks of {chunk}");
            assert!(
                (start..start + header).contains(&at),
                "chunks of {chunk}: refused at {at}, the frame starts at {start}"
            );
        }
    }

    #[test]
    fn a_message_over_the_limit_is_refused_at_the_header_that_announces_it() {
        let small = frame(true, 1, 4);
        // One frame over the limit, after a whole one.
        let big = [&small[..], &frame(true, 2, 101)].concat();
        assert_refused(&big, small.len(), 2, 101);
        // A 64-bit length far over it.
        let huge = [&small[..], &frame(true, 1, 70_000)[..20]].concat();
        assert_refused(&huge, small.len(), 10, 70_000);
        // Fragments under the limit that add up to more: refused at the header of the
        // one that crosses it; the control frames in between do not count.
        let ping = frame(true, 9, 50);
        let crossing = frame(true, 0, 41);
        let fragments = [
            &frame(false, 1, 60)[..],
            &ping,
            &frame(false, 0, 40),
            &ping,
            &crossing,
        ]
        .concat();
        assert_refused(&fragments, fragments.len() - crossing.len(), 2, 141);
        // A control frame is held to the limit too.
        assert_refused(&frame(true, 9, 101), 0, 2, 101);
        // Up to the limit exactly is accepted, fragmented or not, again and again.
        let whole = [
            &frame(true, 1, 100)[..],
            &frame(false, 2, 50),
            &ping,
            &frame(false, 0, 25),
            &frame(true, 0, 25),
            &frame(true, 1, 100),
        ]
        .concat();
        for chunk in [1, 3, 7, 1000] {
            assert_eq!(refused_at(&whole, chunk), None, "chunks of {chunk}");
        }
    }

    /// A reader that hands out `bytes` a few at a time, as a socket may.
    struct Trickle {
        bytes: Vec<u8>,
        step: usize,
    }

    impl AsyncRead for Trickle {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let n = self.step.min(self.bytes.len()).min(buf.remaining());
            buf.put_slice(&self.bytes[..n]);
            self.bytes.drain(..n);
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_metered_socket_hands_over_nothing_of_a_refused_frame() {
        use tokio::io::AsyncReadExt;
        let before = [frame(true, 1, 10), frame(false, 1, 90)].concat();
        let refused = frame(true, 0, 20);
        for step in [1, 5, 64, 4096] {
            let meter = Arc::new(Meter::default());
            meter.start_websocket(100);
            let bytes = [&before[..], &refused, &frame(true, 1, 4)].concat();
            let mut metered = Metered::new(Trickle { bytes, step }, meter);
            let mut read = Vec::new();
            let error = loop {
                let mut buf = [0_u8; 4096];
                match metered.read(&mut buf).await {
                    Ok(0) => panic!("the end, without a refusal"),
                    Ok(n) => read.extend_from_slice(&buf[..n]),
                    Err(error) => break error,
                }
            };
            // Whatever came before the refused frame; of the refused frame, at most
            // the part of its header that arrived with earlier bytes.
            assert!(read.starts_with(&before), "step {step}");
            assert!(read.len() < before.len() + 2, "step {step}: {}", read.len());
            let too_big = error
                .get_ref()
                .and_then(|e| e.downcast_ref::<MessageTooBig>())
                .copied();
            assert_eq!(
                too_big,
                Some(MessageTooBig {
                    size: 110,
                    max: 100
                })
            );
            assert!(metered.read(&mut [0_u8; 16]).await.is_err(), "and stays so");
        }
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
