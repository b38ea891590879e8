//! The whole inbound check with crafted JWT access tokens and malformed requests: each
//! case asserts the status, the audit reason and the RFC 6750 error. Keys are generated in
//! the test and served by a JWKS server on 127.0.0.1.

use std::time::Duration;

use http::{HeaderName, Method, StatusCode, Uri, header::AUTHORIZATION};
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::json;

use super::*;
use crate::{
    config::{NonHttpAction, TokenCheck, TokenHeader, ValidatorSettings},
    oauth::{
        introspect::Introspector,
        jwks::{KeySetConfig, KeySets, KeySource, tests::JwksServer},
        jwt::{
            DEFAULT_ALGORITHMS, JwtSettings,
            tests::{AUDIENCE, ISSUER, TestSigner, jwks, signing_input, unix_now, valid_claims},
        },
    },
};

struct Fixture {
    settings: ValidatorSettings,
    introspector: Introspector,
    key_sets: KeySets,
    _server: JwksServer,
}

impl Fixture {
    async fn new(signers: &[&TestSigner]) -> Fixture {
        let server = JwksServer::start(jwks(signers)).await;
        let jwt = JwtSettings {
            issuer: ISSUER.to_string(),
            audiences: vec!["urn:other".to_string(), AUDIENCE.to_string()],
            algorithms: DEFAULT_ALGORITHMS.to_vec(),
            leeway: Duration::from_secs(60),
            require_at_jwt_typ: false,
            keys: KeySetConfig {
                source: KeySource::JwksUrl(server.jwks_url()),
                refresh_interval: Duration::from_secs(300),
                min_refetch_interval: Duration::from_secs(1),
            },
        };
        let http = reqwest::Client::new();
        Fixture {
            settings: ValidatorSettings {
                plugin_id: "jwt-validator".to_string(),
                token_check: TokenCheck::Jwt(jwt),
                header: TokenHeader {
                    name: AUTHORIZATION,
                    bearer: true,
                },
                required_scopes: vec!["read".to_string()],
                method_required_scopes: Default::default(),
                allowed_client_ids: vec![],
                allowed_cidrs: vec![],
                remove_token_header: true,
                client_id_header: HeaderName::from_static("x-client-id"),
                non_http: NonHttpAction::Deny,
                allow_cors_preflight: false,
                allow_token_in_query: false,
            },
            introspector: Introspector::new(http.clone()),
            key_sets: KeySets::new(http),
            _server: server,
        }
    }

    fn jwt_mut(&mut self) -> &mut JwtSettings {
        match &mut self.settings.token_check {
            TokenCheck::Jwt(jwt) => jwt,
            TokenCheck::Introspection { .. } => unreachable!(),
        }
    }

    async fn check_token(&self, method: Method, token: &str) -> Result<Accepted, Denial> {
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, format!("Bearer {token}").parse().unwrap());
        self.check_request(method, "/api", &headers).await
    }

    async fn check_request(
        &self,
        method: Method,
        uri: &str,
        headers: &HeaderMap,
    ) -> Result<Accepted, Denial> {
        let uri: Uri = uri.parse().unwrap();
        let verifiers = Verifiers {
            introspector: &self.introspector,
            key_sets: &self.key_sets,
        };
        let view = RequestView {
            method: &method,
            uri: &uri,
            headers,
            peer: "10.0.0.1".parse().unwrap(),
        };
        check(&self.settings, verifiers, view).await
    }

    async fn denial(&self, token: &str) -> Denial {
        self.check_token(Method::GET, token)
            .await
            .expect_err("the token must be rejected")
    }
}

fn assert_invalid_token(denial: &Denial, reason: &str) {
    assert_eq!(denial.status, StatusCode::UNAUTHORIZED, "{denial:?}");
    assert_eq!(denial.reason, reason, "{denial:?}");
    assert_eq!(denial.decision, Decision::Deny);
    assert_eq!(denial.error, Some("invalid_token"));
    let challenge = denial.challenge().unwrap();
    assert!(
        challenge
            .to_str()
            .unwrap()
            .contains("error=\"invalid_token\"")
    );
}

#[tokio::test]
async fn valid_tokens_of_each_algorithm_accepted() {
    let signers = [
        TestSigner::es256("es"),
        TestSigner::rs256("rs"),
        TestSigner::ps256("ps"),
        TestSigner::eddsa("ed"),
    ];
    let fixture = Fixture::new(&signers.iter().collect::<Vec<_>>()).await;
    for signer in &signers {
        let accepted = fixture
            .check_token(Method::GET, &signer.token(&valid_claims()))
            .await
            .unwrap_or_else(|denial| panic!("{} rejected: {denial:?}", signer.alg()));
        assert_eq!(accepted.client_id, Some(ClientId("frontend".into())));
        assert_eq!(accepted.reason, "token_valid");
        assert!(!accepted.token_in_query);
    }
}

#[tokio::test]
async fn expired_token_rejected() {
    let signer = TestSigner::es256("es");
    let fixture = Fixture::new(&[&signer]).await;
    let mut claims = valid_claims();
    claims["exp"] = json!(unix_now() - 120);
    assert_invalid_token(
        &fixture.denial(&signer.token(&claims)).await,
        "token_expired",
    );
}

#[tokio::test]
async fn leeway_is_configurable() {
    let signer = TestSigner::es256("es");
    let mut fixture = Fixture::new(&[&signer]).await;
    let mut claims = valid_claims();
    claims["exp"] = json!(unix_now() - 5);
    let token = signer.token(&claims);
    assert!(fixture.check_token(Method::GET, &token).await.is_ok());
    fixture.jwt_mut().leeway = Duration::ZERO;
    assert_invalid_token(&fixture.denial(&token).await, "token_expired");
}

#[tokio::test]
async fn not_yet_valid_token_rejected() {
    let signer = TestSigner::es256("es");
    let fixture = Fixture::new(&[&signer]).await;
    let mut claims = valid_claims();
    claims["nbf"] = json!(unix_now() + 600);
    assert_invalid_token(
        &fixture.denial(&signer.token(&claims)).await,
        "token_not_yet_valid",
    );
}

#[tokio::test]
async fn wrong_issuer_rejected() {
    let signer = TestSigner::es256("es");
    let fixture = Fixture::new(&[&signer]).await;
    let mut claims = valid_claims();
    claims["iss"] = json!("https://attacker.test");
    assert_invalid_token(
        &fixture.denial(&signer.token(&claims)).await,
        "wrong_issuer",
    );
}

#[tokio::test]
async fn wrong_audience_rejected() {
    let signer = TestSigner::es256("es");
    let fixture = Fixture::new(&[&signer]).await;
    let mut claims = valid_claims();
    claims["aud"] = json!(["urn:billing", "urn:mail"]);
    assert_invalid_token(
        &fixture.denial(&signer.token(&claims)).await,
        "wrong_audience",
    );
}

#[tokio::test]
async fn alg_none_rejected() {
    let signer = TestSigner::es256("es");
    let fixture = Fixture::new(&[&signer]).await;
    let unsigned = format!(
        "{}.",
        signing_input(&json!({"alg": "none", "typ": "at+jwt"}), &valid_claims())
    );
    // The empty signature makes the token malformed before its algorithm is read; with a
    // signature part present, `none` is rejected by name.
    assert_invalid_token(&fixture.denial(&unsigned).await, "malformed_token");
    let with_signature = format!("{unsigned}c2ln");
    assert_invalid_token(
        &fixture.denial(&with_signature).await,
        "algorithm_not_allowed",
    );
}

#[tokio::test]
async fn hmac_signed_with_public_key_rejected() {
    let signer = TestSigner::rs256("rs");
    let fixture = Fixture::new(&[&signer]).await;
    let header = json!({"alg": "HS256", "kid": "rs", "typ": "at+jwt"});
    let input = signing_input(&header, &valid_claims());
    let secret = EncodingKey::from_secret(&signer.public_key_bytes());
    let signature =
        jsonwebtoken::crypto::sign(input.as_bytes(), &secret, Algorithm::HS256).unwrap();
    let token = format!("{input}.{signature}");
    assert_invalid_token(&fixture.denial(&token).await, "algorithm_not_allowed");
}

#[tokio::test]
async fn algorithm_outside_allow_list_rejected() {
    let signer = TestSigner::ps256("ps");
    let mut fixture = Fixture::new(&[&signer]).await;
    fixture.jwt_mut().algorithms = vec![Algorithm::ES256];
    assert_invalid_token(
        &fixture.denial(&signer.token(&valid_claims())).await,
        "algorithm_not_allowed",
    );
}

#[tokio::test]
async fn unknown_kid_rejected() {
    let known = TestSigner::es256("known");
    let stranger = TestSigner::es256("stranger");
    let fixture = Fixture::new(&[&known]).await;
    assert_invalid_token(
        &fixture.denial(&stranger.token(&valid_claims())).await,
        "unknown_key",
    );
}

#[tokio::test]
async fn bad_signature_rejected() {
    let signer = TestSigner::es256("es");
    let impostor = TestSigner::es256("es");
    let fixture = Fixture::new(&[&signer]).await;
    // Signed by another key under the published kid.
    assert_invalid_token(
        &fixture.denial(&impostor.token(&valid_claims())).await,
        "bad_signature",
    );

    // A valid token whose claims were changed after signing.
    let token = signer.token(&valid_claims());
    let mut claims = valid_claims();
    claims["scope"] = json!("read admin root");
    let forged_input = signing_input(&json!({}), &claims);
    let forged_payload = forged_input.split('.').nth(1).unwrap();
    let mut parts: Vec<&str> = token.split('.').collect();
    parts[1] = forged_payload;
    assert_invalid_token(&fixture.denial(&parts.join(".")).await, "bad_signature");
}

#[tokio::test]
async fn missing_scope_is_403_insufficient_scope() {
    let signer = TestSigner::es256("es");
    let fixture = Fixture::new(&[&signer]).await;
    let mut claims = valid_claims();
    claims["scope"] = json!("write");
    let denial = fixture.denial(&signer.token(&claims)).await;
    assert_eq!(denial.status, StatusCode::FORBIDDEN);
    assert_eq!(denial.reason, "insufficient_scope");
    assert_eq!(denial.error, Some("insufficient_scope"));
    assert_eq!(denial.scope.as_deref(), Some("read"));
    assert_eq!(denial.client_id.as_deref(), Some("frontend"));
}

#[tokio::test]
async fn method_scopes_add_to_required_scopes() {
    let signer = TestSigner::es256("es");
    let mut fixture = Fixture::new(&[&signer]).await;
    fixture
        .settings
        .method_required_scopes
        .insert(Method::POST, vec!["write".to_string()]);
    let token = signer.token(&valid_claims());

    assert!(fixture.check_token(Method::GET, &token).await.is_ok());
    let denial = fixture.check_token(Method::POST, &token).await.unwrap_err();
    assert_eq!(denial.status, StatusCode::FORBIDDEN);
    assert_eq!(denial.reason, "insufficient_scope");
    assert_eq!(denial.scope.as_deref(), Some("read write"));

    let mut claims = valid_claims();
    claims["scope"] = json!("read write");
    let token = signer.token(&claims);
    assert!(fixture.check_token(Method::POST, &token).await.is_ok());
}

#[tokio::test]
async fn typ_enforced_only_when_configured() {
    let signer = TestSigner::es256("es");
    let mut fixture = Fixture::new(&[&signer]).await;
    let header = json!({"alg": "ES256", "kid": "es", "typ": "JWT"});
    let plain_jwt = signer.token_with_header(&header, &valid_claims());
    assert!(fixture.check_token(Method::GET, &plain_jwt).await.is_ok());

    fixture.jwt_mut().require_at_jwt_typ = true;
    assert_invalid_token(&fixture.denial(&plain_jwt).await, "wrong_token_type");
    let at_jwt = signer.token(&valid_claims());
    assert!(fixture.check_token(Method::GET, &at_jwt).await.is_ok());
}

#[tokio::test]
async fn critical_header_rejected() {
    let signer = TestSigner::es256("es");
    let fixture = Fixture::new(&[&signer]).await;
    let header = json!({"alg": "ES256", "kid": "es", "crit": ["exp"], "exp": 1});
    let token = signer.token_with_header(&header, &valid_claims());
    assert_invalid_token(&fixture.denial(&token).await, "unsupported_critical_header");
}

#[tokio::test]
async fn garbage_tokens_rejected_without_panic() {
    let signer = TestSigner::es256("es");
    let fixture = Fixture::new(&[&signer]).await;
    let cases = [
        ("abc", "malformed_token"),
        ("a.b.c", "malformed_token"),
        ("e30.e30.e30", "malformed_token"),
        ("!!!.???.***", "malformed_token"),
        // A valid ES256 header whose signature cannot verify.
        ("eyJhbGciOiJFUzI1NiJ9.bm90IGpzb24.c2ln", "bad_signature"),
    ];
    for (token, reason) in cases {
        assert_invalid_token(&fixture.denial(token).await, reason);
    }
}

#[tokio::test]
async fn issuer_down_without_keys_is_503() {
    let signer = TestSigner::es256("es");
    let mut fixture = Fixture::new(&[&signer]).await;
    fixture.jwt_mut().keys.source = KeySource::JwksUrl("http://127.0.0.1:9/jwks".to_string());
    let denial = fixture.denial(&signer.token(&valid_claims())).await;
    assert_eq!(denial.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(denial.reason, "keys_unavailable");
    assert_eq!(denial.decision, Decision::Error);
    assert!(denial.challenge().is_none());
}

fn header_map(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        map.append(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
    }
    map
}

fn assert_invalid_request(denial: &Denial, reason: &str) {
    assert_eq!(denial.status, StatusCode::BAD_REQUEST, "{denial:?}");
    assert_eq!(denial.reason, reason, "{denial:?}");
    assert_eq!(denial.error, Some("invalid_request"));
}

#[tokio::test]
async fn query_token_rejected_by_default() {
    let signer = TestSigner::es256("es");
    let fixture = Fixture::new(&[&signer]).await;
    let uri = format!("/api?access_token={}", signer.token(&valid_claims()));
    let denial = fixture
        .check_request(Method::GET, &uri, &HeaderMap::new())
        .await
        .unwrap_err();
    assert_invalid_request(&denial, "token_in_query_not_allowed");
}

#[tokio::test]
async fn query_token_accepted_when_allowed() {
    let signer = TestSigner::es256("es");
    let mut fixture = Fixture::new(&[&signer]).await;
    fixture.settings.allow_token_in_query = true;
    let uri = format!(
        "/api?a=1&access_token={}&b=x%20y",
        signer.token(&valid_claims())
    );
    let accepted = fixture
        .check_request(Method::GET, &uri, &HeaderMap::new())
        .await
        .unwrap();
    assert!(accepted.token_in_query);
    assert_eq!(accepted.client_id, Some(ClientId("frontend".into())));

    let stripped = strip_query_token(&uri.parse().unwrap());
    assert_eq!(stripped, "/api?a=1&b=x%20y");
    let only_token = format!("/api?access_token={}", signer.token(&valid_claims()));
    assert_eq!(strip_query_token(&only_token.parse().unwrap()), "/api");
}

#[tokio::test]
async fn header_and_query_token_rejected() {
    let signer = TestSigner::es256("es");
    let mut fixture = Fixture::new(&[&signer]).await;
    fixture.settings.allow_token_in_query = true;
    let token = signer.token(&valid_claims());
    let headers = header_map(&[("authorization", &format!("Bearer {token}"))]);
    let uri = format!("/api?access_token={token}");
    let denial = fixture
        .check_request(Method::GET, &uri, &headers)
        .await
        .unwrap_err();
    assert_invalid_request(&denial, "several_tokens");

    let uri = format!("/api?access_token={token}&access_token={token}");
    let denial = fixture
        .check_request(Method::GET, &uri, &HeaderMap::new())
        .await
        .unwrap_err();
    assert_invalid_request(&denial, "several_tokens");

    let denial = fixture
        .check_request(Method::GET, "/api?access_token=", &HeaderMap::new())
        .await
        .unwrap_err();
    assert_invalid_request(&denial, "empty_token");
}

#[tokio::test]
async fn malformed_token_headers_rejected() {
    let signer = TestSigner::es256("es");
    let fixture = Fixture::new(&[&signer]).await;
    let token = signer.token(&valid_claims());
    let cases: [(Vec<(&str, String)>, StatusCode, &str); 4] = [
        (
            vec![("authorization", format!("Basic {token}"))],
            StatusCode::UNAUTHORIZED,
            "wrong_auth_scheme",
        ),
        (
            vec![
                ("authorization", format!("Bearer {token}")),
                ("authorization", format!("Bearer {token}")),
            ],
            StatusCode::BAD_REQUEST,
            "several_token_headers",
        ),
        (
            vec![("authorization", "Bearer ".to_string())],
            StatusCode::BAD_REQUEST,
            "empty_token",
        ),
        (vec![], StatusCode::UNAUTHORIZED, "missing_token"),
    ];
    for (pairs, status, reason) in cases {
        let pairs: Vec<(&str, &str)> = pairs.iter().map(|(n, v)| (*n, v.as_str())).collect();
        let denial = fixture
            .check_request(Method::GET, "/api", &header_map(&pairs))
            .await
            .unwrap_err();
        assert_eq!(denial.status, status, "{reason}: {denial:?}");
        assert_eq!(denial.reason, reason);
    }
}

#[tokio::test]
async fn cors_preflight_exempt_only_when_configured() {
    let signer = TestSigner::es256("es");
    let mut fixture = Fixture::new(&[&signer]).await;
    let preflight = header_map(&[
        ("origin", "https://app.test"),
        ("access-control-request-method", "POST"),
    ]);

    let denial = fixture
        .check_request(Method::OPTIONS, "/api", &preflight)
        .await
        .unwrap_err();
    assert_eq!(denial.reason, "missing_token");

    fixture.settings.allow_cors_preflight = true;
    let accepted = fixture
        .check_request(Method::OPTIONS, "/api", &preflight)
        .await
        .unwrap();
    assert_eq!(accepted.reason, "cors_preflight");
    assert_eq!(accepted.client_id, None);
    assert!(!accepted.token_in_query);
    let with_query_token = fixture
        .check_request(Method::OPTIONS, "/api?access_token=abc", &preflight)
        .await
        .unwrap();
    assert!(with_query_token.token_in_query, "the URL loses the token");

    // OPTIONS without the preflight headers is an ordinary request.
    let plain = header_map(&[("origin", "https://app.test")]);
    let denial = fixture
        .check_request(Method::OPTIONS, "/api", &plain)
        .await
        .unwrap_err();
    assert_eq!(denial.reason, "missing_token");

    // The source address check still applies to a preflight.
    fixture.settings.allowed_cidrs = vec!["10.9.9.0/24".parse().unwrap()];
    let denial = fixture
        .check_request(Method::OPTIONS, "/api", &preflight)
        .await
        .unwrap_err();
    assert_eq!(denial.status, StatusCode::FORBIDDEN);
    assert_eq!(denial.reason, "source_ip_not_allowed");
}
