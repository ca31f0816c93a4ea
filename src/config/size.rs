//! Byte sizes of the config: `"64MiB"`, `"512KiB"`, `"1GiB"`, `"100MB"`, `"4096"`.

/// Parses a size: an integer and an optional unit (`B`, `KiB`, `MiB`, `GiB`, or the
/// decimal `kB`, `MB`, `GB`), spaces between them allowed.
pub fn parse_size(text: &str) -> Result<u64, String> {
    const HINT: &str =
        "expected a number and a unit (B, KiB, MiB, GiB, kB, MB, GB), e.g. \"64MiB\"";
    let s = text.trim();
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return Err(format!("bad size \"{text}\": {HINT}"));
    }
    let number: u64 = s[..digits]
        .parse()
        .map_err(|_| format!("bad size \"{text}\": number too large"))?;
    let unit: u64 = match s[digits..].trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "kB" | "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        other => {
            return Err(format!(
                "bad size \"{text}\": unknown unit \"{other}\"; {HINT}"
            ));
        }
    };
    number
        .checked_mul(unit)
        .ok_or_else(|| format!("bad size \"{text}\": too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_binary_and_decimal_units() {
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("512 KiB"), Ok(512 << 10));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("100MB"), Ok(100_000_000));
        assert_eq!(parse_size("4096"), Ok(4096));
    }

    #[test]
    fn refuses_what_is_not_a_size() {
        assert!(parse_size("").unwrap_err().contains("expected a number"));
        assert!(parse_size("MiB").unwrap_err().contains("bad size"));
        assert!(
            parse_size("64mb")
                .unwrap_err()
                .contains("unknown unit \"mb\"")
        );
        assert!(
            parse_size("99999999999999999999GiB")
                .unwrap_err()
                .contains("too large")
        );
        assert!(
            parse_size("18446744073709551615GiB")
                .unwrap_err()
                .contains("too large")
        );
    }
}
