//! Duration strings of the config: `"500ms"`, `"5s"`, `"5m"`, `"2h"`, `"3d"`, `"1h30m"`.

use std::time::Duration;

/// Parses a duration made of one or more `<integer><unit>` parts, units `ms`, `s`, `m`,
/// `h`, `d`, `w`. Zero is allowed (`"0s"`); callers reject it where it makes no sense.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    const HINT: &str =
        "expected a number and a unit (ms, s, m, h, d, w), e.g. \"30s\", \"5m\", \"7d\"";
    let s = text.trim();
    if s.is_empty() {
        return Err(format!("empty duration; {HINT}"));
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(format!("bad duration \"{text}\": {HINT}"));
        }
        let number: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("bad duration \"{text}\": number too large"))?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let unit_secs: u64 = match unit {
            "ms" => {
                total += Duration::from_millis(number);
                continue;
            }
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            "d" => 86_400,
            "w" => 7 * 86_400,
            "" => return Err(format!("bad duration \"{text}\": missing unit; {HINT}")),
            other => {
                return Err(format!(
                    "bad duration \"{text}\": unknown unit \"{other}\"; {HINT}"
                ));
            }
        };
        let secs = number
            .checked_mul(unit_secs)
            .ok_or_else(|| format!("bad duration \"{text}\": too large"))?;
        total = total
            .checked_add(Duration::from_secs(secs))
            .ok_or_else(|| format!("bad duration \"{text}\": too large"))?;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_design_durations() {
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("3d"), Ok(Duration::from_secs(3 * 86_400)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
    }

    #[test]
    fn rejects_bad_durations() {
        for bad in [
            "",
            "5",
            "s",
            "5 parsecs",
            "5x",
            "-5s",
            "1.5h",
            "99999999999999999999s",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should fail");
        }
    }
}
