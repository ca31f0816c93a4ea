//! `Secret<T>`: a value that must never be printed (passwords, tokens, signing keys).

use std::fmt;

use crate::pg::ConnInfo;

/// A value that cannot be printed by accident: `Debug` and `Display` show `[redacted]`.
///
/// Read the value with [`Secret::expose`], only where it is actually used (signing,
/// building a request, connecting). There is deliberately no `Serialize` impl.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret<T>(T);

impl<T> Secret<T> {
    /// Wraps a value.
    pub fn new(value: T) -> Self {
        Secret(value)
    }

    /// The wrapped value. Never log or display it.
    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl<T> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl<T> fmt::Display for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// A PostgreSQL connection string (URL or key/value form) with the `PG*` environment
/// and libpq's defaults applied. It may hold a password, so it shows only
/// `user@host:port/db`.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl(ConnInfo);

impl DatabaseUrl {
    pub(crate) fn new(info: ConnInfo) -> Self {
        DatabaseUrl(info)
    }

    /// The connection settings, password included. Only for connecting.
    pub fn expose(&self) -> &ConnInfo {
        &self.0
    }

    /// `user@host:port/db`: no password, no other setting.
    pub fn redacted(&self) -> String {
        self.0.to_string()
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DatabaseUrl({})", self.redacted())
    }
}

impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_is_redacted() {
        let s = Secret::new("hunter2".to_string());
        assert_eq!(format!("{s:?} {s}"), "[redacted] [redacted]");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn database_url_hides_password_and_settings() {
        let info = ConnInfo::parse("postgres://app:hunter2@db:5432/app?sslkey=/secret/k").unwrap();
        let db = DatabaseUrl::new(info);
        let shown = format!("{db:?} {db}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(!shown.contains("/secret/k"), "{shown}");
        assert_eq!(db.redacted(), "app@db:5432/app");
    }
}
