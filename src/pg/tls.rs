//! TLS for every walhook connection, with libpq's `sslmode` semantics: which roots are
//! trusted (only `sslrootcert`'s, or the system's with `sslrootcert=system`), whether
//! the chain and the host name are checked, and the client certificate.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use super::PgError;
use super::conninfo::{RootCerts, SslMode, TlsSettings};

/// The rustls configuration for these settings, or `None` for `sslmode=disable`.
/// Files are read on each call, so a renewed certificate is used at the next connect.
pub fn client_config(tls: &TlsSettings) -> Result<Option<Arc<ClientConfig>>, PgError> {
    if tls.mode == SslMode::Disable {
        return Ok(None);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .dangerous();
    let builder = match &tls.roots {
        // prefer/require without a root file: encrypt, accept any certificate (libpq).
        None => builder.with_custom_certificate_verifier(Arc::new(NoVerify(provider))),
        Some(roots) => {
            let store = Arc::new(root_store(roots)?);
            let inner =
                rustls::client::WebPkiServerVerifier::builder_with_provider(store, provider)
                    .build()
                    .map_err(|e| PgError::TlsFile {
                        what: "cannot use the root certificates".into(),
                        source: e.into(),
                    })?;
            builder.with_custom_certificate_verifier(Arc::new(ChainVerifier {
                inner,
                check_name: tls.mode == SslMode::VerifyFull,
            }))
        }
    };
    let mut config = match &tls.client_cert {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let (chain, key) = client_identity(cert, key)?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| PgError::TlsFile {
                    what: format!("client certificate `{}`", cert.display()),
                    source: e.into(),
                })?
        }
    };
    config.enable_sni = tls.sni;
    Ok(Some(Arc::new(config)))
}

/// The trusted roots: only the file's certificates, or the system's.
fn root_store(roots: &RootCerts) -> Result<RootCertStore, PgError> {
    let mut store = RootCertStore::empty();
    match roots {
        RootCerts::System => {
            let native = rustls_native_certs::load_native_certs();
            store.add_parsable_certificates(native.certs);
            if store.is_empty() {
                return Err(PgError::Tls(
                    "sslrootcert=system, but the system has no trusted root certificates. Fix: install ca-certificates or name a CA file in sslrootcert".into(),
                ));
            }
        }
        RootCerts::File(path) => {
            let certs = read_certs(path, "sslrootcert")?;
            store.add_parsable_certificates(certs);
        }
    }
    Ok(store)
}

fn read_certs(path: &Path, key: &str) -> Result<Vec<CertificateDer<'static>>, PgError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| PgError::TlsFile {
            what: format!("cannot read {key} `{}`", path.display()),
            source: e.into(),
        })?;
    if certs.is_empty() {
        return Err(PgError::Tls(format!(
            "{key} `{}` holds no PEM certificate",
            path.display()
        )));
    }
    Ok(certs)
}

/// The client certificate chain and its key. Like libpq, a key file others may read
/// is refused (0600, or 0640 when owned by root).
fn client_identity(
    cert: &Path,
    key: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), PgError> {
    let chain = read_certs(cert, "sslcert")?;
    let meta = std::fs::metadata(key).map_err(|e| PgError::TlsFile {
        what: format!(
            "cannot read sslkey `{}` (the key of client certificate `{}`)",
            key.display(),
            cert.display()
        ),
        source: e.into(),
    })?;
    let allowed = if meta.uid() == 0 { 0o037 } else { 0o077 };
    if meta.mode() & allowed != 0 {
        return Err(PgError::Tls(format!(
            "private key file `{}` has group or world access. Fix: chmod 0600 it (or 0640 when owned by root)",
            key.display()
        )));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| PgError::TlsFile {
        what: format!("cannot read sslkey `{}`", key.display()),
        source: e.into(),
    })?;
    Ok((chain, key_der))
}

/// `sslmode=require|prefer` without roots: encrypt, but accept any certificate (also
/// a webhook receiver's with `tls_insecure`). Handshake signatures are still checked.
#[derive(Debug)]
pub(crate) struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl NoVerify {
    pub(crate) fn new(provider: Arc<rustls::crypto::CryptoProvider>) -> NoVerify {
        NoVerify(provider)
    }
}

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

/// A verified chain; the host name only when `check_name` (verify-full).
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
