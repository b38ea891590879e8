//! The token validator end to end, as root on the real kernel. The real agent binary runs
//! in front of the echo app, and the real identity provider (npm `oidc-provider`) issues
//! opaque or JWT access tokens (ES256, RS256). Requests are sent from the frontend pod's
//! network namespace over plain TCP sockets, so a test controls the token, the headers
//! and the keep-alive connection. The sockets are made outside the pods' cgroups, so the
//! frontend's token creator leaves them alone, while sk_lookup still steers them into the
//! agent's inbound listener of the echo pod.

use std::{
    fs::File,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    os::fd::AsFd,
    path::PathBuf,
    thread,
    time::{Duration, Instant},
};

use tokenmesh_e2e::{
    idp::{Idp, IdpClient, IdpConfig, TokenFormat},
    scenario::{Binaries, CLIENT_ID_HEADER, PROTECTED_PORT, Scenario, ScenarioOptions, wait_until},
    topology::{Pod, require_root},
};

const AUDIENCE: &str = "urn:tokenmesh:mesh";

fn standard_idp(format: TokenFormat, alg: Option<&str>, ttl_seconds: u64) -> IdpConfig {
    let mut config = IdpConfig::new(vec![
        IdpClient::new("frontend", "frontend-secret", "admin"),
        IdpClient::new("intruder", "intruder-secret", "admin"),
        IdpClient::new("echo-validator", "validator-secret", ""),
    ]);
    config.access_token_format = format;
    config.jwt_signing_alg = alg.map(str::to_string);
    config.token_ttl_seconds = ttl_seconds;
    config
}

/// Validator lines for JWT access tokens from the scenario's provider; `extra` adds or
/// overrides options.
fn jwt_validator(extra: &[&str]) -> Vec<String> {
    let mut lines = vec![
        "token_format: jwt".to_string(),
        "issuer: \"{issuer}\"".to_string(),
        format!("audiences: [{AUDIENCE}]"),
        "require_at_jwt_typ: true".to_string(),
    ];
    lines.extend(extra.iter().map(|line| line.to_string()));
    lines
}

fn opaque_validator(extra: &[&str]) -> Vec<String> {
    let mut lines = vec![
        "introspection_url: \"{issuer}/token/introspection\"".to_string(),
        "introspection_client_id: echo-validator".to_string(),
        "introspection_client_secret: ${ECHO_VALIDATOR_SECRET}".to_string(),
    ];
    lines.extend(extra.iter().map(|line| line.to_string()));
    lines
}

fn start(prefix: &str, idp: IdpConfig, validator: Vec<String>) -> Scenario {
    require_root().expect("the end-to-end suite needs root");
    let binaries = Binaries::locate(PathBuf::from(env!("CARGO_BIN_EXE_echo")))
        .expect("cannot find the programs to run");
    let options = ScenarioOptions {
        idp: Some(idp),
        echo_validator_parameters: Some(validator),
        ..ScenarioOptions::default()
    };
    Scenario::start_with(prefix, binaries, options).expect("cannot start the scenario")
}

fn block_on<T>(future: impl Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(future)
}

/// Gets an access token for `client` from `idp` with the client-credentials grant.
fn fetch_token(idp: &Idp, client: &str, secret: &str) -> String {
    let response: serde_json::Value = block_on(async {
        reqwest::Client::new()
            .post(idp.token_endpoint())
            .basic_auth(client, Some(secret))
            .form(&[("grant_type", "client_credentials"), ("scope", "admin")])
            .send()
            .await
            .expect("token request")
            .error_for_status()
            .expect("token response")
            .json()
            .await
            .expect("token JSON")
    });
    response["access_token"]
        .as_str()
        .expect("access_token in the response")
        .to_string()
}

fn revoke(idp: &Idp, token: &str) {
    block_on(async {
        reqwest::Client::new()
            .post(idp.revocation_endpoint())
            .basic_auth("frontend", Some("frontend-secret"))
            .form(&[("token", token), ("token_type_hint", "access_token")])
            .send()
            .await
            .expect("revocation request")
            .error_for_status()
            .expect("revocation response");
    });
}

/// Decodes the JOSE header of a JWT.
fn jose_header(token: &str) -> serde_json::Value {
    use base64::Engine;
    let header = token.split('.').next().unwrap();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

/// One HTTP/1.1 connection from inside a pod's network namespace.
struct Connection {
    reader: BufReader<TcpStream>,
}

/// A response read from a [`Connection`].
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    fn echoed(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|_| panic!("not the echo app's JSON: {self:?}"))
    }
}

impl Connection {
    /// Connects to `target` from a socket made in `pod`'s network namespace. The socket
    /// keeps that namespace after the helper thread ends.
    fn open(pod: &Pod, target: SocketAddr) -> Connection {
        let netns = pod.netns_path.clone();
        let stream = thread::spawn(move || {
            let file = File::open(&netns).expect("open the pod's netns");
            nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("setns into the pod's netns");
            TcpStream::connect_timeout(&target, Duration::from_secs(5))
        })
        .join()
        .unwrap()
        .expect("connect to the echo pod");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        Connection {
            reader: BufReader::new(stream),
        }
    }

    /// Sends one request with `headers` (`Name: value` lines) and reads the response.
    fn send(&mut self, method: &str, path: &str, headers: &[String]) -> Reply {
        let mut request = format!("{method} {path} HTTP/1.1\r\nHost: echo\r\n");
        for header in headers {
            request.push_str(header);
            request.push_str("\r\n");
        }
        request.push_str("\r\n");
        self.reader
            .get_mut()
            .write_all(request.as_bytes())
            .expect("write the request");
        self.read_reply()
    }

    fn read_line(&mut self) -> String {
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("read a line");
        line.trim_end_matches(['\r', '\n']).to_string()
    }

    fn read_reply(&mut self) -> Reply {
        let status_line = self.read_line();
        let status = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("not an HTTP status line: {status_line:?}"));
        let mut headers = Vec::new();
        loop {
            let line = self.read_line();
            if line.is_empty() {
                break;
            }
            let (name, value) = line.split_once(':').expect("a header line");
            headers.push((name.trim().to_string(), value.trim().to_string()));
        }
        let mut reply = Reply {
            status,
            headers,
            body: String::new(),
        };
        let mut body = Vec::new();
        if let Some(length) = reply.header("content-length") {
            body.resize(length.parse().unwrap(), 0);
            self.reader.read_exact(&mut body).expect("read the body");
        } else if reply
            .header("transfer-encoding")
            .is_some_and(|te| te.eq_ignore_ascii_case("chunked"))
        {
            loop {
                let size = usize::from_str_radix(&self.read_line(), 16).expect("chunk size");
                let mut chunk = vec![0; size];
                self.reader.read_exact(&mut chunk).expect("read a chunk");
                self.read_line();
                if size == 0 {
                    break;
                }
                body.extend(chunk);
            }
        }
        reply.body = String::from_utf8_lossy(&body).into_owned();
        reply
    }
}

fn echo_addr(scenario: &Scenario) -> SocketAddr {
    SocketAddr::from((scenario.pod("echo").ip, PROTECTED_PORT))
}

fn send(scenario: &Scenario, path: &str, headers: &[String]) -> Reply {
    let mut connection = Connection::open(scenario.pod("frontend"), echo_addr(scenario));
    connection.send("GET", path, headers)
}

fn bearer(token: &str) -> Vec<String> {
    vec![format!("Authorization: Bearer {token}")]
}

fn inbound_records(scenario: &Scenario) -> Vec<serde_json::Value> {
    scenario
        .audit_records()
        .unwrap()
        .into_iter()
        .filter(|r| r["direction"] == "inbound")
        .collect()
}

/// Waits for a new inbound audit record and returns the last one.
fn last_inbound(scenario: &Scenario, count_before: usize) -> serde_json::Value {
    wait_until(Duration::from_secs(5), "the audit record", || {
        inbound_records(scenario).len() > count_before
    })
    .unwrap();
    inbound_records(scenario).pop().unwrap()
}

fn assert_denied(scenario: &Scenario, reply: &Reply, status: u16, reason: &str, before: usize) {
    assert_eq!(reply.status, status, "{reply:?}\n{}", scenario.agent_log());
    let record = last_inbound(scenario, before);
    assert_eq!(record["reason"], reason, "{record}");
    assert_eq!(record["status"], status, "{record}");
}

fn jwt_tokens_accepted(prefix: &str, alg: &str) {
    let scenario = start(
        prefix,
        standard_idp(TokenFormat::Jwt, Some(alg), 300),
        jwt_validator(&[]),
    );
    let token = fetch_token(&scenario.idp, "frontend", "frontend-secret");
    assert_eq!(jose_header(&token)["alg"], alg);

    let before = inbound_records(&scenario).len();
    let reply = send(&scenario, "/api", &bearer(&token));
    assert_eq!(reply.status, 200, "{reply:?}\n{}", scenario.agent_log());
    let echoed = reply.echoed();
    assert_eq!(echoed["headers"][CLIENT_ID_HEADER][0], "frontend");
    assert!(echoed["headers"]["authorization"].is_null(), "{echoed}");
    let record = last_inbound(&scenario, before);
    assert_eq!(record["decision"], "allow");
    assert_eq!(record["reason"], "token_valid");
    assert_eq!(record["client_id"], "frontend");

    let stats = scenario.idp_stats().unwrap();
    assert_eq!(stats.introspection_requests, 0, "JWTs are checked locally");
    assert_eq!(stats.jwks_requests, 1);

    // A valid token of a client that echo does not allow.
    let intruder = fetch_token(&scenario.idp, "intruder", "intruder-secret");
    let before = inbound_records(&scenario).len();
    let reply = send(&scenario, "/api", &bearer(&intruder));
    assert_denied(&scenario, &reply, 403, "client_id_not_allowed", before);

    // The frontend token with its claims changed after signing.
    let mut parts: Vec<String> = token.split('.').map(str::to_string).collect();
    parts[1] = parts[1].chars().rev().collect();
    let before = inbound_records(&scenario).len();
    let reply = send(&scenario, "/api", &bearer(&parts.join(".")));
    assert_denied(&scenario, &reply, 401, "bad_signature", before);
    let challenge = reply.header("www-authenticate").unwrap_or_default();
    assert!(challenge.contains("error=\"invalid_token\""), "{challenge}");

    let audit = std::fs::read_to_string(&scenario.audit_path).unwrap();
    assert!(
        !audit.contains(&token),
        "the audit log must not contain a token"
    );
    assert!(
        !scenario.agent_log().contains(&token),
        "the agent log must not contain a token"
    );
}

#[test]
fn jwt_es256_tokens_accepted() {
    jwt_tokens_accepted("vjes", "ES256");
}

#[test]
fn jwt_rs256_tokens_accepted() {
    jwt_tokens_accepted("vjrs", "RS256");
}

#[test]
fn jwt_key_rotation_accepted_after_one_refetch() {
    let scenario = start(
        "vrot",
        standard_idp(TokenFormat::Jwt, Some("ES256"), 300),
        jwt_validator(&["jwks_min_refetch_interval: 1s", "jwks_refresh_interval: 1h"]),
    );
    let first = fetch_token(&scenario.idp, "frontend", "frontend-secret");
    assert_eq!(jose_header(&first)["kid"], "es256-1");
    assert_eq!(send(&scenario, "/api", &bearer(&first)).status, 200);
    assert_eq!(scenario.idp_stats().unwrap().jwks_requests, 1);

    let kids = block_on(scenario.idp.rotate_keys()).unwrap();
    assert_eq!(kids[0], "es256-2");
    // The minimum refetch interval since the first fetch passes.
    thread::sleep(Duration::from_millis(1200));
    let second = fetch_token(&scenario.idp, "frontend", "frontend-secret");
    assert_eq!(jose_header(&second)["kid"], "es256-2");

    let before = inbound_records(&scenario).len();
    let reply = send(&scenario, "/api", &bearer(&second));
    assert_eq!(reply.status, 200, "{reply:?}\n{}", scenario.agent_log());
    assert_eq!(last_inbound(&scenario, before)["reason"], "token_valid");
    assert_eq!(
        scenario.idp_stats().unwrap().jwks_requests,
        2,
        "one refetch for the new kid"
    );

    // Both the old and the new token keep working, without more fetches.
    assert_eq!(send(&scenario, "/api", &bearer(&first)).status, 200);
    assert_eq!(send(&scenario, "/api", &bearer(&second)).status, 200);
    assert_eq!(scenario.idp_stats().unwrap().jwks_requests, 2);
}

#[test]
fn jwt_expiring_on_keep_alive_connection_rejected() {
    let scenario = start(
        "vexp",
        standard_idp(TokenFormat::Jwt, Some("ES256"), 2),
        jwt_validator(&["leeway: 0s"]),
    );
    let token = fetch_token(&scenario.idp, "frontend", "frontend-secret");
    let mut connection = Connection::open(scenario.pod("frontend"), echo_addr(&scenario));
    let first = connection.send("GET", "/api", &bearer(&token));
    assert_eq!(first.status, 200, "{first:?}\n{}", scenario.agent_log());

    thread::sleep(Duration::from_secs(3));
    let before = inbound_records(&scenario).len();
    let second = connection.send("GET", "/api", &bearer(&token));
    assert_denied(&scenario, &second, 401, "token_expired", before);
    let challenge = second.header("www-authenticate").unwrap_or_default();
    assert!(challenge.contains("error=\"invalid_token\""), "{challenge}");
}

#[test]
fn opaque_expiring_on_keep_alive_connection_rejected() {
    // The cache allows 60 s, but the entry ends at the token's `exp`.
    let scenario = start(
        "voxp",
        standard_idp(TokenFormat::Opaque, None, 2),
        opaque_validator(&["introspection_cache_ttl: 60s"]),
    );
    let token = fetch_token(&scenario.idp, "frontend", "frontend-secret");
    let mut connection = Connection::open(scenario.pod("frontend"), echo_addr(&scenario));
    let first = connection.send("GET", "/api", &bearer(&token));
    assert_eq!(first.status, 200, "{first:?}\n{}", scenario.agent_log());

    thread::sleep(Duration::from_secs(3));
    let before = inbound_records(&scenario).len();
    let second = connection.send("GET", "/api", &bearer(&token));
    assert_denied(&scenario, &second, 401, "token_inactive", before);
    assert_eq!(scenario.idp_stats().unwrap().introspection_requests, 2);
}

#[test]
fn jwt_keys_keep_serving_while_provider_down() {
    let idp_config = standard_idp(TokenFormat::Jwt, Some("ES256"), 300);
    let mut scenario = start(
        "vjdn",
        idp_config.clone(),
        jwt_validator(&["jwks_refresh_interval: 1s", "jwks_min_refetch_interval: 1s"]),
    );
    let token = fetch_token(&scenario.idp, "frontend", "frontend-secret");
    assert_eq!(send(&scenario, "/api", &bearer(&token)).status, 200);

    let port = scenario.idp.port();
    scenario.idp.stop();
    thread::sleep(Duration::from_millis(1500));
    // The keys are due for a refresh, which fails; the cached keys keep serving.
    for _ in 0..3 {
        let reply = send(&scenario, "/api", &bearer(&token));
        assert_eq!(reply.status, 200, "{reply:?}\n{}", scenario.agent_log());
        thread::sleep(Duration::from_millis(600));
    }
    scenario
        .wait_for_log("JWKS refresh failed", Duration::from_secs(5))
        .expect("the agent warns about the failed refresh");

    // The provider comes back with new keys under the same kids; a background refresh
    // picks them up.
    let mut restarted = idp_config;
    restarted.port = port;
    scenario.idp = Idp::start(&restarted).expect("restart the provider");
    let fresh = fetch_token(&scenario.idp, "frontend", "frontend-secret");
    wait_until(
        Duration::from_secs(10),
        "a token of the restarted provider",
        || send(&scenario, "/api", &bearer(&fresh)).status == 200,
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", scenario.agent_log()));
}

#[test]
fn opaque_revocation_rejected_when_cache_entry_ends() {
    const CACHE_TTL: Duration = Duration::from_secs(3);
    let scenario = start(
        "vrev",
        standard_idp(TokenFormat::Opaque, None, 300),
        opaque_validator(&["introspection_cache_ttl: 3s"]),
    );
    let token = fetch_token(&scenario.idp, "frontend", "frontend-secret");
    let cached_at = Instant::now();
    let reply = send(&scenario, "/api", &bearer(&token));
    assert_eq!(reply.status, 200, "{reply:?}\n{}", scenario.agent_log());
    assert_eq!(reply.echoed()["headers"][CLIENT_ID_HEADER][0], "frontend");
    let introspections = scenario.idp_stats().unwrap().introspection_requests;
    assert_eq!(introspections, 1);

    // The second request is served from the cache.
    assert_eq!(send(&scenario, "/api", &bearer(&token)).status, 200);
    assert_eq!(scenario.idp_stats().unwrap().introspection_requests, 1);

    revoke(&scenario.idp, &token);
    let entry_ends = cached_at + CACHE_TTL + Duration::from_millis(200);
    thread::sleep(entry_ends.saturating_duration_since(Instant::now()));
    let before = inbound_records(&scenario).len();
    let reply = send(&scenario, "/api", &bearer(&token));
    assert_denied(&scenario, &reply, 401, "token_inactive", before);
    assert_eq!(scenario.idp_stats().unwrap().introspection_requests, 2);
}

#[test]
fn introspection_outage_is_503_then_recovers() {
    let idp_config = standard_idp(TokenFormat::Opaque, None, 300);
    let mut scenario = start("vidn", idp_config.clone(), opaque_validator(&[]));
    let token = fetch_token(&scenario.idp, "frontend", "frontend-secret");

    let port = scenario.idp.port();
    scenario.idp.stop();
    let before = inbound_records(&scenario).len();
    let reply = send(&scenario, "/api", &bearer(&token));
    assert_denied(&scenario, &reply, 503, "introspection_failed", before);
    assert_eq!(last_inbound(&scenario, before)["decision"], "error");
    assert!(reply.header("www-authenticate").is_none(), "{reply:?}");

    let mut restarted = idp_config;
    restarted.port = port;
    scenario.idp = Idp::start(&restarted).expect("restart the provider");
    let fresh = fetch_token(&scenario.idp, "frontend", "frontend-secret");
    let before = inbound_records(&scenario).len();
    let reply = send(&scenario, "/api", &bearer(&fresh));
    assert_eq!(reply.status, 200, "{reply:?}\n{}", scenario.agent_log());
    assert_eq!(last_inbound(&scenario, before)["reason"], "token_valid");
}

#[test]
fn malformed_requests_get_defined_answers() {
    let scenario = start(
        "vbad",
        standard_idp(TokenFormat::Opaque, None, 300),
        opaque_validator(&[]),
    );
    let token = fetch_token(&scenario.idp, "frontend", "frontend-secret");
    let cases: Vec<(&str, String, Vec<String>, u16, &str)> = vec![
        (
            "wrong scheme",
            "/api".into(),
            vec![format!("Authorization: Basic {token}")],
            401,
            "wrong_auth_scheme",
        ),
        (
            "two token headers",
            "/api".into(),
            vec![
                format!("Authorization: Bearer {token}"),
                format!("Authorization: Bearer {token}"),
            ],
            400,
            "several_token_headers",
        ),
        (
            "empty token",
            "/api".into(),
            vec!["Authorization: Bearer ".into()],
            400,
            "empty_token",
        ),
        ("no token", "/api".into(), vec![], 401, "missing_token"),
        (
            "token in query",
            format!("/api?access_token={token}"),
            vec![],
            400,
            "token_in_query_not_allowed",
        ),
        (
            "unknown token",
            "/api".into(),
            bearer("not-a-token-the-provider-issued"),
            401,
            "token_inactive",
        ),
    ];
    for (case, path, headers, status, reason) in cases {
        let before = inbound_records(&scenario).len();
        let reply = send(&scenario, &path, &headers);
        assert_eq!(reply.status, status, "{case}: {reply:?}");
        let record = last_inbound(&scenario, before);
        assert_eq!(record["reason"], reason, "{case}: {record}");
        assert_eq!(record["status"], status, "{case}: {record}");
    }

    // A request head over the agent's 64 KiB limit: hyper returns 431, the agent audits it.
    let before = inbound_records(&scenario).len();
    let huge = format!("X-Padding: {}", "a".repeat(70 * 1024));
    let reply = send(&scenario, "/api", &[bearer(&token).remove(0), huge]);
    assert_denied(&scenario, &reply, 431, "headers_too_large", before);

    // The agent kept serving: a good request still passes.
    assert_eq!(send(&scenario, "/api", &bearer(&token)).status, 200);
    let audit = std::fs::read_to_string(&scenario.audit_path).unwrap();
    assert!(
        !audit.contains(&token),
        "the audit log must not contain a token"
    );
}

#[test]
fn query_token_and_preflight_when_allowed() {
    let scenario = start(
        "vqry",
        standard_idp(TokenFormat::Jwt, Some("ES256"), 300),
        jwt_validator(&["allow_token_in_query: true", "allow_cors_preflight: true"]),
    );
    let token = fetch_token(&scenario.idp, "frontend", "frontend-secret");

    let before = inbound_records(&scenario).len();
    let reply = send(
        &scenario,
        &format!("/api?a=1&access_token={token}&b=2"),
        &[],
    );
    assert_eq!(reply.status, 200, "{reply:?}\n{}", scenario.agent_log());
    let echoed = reply.echoed();
    assert_eq!(
        echoed["query"], "a=1&b=2",
        "the app never sees the token: {echoed}"
    );
    assert_eq!(echoed["headers"][CLIENT_ID_HEADER][0], "frontend");
    let record = last_inbound(&scenario, before);
    assert_eq!(record["reason"], "token_valid");
    assert_eq!(record["path"], "/api");

    let before = inbound_records(&scenario).len();
    let reply = send(
        &scenario,
        &format!("/api?access_token={token}"),
        &bearer(&token),
    );
    assert_denied(&scenario, &reply, 400, "several_tokens", before);

    let mut connection = Connection::open(scenario.pod("frontend"), echo_addr(&scenario));
    let before = inbound_records(&scenario).len();
    let reply = connection.send(
        "OPTIONS",
        "/api",
        &[
            "Origin: https://app.test".into(),
            "Access-Control-Request-Method: POST".into(),
        ],
    );
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.echoed()["method"], "OPTIONS");
    assert!(reply.echoed()["headers"][CLIENT_ID_HEADER].is_null());
    let record = last_inbound(&scenario, before);
    assert_eq!(record["decision"], "allow");
    assert_eq!(record["reason"], "cors_preflight");

    // OPTIONS without the preflight headers still needs a token.
    let before = inbound_records(&scenario).len();
    let reply = connection.send("OPTIONS", "/api", &[]);
    assert_denied(&scenario, &reply, 401, "missing_token", before);
}
