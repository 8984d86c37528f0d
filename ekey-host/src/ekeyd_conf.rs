//! The vendor daemon's configuration file, `/etc/entropykey/ekeyd.conf`
//! (`run --ekeyd-config FILE`, `migrate-ekeyd-config FILE`).
//!
//! ekeyd runs its configuration as Lua; real files are a list of calls,
//! one per line:
//!
//! ```text
//! Keyring "/etc/entropykey/keyring"
//! UnixControlSocket "/var/run/ekeyd.sock"
//! AddEntropyKeys "/dev/entropykey"
//! SetOutputToKernel(10)
//! EGDTCPSocket(8888, "127.0.0.1")
//! ```
//!
//! [`parse`] reads that subset: `Name "string"`, `Name 'string'` or
//! `Name(arg, ...)` with string, number, `true`, `false` and `nil`
//! arguments, `--` comments (and `--[[ ... ]]`), `;` between calls. Any
//! other Lua is an error naming its line, so nothing in the file is
//! silently skipped. [`Settings::from_directives`] maps the directives to
//! `run`'s options:
//!
//! | directive | option |
//! |---|---|
//! | `Keyring(FILE)` | `--keyring FILE` |
//! | `AddEntropyKey(DEVICE[, SERIAL])` | `--device DEVICE` (the serial is read from the key) |
//! | `AddEntropyKeys(DIR)` | `--device` for each entry of DIR now |
//! | `SetOutputToFile(FILE)` | `--output FILE` |
//! | `SetOutputToKernel(BITS)` | `--kernel=BITS` (0..8 bits credited per byte) |
//! | `EGDTCPSocket(PORT[, ADDR])` | `--egd-tcp ADDR:PORT` (ADDR 127.0.0.1 by default) |
//! | `EGDUnixSocket(PATH[, MODE[, USER[, GROUP]]])` | `--egd-unix PATH --egd-mode MODE --egd-group GID` |
//! | `UnixControlSocket(PATH)` | `--control PATH` |
//! | `TCPControlSocket(PORT)` | refused: unauthenticated |
//! | `Daemonise(BOOL)` | nothing: ekey-host stays in the foreground (systemd) |
//! | `SetUID(U)`, `SetGID(G)` | not supported: systemd's `User=`, `Group=` |
//!
//! Every directive not mapped, and every argument ignored, becomes a
//! [`Note`] naming its line; unknown directives are warnings.

use std::fmt;
use std::path::{Path, PathBuf};

/// A value in a call.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// A string literal.
    Str(String),
    /// A number.
    Num(f64),
    /// `true` or `false`.
    Bool(bool),
    /// `nil`.
    Nil,
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Str(s) => write!(f, "{s:?}"),
            Value::Num(n) => write!(f, "{n}"),
            Value::Bool(b) => write!(f, "{b}"),
            Value::Nil => f.write_str("nil"),
        }
    }
}

/// One call of the file.
#[derive(Clone, Debug, PartialEq)]
pub struct Directive {
    /// Its line (from 1).
    pub line: usize,
    /// The function called.
    pub name: String,
    /// Its arguments.
    pub args: Vec<Value>,
}

/// Why a file cannot be used.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfError {
    /// Not the Lua subset ekeyd configurations use.
    #[error("line {line}: {why}")]
    Syntax {
        /// Where.
        line: usize,
        /// What was expected.
        why: String,
    },
    /// A directive with arguments it cannot take.
    #[error("line {line}: {name}: {why}")]
    Argument {
        /// Where.
        line: usize,
        /// The directive.
        name: String,
        /// What is wrong.
        why: String,
    },
    /// The file cannot be read.
    #[error("{0}")]
    Read(String),
}

#[derive(Clone, Debug, PartialEq)]
enum Token {
    Name(String),
    Value(Value),
    Open,
    Close,
    Comma,
    Semi,
}

/// Splits `text` into tokens with their lines.
fn tokens(text: &str) -> Result<Vec<(usize, Token)>, ConfError> {
    let mut out = Vec::new();
    let mut line = 1;
    let mut chars = text.chars().peekable();
    let err = |line, why: &str| ConfError::Syntax {
        line,
        why: why.to_string(),
    };
    while let Some(c) = chars.next() {
        match c {
            '\n' => line += 1,
            c if c.is_whitespace() => {}
            '-' if chars.peek() == Some(&'-') => {
                chars.next();
                line += skip_comment(&mut chars)
                    .ok_or_else(|| err(line, "a --[[ comment that never ends"))?;
            }
            '(' => out.push((line, Token::Open)),
            ')' => out.push((line, Token::Close)),
            ',' => out.push((line, Token::Comma)),
            ';' => out.push((line, Token::Semi)),
            '"' | '\'' => {
                let s = string_literal(&mut chars, c).map_err(|why| err(line, why))?;
                out.push((line, Token::Value(Value::Str(s))));
            }
            c if c.is_ascii_digit() || c == '-' || c == '.' => {
                let mut s = c.to_string();
                while chars
                    .peek()
                    .is_some_and(|c| c.is_ascii_alphanumeric() || *c == '.')
                {
                    s.extend(chars.next());
                }
                let n = s
                    .parse::<f64>()
                    .ok()
                    .filter(|n| n.is_finite())
                    .ok_or_else(|| err(line, &format!("{s:?} is not a number")))?;
                out.push((line, Token::Value(Value::Num(n))));
            }
            c if c.is_ascii_alphabetic() || c == '_' => {
                let mut s = c.to_string();
                while chars
                    .peek()
                    .is_some_and(|c| c.is_ascii_alphanumeric() || *c == '_')
                {
                    s.extend(chars.next());
                }
                out.push((
                    line,
                    match s.as_str() {
                        "true" => Token::Value(Value::Bool(true)),
                        "false" => Token::Value(Value::Bool(false)),
                        "nil" => Token::Value(Value::Nil),
                        _ => Token::Name(s),
                    },
                ));
            }
            c => {
                return Err(err(
                    line,
                    &format!(
                        "{c:?}: only calls such as Keyring \"FILE\" or EGDTCPSocket(8888) are understood"
                    ),
                ));
            }
        }
    }
    Ok(out)
}

type Chars<'a> = std::iter::Peekable<std::str::Chars<'a>>;

/// Skips a comment after its `--`: to the end of the line, or a `--[[ …
/// ]]` block; the newlines it skipped, or `None` for a block never closed.
fn skip_comment(chars: &mut Chars<'_>) -> Option<usize> {
    let rest: String = chars.clone().take(2).collect();
    if rest != "[[" {
        while chars.peek().is_some_and(|&c| c != '\n') {
            chars.next();
        }
        return Some(0);
    }
    let (mut lines, mut prev) = (0, ' ');
    for c in chars.by_ref() {
        if c == '\n' {
            lines += 1;
        }
        if prev == ']' && c == ']' {
            return Some(lines);
        }
        prev = c;
    }
    None
}

/// The rest of a string literal opened by `quote`, on one line.
fn string_literal(chars: &mut Chars<'_>, quote: char) -> Result<String, &'static str> {
    let mut s = String::new();
    loop {
        match chars.next() {
            None | Some('\n') => return Err("a string that never ends"),
            Some(q) if q == quote => return Ok(s),
            Some('\\') => match chars.next() {
                Some(e @ ('\\' | '"' | '\'')) => s.push(e),
                _ => return Err("an escape other than \\\\ \\\" \\'"),
            },
            // Paths and addresses have none, and they would break the
            // lines `migrate-ekeyd-config` prints.
            Some(ch) if ch.is_control() => return Err("a control character in a string"),
            Some(ch) => s.push(ch),
        }
    }
}

/// Reads the calls of an ekeyd configuration (see the module docs).
pub fn parse(text: &str) -> Result<Vec<Directive>, ConfError> {
    let toks = tokens(text)?;
    let mut it = toks.into_iter().peekable();
    let mut out = Vec::new();
    let syntax = |line, why: &str| ConfError::Syntax {
        line,
        why: why.to_string(),
    };
    while let Some((line, tok)) = it.next() {
        let name = match tok {
            Token::Semi => continue,
            Token::Name(name) => name,
            _ => return Err(syntax(line, "expected a directive such as Keyring")),
        };
        let args = match it.next() {
            Some((_, Token::Value(v @ Value::Str(_)))) => vec![v],
            Some((_, Token::Open)) => {
                let mut args = Vec::new();
                loop {
                    match it.next() {
                        Some((_, Token::Close)) if args.is_empty() => break,
                        Some((_, Token::Value(v))) => args.push(v),
                        Some((l, _)) => {
                            return Err(syntax(l, &format!("{name}: expected a value")));
                        }
                        None => return Err(syntax(line, &format!("{name}: no closing ')'"))),
                    }
                    match it.next() {
                        Some((_, Token::Comma)) => {}
                        Some((_, Token::Close)) => break,
                        Some((l, _)) => {
                            return Err(syntax(l, &format!("{name}: expected ',' or ')'")));
                        }
                        None => return Err(syntax(line, &format!("{name}: no closing ')'"))),
                    }
                }
                args
            }
            _ => {
                return Err(syntax(
                    line,
                    &format!("{name}: expected \"STRING\" or (ARGUMENTS) after it"),
                ));
            }
        };
        out.push(Directive { line, name, args });
    }
    Ok(out)
}

/// Something the mapping says about a directive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    /// The directive's line.
    pub line: usize,
    /// Whether it is a warning (something in the file is not done).
    pub warning: bool,
    /// What happens.
    pub text: String,
}

/// What an ekeyd configuration asks for, in `run`'s options.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Settings {
    /// `--keyring`.
    pub keyring: Option<PathBuf>,
    /// `--device`, in order.
    pub devices: Vec<PathBuf>,
    /// `--output`.
    pub output: Option<PathBuf>,
    /// `--kernel=BITS`.
    pub kernel: Option<u8>,
    /// `--egd-tcp`.
    pub egd_tcp: Option<String>,
    /// `--egd-unix`.
    pub egd_unix: Option<PathBuf>,
    /// `--egd-mode` (octal).
    pub egd_mode: Option<String>,
    /// `--egd-group`.
    pub egd_group: Option<u32>,
    /// `--control`.
    pub control: Option<PathBuf>,
    /// What was not mapped, or mapped with a change.
    pub notes: Vec<Note>,
}

fn arg_error(d: &Directive, why: impl Into<String>) -> ConfError {
    ConfError::Argument {
        line: d.line,
        name: d.name.clone(),
        why: why.into(),
    }
}

fn string(d: &Directive, i: usize, what: &str) -> Result<String, ConfError> {
    match d.args.get(i) {
        Some(Value::Str(s)) if !s.is_empty() => Ok(s.clone()),
        Some(v) => Err(arg_error(d, format!("{what} must be a string, not {v}"))),
        None => Err(arg_error(d, format!("needs {what}"))),
    }
}

/// A whole number in `range`, given as a number or a string of digits.
fn whole(
    d: &Directive,
    i: usize,
    what: &str,
    range: std::ops::RangeInclusive<u32>,
) -> Result<u32, ConfError> {
    let n = match d.args.get(i) {
        Some(Value::Num(n)) => Some(*n),
        Some(Value::Str(s)) => s.trim().parse::<f64>().ok(),
        _ => None,
    };
    n.filter(|n| {
        n.fract() == 0.0 && *n >= f64::from(*range.start()) && *n <= f64::from(*range.end())
    })
    .map(|n| n as u32)
    .ok_or_else(|| {
        arg_error(
            d,
            format!(
                "{what} must be a whole number in {}..={}",
                range.start(),
                range.end()
            ),
        )
    })
}

fn present(d: &Directive, i: usize) -> bool {
    !matches!(d.args.get(i), None | Some(Value::Nil))
}

impl Settings {
    /// Maps `directives`; `entries(dir)` lists a directory's entries (for
    /// `AddEntropyKeys`), `group(name)` finds a group's id.
    pub fn from_directives(
        directives: &[Directive],
        entries: impl Fn(&Path) -> std::io::Result<Vec<PathBuf>>,
        group: impl Fn(&str) -> Option<u32>,
    ) -> Result<Self, ConfError> {
        let mut s = Settings::default();
        // Directives that set one thing: the last one given wins, as in
        // ekeyd, and the earlier one is named.
        let mut once = std::collections::HashMap::new();
        for d in directives {
            const ONCE: [&str; 6] = [
                "Keyring",
                "SetOutputToFile",
                "SetOutputToKernel",
                "EGDTCPSocket",
                "EGDUnixSocket",
                "UnixControlSocket",
            ];
            if ONCE.contains(&d.name.as_str())
                && let Some(first) = once.insert(d.name.clone(), d.line)
            {
                s.note(
                    d,
                    true,
                    format!("given again (first on line {first}); this one is used"),
                );
            }
            s.take(d, &entries, &group)?;
        }
        Ok(s)
    }

    fn note(&mut self, d: &Directive, warning: bool, text: impl fmt::Display) {
        self.notes.push(Note {
            line: d.line,
            warning,
            text: format!("{}: {text}", d.name),
        });
    }

    /// Maps one directive.
    fn take(
        &mut self,
        d: &Directive,
        entries: impl Fn(&Path) -> std::io::Result<Vec<PathBuf>>,
        group: impl Fn(&str) -> Option<u32>,
    ) -> Result<(), ConfError> {
        match d.name.as_str() {
            "Keyring" => self.keyring = Some(string(d, 0, "the keyring file")?.into()),
            "AddEntropyKey" => {
                self.devices.push(string(d, 0, "the device")?.into());
                if present(d, 1) {
                    self.note(d, false, "the serial is not needed: ekey-host reads it from the key and looks it up in the keyring");
                }
            }
            "AddEntropyKeys" => self.take_key_dir(d, entries)?,
            "SetOutputToFile" => self.output = Some(string(d, 0, "the file")?.into()),
            "SetOutputToKernel" => self.kernel = Some(whole(d, 0, "the bits per byte", 0..=8)? as u8),
            "EGDTCPSocket" => {
                let port = whole(d, 0, "the port", 1..=65535)?;
                let addr = if present(d, 1) {
                    string(d, 1, "the address")?
                } else {
                    "127.0.0.1".into()
                };
                let host = if addr.contains(':') && !addr.starts_with('[') {
                    format!("[{addr}]")
                } else {
                    addr
                };
                self.egd_tcp = Some(format!("{host}:{port}"));
            }
            "EGDUnixSocket" => self.take_egd_unix(d, group)?,
            "UnixControlSocket" => self.control = Some(string(d, 0, "the socket path")?.into()),
            "TCPControlSocket" => self.note(d, true, "refused: a TCP control socket is unauthenticated (anyone on the host could release or re-key keys); use UnixControlSocket (mode 0600)"),
            "Daemonise" => self.note(d, false, "ignored: ekey-host stays in the foreground, for systemd (Type=notify)"),
            "SetUID" | "SetGID" => self.note(d, true, "not supported: run ekey-host as that user with systemd's User= and Group= (see contrib/ekey-host.service)"),
            _ => self.note(d, true, "not a directive ekey-host knows; ignored"),
        }
        Ok(())
    }

    /// `AddEntropyKeys(DIR)`: the entries of DIR now.
    fn take_key_dir(
        &mut self,
        d: &Directive,
        entries: impl Fn(&Path) -> std::io::Result<Vec<PathBuf>>,
    ) -> Result<(), ConfError> {
        let dir = PathBuf::from(string(d, 0, "the directory")?);
        match entries(&dir) {
            Ok(mut found) => {
                found.sort();
                let text = format!(
                    "{} device(s) in {} now; keys on USB are found (and hot-plugged) without it",
                    found.len(),
                    dir.display()
                );
                self.note(d, false, text);
                self.devices.extend(found);
            }
            Err(e) => {
                let text = format!(
                    "cannot list {}: {e}; keys on USB are found without it",
                    dir.display()
                );
                self.note(d, true, text);
            }
        }
        Ok(())
    }

    /// `EGDUnixSocket(PATH[, MODE[, USER[, GROUP]]])`.
    fn take_egd_unix(
        &mut self,
        d: &Directive,
        group: impl Fn(&str) -> Option<u32>,
    ) -> Result<(), ConfError> {
        self.egd_unix = Some(string(d, 0, "the socket path")?.into());
        if present(d, 1) {
            let mode = string(d, 1, "the mode (octal, as a string)")?;
            if u32::from_str_radix(mode.trim(), 8).map_or(true, |m| m > 0o777) {
                return Err(arg_error(d, format!("{mode:?} is not an octal mode")));
            }
            self.egd_mode = Some(mode.trim().to_string());
        }
        if matches!(d.args.get(2), Some(Value::Str(u)) if !u.is_empty()) {
            self.note(
                d,
                true,
                "the socket's owner is not changed: it is the daemon's user",
            );
        }
        if present(d, 3) {
            let name = string(d, 3, "the group")?;
            let gid = name
                .parse()
                .ok()
                .or_else(|| group(&name))
                .ok_or_else(|| arg_error(d, format!("no group {name:?} on this machine")))?;
            self.egd_group = Some(gid);
        }
        Ok(())
    }

    /// Reads and maps the file at `path`.
    pub fn read(path: &Path) -> Result<Self, ConfError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfError::Read(format!("{}: {e}", path.display())))?;
        let directives = parse(&text)?;
        Settings::from_directives(&directives, list_dir, group_id)
    }

    /// The `run` options, one word each (unquoted).
    pub fn args(&self) -> Vec<String> {
        let mut a = Vec::new();
        let mut push = |flag: &str, v: String| {
            a.push(flag.to_string());
            a.push(v);
        };
        if let Some(k) = &self.keyring {
            push("--keyring", k.display().to_string());
        }
        for d in &self.devices {
            push("--device", d.display().to_string());
        }
        if let Some(o) = &self.output {
            push("--output", o.display().to_string());
        }
        if let Some(e) = &self.egd_tcp {
            push("--egd-tcp", e.clone());
        }
        if let Some(u) = &self.egd_unix {
            push("--egd-unix", u.display().to_string());
        }
        if let Some(m) = &self.egd_mode {
            push("--egd-mode", m.clone());
        }
        if let Some(g) = self.egd_group {
            push("--egd-group", g.to_string());
        }
        if let Some(c) = &self.control {
            push("--control", c.display().to_string());
        }
        if let Some(bits) = self.kernel {
            a.push(format!("--kernel={bits}"));
        }
        a
    }
}

/// The entries of `dir` not starting with '.', as ekeyd's
/// `AddEntropyKeys` takes them.
fn list_dir(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if !e.file_name().to_string_lossy().starts_with('.') {
            out.push(e.path());
        }
    }
    Ok(out)
}

#[cfg(not(unix))]
fn group_id(_: &str) -> Option<u32> {
    None
}

#[cfg(unix)]
fn group_id(name: &str) -> Option<u32> {
    nix::unistd::Group::from_name(name)
        .ok()
        .flatten()
        .map(|g| g.gid.as_raw())
}

/// `word` quoted for a POSIX shell if it needs it.
fn shell_word(word: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_./:=@%+,".contains(c);
    if !word.is_empty() && word.chars().all(plain) {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', "'\\''"))
    }
}

/// `word` quoted for a systemd command line if it needs it.
fn systemd_word(word: &str) -> String {
    let plain = |c: char| !c.is_whitespace() && !"\"'\\;$%".contains(c);
    if !word.is_empty() && word.chars().all(plain) {
        word.to_string()
    } else {
        let escaped = word
            .replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('%', "%%")
            .replace('$', "$$");
        format!("\"{escaped}\"")
    }
}

/// `migrate-ekeyd-config`'s text: the notes, the command line, and a
/// systemd drop-in running it, for the ekey-host binary at `bin`.
pub fn migration(s: &Settings, file: &Path, bin: &str) -> String {
    let mut out = format!("# From {}:\n", file.display());
    for n in &s.notes {
        let kind = if n.warning { "warning" } else { "note" };
        out.push_str(&format!("# {kind}: line {}: {}\n", n.line, n.text));
    }
    let mut words = vec![bin.to_string(), "run".to_string()];
    words.extend(s.args());
    let shell: Vec<String> = words.iter().map(|w| shell_word(w)).collect();
    out.push_str("\n# The command line:\n");
    out.push_str(&shell.join(" "));
    out.push_str("\n\n# A systemd drop-in, /etc/systemd/system/ekey-host.service.d/ekeyd.conf\n");
    out.push_str("# (then: systemctl daemon-reload && systemctl restart ekey-host):\n");
    let unit: Vec<String> = words.iter().map(|w| systemd_word(w)).collect();
    out.push_str(&format!(
        "[Service]\nExecStart=\nExecStart={}\n",
        unit.join(" ")
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A configuration laid out as the vendor's `ekeyd.conf.in` is (our own
    /// text, from its documented directives).
    const VENDOR_STYLE: &str = r#"-- Configuration for the Entropy Key daemon.
-- Lines starting "--" are comments.

-- Daemonise (run in the background); the default.
Daemonise(true)

-- Where the long-term keys are kept.
Keyring "/etc/entropykey/keyring"

-- The control socket ekeydctl talks to.
UnixControlSocket "/var/run/ekeyd.sock"

--[[ Keys:
     every node udev makes for them ]]
AddEntropyKeys "/dev/entropykey"
AddEntropyKey("/dev/ttyACM3", "MTIzNDU2Nzg5MDEy")

-- Output: the kernel's pool, crediting this many bits per byte.
SetOutputToKernel(7)

-- EGD for virtual machines:
EGDTCPSocket(8888, "0.0.0.0");
EGDUnixSocket("/var/run/entropykey/egd", "0660", "", "42")
TCPControlSocket(4950)
SetUID "ekeyd"
Foldback()
"#;

    fn dev_dir(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
        assert_eq!(dir, Path::new("/dev/entropykey"));
        Ok(vec![dir.join("MTIz"), dir.join("AAAA")])
    }

    #[test]
    fn a_vendor_style_file_maps_to_run_options_with_notes_by_line() {
        let d = parse(VENDOR_STYLE).unwrap();
        assert_eq!(d.len(), 11);
        assert_eq!(
            d[1],
            Directive {
                line: 8,
                name: "Keyring".into(),
                args: vec![Value::Str("/etc/entropykey/keyring".into())],
            }
        );
        assert_eq!(d[3].line, 15, "after the block comment");
        let s = Settings::from_directives(&d, dev_dir, |_| None).unwrap();
        assert_eq!(
            s.keyring.as_deref(),
            Some(Path::new("/etc/entropykey/keyring"))
        );
        assert_eq!(
            s.devices,
            [
                PathBuf::from("/dev/entropykey/AAAA"),
                "/dev/entropykey/MTIz".into(),
                "/dev/ttyACM3".into()
            ]
        );
        assert_eq!(s.kernel, Some(7));
        assert_eq!(s.egd_tcp.as_deref(), Some("0.0.0.0:8888"));
        assert_eq!(
            s.egd_unix.as_deref(),
            Some(Path::new("/var/run/entropykey/egd"))
        );
        assert_eq!(
            (s.egd_mode.as_deref(), s.egd_group),
            (Some("0660"), Some(42))
        );
        assert_eq!(s.control.as_deref(), Some(Path::new("/var/run/ekeyd.sock")));
        let warnings: Vec<(usize, &str)> = s
            .notes
            .iter()
            .filter(|n| n.warning)
            .map(|n| (n.line, n.text.split(':').next().unwrap()))
            .collect();
        assert_eq!(
            warnings,
            [(24, "TCPControlSocket"), (25, "SetUID"), (26, "Foldback")]
        );
        assert!(
            s.notes
                .iter()
                .any(|n| n.line == 5 && !n.warning && n.text.starts_with("Daemonise"))
        );
        assert!(
            s.notes
                .iter()
                .any(|n| n.line == 16 && n.text.contains("serial is not needed"))
        );
        assert_eq!(
            s.args(),
            [
                "--keyring",
                "/etc/entropykey/keyring",
                "--device",
                "/dev/entropykey/AAAA",
                "--device",
                "/dev/entropykey/MTIz",
                "--device",
                "/dev/ttyACM3",
                "--egd-tcp",
                "0.0.0.0:8888",
                "--egd-unix",
                "/var/run/entropykey/egd",
                "--egd-mode",
                "0660",
                "--egd-group",
                "42",
                "--control",
                "/var/run/ekeyd.sock",
                "--kernel=7",
            ]
        );
    }

    #[test]
    fn bad_files_say_where_and_why() {
        for (text, want) in [
            ("Keyring \"/x", "line 1: a string that never ends"),
            ("x = 1", "line 1: '='"),
            (
                "\n\nEGDTCPSocket(8888",
                "line 3: EGDTCPSocket: no closing ')'",
            ),
            ("EGDTCPSocket(8888 9)", "expected ',' or ')'"),
            (
                "if true then Keyring 'x' end",
                "line 1: if: expected \"STRING\"",
            ),
            (
                "--[[ never closed\n",
                "line 1: a --[[ comment that never ends",
            ),
            ("Keyring(", "no closing ')'"),
            ("Keyring \"/k\\n\"", "an escape other than"),
            ("Keyring \"/k\tx\"", "line 1: a control character"),
        ] {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(want), "{text:?}: {err}");
        }
        let map = |text: &str| {
            Settings::from_directives(&parse(text).unwrap(), |_| Ok(Vec::new()), |_| None)
                .unwrap_err()
                .to_string()
        };
        for (text, want) in [
            (
                "SetOutputToKernel(9)",
                "line 1: SetOutputToKernel: the bits per byte must be a whole number in 0..=8",
            ),
            ("SetOutputToKernel(6.5)", "whole number"),
            ("EGDTCPSocket(0)", "the port"),
            ("Keyring(42)", "must be a string"),
            ("AddEntropyKey()", "needs the device"),
            ("EGDUnixSocket('/s', '999')", "not an octal mode"),
            (
                "EGDUnixSocket('/s', '0660', '', 'nosuchgroup')",
                "no group \"nosuchgroup\"",
            ),
        ] {
            let err = map(text);
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }

    #[test]
    fn a_directive_given_twice_is_named() {
        let d = parse("Keyring \"/a\"\nEGDTCPSocket(1)\nKeyring \"/b\"\n").unwrap();
        let s = Settings::from_directives(&d, |_| Ok(Vec::new()), |_| None).unwrap();
        assert_eq!(s.keyring.as_deref(), Some(Path::new("/b")));
        assert_eq!(
            s.notes,
            [Note {
                line: 3,
                warning: true,
                text: "Keyring: given again (first on line 1); this one is used".into(),
            }]
        );
    }

    #[test]
    fn migration_prints_a_quoted_command_line_and_a_drop_in() {
        let s = Settings {
            keyring: Some("/etc/entropy key/keyring".into()),
            output: Some("/var/lib/it's".into()),
            kernel: Some(5),
            notes: vec![Note {
                line: 3,
                warning: true,
                text: "SetUID: not supported".into(),
            }],
            ..Settings::default()
        };
        let text = migration(
            &s,
            Path::new("/etc/entropykey/ekeyd.conf"),
            "/usr/bin/ekey-host",
        );
        assert!(
            text.contains("# warning: line 3: SetUID: not supported"),
            "{text}"
        );
        assert!(
            text.contains(
                "/usr/bin/ekey-host run --keyring '/etc/entropy key/keyring' --output '/var/lib/it'\\''s' --kernel=5"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "ExecStart=\nExecStart=/usr/bin/ekey-host run --keyring \"/etc/entropy key/keyring\" --output \"/var/lib/it's\" --kernel=5"
            ),
            "{text}"
        );
    }
}
