//! The routing key of `PREFIX_AWARE`: the first `prefix_length` characters of what the model
//! will see first, hashed. For OpenAI chat requests that is the conversation (`role: content`
//! per message, in order), for completions the `prompt`, and for anything that is not JSON the
//! raw body. Requests that share that prefix share a key, so every worker and every Envoy replica
//! sends them to the same endpoint, whose KV cache already holds the prefix.
//!
//! The body arrives in chunks. [`KeyScanner`] is a resumable JSON scanner: it reads each byte
//! once, keeps no copy of the body, stops as soon as the key is complete (a 1 MB body whose
//! `messages` come first is read for a few kilobytes), and finds `messages` wherever it is in the
//! object, because clients put `model`, `stream` and `temperature` anywhere.

use std::fmt;

/// Bytes of body the scanner reads at most before giving up on finding the key: the filter
/// holds the request while it reads, so this must stay well under Envoy's per-stream buffer
/// limit (1 MiB by default), past which Envoy would answer 413 itself.
pub const MAX_SCAN_BYTES: usize = 256 * 1024;

pub const DEFAULT_PREFIX_LENGTH: usize = 4_096;
pub const MIN_PREFIX_LENGTH: usize = 1_024;
pub const MAX_PREFIX_LENGTH: usize = 65_536;
pub const DEFAULT_CONCURRENCY_THRESHOLD: u32 = 8;
pub const MAX_CONCURRENCY_THRESHOLD: u32 = 1_024;

/// Why a request is routed by least outstanding requests instead of by its prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoKey {
    /// No body at all (a GET, or an empty POST).
    NoBody,
    /// The body ended inside the JSON document, or the document is not well-formed where the
    /// key was being read.
    Truncated,
    /// The key was not complete within [`MAX_SCAN_BYTES`].
    ScanLimit,
}

impl NoKey {
    pub const ALL: [NoKey; 3] = [Self::NoBody, Self::Truncated, Self::ScanLimit];

    pub fn name(self) -> &'static str {
        match self {
            Self::NoBody => "no_body",
            Self::Truncated => "truncated",
            Self::ScanLimit => "scan_limit",
        }
    }
}

/// Where a key came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySource {
    Messages,
    Prompt,
    /// Not JSON, or JSON without `messages` or `prompt`: the first bytes of the body.
    RawBody,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key {
    pub hash: u64,
    pub source: KeySource,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scan {
    NeedMore,
    Done(Result<Key, NoKey>),
}

/// FNV-1a, then a finalizer: cheap to feed byte by byte, well mixed for rendezvous hashing.
#[derive(Debug, Clone, Copy)]
struct KeyHash(u64);

impl KeyHash {
    const START: Self = Self(0xcbf2_9ce4_8422_2325);

    fn byte(&mut self, b: u8) {
        self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }

    fn finish(self) -> u64 {
        mix(self.0)
    }
}

/// SplitMix64's finalizer.
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A stable hash of an endpoint address, the same in every replica.
pub fn endpoint_hash(address: &str) -> u64 {
    let mut hash = KeyHash::START;
    for &b in address.as_bytes() {
        hash.byte(b);
    }
    hash.finish()
}

/// The rendezvous score of `endpoint` for `key`: the highest score is the key's endpoint.
pub fn score(key: u64, endpoint: u64) -> u64 {
    mix(key ^ endpoint.rotate_left(17))
}

/// Collects the key text (as a hash) with a budget of characters.
#[derive(Debug, Clone)]
struct KeyText {
    hash: KeyHash,
    chars_left: usize,
}

impl KeyText {
    fn new(chars: usize) -> Self {
        Self {
            hash: KeyHash::START,
            chars_left: chars,
        }
    }

    fn full(&self) -> bool {
        self.chars_left == 0
    }

    fn push_char(&mut self, c: char) {
        if self.chars_left == 0 {
            return;
        }
        self.chars_left -= 1;
        let mut utf8 = [0u8; 4];
        for &b in c.encode_utf8(&mut utf8).as_bytes() {
            self.hash.byte(b);
        }
    }

    fn push_str(&mut self, text: &str) {
        for c in text.chars() {
            if self.full() {
                return;
            }
            self.push_char(c);
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Container {
    Object,
    Array,
}

/// Where in the document the scanner is, as far as the key is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    /// Anything the key does not depend on.
    Elsewhere,
    /// The top-level object.
    Top,
    /// The `messages` array.
    Messages,
    /// One message object.
    Message,
    /// A message's `content` array of parts.
    Parts,
    /// One part object (`{"type": "text", "text": ...}`).
    Part,
    /// A part's `image_url` object.
    ImageUrl,
    /// The `prompt` array (strings or token ids).
    PromptList,
}

/// What a string being read is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StringRole {
    /// An object key, compared against the few names that matter.
    Key,
    /// A value the key ignores.
    Skipped,
    Role,
    /// Text that goes into the current message's content.
    Content,
    /// Text that goes straight into the key (`prompt`).
    Prompt,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lex {
    /// Between tokens.
    Between,
    InString {
        escape: Escape,
    },
    /// A number or a literal (`true`, `null`): its characters up to a delimiter.
    InScalar,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Escape {
    None,
    Backslash,
    /// `\u` and the hex digits so far.
    Unicode {
        value: u32,
        digits: u8,
    },
}

const MAX_DEPTH: usize = 64;
const MAX_ROLE_CHARS: usize = 32;
const MAX_KEY_NAME: usize = 16;

/// A resumable scanner over the chunks of one request body.
#[derive(Debug, Clone)]
pub struct KeyScanner {
    scanned: usize,
    started: bool,
    raw: Option<KeyText>,
    /// Until the body turns out to be JSON (or not), the first bytes are hashed as a raw key
    /// too, for a JSON body without `messages` or `prompt`.
    raw_fallback: KeyText,
    text: KeyText,
    source: Option<KeySource>,
    lex: Lex,
    /// Containers open, with the place each stands for.
    stack: Vec<(Container, Place)>,
    /// In an object: whether the next string is a key.
    expect_key: bool,
    /// The last key read in the innermost object (truncated; only short names matter).
    key: [u8; MAX_KEY_NAME],
    key_len: usize,
    key_overflow: bool,
    string_role: StringRole,
    /// A UTF-16 high surrogate waiting for its low half.
    high_surrogate: Option<u32>,
    /// The UTF-8 bytes of a character split across chunks or escapes.
    utf8: [u8; 4],
    utf8_len: usize,
    utf8_need: usize,
    /// The current message: its role, and its content until the role is known. Once the role
    /// is known when the content starts (the usual order), content goes straight into the key,
    /// so one huge message completes the key after `prefix_length` characters.
    role: String,
    role_known: bool,
    streaming: bool,
    content: String,
    content_chars: usize,
    /// The current part carries an `image_url` (its URL is followed by a line break).
    part_is_image: bool,
    /// The value just closed at the current depth completes the key (the `messages` array or
    /// the `prompt` ended).
    finished: bool,
    /// A scalar inside the prompt list (a token id) being copied into the key.
    scalar_into_prompt: bool,
}

impl KeyScanner {
    pub fn new(prefix_length: usize) -> Self {
        Self {
            scanned: 0,
            started: false,
            raw: None,
            raw_fallback: KeyText::new(prefix_length),
            text: KeyText::new(prefix_length),
            source: None,
            lex: Lex::Between,
            stack: Vec::new(),
            expect_key: false,
            key: [0; MAX_KEY_NAME],
            key_len: 0,
            key_overflow: false,
            string_role: StringRole::Skipped,
            high_surrogate: None,
            utf8: [0; 4],
            utf8_len: 0,
            utf8_need: 0,
            role: String::new(),
            role_known: false,
            streaming: false,
            content: String::new(),
            content_chars: 0,
            part_is_image: false,
            finished: false,
            scalar_into_prompt: false,
        }
    }

    /// Body bytes read so far.
    pub fn scanned(&self) -> usize {
        self.scanned
    }

    /// How many more bytes the scanner may read before it gives up.
    pub fn budget(&self) -> usize {
        MAX_SCAN_BYTES.saturating_sub(self.scanned)
    }

    /// Feeds the next chunk. Stops reading at the first byte that completes the key.
    pub fn feed(&mut self, chunk: &[u8]) -> Scan {
        for &b in chunk.iter().take(self.budget()) {
            self.scanned += 1;
            if let Some(done) = self.byte(b) {
                return Scan::Done(done);
            }
        }
        if self.budget() == 0 {
            return Scan::Done(Err(NoKey::ScanLimit));
        }
        Scan::NeedMore
    }

    /// The body ended: the key as far as it goes.
    pub fn finish(&mut self) -> Result<Key, NoKey> {
        if !self.started {
            return Err(NoKey::NoBody);
        }
        if let Some(raw) = &self.raw {
            return Ok(Key {
                hash: raw.hash.finish(),
                source: KeySource::RawBody,
            });
        }
        if self.stack.is_empty() && !matches!(self.lex, Lex::InString { .. }) {
            // A complete document without `messages` or `prompt`: its first bytes.
            return Ok(self.raw_key());
        }
        Err(NoKey::Truncated)
    }

    fn raw_key(&self) -> Key {
        Key {
            hash: self.raw_fallback.hash.finish(),
            source: KeySource::RawBody,
        }
    }

    fn done(&self) -> Result<Key, NoKey> {
        Ok(Key {
            hash: self.text.hash.finish(),
            source: self.source.unwrap_or(KeySource::RawBody),
        })
    }

    /// One byte; `Some` once the outcome is known.
    fn byte(&mut self, b: u8) -> Option<Result<Key, NoKey>> {
        if let Some(raw) = &mut self.raw {
            raw.hash.byte(b);
            raw.chars_left -= 1;
            return raw.full().then(|| {
                Ok(Key {
                    hash: raw.hash.finish(),
                    source: KeySource::RawBody,
                })
            });
        }
        if !self.raw_fallback.full() {
            self.raw_fallback.hash.byte(b);
            self.raw_fallback.chars_left -= 1;
        }
        if !self.started {
            if b.is_ascii_whitespace() {
                return None;
            }
            self.started = true;
            if b != b'{' {
                // Not a JSON object: the raw body is the key, leading whitespace included.
                let raw = self.raw_fallback.clone();
                let complete = raw.full();
                let key = Key {
                    hash: raw.hash.finish(),
                    source: KeySource::RawBody,
                };
                self.raw = Some(raw);
                return complete.then_some(Ok(key));
            }
        }
        let result = match self.lex {
            Lex::InString { escape } => self.string_byte(b, escape),
            Lex::InScalar => {
                if b == b',' || b == b'}' || b == b']' || b.is_ascii_whitespace() {
                    self.lex = Lex::Between;
                    if self.scalar_into_prompt {
                        self.scalar_into_prompt = false;
                        self.text.push_char(',');
                    }
                    self.between(b)
                } else {
                    if self.scalar_into_prompt {
                        self.text.push_char(char::from(b));
                    }
                    Ok(())
                }
            }
            Lex::Between => self.between(b),
        };
        match result {
            Err(()) => Some(Err(NoKey::Truncated)),
            Ok(()) if self.finished || self.text.full() => Some(self.done()),
            Ok(()) => None,
        }
    }

    fn place(&self) -> Place {
        self.stack.last().map_or(Place::Elsewhere, |&(_, p)| p)
    }

    fn key_is(&self, name: &str) -> bool {
        !self.key_overflow && &self.key[..self.key_len] == name.as_bytes()
    }

    fn between(&mut self, b: u8) -> Result<(), ()> {
        match b {
            b' ' | b'\t' | b'\n' | b'\r' | b':' => Ok(()),
            b',' => {
                if matches!(self.stack.last(), Some((Container::Object, _))) {
                    self.expect_key = true;
                }
                Ok(())
            }
            b'{' => self.open(Container::Object),
            b'[' => self.open(Container::Array),
            b'}' | b']' => self.close(if b == b'}' {
                Container::Object
            } else {
                Container::Array
            }),
            b'"' => {
                self.string_role = self.role_of_next_string();
                if self.string_role == StringRole::Key {
                    self.key_len = 0;
                    self.key_overflow = false;
                }
                self.lex = Lex::InString {
                    escape: Escape::None,
                };
                Ok(())
            }
            _ => {
                if self.stack.is_empty() {
                    return Err(()); // trailing garbage after the document
                }
                self.scalar_into_prompt = self.place() == Place::PromptList;
                self.lex = Lex::InScalar;
                if self.scalar_into_prompt {
                    self.text.push_char(char::from(b));
                }
                Ok(())
            }
        }
    }

    /// What a string opening here is, from where the scanner stands.
    fn role_of_next_string(&mut self) -> StringRole {
        let in_object = matches!(self.stack.last(), Some((Container::Object, _)));
        if in_object && self.expect_key {
            self.expect_key = false;
            return StringRole::Key;
        }
        match self.place() {
            Place::Top if self.key_is("prompt") => {
                self.source = Some(KeySource::Prompt);
                StringRole::Prompt
            }
            Place::PromptList => StringRole::Prompt,
            Place::Message if self.key_is("role") => {
                self.role.clear();
                StringRole::Role
            }
            Place::Message if self.key_is("content") => {
                self.start_content();
                StringRole::Content
            }
            Place::Part if self.key_is("text") => StringRole::Content,
            Place::ImageUrl if self.key_is("url") => StringRole::Content,
            _ => StringRole::Skipped,
        }
    }

    fn open(&mut self, container: Container) -> Result<(), ()> {
        if self.stack.len() >= MAX_DEPTH {
            return Err(());
        }
        let parent = self.place();
        let in_object = matches!(self.stack.last(), Some((Container::Object, _)));
        if in_object && self.expect_key {
            return Err(()); // a container where a key belongs
        }
        let place = match (parent, container) {
            (Place::Elsewhere, Container::Object) if self.stack.is_empty() => Place::Top,
            (Place::Top, Container::Array) if self.key_is("messages") => {
                self.source = Some(KeySource::Messages);
                Place::Messages
            }
            (Place::Top, Container::Array) if self.key_is("prompt") => {
                self.source = Some(KeySource::Prompt);
                Place::PromptList
            }
            (Place::Messages, Container::Object) => {
                self.role.clear();
                self.role_known = false;
                self.streaming = false;
                self.content.clear();
                self.content_chars = 0;
                Place::Message
            }
            (Place::Message, Container::Array) if self.key_is("content") => {
                self.start_content();
                Place::Parts
            }
            (Place::Parts, Container::Object) => {
                self.part_is_image = false;
                Place::Part
            }
            (Place::Part, Container::Object) if self.key_is("image_url") => {
                self.part_is_image = true;
                Place::ImageUrl
            }
            _ => Place::Elsewhere,
        };
        self.stack.push((container, place));
        self.expect_key = container == Container::Object;
        Ok(())
    }

    fn close(&mut self, container: Container) -> Result<(), ()> {
        let Some((open, place)) = self.stack.pop() else {
            return Err(());
        };
        if open != container {
            return Err(());
        }
        match place {
            Place::Message => {
                // "role: content\n", the role known now whatever the field order was.
                if !self.streaming {
                    let role = std::mem::take(&mut self.role);
                    let content = std::mem::take(&mut self.content);
                    self.text.push_str(&role);
                    self.text.push_str(": ");
                    self.text.push_str(&content);
                }
                self.text.push_char('\n');
                self.streaming = false;
            }
            Place::Part if self.part_is_image => self.append_content("\n"),
            Place::Messages | Place::PromptList => self.finished = true,
            // The document ended without messages or prompt: the raw body is the key.
            Place::Top if self.source.is_none() => {
                self.text = self.raw_fallback.clone();
                self.source = Some(KeySource::RawBody);
                self.finished = true;
            }
            _ => {}
        }
        Ok(())
    }

    /// Content starts: with the role already known, it goes straight into the key.
    fn start_content(&mut self) {
        if self.role_known && !self.streaming {
            self.streaming = true;
            let role = std::mem::take(&mut self.role);
            self.text.push_str(&role);
            self.text.push_str(": ");
        }
    }

    fn append_content(&mut self, text: &str) {
        for c in text.chars() {
            self.content_char(c);
        }
    }

    /// Content is held per message until the message ends (its role may come later), but
    /// never more than the key can still take.
    fn content_char(&mut self, c: char) {
        if self.streaming {
            self.text.push_char(c);
        } else if self.content_chars < self.text.chars_left {
            self.content.push(c);
            self.content_chars += 1;
        }
    }

    fn string_byte(&mut self, b: u8, escape: Escape) -> Result<(), ()> {
        match escape {
            Escape::None => match b {
                b'"' => {
                    self.lex = Lex::Between;
                    self.end_string();
                    Ok(())
                }
                b'\\' => {
                    self.lex = Lex::InString {
                        escape: Escape::Backslash,
                    };
                    Ok(())
                }
                _ => {
                    self.string_utf8_byte(b);
                    Ok(())
                }
            },
            Escape::Backslash => {
                let decoded = match b {
                    b'"' => '"',
                    b'\\' => '\\',
                    b'/' => '/',
                    b'b' => '\u{8}',
                    b'f' => '\u{c}',
                    b'n' => '\n',
                    b'r' => '\r',
                    b't' => '\t',
                    b'u' => {
                        self.lex = Lex::InString {
                            escape: Escape::Unicode {
                                value: 0,
                                digits: 0,
                            },
                        };
                        return Ok(());
                    }
                    _ => return Err(()),
                };
                self.lex = Lex::InString {
                    escape: Escape::None,
                };
                self.string_char(decoded);
                Ok(())
            }
            Escape::Unicode { value, digits } => {
                let digit = char::from(b).to_digit(16).ok_or(())?;
                let value = value * 16 + digit;
                if digits < 3 {
                    self.lex = Lex::InString {
                        escape: Escape::Unicode {
                            value,
                            digits: digits + 1,
                        },
                    };
                    return Ok(());
                }
                self.lex = Lex::InString {
                    escape: Escape::None,
                };
                match (self.high_surrogate.take(), value) {
                    (None, 0xD800..=0xDBFF) => self.high_surrogate = Some(value),
                    (Some(high), 0xDC00..=0xDFFF) => {
                        let code = 0x10000 + ((high - 0xD800) << 10) + (value - 0xDC00);
                        self.string_char(char::from_u32(code).unwrap_or('\u{FFFD}'));
                    }
                    (_, value) => {
                        self.string_char(char::from_u32(value).unwrap_or('\u{FFFD}'));
                    }
                }
                Ok(())
            }
        }
    }

    /// Reassembles UTF-8 characters byte by byte (they may straddle chunks).
    fn string_utf8_byte(&mut self, b: u8) {
        if self.utf8_need == 0 {
            let need = match b {
                0x00..=0x7F => 1,
                0xC0..=0xDF => 2,
                0xE0..=0xEF => 3,
                0xF0..=0xF7 => 4,
                _ => {
                    self.string_char('\u{FFFD}');
                    return;
                }
            };
            self.utf8_need = need;
            self.utf8_len = 0;
        }
        self.utf8[self.utf8_len] = b;
        self.utf8_len += 1;
        if self.utf8_len == self.utf8_need {
            let c = std::str::from_utf8(&self.utf8[..self.utf8_len])
                .ok()
                .and_then(|s| s.chars().next())
                .unwrap_or('\u{FFFD}');
            self.utf8_need = 0;
            self.utf8_len = 0;
            self.string_char(c);
        }
    }

    fn string_char(&mut self, c: char) {
        match self.string_role {
            StringRole::Key => {
                let mut buf = [0u8; 4];
                for &b in c.encode_utf8(&mut buf).as_bytes() {
                    if self.key_len < MAX_KEY_NAME {
                        self.key[self.key_len] = b;
                        self.key_len += 1;
                    } else {
                        self.key_overflow = true;
                    }
                }
            }
            StringRole::Role => {
                if self.role.chars().count() < MAX_ROLE_CHARS {
                    self.role.push(c);
                }
            }
            StringRole::Content => self.content_char(c),
            StringRole::Prompt => self.text.push_char(c),
            StringRole::Skipped => {}
        }
    }

    fn end_string(&mut self) {
        self.utf8_need = 0;
        self.utf8_len = 0;
        match self.string_role {
            StringRole::Prompt if self.place() == Place::Top => self.finished = true,
            StringRole::Prompt => self.text.push_char('\n'),
            StringRole::Role => self.role_known = true,
            _ => {}
        }
    }
}

impl fmt::Display for NoKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests;
