use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

use super::*;
use crate::oauth::grant::form_parameters;

fn creds(scopes: &[&str]) -> ClientCredentials {
    let mut creds = ClientCredentials::new(
        "http://127.0.0.1:9/token",
        ClientId("frontend".into()),
        ClientAuthentication::Secret {
            secret: Secret::new("hunter2", "test"),
            method: ClientAuthMethod::ClientSecretBasic,
        },
    );
    creds.scopes = scopes.iter().map(|s| s.to_string()).collect();
    creds
}

fn token(value: &str, expires_at: Instant) -> Arc<AccessToken> {
    Arc::new(AccessToken::new(
        token_fingerprint(value),
        value.to_string(),
        expires_at,
        None,
    ))
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
fn cache_key_ignores_resource_order() {
    let mut a = creds(&[]);
    a.resources = vec!["https://b.test/".into(), "https://a.test/".into()];
    let mut b = creds(&[]);
    b.resources = vec![
        "https://a.test/".into(),
        "https://b.test/".into(),
        "https://a.test/".into(),
    ];
    assert_eq!(CacheKey::new(&a), CacheKey::new(&b));
}

#[test]
fn cache_key_separates_every_parameter() {
    let base = CacheKey::new(&creds(&["read"]));

    let mut other_client = creds(&["read"]);
    other_client.client_id = ClientId("backend".into());
    assert_ne!(base, CacheKey::new(&other_client));

    let mut other_endpoint = creds(&["read"]);
    other_endpoint.token_endpoint = "http://127.0.0.1:10/token".into();
    assert_ne!(base, CacheKey::new(&other_endpoint));

    let mut other_secret = creds(&["read"]);
    other_secret.authentication = ClientAuthentication::Secret {
        secret: Secret::new("wrong", "test"),
        method: ClientAuthMethod::ClientSecretBasic,
    };
    assert_ne!(base, CacheKey::new(&other_secret));

    let mut audience = creds(&["read"]);
    audience.audience = Some("https://api.test".into());
    assert_ne!(base, CacheKey::new(&audience));

    let mut resource = creds(&["read"]);
    resource.resources = vec!["https://api.test/".into()];
    assert_ne!(base, CacheKey::new(&resource));
    assert_ne!(CacheKey::new(&audience), CacheKey::new(&resource));

    assert_ne!(base, CacheKey::new(&creds(&["read", "write"])));
    assert_ne!(base, CacheKey::new(&creds(&[])));
}

#[test]
fn cache_key_ignores_auth_method() {
    // The method changes how the secret travels, not which token the client gets.
    let mut post = creds(&["read"]);
    post.authentication = ClientAuthentication::Secret {
        secret: Secret::new("hunter2", "test"),
        method: ClientAuthMethod::ClientSecretPost,
    };
    assert_eq!(CacheKey::new(&creds(&["read"])), CacheKey::new(&post));
}

#[test]
fn empty_scopes_send_no_parameter() {
    assert_eq!(CacheKey::new(&creds(&[])).scope_parameter(), None);
    assert_eq!(CacheKey::new(&creds(&["", " "])).scope_parameter(), None);
}

#[test]
fn form_carries_scope_audience_resources() {
    let mut creds = creds(&["write", "read"]);
    creds.audience = Some("https://api.test".into());
    creds.resources = vec!["https://b.test/".into(), "https://a.test/".into()];
    let form = form_parameters(&CacheKey::new(&creds));
    assert_eq!(
        form,
        [
            ("grant_type", "client_credentials".to_string()),
            ("scope", "read write".to_string()),
            ("audience", "https://api.test".to_string()),
            ("resource", "https://a.test/".to_string()),
            ("resource", "https://b.test/".to_string()),
        ]
    );
}

#[test]
fn form_without_options_has_grant_type_only() {
    let form = form_parameters(&CacheKey::new(&creds(&[])));
    assert_eq!(form, [("grant_type", "client_credentials".to_string())]);
}

const SKEW: Duration = Duration::from_secs(30);
const INTERVAL: Duration = Duration::from_secs(2);

#[test]
fn fresh_token_used_without_refresh() {
    let now = Instant::now();
    let mut state = EntryState {
        token: Some(token("a", now + Duration::from_secs(300))),
        last_request: Some(now),
        ..EntryState::default()
    };
    assert!(matches!(state.lookup(now, SKEW, INTERVAL), Lookup::Use(_)));
    // 270 s later the token is 30 s from expiry: refresh once, keep using it.
    let later = now + Duration::from_secs(270);
    assert!(matches!(
        state.lookup(later, SKEW, INTERVAL),
        Lookup::UseAndRefresh(_)
    ));
    assert!(state.refreshing);
    assert!(matches!(
        state.lookup(later, SKEW, INTERVAL),
        Lookup::Use(_)
    ));
}

#[test]
fn token_used_until_real_expiry() {
    let now = Instant::now();
    let expires_at = now + Duration::from_secs(10);
    let mut state = EntryState {
        token: Some(token("a", expires_at)),
        last_request: Some(now),
        refreshing: true,
        ..EntryState::default()
    };
    let just_before = expires_at - Duration::from_millis(1);
    assert!(matches!(
        state.lookup(just_before, SKEW, INTERVAL),
        Lookup::Use(_)
    ));
    assert!(matches!(
        state.lookup(expires_at, SKEW, INTERVAL),
        Lookup::Request
    ));
}

#[test]
fn refresh_waits_for_min_interval() {
    let now = Instant::now();
    // A token shorter-lived than the skew is in its refresh window from the start.
    let mut state = EntryState {
        token: Some(token("a", now + Duration::from_secs(20))),
        last_request: Some(now),
        ..EntryState::default()
    };
    let soon = now + Duration::from_millis(1999);
    assert!(matches!(state.lookup(soon, SKEW, INTERVAL), Lookup::Use(_)));
    assert!(!state.refreshing);
    let after = now + INTERVAL;
    assert!(matches!(
        state.lookup(after, SKEW, INTERVAL),
        Lookup::UseAndRefresh(_)
    ));
}

#[test]
fn recent_error_fails_fast() {
    let now = Instant::now();
    let error = TokenError::InvalidResponse {
        endpoint: "http://127.0.0.1:9/token".into(),
        client_id: ClientId("frontend".into()),
        status: StatusCode::OK,
        reason: "test".into(),
    };
    let mut state = EntryState {
        last_request: Some(now),
        last_error: Some(error),
        ..EntryState::default()
    };
    let soon = now + Duration::from_secs(1);
    assert!(matches!(
        state.lookup(soon, SKEW, INTERVAL),
        Lookup::Fail(_)
    ));
    assert!(matches!(
        state.lookup(now + INTERVAL, SKEW, INTERVAL),
        Lookup::Request
    ));
}

#[test]
fn empty_state_requests() {
    let mut state = EntryState::default();
    assert!(matches!(
        state.lookup(Instant::now(), SKEW, INTERVAL),
        Lookup::Request
    ));
}

#[test]
fn repeated_token_keeps_earlier_expiry() {
    let now = Instant::now();
    let old = token("same", now + Duration::from_secs(10));
    let repeated = token("same", now + Duration::from_secs(300));
    let kept = newest(Some(old.clone()), repeated);
    assert!(Arc::ptr_eq(&kept, &old));

    let renewed = token("other", now + Duration::from_secs(300));
    let kept = newest(Some(old), renewed.clone());
    assert!(Arc::ptr_eq(&kept, &renewed));
}

#[test]
fn access_token_debug_shows_fingerprint_only() {
    let token = token("very-secret-token", Instant::now());
    let printed = format!("{token:?}");
    assert!(!printed.contains("very-secret-token"));
    assert_eq!(
        printed,
        format!("AccessToken({})", token_fingerprint("very-secret-token"))
    );
}

#[test]
fn retryable_errors_are_transport_and_5xx() {
    let endpoint = "http://127.0.0.1:9/token".to_string();
    let client_id = ClientId("frontend".into());
    let rejected = |status: u16, code: &str| TokenError::Rejected {
        endpoint: endpoint.clone(),
        client_id: client_id.clone(),
        status: StatusCode::from_u16(status).unwrap(),
        error: OAuthError {
            error: code.into(),
            error_description: None,
        },
    };
    assert!(rejected(500, "server_error").is_retryable());
    assert!(rejected(503, "temporarily_unavailable").is_retryable());
    assert!(!rejected(401, "invalid_client").is_retryable());
    assert!(!rejected(400, "invalid_scope").is_retryable());
    assert!(!rejected(429, "slow_down").is_retryable());
    let server = TokenError::ServerError {
        endpoint: endpoint.clone(),
        client_id: client_id.clone(),
        status: StatusCode::BAD_GATEWAY,
    };
    assert!(server.is_retryable());
}

/// One scripted response of [`TokenServer`].
#[derive(Clone)]
struct Reply {
    status: u16,
    body: String,
    delay: Duration,
}

impl Reply {
    fn token(value: &str, expires_in: u64) -> Reply {
        Reply {
            status: 200,
            body: format!(
                r#"{{"access_token":"{value}","token_type":"Bearer","expires_in":{expires_in}}}"#
            ),
            delay: Duration::ZERO,
        }
    }

    fn status(status: u16, body: &str) -> Reply {
        Reply {
            status,
            body: body.to_string(),
            delay: Duration::ZERO,
        }
    }
}

/// A token endpoint on 127.0.0.1 that answers request `n` (from 0) with `script(n)` and
/// counts the requests.
struct TokenServer {
    url: String,
    requests: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl TokenServer {
    async fn start(script: impl Fn(usize) -> Reply + Send + Sync + 'static) -> TokenServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/token", listener.local_addr().unwrap());
        let requests = Arc::new(AtomicUsize::new(0));
        let script = Arc::new(script);
        let counter = requests.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let script = script.clone();
                let counter = counter.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |_request| {
                        let reply = script(counter.fetch_add(1, Ordering::SeqCst));
                        async move {
                            tokio::time::sleep(reply.delay).await;
                            let mut response =
                                http::Response::new(Full::new(Bytes::from(reply.body)));
                            *response.status_mut() = StatusCode::from_u16(reply.status).unwrap();
                            Ok::<_, Infallible>(response)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        TokenServer {
            url,
            requests,
            task,
        }
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    fn creds(&self) -> ClientCredentials {
        let mut creds = creds(&["read"]);
        creds.token_endpoint = self.url.clone();
        creds
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn source(skew: Duration) -> TokenSource {
    TokenSource::new(reqwest::Client::new(), skew)
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
    creds.retry.max_attempts = 1;

    let err = source(SKEW).token(&creds).await.unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, TokenError::Transport { .. }), "{message}");
    assert!(message.contains("frontend"), "{message}");
    assert!(message.contains(&creds.token_endpoint), "{message}");
    assert!(!message.contains("hunter2"), "{message}");
}

#[tokio::test]
async fn server_errors_retried_up_to_max_attempts() {
    let server = TokenServer::start(|_| Reply::status(503, "overloaded")).await;
    let creds = server.creds();

    let err = source(SKEW).token(&creds).await.unwrap_err();

    assert!(matches!(err, TokenError::ServerError { .. }), "{err}");
    assert_eq!(server.requests(), 4);
    assert!(err.to_string().contains("HTTP 503"), "{err}");
}

#[tokio::test]
async fn retry_succeeds_after_server_errors() {
    let server = TokenServer::start(|n| match n {
        0 => Reply::status(500, r#"{"error":"server_error"}"#),
        1 => Reply::status(502, "<html>bad gateway</html>"),
        _ => Reply::token("tok-after-retries", 300),
    })
    .await;

    let token = source(SKEW).token(&server.creds()).await.unwrap();

    assert_eq!(token.secret(), "tok-after-retries");
    assert_eq!(server.requests(), 3);
}

#[tokio::test]
async fn client_errors_not_retried() {
    let server = TokenServer::start(|_| {
        Reply::status(
            401,
            r#"{"error":"invalid_client","error_description":"bad secret"}"#,
        )
    })
    .await;

    let err = source(SKEW).token(&server.creds()).await.unwrap_err();

    assert!(
        matches!(&err, TokenError::Rejected { error, .. } if error.error == "invalid_client"),
        "{err}"
    );
    assert_eq!(server.requests(), 1);
}

#[tokio::test]
async fn max_attempts_bounds_retries() {
    let server = TokenServer::start(|_| Reply::status(500, "")).await;
    let mut creds = server.creds();
    creds.retry.max_attempts = 2;

    source(SKEW).token(&creds).await.unwrap_err();

    assert_eq!(server.requests(), 2);
}

#[tokio::test]
async fn retry_timeout_bounds_total_time() {
    let server = TokenServer::start(|_| Reply {
        delay: Duration::from_secs(30),
        ..Reply::token("late", 300)
    })
    .await;
    let mut creds = server.creds();
    creds.retry.timeout = Duration::from_millis(300);

    let started = Instant::now();
    let err = source(SKEW).token(&creds).await.unwrap_err();

    assert!(
        matches!(err, TokenError::TimedOut { attempts: 1, .. }),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert!(err.to_string().contains("token_request_timeout"), "{err}");
}

#[tokio::test]
async fn failure_held_for_min_interval() {
    let server = TokenServer::start(|n| match n {
        0 => Reply::status(400, r#"{"error":"invalid_scope"}"#),
        _ => Reply::token("tok", 300),
    })
    .await;
    let mut creds = server.creds();
    creds.min_request_interval = Duration::from_millis(300);
    let tokens = source(SKEW);

    tokens.token(&creds).await.unwrap_err();
    let held = tokens.token(&creds).await.unwrap_err();
    assert!(matches!(held, TokenError::Rejected { .. }), "{held}");
    assert_eq!(
        server.requests(),
        1,
        "the error is reused within the interval"
    );

    tokio::time::sleep(Duration::from_millis(350)).await;
    let token = tokens.token(&creds).await.unwrap();
    assert_eq!(token.secret(), "tok");
    assert_eq!(server.requests(), 2);
}

/// Polls `condition` every 10 ms for up to 5 s.
async fn eventually(mut condition: impl FnMut() -> bool) -> bool {
    for _ in 0..500 {
        if condition() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

#[tokio::test]
async fn same_token_again_not_hammered() {
    // The provider repeats one token that expires in 20 s; with a 30 s skew every use
    // falls in the refresh window.
    let server = TokenServer::start(|_| Reply::token("same-token", 20)).await;
    let mut creds = server.creds();
    creds.min_request_interval = Duration::from_millis(200);
    let tokens = source(SKEW);

    let first = tokens.token(&creds).await.unwrap();
    for _ in 0..50 {
        let again = tokens.token(&creds).await.unwrap();
        assert_eq!(again.secret(), "same-token");
    }
    assert_eq!(server.requests(), 1, "no refresh within the interval");

    tokio::time::sleep(Duration::from_millis(250)).await;
    for _ in 0..50 {
        tokens.token(&creds).await.unwrap();
    }
    assert!(eventually(|| server.requests() == 2).await);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(server.requests(), 2, "one refresh per interval");

    // The repeated token keeps its first expiry.
    let kept = tokens.token(&creds).await.unwrap();
    assert_eq!(kept.expires_at(), first.expires_at());
}

#[tokio::test]
async fn refresh_in_background_before_expiry() {
    let server = TokenServer::start(|n| Reply::token(&format!("tok-{n}"), 3)).await;
    let mut creds = server.creds();
    creds.min_request_interval = Duration::from_millis(100);
    let tokens = source(Duration::from_secs(2));

    let first = tokens.token(&creds).await.unwrap();
    assert_eq!(first.secret(), "tok-0");
    tokio::time::sleep(Duration::from_millis(1200)).await;

    // Inside the window the caller still gets the current token at once.
    let during = tokens.token(&creds).await.unwrap();
    assert_eq!(during.secret(), "tok-0");
    assert!(eventually(|| server.requests() == 2).await);

    let renewed = tokens.token(&creds).await.unwrap();
    assert_eq!(renewed.secret(), "tok-1");
    assert!(
        Instant::now() < first.expires_at(),
        "renewed before the old token expired"
    );
}

#[tokio::test]
async fn concurrent_callers_share_one_request() {
    let server = TokenServer::start(|n| Reply {
        delay: Duration::from_millis(100),
        ..Reply::token(&format!("tok-{n}"), 300)
    })
    .await;
    let creds = Arc::new(server.creds());
    let tokens = source(SKEW);

    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let tokens = tokens.clone();
        let creds = creds.clone();
        tasks.spawn(async move { tokens.token(&creds).await.map(|t| t.secret().to_string()) });
    }
    while let Some(joined) = tasks.join_next().await {
        assert_eq!(joined.unwrap().unwrap(), "tok-0");
    }
    assert_eq!(server.requests(), 1);
}

#[tokio::test]
async fn concurrent_callers_share_one_failure() {
    let server = TokenServer::start(|_| Reply {
        delay: Duration::from_millis(100),
        ..Reply::status(401, r#"{"error":"invalid_client"}"#)
    })
    .await;
    let creds = Arc::new(server.creds());
    let tokens = source(SKEW);

    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let tokens = tokens.clone();
        let creds = creds.clone();
        tasks.spawn(async move { tokens.token(&creds).await.is_err() });
    }
    while let Some(joined) = tasks.join_next().await {
        assert!(joined.unwrap());
    }
    assert_eq!(server.requests(), 1);
}

#[tokio::test]
async fn invalidate_forces_new_request() {
    let server = TokenServer::start(|n| Reply::token(&format!("tok-{n}"), 300)).await;
    let creds = server.creds();
    let tokens = source(SKEW);

    assert_eq!(tokens.token(&creds).await.unwrap().secret(), "tok-0");
    tokens.invalidate(&creds).await;
    assert_eq!(tokens.token(&creds).await.unwrap().secret(), "tok-1");
    assert_eq!(server.requests(), 2);
}

#[tokio::test]
async fn failed_refresh_keeps_current_token() {
    let server = TokenServer::start(|n| match n {
        0 => Reply::token("tok-0", 3),
        _ => Reply::status(503, "down"),
    })
    .await;
    let mut creds = server.creds();
    creds.min_request_interval = Duration::from_millis(100);
    creds.retry.max_attempts = 1;
    let tokens = source(Duration::from_secs(2));

    let first = tokens.token(&creds).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // In the refresh window: the refresh starts in the background and fails.
    assert_eq!(tokens.token(&creds).await.unwrap().secret(), "tok-0");
    assert!(eventually(|| server.requests() == 2).await);
    tokio::time::sleep(Duration::from_millis(50)).await;

    let after_failure = tokens.token(&creds).await.unwrap();
    assert_eq!(after_failure.secret(), "tok-0");
    assert!(Instant::now() < first.expires_at());
}
