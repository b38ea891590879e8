//! The agent's OAuth client against a real identity provider (oidc-provider on Node.js,
//! started per test on 127.0.0.1).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokenmesh_agent::config::secret::Secret;
use tokenmesh_agent::oauth::assertion::{AssertionOptions, AssertionSigner, SigningAlgorithm};
use tokenmesh_agent::oauth::introspect::{IntrospectionEndpoint, IntrospectionError, Introspector};
use tokenmesh_agent::oauth::token::{
    ClientAuthentication, ClientCredentials, TokenError, TokenSource,
};
use tokenmesh_agent::oauth::{ClientAuthMethod, ClientId};
use tokenmesh_e2e::idp::{Idp, IdpClient, IdpConfig, KeyType, TokenFormat, generate_client_key};

const FRONTEND_SECRET: &str = "frontend-s3cret:with+reserved/chars=&%";
const VALIDATOR_SECRET: &str = "validator-s3cret";
const SKEW: Duration = Duration::from_secs(30);

fn clients() -> Vec<IdpClient> {
    let mut poster = IdpClient::new("poster", "poster-s3cret", "read");
    poster.token_endpoint_auth_method = Some("client_secret_post".into());
    vec![
        IdpClient::new("frontend", FRONTEND_SECRET, "admin read"),
        IdpClient::new("reader", "reader-s3cret", "read"),
        IdpClient::new("validator", VALIDATOR_SECRET, "introspect"),
        poster,
    ]
}

fn start_idp(config: IdpConfig) -> Idp {
    Idp::start(&config).expect("identity provider starts")
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// Returns credentials of `client_id` with a client secret sent with `method`.
fn with_secret(
    idp: &Idp,
    client_id: &str,
    secret: &str,
    method: ClientAuthMethod,
    scopes: &[&str],
) -> ClientCredentials {
    let mut creds = ClientCredentials::new(
        idp.token_endpoint(),
        ClientId(client_id.into()),
        ClientAuthentication::Secret {
            secret: Secret::new(secret, "test"),
            method,
        },
    );
    creds.scopes = scopes.iter().map(|s| s.to_string()).collect();
    creds
}

fn frontend(idp: &Idp, scopes: &[&str]) -> ClientCredentials {
    with_secret(
        idp,
        "frontend",
        FRONTEND_SECRET,
        ClientAuthMethod::ClientSecretBasic,
        scopes,
    )
}

/// Replaces the client secret of `creds`.
fn set_secret(creds: &mut ClientCredentials, secret: &str) {
    creds.authentication = ClientAuthentication::Secret {
        secret: Secret::new(secret, "test"),
        method: ClientAuthMethod::ClientSecretBasic,
    };
}

fn validator(idp: &Idp) -> IntrospectionEndpoint {
    IntrospectionEndpoint {
        url: idp.introspection_endpoint(),
        client_id: ClientId("validator".into()),
        client_secret: Secret::new(VALIDATOR_SECRET, "test"),
        auth_method: ClientAuthMethod::ClientSecretBasic,
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test]
async fn token_introspects_active_for_validator() {
    let idp = start_idp(IdpConfig::new(clients()));
    let tokens = TokenSource::new(http(), SKEW);
    let introspector = Introspector::new(http());

    let token = tokens
        .token(&frontend(&idp, &["read", "admin"]))
        .await
        .unwrap();
    let result = introspector
        .introspect(&validator(&idp), token.secret())
        .await
        .unwrap();

    assert!(result.active, "{result:?}");
    assert_eq!(result.client_id.as_deref(), Some("frontend"));
    let mut scopes: Vec<&str> = result.scopes().collect();
    scopes.sort();
    assert_eq!(scopes, ["admin", "read"]);
    assert!(result.has_scopes(&["admin".to_string()]));
    assert!(!result.has_scopes(&["introspect".to_string()]));
    assert_eq!(result.iss.as_deref(), Some(idp.base_url()));
    assert_eq!(result.aud, ["urn:tokenmesh:mesh"]);
    let exp = result.exp.expect("exp is present");
    assert!(
        exp > unix_now() + 250 && exp <= unix_now() + 301,
        "exp {exp}"
    );

    let stats = idp.stats().await.unwrap();
    assert_eq!(stats.token_requests, 1);
    assert_eq!(stats.introspection_requests, 1);
}

#[tokio::test]
async fn concurrent_calls_share_one_request() {
    let idp = start_idp(IdpConfig::new(clients()));
    let tokens = TokenSource::new(http(), SKEW);
    let creds = Arc::new(frontend(&idp, &["read"]));

    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..50 {
        let tokens = tokens.clone();
        let creds = creds.clone();
        tasks.spawn(async move { tokens.token(&creds).await });
    }
    let mut values = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        values.push(joined.unwrap().unwrap().secret().to_string());
    }

    assert_eq!(values.len(), 50);
    assert!(values.iter().all(|value| *value == values[0]));
    assert_eq!(idp.stats().await.unwrap().token_requests, 1);

    // Later calls, with the scopes in another order, use the cached token as well.
    let again = tokens
        .token(&frontend(&idp, &["read", "read"]))
        .await
        .unwrap();
    assert_eq!(again.secret(), values[0]);
    assert_eq!(idp.stats().await.unwrap().token_requests, 1);
}

#[tokio::test]
async fn different_scopes_get_different_tokens() {
    let idp = start_idp(IdpConfig::new(clients()));
    let tokens = TokenSource::new(http(), SKEW);

    let read = tokens.token(&frontend(&idp, &["read"])).await.unwrap();
    let admin = tokens.token(&frontend(&idp, &["admin"])).await.unwrap();

    assert_ne!(read.secret(), admin.secret());
    assert_eq!(read.scope(), Some("read"));
    assert_eq!(admin.scope(), Some("admin"));
    assert_eq!(idp.stats().await.unwrap().token_requests, 2);
}

#[tokio::test]
async fn wrong_secret_names_client_and_error() {
    let idp = start_idp(IdpConfig::new(clients()));
    let tokens = TokenSource::new(http(), SKEW);
    let mut creds = frontend(&idp, &["read"]);
    set_secret(&mut creds, "wrong-secret-value");
    creds.min_request_interval = Duration::from_millis(300);

    let err = tokens.token(&creds).await.unwrap_err();
    let message = err.to_string();

    match &err {
        TokenError::Rejected { status, error, .. } => {
            assert_eq!(status.as_u16(), 401);
            assert_eq!(error.error, "invalid_client");
        }
        other => panic!("expected Rejected, got {other:?}"),
    }
    assert!(message.contains("frontend"), "{message}");
    assert!(message.contains("invalid_client"), "{message}");
    assert!(message.contains(&idp.token_endpoint()), "{message}");
    assert!(!message.contains("wrong-secret-value"), "{message}");
    assert!(!format!("{err:?}").contains("wrong-secret-value"));

    // A 401 is not retried, and its error is reused within the minimum request
    // interval, so a burst of calls costs one token request.
    tokens.token(&creds).await.unwrap_err();
    assert_eq!(idp.stats().await.unwrap().token_requests, 1);
    tokio::time::sleep(Duration::from_millis(350)).await;
    tokens.token(&creds).await.unwrap_err();
    assert_eq!(idp.stats().await.unwrap().token_requests, 2);
}

#[tokio::test]
async fn disallowed_scope_is_invalid_scope() {
    let idp = start_idp(IdpConfig::new(clients()));
    let tokens = TokenSource::new(http(), SKEW);
    let creds = with_secret(
        &idp,
        "reader",
        "reader-s3cret",
        ClientAuthMethod::ClientSecretBasic,
        &["admin"],
    );

    let err = tokens.token(&creds).await.unwrap_err();
    let message = err.to_string();

    assert!(
        matches!(&err, TokenError::Rejected { error, .. } if error.error == "invalid_scope"),
        "{message}"
    );
    assert!(message.contains("reader"), "{message}");
}

#[tokio::test]
async fn garbage_token_is_inactive() {
    let idp = start_idp(IdpConfig::new(clients()));
    let introspector = Introspector::new(http());

    for token in ["garbage", "AlU4duIhnuoNPbIzYTcwm-nw4bqvqCHq9KPC6Kvbbhd"] {
        let result = introspector
            .introspect(&validator(&idp), token)
            .await
            .unwrap();
        assert!(!result.active, "{token}: {result:?}");
        assert_eq!(result.client_id, None);
    }
    assert_eq!(idp.stats().await.unwrap().introspection_requests, 2);
}

#[tokio::test]
async fn revoked_token_is_inactive() {
    let idp = start_idp(IdpConfig::new(clients()));
    let tokens = TokenSource::new(http(), SKEW);
    let introspector = Introspector::new(http());
    let creds = frontend(&idp, &["read"]);
    let token = tokens.token(&creds).await.unwrap();

    // RFC 7009 revocation by the owning client, with the same form-urlencoded Basic
    // credentials the agent sends.
    let response = http()
        .post(idp.revocation_endpoint())
        .basic_auth(
            "frontend",
            Some("frontend-s3cret%3Awith%2Breserved%2Fchars%3D%26%25"),
        )
        .form(&[
            ("token", token.secret()),
            ("token_type_hint", "access_token"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    let result = introspector
        .introspect(&validator(&idp), token.secret())
        .await
        .unwrap();
    assert!(!result.active, "{result:?}");
    assert_eq!(idp.stats().await.unwrap().revocation_requests, 1);

    // After invalidation the source requests a new token, which is active.
    tokens.invalidate(&creds).await;
    let fresh = tokens.token(&creds).await.unwrap();
    assert_ne!(fresh.secret(), token.secret());
    let result = introspector
        .introspect(&validator(&idp), fresh.secret())
        .await
        .unwrap();
    assert!(result.active, "{result:?}");
    assert_eq!(idp.stats().await.unwrap().token_requests, 2);
}

#[tokio::test]
async fn basic_and_post_auth_both_work() {
    let idp = start_idp(IdpConfig::new(clients()));
    let tokens = TokenSource::new(http(), SKEW);
    let introspector = Introspector::new(http());

    // client_secret_basic, with a secret that needs form-urlencoding.
    let basic = tokens.token(&frontend(&idp, &["read"])).await.unwrap();
    let stats = idp.stats().await.unwrap();
    assert_eq!(stats.token_requests, 1);
    assert_eq!(stats.basic_auth_requests, 1);

    // client_secret_post sends no Authorization header.
    let poster = with_secret(
        &idp,
        "poster",
        "poster-s3cret",
        ClientAuthMethod::ClientSecretPost,
        &["read"],
    );
    let posted = tokens.token(&poster).await.unwrap();
    let stats = idp.stats().await.unwrap();
    assert_eq!(stats.token_requests, 2);
    assert_eq!(stats.basic_auth_requests, 1);

    // Introspection as a client_secret_post validator.
    let post_validator = IntrospectionEndpoint {
        url: idp.introspection_endpoint(),
        client_id: ClientId("poster".into()),
        client_secret: Secret::new("poster-s3cret", "test"),
        auth_method: ClientAuthMethod::ClientSecretPost,
    };
    for (token, owner) in [(&basic, "frontend"), (&posted, "poster")] {
        let result = introspector
            .introspect(&post_validator, token.secret())
            .await
            .unwrap();
        assert!(result.active, "{result:?}");
        assert_eq!(result.client_id.as_deref(), Some(owner));
    }
    let stats = idp.stats().await.unwrap();
    assert_eq!(stats.introspection_requests, 2);
    assert_eq!(stats.basic_auth_requests, 1);
}

#[tokio::test]
async fn short_ttl_token_used_until_expiry() {
    let mut config = IdpConfig::new(clients());
    config.token_ttl_seconds = 2;
    let idp = start_idp(config);
    // The token expires sooner than the skew, so it is in its refresh window at once,
    // but the minimum request interval delays the refresh and the token stays in use.
    let tokens = TokenSource::new(http(), Duration::from_secs(5));
    let creds = frontend(&idp, &["read"]);

    let first = tokens.token(&creds).await.unwrap();
    let second = tokens.token(&creds).await.unwrap();
    assert_eq!(first.secret(), second.secret());
    assert_eq!(idp.stats().await.unwrap().token_requests, 1);

    tokio::time::sleep(Duration::from_millis(2200)).await;
    let third = tokens.token(&creds).await.unwrap();
    assert_ne!(first.secret(), third.secret());
    assert!(std::time::Instant::now() < third.expires_at());
}

#[tokio::test]
async fn token_renewed_skew_before_expiry() {
    let mut config = IdpConfig::new(clients());
    config.token_ttl_seconds = 3;
    let idp = start_idp(config);
    // Cached for 3 s - 1 s = 2 s.
    let tokens = TokenSource::new(http(), Duration::from_secs(1));
    let creds = frontend(&idp, &["read"]);

    let first = tokens.token(&creds).await.unwrap();
    let cached = tokens.token(&creds).await.unwrap();
    assert_eq!(first.secret(), cached.secret());
    assert_eq!(idp.stats().await.unwrap().token_requests, 1);

    // In the refresh window the current token is returned at once and a new one is
    // requested in the background, before the current one expires.
    tokio::time::sleep(Duration::from_millis(2300)).await;
    let during = tokens.token(&creds).await.unwrap();
    assert_eq!(first.secret(), during.secret());
    wait_for_token_requests(&idp, 2).await;
    let renewed = tokens.token(&creds).await.unwrap();
    assert_ne!(first.secret(), renewed.secret());
    assert!(std::time::Instant::now() < first.expires_at());
    assert_eq!(idp.stats().await.unwrap().token_requests, 2);
}

/// Waits up to 5 s until the provider has counted `count` token requests.
async fn wait_for_token_requests(idp: &Idp, count: u64) {
    for _ in 0..100 {
        if idp.stats().await.unwrap().token_requests >= count {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the provider did not receive {count} token requests");
}

#[tokio::test]
async fn wrong_validator_secret_rejected() {
    let idp = start_idp(IdpConfig::new(clients()));
    let mut endpoint = validator(&idp);
    endpoint.client_secret = Secret::new("not-the-validator-secret", "test");

    let err = Introspector::new(http())
        .introspect(&endpoint, "garbage")
        .await
        .unwrap_err();
    let message = err.to_string();

    match &err {
        IntrospectionError::Rejected { status, error, .. } => {
            assert_eq!(status.as_u16(), 401);
            assert_eq!(error.error, "invalid_client");
        }
        other => panic!("expected Rejected, got {other:?}"),
    }
    assert!(message.contains(&idp.introspection_endpoint()), "{message}");
    assert!(message.contains("validator"), "{message}");
    assert!(!message.contains("not-the-validator-secret"), "{message}");
    assert!(!message.contains("garbage"), "{message}");
}

#[tokio::test]
async fn plain_text_404_is_invalid_response() {
    let idp = start_idp(IdpConfig::new(clients()));
    // oidc-provider returns a plain-text 404 for a path it does not serve.
    let wrong_url = format!("{}/no-such-endpoint", idp.base_url());

    let mut endpoint = validator(&idp);
    endpoint.url = wrong_url.clone();
    let err = Introspector::new(http())
        .introspect(&endpoint, "garbage")
        .await
        .unwrap_err();
    let message = err.to_string();
    assert!(
        matches!(
            &err,
            IntrospectionError::InvalidResponse { status, .. } if status.as_u16() == 404
        ),
        "{message}"
    );
    assert!(message.contains(&wrong_url), "{message}");
    assert!(message.contains("HTTP 404"), "{message}");

    let mut creds = frontend(&idp, &["read"]);
    creds.token_endpoint = wrong_url.clone();
    let err = TokenSource::new(http(), SKEW)
        .token(&creds)
        .await
        .unwrap_err();
    let message = err.to_string();
    assert!(
        matches!(&err, TokenError::InvalidResponse { status, .. } if status.as_u16() == 404),
        "{message}"
    );
    assert!(message.contains(&wrong_url), "{message}");
    assert!(message.contains("frontend"), "{message}");
}

#[tokio::test]
async fn jwt_access_token_issued() {
    for alg in ["ES256", "RS256"] {
        let mut config = IdpConfig::new(clients());
        config.access_token_format = TokenFormat::Jwt;
        config.jwt_signing_alg = Some(alg.to_string());
        let idp = start_idp(config);
        let tokens = TokenSource::new(http(), SKEW);

        let token = tokens.token(&frontend(&idp, &["read"])).await.unwrap();

        let parts: Vec<&str> = token.secret().split('.').collect();
        assert_eq!(parts.len(), 3, "{alg}: not a compact JWS");
        let header = decode_segment(parts[0]);
        assert_eq!(header["alg"], alg);
        assert_eq!(header["typ"], "at+jwt");
        let claims = decode_segment(parts[1]);
        assert_eq!(claims["client_id"], "frontend");
        assert_eq!(claims["scope"], "read");
        assert_eq!(claims["aud"], "urn:tokenmesh:mesh");
        assert_eq!(claims["iss"], idp.base_url());

        // oidc-provider rejects introspection of JWT access tokens with HTTP 400.
        let err = Introspector::new(http())
            .introspect(&validator(&idp), token.secret())
            .await
            .unwrap_err();
        assert!(
            matches!(
                &err,
                IntrospectionError::Rejected { error, .. } if error.error == "unsupported_token_type"
            ),
            "{err}"
        );
    }
}

#[tokio::test]
async fn jwks_holds_both_algorithms() {
    let idp = start_idp(IdpConfig::new(clients()));

    let jwks: serde_json::Value = http()
        .get(idp.jwks_uri())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();

    let algs: Vec<&str> = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|key| key["alg"].as_str().unwrap())
        .collect();
    assert!(algs.contains(&"ES256"), "{algs:?}");
    assert!(algs.contains(&"RS256"), "{algs:?}");
    // The published set contains public keys only.
    for key in jwks["keys"].as_array().unwrap() {
        assert!(key.get("d").is_none(), "private key published");
    }
}

#[tokio::test]
async fn idp_stops_on_drop() {
    let idp = start_idp(IdpConfig::new(clients()));
    let address = idp.base_url().trim_start_matches("http://").to_string();
    std::net::TcpStream::connect(&address).expect("provider accepts connections");

    drop(idp);

    assert!(std::net::TcpStream::connect(&address).is_err());
}

fn decode_segment(segment: &str) -> serde_json::Value {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(segment)
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

#[test]
fn idp_reports_invalid_config() {
    let err = Idp::start(&IdpConfig::new(Vec::new()))
        .err()
        .expect("start fails");
    let message = format!("{err:#}");

    assert!(message.contains("exited"), "{message}");
    assert!(message.contains("clients is missing or empty"), "{message}");
}

/// Collects formatted log lines in memory.
#[derive(Clone, Default)]
struct LogBuffer(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogBuffer {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn debug_logs_show_fingerprint_only() {
    let idp = start_idp(IdpConfig::new(clients()));
    // A global subscriber, because tracing caches each call site's interest for the
    // whole process: with a per-thread subscriber, a site first reached by a test on
    // another thread could stay disabled here. The other tests of this binary log into
    // the same buffer, which the secret checks below then cover as well.
    static LOGS: std::sync::OnceLock<LogBuffer> = std::sync::OnceLock::new();
    let logs = LOGS
        .get_or_init(|| {
            let logs = LogBuffer::default();
            let writer = logs.clone();
            let subscriber = tracing_subscriber::fmt()
                .with_max_level(tracing::Level::DEBUG)
                .with_ansi(false)
                .with_writer(move || writer.clone())
                .finish();
            tracing::subscriber::set_global_default(subscriber)
                .expect("no other test of this binary sets a global subscriber");
            logs
        })
        .clone();

    let tokens = TokenSource::new(http(), SKEW);
    let token = tokens.token(&frontend(&idp, &["read"])).await.unwrap();
    Introspector::new(http())
        .introspect(&validator(&idp), token.secret())
        .await
        .unwrap();
    let mut wrong = frontend(&idp, &["admin"]);
    set_secret(&mut wrong, "wrong-secret-value");
    tokens.token(&wrong).await.unwrap_err();

    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(text.contains("access token received"), "{text}");
    assert!(text.contains("token introspected"), "{text}");
    assert!(text.contains(token.fingerprint()), "{text}");
    assert!(!text.contains(token.secret()), "{text}");
    assert!(!text.contains(FRONTEND_SECRET), "{text}");
    assert!(!text.contains(VALIDATOR_SECRET), "{text}");
    assert!(!text.contains("wrong-secret-value"), "{text}");
}

/// Credentials of a `private_key_jwt` client that signs with `private_pem`.
fn with_private_key(
    idp: &Idp,
    client_id: &str,
    private_pem: &str,
    algorithm: Option<SigningAlgorithm>,
) -> ClientCredentials {
    let options = AssertionOptions {
        algorithm,
        ..AssertionOptions::default()
    };
    let signer = AssertionSigner::from_pem(private_pem, "test key", options).unwrap();
    ClientCredentials::new(
        idp.token_endpoint(),
        ClientId(client_id.into()),
        ClientAuthentication::PrivateKeyJwt(Arc::new(signer)),
    )
}

#[tokio::test]
async fn private_key_jwt_every_algorithm() {
    let ec = generate_client_key(KeyType::EcP256).unwrap();
    let rsa = generate_client_key(KeyType::Rsa2048).unwrap();
    let ed = generate_client_key(KeyType::Ed25519).unwrap();
    let mut clients = clients();
    clients.push(IdpClient::private_key_jwt(
        "ec-client",
        "read",
        ec.public_jwk.clone(),
    ));
    clients.push(IdpClient::private_key_jwt(
        "rsa-client",
        "read",
        rsa.public_jwk.clone(),
    ));
    clients.push(IdpClient::private_key_jwt(
        "ed-client",
        "read",
        ed.public_jwk.clone(),
    ));
    let idp = start_idp(IdpConfig::new(clients));
    let tokens = TokenSource::new(http(), SKEW);
    let introspector = Introspector::new(http());

    let cases = [
        ("ec-client", &ec, None, "ES256"),
        ("rsa-client", &rsa, None, "RS256"),
        ("rsa-client", &rsa, Some(SigningAlgorithm::PS256), "PS256"),
        ("ed-client", &ed, None, "EdDSA"),
    ];
    for (client_id, key, algorithm, name) in cases {
        let creds = with_private_key(&idp, client_id, &key.private_pem, algorithm);
        let token = tokens
            .token(&creds)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}\n{}", idp.stderr()));
        let result = introspector
            .introspect(&validator(&idp), token.secret())
            .await
            .unwrap();
        assert!(result.active, "{name}: {result:?}");
        assert_eq!(result.client_id.as_deref(), Some(client_id), "{name}");
        // The cache key contains the key's fingerprint, not the algorithm, so the PS256 case
        // shares the RS256 token; drop it to send a PS256 assertion.
        tokens.invalidate(&creds).await;
    }
    let stats = idp.stats().await.unwrap();
    assert_eq!(stats.token_requests, 4);
    assert_eq!(
        stats.basic_auth_requests, 4,
        "only the four introspections use Basic authentication"
    );
}

#[tokio::test]
async fn private_key_jwt_wrong_key_rejected() {
    let registered = generate_client_key(KeyType::EcP256).unwrap();
    let other = generate_client_key(KeyType::EcP256).unwrap();
    let mut clients = clients();
    clients.push(IdpClient::private_key_jwt(
        "ec-client",
        "read",
        registered.public_jwk,
    ));
    let idp = start_idp(IdpConfig::new(clients));
    let tokens = TokenSource::new(http(), SKEW);

    let creds = with_private_key(&idp, "ec-client", &other.private_pem, None);
    let err = tokens.token(&creds).await.unwrap_err();

    assert!(
        matches!(&err, TokenError::Rejected { error, .. } if error.error == "invalid_client"),
        "{err}"
    );
    assert!(!err.is_retryable());
    assert_eq!(idp.stats().await.unwrap().token_requests, 1, "not retried");
    let message = err.to_string();
    assert!(message.contains("ec-client"), "{message}");
    assert!(
        !message.contains(other.private_pem.lines().nth(1).unwrap()),
        "{message}"
    );
}

#[tokio::test]
async fn audience_and_resource_reach_token() {
    const API: &str = "https://api.tokenmesh.test";
    const RESOURCE: &str = "https://orders.tokenmesh.test/";
    let mut config = IdpConfig::new(clients());
    config.resources = vec![API.to_string(), RESOURCE.to_string()];
    let idp = start_idp(config);
    let tokens = TokenSource::new(http(), SKEW);
    let introspector = Introspector::new(http());

    let plain = frontend(&idp, &["read"]);
    let mut audience = frontend(&idp, &["read"]);
    audience.audience = Some(API.to_string());
    let mut resource = frontend(&idp, &["admin"]);
    resource.resources = vec![RESOURCE.to_string()];

    for (creds, expected_aud, expected_scope) in [
        (&plain, "urn:tokenmesh:mesh", "read"),
        (&audience, API, "read"),
        (&resource, RESOURCE, "admin"),
    ] {
        let token = tokens.token(creds).await.unwrap();
        let result = introspector
            .introspect(&validator(&idp), token.secret())
            .await
            .unwrap();
        assert!(result.active, "{result:?}");
        assert_eq!(result.aud, [expected_aud], "{result:?}");
        assert_eq!(result.scopes().collect::<Vec<_>>(), [expected_scope]);
    }
    // One cached token per (scopes, audience, resources).
    assert_eq!(idp.stats().await.unwrap().token_requests, 3);
    tokens.token(&audience).await.unwrap();
    assert_eq!(idp.stats().await.unwrap().token_requests, 3);
}

#[tokio::test]
async fn unknown_resource_is_invalid_target() {
    let idp = start_idp(IdpConfig::new(clients()));
    let tokens = TokenSource::new(http(), SKEW);
    let mut creds = frontend(&idp, &["read"]);
    creds.resources = vec!["https://unknown.tokenmesh.test/".into()];

    let err = tokens.token(&creds).await.unwrap_err();

    assert!(
        matches!(&err, TokenError::Rejected { error, .. } if error.error == "invalid_target"),
        "{err}"
    );
    assert!(err.to_string().contains("resource indicator"), "{err}");
    assert_eq!(idp.stats().await.unwrap().token_requests, 1);
}
