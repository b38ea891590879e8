//! The checks a request to a protected pod must pass: a token in the configured header,
//! a source address inside the allowed networks, an active token (RFC 7662), an allowed
//! client id and the required scopes. A failure becomes an RFC 6750 error response.

use std::net::IpAddr;

use http::{HeaderMap, HeaderValue, StatusCode, header::WWW_AUTHENTICATE};

use crate::{
    audit::Decision,
    config::{TokenHeader, ValidatorSettings},
    oauth::{ClientId, introspect::Introspector, token_fingerprint},
};

/// A request that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub client_id: ClientId,
}

/// A request that failed a check, with the answer the caller gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub status: StatusCode,
    pub decision: Decision,
    /// Audit reason, such as `client_id_not_allowed`.
    pub reason: &'static str,
    /// RFC 6750 section 3.1 error code, when one fits.
    pub error: Option<&'static str>,
    /// Short human-readable cause, sent in the response.
    pub description: &'static str,
    /// Client id of the token, when introspection got that far.
    pub client_id: Option<String>,
    /// Scopes the request needs, sent with `insufficient_scope`.
    pub scope: Option<String>,
}

impl Denial {
    fn new(status: StatusCode, reason: &'static str, description: &'static str) -> Denial {
        Denial {
            status,
            decision: Decision::Deny,
            reason,
            error: None,
            description,
            client_id: None,
            scope: None,
        }
    }

    fn with_error(mut self, error: &'static str) -> Denial {
        self.error = Some(error);
        self
    }

    /// The `WWW-Authenticate` challenge (RFC 6750 section 3), or `None` for answers that
    /// are not about the caller's credentials (the identity provider being down).
    pub fn challenge(&self) -> Option<HeaderValue> {
        if self.decision != Decision::Deny {
            return None;
        }
        let mut value = String::from("Bearer realm=\"tokenmesh\"");
        if let Some(error) = self.error {
            value.push_str(&format!(", error=\"{error}\""));
        }
        value.push_str(&format!(", error_description=\"{}\"", self.description));
        if let Some(scope) = &self.scope {
            value.push_str(&format!(", scope=\"{scope}\""));
        }
        HeaderValue::from_str(&value).ok()
    }

    /// Adds the challenge to a response's headers.
    pub fn apply_headers(&self, headers: &mut HeaderMap) {
        if let Some(challenge) = self.challenge() {
            headers.insert(WWW_AUTHENTICATE, challenge);
        }
    }
}

/// Finds the token in `headers`. Exactly one header must carry it; for `Authorization`
/// the scheme must be `Bearer` (RFC 6750 section 2.1, scheme matched case-insensitively).
pub fn extract_token<'h>(headers: &'h HeaderMap, header: &TokenHeader) -> Result<&'h str, Denial> {
    let mut values = headers.get_all(&header.name).iter();
    let Some(value) = values.next() else {
        return Err(Denial::new(
            StatusCode::UNAUTHORIZED,
            "missing_token",
            "no access token in the request",
        ));
    };
    if values.next().is_some() {
        return Err(Denial::new(
            StatusCode::BAD_REQUEST,
            "several_token_headers",
            "the token header appears more than once",
        )
        .with_error("invalid_request"));
    }
    let Ok(text) = value.to_str() else {
        return Err(Denial::new(
            StatusCode::BAD_REQUEST,
            "malformed_token_header",
            "the token header is not visible ASCII",
        )
        .with_error("invalid_request"));
    };
    let token = if header.bearer {
        let mut parts = text.splitn(2, ' ');
        let scheme = parts.next().unwrap_or_default();
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(Denial::new(
                StatusCode::UNAUTHORIZED,
                "wrong_auth_scheme",
                "the Authorization scheme is not Bearer",
            ));
        }
        parts.next().unwrap_or_default().trim()
    } else {
        text.trim()
    };
    if token.is_empty() {
        return Err(Denial::new(
            StatusCode::BAD_REQUEST,
            "empty_token",
            "the access token is empty",
        )
        .with_error("invalid_request"));
    }
    Ok(token)
}

/// Runs every check on one request from `peer`.
pub async fn check(
    settings: &ValidatorSettings,
    introspector: &Introspector,
    headers: &HeaderMap,
    peer: IpAddr,
) -> Result<Accepted, Denial> {
    let token = extract_token(headers, &settings.header)?;

    if !settings.allowed_cidrs.is_empty()
        && !settings.allowed_cidrs.iter().any(|net| net.contains(&peer))
    {
        return Err(Denial::new(
            StatusCode::FORBIDDEN,
            "source_ip_not_allowed",
            "the source address is not allowed",
        ));
    }

    let introspection = match introspector
        .introspect(&settings.introspection, token)
        .await
    {
        Ok(result) => result,
        Err(e) => {
            tracing::warn!(
                plugin = %settings.plugin_id,
                token.fingerprint = %token_fingerprint(token),
                error = %e,
                "token introspection failed; answering 503"
            );
            let mut denial = Denial::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "introspection_failed",
                "the token could not be validated now; retry later",
            );
            denial.decision = Decision::Error;
            return Err(denial);
        }
    };
    if !introspection.active {
        return Err(Denial::new(
            StatusCode::UNAUTHORIZED,
            "token_inactive",
            "the access token is not active",
        )
        .with_error("invalid_token"));
    }

    let client_id = introspection.client_id.clone().unwrap_or_default();
    if !settings.allowed_client_ids.is_empty()
        && !settings
            .allowed_client_ids
            .iter()
            .any(|id| id.0 == client_id)
    {
        let mut denial = Denial::new(
            StatusCode::FORBIDDEN,
            "client_id_not_allowed",
            "the client is not allowed to call this service",
        );
        denial.client_id = Some(client_id);
        return Err(denial);
    }

    if !introspection.has_scopes(&settings.required_scopes) {
        let mut denial = Denial::new(
            StatusCode::FORBIDDEN,
            "insufficient_scope",
            "the access token lacks a required scope",
        )
        .with_error("insufficient_scope");
        denial.client_id = Some(client_id);
        denial.scope = Some(settings.required_scopes.join(" "));
        return Err(denial);
    }

    Ok(Accepted {
        client_id: ClientId(client_id),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::AUTHORIZATION;

    fn bearer() -> TokenHeader {
        TokenHeader {
            name: AUTHORIZATION,
            bearer: true,
        }
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    #[test]
    fn bearer_token_extracted() {
        let map = headers(&[("authorization", "bearer abc.def")]);
        assert_eq!(extract_token(&map, &bearer()).unwrap(), "abc.def");
    }

    #[test]
    fn missing_token_is_401_without_error_code() {
        let denial = extract_token(&HeaderMap::new(), &bearer()).unwrap_err();
        assert_eq!(denial.status, StatusCode::UNAUTHORIZED);
        assert_eq!(denial.reason, "missing_token");
        assert_eq!(
            denial.challenge().unwrap(),
            "Bearer realm=\"tokenmesh\", error_description=\"no access token in the request\""
        );
    }

    #[test]
    fn two_token_headers_are_400() {
        let map = headers(&[("authorization", "Bearer a"), ("authorization", "Bearer b")]);
        let denial = extract_token(&map, &bearer()).unwrap_err();
        assert_eq!(denial.status, StatusCode::BAD_REQUEST);
        assert_eq!(denial.error, Some("invalid_request"));
    }

    #[test]
    fn basic_scheme_is_401() {
        let map = headers(&[("authorization", "Basic Zm9vOmJhcg==")]);
        let denial = extract_token(&map, &bearer()).unwrap_err();
        assert_eq!(denial.status, StatusCode::UNAUTHORIZED);
        assert_eq!(denial.reason, "wrong_auth_scheme");
    }

    #[test]
    fn empty_bearer_is_400() {
        let map = headers(&[("authorization", "Bearer   ")]);
        let denial = extract_token(&map, &bearer()).unwrap_err();
        assert_eq!(denial.reason, "empty_token");
    }

    #[test]
    fn custom_header_carries_raw_token() {
        let header = TokenHeader {
            name: http::HeaderName::from_static("slashid_signature"),
            bearer: false,
        };
        let map = headers(&[("SlashID_Signature", "raw-token")]);
        assert_eq!(extract_token(&map, &header).unwrap(), "raw-token");
    }

    #[test]
    fn insufficient_scope_challenge_names_scope() {
        let mut denial = Denial::new(
            StatusCode::FORBIDDEN,
            "insufficient_scope",
            "the access token lacks a required scope",
        )
        .with_error("insufficient_scope");
        denial.scope = Some("admin".into());
        let challenge = denial.challenge().unwrap();
        let text = challenge.to_str().unwrap();
        assert!(text.contains("error=\"insufficient_scope\""), "{text}");
        assert!(text.contains("scope=\"admin\""), "{text}");
    }
}
