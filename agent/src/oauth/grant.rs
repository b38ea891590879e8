//! One client-credentials token request (RFC 6749 section 4.4) with its retries: the
//! form parameters, client authentication, and the parsing of the token response.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use reqwest::StatusCode;

use super::exchange::{self, ClientAuth, RequestAuth};
use super::retry::{backoff, jittered, random_u64};
use super::token::{
    AccessToken, CacheKey, ClientAuthentication, ClientCredentials, DEFAULT_EXPIRES_IN, TokenError,
};
use super::token_fingerprint;

/// Requests a token for `creds`, retrying transport errors and 5xx responses with
/// exponential backoff and jitter, within the attempts and time of `creds.retry`.
pub(crate) async fn request_token(
    http: &reqwest::Client,
    creds: &ClientCredentials,
    key: &CacheKey,
) -> Result<Arc<AccessToken>, TokenError> {
    let policy = creds.retry;
    let deadline = Instant::now() + policy.timeout;
    let mut attempt = 1;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let outcome = tokio::time::timeout(remaining, request_once(http, creds, key)).await;
        let error = match outcome {
            Ok(Ok(token)) => return Ok(token),
            Ok(Err(error)) => error,
            Err(_) => TokenError::TimedOut {
                endpoint: creds.token_endpoint.clone(),
                client_id: creds.client_id.clone(),
                timeout: policy.timeout,
                attempts: attempt,
            },
        };
        if !error.is_retryable() || attempt >= policy.max_attempts {
            return Err(error);
        }
        // NOTE: a Retry-After header on a 503 is not read; the backoff alone sets the wait.
        let wait = jittered(backoff(attempt), random_u64());
        if Instant::now() + wait >= deadline {
            return Err(error);
        }
        tracing::warn!(
            client.id = %creds.client_id,
            token.endpoint = %creds.token_endpoint,
            attempt,
            max_attempts = policy.max_attempts,
            retry_in_ms = wait.as_millis() as u64,
            error = %error,
            "token request failed; retrying"
        );
        tokio::time::sleep(wait).await;
        attempt += 1;
    }
}

/// Sends one token request.
async fn request_once(
    http: &reqwest::Client,
    creds: &ClientCredentials,
    key: &CacheKey,
) -> Result<Arc<AccessToken>, TokenError> {
    let endpoint = &creds.token_endpoint;
    tracing::debug!(
        client.id = %creds.client_id,
        token.endpoint = %endpoint,
        scope = key.scope_parameter().as_deref().unwrap_or(""),
        audience = key.audience.as_deref().unwrap_or(""),
        resources = ?key.resources,
        "requesting access token"
    );

    // The lifetime counts from before the request, so network delay shortens it.
    let requested_at = Instant::now();
    let form = form_parameters(key);
    let auth = match &creds.authentication {
        ClientAuthentication::Secret { secret, method } => RequestAuth::Secret(ClientAuth {
            id: &creds.client_id,
            secret,
            method: *method,
        }),
        ClientAuthentication::PrivateKeyJwt(signer) => {
            let assertion = signer
                .sign(&creds.client_id, endpoint, SystemTime::now())
                .map_err(|source| TokenError::Assertion {
                    client_id: creds.client_id.clone(),
                    source: Arc::new(source),
                })?;
            RequestAuth::Assertion {
                id: &creds.client_id,
                assertion,
            }
        }
    };
    let body = exchange::post_form(http, endpoint, form, auth)
        .await
        .map_err(|failure| TokenError::from_exchange(endpoint, &creds.client_id, failure))?;

    let token = parse_token_response(&body, requested_at).map_err(|reason| {
        TokenError::InvalidResponse {
            endpoint: endpoint.clone(),
            client_id: creds.client_id.clone(),
            status: StatusCode::OK,
            reason,
        }
    })?;
    tracing::debug!(
        client.id = %creds.client_id,
        token.fingerprint = token.fingerprint(),
        expires_in_secs = token.expires_at().saturating_duration_since(requested_at).as_secs(),
        "access token received"
    );
    Ok(Arc::new(token))
}

/// Builds the form of a client-credentials request. `resource` appears once per resource
/// indicator (RFC 8707 section 2). `audience` is not in RFC 6749, but providers such as
/// Auth0 select the API by it.
pub(crate) fn form_parameters(key: &CacheKey) -> Vec<(&'static str, String)> {
    let mut form = vec![("grant_type", "client_credentials".to_string())];
    if let Some(scope) = key.scope_parameter() {
        form.push(("scope", scope));
    }
    if let Some(audience) = &key.audience {
        form.push(("audience", audience.clone()));
    }
    for resource in &key.resources {
        form.push(("resource", resource.clone()));
    }
    form
}

/// The successful token response of RFC 6749 section 5.1.
#[derive(serde::Deserialize)]
struct TokenResponse {
    access_token: String,
    token_type: String,
    #[serde(default)]
    expires_in: Option<ExpiresIn>,
    #[serde(default)]
    scope: Option<String>,
}

/// `expires_in` in seconds. Some providers send it as a string of digits.
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum ExpiresIn {
    Number(u64),
    Text(String),
}

/// Parses a token response body. The error is a reason that never contains the token.
pub(crate) fn parse_token_response(
    body: &[u8],
    requested_at: Instant,
) -> Result<AccessToken, String> {
    let response: TokenResponse = serde_json::from_slice(body)
        .map_err(|e| format!("the body is not a token response ({e})"))?;

    if response.access_token.is_empty() {
        return Err("access_token is empty".to_string());
    }
    if !response.token_type.eq_ignore_ascii_case("bearer") {
        return Err(format!(
            "token_type is {:?}, but the proxy sends only Bearer tokens",
            response.token_type
        ));
    }
    let expires_in = match response.expires_in {
        None => DEFAULT_EXPIRES_IN,
        Some(ExpiresIn::Number(seconds)) => Duration::from_secs(seconds),
        Some(ExpiresIn::Text(text)) => text
            .trim()
            .parse()
            .map(Duration::from_secs)
            .map_err(|_| format!("expires_in {text:?} is not a whole number of seconds"))?,
    };

    Ok(AccessToken::new(
        token_fingerprint(&response.access_token),
        response.access_token,
        requested_at + expires_in,
        response.scope,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_response_parses() {
        let now = Instant::now();
        let body =
            br#"{"access_token":"abc","token_type":"Bearer","expires_in":300,"scope":"read"}"#;
        let token = parse_token_response(body, now).unwrap();
        assert_eq!(token.secret(), "abc");
        assert_eq!(token.expires_at(), now + Duration::from_secs(300));
        assert_eq!(token.scope(), Some("read"));
        assert_eq!(token.fingerprint(), token_fingerprint("abc"));
    }

    #[test]
    fn missing_expires_in_uses_default() {
        let now = Instant::now();
        let token =
            parse_token_response(br#"{"access_token":"abc","token_type":"bearer"}"#, now).unwrap();
        assert_eq!(token.expires_at(), now + DEFAULT_EXPIRES_IN);
        assert_eq!(token.scope(), None);
    }

    #[test]
    fn expires_in_as_string_parses() {
        let now = Instant::now();
        let body = br#"{"access_token":"abc","token_type":"Bearer","expires_in":"3600"}"#;
        let token = parse_token_response(body, now).unwrap();
        assert_eq!(token.expires_at(), now + Duration::from_secs(3600));

        let bad = br#"{"access_token":"abc","token_type":"Bearer","expires_in":"soon"}"#;
        let reason = parse_token_response(bad, now).unwrap_err();
        assert!(reason.contains("expires_in"), "{reason}");
    }

    #[test]
    fn non_bearer_token_rejected() {
        let body = br#"{"access_token":"abc","token_type":"DPoP","expires_in":60}"#;
        let reason = parse_token_response(body, Instant::now()).unwrap_err();
        assert!(reason.contains("DPoP"), "{reason}");
        assert!(!reason.contains("abc"), "{reason}");
    }

    #[test]
    fn malformed_token_response_rejected() {
        let now = Instant::now();
        for body in [
            &b"not json"[..],
            br#"{"token_type":"Bearer"}"#,
            br#"{"access_token":"","token_type":"Bearer"}"#,
            br#"{"access_token":"abc"}"#,
        ] {
            let reason = parse_token_response(body, now).unwrap_err();
            assert!(!reason.is_empty());
        }
    }
}
