//! TLS as the bindings ask for it (the C ABI's `imrelay_options_set_tls*`, Java's
//! `ImRelayClient.Options.tls*`), in every build of the library: one place that turns "this
//! server name, this CA" into the options a [`ClientConfig`] connects with, and that says
//! "unsupported" in a build without the "tls" feature, so neither binding needs a `cfg` of
//! its own or builds a TLS configuration itself.
//!
//! With "tls", [`TlsSetting`] is `TlsClientOptions`, built by `TlsClientOptions::new`;
//! without, it is a type with no values and [`tls_setting`] always answers
//! [`TlsRequestError::Unsupported`].

use std::fmt;
use std::path::PathBuf;

use super::ClientConfig;

/// Where the relay's certificate must chain to, as a binding names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TlsCa {
    /// The platform's trust store (`TlsTrust::SystemRoots`).
    SystemRoots,
    /// The CA certificates in this PEM file.
    File(PathBuf),
    /// The CA certificates in these PEM bytes (a CA bundled with the app).
    Pem(Vec<u8>),
}

/// Why [`tls_setting`] gave no options.
#[derive(Debug)]
pub enum TlsRequestError {
    /// This library was built without the "tls" feature.
    Unsupported,
    /// The server name or the CA is unusable; the string says why (a bad PEM, an empty
    /// trust store, a name that is neither a DNS name nor an IP address, ...).
    Invalid(String),
}

impl fmt::Display for TlsRequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TlsRequestError::Unsupported => f.write_str(
                "this library was built without TLS (build it with the cargo feature \"tls\")",
            ),
            TlsRequestError::Invalid(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for TlsRequestError {}

/// TLS options ready for [`ClientConfig::use_tls`]: [`TlsClientOptions`](super::TlsClientOptions)
/// with the "tls" feature.
#[cfg(feature = "tls")]
pub type TlsSetting = super::TlsClientOptions;

/// TLS options ready for [`ClientConfig::use_tls`]: none can exist in a build without the
/// "tls" feature.
#[cfg(not(feature = "tls"))]
#[derive(Clone, Debug)]
pub enum TlsSetting {}

/// The TLS options for a relay whose certificate names `server_name` and chains to `ca`.
/// Reads a CA file or the system store now, so every problem is reported here, not at
/// each connect.
#[cfg(feature = "tls")]
pub fn tls_setting(server_name: &str, ca: TlsCa) -> Result<TlsSetting, TlsRequestError> {
    use super::{TlsClientOptions, TlsTrust};
    let trust = match ca {
        TlsCa::SystemRoots => TlsTrust::SystemRoots,
        TlsCa::File(path) => TlsTrust::CaFile(path),
        TlsCa::Pem(pem) => TlsTrust::CaPem(pem),
    };
    TlsClientOptions::new(server_name, trust).map_err(|e| TlsRequestError::Invalid(e.to_string()))
}

/// Always [`TlsRequestError::Unsupported`]: this build has no TLS.
#[cfg(not(feature = "tls"))]
pub fn tls_setting(_server_name: &str, _ca: TlsCa) -> Result<TlsSetting, TlsRequestError> {
    Err(TlsRequestError::Unsupported)
}

impl ClientConfig {
    /// Connects over TLS with `tls`, or plain TCP with `None`: `self.tls` in a build with
    /// the "tls" feature (where only `None` can be given without it).
    pub fn use_tls(&mut self, tls: Option<TlsSetting>) {
        #[cfg(feature = "tls")]
        {
            self.tls = tls;
        }
        #[cfg(not(feature = "tls"))]
        if let Some(never) = tls {
            match never {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::UserId;

    #[cfg(feature = "tls")]
    #[test]
    fn a_pem_without_a_certificate_is_invalid_and_names_the_problem() {
        let e = tls_setting("localhost", TlsCa::Pem(b"not a pem".to_vec())).unwrap_err();
        assert!(matches!(e, TlsRequestError::Invalid(_)), "{e:?}");
        assert!(e.to_string().contains("CERTIFICATE"), "{e}");
    }

    #[cfg(feature = "tls")]
    #[test]
    fn a_bad_server_name_is_invalid() {
        let e = tls_setting("not a name!", TlsCa::SystemRoots).unwrap_err();
        assert!(e.to_string().contains("not a valid DNS name"), "{e}");
    }

    #[cfg(not(feature = "tls"))]
    #[test]
    fn without_the_feature_tls_is_unsupported() {
        let e = tls_setting("localhost", TlsCa::SystemRoots).unwrap_err();
        assert!(matches!(e, TlsRequestError::Unsupported));
        assert!(e.to_string().contains("\"tls\""), "{e}");
    }

    #[test]
    fn use_tls_none_is_plain_tcp() {
        let mut config = ClientConfig::new(UserId(1));
        config.use_tls(None);
        #[cfg(feature = "tls")]
        assert!(config.tls.is_none());
    }
}
