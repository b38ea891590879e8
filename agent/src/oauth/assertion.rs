//! Client authentication with a private key (`private_key_jwt`): the client signs a
//! short-lived JWT and sends it as `client_assertion` with the token request (RFC 7523
//! section 2.2, with the parameters of RFC 7521 section 4.2).
//!
//! Neither the key nor an assertion is ever logged; `Debug` shows the key's source,
//! algorithm and a 12-hex-digit SHA-256 fingerprint of the PEM text.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};

use super::{ClientId, token_fingerprint};

/// Value of `client_assertion_type` for a JWT assertion (RFC 7523 section 2.2).
pub const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// Lifetime of an assertion when the config names none. Each token request signs a new
/// one, so it only has to outlive one request and the clock difference to the provider.
pub const DEFAULT_ASSERTION_LIFETIME: Duration = Duration::from_secs(60);

/// JWS algorithms the agent signs assertions with (RFC 7518 section 3.1, RFC 8037).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
pub enum SigningAlgorithm {
    /// ECDSA with P-256 and SHA-256.
    ES256,
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    RS256,
    /// RSASSA-PSS with SHA-256.
    PS256,
    /// Ed25519.
    EdDSA,
}

impl SigningAlgorithm {
    fn jwt_algorithm(self) -> Algorithm {
        match self {
            SigningAlgorithm::ES256 => Algorithm::ES256,
            SigningAlgorithm::RS256 => Algorithm::RS256,
            SigningAlgorithm::PS256 => Algorithm::PS256,
            SigningAlgorithm::EdDSA => Algorithm::EdDSA,
        }
    }

    fn key_type(self) -> KeyType {
        match self {
            SigningAlgorithm::ES256 => KeyType::Ec,
            SigningAlgorithm::RS256 | SigningAlgorithm::PS256 => KeyType::Rsa,
            SigningAlgorithm::EdDSA => KeyType::Ed25519,
        }
    }
}

impl fmt::Display for SigningAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Kind of private key found in a PEM file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyType {
    Ec,
    Rsa,
    Ed25519,
}

impl KeyType {
    fn default_algorithm(self) -> SigningAlgorithm {
        match self {
            KeyType::Ec => SigningAlgorithm::ES256,
            KeyType::Rsa => SigningAlgorithm::RS256,
            KeyType::Ed25519 => SigningAlgorithm::EdDSA,
        }
    }
}

impl fmt::Display for KeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeyType::Ec => "an EC key",
            KeyType::Rsa => "an RSA key",
            KeyType::Ed25519 => "an Ed25519 key",
        })
    }
}

/// Failure to load a private key or to sign an assertion. Messages name the key's
/// source, never its content.
#[derive(Debug, thiserror::Error)]
pub enum AssertionError {
    #[error(
        "private key {source_name} is in SEC1 form (BEGIN EC PRIVATE KEY); convert it to \
         PKCS#8 with `openssl pkcs8 -topk8 -nocrypt -in KEY -out KEY.pk8`"
    )]
    Sec1 { source_name: String },
    #[error(
        "private key {source_name} is encrypted; store it unencrypted in a Secret mounted \
         as a file (`openssl pkey -in KEY -out KEY.plain`)"
    )]
    Encrypted { source_name: String },
    #[error(
        "private key {source_name} is not a PEM private key of type EC P-256, RSA or \
         Ed25519; write a PKCS#8 PEM file (BEGIN PRIVATE KEY)"
    )]
    UnknownKey { source_name: String },
    #[error(
        "signing_alg {algorithm} needs {needed}, but private key {source_name} is {found}; \
         change signing_alg or the key"
    )]
    AlgorithmMismatch {
        source_name: String,
        algorithm: SigningAlgorithm,
        needed: KeyType,
        found: KeyType,
    },
    #[error(
        "private key {source_name} cannot sign with {algorithm} ({reason}); ES256 needs a \
         P-256 key and RS256 or PS256 an RSA key of 2048 bits or more"
    )]
    Unusable {
        source_name: String,
        algorithm: SigningAlgorithm,
        reason: String,
    },
    #[error("the system clock is before 1970; fix the node's clock")]
    Clock,
    #[error("the operating system provided no random bytes for the assertion's jti: {0}")]
    Random(String),
}

/// A private key that signs client assertions, with the header values to sign them with.
pub struct AssertionSigner {
    key: EncodingKey,
    algorithm: SigningAlgorithm,
    key_id: Option<String>,
    /// `aud` of every assertion; `None` means the token endpoint URL.
    audience: Option<String>,
    lifetime: Duration,
    source: String,
    fingerprint: String,
}

/// The claims RFC 7523 section 3 requires, plus `iat` and `jti`.
#[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq, Eq)]
pub struct AssertionClaims {
    pub iss: String,
    pub sub: String,
    pub aud: String,
    pub jti: String,
    pub iat: u64,
    pub exp: u64,
}

/// Options of an [`AssertionSigner`] other than the key.
#[derive(Clone, Debug, Default)]
pub struct AssertionOptions {
    /// Algorithm to sign with; `None` picks ES256, RS256 or EdDSA by the key's type.
    pub algorithm: Option<SigningAlgorithm>,
    /// `kid` header, so the provider finds the key among the client's registered keys.
    pub key_id: Option<String>,
    /// `aud` claim; `None` uses the token endpoint URL.
    pub audience: Option<String>,
    /// `exp` minus `iat`; `None` uses [`DEFAULT_ASSERTION_LIFETIME`].
    pub lifetime: Option<Duration>,
}

impl AssertionSigner {
    /// Loads a PKCS#8 PEM private key (RSA keys may also be PKCS#1) read from
    /// `source_name`, and checks that it signs with the chosen algorithm.
    pub fn from_pem(
        pem: &str,
        source_name: &str,
        options: AssertionOptions,
    ) -> Result<AssertionSigner, AssertionError> {
        let source_name = source_name.to_string();
        if pem.contains("BEGIN EC PRIVATE KEY") {
            return Err(AssertionError::Sec1 { source_name });
        }
        if pem.contains("BEGIN ENCRYPTED PRIVATE KEY") {
            return Err(AssertionError::Encrypted { source_name });
        }
        let (key, found) =
            parse_private_key(pem.as_bytes()).ok_or_else(|| AssertionError::UnknownKey {
                source_name: source_name.clone(),
            })?;
        let algorithm = options.algorithm.unwrap_or(found.default_algorithm());
        if algorithm.key_type() != found {
            return Err(AssertionError::AlgorithmMismatch {
                source_name,
                algorithm,
                needed: algorithm.key_type(),
                found,
            });
        }
        // A P-384 key parses as an EC key but cannot sign ES256: find out now rather than
        // at the first token request.
        if let Err(e) = jsonwebtoken::crypto::sign(b"probe", &key, algorithm.jwt_algorithm()) {
            return Err(AssertionError::Unusable {
                source_name,
                algorithm,
                reason: e.to_string(),
            });
        }
        Ok(AssertionSigner {
            key,
            algorithm,
            key_id: options.key_id,
            audience: options.audience,
            lifetime: options.lifetime.unwrap_or(DEFAULT_ASSERTION_LIFETIME),
            fingerprint: token_fingerprint(pem.trim()),
            source: source_name,
        })
    }

    pub fn algorithm(&self) -> SigningAlgorithm {
        self.algorithm
    }

    /// Returns the loggable form of the key: the first 12 hex digits of the SHA-256 of
    /// its PEM text.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Returns the claims of an assertion for `client_id` at `token_endpoint`, issued
    /// at `now`, with a new random `jti`.
    pub fn claims(
        &self,
        client_id: &ClientId,
        token_endpoint: &str,
        now: SystemTime,
    ) -> Result<AssertionClaims, AssertionError> {
        let iat = now
            .duration_since(UNIX_EPOCH)
            .map_err(|_| AssertionError::Clock)?
            .as_secs();
        Ok(AssertionClaims {
            iss: client_id.0.clone(),
            sub: client_id.0.clone(),
            aud: self
                .audience
                .clone()
                .unwrap_or_else(|| token_endpoint.to_string()),
            jti: random_jti()?,
            iat,
            exp: iat + self.lifetime.as_secs().max(1),
        })
    }

    /// Signs a new assertion for `client_id` at `token_endpoint`. Never log the result:
    /// until it expires, it authenticates the client.
    pub fn sign(
        &self,
        client_id: &ClientId,
        token_endpoint: &str,
        now: SystemTime,
    ) -> Result<String, AssertionError> {
        let claims = self.claims(client_id, token_endpoint, now)?;
        let mut header = Header::new(self.algorithm.jwt_algorithm());
        header.kid = self.key_id.clone();
        jsonwebtoken::encode(&header, &claims, &self.key).map_err(|e| AssertionError::Unusable {
            source_name: self.source.clone(),
            algorithm: self.algorithm,
            reason: e.to_string(),
        })
    }
}

impl fmt::Debug for AssertionSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AssertionSigner")
            .field("source", &self.source)
            .field("algorithm", &self.algorithm)
            .field("key_id", &self.key_id)
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

/// Tries the key types in turn; jsonwebtoken checks the PKCS#8 algorithm identifier.
fn parse_private_key(pem: &[u8]) -> Option<(EncodingKey, KeyType)> {
    if let Ok(key) = EncodingKey::from_ec_pem(pem) {
        return Some((key, KeyType::Ec));
    }
    if let Ok(key) = EncodingKey::from_ed_pem(pem) {
        return Some((key, KeyType::Ed25519));
    }
    if let Ok(key) = EncodingKey::from_rsa_pem(pem) {
        return Some((key, KeyType::Rsa));
    }
    None
}

/// 128 random bits, base64url: unique per assertion, as the provider's replay check
/// expects (RFC 7523 section 3, item 7).
fn random_jti() -> Result<String, AssertionError> {
    let mut bytes = [0u8; 16];
    getrandom::getrandom(&mut bytes).map_err(|e| AssertionError::Random(e.to_string()))?;
    Ok(URL_SAFE_NO_PAD.encode(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{DecodingKey, Validation};

    const EC_P256: &str = include_str!("../../testdata/client-keys/ec-p256.pem");
    const EC_P256_PUBLIC: &str = include_str!("../../testdata/client-keys/ec-p256.pub.pem");
    const EC_P256_SEC1: &str = include_str!("../../testdata/client-keys/ec-p256-sec1.pem");
    const EC_P384: &str = include_str!("../../testdata/client-keys/ec-p384.pem");
    const RSA: &str = include_str!("../../testdata/client-keys/rsa-2048.pem");
    const RSA_PUBLIC: &str = include_str!("../../testdata/client-keys/rsa-2048.pub.pem");
    const ED25519: &str = include_str!("../../testdata/client-keys/ed25519.pem");
    const ED25519_PUBLIC: &str = include_str!("../../testdata/client-keys/ed25519.pub.pem");
    const ENDPOINT: &str = "https://idp.example.test/oauth2/token";

    fn signer(pem: &str, algorithm: Option<SigningAlgorithm>) -> AssertionSigner {
        let options = AssertionOptions {
            algorithm,
            key_id: Some("key-1".into()),
            ..AssertionOptions::default()
        };
        AssertionSigner::from_pem(pem, "file:test.pem", options).unwrap()
    }

    fn client() -> ClientId {
        ClientId("frontend".into())
    }

    /// Verifies `assertion` with `public_pem` the way a provider does and returns its
    /// claims and header.
    fn verify(
        assertion: &str,
        public_pem: &str,
        algorithm: Algorithm,
    ) -> (AssertionClaims, Header) {
        let key = match algorithm {
            Algorithm::ES256 => DecodingKey::from_ec_pem(public_pem.as_bytes()),
            Algorithm::EdDSA => DecodingKey::from_ed_pem(public_pem.as_bytes()),
            _ => DecodingKey::from_rsa_pem(public_pem.as_bytes()),
        }
        .unwrap();
        let mut validation = Validation::new(algorithm);
        validation.set_audience(&[ENDPOINT]);
        validation.set_issuer(&["frontend"]);
        validation.set_required_spec_claims(&["exp", "iss", "sub", "aud"]);
        let data = jsonwebtoken::decode::<AssertionClaims>(assertion, &key, &validation).unwrap();
        (data.claims, data.header)
    }

    #[test]
    fn assertion_claims_follow_rfc7523() {
        let signer = signer(EC_P256, None);
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let claims = signer.claims(&client(), ENDPOINT, now).unwrap();
        assert_eq!(claims.iss, "frontend");
        assert_eq!(claims.sub, "frontend");
        assert_eq!(claims.aud, ENDPOINT);
        assert_eq!(claims.iat, 1_700_000_000);
        assert_eq!(claims.exp, 1_700_000_060);
        assert_eq!(claims.jti.len(), 22, "128 bits in base64url");
    }

    #[test]
    fn jti_differs_per_assertion() {
        let signer = signer(EC_P256, None);
        let now = SystemTime::now();
        let a = signer.claims(&client(), ENDPOINT, now).unwrap();
        let b = signer.claims(&client(), ENDPOINT, now).unwrap();
        assert_ne!(a.jti, b.jti);
    }

    #[test]
    fn audience_and_lifetime_options_apply() {
        let options = AssertionOptions {
            audience: Some("https://idp.example.test".into()),
            lifetime: Some(Duration::from_secs(300)),
            ..AssertionOptions::default()
        };
        let signer = AssertionSigner::from_pem(RSA, "file:rsa.pem", options).unwrap();
        let now = UNIX_EPOCH + Duration::from_secs(1_000);
        let claims = signer.claims(&client(), ENDPOINT, now).unwrap();
        assert_eq!(claims.aud, "https://idp.example.test");
        assert_eq!(claims.exp - claims.iat, 300);
    }

    #[test]
    fn es256_assertion_verifies() {
        let signer = signer(EC_P256, None);
        assert_eq!(signer.algorithm(), SigningAlgorithm::ES256);
        let assertion = signer.sign(&client(), ENDPOINT, SystemTime::now()).unwrap();
        let (claims, header) = verify(&assertion, EC_P256_PUBLIC, Algorithm::ES256);
        assert_eq!(header.alg, Algorithm::ES256);
        assert_eq!(header.kid.as_deref(), Some("key-1"));
        assert_eq!(header.typ.as_deref(), Some("JWT"));
        assert_eq!(claims.sub, "frontend");
    }

    #[test]
    fn rsa_key_signs_rs256_and_ps256() {
        let rs256 = signer(RSA, None);
        assert_eq!(rs256.algorithm(), SigningAlgorithm::RS256);
        let assertion = rs256.sign(&client(), ENDPOINT, SystemTime::now()).unwrap();
        let (_, header) = verify(&assertion, RSA_PUBLIC, Algorithm::RS256);
        assert_eq!(header.alg, Algorithm::RS256);

        let ps256 = signer(RSA, Some(SigningAlgorithm::PS256));
        let assertion = ps256.sign(&client(), ENDPOINT, SystemTime::now()).unwrap();
        let (_, header) = verify(&assertion, RSA_PUBLIC, Algorithm::PS256);
        assert_eq!(header.alg, Algorithm::PS256);
    }

    #[test]
    fn ed25519_assertion_verifies() {
        let signer = signer(ED25519, None);
        assert_eq!(signer.algorithm(), SigningAlgorithm::EdDSA);
        let assertion = signer.sign(&client(), ENDPOINT, SystemTime::now()).unwrap();
        let (claims, _) = verify(&assertion, ED25519_PUBLIC, Algorithm::EdDSA);
        assert_eq!(claims.iss, "frontend");
    }

    #[test]
    fn algorithm_key_mismatch_rejected() {
        let options = AssertionOptions {
            algorithm: Some(SigningAlgorithm::RS256),
            ..AssertionOptions::default()
        };
        let err = AssertionSigner::from_pem(EC_P256, "file:ec.pem", options).unwrap_err();
        let message = err.to_string();
        assert!(
            matches!(err, AssertionError::AlgorithmMismatch { .. }),
            "{message}"
        );
        assert!(message.contains("RS256"), "{message}");
        assert!(message.contains("an EC key"), "{message}");
        assert!(message.contains("file:ec.pem"), "{message}");
    }

    #[test]
    fn p384_key_cannot_sign_es256() {
        let err = AssertionSigner::from_pem(EC_P384, "file:p384.pem", AssertionOptions::default())
            .unwrap_err();
        assert!(matches!(err, AssertionError::Unusable { .. }), "{err}");
        assert!(err.to_string().contains("P-256"), "{err}");
    }

    #[test]
    fn sec1_and_garbage_keys_rejected() {
        let sec1 = AssertionSigner::from_pem(EC_P256_SEC1, "file:sec1.pem", Default::default())
            .unwrap_err();
        assert!(matches!(sec1, AssertionError::Sec1 { .. }), "{sec1}");
        assert!(sec1.to_string().contains("openssl pkcs8"), "{sec1}");

        let garbage =
            AssertionSigner::from_pem("not a key", "${KEY}", Default::default()).unwrap_err();
        assert!(
            matches!(garbage, AssertionError::UnknownKey { .. }),
            "{garbage}"
        );
        assert!(garbage.to_string().contains("${KEY}"), "{garbage}");

        let public = AssertionSigner::from_pem(EC_P256_PUBLIC, "file:pub.pem", Default::default())
            .unwrap_err();
        assert!(
            matches!(public, AssertionError::UnknownKey { .. }),
            "{public}"
        );
    }

    #[test]
    fn debug_shows_fingerprint_not_key() {
        let signer = signer(EC_P256, None);
        let printed = format!("{signer:?}");
        let key_body = EC_P256.lines().nth(1).unwrap();
        assert!(!printed.contains(key_body), "{printed}");
        assert!(printed.contains(signer.fingerprint()), "{printed}");
        assert_eq!(signer.fingerprint().len(), 12);
        assert!(printed.contains("file:test.pem"), "{printed}");
    }
}
