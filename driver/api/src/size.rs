//! Sizes as people write them: `4096`, `512K`, `10G`, `1.5GiB`.

/// Parses a size: digits with an optional fraction, then an optional unit K, M, G or T
/// (powers of 1024, case-insensitive, optionally followed by `B`, `i` or `iB`). A fraction is cut
/// to whole bytes.
pub fn parse_size(input: &str) -> Result<u64, String> {
    let err = |reason: &str| format!("invalid size {input:?}: {reason}");
    let s = input.trim();
    let num_end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(num_end);
    let (whole, frac) = num.split_once('.').unwrap_or((num, ""));
    if whole.is_empty() || (num.contains('.') && frac.is_empty()) || frac.contains('.') {
        return Err(err(
            "expected a number, optionally followed by K, M, G or T",
        ));
    }
    let unit = unit.trim_start().to_ascii_lowercase();
    let unit = unit
        .strip_suffix("ib")
        .or_else(|| unit.strip_suffix('b'))
        .or_else(|| unit.strip_suffix('i'))
        .unwrap_or(&unit);
    let shift = match unit {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        _ => return Err(err("unknown unit (use K, M, G or T)")),
    };
    let too_large = || err("size does not fit in 64 bits");
    let n: u64 = whole.parse().map_err(|_| too_large())?;
    let mut bytes = n.checked_mul(1u64 << shift).ok_or_else(too_large)?;
    // The fraction in exact integer steps: each digit adds digit * unit / 10^k.
    let mut scale: u128 = 1u128 << shift;
    let mut part: u128 = 0;
    let mut denom: u128 = 1;
    for d in frac.bytes().take(18) {
        part = part * 10 + u128::from(d - b'0');
        denom *= 10;
    }
    scale *= part;
    let extra = u64::try_from(scale / denom).map_err(|_| too_large())?;
    bytes = bytes.checked_add(extra).ok_or_else(too_large)?;
    Ok(bytes)
}

/// A size with binary units for people, e.g. `1.5 GiB`.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_sizes() {
        for (text, want) in [
            ("1024", 1024u64),
            ("512M", 512 << 20),
            ("10G", 10 << 30),
            ("10g", 10 << 30),
            ("10GiB", 10 << 30),
            ("10GB", 10 << 30),
            ("4k", 4096),
            (" 2 T ", 2 << 40),
            ("0", 0),
            ("1.5Gi", 3 << 29),
            ("0.5K", 512),
            ("64MB", 64 << 20),
        ] {
            assert_eq!(parse_size(text), Ok(want), "{text}");
        }
    }

    #[test]
    fn rejects_bad_sizes_with_reason() {
        for bad in [
            "",
            "G",
            "-1",
            "1.",
            ".5G",
            "1.2.3",
            "10X",
            "10GG",
            "99999999999999999999",
            "16777216T",
        ] {
            let e = parse_size(bad).expect_err(bad);
            assert!(e.contains("invalid size"), "{bad}: {e}");
        }
    }

    proptest! {
        #[test]
        fn parse_size_never_panics(s in "\\PC{0,24}") {
            let _ = parse_size(&s);
        }

        #[test]
        fn parse_size_round_trips(n in 0u64..(1 << 20), unit in 0usize..5) {
            let suffix = ["", "K", "M", "G", "T"][unit];
            prop_assert_eq!(parse_size(&format!("{n}{suffix}")), Ok(n << (10 * unit)));
        }
    }

    #[test]
    fn format_size_is_readable() {
        assert_eq!(format_size(100), "100 B");
        assert_eq!(format_size(1536), "1.5 KiB");
        assert_eq!(format_size(10 << 30), "10.0 GiB");
    }
}
