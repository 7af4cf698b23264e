//! TLS settings: the CA bundle that verifies the broker, and the client certificate for
//! mutual TLS (`tls_ca_file`, `tls_cert_file`, `tls_key_file`).
//!
//! A configured CA bundle *replaces* the system roots: the broker must present a certificate
//! issued by one of its CAs (lapin's own CA option only adds to the system roots). Without
//! one, the system roots verify the broker. There is no switch that turns verification off.
//!
//! The files are read and checked when the configuration loads (readable, PEM, the key
//! matches the certificate) and again when a connection is built, so a file replaced on disk
//! is picked up on the next reconnect. Errors name the key and the path, never the files'
//! contents.

use std::{
    fmt,
    path::{Path, PathBuf},
    sync::Arc,
};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

/// The configured TLS files; each `None` when unset.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct TlsFiles {
    /// PEM CA bundle that verifies the broker (`tls_ca_file`); replaces the system roots.
    #[serde(rename = "tls_ca_file", serialize_with = "crate::config::written")]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate chain, leaf first (`tls_cert_file`).
    #[serde(rename = "tls_cert_file", serialize_with = "crate::config::written")]
    pub cert_file: Option<PathBuf>,
    /// PEM private key of the client certificate (`tls_key_file`).
    #[serde(rename = "tls_key_file", serialize_with = "crate::config::written")]
    pub key_file: Option<PathBuf>,
}

/// Why the TLS settings cannot be used. Messages name the key and the path, never what the
/// files contain.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A file cannot be read.
    #[error("`{key}`: cannot read {}", path.display())]
    Read {
        /// The configuration key.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A file holds no usable PEM item of the expected kind.
    #[error("`{key}`: {} {what}", path.display())]
    Pem {
        /// The configuration key.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong, e.g. "holds no PEM certificate".
        what: &'static str,
    },
    /// Only one of `tls_cert_file` and `tls_key_file` is set.
    #[error("`{missing}` is not set: `{given}` needs it (set both or neither)")]
    Incomplete {
        /// The key that is set.
        given: &'static str,
        /// The key that is missing.
        missing: &'static str,
    },
    /// The private key does not belong to the certificate.
    #[error(
        "`tls_key_file`: the key in {} does not match the certificate in {}",
        key_path.display(),
        cert_path.display()
    )]
    KeyMismatch {
        /// The key file.
        key_path: PathBuf,
        /// The certificate file.
        cert_path: PathBuf,
    },
    /// rustls refused the certificates or the key.
    #[error("the TLS settings are not usable: {0}")]
    Rustls(#[source] rustls::Error),
    /// No CA bundle is configured and the system has no root certificates.
    #[error(
        "no system root certificates found; set `tls_ca_file` to the CA bundle that issued the broker's certificate"
    )]
    NoSystemRoots,
}

impl TlsError {
    /// The configuration key the problem belongs to.
    #[must_use]
    pub fn key(&self) -> &'static str {
        match self {
            Self::Read { key, .. } | Self::Pem { key, .. } => key,
            Self::Incomplete { missing, .. } => missing,
            Self::KeyMismatch { .. } => "tls_key_file",
            Self::Rustls(_) => "tls_cert_file",
            Self::NoSystemRoots => "tls_ca_file",
        }
    }
}

impl TlsError {
    /// The problem without the key, for a configuration problem that names the key itself.
    pub(crate) fn message(&self) -> String {
        match self {
            Self::Read { path, source, .. } => {
                format!("cannot read {} ({source})", path.display())
            }
            Self::Pem { path, what, .. } => format!("{} {what}", path.display()),
            Self::Incomplete { given, .. } => {
                format!("must be set as well: `{given}` needs it (set both or neither)")
            }
            Self::KeyMismatch { .. } | Self::Rustls(_) | Self::NoSystemRoots => {
                let text = self.to_string();
                let prefix = format!("`{}`: ", self.key());
                text.strip_prefix(&prefix)
                    .map(str::to_owned)
                    .unwrap_or(text)
            }
        }
    }
}

/// The CA bundle, and the client certificate chain with its key.
pub(crate) type Material = (
    Option<Vec<CertificateDer<'static>>>,
    Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
);

/// A client certificate chain and its key. `Debug` shows neither.
struct Identity {
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("certs", &self.certs.len())
            .finish_non_exhaustive()
    }
}

impl TlsFiles {
    /// Whether any TLS file is configured.
    #[must_use]
    pub fn is_set(&self) -> bool {
        self.ca_file.is_some() || self.cert_file.is_some() || self.key_file.is_some()
    }

    /// Checks every file: readable, PEM, the key matches the certificate; returns every
    /// problem found.
    #[must_use]
    pub fn problems(&self) -> Vec<TlsError> {
        let mut problems = Vec::new();
        if let Some(path) = &self.ca_file
            && let Err(error) = ca_roots(path)
        {
            problems.push(error);
        }
        match self.identity() {
            Ok(Some(identity)) => {
                if let Err(error) = rustls::ClientConfig::builder_with_provider(provider())
                    .with_safe_default_protocol_versions()
                    .map_err(TlsError::Rustls)
                    .and_then(|builder| {
                        builder
                            .with_root_certificates(rustls::RootCertStore::empty())
                            .with_client_auth_cert(identity.certs, identity.key)
                            .map_err(|error| self.rustls_error(error))
                    })
                {
                    problems.push(error);
                }
            }
            Ok(None) => {}
            Err(mut errors) => problems.append(&mut errors),
        }
        problems
    }

    /// The rustls client configuration: the CA bundle (or the system roots) and the client
    /// certificate, if any.
    ///
    /// # Errors
    ///
    /// The first problem of [`TlsFiles::problems`], or [`TlsError::NoSystemRoots`].
    pub fn client_config(&self) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        let roots = match &self.ca_file {
            Some(path) => ca_roots(path)?,
            None => {
                let mut roots = rustls::RootCertStore::empty();
                roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
                if roots.is_empty() {
                    return Err(TlsError::NoSystemRoots);
                }
                roots
            }
        };
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Rustls)?
            .with_root_certificates(roots);
        let config = match self.identity().map_err(first)? {
            Some(identity) => builder
                .with_client_auth_cert(identity.certs, identity.key)
                .map_err(|error| self.rustls_error(error))?,
            None => builder.with_no_client_auth(),
        };
        Ok(Arc::new(config))
    }

    /// The parsed CA bundle and client certificate with its key, for clients that take them
    /// apart (the management API's HTTP client).
    #[cfg_attr(not(feature = "cli"), expect(dead_code, reason = "read by the CLI"))]
    pub(crate) fn material(&self) -> Result<Material, TlsError> {
        let roots = match &self.ca_file {
            Some(path) => Some(read_certs("tls_ca_file", path)?),
            None => None,
        };
        let identity = self
            .identity()
            .map_err(first)?
            .map(|identity| (identity.certs, identity.key));
        Ok((roots, identity))
    }

    /// The client certificate and key (`None` when neither is set).
    fn identity(&self) -> Result<Option<Identity>, Vec<TlsError>> {
        match (&self.cert_file, &self.key_file) {
            (None, None) => Ok(None),
            (Some(_), None) => Err(vec![TlsError::Incomplete {
                given: "tls_cert_file",
                missing: "tls_key_file",
            }]),
            (None, Some(_)) => Err(vec![TlsError::Incomplete {
                given: "tls_key_file",
                missing: "tls_cert_file",
            }]),
            (Some(cert_path), Some(key_path)) => {
                let certs = read_certs("tls_cert_file", cert_path);
                let key = read_key(key_path);
                match (certs, key) {
                    (Ok(certs), Ok(key)) => Ok(Some(Identity { certs, key })),
                    (certs, key) => Err(certs.err().into_iter().chain(key.err()).collect()),
                }
            }
        }
    }

    fn rustls_error(&self, error: rustls::Error) -> TlsError {
        match (&error, &self.cert_file, &self.key_file) {
            (rustls::Error::InconsistentKeys(_), Some(cert_path), Some(key_path)) => {
                TlsError::KeyMismatch {
                    key_path: key_path.clone(),
                    cert_path: cert_path.clone(),
                }
            }
            _ => TlsError::Rustls(error),
        }
    }
}

/// The roots of a CA bundle: only its certificates, not the system's.
fn ca_roots(path: &Path) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(read_certs("tls_ca_file", path)?);
    if added == 0 {
        return Err(TlsError::Pem {
            key: "tls_ca_file",
            path: path.to_owned(),
            what: "holds no usable CA certificate",
        });
    }
    Ok(roots)
}

/// The first of the problems [`TlsFiles::identity`] found (it reports at least one).
fn first(mut errors: Vec<TlsError>) -> TlsError {
    if errors.is_empty() {
        TlsError::NoSystemRoots
    } else {
        errors.swap_remove(0)
    }
}

/// The crypto provider: ring, as lapin's `rustls--ring` feature (no cmake needed).
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        key,
        path: path.to_owned(),
        source,
    })
}

fn read_certs(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(key, path)?;
    let pem = |what| TlsError::Pem {
        key,
        path: path.to_owned(),
        what,
    };
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| pem("is not valid PEM"))?;
    if certs.is_empty() {
        return Err(pem(
            "holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
        ));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read("tls_key_file", path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|error| TlsError::Pem {
        key: "tls_key_file",
        path: path.to_owned(),
        what: match error {
            rustls::pki_types::pem::Error::NoItemsFound => {
                "holds no PEM private key (PKCS#8, PKCS#1 or SEC1)"
            }
            _ => "is not valid PEM",
        },
    })
}

/// A TLS failure in words an operator acts on: "issued by an unknown CA", "name mismatch",
/// "the broker requires a client certificate (...)"; `None` when `error` is no TLS failure.
/// `client_cert` says whether a client certificate was offered.
pub(crate) fn describe(
    error: &(dyn std::error::Error + 'static),
    client_cert: bool,
) -> Option<String> {
    let rustls = find_rustls(error)?;
    Some(describe_rustls(rustls, client_cert))
}

fn find_rustls<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(error) = current {
        if let Some(found) = error.downcast_ref::<rustls::Error>() {
            return Some(found);
        }
        if let Some(io) = error.downcast_ref::<std::io::Error>()
            && let Some(inner) = io.get_ref()
            && let Some(found) = inner.downcast_ref::<rustls::Error>()
        {
            return Some(found);
        }
        current = error.source();
    }
    None
}

fn describe_rustls(error: &rustls::Error, client_cert: bool) -> String {
    use rustls::{AlertDescription as Alert, CertificateError as Cert, Error};
    match error {
        Error::InvalidCertificate(Cert::UnknownIssuer | Cert::BadSignature) => {
            "the broker's certificate is issued by an unknown CA (not in tls_ca_file, or not a \
             system root when tls_ca_file is unset)"
                .to_owned()
        }
        Error::InvalidCertificate(Cert::NotValidForName | Cert::NotValidForNameContext { .. }) => {
            "name mismatch: the broker's certificate is not valid for the host in the URL"
                .to_owned()
        }
        Error::InvalidCertificate(Cert::Expired | Cert::ExpiredContext { .. }) => {
            "the broker's certificate has expired".to_owned()
        }
        Error::InvalidCertificate(other) => {
            format!("the broker's certificate is invalid ({other:?})")
        }
        Error::AlertReceived(Alert::CertificateRequired) => {
            "the broker requires a client certificate (set tls_cert_file and tls_key_file)"
                .to_owned()
        }
        Error::AlertReceived(Alert::HandshakeFailure) if !client_cert => {
            "the broker requires a client certificate (set tls_cert_file and tls_key_file), or \
             shares no TLS version or cipher suite with this client"
                .to_owned()
        }
        Error::AlertReceived(Alert::UnknownCA | Alert::BadCertificate) => {
            "the broker does not accept the client certificate (is it issued by a CA the \
             broker trusts?)"
                .to_owned()
        }
        Error::AlertReceived(Alert::CertificateExpired) => {
            "the broker says the client certificate has expired".to_owned()
        }
        other => format!("TLS failure ({other})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problems_name_the_key_and_the_path() {
        let files = TlsFiles {
            ca_file: Some(PathBuf::from("/nonexistent/ca.pem")),
            cert_file: Some(PathBuf::from("/nonexistent/client.pem")),
            key_file: None,
        };
        let problems: Vec<String> = files.problems().iter().map(ToString::to_string).collect();
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems[0].contains("`tls_ca_file`") && problems[0].contains("/nonexistent/ca.pem")
        );
        assert!(
            problems[1].contains("`tls_key_file` is not set"),
            "{problems:?}"
        );
    }

    #[test]
    fn tls_failures_in_words() {
        let unknown = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, unknown);
        assert!(
            describe(&io, true)
                .unwrap_or_default()
                .contains("unknown CA")
        );
        let required = rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRequired);
        assert!(
            describe(&required, false)
                .unwrap_or_default()
                .contains("tls_cert_file")
        );
        assert_eq!(describe(&std::io::Error::other("refused"), false), None);
    }
}
