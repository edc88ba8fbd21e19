//! Units in types: a byte count is a `Bytes`, never a bare integer whose unit lives in a comment.

use std::fmt;
use std::iter::Sum;
use std::ops::{Add, AddAssign, Sub};

use serde::{Deserialize, Serialize};

/// A number of bytes of memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Bytes(pub u64);

impl Bytes {
    pub const ZERO: Bytes = Bytes(0);
    pub const KIB: u64 = 1 << 10;
    pub const MIB: u64 = 1 << 20;
    pub const GIB: u64 = 1 << 30;

    pub fn get(self) -> u64 {
        self.0
    }

    pub fn saturating_sub(self, other: Bytes) -> Bytes {
        Bytes(self.0.saturating_sub(other.0))
    }
}

impl Add for Bytes {
    type Output = Bytes;
    fn add(self, rhs: Bytes) -> Bytes {
        Bytes(self.0.saturating_add(rhs.0))
    }
}

impl AddAssign for Bytes {
    fn add_assign(&mut self, rhs: Bytes) {
        self.0 = self.0.saturating_add(rhs.0);
    }
}

impl Sub for Bytes {
    type Output = Bytes;
    fn sub(self, rhs: Bytes) -> Bytes {
        Bytes(self.0.saturating_sub(rhs.0))
    }
}

impl Sum for Bytes {
    fn sum<I: Iterator<Item = Bytes>>(iter: I) -> Bytes {
        iter.fold(Bytes::ZERO, Add::add)
    }
}

/// Binary units (KiB, MiB, GiB) with two decimals, as memory tools print them.
impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0 as f64;
        if self.0 >= Self::GIB {
            write!(f, "{:.2} GiB", b / Self::GIB as f64)
        } else if self.0 >= Self::MIB {
            write!(f, "{:.2} MiB", b / Self::MIB as f64)
        } else if self.0 >= Self::KIB {
            write!(f, "{:.2} KiB", b / Self::KIB as f64)
        } else {
            write!(f, "{} B", self.0)
        }
    }
}

/// `text` as an error message may quote it: whole up to `max` bytes, else its first
/// `max` bytes (at a character boundary), an ellipsis and its length. A megabyte-long
/// key or value sent by a client comes back in an error as a few dozen bytes.
pub fn clip(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if text.len() <= max {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    std::borrow::Cow::Owned(format!("{}… ({} bytes)", &text[..end], text.len()))
}

/// How much of a client's text an error quotes.
pub const QUOTED_BYTES: usize = 64;

/// `a - b` as a signed byte count (headroom, a change), saturating rather than wrapping.
pub fn signed_difference(a: u64, b: u64) -> i64 {
    i64::try_from(i128::from(a) - i128::from(b)).unwrap_or(if a >= b { i64::MAX } else { i64::MIN })
}

/// Reads a byte count: a whole number of bytes, or a number with a unit (`16GiB`,
/// `1.5 GiB`, `512MiB`, `16GB`, decimal units being powers of 1000). Errors say why.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (number, unit) = (t[..split].trim(), t[split..].trim());
    let scale: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" | "k" => Bytes::KIB,
        "mib" | "m" => Bytes::MIB,
        "gib" | "g" => Bytes::GIB,
        "tib" | "t" => Bytes::GIB << 10,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => return Err(format!("unknown unit '{unit}' (use B, KiB, MiB, GiB, TiB, KB, MB, GB or TB)")),
    };
    let value: f64 = number.parse().map_err(|_| format!("expected a size such as 16GiB, got '{text}'"))?;
    let bytes = value * scale as f64;
    if !(bytes.is_finite() && bytes >= 1.0 && bytes < 2f64.powi(63)) {
        return Err(format!("must be between 1 byte and 8 EiB, got '{text}'"));
    }
    Ok(bytes.round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_differences_saturate() {
        assert_eq!(signed_difference(3, 5), -2);
        assert_eq!(signed_difference(5, 3), 2);
        assert_eq!(signed_difference(u64::MAX, 0), i64::MAX);
        assert_eq!(signed_difference(0, u64::MAX), i64::MIN);
    }

    #[test]
    fn sizes_parse_with_and_without_units() {
        assert_eq!(parse_bytes("1024"), Ok(1024));
        assert_eq!(parse_bytes("16GiB"), Ok(16 << 30));
        assert_eq!(parse_bytes("1.5 GiB"), Ok(3 << 29));
        assert_eq!(parse_bytes("16GB"), Ok(16_000_000_000));
        assert_eq!(parse_bytes(&Bytes(12 * Bytes::MIB).to_string()), Ok(12 << 20));
        assert!(parse_bytes("12 parsecs").is_err_and(|e| e.contains("unknown unit")));
        assert!(parse_bytes("0").is_err());
        assert!(parse_bytes("lots").is_err());
    }

    #[test]
    fn display_picks_binary_unit() {
        assert_eq!(Bytes(512).to_string(), "512 B");
        assert_eq!(Bytes(1536).to_string(), "1.50 KiB");
        assert_eq!(Bytes(321 * Bytes::MIB + 3 * Bytes::MIB / 4).to_string(), "321.75 MiB");
        assert_eq!(Bytes(16 * Bytes::GIB).to_string(), "16.00 GiB");
    }

    #[test]
    fn arithmetic_saturates_instead_of_wrapping() {
        assert_eq!(Bytes(3) - Bytes(5), Bytes(0));
        assert_eq!(Bytes(u64::MAX) + Bytes(1), Bytes(u64::MAX));
        assert_eq!([Bytes(1), Bytes(2), Bytes(3)].into_iter().sum::<Bytes>(), Bytes(6));
    }
}
