//! Connection settings shared by the replication connection and ordinary SQL: the URL,
//! `sslmode` (including `verify-ca` and `verify-full`, which tokio-postgres does not
//! parse), the rustls client configuration and the session settings every walhook
//! connection starts with.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::sync::mpsc;

/// Session settings sent at start-up on every connection, so that values do not depend
/// on the server's defaults.
pub const SESSION_SETTINGS: [(&str, &str); 3] = [
    ("TimeZone", "UTC"),
    ("DateStyle", "ISO"),
    ("extra_float_digits", "3"),
];

/// How a connection negotiates TLS, as libpq's `sslmode` does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    /// Plain TCP only.
    Disable,
    /// TLS when the server offers it, without verifying the certificate.
    Prefer,
    /// TLS required, certificate not verified.
    Require,
    /// TLS required, certificate chain verified against the roots, host name not checked.
    VerifyCa,
    /// TLS required, certificate chain and host name verified.
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Result<SslMode, ConnectConfigError> {
        Ok(match value {
            "disable" | "allow" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => return Err(ConnectConfigError::SslMode(other.to_owned())),
        })
    }
}

/// A connection string that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConnectConfigError {
    #[error("invalid connection string: {0}")]
    Invalid(#[source] tokio_postgres::Error),
    #[error("sslmode `{0}` is not one of disable, prefer, require, verify-ca, verify-full")]
    SslMode(String),
    #[error("cannot read sslrootcert `{path}`: {source}")]
    RootCert {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("sslrootcert `{0}` holds no PEM certificate")]
    EmptyRootCert(PathBuf),
    #[error("the connection string names no host")]
    NoHost,
}

/// A parsed connection string: tokio-postgres settings plus TLS settings.
#[derive(Clone)]
pub struct ConnectParams {
    /// Host, port, user, password, database and options. Its own `ssl_mode` is set to
    /// what tokio-postgres needs to implement [`ConnectParams::ssl_mode`].
    pub pg: tokio_postgres::Config,
    /// The requested TLS behaviour.
    pub ssl_mode: SslMode,
    /// Extra trusted roots (`sslrootcert`), added to the system roots.
    pub ssl_root_cert: Option<PathBuf>,
}

impl fmt::Debug for ConnectParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl ConnectParams {
    /// Parses a libpq-style URL (`postgres://user:pw@host:port/db?sslmode=...`) or
    /// key/value string.
    pub fn parse(conn: &str) -> Result<ConnectParams, ConnectConfigError> {
        let mut ssl_mode = SslMode::Prefer;
        let mut ssl_root_cert = None;
        let rest = strip_tls_options(conn, &mut |key, value| {
            match key {
                "sslmode" => ssl_mode = SslMode::parse(value)?,
                "sslrootcert" => ssl_root_cert = Some(PathBuf::from(value)),
                _ => {}
            }
            Ok(())
        })?;
        let mut pg =
            tokio_postgres::Config::from_str(&rest).map_err(ConnectConfigError::Invalid)?;
        if pg.get_hosts().is_empty() {
            return Err(ConnectConfigError::NoHost);
        }
        pg.ssl_mode(match ssl_mode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        });
        // A server that accepts TCP but never answers must not hang start-up or a
        // reconnect; dead peers are noticed by TCP keepalives.
        if pg.get_connect_timeout().is_none() {
            pg.connect_timeout(std::time::Duration::from_secs(10));
        }
        pg.keepalives_idle(std::time::Duration::from_secs(30));
        if pg.get_password().is_none()
            && let Ok(pw) = std::env::var("PGPASSWORD")
        {
            pg.password(pw);
        }
        let mut options: String = pg.get_options().unwrap_or_default().to_owned();
        for (name, value) in SESSION_SETTINGS {
            if !options.is_empty() {
                options.push(' ');
            }
            options.push_str(&format!("-c {name}={value}"));
        }
        pg.options(options);
        Ok(ConnectParams {
            pg,
            ssl_mode,
            ssl_root_cert,
        })
    }

    /// `user@host:port/db` without the password, for logs and messages.
    pub fn redacted(&self) -> String {
        let host = match self.pg.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
            None => String::new(),
        };
        let port = self.pg.get_ports().first().copied().unwrap_or(5432);
        format!(
            "{}@{}:{}/{}",
            self.pg.get_user().unwrap_or(""),
            host,
            port,
            self.pg.get_dbname().unwrap_or("")
        )
    }

    /// The rustls configuration for this `sslmode`, or `None` for `disable`.
    pub fn tls_config(&self) -> Result<Option<Arc<ClientConfig>>, ConnectConfigError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions");
        let config = match self.ssl_mode {
            SslMode::Disable => return Ok(None),
            SslMode::Prefer | SslMode::Require => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
                .with_no_client_auth(),
            SslMode::VerifyCa | SslMode::VerifyFull => {
                let roots = Arc::new(self.root_store()?);
                let inner =
                    rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider)
                        .build()
                        .map_err(|e| ConnectConfigError::RootCert {
                            path: self.ssl_root_cert.clone().unwrap_or_default(),
                            source: io::Error::other(e),
                        })?;
                let verifier = ChainVerifier {
                    inner,
                    check_name: self.ssl_mode == SslMode::VerifyFull,
                };
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(verifier))
                    .with_no_client_auth()
            }
        };
        Ok(Some(Arc::new(config)))
    }

    fn root_store(&self) -> Result<RootCertStore, ConnectConfigError> {
        let mut roots = RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        roots.add_parsable_certificates(native.certs);
        if let Some(path) = &self.ssl_root_cert {
            let pem = std::fs::read(path).map_err(|source| ConnectConfigError::RootCert {
                path: path.clone(),
                source,
            })?;
            let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut pem.as_slice())
                .collect::<Result<_, _>>()
                .map_err(|source| ConnectConfigError::RootCert {
                    path: path.clone(),
                    source,
                })?;
            if certs.is_empty() {
                return Err(ConnectConfigError::EmptyRootCert(path.clone()));
            }
            roots.add_parsable_certificates(certs);
        }
        Ok(roots)
    }

    /// Connects an ordinary SQL session (tokio-postgres) with the same TLS settings, and
    /// drives its connection on a background task.
    pub async fn connect_sql(&self) -> Result<tokio_postgres::Client, SqlConnectError> {
        let client = match self.tls_config()? {
            None => {
                let (client, conn) = self.pg.connect(tokio_postgres::NoTls).await?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                client
            }
            Some(tls) => {
                let tls = tokio_postgres_rustls::MakeRustlsConnect::new((*tls).clone());
                let (client, conn) = self.pg.connect(tls).await?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                client
            }
        };
        Ok(client)
    }

    /// Like [`ConnectParams::connect_sql`], for a connection that `LISTEN`s: every
    /// notification it receives sends `()` on the returned channel, which closes when
    /// the connection does.
    pub async fn connect_listen(
        &self,
    ) -> Result<(tokio_postgres::Client, mpsc::UnboundedReceiver<()>), SqlConnectError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let client = match self.tls_config()? {
            None => {
                let (client, conn) = self.pg.connect(tokio_postgres::NoTls).await?;
                tokio::spawn(forward_notifications(conn, tx));
                client
            }
            Some(tls) => {
                let tls = tokio_postgres_rustls::MakeRustlsConnect::new((*tls).clone());
                let (client, conn) = self.pg.connect(tls).await?;
                tokio::spawn(forward_notifications(conn, tx));
                client
            }
        };
        Ok((client, rx))
    }
}

/// Drives `conn`, sending `()` on `tx` for each notification.
async fn forward_notifications<S, T>(
    mut conn: tokio_postgres::Connection<S, T>,
    tx: mpsc::UnboundedSender<()>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    while let Some(Ok(message)) = std::future::poll_fn(|cx| conn.poll_message(cx)).await {
        if matches!(message, tokio_postgres::AsyncMessage::Notification(_)) && tx.send(()).is_err()
        {
            return;
        }
    }
}

impl ConnectParams {
    /// A one-paragraph explanation of why an ordinary SQL connection failed, naming
    /// the fix (never the password).
    pub fn describe_sql_error(&self, err: SqlConnectError) -> String {
        let target = self.redacted();
        let SqlConnectError::Postgres(pg) = err else {
            return err.to_string();
        };
        if let Some(db) = pg.as_db_error() {
            let fix = match db.code().code() {
                "28P01" => "Fix: check the user and password in [source] url (or PGPASSWORD)",
                "28000" => {
                    "Fix: allow this user, database and host in pg_hba.conf, or use another role"
                }
                "3D000" => "Fix: correct the database name in [source] url",
                "53300" => "Fix: free connections or raise max_connections",
                _ => "",
            };
            return format!(
                "PostgreSQL at {target} refused the connection: {}. {fix}",
                db.message()
            );
        }
        let cause = std::error::Error::source(&pg)
            .map(|c| c.to_string())
            .unwrap_or_else(|| pg.to_string());
        format!(
            "cannot reach PostgreSQL at {target}: {cause}. Fix: check the host and port in [source] url, and that the server is running and accepts TCP connections from here"
        )
    }
}

/// An ordinary SQL connection could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum SqlConnectError {
    #[error(transparent)]
    Config(#[from] ConnectConfigError),
    #[error(transparent)]
    Postgres(#[from] tokio_postgres::Error),
}

/// Removes `sslmode` and `sslrootcert` (URL query or key/value form) from a connection
/// string, handing each to `take`.
fn strip_tls_options(
    conn: &str,
    take: &mut dyn FnMut(&str, &str) -> Result<(), ConnectConfigError>,
) -> Result<String, ConnectConfigError> {
    const KEYS: [&str; 2] = ["sslmode", "sslrootcert"];
    if conn.starts_with("postgres://") || conn.starts_with("postgresql://") {
        let Some((base, query)) = conn.split_once('?') else {
            return Ok(conn.to_owned());
        };
        let mut kept = Vec::new();
        for pair in query.split('&') {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            if KEYS.contains(&key) {
                let value = url::form_urlencoded::parse(format!("v={value}").as_bytes())
                    .next()
                    .map(|(_, v)| v.into_owned())
                    .unwrap_or_default();
                take(key, &value)?;
            } else {
                kept.push(pair);
            }
        }
        if kept.is_empty() {
            Ok(base.to_owned())
        } else {
            Ok(format!("{base}?{}", kept.join("&")))
        }
    } else {
        let mut kept = Vec::new();
        for pair in conn.split_whitespace() {
            match pair.split_once('=') {
                Some((key, value)) if KEYS.contains(&key.trim()) => {
                    take(key.trim(), value.trim().trim_matches('\''))?
                }
                _ => kept.push(pair),
            }
        }
        Ok(kept.join(" "))
    }
}

/// `sslmode=require|prefer`: encrypt, but accept any certificate (as libpq does).
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca` and `verify-full`: the chain must verify; the name only for verify-full.
#[derive(Debug)]
struct ChainVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    check_name: bool,
}

impl ServerCertVerifier for ChainVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))
            | Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForNameContext { .. },
            )) if !self.check_name => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_tls_options_from_urls_and_key_values() {
        let p = ConnectParams::parse(
            "postgres://u:secret@db.example:6543/app?sslmode=verify-full&sslrootcert=%2Ftmp%2Fca.pem&application_name=x",
        )
        .unwrap();
        assert_eq!(p.ssl_mode, SslMode::VerifyFull);
        assert_eq!(
            p.ssl_root_cert.as_deref(),
            Some(std::path::Path::new("/tmp/ca.pem"))
        );
        assert_eq!(p.pg.get_application_name(), Some("x"));
        assert_eq!(p.redacted(), "u@db.example:6543/app");
        assert!(!format!("{p:?}").contains("secret"));

        let p = ConnectParams::parse("host=h port=1 user=u sslmode=disable dbname=d").unwrap();
        assert_eq!(p.ssl_mode, SslMode::Disable);
        assert_eq!(p.pg.get_dbname(), Some("d"));
        assert!(p.pg.get_options().unwrap().contains("-c TimeZone=UTC"));
    }

    #[test]
    fn rejects_unknown_sslmode() {
        let err = ConnectParams::parse("postgres://h/d?sslmode=sometimes").unwrap_err();
        assert!(err.to_string().contains("sometimes"));
    }
}
