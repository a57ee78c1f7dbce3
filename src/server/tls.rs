//! TLS on the listener (`--tls-cert`, `--tls-key`, `--tls-client-ca`),
//! with rustls and the ring provider.
//!
//! One port still serves everything: ALPN offers `h2` and `http/1.1`, and
//! hyper tells the protocols apart on the decrypted bytes as it does in
//! plain text. The handshake counts toward the connection's handshake
//! deadline (`conn.rs`), and the frame scanner (`io.rs`) reads the
//! decrypted bytes.
//!
//! The certificate is reloaded on SIGHUP without dropping a connection:
//! the server's certificate resolver hands out the current
//! [`CertifiedKey`], which a reload swaps; open connections keep the one
//! they started with, new handshakes get the new one. A reload that fails
//! (a missing file, a key that does not match) keeps the old certificate
//! and says why in the log.
//!
//! With `--tls-client-ca`, clients may present a certificate signed by that
//! CA; a verified certificate's subject alternative names (URI, DNS, email,
//! in that order) stand as the subject when a call carries no bearer token
//! ([`PeerIdentity`]). Without auth (`--auth-jwks`), a client certificate
//! is then required; with auth, it is one way to authenticate.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
};

use rustls::{
    crypto::ring::{default_provider, sign::any_supported_type},
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer},
    server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier},
    sign::CertifiedKey,
    RootCertStore, ServerConfig,
};
use tokio_rustls::TlsAcceptor;
use x509_cert::{
    der::{oid::AssociatedOid, Decode},
    ext::pkix::{name::GeneralName, SubjectAltName},
    Certificate,
};

use crate::config::TlsSettings;

/// The identity of a client that presented a verified certificate.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerIdentity {
    /// Its subject alternative names: URIs, then DNS names, then emails.
    pub sans: Vec<String>,
}

impl PeerIdentity {
    /// The SANs of a DER certificate.
    pub fn of(der: &[u8]) -> Option<Self> {
        let cert = Certificate::from_der(der).ok()?;
        let mut uris = Vec::new();
        let mut dns = Vec::new();
        let mut emails = Vec::new();
        for ext in cert.tbs_certificate.extensions.iter().flatten() {
            if ext.extn_id != SubjectAltName::OID {
                continue;
            }
            let Ok(san) = SubjectAltName::from_der(ext.extn_value.as_bytes()) else {
                continue;
            };
            for name in san.0 {
                match name {
                    GeneralName::UniformResourceIdentifier(s) => uris.push(s.to_string()),
                    GeneralName::DnsName(s) => dns.push(s.to_string()),
                    GeneralName::Rfc822Name(s) => emails.push(s.to_string()),
                    _ => {}
                }
            }
        }
        uris.extend(dns);
        uris.extend(emails);
        (!uris.is_empty()).then_some(Self { sans: uris })
    }
}

/// Hands out the current certificate; [`Tls::reload`] swaps it.
#[derive(Debug)]
struct Reloadable {
    cert: PathBuf,
    key: PathBuf,
    /// The current certificate and key. A `std::sync::RwLock`: read once
    /// per handshake, written by a reload; nothing awaits under it.
    current: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for Reloadable {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }
}

fn load_key(cert: &Path, key: &Path) -> Result<CertifiedKey, String> {
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("--tls-cert {}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!("--tls-cert {}: no certificate", cert.display()));
    }
    let private = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("--tls-key {}: {e}", key.display()))?;
    let signing =
        any_supported_type(&private).map_err(|e| format!("--tls-key {}: {e}", key.display()))?;
    let certified = CertifiedKey::new(certs, signing);
    certified
        .keys_match()
        .map_err(|e| format!("--tls-key {} does not match --tls-cert: {e}", key.display()))?;
    Ok(certified)
}

/// The listener's TLS: the acceptor and its reloadable certificate.
#[derive(Clone)]
pub struct Tls {
    pub acceptor: TlsAcceptor,
    resolver: Arc<Reloadable>,
}

impl Tls {
    /// Loads the certificate, the key and the client CA. `require_client`:
    /// a client certificate is required (mTLS without auth).
    pub fn load(settings: &TlsSettings, require_client: bool) -> Result<Self, String> {
        let current = load_key(&settings.cert, &settings.key)?;
        let resolver = Arc::new(Reloadable {
            cert: settings.cert.clone(),
            key: settings.key.clone(),
            current: RwLock::new(Arc::new(current)),
        });
        let provider = Arc::new(default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?;
        let builder = match &settings.client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                for cert in CertificateDer::pem_file_iter(ca)
                    .map_err(|e| format!("--tls-client-ca {}: {e}", ca.display()))?
                {
                    let cert =
                        cert.map_err(|e| format!("--tls-client-ca {}: {e}", ca.display()))?;
                    roots
                        .add(cert)
                        .map_err(|e| format!("--tls-client-ca {}: {e}", ca.display()))?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
                let verifier = if require_client {
                    verifier
                } else {
                    verifier.allow_unauthenticated()
                };
                let verifier = verifier
                    .build()
                    .map_err(|e| format!("--tls-client-ca {}: {e}", ca.display()))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder.with_cert_resolver(resolver.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Self {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            resolver,
        })
    }

    /// Loads the certificate and key files again; on failure the current
    /// ones stay.
    pub fn reload(&self) -> Result<(), String> {
        let fresh = load_key(&self.resolver.cert, &self.resolver.key)?;
        *self
            .resolver
            .current
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Arc::new(fresh);
        Ok(())
    }
}
