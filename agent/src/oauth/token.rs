//! Access tokens from the client-credentials grant (RFC 6749 section 4.4), cached per
//! token endpoint, client, credential, scope set, audience and resource set.
//!
//! A cached token is used until it expires. From `refresh_skew` before that, each use
//! starts a refresh in the background, unless one is running or the previous request
//! ended less than the client's minimum request interval ago. So a provider that returns
//! the same token again is asked at most once per interval. Callers wait only when no
//! unexpired token is cached.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::StatusCode;

use super::assertion::{AssertionError, AssertionSigner};
use super::error_response::OAuthError;
use super::exchange::ExchangeError;
use super::grant;
use super::retry::RetryPolicy;
use super::{ClientAuthMethod, ClientId, token_fingerprint};
use crate::config::secret::Secret;

/// Lifetime assumed for a token whose response has no `expires_in`. RFC 6749 section 5.1
/// leaves the lifetime to the provider's documentation then, so the agent assumes a short
/// one: a token kept too long is rejected upstream, while one renewed too early costs one
/// extra token request.
pub const DEFAULT_EXPIRES_IN: Duration = Duration::from_secs(60);

/// Minimum time between two token requests for one cache key, unless the config sets
/// another.
pub const DEFAULT_MIN_REQUEST_INTERVAL: Duration = Duration::from_secs(2);

/// Number of cache keys above which keys without an unexpired token are dropped. Keys
/// come from the config, so this bound is reached only by very large configs.
const CACHE_CAPACITY: usize = 10_000;

/// Client authentication method at the token endpoint, named as in the
/// `token_endpoint_auth_method` client metadata (RFC 7591 section 2).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenEndpointAuthMethod {
    /// HTTP Basic authentication with the client secret (RFC 6749 section 2.3.1).
    #[default]
    ClientSecretBasic,
    /// The client secret in the form body (RFC 6749 section 2.3.1).
    ClientSecretPost,
    /// A JWT signed with the client's private key (RFC 7523 section 2.2).
    PrivateKeyJwt,
}

/// Client credential presented at the token endpoint.
#[derive(Clone, Debug)]
pub enum ClientAuthentication {
    /// A client secret, sent with `method`.
    Secret {
        secret: Secret,
        method: ClientAuthMethod,
    },
    /// A JWT assertion signed for each request (`private_key_jwt`).
    PrivateKeyJwt(Arc<AssertionSigner>),
}

impl ClientAuthentication {
    /// Returns a fingerprint of the credential, so clients with the same id but another
    /// secret or key never share a cached token.
    fn fingerprint(&self) -> String {
        match self {
            ClientAuthentication::Secret { secret, .. } => token_fingerprint(secret.expose()),
            ClientAuthentication::PrivateKeyJwt(signer) => signer.fingerprint().to_string(),
        }
    }
}

/// Client credentials of one workload identity, with the token to request.
#[derive(Clone, Debug)]
pub struct ClientCredentials {
    /// URL of the identity provider's token endpoint.
    pub token_endpoint: String,
    pub client_id: ClientId,
    pub authentication: ClientAuthentication,
    /// Scopes to request. Order and duplicates do not matter, and an empty list sends no
    /// `scope` parameter, so the provider grants the client's default scopes.
    pub scopes: Vec<String>,
    /// `audience` parameter, for providers that select the API by it.
    pub audience: Option<String>,
    /// Resource indicators (RFC 8707): absolute URIs of the APIs the token is for.
    pub resources: Vec<String>,
    pub retry: RetryPolicy,
    /// Minimum time from the end of one token request to the start of the next for the
    /// same cache key. Only a key with no unexpired token and no failed request is
    /// requested regardless.
    pub min_request_interval: Duration,
}

impl ClientCredentials {
    /// Credentials with no scope, audience or resource and the default retry policy and
    /// request interval.
    pub fn new(
        token_endpoint: impl Into<String>,
        client_id: ClientId,
        authentication: ClientAuthentication,
    ) -> Self {
        ClientCredentials {
            token_endpoint: token_endpoint.into(),
            client_id,
            authentication,
            scopes: Vec::new(),
            audience: None,
            resources: Vec::new(),
            retry: RetryPolicy::default(),
            min_request_interval: DEFAULT_MIN_REQUEST_INTERVAL,
        }
    }
}

/// An access token and the instant after which the agent stops using it.
pub struct AccessToken {
    value: String,
    expires_at: Instant,
    scope: Option<String>,
    fingerprint: String,
}

impl AccessToken {
    pub(crate) fn new(
        fingerprint: String,
        value: String,
        expires_at: Instant,
        scope: Option<String>,
    ) -> Self {
        AccessToken {
            value,
            expires_at,
            scope,
            fingerprint,
        }
    }

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
/// secret, the key or a token.
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
        "token endpoint {endpoint} answered client {client_id} with HTTP {status}; the \
         identity provider is failing or overloaded, check its health and logs"
    )]
    ServerError {
        endpoint: String,
        client_id: ClientId,
        status: StatusCode,
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
    #[error(
        "token request to {endpoint} for client {client_id} gave no token within \
         {timeout:?} ({attempts} attempts); check that the identity provider responds, or \
         raise token_request_timeout"
    )]
    TimedOut {
        endpoint: String,
        client_id: ClientId,
        timeout: Duration,
        attempts: u32,
    },
    #[error("cannot sign the client assertion of client {client_id}: {source}")]
    Assertion {
        client_id: ClientId,
        #[source]
        source: Arc<AssertionError>,
    },
}

impl TokenError {
    pub(crate) fn from_exchange(
        endpoint: &str,
        client_id: &ClientId,
        failure: ExchangeError,
    ) -> Self {
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
            ExchangeError::NotOAuthError { status } if status.is_server_error() => {
                TokenError::ServerError {
                    endpoint,
                    client_id,
                    status,
                }
            }
            ExchangeError::NotOAuthError { status } => TokenError::InvalidResponse {
                endpoint,
                client_id,
                status,
                reason: "the body is not an OAuth error response".to_string(),
            },
        }
    }

    /// True for failures that another attempt may not repeat: no response, or a 5xx
    /// status. A 4xx such as `invalid_client` repeats until the config changes.
    pub fn is_retryable(&self) -> bool {
        match self {
            TokenError::Transport { .. } | TokenError::ServerError { .. } => true,
            TokenError::Rejected { status, .. } => status.is_server_error(),
            TokenError::InvalidResponse { .. }
            | TokenError::TimedOut { .. }
            | TokenError::Assertion { .. } => false,
        }
    }
}

/// Gets access tokens and shares them between connections of the same identity.
///
/// At most one token request runs per cache key, and concurrent callers that need a
/// token wait for it. A failed request is not retried for its key within the minimum
/// request interval: callers in that time get the same error at once.
#[derive(Clone)]
pub struct TokenSource {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    refresh_skew: Duration,
    entries: Mutex<HashMap<CacheKey, Arc<Entry>>>,
}

/// The cached state of one key.
#[derive(Default)]
struct Entry {
    state: Mutex<EntryState>,
    /// Held while a token request for this key runs.
    request: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct EntryState {
    token: Option<Arc<AccessToken>>,
    /// When the latest token request ended, successful or not.
    last_request: Option<Instant>,
    /// The latest request's error, cleared by a success.
    last_error: Option<TokenError>,
    /// A background refresh is running.
    refreshing: bool,
}

/// Next step of a caller, chosen from the cached state.
#[derive(Debug)]
enum Lookup {
    Use(Arc<AccessToken>),
    /// Use the token and start a background refresh; `refreshing` is set already.
    UseAndRefresh(Arc<AccessToken>),
    /// No unexpired token, and a request failed within the interval.
    Fail(TokenError),
    /// No unexpired token: request one and wait for it.
    Request,
}

impl EntryState {
    fn lookup(&mut self, now: Instant, refresh_skew: Duration, min_interval: Duration) -> Lookup {
        let may_request = self
            .last_request
            .is_none_or(|ended| now.saturating_duration_since(ended) >= min_interval);
        if let Some(token) = &self.token
            && now < token.expires_at
        {
            let refresh_at = token.expires_at.checked_sub(refresh_skew).unwrap_or(now);
            if now < refresh_at || self.refreshing || !may_request {
                return Lookup::Use(token.clone());
            }
            self.refreshing = true;
            return Lookup::UseAndRefresh(token.clone());
        }
        match &self.last_error {
            Some(error) if !may_request => Lookup::Fail(error.clone()),
            _ => Lookup::Request,
        }
    }

    /// Stores the outcome of a request that ended at `ended`.
    fn store(&mut self, ended: Instant, result: &Result<Arc<AccessToken>, TokenError>) {
        self.last_request = Some(ended);
        match result {
            Ok(token) => {
                self.token = Some(newest(self.token.take(), token.clone()));
                self.last_error = None;
            }
            Err(error) => self.last_error = Some(error.clone()),
        }
    }
}

/// Returns the token to keep after a refresh. When the provider returned the token the
/// cache already holds, the earlier expiry stays, because a provider that repeats a
/// token may repeat its original `expires_in` as well.
fn newest(old: Option<Arc<AccessToken>>, new: Arc<AccessToken>) -> Arc<AccessToken> {
    match old {
        Some(old) if old.value == new.value && old.expires_at <= new.expires_at => old,
        _ => new,
    }
}

impl TokenSource {
    /// Creates a token source that sends its requests with `http` and refreshes tokens
    /// `refresh_skew` before they expire. Timeouts per request are those configured on
    /// `http`.
    pub fn new(http: reqwest::Client, refresh_skew: Duration) -> Self {
        TokenSource {
            inner: Arc::new(Inner {
                http,
                refresh_skew,
                entries: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Returns an unexpired token for `creds`, from the cache or from the token endpoint.
    pub async fn token(&self, creds: &ClientCredentials) -> Result<Arc<AccessToken>, TokenError> {
        let key = CacheKey::new(creds);
        let entry = self.entry(&key);
        match self.lookup(&entry, creds) {
            Lookup::Use(token) => return Ok(token),
            Lookup::UseAndRefresh(token) => {
                self.spawn_refresh(entry, creds.clone(), key);
                return Ok(token);
            }
            Lookup::Fail(error) => return Err(error),
            Lookup::Request => {}
        }

        let _running = entry.request.lock().await;
        // Another caller may have finished a request while this one waited for the lock.
        match self.lookup(&entry, creds) {
            Lookup::Use(token) => return Ok(token),
            Lookup::UseAndRefresh(token) => {
                lock(&entry.state).refreshing = false;
                return Ok(token);
            }
            Lookup::Fail(error) => return Err(error),
            Lookup::Request => {}
        }
        let result = grant::request_token(&self.inner.http, creds, &key).await;
        lock(&entry.state).store(Instant::now(), &result);
        if let Err(error) = &result {
            tracing::warn!(
                client.id = %creds.client_id,
                error = %error,
                "no access token; requests that need one fail until a token request succeeds"
            );
        }
        result
    }

    /// Drops the cached token for `creds`, so the next call requests a new one. Used when
    /// an upstream rejects a token that has not expired, for example after revocation.
    pub async fn invalidate(&self, creds: &ClientCredentials) {
        let key = CacheKey::new(creds);
        if let Some(entry) = lock(&self.inner.entries).get(&key) {
            lock(&entry.state).token = None;
        }
    }

    fn lookup(&self, entry: &Entry, creds: &ClientCredentials) -> Lookup {
        lock(&entry.state).lookup(
            Instant::now(),
            self.inner.refresh_skew,
            creds.min_request_interval,
        )
    }

    fn entry(&self, key: &CacheKey) -> Arc<Entry> {
        let mut entries = lock(&self.inner.entries);
        if let Some(entry) = entries.get(key) {
            return entry.clone();
        }
        if entries.len() >= CACHE_CAPACITY {
            let now = Instant::now();
            entries.retain(|_, entry| {
                Arc::strong_count(entry) > 1
                    || lock(&entry.state)
                        .token
                        .as_ref()
                        .is_some_and(|token| now < token.expires_at)
            });
        }
        entries.entry(key.clone()).or_default().clone()
    }

    /// Requests a new token while callers keep using the current one. A failure keeps the
    /// current token until it expires.
    fn spawn_refresh(&self, entry: Arc<Entry>, creds: ClientCredentials, key: CacheKey) {
        let http = self.inner.http.clone();
        tokio::spawn(async move {
            let _running = entry.request.lock().await;
            let result = grant::request_token(&http, &creds, &key).await;
            let mut state = lock(&entry.state);
            state.refreshing = false;
            let previous = state.token.as_ref().map(|token| token.fingerprint.clone());
            state.store(Instant::now(), &result);
            match &result {
                Ok(token) if previous.as_deref() == Some(token.fingerprint()) => {
                    tracing::debug!(
                        client.id = %creds.client_id,
                        token.fingerprint = token.fingerprint(),
                        "the provider returned the cached token again; it stays in use until it expires"
                    );
                }
                Ok(_) => {}
                Err(error) => tracing::warn!(
                    client.id = %creds.client_id,
                    error = %error,
                    "refreshing the access token failed; the current token stays in use until it expires"
                ),
            }
        });
    }
}

/// Locks `mutex`. A panic while it was held leaves consistent data here, because every
/// critical section only assigns fields, so the poison flag is ignored.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Cache key: tokens are shared only between requests to the same endpoint, for the same
/// client and credential, the same set of scopes, audience and set of resources.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct CacheKey {
    token_endpoint: String,
    client_id: ClientId,
    credential: String,
    /// Sorted and without duplicates, so `["b", "a"]` and `["a", "b", "a"]` share a key.
    scopes: Vec<String>,
    pub(crate) audience: Option<String>,
    /// Sorted and without duplicates.
    pub(crate) resources: Vec<String>,
}

impl CacheKey {
    pub(crate) fn new(creds: &ClientCredentials) -> Self {
        // A configured entry of "a b" is two scopes, as in the `scope` parameter.
        let mut scopes: Vec<String> = creds
            .scopes
            .iter()
            .flat_map(|scope| scope.split_whitespace())
            .map(str::to_string)
            .collect();
        scopes.sort();
        scopes.dedup();
        let mut resources = creds.resources.clone();
        resources.sort();
        resources.dedup();
        CacheKey {
            token_endpoint: creds.token_endpoint.clone(),
            client_id: creds.client_id.clone(),
            credential: creds.authentication.fingerprint(),
            scopes,
            audience: creds.audience.clone().filter(|a| !a.is_empty()),
            resources,
        }
    }

    /// Returns the space-separated `scope` request parameter, or `None` for no scopes.
    pub(crate) fn scope_parameter(&self) -> Option<String> {
        (!self.scopes.is_empty()).then(|| self.scopes.join(" "))
    }
}

#[cfg(test)]
mod tests;
