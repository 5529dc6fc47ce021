//! Primitive wire types: variable byte integers, UTF-8 strings, binary data.
//!
//! Reading goes through [`Reader`], a bounds-checked cursor over one frame. Nothing here
//! indexes without a check, so no input can make it panic.

use bytes::{BufMut, Bytes, BytesMut};

use crate::error::{DecodeError, EncodeError};

/// Largest value a variable byte integer (4 bytes) can hold; also the largest remaining length.
pub const MAX_VARINT: u32 = 268_435_455;

const TRUNCATED: DecodeError = DecodeError::Malformed("packet ends inside a field");

/// Parses a variable byte integer from the start of `bytes`.
///
/// `Ok(None)` when the slice ends before the integer does. Rejects integers longer than four
/// bytes and non-minimal encodings ([MQTT-1.5.5-1]) as malformed.
#[inline]
pub fn parse_varint(bytes: &[u8]) -> Result<Option<(u32, usize)>, DecodeError> {
    let mut value = 0u32;
    for i in 0..4 {
        let Some(&byte) = bytes.get(i) else {
            return Ok(None);
        };
        value |= u32::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            if i > 0 && byte == 0 {
                return Err(DecodeError::Malformed(
                    "variable byte integer not in its shortest form",
                ));
            }
            return Ok(Some((value, i + 1)));
        }
    }
    Err(DecodeError::Malformed(
        "variable byte integer longer than 4 bytes",
    ))
}

/// Number of bytes `value` takes as a variable byte integer (values above [`MAX_VARINT`]
/// are not encodable and report 4).
#[inline]
pub fn varint_len(value: usize) -> usize {
    match value {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

/// Appends `value` (at most [`MAX_VARINT`], checked by the caller) as a variable byte integer.
#[inline]
pub fn put_varint(buf: &mut BytesMut, value: u32) {
    let mut value = value;
    loop {
        let mut byte = (value & 0x7F) as u8;
        value >>= 7;
        if value > 0 {
            byte |= 0x80;
        }
        buf.put_u8(byte);
        if value == 0 {
            break;
        }
    }
}

/// Validates an MQTT UTF-8 string: well-formed UTF-8 (which excludes surrogates) without U+0000.
#[inline]
pub fn utf8(bytes: &[u8]) -> Result<&str, DecodeError> {
    if bytes.contains(&0) {
        return Err(DecodeError::Malformed("string contains U+0000"));
    }
    std::str::from_utf8(bytes).map_err(|_| DecodeError::Malformed("string is not valid UTF-8"))
}

/// A bounds-checked cursor over (part of) one packet frame.
#[derive(Clone)]
pub struct Reader<'a> {
    frame: &'a Bytes,
    pos: usize,
    end: usize,
}

impl<'a> Reader<'a> {
    pub fn new(frame: &'a Bytes) -> Reader<'a> {
        Reader {
            frame,
            pos: 0,
            end: frame.len(),
        }
    }

    #[inline]
    pub fn remaining(&self) -> usize {
        self.end.saturating_sub(self.pos)
    }

    #[inline]
    pub fn is_empty(&self) -> bool {
        self.pos >= self.end
    }

    #[inline]
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&end| end <= self.end)
            .ok_or(TRUNCATED)?;
        let frame: &'a Bytes = self.frame;
        let slice = frame.get(self.pos..end).ok_or(TRUNCATED)?;
        self.pos = end;
        Ok(slice)
    }

    #[inline]
    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        let frame: &'a Bytes = self.frame;
        if self.pos >= self.end {
            return Err(TRUNCATED);
        }
        let byte = *frame.get(self.pos).ok_or(TRUNCATED)?;
        self.pos += 1;
        Ok(byte)
    }

    #[inline]
    pub fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        match b {
            [hi, lo] => Ok(u16::from_be_bytes([*hi, *lo])),
            _ => Err(TRUNCATED),
        }
    }

    #[inline]
    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        match b {
            [a, b, c, d] => Ok(u32::from_be_bytes([*a, *b, *c, *d])),
            _ => Err(TRUNCATED),
        }
    }

    #[inline]
    pub fn varint(&mut self) -> Result<u32, DecodeError> {
        let frame: &'a Bytes = self.frame;
        let rest = frame.get(self.pos..self.end).ok_or(TRUNCATED)?;
        match parse_varint(rest)? {
            Some((value, len)) => {
                self.pos += len;
                Ok(value)
            }
            None => Err(TRUNCATED),
        }
    }

    /// A two-byte length prefix followed by that many bytes, as a zero-copy slice of the frame.
    #[inline]
    pub fn binary(&mut self) -> Result<Bytes, DecodeError> {
        let len = usize::from(self.u16()?);
        let start = self.pos;
        self.take(len)?;
        Ok(self.frame.slice(start..start + len))
    }

    /// A two-byte length prefix followed by that many bytes, borrowed from the frame.
    #[inline]
    pub fn raw_binary(&mut self) -> Result<&'a [u8], DecodeError> {
        let len = usize::from(self.u16()?);
        self.take(len)
    }

    /// A UTF-8 string, borrowed from the frame.
    #[inline]
    pub fn str(&mut self) -> Result<&'a str, DecodeError> {
        let len = usize::from(self.u16()?);
        utf8(self.take(len)?)
    }

    #[inline]
    pub fn string(&mut self) -> Result<String, DecodeError> {
        self.str().map(str::to_owned)
    }

    /// The next `len` bytes as a reader of their own (for a property section); `self` moves past them.
    pub fn sub(&mut self, len: usize) -> Result<Reader<'a>, DecodeError> {
        let start = self.pos;
        self.take(len)?;
        Ok(Reader {
            frame: self.frame,
            pos: start,
            end: self.pos,
        })
    }

    /// Everything left, as a zero-copy slice of the frame.
    #[inline]
    pub fn rest(&mut self) -> Bytes {
        let start = self.pos.min(self.end);
        self.pos = self.end;
        self.frame.slice(start..self.end)
    }

    /// Fails unless the reader has been consumed to its end.
    #[inline]
    pub fn finish(&self) -> Result<(), DecodeError> {
        if self.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::Malformed(
                "unexpected bytes after the packet contents",
            ))
        }
    }
}

/// Checks a string or binary field fits a 16-bit length prefix.
#[inline]
pub fn check_len(field: &'static str, len: usize) -> Result<(), EncodeError> {
    if len > usize::from(u16::MAX) {
        Err(EncodeError::FieldTooLong { field, len })
    } else {
        Ok(())
    }
}

/// Appends a length-prefixed string or binary field.
#[inline]
pub fn put_binary(buf: &mut BytesMut, field: &'static str, data: &[u8]) -> Result<(), EncodeError> {
    check_len(field, data.len())?;
    buf.put_u16(data.len() as u16);
    buf.put_slice(data);
    Ok(())
}

/// Length on the wire of a length-prefixed string or binary field.
#[inline]
pub fn binary_len(data: &[u8]) -> usize {
    2 + data.len()
}
