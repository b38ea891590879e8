//! The agent end to end, as root on the real kernel: eBPF steering in real network
//! namespaces and cgroups, the real identity provider (npm `oidc-provider`, opaque
//! tokens) on loopback, the real agent binary, an HTTP echo app and curl as clients.
//! Each test builds its own scenario (see `tokenmesh_e2e::scenario`) and removes it,
//! also when it fails.

use std::path::PathBuf;

use tokenmesh_e2e::{
    scenario::{Binaries, CLIENT_ID_HEADER, PLAIN_PORT, PROTECTED_PORT, Scenario, records_where},
    topology::require_root,
};

fn scenario(prefix: &str) -> Scenario {
    require_root().expect("the end-to-end suite needs root");
    let binaries = Binaries::locate(PathBuf::from(env!("CARGO_BIN_EXE_echo")))
        .expect("cannot find the programs to run");
    Scenario::start(prefix, binaries).expect("cannot start the scenario")
}

#[test]
fn allowed_call_reaches_app_without_token() {
    let scenario = scenario("allow");
    let frontend_ip = scenario.pod("frontend").ip.to_string();
    let url = scenario.echo_url(PROTECTED_PORT, "/api/echo");

    let outcome = scenario.curl("frontend", &url, &[]).unwrap();

    assert_eq!(outcome.status, 200, "{outcome:?}\n{}", scenario.agent_log());
    assert_eq!(
        outcome.echoed_header("authorization").unwrap(),
        Vec::<String>::new()
    );
    assert_eq!(
        outcome.echoed_header(CLIENT_ID_HEADER).unwrap(),
        ["frontend"]
    );
    let echoed = outcome.echoed().unwrap();
    let app_peer = echoed["peer"].as_str().unwrap();
    assert!(
        app_peer.starts_with("127.0.0.1:"),
        "the agent hands requests to the app on loopback: {app_peer}"
    );

    let records = scenario.audit_records().unwrap();
    let outbound = records_where(&records, "outbound", PROTECTED_PORT);
    assert_eq!(outbound.len(), 1, "{records:#?}");
    assert_eq!(outbound[0]["decision"], "allow");
    assert_eq!(outbound[0]["reason"], "token_added");
    assert_eq!(outbound[0]["source_pod"], "demo/frontend");
    assert_eq!(outbound[0]["destination_pod"], "demo/echo");
    assert_eq!(outbound[0]["client_id"], "frontend");
    assert_eq!(outbound[0]["status"], 200);

    let inbound = records_where(&records, "inbound", PROTECTED_PORT);
    assert_eq!(inbound.len(), 1, "{records:#?}");
    assert_eq!(inbound[0]["decision"], "allow");
    assert_eq!(inbound[0]["reason"], "token_valid");
    assert_eq!(
        inbound[0]["source_ip"],
        frontend_ip.as_str(),
        "the real source pod IP"
    );
    assert_eq!(inbound[0]["client_id"], "frontend");
    assert_eq!(inbound[0]["method"], "GET");
    assert_eq!(inbound[0]["path"], "/api/echo");

    let audit_text = std::fs::read_to_string(&scenario.audit_path).unwrap();
    assert!(
        !audit_text.to_lowercase().contains("bearer"),
        "{audit_text}"
    );
}

#[test]
fn disallowed_client_gets_403() {
    let scenario = scenario("deny");
    let url = scenario.echo_url(PROTECTED_PORT, "/api/echo");

    let outcome = scenario.curl("intruder", &url, &[]).unwrap();

    assert_eq!(outcome.status, 403, "{outcome:?}\n{}", scenario.agent_log());
    let challenge = outcome
        .header("www-authenticate")
        .expect("WWW-Authenticate header");
    assert!(
        challenge.starts_with("Bearer realm=\"tokenmesh\""),
        "{challenge}"
    );
    assert!(challenge.contains("error_description="), "{challenge}");
    assert!(outcome.body.contains("not allowed"), "{}", outcome.body);

    let records = scenario.audit_records().unwrap();
    let inbound = records_where(&records, "inbound", PROTECTED_PORT);
    assert_eq!(inbound.len(), 1, "{records:#?}");
    assert_eq!(inbound[0]["decision"], "deny");
    assert_eq!(inbound[0]["reason"], "client_id_not_allowed");
    assert_eq!(inbound[0]["client_id"], "intruder");
    assert_eq!(inbound[0]["source_pod"], "demo/intruder");
    assert_eq!(inbound[0]["status"], 403);
}

#[test]
fn forged_headers_never_reach_app() {
    let scenario = scenario("forge");
    let url = scenario.echo_url(PROTECTED_PORT, "/api/echo");
    let forged_client = format!("{CLIENT_ID_HEADER}: intruder");

    let outcome = scenario
        .curl(
            "frontend",
            &url,
            &[&forged_client, "Authorization: Bearer forged-token"],
        )
        .unwrap();

    assert_eq!(outcome.status, 200, "{outcome:?}\n{}", scenario.agent_log());
    assert_eq!(
        outcome.echoed_header(CLIENT_ID_HEADER).unwrap(),
        ["frontend"]
    );
    assert_eq!(
        outcome.echoed_header("authorization").unwrap(),
        Vec::<String>::new()
    );
}

#[test]
fn source_outside_cidrs_rejected() {
    let scenario = scenario("cidr");
    let stranger_ip = scenario.pod("stranger").ip.to_string();
    let url = scenario.echo_url(PROTECTED_PORT, "/api/echo");

    let outcome = scenario.curl("stranger", &url, &[]).unwrap();

    assert_eq!(outcome.status, 403, "{outcome:?}\n{}", scenario.agent_log());
    let records = scenario.audit_records().unwrap();
    let outbound = records_where(&records, "outbound", PROTECTED_PORT);
    assert_eq!(outbound.len(), 1, "{records:#?}");
    assert_eq!(
        outbound[0]["reason"], "token_added",
        "stranger holds a valid frontend token"
    );
    let inbound = records_where(&records, "inbound", PROTECTED_PORT);
    assert_eq!(inbound.len(), 1, "{records:#?}");
    assert_eq!(inbound[0]["reason"], "source_ip_not_allowed");
    assert_eq!(inbound[0]["source_ip"], stranger_ip.as_str());
}

#[test]
fn fifty_requests_one_token_request() {
    let scenario = scenario("cache");
    let url = scenario.echo_url(PROTECTED_PORT, "/api/echo");

    let statuses = scenario.curl_parallel("frontend", &url, 50).unwrap();

    assert_eq!(statuses.len(), 50, "{statuses:?}");
    assert!(
        statuses.iter().all(|s| *s == 200),
        "{statuses:?}\n{}",
        scenario.agent_log()
    );
    let stats = scenario.idp_stats().unwrap();
    assert_eq!(stats.token_requests, 1, "{stats:?}");
    let records = scenario.audit_records().unwrap();
    assert_eq!(records_where(&records, "inbound", PROTECTED_PORT).len(), 50);
}

#[test]
fn unenrolled_caller_needs_token() {
    let scenario = scenario("bare");
    let url = scenario.echo_url(PROTECTED_PORT, "/api/echo");

    let outcome = scenario.curl_unenrolled("intruder", &url).unwrap();

    assert_eq!(outcome.status, 401, "{outcome:?}\n{}", scenario.agent_log());
    let challenge = outcome
        .header("www-authenticate")
        .expect("WWW-Authenticate header");
    assert!(
        !challenge.contains("error="),
        "no error code without credentials: {challenge}"
    );
    let records = scenario.audit_records().unwrap();
    let inbound = records_where(&records, "inbound", PROTECTED_PORT);
    assert_eq!(inbound.len(), 1, "{records:#?}");
    assert_eq!(inbound[0]["reason"], "missing_token");
    assert_eq!(inbound[0]["source_pod"], "demo/intruder");
}

#[test]
fn plain_port_passes_untouched() {
    let scenario = scenario("plain");
    let frontend_ip = scenario.pod("frontend").ip.to_string();
    let url = scenario.echo_url(PLAIN_PORT, "/plain");

    let outcome = scenario
        .curl("frontend", &url, &["Authorization: Bearer app-own"])
        .unwrap();

    assert_eq!(outcome.status, 200, "{outcome:?}");
    assert_eq!(
        outcome.echoed_header("authorization").unwrap(),
        ["Bearer app-own"]
    );
    assert_eq!(
        outcome.echoed_header(CLIENT_ID_HEADER).unwrap(),
        Vec::<String>::new()
    );
    let echoed = outcome.echoed().unwrap();
    let app_peer = echoed["peer"].as_str().unwrap();
    assert!(
        app_peer.starts_with(&format!("{frontend_ip}:")),
        "direct connection: {app_peer}"
    );
    let records = scenario.audit_records().unwrap();
    assert!(
        records_where(&records, "outbound", PLAIN_PORT).is_empty(),
        "{records:#?}"
    );
    assert_eq!(scenario.idp_stats().unwrap().token_requests, 0);
}

#[test]
fn stopped_agent_fails_closed() {
    let mut scenario = scenario("down");
    let url = scenario.echo_url(PROTECTED_PORT, "/api/echo");
    assert_eq!(scenario.curl("frontend", &url, &[]).unwrap().status, 200);

    let status = scenario.stop_agent().unwrap();
    assert!(
        status.success(),
        "agent exit status {status}\n{}",
        scenario.agent_log()
    );
    assert!(
        scenario.agent_log().contains("shutdown complete"),
        "{}",
        scenario.agent_log()
    );

    // connect4 still redirects to the closed outbound listener: refused (curl exit 7).
    let outcome = scenario.curl("frontend", &url, &[]).unwrap();
    assert_eq!(outcome.exit_code, 7, "{outcome:?}");
    assert_eq!(outcome.status, 0);
    let outcome = scenario.curl("stranger", &url, &[]).unwrap();
    assert_eq!(outcome.exit_code, 7, "{outcome:?}");
    // A process outside the pods' cgroups skips connect4; sk_lookup finds no agent
    // listener and the kernel replies to the SYN with a reset.
    let outcome = scenario.curl_unenrolled("intruder", &url).unwrap();
    assert_eq!(outcome.exit_code, 7, "{outcome:?}");
    // The app itself still runs: loopback inside the pod is never steered.
    let local = scenario
        .curl("echo", &format!("http://127.0.0.1:{PROTECTED_PORT}/"), &[])
        .unwrap();
    assert_eq!(local.status, 200, "{local:?}");
}

#[test]
fn excluded_network_not_steered() {
    let mut scenario = scenario("exclude");
    let url = scenario.echo_url(PROTECTED_PORT, "/api/echo");
    let echo_ip = scenario.pod("echo").ip;
    let subnet = scenario.topology.subnet();
    assert_eq!(scenario.curl("frontend", &url, &[]).unwrap().status, 200);
    scenario.stop_agent().unwrap();

    // The pod subnet is intercepted but echo's own address is excluded, and the longer
    // prefix decides. A restart picks up the change; the pinned maps are rewritten.
    scenario
        .rewrite_config(|text| {
            text.replace(
                "  intercept_ports: [8080]\n",
                &format!(
                    "  intercept_ports: [8080]\n  intercept_cidrs: [{subnet}]\n  exclude_cidrs: [{echo_ip}/32]\n"
                ),
            )
        })
        .unwrap();
    scenario.start_agent().unwrap();

    let outcome = scenario.curl("frontend", &url, &[]).unwrap();
    assert_eq!(
        outcome.status, 401,
        "not steered out, so no token: {outcome:?}"
    );
    let records = scenario.audit_records().unwrap();
    let outbound = records_where(&records, "outbound", PROTECTED_PORT);
    assert_eq!(
        outbound.len(),
        1,
        "only the request before the restart: {records:#?}"
    );
    let inbound = records_where(&records, "inbound", PROTECTED_PORT);
    assert_eq!(inbound.last().unwrap()["reason"], "missing_token");
}

#[test]
fn detach_on_exit_removes_steering() {
    let mut scenario = scenario("detach");
    let url = scenario.echo_url(PROTECTED_PORT, "/api/echo");
    scenario.stop_agent().unwrap();
    scenario
        .rewrite_config(|text| {
            text.replace(
                "  intercept_ports: [8080]\n",
                "  intercept_ports: [8080]\n  on_exit: detach\n",
            )
        })
        .unwrap();
    scenario.start_agent().unwrap();
    assert_eq!(scenario.curl("frontend", &url, &[]).unwrap().status, 200);

    let status = scenario.stop_agent().unwrap();

    assert!(status.success(), "{}", scenario.agent_log());
    assert!(
        !scenario.bpffs_dir.exists(),
        "{} is still there",
        scenario.bpffs_dir.display()
    );
    // With everything detached the app is reached directly, with no token and no client
    // id: this is why `keep` is the default.
    let outcome = scenario.curl("frontend", &url, &[]).unwrap();
    assert_eq!(outcome.status, 200, "{outcome:?}");
    assert_eq!(
        outcome.echoed_header(CLIENT_ID_HEADER).unwrap(),
        Vec::<String>::new()
    );
}

/// Runs the agent in a cgroup below the pods' parent cgroup, as a DaemonSet pod's agent
/// is on a node, and checks that its own upstream connect is not steered back into it.
/// With `cgroup_namespace`, the agent also gets a cgroup namespace of its own.
fn assert_agent_connects_not_steered(prefix: &str, cgroup_namespace: bool) {
    let mut scenario = scenario(prefix);
    let url = scenario.echo_url(PROTECTED_PORT, "/api/echo");
    scenario.stop_agent().unwrap();

    scenario.agent_cgroup = Some(scenario.topology.pods_cgroup().join("tokenmesh-agent"));
    scenario.agent_cgroup_namespace = cgroup_namespace;
    scenario.start_agent().unwrap();

    let outcome = scenario.curl("frontend", &url, &[]).unwrap();
    assert_eq!(outcome.status, 200, "{outcome:?}\n{}", scenario.agent_log());
    assert_eq!(
        outcome.echoed_header(CLIENT_ID_HEADER).unwrap(),
        ["frontend"]
    );
    let records = scenario.audit_records().unwrap();
    assert_eq!(
        records_where(&records, "outbound", PROTECTED_PORT).len(),
        1,
        "one outbound hop, not a loop: {records:#?}"
    );
}

#[test]
fn agent_below_pods_cgroup_not_steered() {
    // The agent's upstream sockets, made in the pods' namespaces, would be steered back
    // into it if connect4 did not skip the agent's cgroup.
    assert_agent_connects_not_steered("inpods", false);
}

#[test]
fn agent_in_cgroup_namespace_not_steered() {
    // An unprivileged container on cgroup v2 gets a cgroup namespace of its own, so the
    // agent reads its cgroup as "/" and must find its real cgroup another way.
    assert_agent_connects_not_steered("cgroupns", true);
}
