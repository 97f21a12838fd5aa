//! Follows a client's frames on the wire, header by header, without reading their
//! payloads: where each frame ends, whether a message is left unfinished, how large a
//! header says a message is, and how many frames, pings and bytes came this second.
//!
//! tungstenite reserves and reads a whole fragment before it checks the message's
//! size, and hides a frame cut short; the scanner sees both from the header on.

use super::limits::{Limits, MAX_CLIENT_PINGS_PER_SECOND};

/// What the scanner holds a client to. Every connection follows the same rules, so
/// they are shared rather than copied into each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Rules {
    /// The largest message (and control frame), in bytes.
    pub(crate) max_message: u64,
    /// Most frames within one second.
    pub(crate) max_frames: u32,
    /// Most payload bytes within one second.
    pub(crate) max_bytes: u64,
}

impl From<&Limits> for Rules {
    fn from(limits: &Limits) -> Self {
        Self {
            max_message: u64::try_from(limits.max_message_bytes)
                .unwrap_or(u64::MAX)
                .max(1),
            max_frames: limits.max_frames_per_second.max(1),
            max_bytes: limits.max_bytes_per_second.max(1),
        }
    }
}

/// Why a client's frames stopped being let through. The connection closes with
/// [`Refusal::close_code`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// A header announced a message (or a control frame) over `MAX_MESSAGE_BYTES`.
    #[error("a message of {size} bytes announced, over the limit of {max}")]
    TooBig {
        /// The size announced, the message's earlier fragments included.
        size: u64,
        /// `MAX_MESSAGE_BYTES`.
        max: u64,
    },
    /// More frames within one second than `MAX_FRAMES_PER_SECOND`.
    #[error("more than {max} frames in a second")]
    TooManyFrames {
        /// `MAX_FRAMES_PER_SECOND`.
        max: u32,
    },
    /// More payload within one second than `MAX_BYTES_PER_SECOND`.
    #[error("more than {max} bytes in a second")]
    TooManyBytes {
        /// `MAX_BYTES_PER_SECOND`.
        max: u64,
    },
    /// More pings within one second than [`MAX_CLIENT_PINGS_PER_SECOND`]:
    /// tungstenite answers each one by itself, outside the server's bounded queue.
    #[error("too many pings: more than {max} in a second")]
    TooManyPings {
        /// [`MAX_CLIENT_PINGS_PER_SECOND`].
        max: u8,
    },
}

impl Refusal {
    /// True for a budget a second, false for a message too big.
    #[must_use]
    pub fn is_flood(&self) -> bool {
        !matches!(self, Self::TooBig { .. })
    }

    /// 1009 (Message Too Big) for a message over the limit, 1008 (Policy Violation)
    /// for a flood.
    #[must_use]
    pub fn close_code(&self) -> u16 {
        match self {
            Self::TooBig { .. } => 1009,
            Self::TooManyFrames { .. } | Self::TooManyBytes { .. } | Self::TooManyPings { .. } => {
                1008
            }
        }
    }
}

/// A frame that was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Refused {
    /// Where, in the bytes fed, that frame begins; 0 when its header began in bytes
    /// fed before.
    pub(crate) at: usize,
    /// Why.
    pub(crate) why: Refusal,
}

/// Follows client frames byte by byte. Kept small: every connection holds one, so
/// the counters are as narrow as the limits allow (a second's bytes are at most
/// `MAX_BYTES_PER_SECOND`, 1 GiB).
#[derive(Debug, Default)]
pub(crate) struct FrameScanner {
    state: Scan,
    fin: bool,
    opcode: u8,
    masked: bool,
    /// A data frame without FIN came, and its final continuation has not.
    fragmented: bool,
    /// Pings whose header began this second.
    pings: u8,
    /// The current frame's length while its header is read; then what is left of
    /// its payload.
    len: u64,
    /// The payload announced so far for the current data message, all its fragments:
    /// control frames in between are not part of it. Once refused for size, the
    /// size announced.
    message: u64,
    /// Frames whose header began this second.
    frames: u32,
    /// Payload bytes announced this second.
    bytes: u32,
    /// The second the counts are for.
    pub(crate) second: u32,
    /// The unfinished stretches so far, so that one lasting across two heartbeats
    /// can be told from two short ones.
    pub(crate) stretches: u32,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Scan {
    #[default]
    First,
    Second,
    Length(u8),
    Mask(u8),
    Payload,
    /// Nothing more is followed.
    Refused(Over),
}

/// Which rule a refused frame broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Over {
    Size,
    Frames,
    Bytes,
    Pings,
}

impl FrameScanner {
    /// True when no frame is cut short and no fragmented message is open.
    pub(crate) fn finished(&self) -> bool {
        self.state == Scan::First && !self.fragmented
    }

    /// Why the scanner refused, once it has.
    pub(crate) fn refused(&self, rules: &Rules) -> Option<Refusal> {
        match self.state {
            Scan::Refused(over) => Some(self.refusal(over, rules)),
            _ => None,
        }
    }

    /// A new second: the budget of frames, pings and bytes starts again.
    pub(crate) fn new_second(&mut self) {
        self.frames = 0;
        self.bytes = 0;
        self.pings = 0;
    }

    fn refusal(&self, over: Over, rules: &Rules) -> Refusal {
        match over {
            Over::Size => Refusal::TooBig {
                size: self.message,
                max: rules.max_message,
            },
            Over::Frames => Refusal::TooManyFrames {
                max: rules.max_frames,
            },
            Over::Bytes => Refusal::TooManyBytes {
                max: rules.max_bytes,
            },
            Over::Pings => Refusal::TooManyPings {
                max: MAX_CLIENT_PINGS_PER_SECOND,
            },
        }
    }

    /// Follows `bytes`; fails at the first frame that breaks `rules` (a message or
    /// control frame over the size limit, or a frame over this second's budget), and
    /// follows nothing after it.
    pub(crate) fn feed(&mut self, bytes: &[u8], rules: &Rules) -> Result<(), Refused> {
        let mut frame_start = 0;
        let mut at = 0;
        while let Some(&byte) = bytes.get(at) {
            match self.state {
                Scan::First => {
                    frame_start = at;
                    self.fin = byte & 0x80 != 0;
                    self.opcode = byte & 0x0f;
                    self.frames = self.frames.saturating_add(1);
                    if self.frames > rules.max_frames {
                        return Err(self.refuse(Over::Frames, rules, frame_start));
                    }
                    self.state = Scan::Second;
                }
                Scan::Second => {
                    self.masked = byte & 0x80 != 0;
                    match byte & 0x7f {
                        126 => self.start_length(2),
                        127 => self.start_length(8),
                        n => {
                            self.len = u64::from(n);
                            self.after_length(rules, frame_start)?;
                        }
                    }
                }
                Scan::Length(left) => {
                    self.len = (self.len << 8) | u64::from(byte);
                    if left > 1 {
                        self.state = Scan::Length(left - 1);
                    } else {
                        self.after_length(rules, frame_start)?;
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
                Scan::Refused(over) => {
                    return Err(Refused {
                        at: 0,
                        why: self.refusal(over, rules),
                    });
                }
            }
            at += 1;
        }
        Ok(())
    }

    fn refuse(&mut self, over: Over, rules: &Rules, frame_start: usize) -> Refused {
        self.state = Scan::Refused(over);
        Refused {
            at: frame_start,
            why: self.refusal(over, rules),
        }
    }

    fn start_length(&mut self, bytes: u8) {
        self.len = 0;
        self.state = Scan::Length(bytes);
    }

    /// The frame's length is known: refuse it here if it takes its message (or, for
    /// a control frame, itself) over the limit, or this second's bytes over budget.
    fn after_length(&mut self, rules: &Rules, frame_start: usize) -> Result<(), Refused> {
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
        if size > rules.max_message {
            self.message = size;
            return Err(self.refuse(Over::Size, rules, frame_start));
        }
        // Under the size limit, so it fits.
        let len = u32::try_from(self.len).unwrap_or(u32::MAX);
        self.bytes = self.bytes.saturating_add(len);
        if u64::from(self.bytes) > rules.max_bytes {
            return Err(self.refuse(Over::Bytes, rules, frame_start));
        }
        if self.opcode == 0x9 {
            self.pings = self.pings.saturating_add(1);
            if self.pings > MAX_CLIENT_PINGS_PER_SECOND {
                return Err(self.refuse(Over::Pings, rules, frame_start));
            }
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A masked client frame of `payload_len` bytes.
    pub(crate) fn frame(fin: bool, opcode: u8, payload_len: usize) -> Vec<u8> {
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

    const UNLIMITED: Rules = Rules {
        max_message: u64::MAX,
        max_frames: u32::MAX,
        max_bytes: u64::MAX,
    };

    /// A size limit of `max_message` bytes, and no budget.
    fn sized(max_message: u64) -> Rules {
        Rules {
            max_message,
            ..UNLIMITED
        }
    }

    fn finished_after(chunks: &[&[u8]]) -> bool {
        let mut scanner = FrameScanner::default();
        for chunk in chunks {
            scanner.feed(chunk, &UNLIMITED).unwrap();
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
                scanner.feed(std::slice::from_ref(b), &UNLIMITED).unwrap();
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

    /// Where `bytes`, fed in chunks of `chunk` bytes, are refused under `rules`: the
    /// offset in the whole at which nothing more was let through, and why.
    fn refused_at(bytes: &[u8], chunk: usize, rules: &Rules) -> Option<(usize, Refusal)> {
        let mut scanner = FrameScanner::default();
        let mut offset = 0;
        for piece in bytes.chunks(chunk) {
            if let Err(refused) = scanner.feed(piece, rules) {
                assert_eq!(scanner.refused(rules), Some(refused.why));
                assert_eq!(
                    scanner.feed(b"more", rules),
                    Err(Refused {
                        at: 0,
                        why: refused.why
                    }),
                    "nothing is followed after a refusal"
                );
                return Some((offset + refused.at, refused.why));
            }
            offset += piece.len();
        }
        assert_eq!(scanner.refused(rules), None);
        None
    }

    /// Asserts that `bytes` are refused for `size` (at a limit of 100) at the frame
    /// starting at `start`, whose length ends `header` bytes in: everything before the
    /// frame is let through, and of the frame at most the part of its header that
    /// came in an earlier chunk.
    fn assert_refused(bytes: &[u8], start: usize, header: usize, size: u64) {
        for chunk in [1, 3, 7, 1000] {
            let (at, why) = refused_at(bytes, chunk, &sized(100)).expect("refused");
            assert_eq!(why, Refusal::TooBig { size, max: 100 }, "chunks of {chunk}");
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
            assert_eq!(
                refused_at(&whole, chunk, &sized(100)),
                None,
                "chunks of {chunk}"
            );
        }
    }

    #[test]
    fn frames_of_every_type_count_against_the_budget_until_a_new_second() {
        let rules = Rules {
            max_frames: 5,
            ..UNLIMITED
        };
        for opcode in [0x1, 0x2, 0x9, 0xA] {
            let five = frame(true, opcode, 1).repeat(5);
            let sixth = frame(true, opcode, 1);
            let mut scanner = FrameScanner::default();
            assert_eq!(scanner.feed(&five, &rules), Ok(()), "opcode {opcode:#x}");
            scanner.new_second();
            assert_eq!(scanner.feed(&five, &rules), Ok(()), "opcode {opcode:#x}");
            let refused = scanner.feed(&sixth, &rules);
            assert_eq!(
                refused,
                Err(Refused {
                    at: 0,
                    why: Refusal::TooManyFrames { max: 5 }
                }),
                "opcode {opcode:#x}"
            );
            assert_eq!(refused.unwrap_err().why.close_code(), 1008);
        }
        // Refused at the header of the frame over the budget, in whatever chunks.
        let six = frame(true, 1, 3).repeat(6);
        for chunk in [1, 3, 1000] {
            let (at, _) = refused_at(&six, chunk, &rules).expect("refused");
            assert_eq!(at, 5 * frame(true, 1, 3).len(), "chunks of {chunk}");
        }
    }

    #[test]
    fn more_than_ten_pings_a_second_are_refused() {
        let mut scanner = FrameScanner::default();
        let ten = frame(true, 0x9, 4).repeat(usize::from(MAX_CLIENT_PINGS_PER_SECOND));
        assert_eq!(scanner.feed(&ten, &UNLIMITED), Ok(()));
        scanner.new_second();
        assert_eq!(scanner.feed(&ten, &UNLIMITED), Ok(()));
        let refused = scanner.feed(&frame(true, 0x9, 4), &UNLIMITED).unwrap_err();
        assert_eq!(refused.why, Refusal::TooManyPings { max: 10 });
        assert_eq!(refused.why.close_code(), 1008);
        // Pongs and other frames are not pings.
        let mut scanner = FrameScanner::default();
        let pongs = frame(true, 0xA, 4).repeat(50);
        assert_eq!(scanner.feed(&pongs, &UNLIMITED), Ok(()));
    }

    #[test]
    fn payload_bytes_count_against_the_budget() {
        let rules = Rules {
            max_message: 100,
            max_frames: u32::MAX,
            max_bytes: 250,
        };
        let hundred = frame(true, 2, 100);
        let (at, why) = refused_at(&hundred.repeat(3), 1000, &rules).expect("refused");
        assert_eq!(why, Refusal::TooManyBytes { max: 250 });
        assert_eq!(at, 2 * hundred.len());
        assert_eq!(why.close_code(), 1008);
        let mut scanner = FrameScanner::default();
        scanner.feed(&hundred.repeat(2), &rules).unwrap();
        scanner.new_second();
        assert_eq!(scanner.feed(&hundred.repeat(2), &rules), Ok(()));
    }
}
