//! The token creator (outbound side) end to end, as root on the real kernel: the real
//! agent binary in the node scenario of `tokenmesh_e2e::scenario`, the real identity
//! provider (npm `oidc-provider`) on loopback, curl in the pods. Each test builds its own
//! scenario and removes it, also when it fails.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use tokenmesh_e2e::{
    idp::{IdpClient, IdpConfig, KeyType, generate_client_key},
    process::ChildGuard,
    scenario::{
        Binaries, CLIENT_ID_HEADER, PROTECTED_PORT, Scenario, ScenarioOptions, records_where,
        wait_until,
    },
    topology::require_root,
};

const RESOURCE: &str = "https://echo.tokenmesh.test/";
const AUDIENCE: &str = "https://api.tokenmesh.test";

fn binaries() -> Binaries {
    Binaries::locate(PathBuf::from(env!("CARGO_BIN_EXE_echo")))
        .expect("cannot find the programs to run")
}

fn scenario(prefix: &str, options: ScenarioOptions) -> Scenario {
    require_root().expect("the end-to-end suite needs root");
    Scenario::start_with(prefix, binaries(), options).expect("cannot start the scenario")
}

/// Returns the clients of the standard scenario, with the given `frontend` client in
/// place of the standard one.
fn clients(frontend: Option<IdpClient>) -> Vec<IdpClient> {
    vec![
        frontend.unwrap_or_else(|| IdpClient::new("frontend", "frontend-secret", "admin")),
        IdpClient::new("intruder", "intruder-secret", "admin"),
        IdpClient::new("echo-validator", "validator-secret", ""),
    ]
}

fn lines(lines: &[&str]) -> Vec<String> {
    lines.iter().map(|line| line.to_string()).collect()
}

/// Lines the echo app on the echo pod's protected port printed for requests to `path`.
fn echo_requests(scenario: &Scenario, path: &str) -> Vec<String> {
    let log = std::fs::read_to_string(
        scenario
            .dir
            .path()
            .join(format!("echo-{PROTECTED_PORT}.stdout")),
    )
    .unwrap_or_default();
    log.lines()
        .filter(|line| line.contains(&format!(" {path} from ")))
        .map(str::to_string)
        .collect()
}

/// Fingerprints in the agent's "access token received" log lines, in order.
fn received_token_fingerprints(scenario: &Scenario) -> Vec<String> {
    scenario
        .agent_log()
        .lines()
        .filter(|line| line.contains("access token received"))
        .filter_map(|line| {
            let start = line.find("token.fingerprint")? + "token.fingerprint".len();
            let rest = line[start..].trim_start_matches(['"', ':', '=', ' ']);
            Some(rest.chars().take_while(char::is_ascii_hexdigit).collect())
        })
        .collect()
}

/// Starts an echo app on port 8080 in the intruder pod, which no validator protects, so
/// the token the agent added reaches it unchanged.
fn start_token_echo(scenario: &Scenario) -> ChildGuard {
    let mut command = scenario.pod("intruder").command(env!("CARGO_BIN_EXE_echo"));
    command.args(["--listen", &format!("0.0.0.0:{PROTECTED_PORT}")]);
    let echo = ChildGuard::spawn(command, "intruder-echo", scenario.dir.path()).unwrap();
    let local = format!("http://127.0.0.1:{PROTECTED_PORT}/");
    wait_until(
        Duration::from_secs(10),
        "echo app in the intruder pod",
        || {
            scenario
                .curl("intruder", &local, &[])
                .is_ok_and(|outcome| outcome.status == 200)
        },
    )
    .unwrap();
    echo
}

/// Sends `token` to the provider's introspection endpoint as `echo-validator`.
fn introspect(scenario: &Scenario, token: &str) -> serde_json::Value {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        reqwest::Client::new()
            .post(scenario.idp.introspection_endpoint())
            .basic_auth("echo-validator", Some("validator-secret"))
            .form(&[("token", token)])
            .send()
            .await
            .unwrap()
            .error_for_status()
            .unwrap()
            .json()
            .await
            .unwrap()
    })
}

/// Calls the token echo in the intruder pod from frontend and returns the token that
/// arrived there.
fn token_seen_by_echo(scenario: &Scenario) -> String {
    let url = format!(
        "http://{}:{PROTECTED_PORT}/token",
        scenario.pod("intruder").ip
    );
    let outcome = scenario.curl("frontend", &url, &[]).unwrap();
    assert_eq!(outcome.status, 200, "{outcome:?}\n{}", scenario.agent_log());
    let authorization = outcome.echoed_header("authorization").unwrap();
    assert_eq!(authorization.len(), 1, "{outcome:?}");
    authorization[0]
        .strip_prefix("Bearer ")
        .expect("a Bearer token")
        .to_string()
}

#[test]
fn private_key_jwt_end_to_end() {
    let key = generate_client_key(KeyType::EcP256).unwrap();
    let options = ScenarioOptions {
        idp: Some(IdpConfig::new(clients(Some(IdpClient::private_key_jwt(
            "frontend",
            "admin",
            key.public_jwk.clone(),
        ))))),
        frontend_parameters: Some(lines(&[
            "client_auth_method: private_key_jwt",
            "private_key: file:keys/frontend.pem",
            "scopes: [admin]",
        ])),
        files: vec![("keys/frontend.pem".into(), key.private_pem.clone())],
        ..ScenarioOptions::default()
    };
    let scenario = scenario("pkjwt", options);
    let url = scenario.echo_url(PROTECTED_PORT, "/api/echo");

    let outcome = scenario.curl("frontend", &url, &[]).unwrap();

    assert_eq!(outcome.status, 200, "{outcome:?}\n{}", scenario.agent_log());
    assert_eq!(
        outcome.echoed_header(CLIENT_ID_HEADER).unwrap(),
        ["frontend"]
    );
    let records = scenario.audit_records().unwrap();
    let outbound = records_where(&records, "outbound", PROTECTED_PORT);
    assert_eq!(outbound.len(), 1, "{records:#?}");
    assert_eq!(outbound[0]["reason"], "token_added");
    assert_eq!(outbound[0]["client_id"], "frontend");
    let inbound = records_where(&records, "inbound", PROTECTED_PORT);
    assert_eq!(inbound.len(), 1, "{records:#?}");
    assert_eq!(inbound[0]["reason"], "token_valid");
    assert_eq!(scenario.idp_stats().unwrap().token_requests, 1);

    let log = scenario.agent_log();
    let key_body = key.private_pem.lines().nth(1).unwrap();
    assert!(!log.contains(key_body), "the agent logged its private key");
    assert!(
        !log.contains("client_assertion="),
        "the agent logged an assertion"
    );
}

#[test]
fn provider_down_then_back() {
    let idp_config = IdpConfig::new(clients(None));
    let options = ScenarioOptions {
        idp: Some(idp_config.clone()),
        ..ScenarioOptions::default()
    };
    let mut scenario = scenario("idpdown", options);
    let url = scenario.echo_url(PROTECTED_PORT, "/api/echo");
    let port = scenario.idp.port();
    scenario.idp.stop();

    let outcome = scenario.curl("frontend", &url, &[]).unwrap();

    assert_eq!(outcome.status, 503, "{outcome:?}\n{}", scenario.agent_log());
    assert!(
        outcome.body.contains("token_unavailable"),
        "{}",
        outcome.body
    );
    assert!(outcome.body.contains("client frontend"), "{}", outcome.body);
    assert!(
        outcome.body.contains("connection failed"),
        "{}",
        outcome.body
    );
    assert_eq!(
        outcome.header("retry-after").as_deref(),
        Some("2"),
        "{outcome:?}"
    );
    assert!(
        scenario
            .agent_log()
            .contains("token request failed; retrying"),
        "connection errors are retried\n{}",
        scenario.agent_log()
    );
    let records = scenario.audit_records().unwrap();
    let outbound = records_where(&records, "outbound", PROTECTED_PORT);
    assert_eq!(outbound.len(), 1, "{records:#?}");
    assert_eq!(outbound[0]["decision"], "error");
    assert_eq!(outbound[0]["reason"], "token_unavailable");
    assert_eq!(outbound[0]["status"], 503);
    assert_eq!(outbound[0]["client_id"], "frontend");
    assert!(
        records_where(&records, "inbound", PROTECTED_PORT).is_empty(),
        "{records:#?}"
    );
    assert_eq!(echo_requests(&scenario, "/api/echo"), Vec::<String>::new());

    // The provider comes back on the same port; the running agent gets a token again.
    scenario.idp = tokenmesh_e2e::idp::Idp::start(&IdpConfig { port, ..idp_config }).unwrap();
    let mut last = None;
    let recovered = wait_until(
        Duration::from_secs(20),
        "a 200 after the provider restart",
        || {
            let outcome = scenario.curl("frontend", &url, &[]).unwrap();
            let ok = outcome.status == 200;
            last = Some(outcome);
            ok
        },
    );
    assert!(recovered.is_ok(), "{last:?}\n{}", scenario.agent_log());
    assert_eq!(echo_requests(&scenario, "/api/echo").len(), 1);
    let stats = scenario.idp_stats().unwrap();
    assert_eq!(stats.token_requests, 1, "{stats:?}");
}

#[test]
fn invalid_client_not_retried() {
    let options = ScenarioOptions {
        frontend_parameters: Some(lines(&[
            "client_secret: file:secrets/wrong",
            "scopes: [admin]",
        ])),
        files: vec![("secrets/wrong".into(), "not-the-secret\n".into())],
        ..ScenarioOptions::default()
    };
    let scenario = scenario("badclient", options);
    let url = scenario.echo_url(PROTECTED_PORT, "/api/echo");

    let outcome = scenario.curl("frontend", &url, &[]).unwrap();

    assert_eq!(outcome.status, 503, "{outcome:?}\n{}", scenario.agent_log());
    assert!(
        outcome.body.contains("token_unavailable"),
        "{}",
        outcome.body
    );
    assert!(outcome.body.contains("invalid_client"), "{}", outcome.body);
    assert!(!outcome.body.contains("not-the-secret"), "{}", outcome.body);
    assert_eq!(
        scenario.idp_stats().unwrap().token_requests,
        1,
        "a 401 is not retried"
    );
    assert_eq!(echo_requests(&scenario, "/api/echo"), Vec::<String>::new());
    assert!(!scenario.agent_log().contains("not-the-secret"));
}

#[test]
fn token_renewed_during_keepalive() {
    // Tokens live 8 s and are renewed from 4 s before expiry. Requests at 0, 3, 6 and
    // 9 s on one connection: the one at 6 s starts the renewal, the one at 9 s is sent
    // after the first token expired, with the second.
    let mut idp_config = IdpConfig::new(clients(None));
    idp_config.token_ttl_seconds = 8;
    let options = ScenarioOptions {
        idp: Some(idp_config),
        proxy: lines(&["token_refresh_skew: 4s"]),
        ..ScenarioOptions::default()
    };
    let scenario = scenario("renew", options);
    let url = scenario.echo_url(PROTECTED_PORT, "/api/echo");

    // `--rate 20/m` starts one transfer every 3 s, and curl reuses the connection.
    let mut command = scenario.pod("frontend").command("curl");
    command.args([
        "-sS",
        "--max-time",
        "30",
        "--rate",
        "20/m",
        "-w",
        "%{http_code} %{num_connects}\n",
    ]);
    for _ in 0..4 {
        command.args(["-o", "/dev/null", &url]);
    }
    let output = run(command);

    let results: Vec<(u16, u32)> = output
        .lines()
        .map(|line| {
            let (status, connects) = line.split_once(' ').unwrap();
            (status.parse().unwrap(), connects.parse().unwrap())
        })
        .collect();
    assert_eq!(
        results,
        [(200, 1), (200, 0), (200, 0), (200, 0)],
        "four 200s on one connection\n{}",
        scenario.agent_log()
    );
    let stats = scenario.idp_stats().unwrap();
    assert_eq!(
        stats.token_requests,
        2,
        "{stats:?}\n{}",
        scenario.agent_log()
    );
    let fingerprints = received_token_fingerprints(&scenario);
    assert_eq!(fingerprints.len(), 2, "{}", scenario.agent_log());
    assert_ne!(fingerprints[0], fingerprints[1]);
    let records = scenario.audit_records().unwrap();
    let inbound = records_where(&records, "inbound", PROTECTED_PORT);
    assert_eq!(inbound.len(), 4, "{records:#?}");
    assert!(
        inbound.iter().all(|r| r["reason"] == "token_valid"),
        "{records:#?}"
    );
}

#[test]
fn scope_and_audience_reach_provider() {
    let mut idp_config = IdpConfig::new(clients(None));
    idp_config.resources = vec![AUDIENCE.to_string()];
    let options = ScenarioOptions {
        idp: Some(idp_config),
        frontend_parameters: Some(lines(&[
            "client_secret: file:secrets/frontend",
            "scopes: [admin]",
            &format!("audience: {AUDIENCE}"),
        ])),
        ..ScenarioOptions::default()
    };
    let scenario = scenario("audience", options);
    let _echo = start_token_echo(&scenario);

    let token = token_seen_by_echo(&scenario);

    let claims = introspect(&scenario, &token);
    assert_eq!(claims["active"], true, "{claims}");
    assert_eq!(claims["client_id"], "frontend", "{claims}");
    assert_eq!(claims["scope"], "admin", "{claims}");
    assert_eq!(audiences(&claims), [AUDIENCE], "{claims}");
}

#[test]
fn resource_reaches_provider() {
    let mut idp_config = IdpConfig::new(clients(None));
    idp_config.resources = vec![RESOURCE.to_string()];
    let options = ScenarioOptions {
        idp: Some(idp_config),
        frontend_parameters: Some(lines(&[
            "client_secret: file:secrets/frontend",
            "scopes: [admin]",
            &format!("resources: [\"{RESOURCE}\"]"),
        ])),
        ..ScenarioOptions::default()
    };
    let scenario = scenario("resource", options);
    let _echo = start_token_echo(&scenario);

    let token = token_seen_by_echo(&scenario);

    let claims = introspect(&scenario, &token);
    assert_eq!(claims["active"], true, "{claims}");
    assert_eq!(claims["client_id"], "frontend", "{claims}");
    assert_eq!(claims["scope"], "admin", "{claims}");
    assert_eq!(audiences(&claims), [RESOURCE], "{claims}");
}

/// Returns the `aud` member of an introspection response, which may be a string or a
/// list.
fn audiences(claims: &serde_json::Value) -> Vec<String> {
    match &claims["aud"] {
        serde_json::Value::String(aud) => vec![aud.clone()],
        serde_json::Value::Array(values) => values
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect(),
        _ => Vec::new(),
    }
}

/// Runs `command` and returns its stdout; fails with its stderr.
fn run(mut command: Command) -> String {
    let output = command.output().expect("cannot run the command");
    assert!(
        output.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}
