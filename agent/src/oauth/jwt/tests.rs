//! Signers for crafted JWT access tokens, keys generated in the test, and tests of the
//! token parsing and claim checks. Tests that go through the whole inbound check, with
//! status and audit reason, are in `policy/inbound/jwt_tests.rs`.

use std::sync::OnceLock;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use rsa::{
    RsaPrivateKey,
    signature::{RandomizedSigner, SignatureEncoding, Signer},
    traits::PublicKeyParts,
};
use serde_json::{Value, json};
use sha2::Sha256;

use super::*;

/// A signing key with its `kid`, made in the test.
pub(crate) struct TestSigner {
    pub kid: String,
    key: TestKey,
}

enum TestKey {
    Es256(p256::ecdsa::SigningKey),
    Rs256(RsaPrivateKey),
    Ps256(RsaPrivateKey),
    EdDsa(ed25519_dalek::SigningKey),
}

/// Returns one RSA key for the whole test binary, because generating one takes a while.
fn rsa_key() -> RsaPrivateKey {
    static KEY: OnceLock<RsaPrivateKey> = OnceLock::new();
    KEY.get_or_init(|| RsaPrivateKey::new(&mut rand::thread_rng(), 2048).expect("RSA key"))
        .clone()
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

impl TestSigner {
    pub fn es256(kid: &str) -> TestSigner {
        let key = p256::ecdsa::SigningKey::random(&mut rand::thread_rng());
        TestSigner {
            kid: kid.to_string(),
            key: TestKey::Es256(key),
        }
    }

    pub fn rs256(kid: &str) -> TestSigner {
        TestSigner {
            kid: kid.to_string(),
            key: TestKey::Rs256(rsa_key()),
        }
    }

    pub fn ps256(kid: &str) -> TestSigner {
        TestSigner {
            kid: kid.to_string(),
            key: TestKey::Ps256(rsa_key()),
        }
    }

    pub fn eddsa(kid: &str) -> TestSigner {
        let key = ed25519_dalek::SigningKey::from_bytes(&rand::random::<[u8; 32]>());
        TestSigner {
            kid: kid.to_string(),
            key: TestKey::EdDsa(key),
        }
    }

    pub fn alg(&self) -> &'static str {
        match self.key {
            TestKey::Es256(_) => "ES256",
            TestKey::Rs256(_) => "RS256",
            TestKey::Ps256(_) => "PS256",
            TestKey::EdDsa(_) => "EdDSA",
        }
    }

    /// Returns the public key as a JWK with `kid`, `use` and `alg`.
    pub fn jwk(&self) -> Value {
        let mut jwk = match &self.key {
            TestKey::Es256(key) => {
                let point = key.verifying_key().to_encoded_point(false);
                json!({"kty": "EC", "crv": "P-256",
                       "x": b64(point.x().unwrap()), "y": b64(point.y().unwrap())})
            }
            TestKey::Rs256(key) | TestKey::Ps256(key) => {
                json!({"kty": "RSA", "n": b64(&key.n().to_bytes_be()), "e": b64(&key.e().to_bytes_be())})
            }
            TestKey::EdDsa(key) => {
                json!({"kty": "OKP", "crv": "Ed25519", "x": b64(key.verifying_key().as_bytes())})
            }
        };
        jwk["kid"] = json!(self.kid);
        jwk["use"] = json!("sig");
        jwk["alg"] = json!(self.alg());
        jwk
    }

    /// Returns the public JWK as text, which anyone can read and misuse as an HMAC secret.
    pub fn public_key_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(&self.jwk()).unwrap()
    }

    fn sign_bytes(&self, message: &[u8]) -> Vec<u8> {
        match &self.key {
            TestKey::Es256(key) => {
                let signature: p256::ecdsa::Signature = key.sign(message);
                signature.to_bytes().to_vec()
            }
            TestKey::Rs256(key) => rsa::pkcs1v15::SigningKey::<Sha256>::new(key.clone())
                .sign(message)
                .to_vec(),
            TestKey::Ps256(key) => rsa::pss::SigningKey::<Sha256>::new(key.clone())
                .sign_with_rng(&mut rand::thread_rng(), message)
                .to_vec(),
            TestKey::EdDsa(key) => key.sign(message).to_bytes().to_vec(),
        }
    }

    /// Signs `claims` as a compact JWS with header `{alg, kid, typ: at+jwt}`.
    pub fn token(&self, claims: &Value) -> String {
        self.token_with_header(
            &json!({"alg": self.alg(), "kid": self.kid, "typ": "at+jwt"}),
            claims,
        )
    }

    pub fn token_with_header(&self, header: &Value, claims: &Value) -> String {
        let input = signing_input(header, claims);
        let signature = self.sign_bytes(input.as_bytes());
        format!("{input}.{}", b64(&signature))
    }
}

pub(crate) fn signing_input(header: &Value, claims: &Value) -> String {
    format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    )
}

/// Returns a JWKS document with the public keys of `signers`.
pub(crate) fn jwks(signers: &[&TestSigner]) -> String {
    json!({"keys": signers.iter().map(|s| s.jwk()).collect::<Vec<_>>()}).to_string()
}

pub(crate) const ISSUER: &str = "https://issuer.test";
pub(crate) const AUDIENCE: &str = "urn:tokenmesh:test";

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Claims of a valid RFC 9068 token for client `frontend` with scope `read admin`.
pub(crate) fn valid_claims() -> Value {
    let now = unix_now();
    json!({
        "iss": ISSUER, "aud": AUDIENCE, "sub": "frontend", "client_id": "frontend",
        "scope": "read admin", "iat": now, "exp": now + 300, "jti": "id-1",
    })
}

fn settings() -> JwtSettings {
    JwtSettings {
        issuer: ISSUER.to_string(),
        audiences: vec![AUDIENCE.to_string()],
        algorithms: DEFAULT_ALGORITHMS.to_vec(),
        leeway: Duration::from_secs(60),
        require_at_jwt_typ: false,
        keys: KeySetConfig {
            source: super::super::jwks::KeySource::JwksUrl("http://127.0.0.1:9/jwks".into()),
            refresh_interval: Duration::from_secs(300),
            min_refetch_interval: Duration::from_secs(10),
        },
    }
}

fn claims_of(value: Value) -> Claims {
    serde_json::from_value(value).unwrap()
}

#[test]
fn hmac_and_none_are_never_public_key_algorithms() {
    for alg in ["none", "HS256", "HS384", "HS512", "hs256", "RSA-OAEP", ""] {
        assert_eq!(public_key_algorithm(alg), None, "{alg}");
    }
    assert_eq!(public_key_algorithm("ES256"), Some(Algorithm::ES256));
    assert_eq!(public_key_algorithm("EdDSA"), Some(Algorithm::EdDSA));
    assert_eq!(public_key_algorithm("PS512"), Some(Algorithm::PS512));
}

#[test]
fn split_rejects_wrong_shapes() {
    for token in ["", "a.b", "a.b.c.d", "a..c", ".b.c", "a.b."] {
        assert!(
            matches!(split(token), Err(JwtError::Malformed(_))),
            "{token:?}"
        );
    }
    let parts = split("h.p.s").unwrap();
    assert_eq!(parts.signing_input, "h.p");
    assert_eq!(parts.signature, "s");
}

#[test]
fn typ_at_jwt_matches_media_type_forms() {
    assert!(is_at_jwt(Some("at+jwt")));
    assert!(is_at_jwt(Some("application/at+JWT")));
    assert!(!is_at_jwt(Some("JWT")));
    assert!(!is_at_jwt(None));
}

#[test]
fn claims_accept_valid_token() {
    let claims = check_claims(claims_of(valid_claims()), &settings(), SystemTime::now()).unwrap();
    assert_eq!(claims.client_id, "frontend");
    assert_eq!(claims.scopes().collect::<Vec<_>>(), ["read", "admin"]);
}

#[test]
fn claims_audience_may_be_a_list() {
    let mut value = valid_claims();
    value["aud"] = json!(["urn:other", AUDIENCE]);
    assert!(check_claims(claims_of(value), &settings(), SystemTime::now()).is_ok());
}

#[test]
fn claims_leeway_applies_to_exp_nbf_and_iat() {
    let now = unix_now();
    let at = |delta: i64| json!((now as i64 + delta) as u64);

    // Expired 30 s ago: inside the 60 s leeway, accepted; 61 s ago, rejected.
    let mut value = valid_claims();
    value["exp"] = at(-30);
    assert!(check_claims(claims_of(value.clone()), &settings(), SystemTime::now()).is_ok());
    value["exp"] = at(-61);
    let error = check_claims(claims_of(value), &settings(), SystemTime::now()).unwrap_err();
    assert_eq!(error.reason(), "token_expired");

    let mut value = valid_claims();
    value["nbf"] = at(30);
    assert!(check_claims(claims_of(value.clone()), &settings(), SystemTime::now()).is_ok());
    value["nbf"] = at(120);
    let error = check_claims(claims_of(value), &settings(), SystemTime::now()).unwrap_err();
    assert_eq!(error.reason(), "token_not_yet_valid");

    let mut value = valid_claims();
    value["iat"] = at(120);
    let error = check_claims(claims_of(value), &settings(), SystemTime::now()).unwrap_err();
    assert_eq!(error.reason(), "token_issued_in_future");
}

#[test]
fn claims_required_by_rfc_9068_are_enforced() {
    for claim in ["iss", "aud", "exp", "iat", "client_id"] {
        let mut value = valid_claims();
        value.as_object_mut().unwrap().remove(claim);
        let error = check_claims(claims_of(value), &settings(), SystemTime::now()).unwrap_err();
        assert_eq!(error.reason(), "missing_claim", "{claim}");
        assert!(error.to_string().contains(claim), "{error}");
    }
}

#[test]
fn claims_of_wrong_type_are_rejected() {
    let mut value = valid_claims();
    value["exp"] = json!("tomorrow");
    let error = check_claims(claims_of(value), &settings(), SystemTime::now()).unwrap_err();
    assert_eq!(error.reason(), "missing_claim");

    let mut value = valid_claims();
    value["aud"] = json!([AUDIENCE, 7]);
    let error = check_claims(claims_of(value), &settings(), SystemTime::now()).unwrap_err();
    assert_eq!(error.reason(), "missing_claim");
}

#[test]
fn fractional_numeric_date_is_accepted() {
    assert_eq!(
        numeric_date(Some(&json!(1700000000.75))),
        Some(1_700_000_000)
    );
    assert_eq!(numeric_date(Some(&json!(-5))), None);
    assert_eq!(numeric_date(Some(&json!("1"))), None);
}
