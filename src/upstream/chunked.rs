//! The chunked transfer coding of an upstream's response body (RFC 9112 §7.1),
//! decoded strictly: a framing two parsers could read differently is how responses
//! get smuggled, so anything but the grammar is an error, never a guess.
//!
//! Refused: a chunk size that is not hexadecimal or overflows 64 bits, a line not
//! ended by CRLF (a bare LF included), chunk data not followed by CRLF, and chunk
//! extensions or trailers longer than [`MAX_LINE`] / [`MAX_TRAILERS`]. Extensions
//! are skipped; trailers are read and dropped.

use bytes::{Bytes, BytesMut};

/// The longest chunk-size line (size and extensions) accepted.
pub const MAX_LINE: usize = 4096;
/// The most trailer bytes accepted after the last chunk.
pub const MAX_TRAILERS: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Hex digits of a chunk size; `digits` read so far.
    Size {
        digits: u8,
    },
    /// Spaces after the size, before `;` or CR.
    SizeSpace,
    /// A chunk extension, skipped up to CR.
    Extension,
    /// The LF ending a size line.
    SizeLf,
    /// Chunk data still to come.
    Data {
        left: u64,
    },
    /// The CR, then the LF, after chunk data.
    DataCr,
    DataLf,
    /// At the start of a trailer line (or the final empty line).
    TrailerStart,
    /// Inside a trailer line.
    Trailer,
    /// The LF of a trailer line; `empty` when the line was the final empty one.
    TrailerLf {
        empty: bool,
    },
    End,
}

/// What [`Decoder::decode`] found in the buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// Body bytes, split off the buffer without copying.
    Data(Bytes),
    /// The body ended (last chunk and trailers read); the buffer holds what follows.
    End,
    /// Everything buffered was consumed: read more.
    NeedMore,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChunkError {
    #[error("invalid chunk size line")]
    Size,
    #[error("chunk size overflows")]
    Overflow,
    #[error("chunk size line longer than {MAX_LINE} bytes")]
    LineTooLong,
    #[error("chunk data not followed by CRLF")]
    DataEnd,
    #[error("invalid or oversized trailers")]
    Trailers,
}

#[derive(Debug)]
pub struct Decoder {
    state: State,
    size: u64,
    /// Bytes of the current size line, or of all trailers.
    line: usize,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder {
            state: State::Size { digits: 0 },
            size: 0,
            line: 0,
        }
    }
}

impl Decoder {
    /// Bytes of chunk data known to follow (a size hint).
    pub fn data_left(&self) -> u64 {
        match self.state {
            State::Data { left } => left,
            _ => 0,
        }
    }

    /// Consumes framing from `buf` up to the next data, the end, or the buffer's end.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, ChunkError> {
        let mut used = 0;
        let result = loop {
            if let State::Data { left } = self.state {
                let available = buf.len() - used;
                if available == 0 {
                    break Decoded::NeedMore;
                }
                let n = usize::try_from(left).map_or(available, |l| l.min(available));
                self.state = match left - n as u64 {
                    0 => State::DataCr,
                    left => State::Data { left },
                };
                let _ = buf.split_to(used);
                return Ok(Decoded::Data(buf.split_to(n).freeze()));
            }
            if self.state == State::End {
                break Decoded::End;
            }
            let Some(&b) = buf.get(used) else {
                break Decoded::NeedMore;
            };
            used += 1;
            self.step(b)?;
        };
        let _ = buf.split_to(used);
        Ok(result)
    }

    fn step(&mut self, b: u8) -> Result<(), ChunkError> {
        use State::*;
        if matches!(self.state, Size { .. } | SizeSpace | Extension | SizeLf) {
            self.line += 1;
            if self.line > MAX_LINE {
                return Err(ChunkError::LineTooLong);
            }
        }
        if matches!(self.state, TrailerStart | Trailer | TrailerLf { .. }) {
            self.line += 1;
            if self.line > MAX_TRAILERS {
                return Err(ChunkError::Trailers);
            }
        }
        self.state = match (self.state, b) {
            (Size { digits }, b) if b.is_ascii_hexdigit() => {
                if digits == 16 {
                    return Err(ChunkError::Overflow);
                }
                let value = (b as char).to_digit(16).expect("a hex digit") as u64;
                self.size = self.size << 4 | value;
                Size { digits: digits + 1 }
            }
            (Size { digits: 0 }, _) => return Err(ChunkError::Size),
            (Size { .. } | SizeSpace, b' ' | b'\t') => SizeSpace,
            (Size { .. } | SizeSpace, b';') => Extension,
            (Size { .. } | SizeSpace | Extension, b'\r') => SizeLf,
            (Extension, b) if b == b'\t' || (b' '..=b'~').contains(&b) || b >= 0x80 => Extension,
            (SizeLf, b'\n') => {
                self.line = 0;
                match std::mem::take(&mut self.size) {
                    0 => TrailerStart,
                    left => Data { left },
                }
            }
            (Size { .. } | SizeSpace | Extension | SizeLf, _) => return Err(ChunkError::Size),
            (DataCr, b'\r') => DataLf,
            (DataLf, b'\n') => Size { digits: 0 },
            (DataCr | DataLf, _) => return Err(ChunkError::DataEnd),
            (TrailerStart, b'\r') => TrailerLf { empty: true },
            (Trailer, b'\r') => TrailerLf { empty: false },
            (TrailerStart | Trailer, b) if b == b'\t' || (b >= b' ' && b != 0x7f) => Trailer,
            (TrailerLf { empty: true }, b'\n') => End,
            (TrailerLf { empty: false }, b'\n') => TrailerStart,
            (TrailerStart | Trailer | TrailerLf { .. }, _) => return Err(ChunkError::Trailers),
            (Data { .. } | End, _) => unreachable!("handled by decode"),
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Feeds `input` in pieces of `step` bytes; returns the body and what is left.
    fn decode_all(input: &[u8], step: usize) -> Result<(Vec<u8>, Vec<u8>), ChunkError> {
        let mut decoder = Decoder::default();
        let mut buf = BytesMut::new();
        let mut body = Vec::new();
        let mut fed = 0;
        loop {
            match decoder.decode(&mut buf)? {
                Decoded::Data(data) => body.extend_from_slice(&data),
                Decoded::End => {
                    buf.extend_from_slice(&input[fed..]);
                    return Ok((body, buf.to_vec()));
                }
                Decoded::NeedMore if fed == input.len() => {
                    return Err(ChunkError::Size); // truncated: the caller's EOF error
                }
                Decoded::NeedMore => {
                    let end = (fed + step.max(1)).min(input.len());
                    buf.extend_from_slice(&input[fed..end]);
                    fed = end;
                }
            }
        }
    }

    fn encode(chunks: &[Vec<u8>], trailers: &str) -> Vec<u8> {
        let mut out = Vec::new();
        for chunk in chunks.iter().filter(|c| !c.is_empty()) {
            out.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
            out.extend_from_slice(chunk);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(format!("0\r\n{trailers}\r\n").as_bytes());
        out
    }

    #[test]
    fn decodes_chunks_extensions_and_trailers() {
        let input = b"5;name=\"v\"\r\nhello\r\n1 ; x\r\n!\r\n0\r\nx-sum: 1\r\n\r\nNEXT";
        for step in [1, 2, 7, 1000] {
            let (body, rest) = decode_all(input, step).unwrap();
            assert_eq!(body, b"hello!");
            assert_eq!(rest, b"NEXT", "what follows the body stays buffered");
        }
    }

    #[test]
    fn refuses_what_two_parsers_could_read_differently() {
        let refused: &[(&[u8], ChunkError)] = &[
            (b"x\r\n", ChunkError::Size),
            (b"\r\n", ChunkError::Size),
            (b"-1\r\n", ChunkError::Size),
            (b"+5\r\nhello\r\n0\r\n\r\n", ChunkError::Size),
            (b"0x5\r\nhello\r\n0\r\n\r\n", ChunkError::Size),
            (b"5\nhello\r\n0\r\n\r\n", ChunkError::Size),
            (b"5\r\nhelloXX0\r\n\r\n", ChunkError::DataEnd),
            (b"5\r\nhello\n0\r\n\r\n", ChunkError::DataEnd),
            (b"5 5\r\nhello\r\n", ChunkError::Size),
            (b"10000000000000000\r\n", ChunkError::Overflow),
            (b"0\r\nx: 1\n\r\n", ChunkError::Trailers),
            (b"0\r\n\0\r\n\r\n", ChunkError::Trailers),
        ];
        for (input, want) in refused {
            assert_eq!(
                decode_all(input, 1).unwrap_err(),
                *want,
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
        let long = format!("1;{}\r\n", "e".repeat(MAX_LINE));
        assert_eq!(
            decode_all(long.as_bytes(), 64).unwrap_err(),
            ChunkError::LineTooLong
        );
        let trailers = format!("0\r\n{}\r\n", "x: y\r\n".repeat(MAX_TRAILERS / 6 + 1));
        assert_eq!(
            decode_all(trailers.as_bytes(), 64).unwrap_err(),
            ChunkError::Trailers
        );
    }

    #[test]
    fn sixteen_hex_digits_are_the_most_a_size_has() {
        let input = b"000000000000000000001\r\nx\r\n0\r\n\r\n";
        assert_eq!(decode_all(input, 3).unwrap_err(), ChunkError::Overflow);
        let input = b"0000000000000001\r\nx\r\n0\r\n\r\n";
        assert_eq!(decode_all(input, 3).unwrap().0, b"x");
    }

    proptest! {
        /// Whatever the chunks and however the bytes arrive, the body comes out whole.
        #[test]
        fn round_trips_any_chunks_in_any_pieces(
            chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..8),
            step in 1usize..64,
            trailers in proptest::sample::select(vec!["", "a: b\r\n", "a: b\r\nc:\td\r\n"]),
        ) {
            let input = encode(&chunks, trailers);
            let (body, rest) = decode_all(&input, step).unwrap();
            prop_assert_eq!(body, chunks.concat());
            prop_assert!(rest.is_empty());
        }

        /// Arbitrary bytes give body bytes, an end or an error, never a panic, and never
        /// more body bytes than were fed.
        #[test]
        fn never_panics_on_arbitrary_bytes(
            input in proptest::collection::vec(any::<u8>(), 0..512),
            step in 1usize..32,
        ) {
            if let Ok((body, _)) = decode_all(&input, step) {
                prop_assert!(body.len() <= input.len());
            }
        }

        /// Hex sizes with any number of leading zeros up to 16 digits, in either case.
        #[test]
        fn sizes_parse_in_either_case(size in 1u64..5000, upper in any::<bool>()) {
            let hex = if upper { format!("{size:X}") } else { format!("{size:x}") };
            let mut input = format!("{hex}\r\n").into_bytes();
            input.extend(std::iter::repeat_n(b'a', size as usize));
            input.extend_from_slice(b"\r\n0\r\n\r\n");
            prop_assert_eq!(decode_all(&input, 97).unwrap().0.len() as u64, size);
        }
    }
}
