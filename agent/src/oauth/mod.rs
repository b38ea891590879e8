//! OAuth 2.0 client side of the proxy: `token` gets access tokens with the
//! client-credentials grant (RFC 6749 section 4.4) and caches them, `introspect` sends
//! introspection requests to learn whether a presented token is active (RFC 7662), `jwt`
//! checks JWT access tokens (RFC 9068) with the issuer's keys from `jwks`.
//!
//! This module writes no token or client secret into logs or error messages. Logs name a
//! token by [`token_fingerprint`] only.

pub mod assertion;
mod error_response;
mod exchange;
mod grant;
pub mod introspect;
pub mod jwks;
pub mod jwt;
pub mod retry;
pub mod token;

pub use error_response::OAuthError;

use std::fmt;

use sha2::{Digest, Sha256};

/// OAuth 2.0 client identifier, as registered at the identity provider.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct ClientId(pub String);

impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Client authentication method with a client secret, at the token and introspection
/// endpoints (RFC 6749 section 2.3.1). The token endpoint also accepts `private_key_jwt`,
/// see [`token::TokenEndpointAuthMethod`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuthMethod {
    /// HTTP Basic authentication with the form-urlencoded client id and secret.
    #[default]
    ClientSecretBasic,
    /// `client_id` and `client_secret` as fields of the form body.
    ClientSecretPost,
}

/// Returns the first 12 hex digits of the token's SHA-256 digest. This is the only form in
/// which a token may appear in logs, because it distinguishes tokens without revealing
/// them.
pub fn token_fingerprint(token: &str) -> String {
    let digest = Sha256::digest(token.as_bytes());
    hex::encode(&digest[..6])
}

/// Checks that the space-separated `scope` of a token (RFC 6749 section 3.3) contains
/// every scope in `required`. A scope matches whole, never as a prefix.
pub fn grants_scopes(scope: Option<&str>, required: &[String]) -> bool {
    let granted = || scope.unwrap_or("").split_whitespace();
    required
        .iter()
        .all(|needed| granted().any(|scope| scope == needed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_is_sha256_prefix() {
        // SHA-256("abc") = ba7816bf8f01cfea414140de5dae2223...
        assert_eq!(token_fingerprint("abc"), "ba7816bf8f01");
        assert_eq!(token_fingerprint("").len(), 12);
        assert_ne!(token_fingerprint("token-a"), token_fingerprint("token-b"));
    }

    #[test]
    fn client_id_displays_and_serializes_bare() {
        let id = ClientId("frontend".into());
        assert_eq!(id.to_string(), "frontend");
        assert_eq!(serde_json::to_string(&id).unwrap(), "\"frontend\"");
        let parsed: ClientId = serde_json::from_str("\"backend\"").unwrap();
        assert_eq!(parsed, ClientId("backend".into()));
    }

    #[test]
    fn auth_method_parses_snake_case() {
        let basic: ClientAuthMethod = serde_json::from_str("\"client_secret_basic\"").unwrap();
        let post: ClientAuthMethod = serde_json::from_str("\"client_secret_post\"").unwrap();
        assert_eq!(basic, ClientAuthMethod::ClientSecretBasic);
        assert_eq!(post, ClientAuthMethod::ClientSecretPost);
        assert_eq!(
            ClientAuthMethod::default(),
            ClientAuthMethod::ClientSecretBasic
        );
        assert!(serde_json::from_str::<ClientAuthMethod>("\"private_key_jwt\"").is_err());
    }
}
