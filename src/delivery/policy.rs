//! What an attempt's response means: the one retry decision (STYLE rule 4), pure.

use std::time::{Duration, SystemTime};

use crate::config::RetryPolicy;

/// A failure that produced no HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// No complete response head within the subscription's timeout.
    Timeout,
    /// Connecting failed: refused, unreachable, DNS.
    Connect,
    /// The TLS handshake failed (certificate not trusted, wrong host, protocol).
    Tls,
    /// The request or response body could not be transferred.
    Body,
    /// Anything else (malformed response, protocol error).
    Other,
}

impl ErrorKind {
    /// A short lowercase name: `timeout`, `connect`, `tls`, `body`, `other`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Timeout => "timeout",
            ErrorKind::Connect => "connect",
            ErrorKind::Tls => "tls",
            ErrorKind::Body => "body",
            ErrorKind::Other => "other",
        }
    }
}

/// What one attempt got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome<'a> {
    /// The receiver answered with a status; `retry_after` is its `Retry-After` header.
    Status {
        /// HTTP status code.
        code: u16,
        /// The raw `Retry-After` value, if any.
        retry_after: Option<&'a str>,
    },
    /// No status.
    Error {
        /// What went wrong.
        kind: ErrorKind,
    },
}

/// What to do with a delivery after an attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// 2xx: done.
    Delivered,
    /// Try again at `at`.
    Retry {
        /// When the next attempt is due.
        at: SystemTime,
        /// Why, short, e.g. `http 500` or `timeout`; never a response body.
        reason: String,
    },
    /// Give up: the delivery is dead (kept, replayable).
    Dead {
        /// Why, e.g. `max_age 3d exceeded after 9 attempts: http 500`.
        reason: String,
    },
    /// 410 Gone: the delivery is dead and the subscription disabled until resumed.
    DeadAndDisable {
        /// Why.
        reason: String,
    },
}

/// Earliest a `Retry-After` may bring the next attempt.
const MIN_RETRY_AFTER: Duration = Duration::from_secs(1);
/// Jitter spread: the backoff step is multiplied by a factor in `[1 - J, 1 + J)`.
const JITTER: f64 = 0.2;

/// Decides what `outcome` means for a delivery.
///
/// - `attempt`: 1-based number of the attempt that produced `outcome`.
/// - `age`: time from when the delivery was first due (its event's ingest) to `now`;
///   the delivery's life ends at `now - age + policy.max_age`.
/// - `jitter`: a uniform sample in `[0, 1)` (clamped into it), so callers and tests
///   choose the randomness.
///
/// Rules: 2xx is delivered; 410 is dead and disables the subscription; 429 and 503
/// with a parseable `Retry-After` (delta-seconds or HTTP-date) retry at that time,
/// clamped to `[now + 1s, end of life]`; every other status (3xx included), and every
/// error, retries after `backoff[attempt - 1]` (the last step repeats) scaled by a
/// jitter factor in `[0.8, 1.2]`. A retry that would fall beyond the end of life is dead.
pub fn decide(
    outcome: Outcome<'_>,
    attempt: u32,
    age: Duration,
    policy: &RetryPolicy,
    now: SystemTime,
    jitter: f64,
) -> Decision {
    let what = match outcome {
        Outcome::Status { code, .. } if (200..300).contains(&code) => {
            return Decision::Delivered;
        }
        Outcome::Status { code: 410, .. } => {
            return Decision::DeadAndDisable {
                reason: "http 410 gone: subscription disabled".into(),
            };
        }
        Outcome::Status { code, .. } => format!("http {code}"),
        Outcome::Error { kind } => kind.as_str().to_string(),
    };
    let end = policy.max_age.checked_sub(age).map(|left| now + left);
    let retry_after = match outcome {
        Outcome::Status {
            code: 429 | 503,
            retry_after: Some(value),
        } => parse_retry_after(value, now),
        _ => None,
    };
    let (at, reason) = match retry_after {
        Some(at) => {
            let floor = now + MIN_RETRY_AFTER;
            let at = match end {
                Some(end) if at > end => end.max(floor),
                _ => at.max(floor),
            };
            (Some(at), format!("{what}, retry-after"))
        }
        None => {
            let delay = jittered(step(&policy.backoff, attempt), jitter);
            (now.checked_add(delay), what)
        }
    };
    match (at, end) {
        (Some(at), Some(end)) if at <= end => Decision::Retry { at, reason },
        _ => Decision::Dead {
            reason: format!(
                "max_age {} exceeded after {attempt} attempt{}: {reason}",
                human(policy.max_age),
                if attempt == 1 { "" } else { "s" }
            ),
        },
    }
}

/// `backoff[attempt - 1]`, the last step repeating.
fn step(backoff: &[Duration], attempt: u32) -> Duration {
    let i = (attempt.max(1) as usize - 1).min(backoff.len().saturating_sub(1));
    backoff.get(i).copied().unwrap_or(Duration::from_secs(5))
}

fn jittered(delay: Duration, jitter: f64) -> Duration {
    let j = if jitter.is_finite() {
        jitter.clamp(0.0, 1.0)
    } else {
        0.5
    };
    delay.mul_f64(1.0 - JITTER + 2.0 * JITTER * j)
}

/// `Retry-After` as an instant: delta-seconds or an HTTP-date; `None` when unparseable.
fn parse_retry_after(value: &str, now: SystemTime) -> Option<SystemTime> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // A huge number saturates: clamped to the end of life by the caller.
        let secs = value.parse::<u64>().unwrap_or(u64::MAX);
        return Some(
            now.checked_add(Duration::from_secs(secs))
                .unwrap_or(now + Duration::from_secs(100 * 365 * 86_400)),
        );
    }
    httpdate::parse_http_date(value).ok()
}

/// `3d`, `5h`, `90s`: the largest unit that divides the duration.
fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0 => format!("{}ms", d.as_millis()),
        _ if s.is_multiple_of(86_400) => format!("{}d", s / 86_400),
        _ if s.is_multiple_of(3_600) => format!("{}h", s / 3_600),
        _ if s.is_multiple_of(60) => format!("{}m", s / 60),
        _ => format!("{s}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn policy() -> RetryPolicy {
        RetryPolicy {
            backoff: vec![5 * S, 300 * S, 1800 * S],
            max_age: 3 * 86_400 * S,
        }
    }

    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + 1_800_000_000 * S
    }

    fn status(code: u16) -> Outcome<'static> {
        Outcome::Status {
            code,
            retry_after: None,
        }
    }

    fn decide_at(outcome: Outcome<'_>, attempt: u32, age: Duration) -> Decision {
        decide(outcome, attempt, age, &policy(), now(), 0.5)
    }

    /// The retry instant, relative to `now()`.
    fn retry_in(d: Decision) -> Duration {
        match d {
            Decision::Retry { at, .. } => at.duration_since(now()).unwrap(),
            other => panic!("expected a retry, got {other:?}"),
        }
    }

    #[test]
    fn success_codes_are_delivered() {
        for code in [200, 201, 202, 204, 299] {
            assert_eq!(decide_at(status(code), 1, S), Decision::Delivered);
        }
    }

    #[test]
    fn gone_disables() {
        let d = decide_at(status(410), 3, S);
        assert!(matches!(d, Decision::DeadAndDisable { .. }), "{d:?}");
    }

    #[test]
    fn other_statuses_and_errors_follow_the_backoff() {
        for outcome in [
            status(500),
            status(404),
            status(302),
            status(301),
            status(400),
            status(429),
            status(503),
            Outcome::Error {
                kind: ErrorKind::Timeout,
            },
            Outcome::Error {
                kind: ErrorKind::Connect,
            },
            Outcome::Error {
                kind: ErrorKind::Tls,
            },
        ] {
            assert_eq!(retry_in(decide_at(outcome, 1, S)), 5 * S, "{outcome:?}");
        }
        match decide_at(status(302), 1, S) {
            Decision::Retry { reason, .. } => assert_eq!(reason, "http 302"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn backoff_steps_and_the_last_repeats() {
        assert_eq!(retry_in(decide_at(status(500), 1, S)), 5 * S);
        assert_eq!(retry_in(decide_at(status(500), 2, S)), 300 * S);
        assert_eq!(retry_in(decide_at(status(500), 3, S)), 1800 * S);
        assert_eq!(retry_in(decide_at(status(500), 4, S)), 1800 * S);
        assert_eq!(retry_in(decide_at(status(500), 40, S)), 1800 * S);
        // Attempt 0 is read as the first.
        assert_eq!(retry_in(decide_at(status(500), 0, S)), 5 * S);
    }

    #[test]
    fn jitter_stays_within_twenty_percent() {
        let at = |j: f64| retry_in(decide(status(500), 2, S, &policy(), now(), j));
        assert_eq!(at(0.0), 240 * S);
        assert_eq!(at(0.5), 300 * S);
        assert!(at(0.999_999) < 360 * S && at(0.999_999) > 359 * S);
        // Out-of-range samples are clamped, never beyond the bounds.
        assert_eq!(at(-3.0), 240 * S);
        assert_eq!(at(7.0), 360 * S);
        assert_eq!(at(f64::NAN), 300 * S);
        for i in 0..100 {
            let d = at(i as f64 / 100.0);
            assert!(d >= 240 * S && d < 360 * S, "{d:?}");
        }
    }

    #[test]
    fn retry_after_delta_seconds() {
        let ra = |code, v| Outcome::Status {
            code,
            retry_after: Some(v),
        };
        assert_eq!(retry_in(decide_at(ra(429, "120"), 1, S)), 120 * S);
        assert_eq!(retry_in(decide_at(ra(503, " 7 "), 5, S)), 7 * S);
        match decide_at(ra(429, "120"), 1, S) {
            Decision::Retry { reason, .. } => assert_eq!(reason, "http 429, retry-after"),
            other => panic!("{other:?}"),
        }
        // Only 429 and 503 honour it.
        assert_eq!(retry_in(decide_at(ra(500, "120"), 1, S)), 5 * S);
        // Unparseable: the backoff applies.
        assert_eq!(retry_in(decide_at(ra(503, "soon"), 2, S)), 300 * S);
        assert_eq!(retry_in(decide_at(ra(503, "-5"), 1, S)), 5 * S);
    }

    #[test]
    fn retry_after_http_date() {
        let date = httpdate::fmt_http_date(now() + 90 * S);
        let d = decide_at(
            Outcome::Status {
                code: 503,
                retry_after: Some(&date),
            },
            1,
            S,
        );
        assert_eq!(retry_in(d), 90 * S);
        // The spec's example form.
        let fixed = parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now()).unwrap();
        assert_eq!(
            fixed,
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_480)
        );
    }

    #[test]
    fn retry_after_is_clamped() {
        let ra = |v: &str| {
            decide_at(
                Outcome::Status {
                    code: 429,
                    retry_after: Some(v),
                },
                1,
                S,
            )
        };
        // At least one second from now: 0, and a date in the past.
        assert_eq!(retry_in(ra("0")), S);
        assert_eq!(retry_in(ra(&httpdate::fmt_http_date(now() - 3600 * S))), S);
        // At most the end of max_age (3 days, 1 s of which is gone).
        let end = 3 * 86_400 * S - S;
        assert_eq!(retry_in(ra("999999999")), end);
        assert_eq!(retry_in(ra("99999999999999999999999")), end);
        assert_eq!(retry_in(ra("Fri, 01 Jan 2100 00:00:00 GMT")), end);
    }

    #[test]
    fn max_age_makes_it_dead() {
        let max = 3 * 86_400 * S;
        // 10 s left: a 5 s step fits, a 30 min one does not.
        assert_eq!(retry_in(decide_at(status(500), 1, max - 10 * S)), 5 * S);
        let d = decide_at(status(500), 9, max - 10 * S);
        match d {
            Decision::Dead { reason } => {
                assert_eq!(reason, "max_age 3d exceeded after 9 attempts: http 500")
            }
            other => panic!("{other:?}"),
        }
        // Already past max_age.
        let d = decide_at(
            Outcome::Error {
                kind: ErrorKind::Timeout,
            },
            1,
            max + S,
        );
        assert!(matches!(d, Decision::Dead { .. }), "{d:?}");
        // Retry-After can never extend the life; with under 1 s left it is dead.
        let ra = Outcome::Status {
            code: 503,
            retry_after: Some("60"),
        };
        assert_eq!(retry_in(decide_at(ra, 1, max - 30 * S)), 30 * S);
        let d = decide_at(ra, 1, max - Duration::from_millis(500));
        assert!(matches!(d, Decision::Dead { .. }), "{d:?}");
        // A delivered answer is delivered even past max_age.
        assert_eq!(decide_at(status(200), 9, max + S), Decision::Delivered);
    }

    #[test]
    fn reasons_are_short() {
        let e = |kind| decide_at(Outcome::Error { kind }, 1, S);
        for (kind, want) in [
            (ErrorKind::Timeout, "timeout"),
            (ErrorKind::Connect, "connect"),
            (ErrorKind::Tls, "tls"),
            (ErrorKind::Body, "body"),
            (ErrorKind::Other, "other"),
        ] {
            match e(kind) {
                Decision::Retry { reason, .. } => assert_eq!(reason, want),
                other => panic!("{other:?}"),
            }
        }
    }
}
