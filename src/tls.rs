//! TLS with vLLM's flags, for the router's listener (and the simulator's) and for the
//! router's connections to https workers; rustls with its ring provider (a memory-safe TLS
//! stack, the one tokio-rustls and reqwest speak; ring builds without cmake).
//!
//! - Serving: `--ssl-keyfile` + `--ssl-certfile` (PEM), `--ssl-ca-certs` and
//!   `--ssl-cert-reqs` 0|1|2 (Python's ssl.CERT_NONE/OPTIONAL/REQUIRED, as `vllm serve`
//!   takes them): client certificates are verified against the CA file (mTLS).
//! - Reaching workers: `--worker-ssl-ca-certs` (else the system's roots),
//!   `--worker-ssl-certfile` / `--worker-ssl-keyfile` (a client certificate, for vLLM's
//!   `--ssl-cert-reqs 2`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};
use clap::Args;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// The listener's TLS, as `vllm serve` takes it.
#[derive(Args, Debug, Clone, Default)]
#[command(next_help_heading = "TLS")]
pub(crate) struct ServerTlsArgs {
    /// The private key (PEM) of the listener's certificate: serve HTTPS (with --ssl-certfile).
    #[arg(long, value_name = "FILE")]
    pub(crate) ssl_keyfile: Option<PathBuf>,
    /// The listener's certificate chain (PEM).
    #[arg(long, value_name = "FILE")]
    pub(crate) ssl_certfile: Option<PathBuf>,
    /// CA certificates (PEM) that clients' certificates must chain to (--ssl-cert-reqs 1|2).
    #[arg(long, value_name = "FILE")]
    pub(crate) ssl_ca_certs: Option<PathBuf>,
    /// Client certificates: 0 not asked for, 1 verified when sent, 2 required (mTLS).
    #[arg(long, value_name = "0|1|2", default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=2))]
    pub(crate) ssl_cert_reqs: u8,
}

/// What an HTTPS listener speaks (ALPN).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Alpn {
    /// HTTP/2 and HTTP/1.1 (the router).
    H2AndHttp1,
    /// HTTP/1.1 only (vLLM's uvicorn; the simulator).
    Http1,
}

fn certs(path: &Path, flag: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("{flag} {}: cannot read it", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{flag} {}: not PEM certificates", path.display()))?;
    if certs.is_empty() {
        bail!("{flag} {}: no certificate in it", path.display());
    }
    Ok(certs)
}

fn key(path: &Path, flag: &str) -> anyhow::Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path).with_context(|| format!("{flag} {}: no PEM private key in it", path.display()))
}

fn roots(path: &Path, flag: &str) -> anyhow::Result<RootCertStore> {
    let mut store = RootCertStore::empty();
    for c in certs(path, flag)? {
        store.add(c).with_context(|| format!("{flag} {}: not a usable CA certificate", path.display()))?;
    }
    Ok(store)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl ServerTlsArgs {
    /// Whether HTTPS is asked for; the combination of flags is checked.
    pub(crate) fn enabled(&self) -> anyhow::Result<bool> {
        match (&self.ssl_keyfile, &self.ssl_certfile) {
            (Some(_), Some(_)) => {}
            (None, None) if self.ssl_ca_certs.is_none() && self.ssl_cert_reqs == 0 => return Ok(false),
            (None, None) => {
                bail!("--ssl-ca-certs and --ssl-cert-reqs need --ssl-keyfile and --ssl-certfile (the listener's own certificate)")
            }
            _ => bail!("--ssl-keyfile and --ssl-certfile go together"),
        }
        if self.ssl_cert_reqs > 0 && self.ssl_ca_certs.is_none() {
            bail!("--ssl-cert-reqs {} verifies client certificates: give the CA they chain to with --ssl-ca-certs", self.ssl_cert_reqs);
        }
        Ok(true)
    }

    fn config(&self, alpn: Alpn) -> anyhow::Result<ServerConfig> {
        let (Some(keyfile), Some(certfile)) = (&self.ssl_keyfile, &self.ssl_certfile) else { bail!("no certificate") };
        let builder = ServerConfig::builder_with_provider(provider()).with_safe_default_protocol_versions().context("TLS versions")?;
        let builder = match (&self.ssl_ca_certs, self.ssl_cert_reqs) {
            (Some(ca), reqs @ (1 | 2)) => {
                let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca, "--ssl-ca-certs")?), provider());
                let verifier = if reqs == 1 { verifier.allow_unauthenticated() } else { verifier };
                builder.with_client_cert_verifier(verifier.build().context("--ssl-ca-certs")?)
            }
            _ => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(certs(certfile, "--ssl-certfile")?, key(keyfile, "--ssl-keyfile")?)
            .context("--ssl-certfile / --ssl-keyfile: the key does not match the certificate")?;
        config.alpn_protocols = match alpn {
            Alpn::H2AndHttp1 => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
            Alpn::Http1 => vec![b"http/1.1".to_vec()],
        };
        Ok(config)
    }

    fn files(&self) -> Vec<PathBuf> {
        [&self.ssl_keyfile, &self.ssl_certfile, &self.ssl_ca_certs].into_iter().flatten().cloned().collect()
    }
}

/// An HTTPS listener's configuration, reloaded when its files change.
pub(crate) struct ServerTls {
    args: ServerTlsArgs,
    alpn: Alpn,
    current: RwLock<Arc<ServerConfig>>,
}

/// How often the certificate files are looked at.
const RELOAD_EVERY: Duration = Duration::from_secs(2);

impl ServerTls {
    /// The listener's TLS, or None for plain HTTP.
    pub(crate) fn load(args: &ServerTlsArgs, alpn: Alpn) -> anyhow::Result<Option<Arc<ServerTls>>> {
        if !args.enabled()? {
            return Ok(None);
        }
        let config = args.config(alpn)?;
        Ok(Some(Arc::new(ServerTls { args: args.clone(), alpn, current: RwLock::new(Arc::new(config)) })))
    }

    /// An acceptor with the configuration of this moment.
    pub(crate) fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.current.read().unwrap_or_else(|e| e.into_inner()).clone())
    }

    /// Reloads the configuration whenever one of its files changes (a new certificate in
    /// place of an expiring one); a file that does not load keeps the one in use (logged).
    pub(crate) async fn reload_on_change(self: Arc<Self>) {
        let stamp = |files: &[PathBuf]| {
            files.iter().map(|f| std::fs::metadata(f).and_then(|m| m.modified()).ok()).collect::<Vec<Option<SystemTime>>>()
        };
        let files = self.args.files();
        let mut seen = stamp(&files);
        loop {
            tokio::time::sleep(RELOAD_EVERY).await;
            let now = stamp(&files);
            if now == seen {
                continue;
            }
            seen = now;
            match self.args.config(self.alpn) {
                Ok(config) => {
                    *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(config);
                    tracing::info!("TLS: certificate files changed; reloaded");
                }
                Err(e) => tracing::warn!("TLS: certificate files changed but do not load ({e:#}); the previous ones stay in use"),
            }
        }
    }
}

/// How the router reaches https workers.
#[derive(Args, Debug, Clone, Default)]
#[command(next_help_heading = "TLS")]
pub struct WorkerTlsArgs {
    /// CA certificates (PEM) that https workers' certificates must chain to (default: the
    /// system's roots).
    #[arg(long, value_name = "FILE")]
    pub worker_ssl_ca_certs: Option<PathBuf>,
    /// A client certificate (PEM) presented to https workers (vLLM's --ssl-cert-reqs 2).
    #[arg(long, value_name = "FILE")]
    pub worker_ssl_certfile: Option<PathBuf>,
    /// The private key (PEM) of --worker-ssl-certfile.
    #[arg(long, value_name = "FILE")]
    pub worker_ssl_keyfile: Option<PathBuf>,
}

impl WorkerTlsArgs {
    /// The client configuration for https workers (HTTP/1.1: vLLM speaks nothing else).
    pub fn client_config(&self) -> anyhow::Result<Arc<ClientConfig>> {
        let roots = match &self.worker_ssl_ca_certs {
            Some(ca) => roots(ca, "--worker-ssl-ca-certs")?,
            None => {
                let mut store = RootCertStore::empty();
                let found = rustls_native_certs::load_native_certs();
                store.add_parsable_certificates(found.certs);
                store
            }
        };
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .context("TLS versions")?
            .with_root_certificates(roots);
        let mut config = match (&self.worker_ssl_certfile, &self.worker_ssl_keyfile) {
            (Some(c), Some(k)) => builder
                .with_client_auth_cert(certs(c, "--worker-ssl-certfile")?, key(k, "--worker-ssl-keyfile")?)
                .context("--worker-ssl-certfile / --worker-ssl-keyfile: the key does not match the certificate")?,
            (None, None) => builder.with_no_client_auth(),
            _ => bail!("--worker-ssl-certfile and --worker-ssl-keyfile go together"),
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

/// A TLS server name for a URL's host (an IP address or a DNS name).
pub(crate) fn server_name(host: &str) -> anyhow::Result<rustls_pki_types::ServerName<'static>> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    rustls_pki_types::ServerName::try_from(bare.to_string()).with_context(|| format!("`{host}` is not a TLS server name"))
}

/// A TLS handshake's error as a person reads it (rustls names the certificate's fault).
pub(crate) fn describe(e: &std::io::Error) -> String {
    match e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
        Some(tls) => format!("TLS: {tls}"),
        None => e.to_string(),
    }
}
