//! How an error is shown, in the CLI's `error:` line, a `walhook check` line or a log
//! field: its message, then each cause (`source()`) after `: `, on one line; then the
//! remedy for a PostgreSQL failure in the chain that walhook knows how to fix.
//!
//! The rule that keeps this simple: a message never repeats its cause (no `{0}` of a
//! field that is also the source), and a message that states its own `Fix:` carries no
//! PostgreSQL error whose SQLSTATE has a remedy below.

use std::error::Error;
use std::fmt;

/// Displays an error and its causes on one line (see the module docs).
pub struct ErrorChain<'a>(pub &'a (dyn Error + 'static));

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut fix = None;
        let mut cause = Some(self.0);
        while let Some(err) = cause {
            cause = err.source();
            if fix.is_none()
                && let Some(pg) = err.downcast_ref::<tokio_postgres::Error>()
            {
                fix = pg.code().and_then(|code| fix_for_sqlstate(code.code()));
            }
            let text = err.to_string();
            match cause {
                Some(_) => write!(f, "{text}: ")?,
                // PostgreSQL's text may end with a sentence of its own ("HINT: ...
                // space."); the remedy follows it as one.
                None if fix.is_some() => f.write_str(text.trim_end_matches(['.', ' ', '\n']))?,
                None => f.write_str(&text)?,
            }
        }
        if let Some(fix) = fix {
            write!(f, ". {fix}")?;
        }
        Ok(())
    }
}

/// The remedy for a PostgreSQL error that a walhook message may carry unexplained
/// (mostly from the store, which shares no code with the source's checks).
pub fn fix_for_sqlstate(code: &str) -> Option<&'static str> {
    Some(match code {
        "25006" => {
            "Fix: the database refuses writes (default_transaction_read_only is on, or it is a hot standby): point the url at a writable primary, or run `ALTER DATABASE <name> SET default_transaction_read_only = off;`"
        }
        "53100" => {
            "Fix: the database server's disk is full: free space there, then start walhook again"
        }
        "42501" => {
            "Fix: grant the role the privilege PostgreSQL names (sql/least-privilege.sql lists what walhook needs), or use another role"
        }
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    enum Outer {
        #[error("cannot connect to the store")]
        Connect(#[source] Inner),
    }

    #[derive(Debug, thiserror::Error)]
    #[error("cannot reach PostgreSQL at db:5432")]
    struct Inner(#[source] std::io::Error);

    #[test]
    fn each_cause_is_printed_once_in_order() {
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let err = Outer::Connect(Inner(refused));
        assert_eq!(
            ErrorChain(&err).to_string(),
            "cannot connect to the store: cannot reach PostgreSQL at db:5432: refused"
        );
    }

    #[test]
    fn known_sqlstates_get_a_fix() {
        assert!(fix_for_sqlstate("25006").unwrap().contains("read_only"));
        assert!(fix_for_sqlstate("53100").unwrap().contains("disk is full"));
        assert_eq!(fix_for_sqlstate("23505"), None);
    }
}
