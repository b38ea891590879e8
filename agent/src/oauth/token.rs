//! Access tokens from the client-credentials grant (RFC 6749 section 4.4), cached per
//! token endpoint, client and scope set until shortly before they expire.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::Expiry;
use moka::future::Cache;
use reqwest::StatusCode;

use super::error_response::OAuthError;
use super::exchange::{self, ClientAuth, ExchangeError};
use super::{ClientAuthMethod, ClientId, token_fingerprint};
use crate::config::secret::Secret;

/// Lifetime assumed for a token whose response has no `expires_in`. RFC 6749 section 5.1
/// leaves the lifetime to the provider's documentation then, so the agent assumes a short
/// one: a token kept too long is rejected upstream, while one renewed too early costs one
/// extra token request.
pub const DEFAULT_EXPIRES_IN: Duration = Duration::from_secs(60);

/// Maximum number of cached tokens, one per (token endpoint, client id, scope set). An
/// evicted token costs one extra token request.
const CACHE_CAPACITY: u64 = 10_000;

/// Client credentials of one workload identity, with the scopes to request.
#[derive(Clone, Debug)]
pub struct ClientCredentials {
    /// URL of the identity provider's token endpoint.
    pub token_endpoint: String,
    pub client_id: ClientId,
    pub client_secret: Secret,
    pub auth_method: ClientAuthMethod,
    /// Scopes to request. Order and duplicates do not matter, and an empty list sends no
    /// `scope` parameter, so the provider grants the client's default scopes.
    pub scopes: Vec<String>,
}

/// An access token and the instant after which the agent stops using it.
pub struct AccessToken {
    value: String,
    expires_at: Instant,
    scope: Option<String>,
    fingerprint: String,
}

impl AccessToken {
    /// Returns the token value to send as `Authorization: Bearer`. Never log it.
    pub fn secret(&self) -> &str {
        &self.value
    }

    /// Instant at which the provider's `expires_in` runs out, counted from when the
    /// request was sent.
    pub fn expires_at(&self) -> Instant {
        self.expires_at
    }

    /// Scope the provider granted, when its response names one (RFC 6749 section 5.1
    /// requires it only when it differs from the requested scope).
    pub fn scope(&self) -> Option<&str> {
        self.scope.as_deref()
    }

    /// Returns the loggable form of the token, see [`token_fingerprint`].
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AccessToken({})", self.fingerprint)
    }
}

/// Failure to get an access token. Messages name the endpoint and the client, never the
/// secret or a token.
#[derive(Clone, Debug, thiserror::Error)]
pub enum TokenError {
    #[error(
        "token request to {endpoint} for client {client_id} failed: {kind}; check the URL \
         and that the identity provider is reachable from the node"
    )]
    Transport {
        endpoint: String,
        client_id: ClientId,
        kind: &'static str,
        #[source]
        source: Arc<reqwest::Error>,
    },
    #[error(
        "token endpoint {endpoint} rejected client {client_id} with HTTP {status}: {error}; {}",
        .error.hint()
    )]
    Rejected {
        endpoint: String,
        client_id: ClientId,
        status: StatusCode,
        error: OAuthError,
    },
    #[error(
        "token endpoint {endpoint} sent client {client_id} an invalid response (HTTP \
         {status}): {reason}; check that the URL is the provider's token endpoint"
    )]
    InvalidResponse {
        endpoint: String,
        client_id: ClientId,
        status: StatusCode,
        reason: String,
    },
}

impl TokenError {
    fn from_exchange(endpoint: &str, client_id: &ClientId, failure: ExchangeError) -> Self {
        let endpoint = endpoint.to_string();
        let client_id = client_id.clone();
        match failure {
            ExchangeError::Transport { kind, source } => TokenError::Transport {
                endpoint,
                client_id,
                kind,
                source: Arc::new(source),
            },
            ExchangeError::Rejected { status, error } => TokenError::Rejected {
                endpoint,
                client_id,
                status,
                error,
            },
            ExchangeError::NotOAuthError { status } => TokenError::InvalidResponse {
                endpoint,
                client_id,
                status,
                reason: "the body is not an OAuth error response".to_string(),
            },
        }
    }
}

/// Gets access tokens and shares them between connections of the same identity.
///
/// Concurrent calls for one (token endpoint, client id, scope set) wait for a single token
/// request. A token stays cached until `refresh_skew` before it expires. A token that
/// expires sooner than that is handed to the waiting callers and not cached. Errors are
/// not cached either, so the next call tries again.
#[derive(Clone)]
pub struct TokenSource {
    http: reqwest::Client,
    cache: Cache<CacheKey, Arc<AccessToken>>,
}

impl TokenSource {
    /// Creates a token source that sends its requests with `http`. Timeouts are those
    /// configured on `http`.
    pub fn new(http: reqwest::Client, refresh_skew: Duration) -> Self {
        let cache = Cache::builder()
            .max_capacity(CACHE_CAPACITY)
            .expire_after(RefreshBeforeExpiry { refresh_skew })
            .build();
        TokenSource { http, cache }
    }

    /// Returns a cached token for `creds`, or requests one from the token endpoint.
    pub async fn token(&self, creds: &ClientCredentials) -> Result<Arc<AccessToken>, TokenError> {
        let key = CacheKey::new(creds);
        let scope = key.scope_parameter();
        self.cache
            .try_get_with(key, request_token(&self.http, creds, scope))
            .await
            .map_err(Arc::unwrap_or_clone)
    }

    /// Drops the cached token for `creds`, so the next call requests a new one. Used when
    /// an upstream rejects a token that has not expired, for example after revocation.
    pub async fn invalidate(&self, creds: &ClientCredentials) {
        self.cache.invalidate(&CacheKey::new(creds)).await;
    }
}

/// Cache key: tokens are shared only between requests to the same endpoint, for the same
/// client and the same set of scopes.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct CacheKey {
    token_endpoint: String,
    client_id: ClientId,
    /// Sorted and without duplicates, so `["b", "a"]` and `["a", "b", "a"]` share a key.
    scopes: Vec<String>,
}

impl CacheKey {
    fn new(creds: &ClientCredentials) -> Self {
        // A configured entry of "a b" is two scopes, as in the `scope` parameter.
        let mut scopes: Vec<String> = creds
            .scopes
            .iter()
            .flat_map(|scope| scope.split_whitespace())
            .map(str::to_string)
            .collect();
        scopes.sort();
        scopes.dedup();
        CacheKey {
            token_endpoint: creds.token_endpoint.clone(),
            client_id: creds.client_id.clone(),
            scopes,
        }
    }

    /// Returns the space-separated `scope` request parameter, or `None` for no scopes.
    fn scope_parameter(&self) -> Option<String> {
        (!self.scopes.is_empty()).then(|| self.scopes.join(" "))
    }
}

struct RefreshBeforeExpiry {
    refresh_skew: Duration,
}

impl Expiry<CacheKey, Arc<AccessToken>> for RefreshBeforeExpiry {
    fn expire_after_create(
        &self,
        _key: &CacheKey,
        token: &Arc<AccessToken>,
        created_at: Instant,
    ) -> Option<Duration> {
        Some(cache_lifetime(
            token.expires_at,
            created_at,
            self.refresh_skew,
        ))
    }
}

/// Returns how long a token may stay cached: until `refresh_skew` before it expires, or
/// zero when that moment has already passed.
fn cache_lifetime(expires_at: Instant, now: Instant, refresh_skew: Duration) -> Duration {
    expires_at
        .saturating_duration_since(now)
        .saturating_sub(refresh_skew)
}

async fn request_token(
    http: &reqwest::Client,
    creds: &ClientCredentials,
    scope: Option<String>,
) -> Result<Arc<AccessToken>, TokenError> {
    let endpoint = &creds.token_endpoint;
    tracing::debug!(
        client.id = %creds.client_id,
        token.endpoint = %endpoint,
        scope = scope.as_deref().unwrap_or(""),
        "requesting access token"
    );

    let mut form = vec![("grant_type", "client_credentials".to_string())];
    if let Some(scope) = scope {
        form.push(("scope", scope));
    }
    let client = ClientAuth {
        id: &creds.client_id,
        secret: &creds.client_secret,
        method: creds.auth_method,
    };

    // The lifetime counts from before the request, so network delay shortens it.
    let requested_at = Instant::now();
    let body = exchange::post_form(http, endpoint, form, client)
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
        expires_in_secs = token.expires_at.saturating_duration_since(requested_at).as_secs(),
        "access token received"
    );
    Ok(Arc::new(token))
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
fn parse_token_response(body: &[u8], requested_at: Instant) -> Result<AccessToken, String> {
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

    Ok(AccessToken {
        fingerprint: token_fingerprint(&response.access_token),
        value: response.access_token,
        expires_at: requested_at + expires_in,
        scope: response.scope,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds(scopes: &[&str]) -> ClientCredentials {
        ClientCredentials {
            token_endpoint: "http://127.0.0.1:9/token".into(),
            client_id: ClientId("frontend".into()),
            client_secret: Secret::new("hunter2", "test"),
            auth_method: ClientAuthMethod::ClientSecretBasic,
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn cache_key_ignores_scope_order_and_duplicates() {
        let a = CacheKey::new(&creds(&["read", "admin"]));
        let b = CacheKey::new(&creds(&["admin", "read", "admin"]));
        let c = CacheKey::new(&creds(&["admin read"]));
        assert_eq!(a, b);
        assert_eq!(a, c);
        assert_eq!(a.scope_parameter().as_deref(), Some("admin read"));
    }

    #[test]
    fn cache_key_separates_clients_endpoints_scopes() {
        let base = CacheKey::new(&creds(&["read"]));

        let mut other_client = creds(&["read"]);
        other_client.client_id = ClientId("backend".into());
        assert_ne!(base, CacheKey::new(&other_client));

        let mut other_endpoint = creds(&["read"]);
        other_endpoint.token_endpoint = "http://127.0.0.1:10/token".into();
        assert_ne!(base, CacheKey::new(&other_endpoint));

        assert_ne!(base, CacheKey::new(&creds(&["read", "write"])));
        assert_ne!(base, CacheKey::new(&creds(&[])));
    }

    #[test]
    fn empty_scopes_send_no_parameter() {
        assert_eq!(CacheKey::new(&creds(&[])).scope_parameter(), None);
        assert_eq!(CacheKey::new(&creds(&["", " "])).scope_parameter(), None);
    }

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

    #[test]
    fn cache_lifetime_subtracts_skew() {
        let now = Instant::now();
        let skew = Duration::from_secs(30);
        let in_300 = now + Duration::from_secs(300);
        assert_eq!(cache_lifetime(in_300, now, skew), Duration::from_secs(270));
        let in_10 = now + Duration::from_secs(10);
        assert_eq!(cache_lifetime(in_10, now, skew), Duration::ZERO);
        assert_eq!(cache_lifetime(now, now + skew, skew), Duration::ZERO);
    }

    #[test]
    fn access_token_debug_shows_fingerprint_only() {
        let token = parse_token_response(
            br#"{"access_token":"very-secret-token","token_type":"Bearer"}"#,
            Instant::now(),
        )
        .unwrap();
        let printed = format!("{token:?}");
        assert!(!printed.contains("very-secret-token"));
        assert_eq!(
            printed,
            format!("AccessToken({})", token_fingerprint("very-secret-token"))
        );
    }

    #[tokio::test]
    async fn unreachable_endpoint_error_names_client() {
        // A port that was just bound and released has no listener, so connecting fails.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut creds = creds(&["read"]);
        creds.token_endpoint = format!("http://127.0.0.1:{port}/token");

        let source = TokenSource::new(reqwest::Client::new(), Duration::from_secs(5));
        let err = source.token(&creds).await.unwrap_err();
        let message = err.to_string();
        assert!(matches!(err, TokenError::Transport { .. }), "{message}");
        assert!(message.contains("frontend"), "{message}");
        assert!(message.contains(&creds.token_endpoint), "{message}");
        assert!(!message.contains("hunter2"), "{message}");
    }
}
