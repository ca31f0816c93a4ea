//! The lowest layer: talking to PostgreSQL the way libpq users expect. Connection
//! strings (URL and key/value forms), the `PG*` environment variables, the password
//! file, `sslmode` with libpq's semantics and client certificates ([`conninfo`],
//! [`pgpass`], [`tls`]); SQL sessions opened from them ([`sql`]); and the small SQL
//! helpers every stage shares (identifier and literal quoting, the protocol's clock).
//! The replication connection (`source::client`) is opened from the same
//! [`ConnInfo`]. Nothing here imports a stage.

pub mod conninfo;
mod pgpass;
mod report;
pub mod sql;
mod syntax;
pub mod tls;

use std::time::{SystemTime, UNIX_EPOCH};

pub use conninfo::{ConnInfo, Host, HostSpec, SslMode};
pub use report::ErrorChain;

/// A connection string or TLS file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    /// The string cannot be read at all.
    #[error("invalid connection string: {0}")]
    Syntax(String),
    /// One setting is wrong; the message says why and what to do.
    #[error("connection setting `{key}`: {message}")]
    Invalid { key: String, message: String },
    /// A certificate or key file cannot be used.
    #[error("{0}")]
    Tls(String),
    /// A certificate or key file cannot be read or used; `what` names it.
    #[error("{what}")]
    TlsFile {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// No server answered at any host of the connection string.
    #[error(
        "cannot reach PostgreSQL at {server}. Fix: check the host and port in the connection string, and that the server is running and accepts connections from here"
    )]
    Unreachable {
        /// `user@host:port/dbname`, never the password.
        server: String,
        #[source]
        source: tokio_postgres::Error,
    },
    /// The server answered and refused the session (password, pg_hba.conf, database).
    #[error("PostgreSQL at {server} refused the connection{}", fix_after(.source))]
    Refused {
        /// `user@host:port/dbname`, never the password.
        server: String,
        #[source]
        source: tokio_postgres::Error,
    },
}

/// `. Fix: ...` for a refused connection whose SQLSTATE has a known remedy, else nothing.
fn fix_after(err: &tokio_postgres::Error) -> &'static str {
    match err.code().map(|c| c.code()) {
        Some("28P01") => {
            ". Fix: check the user and password in the connection string, PGPASSWORD or the password file (~/.pgpass)"
        }
        Some("28000") => {
            ". Fix: allow this user, database and host in pg_hba.conf, or use another role"
        }
        Some("3D000") => ". Fix: correct the database name in the connection string",
        Some("53300") => ". Fix: free connections or raise max_connections",
        _ => "",
    }
}

impl PgError {
    pub(crate) fn invalid(key: &str, message: String) -> PgError {
        PgError::Invalid {
            key: key.to_owned(),
            message,
        }
    }
}

/// Microseconds between the Unix epoch and PostgreSQL's epoch (2000-01-01 00:00 UTC),
/// the origin of the protocol's timestamps.
pub const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// Now, in microseconds since 2000-01-01 (the protocol's clock).
pub fn now_pg_micros() -> i64 {
    let since_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros() as i64;
    since_unix - PG_EPOCH_OFFSET_MICROS
}

/// A protocol timestamp (microseconds since 2000-01-01 UTC) as a UTC time; `None` when
/// out of range.
pub fn pg_micros_to_utc(micros: i64) -> Option<chrono::DateTime<chrono::Utc>> {
    chrono::DateTime::from_timestamp_micros(micros.checked_add(PG_EPOCH_OFFSET_MICROS)?)
}

/// A protocol timestamp as a `SystemTime` (any value: before 1970 too).
pub fn pg_micros_to_system_time(micros: i64) -> SystemTime {
    let unix = micros.saturating_add(PG_EPOCH_OFFSET_MICROS);
    if unix >= 0 {
        UNIX_EPOCH + std::time::Duration::from_micros(unix as u64)
    } else {
        UNIX_EPOCH - std::time::Duration::from_micros(unix.unsigned_abs())
    }
}

/// A schema-qualified table name, printed `schema.name`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TableName {
    /// The schema.
    pub schema: String,
    /// The table.
    pub name: String,
}

impl TableName {
    /// `"schema"."name"`, quoted for SQL.
    pub fn quoted(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }
}

impl std::fmt::Display for TableName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

/// Quotes an identifier for SQL and replication commands.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Quotes a string literal.
pub fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
        let t = TableName {
            schema: "my schema".into(),
            name: "a\"b".into(),
        };
        assert_eq!(t.quoted(), "\"my schema\".\"a\"\"b\"");
        assert_eq!(t.to_string(), "my schema.a\"b");
    }

    #[test]
    fn protocol_clock() {
        assert_eq!(
            pg_micros_to_utc(0).unwrap().to_rfc3339(),
            "2000-01-01T00:00:00+00:00"
        );
        assert!(pg_micros_to_utc(i64::MAX).is_none());
        let now = now_pg_micros();
        assert!(pg_micros_to_utc(now).unwrap() <= chrono::Utc::now());
        assert_eq!(
            pg_micros_to_system_time(-PG_EPOCH_OFFSET_MICROS),
            UNIX_EPOCH
        );
        assert!(pg_micros_to_system_time(-PG_EPOCH_OFFSET_MICROS - 1) < UNIX_EPOCH);
    }
}
