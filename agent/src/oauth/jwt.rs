//! JWT access tokens: the JWT profile for OAuth 2.0 access tokens (RFC 9068) of JSON Web
//! Tokens (RFC 7519), signed as a JWS in compact form (RFC 7515). The signature is checked
//! with the issuer's public keys ([`super::jwks`]), then `iss`, `aud`, `exp`, `nbf`, `iat`
//! and `client_id`.
//!
//! `none` and the HMAC algorithms are rejected whatever the configuration lists, because
//! a public key used as an HMAC secret would let anyone who knows it sign tokens.

use std::{
    str::FromStr,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, AlgorithmFamily};

use super::jwks::{KeyLookupError, KeySet, KeySetConfig, KeySetError};

/// Algorithms accepted when a validator lists none.
pub const DEFAULT_ALGORITHMS: [Algorithm; 4] = [
    Algorithm::RS256,
    Algorithm::PS256,
    Algorithm::ES256,
    Algorithm::EdDSA,
];

/// Settings of the JWT access token check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JwtSettings {
    /// Exact value the `iss` claim must have.
    pub issuer: String,
    /// The `aud` claim must contain at least one of these.
    pub audiences: Vec<String>,
    /// Signature algorithms accepted; never `none` or an HMAC algorithm.
    pub algorithms: Vec<Algorithm>,
    /// Clock skew allowed when checking `exp`, `nbf` and `iat`.
    pub leeway: Duration,
    /// Require the JOSE header `typ` to be `at+jwt` (RFC 9068 section 2.1).
    pub require_at_jwt_typ: bool,
    pub keys: KeySetConfig,
}

/// The claims of a valid token that the policy uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JwtClaims {
    pub client_id: String,
    /// Space-separated scopes (RFC 9068 section 2.2.3).
    pub scope: Option<String>,
    /// Expiry, in seconds since the Unix epoch.
    pub exp: u64,
}

impl JwtClaims {
    pub fn scopes(&self) -> impl Iterator<Item = &str> {
        self.scope.as_deref().unwrap_or("").split_whitespace()
    }
}

/// Cause of a JWT access token's rejection. [`JwtError::reason`] is the audit reason.
#[derive(Clone, Debug, thiserror::Error)]
pub enum JwtError {
    #[error("the token is not a JWS in compact serialization: {0}")]
    Malformed(&'static str),
    #[error("algorithm {0:?} is not allowed")]
    AlgorithmNotAllowed(String),
    #[error("the header lists critical extensions {0:?}, which this validator does not support")]
    UnsupportedCritical(String),
    #[error("the header typ is {0:?}, not at+jwt")]
    WrongType(Option<String>),
    #[error("no key matches kid {0:?}")]
    UnknownKey(Option<String>),
    #[error("the issuer's keys are unavailable: {0}")]
    KeysUnavailable(#[source] KeySetError),
    #[error("the signature does not verify")]
    BadSignature,
    #[error("claim {0} is missing or has the wrong type")]
    MissingClaim(&'static str),
    #[error("the issuer is {0:?}")]
    WrongIssuer(String),
    #[error("the audience {0:?} contains none of the accepted audiences")]
    WrongAudience(Vec<String>),
    #[error("the token expired at {0} (Unix time)")]
    Expired(u64),
    #[error("the token is not valid before {0} (Unix time)")]
    NotYetValid(u64),
    #[error("the token was issued in the future, at {0} (Unix time)")]
    IssuedInFuture(u64),
}

impl JwtError {
    /// Short machine-readable cause for the audit log.
    pub fn reason(&self) -> &'static str {
        match self {
            JwtError::Malformed(_) => "malformed_token",
            JwtError::AlgorithmNotAllowed(_) => "algorithm_not_allowed",
            JwtError::UnsupportedCritical(_) => "unsupported_critical_header",
            JwtError::WrongType(_) => "wrong_token_type",
            JwtError::UnknownKey(_) => "unknown_key",
            JwtError::KeysUnavailable(_) => "keys_unavailable",
            JwtError::BadSignature => "bad_signature",
            JwtError::MissingClaim(_) => "missing_claim",
            JwtError::WrongIssuer(_) => "wrong_issuer",
            JwtError::WrongAudience(_) => "wrong_audience",
            JwtError::Expired(_) => "token_expired",
            JwtError::NotYetValid(_) => "token_not_yet_valid",
            JwtError::IssuedInFuture(_) => "token_issued_in_future",
        }
    }
}

/// Parses `alg` as a signature algorithm a public key can verify. `none` and `HS*` are
/// rejected here, so no configuration can allow them.
pub fn public_key_algorithm(alg: &str) -> Option<Algorithm> {
    let algorithm = Algorithm::from_str(alg).ok()?;
    let family = algorithm_family(algorithm);
    (family != AlgorithmFamily::Hmac).then_some(algorithm)
}

fn algorithm_family(algorithm: Algorithm) -> AlgorithmFamily {
    [
        AlgorithmFamily::Hmac,
        AlgorithmFamily::Rsa,
        AlgorithmFamily::Ec,
        AlgorithmFamily::Ed,
    ]
    .into_iter()
    .find(|family| family.algorithms().contains(&algorithm))
    .unwrap_or(AlgorithmFamily::Hmac)
}

#[derive(serde::Deserialize)]
struct JoseHeader {
    alg: Option<String>,
    kid: Option<String>,
    typ: Option<String>,
    crit: Option<serde_json::Value>,
}

#[derive(serde::Deserialize)]
struct Claims {
    iss: Option<serde_json::Value>,
    aud: Option<serde_json::Value>,
    exp: Option<serde_json::Value>,
    nbf: Option<serde_json::Value>,
    iat: Option<serde_json::Value>,
    client_id: Option<serde_json::Value>,
    scope: Option<serde_json::Value>,
}

/// Checks `token` against `settings` with the keys of `keys`, at time `now`.
pub async fn validate(
    token: &str,
    settings: &JwtSettings,
    keys: &Arc<KeySet>,
    now: SystemTime,
) -> Result<JwtClaims, JwtError> {
    let parts = split(token)?;
    let header: JoseHeader = decode_json(parts.header)?;

    let alg_text = header
        .alg
        .ok_or(JwtError::Malformed("the header has no alg"))?;
    let alg = public_key_algorithm(&alg_text)
        .filter(|alg| settings.algorithms.contains(alg))
        .ok_or(JwtError::AlgorithmNotAllowed(alg_text))?;
    if let Some(crit) = header.crit {
        return Err(JwtError::UnsupportedCritical(crit.to_string()));
    }
    if settings.require_at_jwt_typ && !is_at_jwt(header.typ.as_deref()) {
        return Err(JwtError::WrongType(header.typ));
    }

    let candidates = keys
        .keys_for(header.kid.as_deref(), alg)
        .await
        .map_err(|e| match e {
            KeyLookupError::UnknownKey { kid } => JwtError::UnknownKey(kid),
            KeyLookupError::Unavailable(source) => JwtError::KeysUnavailable(source),
        })?;
    let verified = candidates.iter().any(|key| {
        jsonwebtoken::crypto::verify(
            parts.signature,
            parts.signing_input.as_bytes(),
            key.decoding_key(),
            alg,
        )
        .unwrap_or(false)
    });
    if !verified {
        return Err(JwtError::BadSignature);
    }

    let claims: Claims = decode_json(parts.payload)?;
    check_claims(claims, settings, now)
}

struct Parts<'t> {
    header: &'t str,
    payload: &'t str,
    signature: &'t str,
    /// `header.payload`, the bytes the signature covers.
    signing_input: &'t str,
}

fn split(token: &str) -> Result<Parts<'_>, JwtError> {
    let mut pieces = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (pieces.next(), pieces.next(), pieces.next(), pieces.next())
    else {
        return Err(JwtError::Malformed("a JWS has three dot-separated parts"));
    };
    if header.is_empty() || payload.is_empty() || signature.is_empty() {
        return Err(JwtError::Malformed("a part is empty"));
    }
    Ok(Parts {
        header,
        payload,
        signature,
        signing_input: &token[..header.len() + 1 + payload.len()],
    })
}

fn decode_json<T: serde::de::DeserializeOwned>(part: &str) -> Result<T, JwtError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| JwtError::Malformed("a part is not unpadded base64url"))?;
    serde_json::from_slice(&bytes).map_err(|_| JwtError::Malformed("a part is not a JSON object"))
}

/// RFC 9068 section 4: `typ` is `at+jwt` or `application/at+jwt`, compared
/// case-insensitively as a media type.
fn is_at_jwt(typ: Option<&str>) -> bool {
    typ.is_some_and(|typ| {
        let typ = typ.to_ascii_lowercase();
        typ == "at+jwt" || typ == "application/at+jwt"
    })
}

fn check_claims(
    claims: Claims,
    settings: &JwtSettings,
    now: SystemTime,
) -> Result<JwtClaims, JwtError> {
    let issuer = claims
        .iss
        .as_ref()
        .and_then(|v| v.as_str())
        .ok_or(JwtError::MissingClaim("iss"))?;
    if issuer != settings.issuer {
        return Err(JwtError::WrongIssuer(issuer.to_string()));
    }

    let audiences = audience_list(claims.aud.as_ref()).ok_or(JwtError::MissingClaim("aud"))?;
    if !audiences.iter().any(|aud| settings.audiences.contains(aud)) {
        return Err(JwtError::WrongAudience(audiences));
    }

    let now = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    let leeway = settings.leeway.as_secs();
    let exp = numeric_date(claims.exp.as_ref()).ok_or(JwtError::MissingClaim("exp"))?;
    if now >= exp.saturating_add(leeway) {
        return Err(JwtError::Expired(exp));
    }
    if claims.nbf.is_some() {
        let nbf = numeric_date(claims.nbf.as_ref()).ok_or(JwtError::MissingClaim("nbf"))?;
        if now.saturating_add(leeway) < nbf {
            return Err(JwtError::NotYetValid(nbf));
        }
    }
    let iat = numeric_date(claims.iat.as_ref()).ok_or(JwtError::MissingClaim("iat"))?;
    if now.saturating_add(leeway) < iat {
        return Err(JwtError::IssuedInFuture(iat));
    }

    let client_id = claims
        .client_id
        .as_ref()
        .and_then(|v| v.as_str())
        .filter(|id| !id.is_empty())
        .ok_or(JwtError::MissingClaim("client_id"))?;
    let scope = match &claims.scope {
        None => None,
        Some(value) => Some(
            value
                .as_str()
                .ok_or(JwtError::MissingClaim("scope"))?
                .to_string(),
        ),
    };
    Ok(JwtClaims {
        client_id: client_id.to_string(),
        scope,
        exp,
    })
}

/// `aud` is one string or an array of strings (RFC 7519 section 4.1.3).
fn audience_list(value: Option<&serde_json::Value>) -> Option<Vec<String>> {
    match value? {
        serde_json::Value::String(one) => Some(vec![one.clone()]),
        serde_json::Value::Array(many) => many
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect(),
        _ => None,
    }
}

/// Parses a NumericDate (RFC 7519 section 2): seconds since the epoch, possibly
/// fractional. Fractions are cut, negative values rejected.
fn numeric_date(value: Option<&serde_json::Value>) -> Option<u64> {
    let number = value?.as_number()?;
    if let Some(whole) = number.as_u64() {
        return Some(whole);
    }
    let float = number.as_f64()?;
    (float.is_finite() && float >= 0.0).then(|| float as u64)
}

#[cfg(test)]
pub(crate) mod tests;
