//! The error response of OAuth 2.0 endpoints (RFC 6749 section 5.2), shared by the token
//! and introspection clients.

use std::fmt;

/// The `error` and `error_description` members of an OAuth 2.0 error response.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
pub struct OAuthError {
    /// Error code such as `invalid_client` or `invalid_scope`.
    pub error: String,
    /// Human-readable detail chosen by the identity provider.
    #[serde(default)]
    pub error_description: Option<String>,
}

impl OAuthError {
    /// Parses `body` as an error response. Returns `None` when the body is not JSON or has
    /// no `error` string, as with a proxy's HTML error page.
    pub fn parse(body: &[u8]) -> Option<OAuthError> {
        serde_json::from_slice(body).ok()
    }

    /// Returns the next step for an operator, chosen by the error code.
    pub fn hint(&self) -> &'static str {
        match self.error.as_str() {
            "invalid_client" => {
                "check the client id and secret, and that the client's registered \
                 authentication method matches auth_method"
            }
            "invalid_scope" => "check that the client is allowed to request these scopes",
            "unauthorized_client" => {
                "check that the client is allowed to use the client_credentials grant"
            }
            "unsupported_grant_type" => {
                "check that the identity provider enables the client_credentials grant"
            }
            "invalid_target" => "check the resource indicator the identity provider expects",
            "unsupported_token_type" => {
                "the identity provider cannot introspect this kind of token; a JWT access \
                 token must be validated with the provider's keys instead"
            }
            _ => "check the identity provider's log for this request",
        }
    }
}

impl fmt::Display for OAuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.error)?;
        if let Some(description) = &self.error_description {
            write!(f, " ({description})")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_response_parses_with_description() {
        let body =
            br#"{"error":"invalid_client","error_description":"client authentication failed"}"#;
        let error = OAuthError::parse(body).unwrap();
        assert_eq!(error.error, "invalid_client");
        assert_eq!(
            error.to_string(),
            "invalid_client (client authentication failed)"
        );
        assert!(error.hint().contains("client id and secret"));
    }

    #[test]
    fn error_response_without_description() {
        let error = OAuthError::parse(br#"{"error":"invalid_scope"}"#).unwrap();
        assert_eq!(error.error_description, None);
        assert_eq!(error.to_string(), "invalid_scope");
    }

    #[test]
    fn non_oauth_body_is_none() {
        assert_eq!(OAuthError::parse(b"<html>502 Bad Gateway</html>"), None);
        assert_eq!(OAuthError::parse(br#"{"message":"oops"}"#), None);
    }
}
