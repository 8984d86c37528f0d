//! Information items, the payload of `I>` frames.
//!
//! The payload is ASCII: space-separated items `<letter><n>[:<n>]*`,
//! followed by spaces as padding. The key sends four kinds:
//!
//! | item | numbers | type |
//! |---|---|---|
//! | `T` | 1 | [`Temperature`], tenths of a kelvin |
//! | `V` | 1 | [`Voltage`], millivolts |
//! | `F` | 5 | [`Fips`], FIPS 140-2 test counters |
//! | `S` | 8, then a failure-mode character | [`Shannon`], entropy estimates |
//!
//! ```
//! use ekey_proto::wire::info::{parse_items, InfoItem, Temperature, Voltage};
//!
//! let mut items = parse_items(b"T03143 V03254                      ");
//! assert_eq!(items.next(), Some(Ok(InfoItem::Temperature(Temperature { deci_kelvin: 3143 }))));
//! assert_eq!(items.next(), Some(Ok(InfoItem::Voltage(Voltage { millivolts: 3254 }))));
//! assert_eq!(items.next(), None);
//! ```
use core::fmt;
use core::iter::FusedIterator;

/// Longest number accepted: nine digits.
const MAX_DIGITS: usize = 9;
/// Largest value nine digits can hold; [`InfoItem::write_to`] refuses more.
const MAX_NUMBER: u32 = 999_999_999;
/// Payload capacity of a frame.
const PAYLOAD_LEN: usize = 50;

/// The key's health verdict, the last field of an `S` item. Anything but
/// [`FailureMode::Ok`] means the key has locked itself out and sends no
/// entropy until it is powered down.
///
/// ```
/// use ekey_proto::wire::info::FailureMode;
/// let m = FailureMode::from_char(b'8');
/// assert_eq!(m, FailureMode::TemperatureHigh);
/// assert!(!m.is_ok());
/// assert_eq!(m.to_string(), "temperature above threshold");
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum FailureMode {
    /// `0`: all tests pass.
    Ok,
    /// `1`: the left generator is no longer random.
    LeftNotRandom,
    /// `2`: the right generator is no longer random.
    RightNotRandom,
    /// `3`: the two generators are correlated.
    Correlated,
    /// `4`: the left generator is strongly biased.
    LeftBiased,
    /// `5`: the right generator is strongly biased.
    RightBiased,
    /// `7`: core temperature below threshold.
    TemperatureLow,
    /// `8`: core temperature above threshold.
    TemperatureHigh,
    /// `9`: FIPS 140-2 failure rate above threshold.
    FipsRate,
    /// `A`: supply voltage too low.
    VoltageLow,
    /// `B`: supply voltage too high.
    VoltageHigh,
    /// Any other character (held as sent).
    Unknown(u8),
}

impl FailureMode {
    /// The mode for a failure-mode character; unlisted characters give
    /// [`FailureMode::Unknown`].
    ///
    /// ```
    /// use ekey_proto::wire::info::FailureMode;
    /// assert_eq!(FailureMode::from_char(b'0'), FailureMode::Ok);
    /// assert_eq!(FailureMode::from_char(b'A'), FailureMode::VoltageLow);
    /// assert_eq!(FailureMode::from_char(b'6'), FailureMode::Unknown(b'6'));
    /// ```
    pub const fn from_char(c: u8) -> Self {
        match c {
            b'0' => Self::Ok,
            b'1' => Self::LeftNotRandom,
            b'2' => Self::RightNotRandom,
            b'3' => Self::Correlated,
            b'4' => Self::LeftBiased,
            b'5' => Self::RightBiased,
            b'7' => Self::TemperatureLow,
            b'8' => Self::TemperatureHigh,
            b'9' => Self::FipsRate,
            b'A' => Self::VoltageLow,
            b'B' => Self::VoltageHigh,
            other => Self::Unknown(other),
        }
    }

    /// The character the key sends for this mode.
    ///
    /// ```
    /// use ekey_proto::wire::info::FailureMode;
    /// assert_eq!(FailureMode::VoltageHigh.to_char(), b'B');
    /// ```
    pub const fn to_char(self) -> u8 {
        match self {
            Self::Ok => b'0',
            Self::LeftNotRandom => b'1',
            Self::RightNotRandom => b'2',
            Self::Correlated => b'3',
            Self::LeftBiased => b'4',
            Self::RightBiased => b'5',
            Self::TemperatureLow => b'7',
            Self::TemperatureHigh => b'8',
            Self::FipsRate => b'9',
            Self::VoltageLow => b'A',
            Self::VoltageHigh => b'B',
            Self::Unknown(c) => c,
        }
    }

    /// `true` for [`FailureMode::Ok`] only.
    pub const fn is_ok(self) -> bool {
        matches!(self, Self::Ok)
    }

    /// What the mode means, in plain words for a log line.
    ///
    /// ```
    /// use ekey_proto::wire::info::FailureMode;
    /// assert_eq!(FailureMode::Correlated.description(), "generators correlated");
    /// ```
    pub const fn description(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::LeftNotRandom => "left generator no longer random",
            Self::RightNotRandom => "right generator no longer random",
            Self::Correlated => "generators correlated",
            Self::LeftBiased => "left generator strongly biased",
            Self::RightBiased => "right generator strongly biased",
            Self::TemperatureLow => "temperature below threshold",
            Self::TemperatureHigh => "temperature above threshold",
            Self::FipsRate => "FIPS 140-2 failure rate above threshold",
            Self::VoltageLow => "supply voltage too low",
            Self::VoltageHigh => "supply voltage too high",
            Self::Unknown(_) => "unknown failure mode",
        }
    }
}

/// The [`description`](FailureMode::description); an unknown mode also
/// shows its character, e.g. `unknown failure mode 'C'`.
impl fmt::Display for FailureMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.description())?;
        match *self {
            Self::Unknown(c) if c.is_ascii_graphic() => write!(f, " '{}'", char::from(c)),
            Self::Unknown(c) => write!(f, " 0x{c:02x}"),
            _ => Ok(()),
        }
    }
}

/// Core temperature (`T` item), in tenths of a kelvin.
///
/// ```
/// use ekey_proto::wire::info::Temperature;
/// let t = Temperature { deci_kelvin: 3150 };
/// assert_eq!(t.millicelsius(), 41_850);
/// assert!((t.celsius() - 41.85).abs() < 0.001);
/// assert_eq!(t.kelvin(), 315.0);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Temperature {
    /// Tenths of a kelvin, as sent (`T03150` is 315.0 K).
    pub deci_kelvin: u32,
}

impl Temperature {
    /// Kelvin.
    pub fn kelvin(self) -> f32 {
        (f64::from(self.deci_kelvin) / 10.0) as f32
    }

    /// Degrees Celsius.
    pub fn celsius(self) -> f32 {
        (self.millicelsius() as f64 / 1000.0) as f32
    }

    /// Thousandths of a degree Celsius (exact).
    pub fn millicelsius(self) -> i64 {
        // At most 429_496_729_500: no overflow in i64.
        i64::from(self.deci_kelvin) * 100 - 273_150
    }
}

/// Supply voltage (`V` item), in millivolts.
///
/// ```
/// use ekey_proto::wire::info::Voltage;
/// assert_eq!(Voltage { millivolts: 3254 }.volts(), 3.254);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Voltage {
    /// Millivolts, as sent.
    pub millivolts: u32,
}

impl Voltage {
    /// Volts.
    pub fn volts(self) -> f32 {
        (f64::from(self.millivolts) / 1000.0) as f32
    }
}

/// FIPS 140-2 counters since reset (`F` item, five numbers in this order).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Fips {
    /// 20,000-bit blocks tested.
    pub blocks: u32,
    /// Blocks that failed any test.
    pub failures: u32,
    /// Monobit test failures.
    pub monobit: u32,
    /// Poker test failures.
    pub poker: u32,
    /// Runs (and long-run) test failures.
    pub runs: u32,
}

/// Entropy estimates of the current sample (`S` item). The key starts a
/// new sample every 80 kbit of raw data.
///
/// Estimates are in shannons for the whole sample; the `*_per_byte`
/// helpers give shannons per byte (at most 8), or `None` for samples of
/// 100 bytes or fewer, which ekeyd ignores too.
///
/// ```
/// use ekey_proto::wire::info::{parse_items, InfoItem};
/// let item = parse_items(b"S08052:23751:23792:23584:07112:20876:08063:24150:0").next();
/// let Some(Ok(InfoItem::Shannon(s))) = item else { panic!() };
/// assert_eq!(s.raw_bytes, 8052);
/// assert!(s.failure.is_ok());
/// let per_byte = s.left_per_byte().unwrap();
/// assert!((per_byte - 2.9497).abs() < 0.001);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Shannon {
    /// Raw bytes read in this sample.
    pub raw_bytes: u32,
    /// Estimate for the left generator's raw stream.
    pub left: u32,
    /// Estimate for the right generator's raw stream.
    pub right: u32,
    /// Estimate for the XOR of the two raw streams.
    pub xor: u32,
    /// Bytes of debiased left-generator data.
    pub debiased_left_bytes: u32,
    /// Estimate for the debiased left stream.
    pub debiased_left: u32,
    /// Bytes of debiased right-generator data.
    pub debiased_right_bytes: u32,
    /// Estimate for the debiased right stream.
    pub debiased_right: u32,
    /// The key's verdict.
    pub failure: FailureMode,
}

/// `estimate / bytes`, or `None` for 100 bytes or fewer.
fn per_byte(estimate: u32, bytes: u32) -> Option<f32> {
    if bytes <= 100 {
        return None;
    }
    Some((f64::from(estimate) / f64::from(bytes)) as f32)
}

impl Shannon {
    /// Left raw stream, shannons per raw byte.
    pub fn left_per_byte(&self) -> Option<f32> {
        per_byte(self.left, self.raw_bytes)
    }

    /// Right raw stream, shannons per raw byte.
    pub fn right_per_byte(&self) -> Option<f32> {
        per_byte(self.right, self.raw_bytes)
    }

    /// XOR of the raw streams, shannons per raw byte.
    pub fn xor_per_byte(&self) -> Option<f32> {
        per_byte(self.xor, self.raw_bytes)
    }

    /// Debiased left stream, shannons per debiased byte.
    pub fn debiased_left_per_byte(&self) -> Option<f32> {
        per_byte(self.debiased_left, self.debiased_left_bytes)
    }

    /// Debiased right stream, shannons per debiased byte.
    pub fn debiased_right_per_byte(&self) -> Option<f32> {
        per_byte(self.debiased_right, self.debiased_right_bytes)
    }
}

/// One information item.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum InfoItem {
    /// `T`: core temperature.
    Temperature(Temperature),
    /// `V`: supply voltage.
    Voltage(Voltage),
    /// `F`: FIPS 140-2 counters.
    Fips(Fips),
    /// `S`: entropy estimates and failure mode.
    Shannon(Shannon),
    /// A well-formed item with a letter this crate does not know.
    Unknown {
        /// The item's letter.
        letter: u8,
    },
}

/// Why an information item was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum InfoError {
    /// The payload holds no items at all (only padding).
    Empty,
    /// The item does not have the shape `<letter><n>[:<n>]*`: it does not
    /// start with an ASCII letter (`letter` is then the first byte), or the
    /// last field of an `S` item is not a single character.
    UnknownShape {
        /// The item's first byte.
        letter: u8,
    },
    /// A number is empty, longer than nine digits, or not all digits.
    BadNumber,
    /// A known item has the wrong number of `:`-separated fields.
    WrongCount {
        /// The item's letter.
        letter: u8,
        /// Fields it must have (`S`: 9, counting the failure mode).
        expected: u8,
        /// Fields found (saturating at 255).
        found: u8,
    },
    /// The item holds a byte that is not printable ASCII.
    NotAscii,
}

impl fmt::Display for InfoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Empty => f.write_str("information frame holds no items"),
            Self::UnknownShape { letter } if letter.is_ascii_graphic() => write!(
                f,
                "information item starting with '{}' is not <letter><number>[:<number>]*",
                char::from(letter)
            ),
            Self::UnknownShape { letter } => write!(
                f,
                "information item starting with byte 0x{letter:02x} is not <letter><number>[:<number>]*"
            ),
            Self::BadNumber => f.write_str(
                "information item has a number that is empty, not decimal, or over nine digits",
            ),
            Self::WrongCount {
                letter,
                expected,
                found,
            } => write!(
                f,
                "information item '{}' has {found} fields, expected {expected}",
                char::from(letter).escape_default()
            ),
            Self::NotAscii => f.write_str("information item holds a non-ASCII or control byte"),
        }
    }
}

impl core::error::Error for InfoError {}

/// Why [`InfoItem::write_to`] could not write an item.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum InfoWriteError {
    /// The item does not fit in the room left in the payload.
    Full,
    /// A number above 999,999,999, which no parser here would read back.
    NumberTooLarge,
    /// An [`InfoItem::Unknown`] (which has no numbers to write), or an `S`
    /// item whose failure-mode character is not printable ASCII or is `:`.
    NotWritable,
}

impl fmt::Display for InfoWriteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Full => "information item does not fit in the frame payload",
            Self::NumberTooLarge => "information item number above 999999999",
            Self::NotWritable => "information item cannot be written",
        })
    }
}

impl core::error::Error for InfoWriteError {}

/// Parses one decimal number of 1 to 9 digits.
fn parse_number(field: &[u8]) -> Result<u32, InfoError> {
    if field.is_empty() || field.len() > MAX_DIGITS {
        return Err(InfoError::BadNumber);
    }
    field.iter().try_fold(0u32, |acc, &b| {
        let digit = match b {
            b'0'..=b'9' => u32::from(b - b'0'),
            _ => return Err(InfoError::BadNumber),
        };
        acc.checked_mul(10)
            .and_then(|v| v.checked_add(digit))
            .ok_or(InfoError::BadNumber)
    })
}

/// Parses exactly `N` `:`-separated numbers.
fn parse_numbers<const N: usize>(letter: u8, body: &[u8]) -> Result<[u32; N], InfoError> {
    let found = body.split(|&b| b == b':').count();
    if found != N {
        return Err(InfoError::WrongCount {
            letter,
            expected: u8::try_from(N).unwrap_or(u8::MAX),
            found: u8::try_from(found).unwrap_or(u8::MAX),
        });
    }
    let mut numbers = [0u32; N];
    for (slot, field) in numbers.iter_mut().zip(body.split(|&b| b == b':')) {
        *slot = parse_number(field)?;
    }
    Ok(numbers)
}

/// Parses one item (no spaces around it), e.g. `T03150`.
///
/// # Errors
///
/// See [`InfoError`]; an empty slice gives [`InfoError::Empty`].
///
/// ```
/// use ekey_proto::wire::info::{parse_item, InfoError, InfoItem, Voltage};
/// assert_eq!(parse_item(b"V05010"), Ok(InfoItem::Voltage(Voltage { millivolts: 5010 })));
/// assert_eq!(parse_item(b"X1:2"), Ok(InfoItem::Unknown { letter: b'X' }));
/// assert_eq!(parse_item(b"V5x"), Err(InfoError::BadNumber));
/// assert_eq!(
///     parse_item(b"T1:2"),
///     Err(InfoError::WrongCount { letter: b'T', expected: 1, found: 2 })
/// );
/// ```
pub fn parse_item(item: &[u8]) -> Result<InfoItem, InfoError> {
    if !item.iter().all(u8::is_ascii_graphic) {
        return Err(InfoError::NotAscii);
    }
    let Some((&letter, body)) = item.split_first() else {
        return Err(InfoError::Empty);
    };
    if !letter.is_ascii_alphabetic() {
        return Err(InfoError::UnknownShape { letter });
    }
    Ok(match letter {
        b'T' => {
            let [deci_kelvin] = parse_numbers(letter, body)?;
            InfoItem::Temperature(Temperature { deci_kelvin })
        }
        b'V' => {
            let [millivolts] = parse_numbers(letter, body)?;
            InfoItem::Voltage(Voltage { millivolts })
        }
        b'F' => {
            let [blocks, failures, monobit, poker, runs] = parse_numbers(letter, body)?;
            InfoItem::Fips(Fips {
                blocks,
                failures,
                monobit,
                poker,
                runs,
            })
        }
        b'S' => {
            // Eight numbers, then `:` and one mode character.
            let found = body.split(|&b| b == b':').count();
            let Some((numbers, mode)) = body
                .iter()
                .rposition(|&b| b == b':')
                .and_then(|colon| body.split_at_checked(colon))
                .filter(|_| found == 9)
            else {
                return Err(InfoError::WrongCount {
                    letter,
                    expected: 9,
                    found: u8::try_from(found).unwrap_or(u8::MAX),
                });
            };
            let [b':', mode] = *mode else {
                return Err(InfoError::UnknownShape { letter });
            };
            let [
                raw_bytes,
                left,
                right,
                xor,
                debiased_left_bytes,
                debiased_left,
                debiased_right_bytes,
                debiased_right,
            ] = parse_numbers(letter, numbers)?;
            InfoItem::Shannon(Shannon {
                raw_bytes,
                left,
                right,
                xor,
                debiased_left_bytes,
                debiased_left,
                debiased_right_bytes,
                debiased_right,
                failure: FailureMode::from_char(mode),
            })
        }
        _ => {
            for field in body.split(|&b| b == b':') {
                parse_number(field)?;
            }
            InfoItem::Unknown { letter }
        }
    })
}

/// Iterates over the items of an `I>` payload; see [`parse_items`].
#[derive(Clone, Debug)]
pub struct InfoItems<'a> {
    rest: &'a [u8],
    started: bool,
}

/// Iterates over the space-separated items of an `I>` frame's payload.
///
/// Runs of spaces and trailing padding are skipped. Each item is parsed
/// on its own (see [`parse_item`]), so a bad item does not hide the ones
/// after it. A payload with no items at all yields one
/// `Err(`[`InfoError::Empty`]`)`.
///
/// ```
/// use ekey_proto::wire::info::{parse_items, Fips, InfoError, InfoItem};
/// let items: Vec<_> = parse_items(b"F07342:00000:00000:00000:00000   ").collect();
/// assert_eq!(
///     items,
///     [Ok(InfoItem::Fips(Fips { blocks: 7342, failures: 0, monobit: 0, poker: 0, runs: 0 }))]
/// );
/// assert_eq!(parse_items(b"    ").collect::<Vec<_>>(), [Err(InfoError::Empty)]);
/// ```
pub fn parse_items(payload: &[u8]) -> InfoItems<'_> {
    InfoItems {
        rest: payload,
        started: false,
    }
}

impl Iterator for InfoItems<'_> {
    type Item = Result<InfoItem, InfoError>;

    fn next(&mut self) -> Option<Self::Item> {
        let start = self
            .rest
            .iter()
            .position(|&b| b != b' ')
            .unwrap_or(self.rest.len());
        let rest = self.rest.get(start..).unwrap_or_default();
        let first = !self.started;
        self.started = true;
        if rest.is_empty() {
            self.rest = rest;
            return first.then_some(Err(InfoError::Empty));
        }
        let end = rest.iter().position(|&b| b == b' ').unwrap_or(rest.len());
        let (item, rest) = rest.split_at_checked(end).unwrap_or((rest, &[]));
        self.rest = rest;
        Some(parse_item(item))
    }
}

impl FusedIterator for InfoItems<'_> {}

/// Maps any capacity error to [`InfoWriteError::Full`].
fn full<E>(_: E) -> InfoWriteError {
    InfoWriteError::Full
}

/// Appends `v`, zero-padded to five digits (more digits if needed).
fn push_number(out: &mut heapless::Vec<u8, PAYLOAD_LEN>, v: u32) -> Result<(), InfoWriteError> {
    if v > MAX_NUMBER {
        return Err(InfoWriteError::NumberTooLarge);
    }
    let mut digits = [b'0'; MAX_DIGITS];
    let mut n = v;
    for d in digits.iter_mut().rev() {
        // `n % 10` is below 10.
        *d = b'0'.saturating_add(u8::try_from(n % 10).unwrap_or(0));
        n /= 10;
    }
    let significant = digits
        .iter()
        .position(|&d| d != b'0')
        .map_or(0, |p| MAX_DIGITS.saturating_sub(p));
    let width = significant.max(5);
    let text = digits
        .get(MAX_DIGITS.saturating_sub(width)..)
        .unwrap_or_default();
    out.extend_from_slice(text).map_err(full)
}

/// Appends `:`-separated numbers.
fn push_numbers(
    out: &mut heapless::Vec<u8, PAYLOAD_LEN>,
    numbers: &[u32],
) -> Result<(), InfoWriteError> {
    for (i, &n) in numbers.iter().enumerate() {
        if i > 0 {
            out.push(b':').map_err(full)?;
        }
        push_number(out, n)?;
    }
    Ok(())
}

impl InfoItem {
    /// Parses one item; same as [`parse_item`].
    ///
    /// # Errors
    ///
    /// See [`parse_item`].
    pub fn parse(item: &[u8]) -> Result<Self, InfoError> {
        parse_item(item)
    }

    /// Appends the item in the key's canonical form to `out` (a frame
    /// payload under construction): `T%05u`, `V%05u`,
    /// `F%05u:%05u:%05u:%05u:%05u`, or `S` with eight such numbers, `:` and
    /// the mode character. Numbers of more than five digits are written in
    /// full. The caller puts spaces between items and pads the payload.
    ///
    /// # Errors
    ///
    /// See [`InfoWriteError`]. On error `out` is left as it was.
    ///
    /// ```
    /// use ekey_proto::wire::info::{InfoItem, Temperature, Voltage};
    /// let mut out = heapless::Vec::<u8, 50>::new();
    /// InfoItem::Temperature(Temperature { deci_kelvin: 3143 }).write_to(&mut out)?;
    /// out.push(b' ').unwrap();
    /// InfoItem::Voltage(Voltage { millivolts: 3254 }).write_to(&mut out)?;
    /// assert_eq!(&out[..], b"T03143 V03254");
    /// # Ok::<(), ekey_proto::wire::info::InfoWriteError>(())
    /// ```
    pub fn write_to(&self, out: &mut heapless::Vec<u8, 50>) -> Result<(), InfoWriteError> {
        let start = out.len();
        let result = self.write_unchecked(out);
        if result.is_err() {
            out.truncate(start);
        }
        result
    }

    fn write_unchecked(
        &self,
        out: &mut heapless::Vec<u8, PAYLOAD_LEN>,
    ) -> Result<(), InfoWriteError> {
        match *self {
            Self::Temperature(Temperature { deci_kelvin }) => {
                out.push(b'T').map_err(full)?;
                push_number(out, deci_kelvin)
            }
            Self::Voltage(Voltage { millivolts }) => {
                out.push(b'V').map_err(full)?;
                push_number(out, millivolts)
            }
            Self::Fips(Fips {
                blocks,
                failures,
                monobit,
                poker,
                runs,
            }) => {
                out.push(b'F').map_err(full)?;
                push_numbers(out, &[blocks, failures, monobit, poker, runs])
            }
            Self::Shannon(s) => {
                let mode = s.failure.to_char();
                if !mode.is_ascii_graphic() || mode == b':' {
                    return Err(InfoWriteError::NotWritable);
                }
                out.push(b'S').map_err(full)?;
                push_numbers(
                    out,
                    &[
                        s.raw_bytes,
                        s.left,
                        s.right,
                        s.xor,
                        s.debiased_left_bytes,
                        s.debiased_left,
                        s.debiased_right_bytes,
                        s.debiased_right,
                    ],
                )?;
                out.extend_from_slice(&[b':', mode]).map_err(full)
            }
            Self::Unknown { .. } => Err(InfoWriteError::NotWritable),
        }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use proptest::prelude::*;
    use std::string::ToString;
    use std::vec::Vec;

    const S_ITEM: &[u8] = b"S08052:23751:23792:23584:07112:20876:08063:24150:0";

    fn all(payload: &[u8]) -> Vec<Result<InfoItem, InfoError>> {
        parse_items(payload).collect()
    }

    fn pad(items: &[u8]) -> [u8; PAYLOAD_LEN] {
        let mut p = [b' '; PAYLOAD_LEN];
        p[..items.len()].copy_from_slice(items);
        p
    }

    fn written(item: InfoItem) -> Vec<u8> {
        let mut out = heapless::Vec::<u8, 50>::new();
        item.write_to(&mut out).unwrap();
        out.to_vec()
    }

    #[test]
    fn real_frames() {
        assert_eq!(
            all(&pad(b"T03143 V03254")),
            [
                Ok(InfoItem::Temperature(Temperature { deci_kelvin: 3143 })),
                Ok(InfoItem::Voltage(Voltage { millivolts: 3254 })),
            ]
        );
        let fips = InfoItem::Fips(Fips {
            blocks: 7342,
            failures: 0,
            monobit: 0,
            poker: 0,
            runs: 0,
        });
        assert_eq!(all(&pad(b"F07342:00000:00000:00000:00000")), [Ok(fips)]);
        let shannon = InfoItem::Shannon(Shannon {
            raw_bytes: 8052,
            left: 23751,
            right: 23792,
            xor: 23584,
            debiased_left_bytes: 7112,
            debiased_left: 20876,
            debiased_right_bytes: 8063,
            debiased_right: 24150,
            failure: FailureMode::Ok,
        });
        assert_eq!(S_ITEM.len(), PAYLOAD_LEN);
        assert_eq!(all(S_ITEM), [Ok(shannon)]);
        assert_eq!(
            all(b"T03012 V05010"),
            [
                Ok(InfoItem::Temperature(Temperature { deci_kelvin: 3012 })),
                Ok(InfoItem::Voltage(Voltage { millivolts: 5010 })),
            ]
        );

        // And the writer reproduces them exactly.
        assert_eq!(written(shannon), S_ITEM);
        assert_eq!(written(fips), b"F07342:00000:00000:00000:00000");
        let mut out = heapless::Vec::<u8, 50>::new();
        InfoItem::Temperature(Temperature { deci_kelvin: 3143 })
            .write_to(&mut out)
            .unwrap();
        out.push(b' ').unwrap();
        InfoItem::Voltage(Voltage { millivolts: 3254 })
            .write_to(&mut out)
            .unwrap();
        assert_eq!(&out[..], b"T03143 V03254");
    }

    #[test]
    fn shannon_rates() {
        let Ok(InfoItem::Shannon(s)) = parse_item(S_ITEM) else {
            panic!()
        };
        let close = |a: Option<f32>, b: f32| (a.unwrap() - b).abs() < 1e-4;
        assert!(close(s.left_per_byte(), 23751.0 / 8052.0));
        assert!(close(s.right_per_byte(), 23792.0 / 8052.0));
        assert!(close(s.xor_per_byte(), 23584.0 / 8052.0));
        assert!(close(s.debiased_left_per_byte(), 20876.0 / 7112.0));
        assert!(close(s.debiased_right_per_byte(), 24150.0 / 8063.0));
        let small = Shannon {
            raw_bytes: 100,
            debiased_left_bytes: 0,
            debiased_right_bytes: 101,
            ..s
        };
        assert_eq!(small.left_per_byte(), None);
        assert_eq!(small.right_per_byte(), None);
        assert_eq!(small.xor_per_byte(), None);
        assert_eq!(small.debiased_left_per_byte(), None);
        assert!(small.debiased_right_per_byte().is_some());
    }

    #[test]
    fn failure_modes() {
        let known = b"012345789AB";
        for c in 0..=255u8 {
            let m = FailureMode::from_char(c);
            assert_eq!(m.to_char(), c);
            assert_eq!(known.contains(&c), !matches!(m, FailureMode::Unknown(_)));
            assert_eq!(m.is_ok(), c == b'0');
            assert!(!m.description().is_empty());
            assert!(m.to_string().starts_with(m.description()));
        }
        assert_eq!(
            FailureMode::FipsRate.to_string(),
            "FIPS 140-2 failure rate above threshold"
        );
        assert_eq!(
            FailureMode::Unknown(b'C').to_string(),
            "unknown failure mode 'C'"
        );
        assert_eq!(
            FailureMode::Unknown(0).to_string(),
            "unknown failure mode 0x00"
        );
        let mut s = S_ITEM.to_vec();
        *s.last_mut().unwrap() = b'9';
        let Ok(InfoItem::Shannon(sh)) = parse_item(&s) else {
            panic!()
        };
        assert_eq!(sh.failure, FailureMode::FipsRate);
        *s.last_mut().unwrap() = b'Z';
        let Ok(InfoItem::Shannon(sh)) = parse_item(&s) else {
            panic!()
        };
        assert_eq!(sh.failure, FailureMode::Unknown(b'Z'));
    }

    #[test]
    fn temperature_and_voltage() {
        let t = Temperature { deci_kelvin: 3150 };
        assert_eq!(t.kelvin(), 315.0);
        assert!((t.celsius() - 41.85).abs() < 1e-4);
        assert_eq!(t.millicelsius(), 41_850);
        assert_eq!(Temperature { deci_kelvin: 0 }.millicelsius(), -273_150);
        assert_eq!(
            Temperature {
                deci_kelvin: u32::MAX
            }
            .millicelsius(),
            429_496_729_500 - 273_150
        );
        assert_eq!(Voltage { millivolts: 5010 }.volts(), 5.01);
    }

    #[test]
    fn spaces_and_empty() {
        assert_eq!(all(b""), [Err(InfoError::Empty)]);
        assert_eq!(all(&[b' '; 50]), [Err(InfoError::Empty)]);
        assert_eq!(
            all(b"   T1    V2  "),
            [
                Ok(InfoItem::Temperature(Temperature { deci_kelvin: 1 })),
                Ok(InfoItem::Voltage(Voltage { millivolts: 2 })),
            ]
        );
        let mut it = parse_items(b"T1 ");
        assert!(it.next().is_some());
        assert_eq!(it.next(), None);
        assert_eq!(it.next(), None);
        assert_eq!(parse_item(b""), Err(InfoError::Empty));
    }

    #[test]
    fn errors() {
        use InfoError::*;
        assert_eq!(parse_item(b"T"), Err(BadNumber));
        assert_eq!(
            parse_item(b"T:1"),
            Err(WrongCount {
                letter: b'T',
                expected: 1,
                found: 2
            })
        );
        assert_eq!(parse_item(b"T1x"), Err(BadNumber));
        assert_eq!(parse_item(b"T-1"), Err(BadNumber));
        assert_eq!(parse_item(b"T+1"), Err(BadNumber));
        assert_eq!(parse_item(b"T1234567890"), Err(BadNumber));
        assert_eq!(
            parse_item(b"T999999999"),
            Ok(InfoItem::Temperature(Temperature {
                deci_kelvin: 999_999_999
            }))
        );
        assert_eq!(
            parse_item(b"V1:"),
            Err(WrongCount {
                letter: b'V',
                expected: 1,
                found: 2
            })
        );
        assert_eq!(
            parse_item(b"F1:2:3:4"),
            Err(WrongCount {
                letter: b'F',
                expected: 5,
                found: 4
            })
        );
        assert_eq!(parse_item(b"F1:2:3:4:"), Err(BadNumber));
        assert_eq!(
            parse_item(b"F1:2:3:4:5:6"),
            Err(WrongCount {
                letter: b'F',
                expected: 5,
                found: 6
            })
        );
        assert_eq!(
            parse_item(b"S1:2:3:4:5:6:7:8"),
            Err(WrongCount {
                letter: b'S',
                expected: 9,
                found: 8
            })
        );
        assert_eq!(
            parse_item(b"S"),
            Err(WrongCount {
                letter: b'S',
                expected: 9,
                found: 1
            })
        );
        assert_eq!(
            parse_item(b"S1:2:3:4:5:6:7:8:"),
            Err(UnknownShape { letter: b'S' })
        );
        assert_eq!(
            parse_item(b"S1:2:3:4:5:6:7:8:00"),
            Err(UnknownShape { letter: b'S' })
        );
        assert_eq!(parse_item(b"S1:2:3:4:5:6:7:x:0"), Err(BadNumber));
        assert_eq!(
            parse_item(b"S1:2:3:4:5:6:7:8:9:0"),
            Err(WrongCount {
                letter: b'S',
                expected: 9,
                found: 10
            })
        );
        assert_eq!(parse_item(b"1234"), Err(UnknownShape { letter: b'1' }));
        assert_eq!(parse_item(b":1"), Err(UnknownShape { letter: b':' }));
        assert_eq!(parse_item(b"T\x001"), Err(NotAscii));
        assert_eq!(parse_item("T1é".as_bytes()), Err(NotAscii));
        assert_eq!(parse_item(b"T1\r"), Err(NotAscii));
        assert_eq!(parse_item(b"X"), Err(BadNumber));
        assert_eq!(parse_item(b"X1::2"), Err(BadNumber));
        assert_eq!(
            parse_item(b"x1:2:3"),
            Ok(InfoItem::Unknown { letter: b'x' })
        );
        let many = [b":".as_slice(); 300].concat();
        let mut item = b"T".to_vec();
        item.extend_from_slice(&many);
        assert_eq!(
            parse_item(&item),
            Err(WrongCount {
                letter: b'T',
                expected: 1,
                found: 255
            })
        );
        // A bad item does not hide the next one.
        assert_eq!(
            all(b"T1x V2"),
            [
                Err(BadNumber),
                Ok(InfoItem::Voltage(Voltage { millivolts: 2 }))
            ]
        );
    }

    #[test]
    fn error_display() {
        let errors = [
            InfoError::Empty,
            InfoError::UnknownShape { letter: b'1' },
            InfoError::UnknownShape { letter: 0 },
            InfoError::BadNumber,
            InfoError::WrongCount {
                letter: b'T',
                expected: 1,
                found: 2,
            },
            InfoError::NotAscii,
        ];
        for e in errors {
            assert!(!e.to_string().is_empty());
        }
        assert_eq!(
            InfoError::WrongCount {
                letter: b'F',
                expected: 5,
                found: 4
            }
            .to_string(),
            "information item 'F' has 4 fields, expected 5"
        );
        for e in [
            InfoWriteError::Full,
            InfoWriteError::NumberTooLarge,
            InfoWriteError::NotWritable,
        ] {
            assert!(!e.to_string().is_empty());
        }
    }

    #[test]
    fn writer_edges() {
        assert_eq!(
            written(InfoItem::Temperature(Temperature { deci_kelvin: 0 })),
            b"T00000"
        );
        assert_eq!(
            written(InfoItem::Voltage(Voltage {
                millivolts: 123_456
            })),
            b"V123456"
        );
        assert_eq!(
            written(InfoItem::Voltage(Voltage {
                millivolts: 999_999_999
            })),
            b"V999999999"
        );
        let mut out = heapless::Vec::<u8, 50>::new();
        out.extend_from_slice(b"abc").unwrap();
        assert_eq!(
            InfoItem::Voltage(Voltage {
                millivolts: 1_000_000_000
            })
            .write_to(&mut out),
            Err(InfoWriteError::NumberTooLarge)
        );
        assert_eq!(
            InfoItem::Unknown { letter: b'X' }.write_to(&mut out),
            Err(InfoWriteError::NotWritable)
        );
        let Ok(InfoItem::Shannon(s)) = parse_item(S_ITEM) else {
            panic!()
        };
        for bad in [b':', b' ', 0x7f, 0x80, b'\n'] {
            let item = InfoItem::Shannon(Shannon {
                failure: FailureMode::Unknown(bad),
                ..s
            });
            assert_eq!(item.write_to(&mut out), Err(InfoWriteError::NotWritable));
        }
        // "abc" + 50-byte S item does not fit, and `out` is restored.
        assert_eq!(
            InfoItem::Shannon(s).write_to(&mut out),
            Err(InfoWriteError::Full)
        );
        assert_eq!(&out[..], b"abc");
        // A big S item does not fit even alone.
        let big = InfoItem::Shannon(Shannon {
            raw_bytes: 999_999_999,
            ..s
        });
        let mut out = heapless::Vec::<u8, 50>::new();
        assert_eq!(big.write_to(&mut out), Err(InfoWriteError::Full));
        assert!(out.is_empty());
        // Exactly 50 fits.
        assert_eq!(InfoItem::Shannon(s).write_to(&mut out), Ok(()));
        assert_eq!(out.len(), 50);
    }

    fn arb_number() -> impl Strategy<Value = u32> {
        prop_oneof![0u32..100_000, 0u32..=MAX_NUMBER]
    }

    fn arb_mode() -> impl Strategy<Value = FailureMode> {
        (0x21u8..0x7f)
            .prop_filter("no colon", |&c| c != b':')
            .prop_map(FailureMode::from_char)
    }

    fn arb_item() -> impl Strategy<Value = InfoItem> {
        prop_oneof![
            arb_number().prop_map(|deci_kelvin| InfoItem::Temperature(Temperature { deci_kelvin })),
            arb_number().prop_map(|millivolts| InfoItem::Voltage(Voltage { millivolts })),
            proptest::array::uniform5(arb_number()).prop_map(|[a, b, c, d, e]| {
                InfoItem::Fips(Fips {
                    blocks: a,
                    failures: b,
                    monobit: c,
                    poker: d,
                    runs: e,
                })
            }),
            (proptest::array::uniform8(0u32..100_000), arb_mode()).prop_map(|(n, failure)| {
                InfoItem::Shannon(Shannon {
                    raw_bytes: n[0],
                    left: n[1],
                    right: n[2],
                    xor: n[3],
                    debiased_left_bytes: n[4],
                    debiased_left: n[5],
                    debiased_right_bytes: n[6],
                    debiased_right: n[7],
                    failure,
                })
            }),
        ]
    }

    proptest! {
        #[test]
        fn write_parse_round_trip(item in arb_item()) {
            let mut out = heapless::Vec::<u8, 50>::new();
            prop_assert_eq!(item.write_to(&mut out), Ok(()));
            prop_assert_eq!(parse_item(&out), Ok(item));
            let payload = pad(&out);
            prop_assert_eq!(all(&payload), [Ok(item)]);
        }

        #[test]
        fn several_items_round_trip(items in proptest::collection::vec(arb_item(), 1..6)) {
            let mut out = heapless::Vec::<u8, 50>::new();
            let mut fitted = Vec::new();
            for item in items {
                let before = out.len();
                if !out.is_empty() && out.push(b' ').is_err() {
                    break;
                }
                if item.write_to(&mut out).is_err() {
                    out.truncate(before);
                    break;
                }
                fitted.push(Ok(item));
            }
            if !fitted.is_empty() {
                prop_assert_eq!(all(&pad(&out)), fitted);
            }
        }

        #[test]
        fn parse_never_panics(payload in proptest::collection::vec(any::<u8>(), 0..80)) {
            for item in parse_items(&payload) {
                let _ = item;
            }
        }

        #[test]
        fn parse_never_panics_structured(
            payload in proptest::collection::vec(
                prop_oneof![Just(b' '), Just(b':'), Just(b'S'), Just(b'T'), Just(b'F'), b'0'..=b'9'],
                0..80,
            )
        ) {
            let n = parse_items(&payload).count();
            prop_assert!(n <= payload.len() / 2 + 1);
        }
    }
}
