//! Key set tests against a real HTTP server on 127.0.0.1 that serves a JWKS and the
//! metadata documents, and can be stopped and started again on the same port.

use std::{convert::Infallible, net::SocketAddr, sync::atomic::AtomicBool};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpListener, task::JoinHandle};

use super::*;
use crate::oauth::jwt::tests::{TestSigner, jwks};

struct ServerState {
    addr: SocketAddr,
    jwks: Mutex<String>,
    jwks_requests: AtomicU64,
    /// When false, the metadata documents return 404, so only RFC 8414 paths work.
    openid_discovery: AtomicBool,
}

/// A JWKS and metadata server on 127.0.0.1.
pub(crate) struct JwksServer {
    state: Arc<ServerState>,
    task: Option<JoinHandle<()>>,
}

impl JwksServer {
    pub async fn start(jwks: String) -> JwksServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let state = Arc::new(ServerState {
            addr: listener.local_addr().unwrap(),
            jwks: Mutex::new(jwks),
            jwks_requests: AtomicU64::new(0),
            openid_discovery: AtomicBool::new(true),
        });
        let mut server = JwksServer { state, task: None };
        server.serve(listener);
        server
    }

    fn serve(&mut self, listener: TcpListener) {
        let state = self.state.clone();
        self.task = Some(tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let state = state.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(answer(&state, &request)) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .keep_alive(false)
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        }));
    }

    /// Closes the listener, so new connections are refused.
    pub fn stop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }

    /// Listens again on the same port.
    pub async fn restart(&mut self) {
        self.stop();
        let listener = loop {
            match TcpListener::bind(self.state.addr).await {
                Ok(listener) => break listener,
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        self.serve(listener);
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.state.addr)
    }

    pub fn jwks_url(&self) -> String {
        format!("{}/jwks", self.base_url())
    }

    pub fn set_jwks(&self, jwks: String) {
        *self.state.jwks.lock().unwrap() = jwks;
    }

    pub fn jwks_requests(&self) -> u64 {
        self.state.jwks_requests.load(Ordering::SeqCst)
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn answer(state: &ServerState, request: &Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let base = format!("http://{}", state.addr);
    let json = |body: String| {
        Response::builder()
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap()
    };
    match request.uri().path() {
        "/jwks" => {
            state.jwks_requests.fetch_add(1, Ordering::SeqCst);
            json(state.jwks.lock().unwrap().clone())
        }
        "/.well-known/openid-configuration" if state.openid_discovery.load(Ordering::SeqCst) => {
            json(format!(r#"{{"issuer":"{base}","jwks_uri":"{base}/jwks"}}"#))
        }
        "/.well-known/oauth-authorization-server/tenant" => json(format!(
            r#"{{"issuer":"{base}/tenant","jwks_uri":"{base}/jwks"}}"#
        )),
        _ => Response::builder()
            .status(404)
            .body(Full::new(Bytes::new()))
            .unwrap(),
    }
}

fn config(source: KeySource, min_refetch: Duration) -> KeySetConfig {
    KeySetConfig {
        source,
        refresh_interval: Duration::from_secs(300),
        min_refetch_interval: min_refetch,
    }
}

fn key_set(config: KeySetConfig) -> Arc<KeySet> {
    Arc::new(KeySet::new(config, reqwest::Client::new()))
}

fn kids(keys: &[Arc<VerificationKey>]) -> Vec<String> {
    keys.iter().filter_map(|k| k.kid.clone()).collect()
}

#[tokio::test]
async fn keys_selected_by_kid_and_alg() {
    let es = TestSigner::es256("es-1");
    let ed = TestSigner::eddsa("ed-1");
    let server = JwksServer::start(jwks(&[&es, &ed])).await;
    let set = key_set(config(
        KeySource::JwksUrl(server.jwks_url()),
        Duration::from_secs(10),
    ));

    let found = set.keys_for(Some("es-1"), Algorithm::ES256).await.unwrap();
    assert_eq!(kids(&found), ["es-1"]);
    let found = set.keys_for(None, Algorithm::EdDSA).await.unwrap();
    assert_eq!(kids(&found), ["ed-1"]);
    // The EC key never verifies an RSA or EdDSA signature, whatever the kid is.
    let wrong = set.keys_for(Some("es-1"), Algorithm::RS256).await;
    assert!(matches!(wrong, Err(KeyLookupError::UnknownKey { .. })));

    assert_eq!(
        server.jwks_requests(),
        1,
        "the lookups within the refetch interval share one fetch"
    );
    assert_eq!(KeySetStats::get(&set.stats.fetches), 1);
}

#[test]
fn registry_shares_one_set_per_config() {
    let sets = KeySets::new(reqwest::Client::new());
    let first = config(
        KeySource::JwksUrl("http://127.0.0.1:9/a".into()),
        Duration::from_secs(10),
    );
    let second = config(
        KeySource::JwksUrl("http://127.0.0.1:9/b".into()),
        Duration::from_secs(10),
    );
    assert!(Arc::ptr_eq(&sets.get(&first), &sets.get(&first)));
    assert!(!Arc::ptr_eq(&sets.get(&first), &sets.get(&second)));
    assert_eq!(sets.all().len(), 2);
    // Creating a set sends nothing.
    for set in sets.all() {
        assert_eq!(KeySetStats::get(&set.stats.fetches), 0);
        assert_eq!(KeySetStats::get(&set.stats.fetch_failures), 0);
    }
}

#[tokio::test]
async fn discovery_finds_jwks_uri() {
    let es = TestSigner::es256("es-1");
    let server = JwksServer::start(jwks(&[&es])).await;
    let set = key_set(config(
        KeySource::Issuer(server.base_url()),
        Duration::from_secs(10),
    ));
    let found = set.keys_for(Some("es-1"), Algorithm::ES256).await.unwrap();
    assert_eq!(kids(&found), ["es-1"]);
}

#[tokio::test]
async fn discovery_falls_back_to_rfc_8414() {
    let es = TestSigner::es256("es-1");
    let server = JwksServer::start(jwks(&[&es])).await;
    server.state.openid_discovery.store(false, Ordering::SeqCst);
    let issuer = format!("{}/tenant", server.base_url());
    let set = key_set(config(KeySource::Issuer(issuer), Duration::from_secs(10)));
    let found = set.keys_for(Some("es-1"), Algorithm::ES256).await.unwrap();
    assert_eq!(kids(&found), ["es-1"]);
}

#[tokio::test]
async fn discovery_rejects_other_issuer() {
    let es = TestSigner::es256("es-1");
    let server = JwksServer::start(jwks(&[&es])).await;
    let issuer = format!("{}/", server.base_url());
    let set = key_set(config(
        KeySource::Issuer(issuer.clone()),
        Duration::from_secs(10),
    ));
    let error = set
        .keys_for(Some("es-1"), Algorithm::ES256)
        .await
        .unwrap_err();
    let KeyLookupError::Unavailable(KeySetError::IssuerMismatch { expected, .. }) = &error else {
        panic!("expected an issuer mismatch, got {error:?}");
    };
    assert_eq!(expected, &issuer);
}

#[tokio::test]
async fn unknown_kid_refetches_once_then_rate_limits() {
    let old = TestSigner::es256("old");
    let new = TestSigner::es256("new");
    let newer = TestSigner::es256("newer");
    let server = JwksServer::start(jwks(&[&old])).await;
    let set = key_set(config(
        KeySource::JwksUrl(server.jwks_url()),
        Duration::from_millis(1500),
    ));
    set.keys_for(Some("old"), Algorithm::ES256).await.unwrap();

    // Inside the minimum refetch interval, an unknown kid sends no request.
    server.set_jwks(jwks(&[&old, &new]));
    let early = set.keys_for(Some("new"), Algorithm::ES256).await;
    assert!(
        matches!(early, Err(KeyLookupError::UnknownKey { .. })),
        "{early:?}"
    );
    assert_eq!(server.jwks_requests(), 1);

    tokio::time::sleep(Duration::from_millis(1600)).await;
    let found = set.keys_for(Some("new"), Algorithm::ES256).await.unwrap();
    assert_eq!(kids(&found), ["new"]);
    assert_eq!(server.jwks_requests(), 2);
    assert_eq!(KeySetStats::get(&set.stats.unknown_kid_refetches), 1);

    // Many tokens with made-up kids right after: still one request per interval.
    server.set_jwks(jwks(&[&old, &new, &newer]));
    for i in 0..20 {
        let made_up = format!("made-up-{i}");
        assert!(
            set.keys_for(Some(&made_up), Algorithm::ES256)
                .await
                .is_err()
        );
    }
    assert_eq!(server.jwks_requests(), 2);
}

#[tokio::test]
async fn keys_keep_serving_while_issuer_is_down() {
    let es = TestSigner::es256("es-1");
    let mut server = JwksServer::start(jwks(&[&es])).await;
    let set = key_set(KeySetConfig {
        source: KeySource::JwksUrl(server.jwks_url()),
        refresh_interval: Duration::from_millis(200),
        min_refetch_interval: Duration::from_millis(200),
    });
    set.keys_for(Some("es-1"), Algorithm::ES256).await.unwrap();

    server.stop();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The set is due for a refresh, which fails in the background; the old key serves.
    let found = set.keys_for(Some("es-1"), Algorithm::ES256).await.unwrap();
    assert_eq!(kids(&found), ["es-1"]);
    wait_for(|| KeySetStats::get(&set.stats.fetch_failures) >= 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let found = set.keys_for(Some("es-1"), Algorithm::ES256).await.unwrap();
    assert_eq!(kids(&found), ["es-1"]);
    assert!(KeySetStats::get(&set.stats.stale_lookups) >= 1);

    server.restart().await;
    let requests_before = server.jwks_requests();
    tokio::time::sleep(Duration::from_millis(300)).await;
    set.keys_for(Some("es-1"), Algorithm::ES256).await.unwrap();
    wait_for(|| server.jwks_requests() > requests_before).await;
    wait_for(|| KeySetStats::get(&set.stats.fetches) >= 2).await;
}

#[tokio::test]
async fn unreachable_issuer_without_keys_is_unavailable() {
    let mut server = JwksServer::start(jwks(&[&TestSigner::es256("es-1")])).await;
    server.stop();
    let set = key_set(config(
        KeySource::JwksUrl(server.jwks_url()),
        Duration::from_secs(10),
    ));
    let error = set
        .keys_for(Some("es-1"), Algorithm::ES256)
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            KeyLookupError::Unavailable(KeySetError::Transport { .. })
        ),
        "{error:?}"
    );
    // A second lookup within the refetch interval sends nothing and reports the same.
    let again = set
        .keys_for(Some("es-1"), Algorithm::ES256)
        .await
        .unwrap_err();
    assert!(matches!(again, KeyLookupError::Unavailable(_)));
    assert_eq!(KeySetStats::get(&set.stats.fetch_failures), 1);
}

async fn wait_for(mut condition: impl FnMut() -> bool) {
    for _ in 0..200 {
        if condition() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("condition not met within 2 s");
}

#[test]
fn parse_skips_symmetric_encryption_and_short_keys() {
    let es = TestSigner::es256("es-1");
    let document = serde_json::json!({"keys": [
        {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
        {"kty": "RSA", "use": "enc", "kid": "enc", "n": "AQAB", "e": "AQAB"},
        {"kty": "RSA", "kid": "short", "n": "AQAB", "e": "AQAB"},
        {"kty": "EC", "crv": "P-521", "kid": "p521", "x": "AA", "y": "AA"},
        es.jwk(),
    ]});
    let keys = parse_jwks("http://127.0.0.1/jwks", document.to_string().as_bytes()).unwrap();
    assert_eq!(kids(&keys), ["es-1"]);

    let only_hmac = r#"{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}"#;
    let error = parse_jwks("http://127.0.0.1/jwks", only_hmac.as_bytes()).unwrap_err();
    assert!(matches!(error, KeySetError::NoUsableKeys { .. }));
    assert!(parse_jwks("http://127.0.0.1/jwks", b"[]").is_err());
}

#[test]
fn metadata_urls_follow_both_specs() {
    assert_eq!(
        metadata_urls("https://idp.test"),
        [
            "https://idp.test/.well-known/openid-configuration",
            "https://idp.test/.well-known/oauth-authorization-server"
        ]
    );
    assert_eq!(
        metadata_urls("https://idp.test/tenant/"),
        [
            "https://idp.test/tenant/.well-known/openid-configuration",
            "https://idp.test/.well-known/oauth-authorization-server/tenant"
        ]
    );
}
