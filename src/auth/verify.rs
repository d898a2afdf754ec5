//! [`Algorithm`] and [`Verifier`]: the configured key, and the check of one token.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use jsonwebtoken::crypto::CryptoProvider;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{DecodingKey, Validation};
use serde_json::{Map, Value};

use super::claims::grants_from_claims;
use super::{AuthError, Grants, KeyError, MAX_TOKEN_LEN, MIN_RSA_BITS, MIN_SECRET_LEN};

/// The signature algorithm, chosen by configuration. A token's header must name exactly
/// this algorithm; the header never chooses the key or the algorithm.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// HMAC with SHA-256 and a shared secret (the issuer and the relay both hold it).
    Hs256,
    /// RSASSA-PKCS1-v1_5 with SHA-256; the relay holds the issuer's RSA public key.
    Rs256,
    /// ECDSA on P-256 with SHA-256; the relay holds the issuer's EC public key.
    Es256,
}

impl Algorithm {
    /// The JOSE name: `"HS256"`, `"RS256"` or `"ES256"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Hs256 => "HS256",
            Algorithm::Rs256 => "RS256",
            Algorithm::Es256 => "ES256",
        }
    }

    pub(crate) fn jwt(self) -> jsonwebtoken::Algorithm {
        match self {
            Algorithm::Hs256 => jsonwebtoken::Algorithm::HS256,
            Algorithm::Rs256 => jsonwebtoken::Algorithm::RS256,
            Algorithm::Es256 => jsonwebtoken::Algorithm::ES256,
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Algorithm {
    type Err = KeyError;

    /// `HS256`, `RS256` or `ES256`, in any case.
    fn from_str(s: &str) -> Result<Algorithm, KeyError> {
        [Algorithm::Hs256, Algorithm::Rs256, Algorithm::Es256]
            .into_iter()
            .find(|a| a.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| KeyError::UnknownAlgorithm(s.to_string()))
    }
}

/// Checks login tokens against one configured key and algorithm.
///
/// Build it once at startup; [`verify`](Verifier::verify) is then a pure function of the
/// token, the user and `now` (no I/O, no clock).
#[derive(Clone)]
pub struct Verifier {
    alg: Algorithm,
    key: DecodingKey,
    validation: Validation,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key: an HS256 secret must not reach a log.
        f.debug_struct("Verifier")
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

/// The HS256 secret in a file, as the relay reads it: one trailing newline (`\n` or
/// `\r\n`) is removed, nothing else (a secret may contain any bytes). `imrelay token`
/// signs with exactly this.
pub fn read_secret_file(path: impl AsRef<Path>) -> Result<Vec<u8>, KeyError> {
    let mut secret = read(path.as_ref())?;
    if secret.last() == Some(&b'\n') {
        secret.pop();
        if secret.last() == Some(&b'\r') {
            secret.pop();
        }
    }
    Ok(secret)
}

impl Verifier {
    /// HS256 with a shared secret of at least [`MIN_SECRET_LEN`] bytes (RFC 7518, 3.2: the
    /// key must be at least as long as the hash).
    pub fn hs256_secret(secret: impl AsRef<[u8]>) -> Result<Verifier, KeyError> {
        let secret = secret.as_ref();
        if secret.len() < MIN_SECRET_LEN {
            return Err(KeyError::SecretTooShort {
                len: secret.len(),
                min: MIN_SECRET_LEN,
            });
        }
        provider()?;
        let key =
            DecodingKey::from_secret(secret).map_err(|e| KeyError::InvalidKey(e.to_string()))?;
        Ok(Verifier::new(Algorithm::Hs256, key))
    }

    /// HS256 with the secret in a file; one trailing newline (`\n` or `\r\n`) is removed,
    /// nothing else (a secret may contain any bytes).
    pub fn from_secret_file(path: impl AsRef<Path>) -> Result<Verifier, KeyError> {
        Verifier::hs256_secret(read_secret_file(path)?)
    }

    /// RS256 with the issuer's RSA public key, PEM: `PUBLIC KEY` (SPKI, what
    /// `openssl pkey -pubout` writes) or `RSA PUBLIC KEY` (PKCS#1). The key must parse and
    /// have at least [`MIN_RSA_BITS`] bits.
    pub fn rs256_public_pem(pem: impl AsRef<[u8]>) -> Result<Verifier, KeyError> {
        let pem = pem.as_ref();
        refuse_private(pem)?;
        let provider = provider()?;
        let key = DecodingKey::from_rsa_pem(pem).map_err(|_| KeyError::BadPem)?;
        // jsonwebtoken parses an RSA key only when it verifies, and would then report a
        // broken key as a bad signature on every token: parse it now, with its own parser.
        let der = key
            .try_get_as_bytes()
            .map_err(|e| KeyError::InvalidKey(e.to_string()))?;
        let (n, _e) = (provider.key_utils.rsa_pub_components_from_public_key)(der)
            .map_err(|e| KeyError::InvalidKey(e.to_string()))?;
        let bits = modulus_bits(&n);
        if bits < MIN_RSA_BITS {
            return Err(KeyError::RsaKeyTooSmall {
                bits,
                min: MIN_RSA_BITS,
            });
        }
        Ok(Verifier::new(Algorithm::Rs256, key))
    }

    /// ES256 with the issuer's P-256 public key, PEM `PUBLIC KEY` (SPKI, what
    /// `openssl pkey -pubout` writes).
    pub fn es256_public_pem(pem: impl AsRef<[u8]>) -> Result<Verifier, KeyError> {
        let pem = pem.as_ref();
        refuse_private(pem)?;
        let provider = provider()?;
        let key = DecodingKey::from_ec_pem(pem).map_err(|_| KeyError::BadPem)?;
        // from_ec_pem accepts any curve; building the ES256 verifier parses the point on
        // P-256, so a P-384 key or a broken one fails here and not at every login.
        (provider.verifier_factory)(&jsonwebtoken::Algorithm::ES256, &key)
            .map_err(|e| KeyError::InvalidKey(e.to_string()))?;
        Ok(Verifier::new(Algorithm::Es256, key))
    }

    /// RS256 or ES256 with the public key in a PEM file. HS256 is refused
    /// ([`KeyError::NotPublicKeyAlgorithm`]): use [`from_secret_file`](Self::from_secret_file)
    /// or [`from_key_file`](Self::from_key_file).
    pub fn from_public_key_file(
        path: impl AsRef<Path>,
        alg: Algorithm,
    ) -> Result<Verifier, KeyError> {
        match alg {
            Algorithm::Hs256 => Err(KeyError::NotPublicKeyAlgorithm),
            Algorithm::Rs256 => Verifier::rs256_public_pem(read(path.as_ref())?),
            Algorithm::Es256 => Verifier::es256_public_pem(read(path.as_ref())?),
        }
    }

    /// The key file that fits the algorithm: a secret file for HS256, a public key PEM for
    /// RS256 and ES256 (the relay's `--auth-alg` + `--auth-key` in one call).
    pub fn from_key_file(path: impl AsRef<Path>, alg: Algorithm) -> Result<Verifier, KeyError> {
        match alg {
            Algorithm::Hs256 => Verifier::from_secret_file(path),
            _ => Verifier::from_public_key_file(path, alg),
        }
    }

    fn new(alg: Algorithm, key: DecodingKey) -> Verifier {
        // jsonwebtoken checks the signature and the algorithm; every claim check is ours,
        // against the `now` we are given. With exp and nbf validation off and no required
        // claims it never reads the system clock.
        let mut validation = Validation::new(alg.jwt());
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        validation.leeway = 0;
        Verifier {
            alg,
            key,
            validation,
        }
    }

    /// The configured algorithm.
    pub fn algorithm(&self) -> Algorithm {
        self.alg
    }

    /// Checks `token` (the LOGIN or REFRESH credential) for the user `expected_user` at
    /// `now_unix` (unix seconds) and returns what it grants.
    ///
    /// The checks, in order; the first that fails decides the error:
    /// 1. at most [`MAX_TOKEN_LEN`] bytes, UTF-8, a compact JWS whose header is JSON →
    ///    else `Malformed`;
    /// 2. the header's `alg` is the configured algorithm → else `WrongAlgorithm` (`none`
    ///    and names jsonwebtoken does not know included);
    /// 3. no unsupported `crit` header, a base64url signature → else `Malformed`; the
    ///    signature verifies → else `BadSignature`;
    /// 4. the claims are a JSON object with no duplicate `sub`, `exp`, `nbf`, `iss` or
    ///    `aud` → else `Malformed` (jsonwebtoken reads those first; an array or object
    ///    as `sub`, `exp` or `nbf` also fails there);
    /// 5. `sub`: absent or `null` → `MissingSub`; not a string holding the canonical
    ///    decimal form of a nonzero u64 (`"1001"`, not `"01001"`, `" 1001"`, `1001`) →
    ///    `BadSub`; not `expected_user` → `SubMismatch`;
    /// 6. `exp` absent or `null` → `MissingExp`;
    /// 7. types and limits of `exp`, `nbf`, `iat` (non-negative numbers), `rooms`,
    ///    `send_rooms`, `admin`, `device` → else `Malformed`;
    /// 8. time: `Expired`, then `NotYetValid`, then `IssuedInFuture`.
    ///
    /// The same order, with the reason strings, is in protocol.md section 16.3.
    ///
    /// Leeway ([`LEEWAY_SECS`](super::LEEWAY_SECS) = 30): the token is accepted while
    /// `now_unix < exp + 30`, so with `exp == now_unix - 30` it is `Expired` and with
    /// `exp == now_unix - 29` it passes; `nbf` and `iat` may be up to 30 s ahead of
    /// `now_unix` (`nbf == now_unix + 30` passes, `now_unix + 31` does not).
    ///
    /// Unknown claims (`iss`, `aud`, `jti`, anything) are ignored.
    pub fn verify(
        &self,
        token: &[u8],
        expected_user: u64,
        now_unix: u64,
    ) -> Result<Grants, AuthError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(AuthError::Malformed);
        }
        let token = std::str::from_utf8(token).map_err(|_| AuthError::Malformed)?;
        let header = jsonwebtoken::decode_header(token).map_err(|e| header_error(&e))?;
        if header.alg != self.alg.jwt() {
            return Err(AuthError::WrongAlgorithm);
        }
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, &self.key, &self.validation)
            .map_err(|e| match e.kind() {
            ErrorKind::InvalidSignature => AuthError::BadSignature,
            ErrorKind::InvalidAlgorithm => AuthError::WrongAlgorithm,
            _ => AuthError::Malformed,
        })?;
        grants_from_claims(&data.claims, expected_user, now_unix)
    }
}

/// A header that does not decode is `Malformed`, except when its `alg` is a name the
/// library has no variant for (`none`, `None`, `HS1024`…): that is `WrongAlgorithm`.
/// jsonwebtoken reports it as serde's "unknown variant" data error on the header JSON.
fn header_error(e: &jsonwebtoken::errors::Error) -> AuthError {
    match e.kind() {
        ErrorKind::Json(json)
            if json.classify() == serde_json::error::Category::Data
                && json.to_string().starts_with("unknown variant") =>
        {
            AuthError::WrongAlgorithm
        }
        _ => AuthError::Malformed,
    }
}

/// The process's jsonwebtoken crypto backend (rust_crypto, from this crate's features).
fn provider() -> Result<&'static CryptoProvider, KeyError> {
    CryptoProvider::try_get_default().ok_or(KeyError::NoCryptoProvider)
}

/// A PEM private key handed to a public-key constructor (an easy configuration slip, which
/// jsonwebtoken would accept for RSA and then fail every signature).
fn refuse_private(pem: &[u8]) -> Result<(), KeyError> {
    if pem
        .windows(b"PRIVATE KEY-----".len())
        .any(|w| w == b"PRIVATE KEY-----")
    {
        Err(KeyError::PrivateKey)
    } else {
        Ok(())
    }
}

/// Bit length of a big-endian unsigned integer.
fn modulus_bits(n: &[u8]) -> usize {
    match n.iter().position(|&b| b != 0) {
        None => 0,
        Some(i) => (n.len() - i) * 8 - n[i].leading_zeros() as usize,
    }
}

fn read(path: &Path) -> Result<Vec<u8>, KeyError> {
    std::fs::read(path).map_err(|source| KeyError::Io {
        path: path.to_path_buf(),
        source,
    })
}
