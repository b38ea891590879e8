//! Token introspection (RFC 7662): the inbound proxy sends the identity provider a request
//! to learn whether a presented access token is active, authenticating as its own
//! validator client. Results are cached under a hash of the token (RFC 7662 section 4
//! lets a resource server cache them): an active result until the earlier of the
//! configured maximum and the token's `exp`, an inactive one only when configured.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use reqwest::StatusCode;
use sha2::{Digest, Sha256};

use super::error_response::OAuthError;
use super::exchange::{self, ClientAuth, ExchangeError};
use super::{ClientAuthMethod, ClientId, token_fingerprint};
use crate::config::secret::Secret;

/// The introspection endpoint and the validator client that calls it.
#[derive(Clone, Debug)]
pub struct IntrospectionEndpoint {
    /// URL of the identity provider's introspection endpoint.
    pub url: String,
    /// The validator's own client id, not the id of the client that owns the token.
    pub client_id: ClientId,
    pub client_secret: Secret,
    pub auth_method: ClientAuthMethod,
}

/// The introspection response of RFC 7662 section 2.2. Members other than `active` are
/// optional, and an inactive token usually carries none of them.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Introspection {
    pub active: bool,
    /// Space-separated scopes granted to the token.
    #[serde(default)]
    pub scope: Option<String>,
    /// Client the token was issued to.
    #[serde(default)]
    pub client_id: Option<String>,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub token_type: Option<String>,
    /// Expiry, in seconds since the Unix epoch.
    #[serde(default)]
    pub exp: Option<u64>,
    /// Issue time, in seconds since the Unix epoch.
    #[serde(default)]
    pub iat: Option<u64>,
    /// Time before which the token must not be accepted, in seconds since the Unix epoch.
    #[serde(default)]
    pub nbf: Option<u64>,
    #[serde(default)]
    pub sub: Option<String>,
    /// Audiences. The response may carry one string or an array, both become a list.
    #[serde(default, deserialize_with = "one_or_many")]
    pub aud: Vec<String>,
    #[serde(default)]
    pub iss: Option<String>,
    #[serde(default)]
    pub jti: Option<String>,
}

impl Introspection {
    /// Returns the granted scopes, one item per space-separated scope.
    pub fn scopes(&self) -> impl Iterator<Item = &str> {
        self.scope.as_deref().unwrap_or("").split_whitespace()
    }

    /// Checks that every scope in `required` was granted. Returns true for an empty
    /// `required`.
    pub fn has_scopes(&self, required: &[String]) -> bool {
        super::grants_scopes(self.scope.as_deref(), required)
    }
}

fn one_or_many<'de, D>(deserializer: D) -> Result<Vec<String>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }

    Ok(match serde::Deserialize::deserialize(deserializer)? {
        OneOrMany::One(audience) => vec![audience],
        OneOrMany::Many(audiences) => audiences,
    })
}

/// Failure of an introspection request. Messages name the URL and the
/// validator client, never its secret or the token.
#[derive(Clone, Debug, thiserror::Error)]
pub enum IntrospectionError {
    #[error(
        "introspection request to {url} as client {client_id} failed: {kind}; check the URL \
         and that the identity provider is reachable from the node"
    )]
    Transport {
        url: String,
        client_id: ClientId,
        kind: &'static str,
        #[source]
        source: Arc<reqwest::Error>,
    },
    #[error(
        "introspection endpoint {url} rejected client {client_id} with HTTP {status}: {error}; {}",
        .error.hint()
    )]
    Rejected {
        url: String,
        client_id: ClientId,
        status: StatusCode,
        error: OAuthError,
    },
    #[error(
        "introspection endpoint {url} sent client {client_id} an invalid response (HTTP \
         {status}): {reason}; check that the URL is the provider's introspection endpoint"
    )]
    InvalidResponse {
        url: String,
        client_id: ClientId,
        status: StatusCode,
        reason: String,
    },
}

impl IntrospectionError {
    fn from_exchange(endpoint: &IntrospectionEndpoint, failure: ExchangeError) -> Self {
        let url = endpoint.url.clone();
        let client_id = endpoint.client_id.clone();
        match failure {
            ExchangeError::Transport { kind, source } => IntrospectionError::Transport {
                url,
                client_id,
                kind,
                source: Arc::new(source),
            },
            ExchangeError::Rejected { status, error } => IntrospectionError::Rejected {
                url,
                client_id,
                status,
                error,
            },
            ExchangeError::NotOAuthError { status } => IntrospectionError::InvalidResponse {
                url,
                client_id,
                status,
                reason: "the body is not an OAuth error response".to_string(),
            },
        }
    }
}

/// How long introspection results are kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CachePolicy {
    /// Maximum time an `active: true` result is kept. The entry ends earlier when the
    /// token's `exp` comes first. Zero disables the cache.
    pub max_ttl: Duration,
    /// Time an `active: false` result is kept. Zero keeps none.
    pub negative_ttl: Duration,
}

impl CachePolicy {
    /// Returns how long `introspection`, received at `now`, may be reused.
    fn ttl(&self, introspection: &Introspection, now: SystemTime) -> Duration {
        if !introspection.active {
            return self.negative_ttl;
        }
        let Some(exp) = introspection.exp else {
            return self.max_ttl;
        };
        let now = now.duration_since(UNIX_EPOCH).unwrap_or_default();
        let until_exp = Duration::from_secs(exp).saturating_sub(now);
        self.max_ttl.min(until_exp)
    }
}

/// Most introspection results kept at once, across all validators.
const CACHE_CAPACITY: u64 = 100_000;

/// Cache key: SHA-256 of the endpoint, the validator client and the token, so the cache
/// never contains a token.
type CacheKey = [u8; 32];

#[derive(Clone)]
struct CacheEntry {
    introspection: Arc<Introspection>,
    ttl: Duration,
}

struct EntryTtl;

impl moka::Expiry<CacheKey, CacheEntry> for EntryTtl {
    fn expire_after_create(
        &self,
        _key: &CacheKey,
        entry: &CacheEntry,
        _now: std::time::Instant,
    ) -> Option<Duration> {
        Some(entry.ttl)
    }
}

/// Counters of the introspection cache, read by tests and ready to export as metrics.
#[derive(Debug, Default)]
pub struct IntrospectionStats {
    /// Results served from the cache.
    pub cache_hits: AtomicU64,
    /// Introspection requests sent.
    pub requests: AtomicU64,
}

/// Sends introspection requests and caches their results. Cloning shares the HTTP
/// connection pool and the cache.
// NOTE: a JWT access token is not checked here, because oidc-provider rejects its
// introspection; `token_format: jwt` checks it with the issuer's keys instead.
#[derive(Clone)]
pub struct Introspector {
    http: reqwest::Client,
    cache: moka::future::Cache<CacheKey, CacheEntry>,
    pub stats: Arc<IntrospectionStats>,
}

impl Introspector {
    /// Creates an introspector that sends its requests with `http`. Timeouts are those
    /// configured on `http`.
    pub fn new(http: reqwest::Client) -> Self {
        Introspector {
            http,
            cache: moka::future::Cache::builder()
                .max_capacity(CACHE_CAPACITY)
                .expire_after(EntryTtl)
                .build(),
            stats: Arc::new(IntrospectionStats::default()),
        }
    }

    /// Returns the introspection result for `token`, from the cache when `policy` allows
    /// one. Concurrent calls for the same uncached token share one request. Failed
    /// requests are never cached.
    pub async fn introspect_cached(
        &self,
        endpoint: &IntrospectionEndpoint,
        token: &str,
        policy: CachePolicy,
    ) -> Result<Arc<Introspection>, IntrospectionError> {
        let key = cache_key(endpoint, token);
        if let Some(entry) = self.cache.get(&key).await {
            self.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(entry.introspection);
        }
        let entry = self
            .cache
            .try_get_with(key, async {
                let introspection = self.introspect(endpoint, token).await?;
                let ttl = policy.ttl(&introspection, SystemTime::now());
                Ok::<_, IntrospectionError>(CacheEntry {
                    introspection: Arc::new(introspection),
                    ttl,
                })
            })
            .await
            .map_err(|shared| (*shared).clone())?;
        Ok(entry.introspection)
    }

    /// Sends an introspection request for `token` to `endpoint`. An unknown, expired or
    /// revoked token is not an error: it returns an [`Introspection`] with `active: false`.
    pub async fn introspect(
        &self,
        endpoint: &IntrospectionEndpoint,
        token: &str,
    ) -> Result<Introspection, IntrospectionError> {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let form = vec![
            ("token", token.to_string()),
            ("token_type_hint", "access_token".to_string()),
        ];
        let client = ClientAuth {
            id: &endpoint.client_id,
            secret: &endpoint.client_secret,
            method: endpoint.auth_method,
        };
        let body = exchange::post_form(&self.http, &endpoint.url, form, client)
            .await
            .map_err(|failure| IntrospectionError::from_exchange(endpoint, failure))?;

        let introspection =
            parse_introspection(&body).map_err(|reason| IntrospectionError::InvalidResponse {
                url: endpoint.url.clone(),
                client_id: endpoint.client_id.clone(),
                status: StatusCode::OK,
                reason,
            })?;
        tracing::debug!(
            client.id = %endpoint.client_id,
            token.fingerprint = %token_fingerprint(token),
            token.active = introspection.active,
            token.client_id = introspection.client_id.as_deref().unwrap_or(""),
            "token introspected"
        );
        Ok(introspection)
    }
}

fn cache_key(endpoint: &IntrospectionEndpoint, token: &str) -> CacheKey {
    let mut hasher = Sha256::new();
    for part in [endpoint.url.as_str(), endpoint.client_id.0.as_str(), token] {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part.as_bytes());
    }
    hasher.finalize().into()
}

fn parse_introspection(body: &[u8]) -> Result<Introspection, String> {
    serde_json::from_slice(body)
        .map_err(|e| format!("the body is not an introspection response ({e})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn active_response_parses() {
        let body = br#"{"active":true,"client_id":"frontend","exp":1796414909,"iat":1796414609,
            "iss":"http://127.0.0.1:1","aud":"urn:tokenmesh:mesh","scope":"read admin",
            "token_type":"Bearer"}"#;
        let introspection = parse_introspection(body).unwrap();
        assert!(introspection.active);
        assert_eq!(introspection.client_id.as_deref(), Some("frontend"));
        assert_eq!(introspection.exp, Some(1796414909));
        assert_eq!(introspection.aud, vec!["urn:tokenmesh:mesh".to_string()]);
        assert_eq!(
            introspection.scopes().collect::<Vec<_>>(),
            ["read", "admin"]
        );
    }

    #[test]
    fn audience_array_parses() {
        let body = br#"{"active":true,"aud":["a","b"]}"#;
        let introspection = parse_introspection(body).unwrap();
        assert_eq!(introspection.aud, vec!["a".to_string(), "b".to_string()]);
    }

    #[test]
    fn inactive_response_parses() {
        let introspection = parse_introspection(br#"{"active":false}"#).unwrap();
        assert!(!introspection.active);
        assert!(introspection.aud.is_empty());
        assert_eq!(introspection.scopes().count(), 0);
    }

    #[test]
    fn missing_active_rejected() {
        let reason = parse_introspection(br#"{"client_id":"frontend"}"#).unwrap_err();
        assert!(reason.contains("active"), "{reason}");
        assert!(parse_introspection(b"<html></html>").is_err());
    }

    #[test]
    fn has_scopes_requires_all() {
        let introspection =
            parse_introspection(br#"{"active":true,"scope":"read admin"}"#).unwrap();
        let scopes = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(introspection.has_scopes(&scopes(&[])));
        assert!(introspection.has_scopes(&scopes(&["admin"])));
        assert!(introspection.has_scopes(&scopes(&["read", "admin"])));
        assert!(!introspection.has_scopes(&scopes(&["read", "write"])));
        // A scope is matched whole, never as a prefix of a granted one.
        assert!(!introspection.has_scopes(&scopes(&["adm"])));
    }

    #[test]
    fn has_scopes_without_scope_member() {
        let introspection = parse_introspection(br#"{"active":true}"#).unwrap();
        assert!(introspection.has_scopes(&[]));
        assert!(!introspection.has_scopes(&["read".to_string()]));
    }

    fn policy(max_secs: u64, negative_secs: u64) -> CachePolicy {
        CachePolicy {
            max_ttl: Duration::from_secs(max_secs),
            negative_ttl: Duration::from_secs(negative_secs),
        }
    }

    #[test]
    fn cache_ttl_ends_at_exp_or_maximum() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let with_exp = |exp| {
            parse_introspection(format!(r#"{{"active":true,"exp":{exp}}}"#).as_bytes()).unwrap()
        };
        assert_eq!(
            policy(60, 0).ttl(&with_exp(1_000_010), now),
            Duration::from_secs(10)
        );
        assert_eq!(
            policy(60, 0).ttl(&with_exp(1_000_600), now),
            Duration::from_secs(60)
        );
        assert_eq!(policy(60, 0).ttl(&with_exp(999_000), now), Duration::ZERO);
        let no_exp = parse_introspection(br#"{"active":true}"#).unwrap();
        assert_eq!(policy(60, 0).ttl(&no_exp, now), Duration::from_secs(60));
        assert_eq!(policy(0, 0).ttl(&with_exp(1_000_600), now), Duration::ZERO);
    }

    #[test]
    fn cache_ttl_of_inactive_is_negative_ttl() {
        let now = SystemTime::now();
        let inactive = parse_introspection(br#"{"active":false}"#).unwrap();
        assert_eq!(policy(60, 0).ttl(&inactive, now), Duration::ZERO);
        assert_eq!(policy(60, 5).ttl(&inactive, now), Duration::from_secs(5));
    }

    #[test]
    fn cache_key_depends_on_token_and_endpoint() {
        let endpoint = |url: &str| IntrospectionEndpoint {
            url: url.to_string(),
            client_id: ClientId("validator".into()),
            client_secret: Secret::new("s", "test"),
            auth_method: ClientAuthMethod::ClientSecretBasic,
        };
        let a = endpoint("http://127.0.0.1:1/introspect");
        let b = endpoint("http://127.0.0.1:2/introspect");
        assert_eq!(cache_key(&a, "token-1"), cache_key(&a, "token-1"));
        assert_ne!(cache_key(&a, "token-1"), cache_key(&a, "token-2"));
        assert_ne!(cache_key(&a, "token-1"), cache_key(&b, "token-1"));
        // The key is a digest: the token's bytes do not appear in it.
        let key = cache_key(&a, "token-1");
        assert!(!key.windows(7).any(|w| w == b"token-1"));
    }

    /// An introspection endpoint on 127.0.0.1 that responds to every request with `body`
    /// and `status`, and counts the requests.
    struct Endpoint {
        url: String,
        requests: Arc<AtomicU64>,
        answer: Arc<std::sync::Mutex<(u16, String)>>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Endpoint {
        async fn start(status: u16, body: &str) -> Endpoint {
            use hyper::{Response, service::service_fn};
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}/introspect", listener.local_addr().unwrap());
            let requests = Arc::new(AtomicU64::new(0));
            let answer = Arc::new(std::sync::Mutex::new((status, body.to_string())));
            let (counted, answered) = (requests.clone(), answer.clone());
            let task = tokio::spawn(async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let (counted, answered) = (counted.clone(), answered.clone());
                    tokio::spawn(async move {
                        let service = service_fn(move |_request| {
                            counted.fetch_add(1, Ordering::SeqCst);
                            let (status, body) = answered.lock().unwrap().clone();
                            async move {
                                Response::builder()
                                    .status(status)
                                    .header("content-type", "application/json")
                                    .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                            }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                            .await;
                    });
                }
            });
            Endpoint {
                url,
                requests,
                answer,
                task,
            }
        }

        fn endpoint(&self) -> IntrospectionEndpoint {
            IntrospectionEndpoint {
                url: self.url.clone(),
                client_id: ClientId("validator".into()),
                client_secret: Secret::new("s", "test"),
                auth_method: ClientAuthMethod::ClientSecretBasic,
            }
        }

        fn requests(&self) -> u64 {
            self.requests.load(Ordering::SeqCst)
        }

        fn set_answer(&self, status: u16, body: &str) {
            *self.answer.lock().unwrap() = (status, body.to_string());
        }
    }

    impl Drop for Endpoint {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    fn active_until(exp: u64) -> String {
        format!(r#"{{"active":true,"client_id":"frontend","exp":{exp}}}"#)
    }

    fn unix_now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    #[tokio::test]
    async fn active_result_cached_until_ttl() {
        let server = Endpoint::start(200, &active_until(unix_now() + 300)).await;
        let introspector = Introspector::new(reqwest::Client::new());
        let policy = CachePolicy {
            max_ttl: Duration::from_millis(300),
            negative_ttl: Duration::ZERO,
        };
        for _ in 0..3 {
            let result = introspector
                .introspect_cached(&server.endpoint(), "token-a", policy)
                .await
                .unwrap();
            assert!(result.active);
        }
        assert_eq!(server.requests(), 1);
        assert_eq!(introspector.stats.cache_hits.load(Ordering::Relaxed), 2);

        // Another token is another entry.
        introspector
            .introspect_cached(&server.endpoint(), "token-b", policy)
            .await
            .unwrap();
        assert_eq!(server.requests(), 2);

        // After the TTL the provider is asked again and its new response is used.
        server.set_answer(200, r#"{"active":false}"#);
        tokio::time::sleep(Duration::from_millis(400)).await;
        let result = introspector
            .introspect_cached(&server.endpoint(), "token-a", policy)
            .await
            .unwrap();
        assert!(!result.active);
        assert_eq!(server.requests(), 3);
    }

    #[tokio::test]
    async fn inactive_result_cached_only_when_configured() {
        let server = Endpoint::start(200, r#"{"active":false}"#).await;
        let introspector = Introspector::new(reqwest::Client::new());
        let no_negative = CachePolicy {
            max_ttl: Duration::from_secs(60),
            negative_ttl: Duration::ZERO,
        };
        for _ in 0..2 {
            introspector
                .introspect_cached(&server.endpoint(), "token", no_negative)
                .await
                .unwrap();
        }
        assert_eq!(server.requests(), 2);

        let negative = CachePolicy {
            negative_ttl: Duration::from_secs(60),
            ..no_negative
        };
        for _ in 0..2 {
            introspector
                .introspect_cached(&server.endpoint(), "other", negative)
                .await
                .unwrap();
        }
        assert_eq!(server.requests(), 3);
    }

    #[tokio::test]
    async fn entry_ends_at_token_expiry() {
        // The token expires within a second, long before the configured maximum.
        let server = Endpoint::start(200, &active_until(unix_now() + 1)).await;
        let introspector = Introspector::new(reqwest::Client::new());
        let policy = CachePolicy {
            max_ttl: Duration::from_secs(600),
            negative_ttl: Duration::ZERO,
        };
        introspector
            .introspect_cached(&server.endpoint(), "token", policy)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(1100)).await;
        introspector
            .introspect_cached(&server.endpoint(), "token", policy)
            .await
            .unwrap();
        assert_eq!(server.requests(), 2);
    }

    #[tokio::test]
    async fn failures_not_cached() {
        let server = Endpoint::start(500, "oops").await;
        let introspector = Introspector::new(reqwest::Client::new());
        let policy = CachePolicy {
            max_ttl: Duration::from_secs(60),
            negative_ttl: Duration::from_secs(60),
        };
        for _ in 0..2 {
            let error = introspector
                .introspect_cached(&server.endpoint(), "token", policy)
                .await
                .unwrap_err();
            assert!(error.to_string().contains(&server.url), "{error}");
        }
        assert_eq!(server.requests(), 2);

        server.set_answer(200, &active_until(unix_now() + 300));
        let result = introspector
            .introspect_cached(&server.endpoint(), "token", policy)
            .await
            .unwrap();
        assert!(result.active);
    }

    #[tokio::test]
    async fn concurrent_misses_share_one_request() {
        let server = Endpoint::start(200, &active_until(unix_now() + 300)).await;
        let introspector = Introspector::new(reqwest::Client::new());
        let policy = CachePolicy {
            max_ttl: Duration::from_secs(60),
            negative_ttl: Duration::ZERO,
        };
        let endpoint = server.endpoint();
        let calls = (0..10).map(|_| introspector.introspect_cached(&endpoint, "token", policy));
        for result in futures::future::join_all(calls).await {
            assert!(result.unwrap().active);
        }
        assert_eq!(server.requests(), 1);
    }
}
