//! The keyring: every key's long-term key, in the vendor `ekeyd`'s format.
//!
//! The file is text, one key per line: the serial number as 16 PEM64
//! characters, one or more spaces or tabs, then the long-term key as 44
//! PEM64 characters (ending in one `=`):
//!
//! ```text
//! # Do not edit this directly, this file is managed by ekey-setkey
//! NwBvBlg3OTBJORFD xH3bqmS1H7vEo5Xh0Av4h+6HydQx+OZ9KHS9YCsNGBM=
//! ```
//!
//! Blank lines and lines whose first non-blank character is `#` are
//! comments. Leading and trailing spaces or tabs are allowed, and so are
//! CRLF line endings. Anything else is refused, with the number of every
//! bad line ([`ParseErrors`]) — `ekeyd` silently skips such lines, which
//! hides typos; this module would rather say so. A serial number listed
//! twice is accepted and the later line wins, as in `ekeyd`;
//! [`Keyring::warnings`] reports it.
//!
//! A [`Keyring`] keeps every line of the file, in order, so rewriting it
//! ([`Keyring::save`]) keeps comments, blank lines, the order of the keys
//! and the line endings. Every line's text is held in memory that is wiped
//! when dropped, as are the keys; error messages and `Debug` output name
//! line numbers and serial numbers, never key text.
//!
//! ```
//! use ekey_host::keyring::Keyring;
//! use ekey_proto::keys::{LongTermKey, Serial};
//!
//! let serial: Serial = "NwBvBlg3OTBJORFD".parse().unwrap();
//! let mut ring = Keyring::parse("# my keys\n").unwrap();
//! ring.set(serial, LongTermKey::from_bytes([7; 32]));
//! assert!(ring.get(&serial).unwrap().ct_eq(&LongTermKey::from_bytes([7; 32])));
//! assert!(ring.to_text().starts_with("# my keys\nNwBvBlg3OTBJORFD "));
//! ```

use core::fmt;
use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use ekey_proto::keys::{KEY_PEM_LEN, KeyTextError, LongTermKey, SERIAL_PEM_LEN, Serial};
use ekey_proto::pem;
use zeroize::Zeroizing;

/// Where `ekeyd` (and this daemon, by default) keeps the keyring.
pub const DEFAULT_PATH: &str = "/etc/entropykey/keyring";

/// One line of the file.
#[derive(Clone)]
struct Line {
    /// The line's text, without its line ending. May hold key text (entry
    /// lines, or a commented-out old key), so it is wiped when dropped.
    text: Zeroizing<String>,
    /// The parsed serial number and key, for an entry line; `None` for a
    /// blank or comment line. The key is boxed so that growing or shifting
    /// the vector of lines moves a pointer, never leaving a stale copy of
    /// the key in freed memory.
    entry: Option<(Serial, Box<LongTermKey>)>,
    /// Whether the line ends in CRLF rather than LF.
    crlf: bool,
}

/// The keyring: serial numbers and their long-term keys, with the comments
/// and layout of the file they came from.
///
/// Build one with [`Keyring::load`] (from a file), [`Keyring::parse`] (from
/// text) or [`Keyring::new`] (empty); change it with [`Keyring::set`] and
/// [`Keyring::remove`]; write it back with [`Keyring::save`].
///
/// `Debug` shows the serial numbers only.
#[derive(Clone, Default)]
pub struct Keyring {
    lines: Vec<Line>,
    /// Line ending for lines this keyring adds: that of the file's first
    /// line (CRLF files stay CRLF), LF for a new keyring.
    crlf: bool,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("serials", &self.serials())
            .finish_non_exhaustive()
    }
}

impl Keyring {
    /// An empty keyring (no lines).
    pub fn new() -> Self {
        Keyring::default()
    }

    /// Parses keyring text.
    ///
    /// On error, lists every bad line (see the [module docs](self) for
    /// what is accepted), not only the first.
    ///
    /// The text comes back unchanged from [`Keyring::to_text`], except that
    /// a last line without a line ending gets one (CRLF if the first line
    /// ends in CRLF, else LF). So `parse(s)?.to_text() == s` for every `s`
    /// that is empty or ends in a newline.
    pub fn parse(text: &str) -> Result<Keyring, ParseErrors> {
        Keyring::parse_bytes(text.as_bytes())
    }

    /// Reads and parses the keyring file at `path`.
    ///
    /// A missing file is an error ([`KeyringError::Io`] with
    /// [`io::ErrorKind::NotFound`]); the caller decides whether that means
    /// "no keys yet". The file's bytes are wiped from memory after parsing.
    pub fn load(path: &Path) -> Result<Keyring, KeyringError> {
        let bytes = Zeroizing::new(fs::read(path).map_err(|source| KeyringError::Io {
            path: path.to_owned(),
            source,
        })?);
        Keyring::parse_bytes(&bytes).map_err(|errors| KeyringError::Parse {
            path: path.to_owned(),
            errors,
        })
    }

    fn parse_bytes(bytes: &[u8]) -> Result<Keyring, ParseErrors> {
        let mut lines = Vec::new();
        let mut errors = Vec::new();
        let mut file_crlf = None;
        for (index, piece) in bytes.split_inclusive(|&b| b == b'\n').enumerate() {
            let (body, terminated) = match piece.strip_suffix(b"\n") {
                Some(body) => (body, true),
                None => (piece, false),
            };
            let (body, cr) = match body.strip_suffix(b"\r") {
                Some(body) => (body, true),
                None => (body, false),
            };
            // The first terminated line sets the style for added lines.
            if terminated && file_crlf.is_none() {
                file_crlf = Some(cr);
            }
            let crlf = if terminated {
                cr
            } else {
                cr || file_crlf.unwrap_or(false)
            };
            let parsed = match core::str::from_utf8(body) {
                Ok(text) => parse_line(text).map(|entry| (text, entry)),
                Err(_) => Err(LineErrorKind::NotText),
            };
            match parsed {
                Ok((text, entry)) => lines.push(Line {
                    text: Zeroizing::new(text.to_owned()),
                    entry,
                    crlf,
                }),
                Err(kind) => errors.push(LineError {
                    line: index + 1,
                    kind,
                }),
            }
        }
        if errors.is_empty() {
            Ok(Keyring {
                lines,
                crlf: file_crlf.unwrap_or(false),
            })
        } else {
            Err(ParseErrors(errors))
        }
    }

    /// Entries, with their index in `lines`.
    fn entries(&self) -> impl DoubleEndedIterator<Item = (usize, &Serial, &LongTermKey)> {
        self.lines
            .iter()
            .enumerate()
            .filter_map(|(i, line)| line.entry.as_ref().map(|(s, k)| (i, s, &**k)))
    }

    /// The long-term key for `serial` (from its last line, if listed more
    /// than once), or `None` if the keyring has no entry for it.
    pub fn get(&self, serial: &Serial) -> Option<LongTermKey> {
        self.entries()
            .rev()
            .find(|(_, s, _)| *s == serial)
            .map(|(_, _, k)| k.clone())
    }

    /// Whether the keyring has a key for `serial`.
    pub fn contains(&self, serial: &Serial) -> bool {
        self.entries().any(|(_, s, _)| s == serial)
    }

    /// The serial numbers in the keyring, in file order (where each first
    /// appears), each once.
    pub fn serials(&self) -> Vec<Serial> {
        let mut seen = BTreeSet::new();
        self.entries()
            .filter(|(_, s, _)| seen.insert(**s))
            .map(|(_, s, _)| *s)
            .collect()
    }

    /// Sets the long-term key for `serial`.
    ///
    /// If the serial is already listed, its (last) line is rewritten in
    /// place, keeping its position, and any earlier lines for the same
    /// serial are removed; otherwise a line is appended. Comments and other
    /// entries are untouched. The line is written in `ekeyd`'s form:
    /// serial, one space, key.
    pub fn set(&mut self, serial: Serial, key: LongTermKey) {
        let text = entry_text(&serial, &key);
        let key = Box::new(key);
        let matching: Vec<usize> = self
            .entries()
            .filter(|(_, s, _)| **s == serial)
            .map(|(i, _, _)| i)
            .collect();
        match matching.split_last() {
            Some((&last, earlier)) => {
                if let Some(line) = self.lines.get_mut(last) {
                    line.text = text;
                    line.entry = Some((serial, key));
                }
                let mut index = 0;
                self.lines.retain(|_| {
                    let keep = !earlier.contains(&index);
                    index += 1;
                    keep
                });
            }
            None => self.lines.push(Line {
                text,
                entry: Some((serial, key)),
                crlf: self.crlf,
            }),
        }
    }

    /// Removes every line for `serial`. Returns whether there was one.
    pub fn remove(&mut self, serial: &Serial) -> bool {
        let before = self.lines.len();
        self.lines
            .retain(|line| !matches!(&line.entry, Some((s, _)) if s == serial));
        self.lines.len() != before
    }

    /// The keyring as file text: every line, in order, each with its line
    /// ending (see [`Keyring::parse`] for how exact the round trip is).
    /// The text holds keys, so it is wiped when dropped.
    pub fn to_text(&self) -> Zeroizing<String> {
        let len = self
            .lines
            .iter()
            .map(|line| line.text.len() + if line.crlf { 2 } else { 1 })
            .sum();
        // Sized up front so the string never reallocates (which would leave
        // an unwiped copy of the keys behind).
        let mut out = Zeroizing::new(String::with_capacity(len));
        for line in &self.lines {
            out.push_str(&line.text);
            out.push_str(if line.crlf { "\r\n" } else { "\n" });
        }
        out
    }

    /// Writes the keyring to `path`, atomically: readers see either the old
    /// file or the new one, never a mix, and a failure leaves the old file
    /// untouched.
    ///
    /// - The directory is created (mode 0700) if missing.
    /// - The text goes to a new temporary file in the same directory
    ///   (`.<name>.tmp.<pid>.<n>`, mode 0600), which is flushed to disk,
    ///   then renamed over `path`, and the directory is flushed too.
    /// - If `path` is a symbolic link, the file it points to is replaced
    ///   and the link is kept.
    /// - On any error before the rename, the temporary file is removed.
    ///
    /// The new file has mode 0600 and belongs to the calling user, whatever
    /// the old one had.
    pub fn save(&self, path: &Path) -> io::Result<()> {
        self.save_with(path, |_| Ok(()))
    }

    /// [`Keyring::save`], calling `before_rename` with the temporary file's
    /// path once it is written and flushed, just before the rename. An error
    /// from it aborts the save like any other: the temporary file is
    /// removed, the old keyring is left as it was, and the error is
    /// returned unchanged. (For tests, and for callers that want to check
    /// the written file first.)
    pub fn save_with(
        &self,
        path: &Path,
        before_rename: impl FnOnce(&Path) -> io::Result<()>,
    ) -> io::Result<()> {
        let target = resolve_link(path)?;
        let name = target.file_name().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("cannot save keyring to {}: not a file name", path.display()),
            )
        })?;
        let dir = match target.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
            _ => PathBuf::from("."),
        };
        crate::private::dir_builder()
            .create(&dir)
            .map_err(|e| context(e, "cannot create directory", &dir))?;

        let (tmp_path, file) = create_temp(&dir, name)?;
        let written = write_and_sync(file, &self.to_text(), &tmp_path)
            .and_then(|()| before_rename(&tmp_path))
            .and_then(|()| {
                fs::rename(&tmp_path, &target).map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!(
                            "cannot rename {} to {}: {e}",
                            tmp_path.display(),
                            target.display()
                        ),
                    )
                })
            });
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp_path);
            return Err(e);
        }
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| context(e, "keyring saved, but cannot flush directory", &dir))
    }

    /// Things worth telling the administrator about a keyring that parsed:
    /// today, serial numbers listed on more than one line (the last line
    /// wins). Line numbers are those of [`Keyring::to_text`]'s text, which
    /// are the file's for a keyring just loaded.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        for serial in self.serials() {
            let lines: Vec<usize> = self
                .entries()
                .filter(|(_, s, _)| **s == serial)
                .map(|(i, _, _)| i + 1)
                .collect();
            if let Some((last, _)) = lines
                .split_last()
                .filter(|(_, earlier)| !earlier.is_empty())
            {
                let list: Vec<String> = lines.iter().map(usize::to_string).collect();
                out.push(format!(
                    "serial number {serial} is listed on lines {}: line {last} is used, \
                     the earlier ones are ignored",
                    list.join(", ")
                ));
            }
        }
        out
    }
}

/// `<serial> <key>`, in wiped memory, without reallocating.
fn entry_text(serial: &Serial, key: &LongTermKey) -> Zeroizing<String> {
    let mut text = Zeroizing::new(String::with_capacity(SERIAL_PEM_LEN + 1 + KEY_PEM_LEN));
    text.push_str(serial.to_pem().as_str());
    text.push(' ');
    let pem = key.to_pem();
    // PEM64 output is ASCII.
    for &b in pem.iter() {
        text.push(char::from(b));
    }
    text
}

/// Whether `c` separates fields (or pads a line).
fn is_blank(c: char) -> bool {
    c == ' ' || c == '\t'
}

/// Parses one line (without its line ending): `Ok(None)` for a blank or
/// comment line, `Ok(Some(..))` for an entry.
fn parse_line(text: &str) -> Result<Option<(Serial, Box<LongTermKey>)>, LineErrorKind> {
    let trimmed = text.trim_matches(is_blank);
    if trimmed.is_empty() || trimmed.starts_with('#') {
        return Ok(None);
    }
    // Fields with their byte offsets in `text`.
    let fields: Vec<(usize, &str)> = text
        .split(is_blank)
        .scan(0usize, |offset, field| {
            let start = *offset;
            *offset += field.len() + 1;
            Some((start, field))
        })
        .filter(|(_, field)| !field.is_empty())
        .collect();
    let [(serial_at, serial_text), (key_at, key_text)] = fields.as_slice() else {
        return Err(LineErrorKind::FieldCount {
            found: fields.len(),
        });
    };
    let serial = decode_field(
        Field::Serial,
        text,
        *serial_at,
        serial_text,
        Serial::from_pem,
    )?;
    let key = decode_field(
        Field::LongTermKey,
        text,
        *key_at,
        key_text,
        LongTermKey::from_pem,
    )?;
    Ok(Some((serial, Box::new(key))))
}

/// Decodes one field of an entry line (`field_text`, at byte offset
/// `start` of `line`), turning a failure into an error that names the
/// field and column but holds none of the text.
fn decode_field<T>(
    field: Field,
    line: &str,
    start: usize,
    field_text: &str,
    decode: impl FnOnce(&[u8]) -> Result<T, KeyTextError>,
) -> Result<T, LineErrorKind> {
    // Column (1-based, in characters) of the byte at `offset` in the field.
    let column = |offset: usize| {
        line.get(..start + offset)
            .map_or(0, |before| before.chars().count() + 1)
    };
    // Count characters, not bytes, so a non-ASCII character counts as one.
    let found = field_text.chars().count();
    if found != field.chars() {
        return Err(LineErrorKind::Length { field, found });
    }
    // Check the characters here rather than relying on the decoder's
    // error, which may report a length problem first.
    let bytes = field_text.as_bytes();
    if let Some(offset) = bytes
        .iter()
        .position(|&b| b != pem::FILLER && pem::decode_char(b).is_none())
    {
        return Err(LineErrorKind::BadCharacter {
            field,
            column: column(offset),
        });
    }
    if let Some(offset) = bytes.iter().position(|&b| b == pem::FILLER)
        && bytes
            .get(offset..)
            .is_some_and(|rest| rest.iter().any(|&b| b != pem::FILLER))
    {
        return Err(LineErrorKind::MisplacedFiller {
            field,
            column: column(offset),
        });
    }
    decode(bytes).map_err(|err| match err {
        KeyTextError::Pem(pem::Error::BadCharacter {
            position,
            byte: pem::FILLER,
        }) => LineErrorKind::MisplacedFiller {
            field,
            column: column(position),
        },
        KeyTextError::Pem(pem::Error::BadCharacter { position, .. }) => {
            LineErrorKind::BadCharacter {
                field,
                column: column(position),
            }
        }
        // The length is right, so the text decodes to the wrong number of
        // bytes: a filler missing, extra or where none may be.
        _ => LineErrorKind::Filler { field },
    })
}

/// Follows `path` if it is a symbolic link, so saving replaces the file
/// the link points to rather than the link.
fn resolve_link(path: &Path) -> io::Result<PathBuf> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_symlink() => {
            fs::canonicalize(path).map_err(|e| context(e, "cannot follow symbolic link", path))
        }
        _ => Ok(path.to_owned()),
    }
}

/// Creates a new temporary file (mode 0600) next to the keyring.
fn create_temp(dir: &Path, name: &std::ffi::OsStr) -> io::Result<(PathBuf, File)> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let pid = std::process::id();
    let mut attempts = 0;
    loop {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let mut tmp_name = OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".tmp.{pid}.{n}"));
        let tmp_path = dir.join(tmp_name);
        match crate::private::write_options()
            .create_new(true)
            .open(&tmp_path)
        {
            Ok(file) => return Ok((tmp_path, file)),
            // A stale file from a crashed run with the same pid: try the
            // next name.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempts < 100 => {
                attempts += 1;
            }
            Err(e) => return Err(context(e, "cannot create temporary file", &tmp_path)),
        }
    }
}

/// Writes `text` to `file`, makes it mode 0600 whatever the umask, and
/// flushes it to disk.
fn write_and_sync(mut file: File, text: &str, path: &Path) -> io::Result<()> {
    crate::private::set_private(&file)
        .and_then(|()| file.write_all(text.as_bytes()))
        .and_then(|()| file.sync_all())
        .map_err(|e| context(e, "cannot write", path))
}

/// `e` with what was being done and to which path, for the administrator.
fn context(e: io::Error, doing: &str, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{doing} {}: {e}", path.display()))
}

/// Checks that only the owner can read or write the keyring at `path`.
///
/// Returns `Some(warning)` if its group or other users have any access
/// (`mode & 0o077 != 0`), `None` if not. Follows symbolic links. Errors
/// (such as a missing file) are those of reading the file's metadata.
pub fn check_permissions(path: &Path) -> io::Result<Option<String>> {
    let Some(mode) = crate::private::mode(&fs::metadata(path)?) else {
        return Ok(None);
    };
    if mode & 0o077 == 0 {
        return Ok(None);
    }
    let describe = |who: &str, bits: u32| -> Option<String> {
        let can: Vec<&str> = [(0o4, "read"), (0o2, "write"), (0o1, "execute")]
            .iter()
            .filter(|(bit, _)| bits & bit != 0)
            .map(|(_, what)| *what)
            .collect();
        (!can.is_empty()).then(|| format!("{who} can {}", can.join("/")))
    };
    let who: Vec<String> = [
        describe("its group", mode >> 3 & 7),
        describe("other users", mode & 7),
    ]
    .into_iter()
    .flatten()
    .collect();
    Ok(Some(format!(
        "keyring {} has mode {mode:04o} ({}), but it holds secret keys: \
         run `chmod 600 {}`",
        path.display(),
        who.join(", "),
        path.display()
    )))
}

/// Which field of an entry line an error is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Field {
    /// The first field: the serial number (16 PEM64 characters).
    Serial,
    /// The second field: the long-term key (44 PEM64 characters).
    LongTermKey,
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Field::Serial => "serial number",
            Field::LongTermKey => "long-term key",
        })
    }
}

impl Field {
    fn chars(self) -> usize {
        match self {
            Field::Serial => SERIAL_PEM_LEN,
            Field::LongTermKey => KEY_PEM_LEN,
        }
    }
}

/// What is wrong with a keyring line. Never holds any of the line's text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LineErrorKind {
    /// The line is not UTF-8 text (only from [`Keyring::load`]).
    NotText,
    /// The line does not have exactly two fields.
    FieldCount {
        /// Fields found (separated by spaces or tabs).
        found: usize,
    },
    /// A field has the wrong number of characters.
    Length {
        /// The field.
        field: Field,
        /// Characters found.
        found: usize,
    },
    /// A field has a character outside `A-Z a-z 0-9 + /` and `=`.
    BadCharacter {
        /// The field.
        field: Field,
        /// Column of the character in the line (1-based, in characters).
        column: usize,
    },
    /// A field has the `=` filler somewhere it may not stand.
    MisplacedFiller {
        /// The field.
        field: Field,
        /// Column of the `=` in the line (1-based, in characters).
        column: usize,
    },
    /// A field's characters are all valid but it does not end as it must
    /// (no `=` in a serial number, exactly one at the end of a key), so it
    /// does not decode to the right number of bytes.
    Filler {
        /// The field.
        field: Field,
    },
}

impl fmt::Display for LineErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            LineErrorKind::NotText => f.write_str("not valid UTF-8 text"),
            LineErrorKind::FieldCount { found } => write!(
                f,
                "expected a serial number ({SERIAL_PEM_LEN} characters) and a long-term key \
                 ({KEY_PEM_LEN} characters) separated by spaces, found {found} field{} \
                 (comment lines must start with '#')",
                if found == 1 { "" } else { "s" }
            ),
            LineErrorKind::Length { field, found } => write!(
                f,
                "{field} has {found} characters, expected {}",
                field.chars()
            ),
            LineErrorKind::BadCharacter { field, column } => write!(
                f,
                "{field} is not valid PEM64: invalid character at column {column} \
                 (allowed: A-Z a-z 0-9 + / and '=' at the end)"
            ),
            LineErrorKind::MisplacedFiller { field, column } => write!(
                f,
                "{field} is not valid PEM64: '=' at column {column} \
                 (only the end of a field may be '=')"
            ),
            LineErrorKind::Filler {
                field: Field::Serial,
            } => f.write_str(
                "serial number is not valid PEM64: it must not end in '=' \
                 (16 characters encode its 12 bytes exactly)",
            ),
            LineErrorKind::Filler {
                field: Field::LongTermKey,
            } => f.write_str(
                "long-term key is not valid PEM64: it must end in exactly one '=' \
                 (44 characters encode its 32 bytes)",
            ),
        }
    }
}

/// A bad line in keyring text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LineError {
    /// Line number, from 1.
    pub line: usize,
    /// What is wrong with it.
    pub kind: LineErrorKind,
}

impl fmt::Display for LineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.kind)
    }
}

impl std::error::Error for LineError {}

/// Every bad line of keyring text, in line order (never empty).
///
/// Displays as one `line N: ...` per bad line, separated by newlines.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseErrors(Vec<LineError>);

impl ParseErrors {
    /// The bad lines, in line order.
    pub fn errors(&self) -> &[LineError] {
        &self.0
    }

    /// How many lines are bad.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Always `false`: a `ParseErrors` has at least one error.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The bad lines, in line order.
    pub fn iter(&self) -> core::slice::Iter<'_, LineError> {
        self.0.iter()
    }
}

impl<'a> IntoIterator for &'a ParseErrors {
    type Item = &'a LineError;
    type IntoIter = core::slice::Iter<'a, LineError>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl fmt::Display for ParseErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ParseErrors {}

/// Why a keyring file could not be loaded.
#[derive(Debug)]
pub enum KeyringError {
    /// The file could not be read (the message includes the OS error).
    Io {
        /// The keyring file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The file has bad lines (all of them are listed).
    Parse {
        /// The keyring file.
        path: PathBuf,
        /// Every bad line.
        errors: ParseErrors,
    },
}

impl fmt::Display for KeyringError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyringError::Io { path, source } => {
                write!(f, "cannot read keyring {}: {source}", path.display())
            }
            KeyringError::Parse { path, errors } => {
                for (i, e) in errors.iter().enumerate() {
                    if i > 0 {
                        f.write_str("\n")?;
                    }
                    write!(f, "{} line {}: {}", path.display(), e.line, e.kind)?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for KeyringError {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const SERIAL: &str = "NwBvBlg3OTBJORFD";

    fn serial() -> Serial {
        SERIAL.parse().unwrap()
    }

    fn other_serial(n: u8) -> Serial {
        Serial([n; 12])
    }

    /// A key of scrambled bytes, so its PEM64 text has no repeats.
    fn key(n: u8) -> LongTermKey {
        let mut bytes = [0u8; 32];
        let mut x = u32::from(n).wrapping_mul(2_654_435_761).wrapping_add(12345);
        for b in &mut bytes {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            *b = x.to_le_bytes()[0];
        }
        LongTermKey::from_bytes(bytes)
    }

    fn pem(k: &LongTermKey) -> String {
        String::from_utf8(k.to_pem().to_vec()).unwrap()
    }

    fn same(a: &LongTermKey, b: &LongTermKey) -> bool {
        a.ct_eq(b)
    }

    /// Asserts `message` shows no 6-character run of `secret`.
    fn assert_no_key_text(message: &str, secret: &str) {
        let chars: Vec<char> = secret.chars().collect();
        for w in chars.windows(6) {
            let piece: String = w.iter().collect();
            assert!(
                !message.contains(&piece),
                "message {message:?} shows key text {piece:?}"
            );
        }
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    fn leftovers(dir: &Path) -> Vec<String> {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".tmp."))
            .collect()
    }

    #[test]
    fn test_data_is_real_pem64() {
        assert_eq!(serial().to_pem().as_str(), SERIAL);
        let k = pem(&key(1));
        assert_eq!(k.len(), 44);
        assert!(k.ends_with('=') && !k.ends_with("=="));
        assert_eq!(
            pem(&LongTermKey::from_bytes([5; 32])),
            "BQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQU="
        );
    }

    #[test]
    fn new_is_empty() {
        let ring = Keyring::new();
        assert!(ring.serials().is_empty());
        assert_eq!(ring.to_text().as_str(), "");
        assert!(ring.warnings().is_empty());
        assert!(!ring.contains(&serial()));
        assert!(ring.get(&serial()).is_none());
    }

    #[test]
    fn parses_comments_blank_lines_crlf_tabs() {
        let s2 = other_serial(2);
        let s3 = other_serial(3);
        let text = format!(
            "# Do not edit this directly, this file is managed by ekey-setkey\r\n\
             \r\n\
             {SERIAL} {}\r\n\
             \t  # indented comment\n\
             \x20\t\n\
             \t{s2}\t\t{}  \r\n\
             {s3}  \t {}",
            pem(&key(1)),
            pem(&key(2)),
            pem(&key(3)),
        );
        let ring = Keyring::parse(&text).unwrap();
        assert_eq!(ring.serials(), vec![serial(), s2, s3]);
        assert!(same(&ring.get(&serial()).unwrap(), &key(1)));
        assert!(same(&ring.get(&s2).unwrap(), &key(2)));
        assert!(same(&ring.get(&s3).unwrap(), &key(3)));
        assert!(ring.contains(&s3));
        assert!(!ring.contains(&other_serial(9)));
        assert!(ring.warnings().is_empty());
    }

    #[test]
    fn ekeyd_written_keyring_parses() {
        // ekeyd's write_keyring: a header comment, then "serial key\n".
        let text = format!(
            "# Do not edit this directly, this file is managed by ekey-setkey\n\
             {SERIAL} {}\n{} {}\n",
            pem(&key(4)),
            other_serial(7),
            pem(&key(5))
        );
        let ring = Keyring::parse(&text).unwrap();
        assert_eq!(ring.serials(), vec![serial(), other_serial(7)]);
        assert_eq!(ring.to_text().as_str(), text);
    }

    #[test]
    fn round_trips_text_exactly() {
        let k = pem(&key(1));
        let cases = [
            String::new(),
            "\n".to_owned(),
            "# only a comment\n".to_owned(),
            format!("{SERIAL} {k}\n"),
            format!("  {SERIAL}\t \t{k} \t\n# c\n\n\n"),
            format!("# crlf\r\n{SERIAL} {k}\r\n\r\n"),
            format!("# mixed\r\n{SERIAL} {k}\n# end\r\n"),
        ];
        for text in &cases {
            let ring = Keyring::parse(text).unwrap();
            assert_eq!(ring.to_text().as_str(), text.as_str());
        }
        // Without a final line ending, one is added in the file's style.
        let ring = Keyring::parse(&format!("# x\n{SERIAL} {k}")).unwrap();
        assert_eq!(ring.to_text().as_str(), format!("# x\n{SERIAL} {k}\n"));
        let ring = Keyring::parse(&format!("# x\r\n{SERIAL} {k}")).unwrap();
        assert_eq!(ring.to_text().as_str(), format!("# x\r\n{SERIAL} {k}\r\n"));
        let ring = Keyring::parse("# no newline at all").unwrap();
        assert_eq!(ring.to_text().as_str(), "# no newline at all\n");
    }

    #[test]
    fn set_replaces_in_place_and_keeps_comments() {
        let s2 = other_serial(2);
        let text = format!(
            "# head\n  {SERIAL}\t{}  \n# middle\n{s2} {}\n# tail\n",
            pem(&key(1)),
            pem(&key(2))
        );
        let mut ring = Keyring::parse(&text).unwrap();
        ring.set(serial(), key(9));
        assert!(same(&ring.get(&serial()).unwrap(), &key(9)));
        assert_eq!(
            ring.to_text().as_str(),
            format!(
                "# head\n{SERIAL} {}\n# middle\n{s2} {}\n# tail\n",
                pem(&key(9)),
                pem(&key(2))
            )
        );
        assert_eq!(ring.serials(), vec![serial(), s2]);
    }

    #[test]
    fn set_appends_new_serial_in_the_files_line_ending() {
        let mut ring = Keyring::parse(&format!("# head\r\n{SERIAL} {}\r\n", pem(&key(1)))).unwrap();
        let s5 = other_serial(5);
        ring.set(s5, key(5));
        assert_eq!(
            ring.to_text().as_str(),
            format!(
                "# head\r\n{SERIAL} {}\r\n{s5} {}\r\n",
                pem(&key(1)),
                pem(&key(5))
            )
        );
        assert_eq!(ring.serials(), vec![serial(), s5]);

        let mut ring = Keyring::new();
        ring.set(s5, key(5));
        ring.set(serial(), key(1));
        assert_eq!(
            ring.to_text().as_str(),
            format!("{s5} {}\n{SERIAL} {}\n", pem(&key(5)), pem(&key(1)))
        );
    }

    #[test]
    fn set_on_a_duplicate_replaces_the_last_and_drops_the_others() {
        let s2 = other_serial(2);
        let text = format!(
            "{SERIAL} {}\n# a\n{s2} {}\n{SERIAL} {}\n# b\n",
            pem(&key(1)),
            pem(&key(2)),
            pem(&key(3))
        );
        let mut ring = Keyring::parse(&text).unwrap();
        ring.set(serial(), key(8));
        assert_eq!(
            ring.to_text().as_str(),
            format!(
                "# a\n{s2} {}\n{SERIAL} {}\n# b\n",
                pem(&key(2)),
                pem(&key(8))
            )
        );
        assert!(ring.warnings().is_empty());
    }

    #[test]
    fn remove_deletes_every_line_for_the_serial() {
        let s2 = other_serial(2);
        let text = format!(
            "# a\n{SERIAL} {}\n{s2} {}\n{SERIAL} {}\n# b\n",
            pem(&key(1)),
            pem(&key(2)),
            pem(&key(3))
        );
        let mut ring = Keyring::parse(&text).unwrap();
        assert!(ring.remove(&serial()));
        assert!(!ring.contains(&serial()));
        assert!(ring.get(&serial()).is_none());
        assert_eq!(
            ring.to_text().as_str(),
            format!("# a\n{s2} {}\n# b\n", pem(&key(2)))
        );
        assert!(!ring.remove(&serial()));
        assert!(ring.remove(&s2));
        assert_eq!(ring.to_text().as_str(), "# a\n# b\n");
        assert!(ring.serials().is_empty());
    }

    #[test]
    fn duplicates_last_wins_with_a_warning() {
        let s2 = other_serial(2);
        let text = format!(
            "# keys\n{SERIAL} {}\n{s2} {}\n\n{SERIAL} {}\n",
            pem(&key(1)),
            pem(&key(2)),
            pem(&key(3))
        );
        let ring = Keyring::parse(&text).unwrap();
        assert!(same(&ring.get(&serial()).unwrap(), &key(3)));
        assert_eq!(ring.serials(), vec![serial(), s2]);
        let warnings = ring.warnings();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains(SERIAL), "{}", warnings[0]);
        assert!(warnings[0].contains("lines 2, 5"), "{}", warnings[0]);
        assert!(warnings[0].contains("line 5 is used"), "{}", warnings[0]);
        for k in [1, 2, 3] {
            assert_no_key_text(&warnings[0], &pem(&key(k)));
        }
    }

    /// Every kind of bad line, each reported with its line number, all of
    /// them at once, and none showing key text.
    #[test]
    fn every_error_kind_with_its_line_number_and_no_key_text() {
        let k = pem(&key(1));
        let mut bad_char_key = k.clone();
        bad_char_key.replace_range(10..11, "*");
        let mut filler_key = k.clone();
        filler_key.replace_range(20..21, "=");
        let unfilled_key = format!("{}A", &k[..43]); // 44 chars, no '='
        let double_filler_key = format!("{}==", &k[..42]); // decodes to 31 bytes
        let lines = [
            "# fine".to_owned(),                     // 1
            SERIAL.to_owned(),                       // 2: one field
            format!("{SERIAL} {k} extra"),           // 3: three fields
            format!("{SERIAL} {k} # comment"),       // 4: four fields
            format!("NwBvBlg3OTBJORF {k}"),          // 5: serial 15 chars
            format!("{SERIAL} {}", &k[..43]),        // 6: key 43 chars
            format!("NwBvBlg3OTB!ORFD {k}"),         // 7: bad serial char
            format!("{SERIAL} {bad_char_key}"),      // 8: bad key char
            format!("{SERIAL} {filler_key}"),        // 9: '=' inside key
            format!("{SERIAL} {unfilled_key}"),      // 10: no '='
            format!("{SERIAL} {double_filler_key}"), // 11: '=='
            format!("NwBvBlg3OTBJOR== {k}"),         // 12: serial with '='
            format!("{SERIAL} {}é", &k[..43]),       // 13: non-ASCII key char
            k.clone(),                               // 14: key alone
            format!("{SERIAL} {k}"),                 // 15: fine
        ];
        let text = lines.join("\n");
        let errors = Keyring::parse(&text).unwrap_err();
        let kinds: Vec<(usize, LineErrorKind)> = errors.iter().map(|e| (e.line, e.kind)).collect();
        use Field::{LongTermKey as K, Serial as S};
        assert_eq!(
            kinds,
            vec![
                (2, LineErrorKind::FieldCount { found: 1 }),
                (3, LineErrorKind::FieldCount { found: 3 }),
                (4, LineErrorKind::FieldCount { found: 4 }),
                (
                    5,
                    LineErrorKind::Length {
                        field: S,
                        found: 15
                    }
                ),
                (
                    6,
                    LineErrorKind::Length {
                        field: K,
                        found: 43
                    }
                ),
                (
                    7,
                    LineErrorKind::BadCharacter {
                        field: S,
                        column: 12
                    }
                ),
                (
                    8,
                    LineErrorKind::BadCharacter {
                        field: K,
                        column: 28
                    }
                ),
                (
                    9,
                    LineErrorKind::MisplacedFiller {
                        field: K,
                        column: 38
                    }
                ),
                (10, LineErrorKind::Filler { field: K }),
                (11, LineErrorKind::Filler { field: K }),
                (12, LineErrorKind::Filler { field: S }),
                (
                    13,
                    LineErrorKind::BadCharacter {
                        field: K,
                        column: 61
                    }
                ),
                (14, LineErrorKind::FieldCount { found: 1 }),
            ]
        );
        assert_eq!(errors.len(), 13);
        assert!(!errors.is_empty());
        let message = errors.to_string();
        assert_eq!(message.lines().count(), 13);
        assert!(
            message.starts_with("line 2: expected a serial number"),
            "{message}"
        );
        assert!(
            message.contains(
                "line 8: long-term key is not valid PEM64: invalid character at column 28"
            ),
            "{message}"
        );
        assert!(
            message.contains("line 5: serial number has 15 characters, expected 16"),
            "{message}"
        );
        for secret in [
            &k,
            &bad_char_key,
            &filler_key,
            &unfilled_key,
            &double_filler_key,
        ] {
            assert_no_key_text(&message, secret);
            assert_no_key_text(&format!("{errors:?}"), secret);
        }
    }

    #[test]
    fn debug_shows_serials_only() {
        let text = format!("# secret comment\n{SERIAL} {}\n", pem(&key(1)));
        let ring = Keyring::parse(&text).unwrap();
        let debug = format!("{ring:?}");
        assert!(debug.contains(SERIAL), "{debug}");
        assert!(!debug.contains("secret comment"), "{debug}");
        assert_no_key_text(&debug, &pem(&key(1)));
    }

    #[test]
    fn load_reports_path_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyring");
        let k = pem(&key(1));
        let mut bytes = format!("# ok\n{SERIAL} {k}\n{SERIAL} {}*\n", &k[..43]).into_bytes();
        bytes.extend_from_slice(b"# caf\xe9 latin-1\n");
        fs::write(&path, &bytes).unwrap();
        let err = Keyring::load(&path).unwrap_err();
        let message = err.to_string();
        let shown = path.display().to_string();
        assert_eq!(
            message,
            format!(
                "{shown} line 3: long-term key is not valid PEM64: invalid character at column 61 \
                 (allowed: A-Z a-z 0-9 + / and '=' at the end)\n\
                 {shown} line 4: not valid UTF-8 text"
            )
        );
        assert_no_key_text(&message, &k);
        match err {
            KeyringError::Parse { errors, path: p } => {
                assert_eq!(p, path);
                assert_eq!(errors.len(), 2);
            }
            other => panic!("unexpected {other:?}"),
        }

        let missing = dir.path().join("missing");
        match Keyring::load(&missing).unwrap_err() {
            KeyringError::Io { path: p, source } => {
                assert_eq!(p, missing);
                assert_eq!(source.kind(), io::ErrorKind::NotFound);
            }
            other => panic!("unexpected {other:?}"),
        }
        let message = Keyring::load(&missing).unwrap_err().to_string();
        assert!(message.starts_with("cannot read keyring "), "{message}");
        assert!(message.contains("missing"), "{message}");
    }

    #[test]
    fn save_creates_0600_file_in_0700_dir() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("etc").join("entropykey").join("keyring");
        let mut ring = Keyring::new();
        ring.set(serial(), key(1));
        ring.save(&path).unwrap();
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().unwrap()), 0o700);
        assert_eq!(mode(&dir.path().join("etc")), 0o700);
        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            format!("{SERIAL} {}\n", pem(&key(1)))
        );
        let loaded = Keyring::load(&path).unwrap();
        assert!(same(&loaded.get(&serial()).unwrap(), &key(1)));
        assert!(leftovers(path.parent().unwrap()).is_empty());
        assert_eq!(check_permissions(&path).unwrap(), None);
    }

    #[test]
    fn save_over_existing_keeps_other_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyring");
        let s2 = other_serial(2);
        let original = format!(
            "# Do not edit this directly, this file is managed by ekey-setkey\n\
             {SERIAL} {}\n\n# spare key\n{s2}\t{}\n",
            pem(&key(1)),
            pem(&key(2))
        );
        fs::write(&path, &original).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();

        let mut ring = Keyring::load(&path).unwrap();
        ring.set(serial(), key(7));
        ring.set(other_serial(3), key(3));
        ring.save(&path).unwrap();
        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            format!(
                "# Do not edit this directly, this file is managed by ekey-setkey\n\
                 {SERIAL} {}\n\n# spare key\n{s2}\t{}\n{} {}\n",
                pem(&key(7)),
                pem(&key(2)),
                other_serial(3),
                pem(&key(3))
            )
        );
        let loaded = Keyring::load(&path).unwrap();
        assert!(same(&loaded.get(&serial()).unwrap(), &key(7)));
        assert!(same(&loaded.get(&s2).unwrap(), &key(2)));
        assert!(same(&loaded.get(&other_serial(3)).unwrap(), &key(3)));
        assert_eq!(mode(&path), 0o600);
        assert!(leftovers(dir.path()).is_empty());
    }

    #[test]
    fn save_through_a_symlink_replaces_the_target() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real-keyring");
        let link = dir.path().join("keyring");
        fs::write(&real, "# old\n").unwrap();
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let mut ring = Keyring::load(&link).unwrap();
        ring.set(serial(), key(1));
        ring.save(&link).unwrap();
        assert!(
            fs::symlink_metadata(&link)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(
            fs::read_to_string(&real).unwrap(),
            format!("# old\n{SERIAL} {}\n", pem(&key(1)))
        );
    }

    #[test]
    fn failure_before_rename_leaves_old_file_intact() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyring");
        let original = format!("# old\n{SERIAL} {}\n", pem(&key(1)));
        fs::write(&path, &original).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();

        let mut ring = Keyring::load(&path).unwrap();
        ring.set(serial(), key(2));
        let mut seen = None;
        let err = ring
            .save_with(&path, |tmp| {
                // The temporary file is complete, private and next to the
                // keyring when the hook runs.
                assert_eq!(tmp.parent(), Some(dir.path()));
                let name = tmp.file_name().unwrap().to_string_lossy().into_owned();
                assert!(name.starts_with(".keyring.tmp."), "{name}");
                assert_eq!(mode(tmp), 0o600);
                assert_eq!(fs::read_to_string(tmp).unwrap(), ring.to_text().as_str());
                seen = Some(tmp.to_owned());
                Err(io::Error::other("injected failure"))
            })
            .unwrap_err();
        assert_eq!(err.to_string(), "injected failure");
        let tmp = seen.unwrap();
        assert!(!tmp.exists());
        assert_eq!(fs::read(&path).unwrap(), original.as_bytes());
        assert_eq!(mode(&path), 0o640);
        assert!(leftovers(dir.path()).is_empty());
    }

    #[test]
    fn failed_rename_removes_the_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        // A directory (not empty) where the keyring should be: rename fails.
        let path = dir.path().join("keyring");
        fs::create_dir(&path).unwrap();
        fs::write(path.join("inside"), "x").unwrap();
        let mut ring = Keyring::new();
        ring.set(serial(), key(1));
        let err = ring.save(&path).unwrap_err();
        assert!(err.to_string().starts_with("cannot rename "), "{err}");
        assert_no_key_text(&err.to_string(), &pem(&key(1)));
        assert!(leftovers(dir.path()).is_empty());
        assert!(path.join("inside").exists());
    }

    #[test]
    fn check_permissions_flags_group_and_other_access() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyring");
        fs::write(&path, "").unwrap();

        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let warning = check_permissions(&path).unwrap().unwrap();
        assert!(warning.contains("0644"), "{warning}");
        assert!(warning.contains("its group can read"), "{warning}");
        assert!(warning.contains("other users can read"), "{warning}");
        assert!(warning.contains("chmod 600"), "{warning}");

        fs::set_permissions(&path, fs::Permissions::from_mode(0o620)).unwrap();
        let warning = check_permissions(&path).unwrap().unwrap();
        assert!(warning.contains("its group can write"), "{warning}");
        assert!(!warning.contains("other users"), "{warning}");

        for ok in [0o600, 0o400, 0o700] {
            fs::set_permissions(&path, fs::Permissions::from_mode(ok)).unwrap();
            assert_eq!(check_permissions(&path).unwrap(), None, "{ok:o}");
        }
        assert!(check_permissions(&dir.path().join("missing")).is_err());
    }
}
