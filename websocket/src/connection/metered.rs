//! The upgraded connection of one client, with its incoming frames followed by a
//! [`FrameScanner`] before tungstenite reads them.
//!
//! It wraps the connection as hyper hands it over, so the bytes hyper read ahead with
//! the request (a client need not wait for the 101 to send frames) are followed from
//! the first, like the rest. A frame that breaks a rule is never handed to
//! tungstenite: the read stops at its header and the next read fails with the
//! [`Refusal`], which the connection answers with a close frame.
//!
//! After a refusal the client's last bytes are read and thrown away until it closes
//! ([`Metered::linger`]): a socket closed with unread data sends a reset, which can
//! overtake the close frame, and many clients drop what they had received on a
//! reset.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Instant;

use super::limits::{CLOSING_WRITE_AFTER, LINGER_BYTES, Limits};
use super::scanner::{FrameScanner, Refusal, Refused, Rules};

/// A client's socket whose incoming frames are followed by a [`FrameScanner`].
#[derive(Debug)]
pub struct Metered<T> {
    inner: T,
    scanner: FrameScanner,
    rules: Arc<Rules>,
}

/// The rules of [`Limits`], to be shared by every connection that keeps them.
#[derive(Debug, Clone)]
pub struct SharedRules(Arc<Rules>);

impl From<&Limits> for SharedRules {
    fn from(limits: &Limits) -> Self {
        Self(Arc::new(Rules::from(limits)))
    }
}

/// The whole seconds since the first time this was asked: the budget's windows.
fn second_now() -> u32 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    u32::try_from(Instant::now().duration_since(epoch).as_secs()).unwrap_or(u32::MAX)
}

impl<T> Metered<T> {
    /// Follows what `inner` reads, under `rules`.
    pub fn new(inner: T, rules: &SharedRules) -> Self {
        let mut scanner = FrameScanner::default();
        scanner.second = second_now();
        Self {
            inner,
            scanner,
            rules: Arc::clone(&rules.0),
        }
    }

    /// The current unfinished stretch, or `None` while no frame is cut short and no
    /// fragmented message is open.
    #[must_use]
    pub fn unfinished(&self) -> Option<u32> {
        (!self.scanner.finished()).then_some(self.scanner.stretches)
    }

    fn observe(&mut self, bytes: &[u8]) -> Result<(), Refused> {
        if bytes.is_empty() {
            return Ok(());
        }
        let second = second_now();
        if second != self.scanner.second {
            self.scanner.second = second;
            self.scanner.new_second();
        }
        let was_finished = self.scanner.finished();
        let fed = self.scanner.feed(bytes, &self.rules);
        if was_finished && !self.scanner.finished() {
            self.scanner.stretches = self.scanner.stretches.wrapping_add(1);
        }
        fed
    }
}

fn refused(why: Refusal) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why)
}

/// The [`Refusal`] behind a read error, if that is what it was.
#[must_use]
pub fn refusal(error: &io::Error) -> Option<Refusal> {
    error
        .get_ref()
        .and_then(|e| e.downcast_ref::<Refusal>())
        .copied()
}

impl<T: AsyncRead + AsyncWrite + Unpin> Metered<T> {
    /// Once the client has been sent its close frame: ends the sending side (a FIN
    /// after the close frame), then reads and throws away what the client still
    /// sends, until it closes its side, [`LINGER_BYTES`] are thrown away, or
    /// [`CLOSING_WRITE_AFTER`] has passed.
    pub async fn linger(&mut self) {
        let inner = &mut self.inner;
        let _ = tokio::time::timeout(CLOSING_WRITE_AFTER, async {
            if inner.shutdown().await.is_err() {
                return;
            }
            let mut left = LINGER_BYTES;
            // Small: a burst of refused clients lingers at once.
            let mut buf = vec![0_u8; 1024];
            while left > 0 {
                match inner.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => left = left.saturating_sub(n),
                }
            }
        })
        .await;
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Metered<T> {
    /// Reads what the client sent, up to the first frame that breaks a rule; the read
    /// after that fails with the [`Refusal`]. So tungstenite never sees that frame's
    /// header, and reserves nothing for its payload.
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(why) = self.scanner.refused(&self.rules) {
            return Poll::Ready(Err(refused(why)));
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.inner).poll_read(cx, buf))?;
        let this = &mut *self;
        if let Err(stop) = this.observe(&buf.filled()[before..]) {
            buf.set_filled(before + stop.at);
            if stop.at == 0 {
                return Poll::Ready(Err(refused(stop.why)));
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

#[cfg(test)]
mod tests {
    use super::super::scanner::tests::frame;
    use super::*;

    fn limited(max_message_bytes: usize) -> SharedRules {
        SharedRules::from(&Limits {
            max_message_bytes,
            ..Limits::default()
        })
    }

    #[tokio::test]
    async fn each_unfinished_stretch_has_its_number() {
        let mut metered = Metered::new(tokio::io::empty(), &limited(1024));
        assert_eq!(metered.unfinished(), None);
        metered.observe(&frame(false, 1, 4)).unwrap();
        assert_eq!(metered.unfinished(), Some(1));
        metered.observe(&frame(true, 9, 0)).unwrap();
        assert_eq!(
            metered.unfinished(),
            Some(1),
            "a ping in between changes nothing"
        );
        metered.observe(&frame(true, 0, 4)).unwrap();
        assert_eq!(metered.unfinished(), None);
        metered.observe(&frame(true, 1, 4)[..3]).unwrap();
        assert_eq!(metered.unfinished(), Some(2));
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

    /// Reads `metered` to its first error: what was read before, and the error.
    async fn read_to_error<T: AsyncRead + Unpin>(metered: &mut Metered<T>) -> (Vec<u8>, io::Error) {
        let mut read = Vec::new();
        loop {
            let mut buf = [0_u8; 4096];
            match metered.read(&mut buf).await {
                Ok(0) => panic!("the end, without a refusal"),
                Ok(n) => read.extend_from_slice(&buf[..n]),
                Err(error) => return (read, error),
            }
        }
    }

    #[tokio::test]
    async fn a_metered_socket_hands_over_nothing_of_a_refused_frame() {
        let before = [frame(true, 1, 10), frame(false, 1, 90)].concat();
        let over = frame(true, 0, 20);
        for step in [1, 5, 64, 4096] {
            let bytes = [&before[..], &over, &frame(true, 1, 4)].concat();
            let mut metered = Metered::new(Trickle { bytes, step }, &limited(100));
            let (read, error) = read_to_error(&mut metered).await;
            // Whatever came before the refused frame; of the refused frame, at most
            // the part of its header that arrived with earlier bytes.
            assert!(read.starts_with(&before), "step {step}");
            assert!(read.len() < before.len() + 2, "step {step}: {}", read.len());
            assert_eq!(
                refusal(&error),
                Some(Refusal::TooBig {
                    size: 110,
                    max: 100
                })
            );
            assert!(metered.read(&mut [0_u8; 16]).await.is_err(), "and stays so");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_flood_is_refused_within_its_second_and_a_steady_client_is_not() {
        let limits = SharedRules::from(&Limits {
            max_frames_per_second: 10,
            ..Limits::default()
        });
        let ten = frame(true, 1, 1).repeat(10);
        // Ten a second, second after second.
        let mut metered = Metered::new(tokio::io::empty(), &limits);
        for _ in 0..5 {
            assert_eq!(metered.observe(&ten), Ok(()));
            tokio::time::advance(std::time::Duration::from_secs(1)).await;
        }
        // Eleven within one second.
        let bytes = [&ten[..], &frame(true, 1, 1)].concat();
        let mut metered = Metered::new(Trickle { bytes, step: 3 }, &limits);
        let (read, error) = read_to_error(&mut metered).await;
        assert_eq!(read, ten);
        assert_eq!(refusal(&error), Some(Refusal::TooManyFrames { max: 10 }));
    }
}
