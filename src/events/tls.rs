//! TLS for the event deliveries: one rustls client config, built from the operator's files, for MQTT and webhooks.
//!
//! rustls with its `ring` provider: it builds with a C compiler alone, where aws-lc-rs would need cmake and
//! native-tls the system's OpenSSL headers. The server is checked against the system's roots (Debian's
//! ca-certificates, read by rustls-native-certs) unless `ca_file` names a private CA, which then replaces them: a
//! broker signed by a private CA has no business presenting a public certificate instead. The files are read each
//! time a config is built (each MQTT connection, each webhook sink), so a renewed certificate is picked up without a
//! restart, and the same function checks them at `config check`, so a wrong path fails there rather than at
//! 3 a.m.

use std::error::Error as StdError;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

/// The files one destination's TLS is built from; all optional.
#[derive(Debug, Clone, Copy, Default)]
pub struct TlsFiles<'a> {
    /// PEM certificates of the CAs to trust instead of the system's roots.
    pub ca_file: Option<&'a Path>,
    /// PEM certificate chain this client presents (mutual TLS), leaf first.
    pub client_cert_file: Option<&'a Path>,
    /// PEM private key of `client_cert_file` (PKCS#8, PKCS#1 or SEC1).
    pub client_key_file: Option<&'a Path>,
}

impl<'a> TlsFiles<'a> {
    /// The files of a config's `ca_file`, `client_cert_file` and `client_key_file` keys.
    pub fn of(
        ca_file: &'a Option<PathBuf>,
        client_cert_file: &'a Option<PathBuf>,
        client_key_file: &'a Option<PathBuf>,
    ) -> TlsFiles<'a> {
        TlsFiles {
            ca_file: ca_file.as_deref(),
            client_cert_file: client_cert_file.as_deref(),
            client_key_file: client_key_file.as_deref(),
        }
    }

    /// The keys set, for a config to refuse them where it speaks no TLS.
    pub fn keys_given(&self) -> Vec<&'static str> {
        [
            ("ca_file", self.ca_file.is_some()),
            ("client_cert_file", self.client_cert_file.is_some()),
            ("client_key_file", self.client_key_file.is_some()),
        ]
        .into_iter()
        .filter_map(|(key, given)| given.then_some(key))
        .collect()
    }
}

/// Why no client config could be built, naming the config key (`ca_file`, …, or `tls` for the system's roots) and
/// the file at fault.
#[derive(Debug, thiserror::Error)]
#[error("{key} {}", self.detail())]
pub struct TlsError {
    pub key: &'static str,
    pub file: Option<PathBuf>,
    pub problem: String,
}

fn file_error(key: &'static str, file: &Path, problem: impl std::fmt::Display) -> TlsError {
    TlsError {
        key,
        file: Some(file.to_path_buf()),
        problem: problem.to_string(),
    }
}

fn setting_error(key: &'static str, problem: &str) -> TlsError {
    TlsError {
        key,
        file: None,
        problem: problem.to_string(),
    }
}

impl TlsError {
    /// The error without its key: `<file>: <problem>`, or the problem alone.
    pub fn detail(&self) -> String {
        match &self.file {
            Some(file) => format!("{}: {}", file.display(), self.problem),
            None => self.problem.clone(),
        }
    }
}

/// Certificates from a PEM file; none is an error, since an empty trust list or chain can only be a mistake.
fn certificates(key: &'static str, file: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    // Read first, so a missing or unreadable file says so plainly rather than as a PEM error.
    let text =
        std::fs::read(file).map_err(|e| file_error(key, file, format!("cannot read: {e}")))?;
    let certs = CertificateDer::pem_slice_iter(&text)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(key, file, format!("not valid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(file_error(
            key,
            file,
            "holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
        ));
    }
    Ok(certs)
}

fn roots(ca_file: Option<&Path>) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    match ca_file {
        Some(file) => {
            for cert in certificates("ca_file", file)? {
                roots.add(cert).map_err(|e| {
                    file_error("ca_file", file, format!("not a usable CA certificate: {e}"))
                })?;
            }
        }
        None => {
            // Unreadable entries in the system's store are skipped: one bad file there must not stop delivery.
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                return Err(setting_error(
                    "tls",
                    "this system has no trusted CA certificates (install ca-certificates), and no ca_file is set",
                ));
            }
        }
    }
    Ok(roots)
}

/// The client config for `files`: the server checked against the CA file (or the system's roots), and a client
/// certificate when one is given.
pub fn client_config(files: TlsFiles<'_>) -> Result<Arc<ClientConfig>, TlsError> {
    let roots = roots(files.ca_file)?;
    // rustls 0.23.48 deprecates the ring provider for its lack of post-quantum key exchange; its classical X25519
    // and P-256 are what brokers and receivers on a site network offer today, and the alternative (aws-lc-rs) is a
    // large C build. Revisit with rustls 0.24.
    #[allow(deprecated)]
    let provider = rustls::crypto::ring::default_provider();
    let builder = ClientConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| setting_error("tls", &format!("TLS provider: {e}")))?
        .with_root_certificates(roots);
    let config = match (files.client_cert_file, files.client_key_file) {
        (None, None) => builder.with_no_client_auth(),
        (Some(cert_file), Some(key_file)) => {
            let chain = certificates("client_cert_file", cert_file)?;
            let text = std::fs::read(key_file).map_err(|e| {
                file_error("client_key_file", key_file, format!("cannot read: {e}"))
            })?;
            let key = PrivateKeyDer::from_pem_slice(&text).map_err(|e| {
                file_error(
                    "client_key_file",
                    key_file,
                    format!("holds no PEM private key: {e}"),
                )
            })?;
            builder.with_client_auth_cert(chain, key).map_err(|e| {
                file_error(
                    "client_key_file",
                    key_file,
                    format!(
                        "does not go with client_cert_file {}: {e}",
                        cert_file.display()
                    ),
                )
            })?
        }
        (Some(_), None) => {
            return Err(setting_error(
                "client_key_file",
                "is needed with client_cert_file (the certificate's private key)",
            ))
        }
        (None, Some(_)) => {
            return Err(setting_error(
                "client_cert_file",
                "is needed with client_key_file (the certificate the key belongs to)",
            ))
        }
    };
    Ok(Arc::new(config))
}

/// What an operator should do about a failed connection, when the cause is a TLS problem one can name: walks the
/// error's sources (and the errors wrapped inside `io::Error`s, where tokio-rustls puts rustls's). `handshake`:
/// the error came from the TLS handshake, where a connection closed or reset by the server most often means a
/// plain listener (which reads the ClientHello as garbage) or a missing client certificate.
pub fn hint(error: &(dyn StdError + 'static), handshake: bool) -> Option<&'static str> {
    use rustls::{AlertDescription, CertificateError};
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(match tls {
                rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => {
                    "the server's certificate is not signed by a CA this client trusts: set ca_file to the PEM of \
                     the CA that signed it"
                }
                rustls::Error::InvalidCertificate(CertificateError::NotValidForName)
                | rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext {
                    ..
                }) => {
                    "the server's certificate does not name the host connected to: use a host name (or IP) that \
                     its subject alternative names list"
                }
                rustls::Error::InvalidCertificate(CertificateError::Expired)
                | rustls::Error::InvalidCertificate(CertificateError::ExpiredContext { .. }) => {
                    "the server's certificate has expired (or this machine's clock is wrong)"
                }
                rustls::Error::AlertReceived(
                    AlertDescription::CertificateRequired
                    | AlertDescription::BadCertificate
                    | AlertDescription::UnknownCA
                    | AlertDescription::HandshakeFailure,
                ) => {
                    "the server refused the handshake, most often for want of an acceptable client certificate: \
                     check client_cert_file and client_key_file"
                }
                rustls::Error::InvalidMessage(_) => {
                    "the server did not answer in TLS: is this port a plain (non-TLS) listener? MQTT over TLS is \
                     usually on 8883, https on 443"
                }
                _ => return None,
            });
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind;
            let closed = matches!(
                io.kind(),
                ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset | ErrorKind::BrokenPipe
            );
            if handshake && closed {
                return Some(
                    "the server closed the connection during the TLS handshake: is this port a plain (non-TLS) \
                     listener, or does the server require a client certificate?",
                );
            }
            if let Some(inner) = io.get_ref() {
                next = Some(inner as &(dyn StdError + 'static));
                continue;
            }
        }
        next = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_mistakes_name_the_key_and_the_file() {
        let dir = tempfile::tempdir().expect("tmp");
        let missing = dir.path().join("missing.pem");
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not a certificate\n").expect("write");
        for (files, needle) in [
            (
                TlsFiles {
                    ca_file: Some(&missing),
                    ..TlsFiles::default()
                },
                format!("ca_file {}: cannot read", missing.display()),
            ),
            (
                TlsFiles {
                    ca_file: Some(&garbage),
                    ..TlsFiles::default()
                },
                format!("ca_file {}: holds no PEM certificate", garbage.display()),
            ),
            (
                TlsFiles {
                    client_cert_file: Some(&garbage),
                    ..TlsFiles::default()
                },
                "client_key_file is needed with client_cert_file".to_string(),
            ),
        ] {
            let err = client_config(files).expect_err(&needle).to_string();
            assert!(err.contains(&needle), "{needle} not in {err}");
        }
    }

    #[test]
    fn hints_reach_rustls_errors_inside_io_errors() {
        let inner = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, inner);
        assert!(hint(&io, false).is_some_and(|h| h.contains("ca_file")));
        let eof = std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "tls handshake eof");
        assert!(hint(&eof, true).is_some_and(|h| h.contains("plain")));
        assert!(
            hint(&eof, false).is_none(),
            "a closed connection is not a TLS matter"
        );
        assert!(hint(&std::io::Error::other("refused"), true).is_none());
    }
}
