//! `Secret<T>`: a value that must never be printed (passwords, tokens, signing keys).

use std::fmt;

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

/// A PostgreSQL connection URL. It usually holds a password, so it is kept secret;
/// [`DatabaseUrl::redacted`] gives a form safe for logs and reports.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl(Secret<url::Url>);

impl DatabaseUrl {
    pub(crate) fn new(url: url::Url) -> Self {
        DatabaseUrl(Secret::new(url))
    }

    /// The full URL, password included. Only for connecting.
    pub fn expose(&self) -> &url::Url {
        self.0.expose()
    }

    /// The URL with its password replaced by `***` and query parameters dropped
    /// (they may carry `password=` or key file paths).
    pub fn redacted(&self) -> String {
        let mut url = self.0.expose().clone();
        if url.password().is_some() {
            // Cannot fail: a URL that has a password can have it replaced.
            let _ = url.set_password(Some("***"));
        }
        url.set_query(None);
        url.set_fragment(None);
        url.to_string()
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
    fn database_url_hides_password_and_query() {
        let url = url::Url::parse("postgres://app:hunter2@db:5432/app?password=x").unwrap();
        let db = DatabaseUrl::new(url);
        let shown = format!("{db:?} {db}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(!shown.contains("password=x"), "{shown}");
        assert_eq!(db.redacted(), "postgres://app:***@db:5432/app");
    }
}
