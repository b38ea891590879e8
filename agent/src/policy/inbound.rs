//! The checks a request to a protected pod must pass. It carries one token, in the
//! configured header or (when allowed) the query. Its source address is inside the allowed
//! networks. The token is valid (RFC 7662 introspection or an RFC 9068 JWT), its client id
//! allowed, and its scopes cover those required for the request's method. A failure becomes
//! an RFC 6750 error response. CORS preflight requests may pass without a token.

use std::{borrow::Cow, net::IpAddr, time::SystemTime};

use http::{
    HeaderMap, HeaderValue, Method, StatusCode, Uri,
    header::{ACCESS_CONTROL_REQUEST_METHOD, ORIGIN, WWW_AUTHENTICATE},
};

use crate::{
    audit::Decision,
    config::{TokenCheck, TokenHeader, ValidatorSettings},
    oauth::{
        ClientId, grants_scopes,
        introspect::{CachePolicy, IntrospectionEndpoint, Introspector},
        jwks::KeySets,
        jwt::{self, JwtError, JwtSettings},
        token_fingerprint,
    },
};

/// Query parameter that carries a token (RFC 6750 section 2.3).
const QUERY_TOKEN_PARAMETER: &str = "access_token";

/// A request that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// The token's client; `None` for a CORS preflight, which carries no token.
    pub client_id: Option<ClientId>,
    /// Audit reason: `token_valid`, or `cors_preflight`.
    pub reason: &'static str,
    /// The token came in the query, so it must be removed from the URL before the request
    /// reaches the app.
    pub token_in_query: bool,
}

/// A request that failed a check, with the response the caller gets.
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

    /// The `WWW-Authenticate` challenge (RFC 6750 section 3), or `None` for responses that
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

/// The services that verify tokens, shared by every inbound connection.
#[derive(Clone, Copy)]
pub struct Verifiers<'a> {
    pub introspector: &'a Introspector,
    pub key_sets: &'a KeySets,
}

/// The parts of a request the checks read.
#[derive(Clone, Copy)]
pub struct RequestView<'r> {
    pub method: &'r Method,
    pub uri: &'r Uri,
    pub headers: &'r HeaderMap,
    pub peer: IpAddr,
}

/// The client and scopes a valid token proves.
struct Grant {
    client_id: String,
    scope: Option<String>,
}

/// Runs every check on one request.
pub async fn check(
    settings: &ValidatorSettings,
    verifiers: Verifiers<'_>,
    request: RequestView<'_>,
) -> Result<Accepted, Denial> {
    if settings.allow_cors_preflight && is_cors_preflight(&request) {
        check_source(settings, request.peer)?;
        // A token the preflight carries anyway is removed like any other.
        return Ok(Accepted {
            client_id: None,
            reason: "cors_preflight",
            token_in_query: !query_tokens(request.uri).is_empty(),
        });
    }

    let (token, token_in_query) = locate_token(settings, &request)?;
    check_source(settings, request.peer)?;

    let grant = match &settings.token_check {
        TokenCheck::Introspection { endpoint, cache } => {
            introspect(settings, verifiers.introspector, endpoint, *cache, &token).await?
        }
        TokenCheck::Jwt(jwt_settings) => {
            verify_jwt(settings, verifiers.key_sets, jwt_settings, &token).await?
        }
    };

    if !settings.allowed_client_ids.is_empty()
        && !settings
            .allowed_client_ids
            .iter()
            .any(|id| id.0 == grant.client_id)
    {
        let mut denial = Denial::new(
            StatusCode::FORBIDDEN,
            "client_id_not_allowed",
            "the client is not allowed to call this service",
        );
        denial.client_id = Some(grant.client_id);
        return Err(denial);
    }

    let mut needed = settings.required_scopes.clone();
    if let Some(for_method) = settings.method_required_scopes.get(request.method) {
        needed.extend(for_method.iter().cloned());
    }
    if !grants_scopes(grant.scope.as_deref(), &needed) {
        let mut denial = Denial::new(
            StatusCode::FORBIDDEN,
            "insufficient_scope",
            "the access token lacks a required scope",
        )
        .with_error("insufficient_scope");
        denial.client_id = Some(grant.client_id);
        denial.scope = Some(needed.join(" "));
        return Err(denial);
    }

    Ok(Accepted {
        client_id: Some(ClientId(grant.client_id)),
        reason: "token_valid",
        token_in_query,
    })
}

/// Checks for a CORS preflight request (Fetch standard): `OPTIONS` with `Origin` and
/// `Access-Control-Request-Method`. Browsers send it without credentials.
fn is_cors_preflight(request: &RequestView<'_>) -> bool {
    *request.method == Method::OPTIONS
        && request.headers.contains_key(ORIGIN)
        && request.headers.contains_key(ACCESS_CONTROL_REQUEST_METHOD)
}

fn check_source(settings: &ValidatorSettings, peer: IpAddr) -> Result<(), Denial> {
    if !settings.allowed_cidrs.is_empty()
        && !settings.allowed_cidrs.iter().any(|net| net.contains(&peer))
    {
        return Err(Denial::new(
            StatusCode::FORBIDDEN,
            "source_ip_not_allowed",
            "the source address is not allowed",
        ));
    }
    Ok(())
}

/// Finds the one token of the request: in the token header, or in the `access_token`
/// query parameter when the validator accepts that (RFC 6750 section 2.3). A request that
/// uses both, or repeats either, is rejected (RFC 6750 section 2). Returns the token and
/// whether it came from the query.
fn locate_token<'r>(
    settings: &ValidatorSettings,
    request: &RequestView<'r>,
) -> Result<(Cow<'r, str>, bool), Denial> {
    let mut in_query = query_tokens(request.uri);
    if in_query.is_empty() {
        return extract_token(request.headers, &settings.header)
            .map(|token| (Cow::Borrowed(token), false));
    }
    if !settings.allow_token_in_query {
        return Err(Denial::new(
            StatusCode::BAD_REQUEST,
            "token_in_query_not_allowed",
            "send the access token in the Authorization header, not in the URL",
        )
        .with_error("invalid_request"));
    }
    if in_query.len() > 1 || request.headers.contains_key(&settings.header.name) {
        return Err(Denial::new(
            StatusCode::BAD_REQUEST,
            "several_tokens",
            "the request carries more than one access token",
        )
        .with_error("invalid_request"));
    }
    let token = in_query.remove(0);
    if token.trim().is_empty() {
        return Err(Denial::new(
            StatusCode::BAD_REQUEST,
            "empty_token",
            "the access token is empty",
        )
        .with_error("invalid_request"));
    }
    Ok((Cow::Owned(token.trim().to_string()), true))
}

/// Values of every `access_token` query parameter, decoded.
fn query_tokens(uri: &Uri) -> Vec<String> {
    let Some(query) = uri.query() else {
        return Vec::new();
    };
    url::form_urlencoded::parse(query.as_bytes())
        .filter(|(name, _)| name == QUERY_TOKEN_PARAMETER)
        .map(|(_, value)| value.into_owned())
        .collect()
}

/// Returns `uri` without its `access_token` query parameters; other parameters keep their
/// order and encoding.
pub fn strip_query_token(uri: &Uri) -> Uri {
    let Some(query) = uri.query() else {
        return uri.clone();
    };
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| {
            let name = pair.split('=').next().unwrap_or_default();
            let decoded = url::form_urlencoded::parse(name.as_bytes())
                .next()
                .map(|(name, _)| name.into_owned())
                .unwrap_or_default();
            decoded != QUERY_TOKEN_PARAMETER
        })
        .collect();
    let mut path_and_query = uri.path().to_string();
    if !kept.is_empty() {
        path_and_query.push('?');
        path_and_query.push_str(&kept.join("&"));
    }
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = path_and_query.parse().ok();
    Uri::from_parts(parts).unwrap_or_else(|_| uri.clone())
}

async fn introspect(
    settings: &ValidatorSettings,
    introspector: &Introspector,
    endpoint: &IntrospectionEndpoint,
    cache: CachePolicy,
    token: &str,
) -> Result<Grant, Denial> {
    let introspection = match introspector.introspect_cached(endpoint, token, cache).await {
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
    Ok(Grant {
        client_id: introspection.client_id.clone().unwrap_or_default(),
        scope: introspection.scope.clone(),
    })
}

async fn verify_jwt(
    settings: &ValidatorSettings,
    key_sets: &KeySets,
    jwt_settings: &JwtSettings,
    token: &str,
) -> Result<Grant, Denial> {
    let keys = key_sets.get(&jwt_settings.keys);
    match jwt::validate(token, jwt_settings, &keys, SystemTime::now()).await {
        Ok(claims) => Ok(Grant {
            client_id: claims.client_id,
            scope: claims.scope,
        }),
        Err(e) => {
            tracing::debug!(
                plugin = %settings.plugin_id,
                token.fingerprint = %token_fingerprint(token),
                error = %e,
                "JWT access token rejected"
            );
            Err(jwt_denial(&e))
        }
    }
}

/// Builds the response for a rejected JWT access token. Missing keys are the issuer's problem, not
/// the caller's, so they get 503 without a challenge.
fn jwt_denial(error: &JwtError) -> Denial {
    let description = match error {
        JwtError::KeysUnavailable(_) => {
            let mut denial = Denial::new(
                StatusCode::SERVICE_UNAVAILABLE,
                error.reason(),
                "the issuer's signing keys are unavailable; retry later",
            );
            denial.decision = Decision::Error;
            return denial;
        }
        JwtError::Malformed(_) => "the access token is not a signed JWT",
        JwtError::AlgorithmNotAllowed(_) => {
            "the access token's signature algorithm is not accepted"
        }
        JwtError::UnsupportedCritical(_) => {
            "the access token has critical header parameters this service does not support"
        }
        JwtError::WrongType(_) => "the access token's typ is not at+jwt",
        JwtError::UnknownKey(_) => {
            "the access token is signed with a key the issuer does not publish"
        }
        JwtError::BadSignature => "the access token's signature is invalid",
        JwtError::MissingClaim(_) => "the access token lacks a required claim",
        JwtError::WrongIssuer(_) => "the access token comes from another issuer",
        JwtError::WrongAudience(_) => "the access token is meant for another audience",
        JwtError::Expired(_) => "the access token has expired",
        JwtError::NotYetValid(_) => "the access token is not valid yet",
        JwtError::IssuedInFuture(_) => "the access token's issue time is in the future",
    };
    Denial::new(StatusCode::UNAUTHORIZED, error.reason(), description).with_error("invalid_token")
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

#[cfg(test)]
mod check_tests;
