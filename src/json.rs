//! A lean serde [`Deserializer`](serde::Deserializer) for the crate's own request parses
//! ([`RequestView`](crate::request::RequestView), validation's fields, the rate limiter's usage
//! meter).
//!
//! # Why not only serde_json
//!
//! The request parses read a handful of fields and skip the rest of a body that is mostly
//! text. serde_json's reader finds the end of a string eight bytes at a time and copies a
//! string into its scratch space escape by escape; most of a request parse was spent there.
//! This reader looks at the first sixteen bytes of a run of string bytes eight at a time in a
//! word (keys, short values and the text between two escapes end there), finds the end of a
//! longer run with `memchr` (vectorized; serde_json itself depends on it), checks that run for
//! control characters in one pass the compiler vectorizes, and unescapes into one reused
//! buffer. It reads text already checked to be UTF-8 (`&str`, checked once for the whole body
//! with `simdutf8`), so it never checks encoding again. A text a visitor asks to have counted
//! ([`COUNTED`]) is counted, characters and CJK characters as
//! [`CharEstimator`](crate::request::CharEstimator) counts them, in the same pass that finds its
//! end, from the escaped text, without unescaping or copying it.
//!
//! Why these crates: `memchr` is already in every build through serde_json; `simdutf8` is the
//! small, widely used SIMD UTF-8 check (runtime CPU detection, a scalar fallback), several times
//! faster than `std::str::from_utf8` on the non-ASCII text prompts carry.
//!
//! # The contract
//!
//! It accepts only JSON that serde_json accepts, and may refuse more: nesting deeper than 128
//! levels, a number beyond `f64`, a lone surrogate in a string it unescapes. Its error says
//! nothing; a caller that gets one parses again with serde_json, which then either says what is
//! wrong, word for word as before, or accepts what this reader was too strict for. So the
//! result of a parse is always serde_json's; this reader only makes the common case fast. The
//! unit tests check it against `serde_json::Value` on generated documents.

use std::fmt;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};

/// Deepest nesting accepted (serde_json's limit).
const MAX_DEPTH: u32 = 128;

/// Bytes looked at one by one before a string's end is searched with `memchr`.
const SHORT: usize = 16;

/// The bytes that end a run of string bytes: `"`, `\` and the control characters.
const STOP: [bool; 256] = {
    let mut t = [false; 256];
    let mut i = 0;
    while i < 0x20 {
        t[i] = true;
        i += 1;
    }
    t[b'"' as usize] = true;
    t[b'\\' as usize] = true;
    t
};

/// The high bit of each byte of `word` that is `"`, `\\` or below `0x20` (and possibly of
/// bytes above the lowest such byte).
const fn stop_mask(word: u64) -> u64 {
    const ONES: u64 = u64::MAX / 255;
    const fn zero_bytes(v: u64) -> u64 {
        v.wrapping_sub(ONES) & !v
    }
    let ctrl = word.wrapping_sub(ONES * 0x20) & !word;
    let quote = zero_bytes(word ^ (ONES * b'"' as u64));
    let backslash = zero_bytes(word ^ (ONES * b'\\' as u64));
    (ctrl | quote | backslash) & (ONES << 7)
}

/// The characters and CJK characters of the `n` string bytes at `from` (no `"` or `\\` among
/// them); an error for a control character.
fn count_run(body: &[u8], from: usize, n: usize) -> Result<(u64, u64), Error> {
    let run = &body[from..from + n];
    let (mut chars, mut cjk) = (0u64, 0u64);
    for (i, block) in run.chunks(128).enumerate() {
        // One pass the compiler vectorizes: the lowest and highest byte, the characters begun.
        let (mut low, mut top, mut starts) = (u8::MAX, 0u8, 0u8);
        for &b in block {
            low = low.min(b);
            top = top.max(b);
            starts += u8::from((b as i8) >= -64);
        }
        if low < 0x20 {
            return Err(Error);
        }
        chars += u64::from(starts);
        if top >= 0xE0 {
            let at = from + i * 128;
            for (j, &b) in block.iter().enumerate() {
                if b >= 0xE0 {
                    cjk += u64::from(crate::request::is_cjk_point(decode_long(body, at + j)));
                }
            }
        }
    }
    Ok((chars, cjk))
}

/// The code point of the three- or four-byte UTF-8 sequence at `at` (the text is UTF-8, so the
/// sequence is whole).
fn decode_long(body: &[u8], at: usize) -> u32 {
    let b = body[at];
    let next = |k: usize| u32::from(body.get(at + k).map_or(0, |c| c & 0x3F));
    if b < 0xF0 {
        (u32::from(b & 0x0F) << 12) | (next(1) << 6) | next(2)
    } else {
        (u32::from(b & 0x07) << 18) | (next(1) << 12) | (next(2) << 6) | next(3)
    }
}

/// A refusal. It carries no message: the caller parses again with serde_json to say what is
/// wrong.
#[derive(Debug)]
pub(crate) struct Error;

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("refused by the fast JSON reader")
    }
}

impl std::error::Error for Error {}

impl de::Error for Error {
    fn custom<T: fmt::Display>(_: T) -> Self {
        Error
    }
}

/// The newtype name under which a visitor asks for a string's tokens rather than its text
/// (`Deserializer::deserialize_newtype_struct(COUNTED, visitor)`). With counting on, this
/// reader answers a string there with `visit_u128(tokens)`, [`CharEstimator`]'s count of the
/// unescaped text, read from the escaped text as its end is found; any other value, or
/// counting off, goes to the visitor as `deserialize_any` would. serde_json (and every other
/// reader) calls `visit_newtype_struct` instead, and the visitor reads the value as usual.
///
/// [`CharEstimator`]: crate::request::CharEstimator
pub(crate) const COUNTED: &str = "$llm_layers::counted_text";

/// Runs `visitor` over the one JSON value of `text` (whitespace around it allowed); `count`
/// turns on the counting of [`COUNTED`] strings.
pub(crate) fn visit_str<'de, V: Visitor<'de>>(
    text: &'de str,
    count: bool,
    visitor: V,
) -> Result<V::Value, Error> {
    let mut de = Deserializer {
        text,
        pos: 0,
        scratch: String::new(),
        depth: 0,
        count,
    };
    let value = de::Deserializer::deserialize_any(&mut de, visitor)?;
    de.ws();
    if de.pos == text.len() {
        Ok(value)
    } else {
        Err(Error)
    }
}

/// Reads a `T` from the JSON document `body` as serde_json would: this reader first, serde_json
/// when this reader refuses (so the answer is always serde_json's).
#[cfg_attr(not(feature = "rate-limit"), allow(dead_code))] // the usage meter's
pub(crate) fn from_slice<'de, T: de::Deserialize<'de>>(
    body: &'de [u8],
) -> Result<T, serde_json::Error> {
    if let Ok(text) = simdutf8::basic::from_utf8(body) {
        let mut de = Deserializer {
            text,
            pos: 0,
            scratch: String::new(),
            depth: 0,
            count: false,
        };
        if let Ok(value) = T::deserialize(&mut de) {
            if de.ws().is_none() {
                return Ok(value);
            }
        }
    }
    serde_json::from_slice(body)
}

/// The reader: a position in the text and a reused buffer for unescaped strings.
pub(crate) struct Deserializer<'de> {
    text: &'de str,
    pos: usize,
    scratch: String,
    depth: u32,
    /// Whether [`COUNTED`] strings are counted.
    count: bool,
}

/// A string read: borrowed from the text, or unescaped into the scratch buffer.
enum Str<'de> {
    Borrowed(&'de str),
    Scratch,
}

/// A number read.
enum Number {
    U(u64),
    I(i64),
    F(f64),
}

impl<'de> Deserializer<'de> {
    fn bytes(&self) -> &'de [u8] {
        self.text.as_bytes()
    }

    /// Skips whitespace and returns the next byte.
    #[inline]
    fn ws(&mut self) -> Option<u8> {
        let b = self.bytes();
        while let Some(&c) = b.get(self.pos) {
            if matches!(c, b' ' | b'\n' | b'\r' | b'\t') {
                self.pos += 1;
            } else {
                return Some(c);
            }
        }
        None
    }

    #[inline]
    fn expect(&mut self, byte: u8) -> Result<(), Error> {
        if self.ws() == Some(byte) {
            self.pos += 1;
            Ok(())
        } else {
            Err(Error)
        }
    }

    fn enter(&mut self) -> Result<(), Error> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            Err(Error)
        } else {
            Ok(())
        }
    }

    /// The run of string bytes from the position to the next `"` or `\`: its length, after
    /// checking it holds no control character.
    #[inline]
    fn run(&self) -> Result<usize, Error> {
        let rest = &self.bytes()[self.pos..];
        // Keys and short strings end within a few bytes, sooner than `memchr` starts: the
        // first sixteen bytes are looked at eight at a time in a word.
        let Some(head) = rest.get(..SHORT) else {
            // The end of the text is near: byte by byte.
            return match rest.iter().position(|&b| STOP[usize::from(b)]) {
                Some(j) if rest[j] >= 0x20 => Ok(j),
                _ => Err(Error),
            };
        };
        let (w0, w1) = head.split_at(8);
        for (base, word) in [(0, w0), (8, w1)] {
            let stop = stop_mask(u64::from_le_bytes(word.try_into().expect("eight bytes")));
            if stop != 0 {
                // The lowest flagged byte is exact (a borrow only runs towards higher bytes).
                let at = base + stop.trailing_zeros() as usize / 8;
                return if head[at] < 0x20 { Err(Error) } else { Ok(at) };
            }
        }
        let tail = &rest[SHORT..];
        let n = memchr::memchr2(b'"', b'\\', tail).ok_or(Error)?;
        // One pass the compiler vectorizes.
        if tail[..n].iter().fold(u8::MAX, |low, &b| low.min(b)) < 0x20 {
            return Err(Error);
        }
        Ok(SHORT + n)
    }

    /// Counts a string's characters and CJK characters as the unescaped text has them; the
    /// position is just past its opening quote.
    ///
    /// The characters are the bytes that are no UTF-8 continuation byte, and only a byte of
    /// `0xE0` or more (the lead of a three- or four-byte sequence, where every CJK character
    /// is) is decoded. The text up to the next `"` or `\\` is looked at eight bytes at a time in
    /// a word for its first sixteen bytes (text dense with `\\n` and `\\"` has short runs), then
    /// found with `memchr` and counted in one pass the compiler vectorizes. An escape counts
    /// as the one character it stands for.
    fn count_string(&mut self) -> Result<(u64, u64), Error> {
        const HIGH: u64 = (u64::MAX / 255) << 7;
        let body = self.bytes();
        let (mut chars, mut cjk) = (0u64, 0u64);
        let mut pos = self.pos;
        loop {
            // The first sixteen bytes of the run, a word at a time.
            let mut stopped = false;
            for _ in 0..SHORT / 8 {
                let Some(chunk) = body.get(pos..pos + 8) else {
                    break;
                };
                let word = u64::from_le_bytes(chunk.try_into().expect("eight bytes"));
                let stop = stop_mask(word);
                // The bytes before the first stop byte (exact: see `stop_mask`).
                let upto = if stop == 0 {
                    8
                } else {
                    stop.trailing_zeros() as usize / 8
                };
                let w = if upto == 8 {
                    word
                } else {
                    word & ((1u64 << (upto * 8)) - 1)
                };
                let high = w & HIGH;
                if high == 0 {
                    chars += upto as u64;
                } else {
                    // Continuation bytes: bit 7 set, bit 6 clear.
                    let continuation = high & !(w << 1);
                    chars += upto as u64 - u64::from(continuation.count_ones());
                    // Leads of three- and four-byte sequences: bits 7, 6 and 5 set.
                    let mut long = high & (w << 1) & (w << 2);
                    while long != 0 {
                        let at = pos + long.trailing_zeros() as usize / 8;
                        cjk += u64::from(crate::request::is_cjk_point(decode_long(body, at)));
                        long &= long - 1;
                    }
                }
                pos += upto;
                if upto < 8 {
                    stopped = true;
                    break;
                }
            }
            if !stopped {
                // A longer run (or the body's last bytes): its end by `memchr`.
                let rest = &body[pos..];
                let n = memchr::memchr2(b'"', b'\\', rest).ok_or(Error)?;
                let (c, k) = count_run(body, pos, n)?;
                chars += c;
                cjk += k;
                pos += n;
            }
            match body[pos] {
                b'"' => {
                    self.pos = pos + 1;
                    return Ok((chars, cjk));
                }
                b'\\' => {
                    self.pos = pos + 1;
                    let c = self.escape()?;
                    chars += 1;
                    cjk += u64::from(crate::request::is_cjk_point(u32::from(c)));
                    pos = self.pos;
                }
                _ => return Err(Error),
            }
        }
    }

    /// Reads a string; the position is just past its opening quote.
    #[inline]
    fn string(&mut self) -> Result<Str<'de>, Error> {
        let start = self.pos;
        let n = self.run()?;
        self.pos += n;
        if self.bytes()[self.pos] == b'"' {
            self.pos += 1;
            return Ok(Str::Borrowed(&self.text[start..self.pos - 1]));
        }
        self.scratch.clear();
        self.scratch.push_str(&self.text[start..self.pos]);
        loop {
            // At a backslash.
            self.pos += 1;
            let c = self.escape()?;
            self.scratch.push(c);
            let from = self.pos;
            let n = self.run()?;
            self.pos += n;
            self.scratch.push_str(&self.text[from..self.pos]);
            if self.bytes()[self.pos] == b'"' {
                self.pos += 1;
                return Ok(Str::Scratch);
            }
        }
    }

    /// Skips a string; the position is just past its opening quote. Escapes are checked as
    /// serde_json checks a string it skips (a `\u` needs four hex digits, nothing more).
    fn skip_string(&mut self) -> Result<(), Error> {
        loop {
            let n = self.run()?;
            self.pos += n;
            let at = self.bytes()[self.pos];
            self.pos += 1;
            if at == b'"' {
                return Ok(());
            }
            match self.bytes().get(self.pos) {
                Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => self.pos += 1,
                Some(b'u') => {
                    self.pos += 1;
                    self.hex4()?;
                }
                _ => return Err(Error),
            }
        }
    }

    fn hex4(&mut self) -> Result<u16, Error> {
        let digits = self.bytes().get(self.pos..self.pos + 4).ok_or(Error)?;
        let mut v = 0u16;
        for &d in digits {
            let n = match d {
                b'0'..=b'9' => d - b'0',
                b'a'..=b'f' => d - b'a' + 10,
                b'A'..=b'F' => d - b'A' + 10,
                _ => return Err(Error),
            };
            v = (v << 4) | u16::from(n);
        }
        self.pos += 4;
        Ok(v)
    }

    /// Decodes the escape after a backslash.
    fn escape(&mut self) -> Result<char, Error> {
        let b = *self.bytes().get(self.pos).ok_or(Error)?;
        self.pos += 1;
        Ok(match b {
            b'"' => '"',
            b'\\' => '\\',
            b'/' => '/',
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => {
                let hi = self.hex4()?;
                let point = match hi {
                    0xD800..=0xDBFF => {
                        if self.bytes().get(self.pos..self.pos + 2) != Some(b"\\u") {
                            return Err(Error);
                        }
                        self.pos += 2;
                        let lo = self.hex4()?;
                        if !(0xDC00..=0xDFFF).contains(&lo) {
                            return Err(Error);
                        }
                        0x10000 + ((u32::from(hi) - 0xD800) << 10) + (u32::from(lo) - 0xDC00)
                    }
                    0xDC00..=0xDFFF => return Err(Error),
                    _ => u32::from(hi),
                };
                char::from_u32(point).ok_or(Error)?
            }
            _ => return Err(Error),
        })
    }

    /// Scans a number's grammar; returns whether it is an integer (no fraction, no exponent).
    fn scan_number(&mut self) -> Result<bool, Error> {
        let b = self.bytes();
        let digits = |pos: &mut usize| {
            let from = *pos;
            while b.get(*pos).is_some_and(u8::is_ascii_digit) {
                *pos += 1;
            }
            *pos - from
        };
        let mut pos = self.pos;
        if b.get(pos) == Some(&b'-') {
            pos += 1;
        }
        match b.get(pos) {
            Some(b'0') => pos += 1,
            Some(b'1'..=b'9') => {
                digits(&mut pos);
            }
            _ => return Err(Error),
        }
        let mut integer = true;
        if b.get(pos) == Some(&b'.') {
            pos += 1;
            integer = false;
            if digits(&mut pos) == 0 {
                return Err(Error);
            }
        }
        if matches!(b.get(pos), Some(b'e' | b'E')) {
            pos += 1;
            integer = false;
            if matches!(b.get(pos), Some(b'+' | b'-')) {
                pos += 1;
            }
            if digits(&mut pos) == 0 {
                return Err(Error);
            }
        }
        self.pos = pos;
        Ok(integer)
    }

    /// Reads a number as serde_json classifies it: a non-negative integer that fits is `u64`,
    /// a negative one that fits is `i64` (`-0` is `-0.0`), anything else `f64`.
    fn number(&mut self) -> Result<Number, Error> {
        let start = self.pos;
        let integer = self.scan_number()?;
        let s = &self.text[start..self.pos];
        if integer {
            let (neg, digits) = match s.strip_prefix('-') {
                Some(d) => (true, d),
                None => (false, s),
            };
            let mut v: u64 = 0;
            let mut fits = true;
            for d in digits.bytes() {
                match v
                    .checked_mul(10)
                    .and_then(|v| v.checked_add(u64::from(d - b'0')))
                {
                    Some(n) => v = n,
                    None => {
                        fits = false;
                        break;
                    }
                }
            }
            if fits {
                if !neg {
                    return Ok(Number::U(v));
                }
                if v != 0 && v <= 1 << 63 {
                    return Ok(Number::I((v as i64).wrapping_neg()));
                }
                if v == 0 {
                    return Ok(Number::F(-0.0));
                }
            }
        }
        // serde_json's own float reading, so a value is the same to the last bit (its default
        // reading is not always the nearest double); out of range is an error there too.
        serde_json::from_str::<f64>(s)
            .map(Number::F)
            .map_err(|_| Error)
    }

    fn literal(&mut self, word: &[u8]) -> Result<(), Error> {
        if self.bytes().get(self.pos..self.pos + word.len()) == Some(word) {
            self.pos += word.len();
            Ok(())
        } else {
            Err(Error)
        }
    }

    /// Skips one value.
    fn skip(&mut self) -> Result<(), Error> {
        match self.ws().ok_or(Error)? {
            b'"' => {
                self.pos += 1;
                self.skip_string()
            }
            b'{' => {
                self.pos += 1;
                self.enter()?;
                if self.ws() == Some(b'}') {
                    self.pos += 1;
                } else {
                    loop {
                        self.expect(b'"')?;
                        self.skip_string()?;
                        self.expect(b':')?;
                        self.skip()?;
                        match self.ws() {
                            Some(b',') => self.pos += 1,
                            Some(b'}') => {
                                self.pos += 1;
                                break;
                            }
                            _ => return Err(Error),
                        }
                    }
                }
                self.depth -= 1;
                Ok(())
            }
            b'[' => {
                self.pos += 1;
                self.enter()?;
                if self.ws() == Some(b']') {
                    self.pos += 1;
                } else {
                    loop {
                        self.skip()?;
                        match self.ws() {
                            Some(b',') => self.pos += 1,
                            Some(b']') => {
                                self.pos += 1;
                                break;
                            }
                            _ => return Err(Error),
                        }
                    }
                }
                self.depth -= 1;
                Ok(())
            }
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            _ => self.scan_number().map(|_| ()),
        }
    }
}

impl<'de> de::Deserializer<'de> for &mut Deserializer<'de> {
    type Error = Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self.ws().ok_or(Error)? {
            b'"' => {
                self.pos += 1;
                match self.string()? {
                    Str::Borrowed(s) => visitor.visit_borrowed_str(s),
                    Str::Scratch => visitor.visit_str(&self.scratch),
                }
            }
            b'{' => {
                self.pos += 1;
                self.enter()?;
                let value = visitor.visit_map(Map {
                    de: &mut *self,
                    first: true,
                })?;
                self.expect(b'}')?;
                self.depth -= 1;
                Ok(value)
            }
            b'[' => {
                self.pos += 1;
                self.enter()?;
                let value = visitor.visit_seq(Seq {
                    de: &mut *self,
                    first: true,
                })?;
                self.expect(b']')?;
                self.depth -= 1;
                Ok(value)
            }
            b't' => {
                self.literal(b"true")?;
                visitor.visit_bool(true)
            }
            b'f' => {
                self.literal(b"false")?;
                visitor.visit_bool(false)
            }
            b'n' => {
                self.literal(b"null")?;
                visitor.visit_unit()
            }
            _ => match self.number()? {
                Number::U(n) => visitor.visit_u64(n),
                Number::I(n) => visitor.visit_i64(n),
                Number::F(n) => visitor.visit_f64(n),
            },
        }
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.skip()?;
        visitor.visit_unit()
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        if self.ws() == Some(b'n') {
            self.literal(b"null")?;
            visitor.visit_none()
        } else {
            visitor.visit_some(self)
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Error> {
        if name != COUNTED {
            return visitor.visit_newtype_struct(self);
        }
        if self.count && self.ws() == Some(b'"') {
            self.pos += 1;
            let (chars, cjk) = self.count_string()?;
            return visitor.visit_u128(u128::from(crate::request::char_tokens(chars, cjk)));
        }
        self.deserialize_any(visitor)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        unit unit_struct seq tuple tuple_struct map struct enum identifier
    }
}

/// The entries of an object.
struct Map<'a, 'de> {
    de: &'a mut Deserializer<'de>,
    first: bool,
}

impl<'de> MapAccess<'de> for Map<'_, 'de> {
    type Error = Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Error> {
        match self.de.ws() {
            Some(b'}') => return Ok(None),
            Some(b',') if !self.first => {
                self.de.pos += 1;
                if self.de.ws() != Some(b'"') {
                    return Err(Error);
                }
            }
            Some(b'"') if self.first => {}
            _ => return Err(Error),
        }
        self.first = false;
        self.de.pos += 1;
        let key = seed.deserialize(Key { de: &mut *self.de })?;
        self.de.expect(b':')?;
        Ok(Some(key))
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Error> {
        seed.deserialize(&mut *self.de)
    }
}

/// The elements of an array.
struct Seq<'a, 'de> {
    de: &'a mut Deserializer<'de>,
    first: bool,
}

impl<'de> SeqAccess<'de> for Seq<'_, 'de> {
    type Error = Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Error> {
        match self.de.ws() {
            Some(b']') => return Ok(None),
            Some(b',') if !self.first => {
                self.de.pos += 1;
                if self.de.ws() == Some(b']') {
                    return Err(Error);
                }
            }
            Some(_) if self.first => {}
            _ => return Err(Error),
        }
        self.first = false;
        seed.deserialize(&mut *self.de).map(Some)
    }
}

/// An object key: the position is just past its opening quote.
struct Key<'a, 'de> {
    de: &'a mut Deserializer<'de>,
}

impl<'de> de::Deserializer<'de> for Key<'_, 'de> {
    type Error = Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self.de.string()? {
            Str::Borrowed(s) => visitor.visit_borrowed_str(s),
            Str::Scratch => visitor.visit_str(&self.de.scratch),
        }
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.de.skip_string()?;
        visitor.visit_unit()
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map struct enum identifier
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;
    use serde_json::Value;

    use super::*;

    /// The value this reader builds, through `Value`'s own `Deserialize`.
    fn fast(text: &str) -> Result<Value, Error> {
        let mut de = Deserializer {
            text,
            pos: 0,
            scratch: String::new(),
            depth: 0,
            count: false,
        };
        let v = Value::deserialize(&mut de)?;
        de.ws();
        if de.pos == text.len() {
            Ok(v)
        } else {
            Err(Error)
        }
    }

    /// The reader agrees with serde_json: the same value when both accept, and nothing
    /// serde_json refuses is accepted.
    fn agrees(text: &str) {
        let reference = serde_json::from_str::<Value>(text);
        match (fast(text), reference) {
            (Ok(a), Ok(b)) => assert_eq!(a, b, "{text:?}"),
            (Ok(a), Err(e)) => panic!("accepted {text:?} as {a} where serde_json says {e}"),
            (Err(_), _) => {}
        }
    }

    /// What this reader must accept (no stricter than serde_json on these).
    fn accepts(text: &str) {
        agrees(text);
        assert!(fast(text).is_ok(), "refused {text:?}");
    }

    #[test]
    fn valid_documents_read_as_serde_json_reads_them() {
        for text in [
            "{}",
            "[]",
            " { } ",
            r#"{"a":1,"b":[true,false,null],"c":{"d":"e"}}"#,
            r#"{"s":"plain","e":"\n\t\"\\\/\b\f\r","u":"\u00e9\u4e2d\ud83d\ude00"}"#,
            r#"["déjà", "中文", "😀", ""]"#,
            "[0, -0, 1, -1, 18446744073709551615, 18446744073709551616, -9223372036854775808, -9223372036854775809]",
            "[1.5, -2.25e3, 1E-7, 0.0, 1e308, 123456789012345678901234567890]",
            "\"top\"",
            "42",
            "null",
            "{\"a\" : [ 1 , 2 ] , \"b\" : { } }",
        ] {
            accepts(text);
        }
    }

    #[test]
    fn invalid_documents_are_refused() {
        for text in [
            "",
            "{",
            "}",
            "[1,]",
            "{\"a\":1,}",
            "{,}",
            "[,1]",
            "{\"a\" 1}",
            "{\"a\":}",
            "{1:2}",
            "\"unterminated",
            "\"bad \\x escape\"",
            "\"bad \\u12g4\"",
            "\"ctrl \u{1} char\"",
            "01",
            "1.",
            ".5",
            "-",
            "1e",
            "1e+",
            "tru",
            "nul",
            "[1] 2",
            "1e400",
            "\"\\ud800\"",
            "\"\\udc00 x\"",
        ] {
            assert!(fast(text).is_err(), "accepted {text:?}");
            agrees(text);
        }
    }

    /// A counted string counts what the estimate of its unescaped text counts.
    fn counted(json: &str) -> Option<(u64, u64)> {
        let mut de = Deserializer {
            text: json,
            pos: 1,
            scratch: String::new(),
            depth: 0,
            count: true,
        };
        let counts = de.count_string().ok()?;
        (de.pos == json.len()).then_some(counts)
    }

    #[test]
    fn counted_strings_count_as_their_unescaped_text() {
        let mut rng = fastrand::Rng::with_seed(11);
        const PIECES: [&str; 14] = [
            "a",
            "plain words ",
            "é",
            "中",
            "テキスト",
            "😀",
            r"\n",
            r#"\""#,
            r"\\",
            r"\u4e2d",
            r"\ud83d\ude00",
            r"\u00e9",
            "한국어",
            r"\t",
        ];
        for _ in 0..5_000 {
            let mut json = String::from("\"");
            for _ in 0..rng.usize(..40) {
                json.push_str(PIECES[rng.usize(..PIECES.len())]);
            }
            json.push('"');
            // Sometimes the string ends the body, sometimes more follows.
            let text: String = serde_json::from_str(&json).unwrap();
            let want = crate::request::char_counts(&text);
            assert_eq!(counted(&json), Some(want), "{json}");
            let mut longer = json.clone();
            longer.push_str(", \"next\": 1}");
            let mut de = Deserializer {
                text: &longer,
                pos: 1,
                scratch: String::new(),
                depth: 0,
                count: true,
            };
            assert_eq!(de.count_string().ok(), Some(want), "{longer}");
            assert_eq!(de.pos, json.len());
        }
        for bad in [
            "\"open",
            "\"ctrl \u{1}\"",
            "\"bad \\x\"",
            "\"lone \\ud800\"",
            "\"a",
        ] {
            assert_eq!(counted(bad), None, "{bad}");
        }
    }

    #[test]
    fn nesting_beyond_the_limit_is_refused() {
        let deep = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        assert!(fast(&deep(128)).is_ok());
        assert!(fast(&deep(129)).is_err());
    }

    #[test]
    fn skipped_values_are_checked_as_serde_json_checks_them() {
        // Through `IgnoredAny`, every value skipped.
        let skips = |text: &str| visit_str(text, false, de::IgnoredAny).is_ok();
        for text in [
            r#"{"a":[1,{"b":"c\n"}],"d":-1.5e3,"e":"\ud800"}"#,
            "[true,false,null,\"x\"]",
        ] {
            assert!(skips(text), "{text}");
            assert!(serde_json::from_str::<de::IgnoredAny>(text).is_ok());
        }
        for text in ["[1,]", "{\"a\"}", "\"\\q\"", "[01]", "[\"\u{1f}\"]"] {
            assert!(!skips(text), "{text}");
            assert!(
                serde_json::from_str::<de::IgnoredAny>(text).is_err(),
                "{text}"
            );
        }
    }

    /// Generated documents: valid ones, and the same with one byte changed.
    #[test]
    fn generated_documents_agree_with_serde_json() {
        let mut rng = fastrand::Rng::with_seed(7);
        fn value(rng: &mut fastrand::Rng, depth: u32, out: &mut String) {
            const STRS: [&str; 8] = [
                "plain",
                "with \\\"quotes\\\"",
                "line\\nbreak",
                "\\u00e9t\\u00e9",
                "中文テキスト",
                "\\ud83d\\ude00 emoji",
                "tab\\there",
                "",
            ];
            match rng.u8(..if depth > 4 { 5 } else { 7 }) {
                0 => out.push_str("null"),
                1 => out.push_str(if rng.bool() { "true" } else { "false" }),
                2 => out.push_str(&rng.i64(..).to_string()),
                3 => out.push_str(&format!("{:e}", rng.f64() * 1e6)),
                4 => {
                    out.push('"');
                    out.push_str(STRS[rng.usize(..STRS.len())]);
                    out.push('"');
                }
                5 => {
                    out.push('[');
                    for i in 0..rng.usize(..4) {
                        if i > 0 {
                            out.push_str(if rng.bool() { "," } else { " , " });
                        }
                        value(rng, depth + 1, out);
                    }
                    out.push(']');
                }
                _ => {
                    out.push('{');
                    for i in 0..rng.usize(..4) {
                        if i > 0 {
                            out.push(',');
                        }
                        out.push_str(&format!("\"k{}\":", rng.u8(..6)));
                        value(rng, depth + 1, out);
                    }
                    out.push('}');
                }
            }
        }
        const NOISE: &[u8] = b"{}[]\",:\\ 0-.eE+tnu\n\x01a";
        for _ in 0..20_000 {
            let mut text = String::new();
            value(&mut rng, 0, &mut text);
            accepts(&text);
            let mut bytes = text.into_bytes();
            if !bytes.is_empty() {
                let i = rng.usize(..bytes.len());
                if bytes[i].is_ascii() {
                    bytes[i] = NOISE[rng.usize(..NOISE.len())];
                }
            }
            if let Ok(text) = String::from_utf8(bytes) {
                agrees(&text);
            }
        }
    }
}
