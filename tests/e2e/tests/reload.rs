//! Hot reload, as root with the real agent: a new rule takes effect under steady load
//! without a failed request, a bad file changes nothing, pods come and go without a
//! restart, and SIGHUP reloads. See `tokenmesh_e2e::scenario` for the node.

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use tokenmesh_e2e::{
    scenario::{Binaries, CLIENT_ID_HEADER, PROTECTED_PORT, Scenario},
    topology::require_root,
};

fn scenario(prefix: &str) -> Scenario {
    require_root().expect("the end-to-end suite needs root");
    let binaries = Binaries::locate(PathBuf::from(env!("CARGO_BIN_EXE_echo")))
        .expect("cannot find the programs to run");
    Scenario::start(prefix, binaries).expect("cannot start the scenario")
}

/// Adds a rule that renames the client id header for `*/api/echo*`.
fn add_header_rule(text: String) -> String {
    format!(
        "{text}urls:\n  - pattern: \"*/api/echo*\"\n    plugins:\n      echo-validator:\n        parameters:\n          client_id_header: x-caller-id\n"
    )
}

#[test]
fn rule_reload_under_load_loses_nothing() {
    let scenario = Arc::new(scenario("reload"));
    let url = scenario.echo_url(PROTECTED_PORT, "/api/echo");
    let stop = Arc::new(AtomicBool::new(false));

    // Steady load: batches of 20 keep-alive requests from frontend, back to back.
    let load = {
        let scenario = scenario.clone();
        let stop = stop.clone();
        let url = url.clone();
        std::thread::spawn(move || {
            let mut statuses = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                let batch = scenario.curl_sequential("frontend", &url, 20).unwrap();
                statuses.extend(batch);
            }
            statuses
        })
    };
    std::thread::sleep(Duration::from_millis(500));

    scenario.rewrite_config(add_header_rule).unwrap();
    let written = Instant::now();
    let mut seen = None;
    while written.elapsed() < Duration::from_secs(5) {
        let outcome = scenario.curl("frontend", &url, &[]).unwrap();
        assert_eq!(outcome.status, 200, "{outcome:?}");
        if outcome.echoed_header("x-caller-id").unwrap() == ["frontend"] {
            seen = Some(written.elapsed());
            assert_eq!(
                outcome.echoed_header(CLIENT_ID_HEADER).unwrap(),
                Vec::<String>::new()
            );
            break;
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::SeqCst);
    let statuses = load.join().unwrap();

    let seen =
        seen.unwrap_or_else(|| panic!("the new rule never applied\n{}", scenario.agent_log()));
    assert!(
        seen < Duration::from_secs(1),
        "the new rule applied after {seen:?}"
    );
    assert!(statuses.len() >= 20, "{statuses:?}");
    let failed: Vec<&u16> = statuses.iter().filter(|s| **s != 200).collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {failed:?}",
        failed.len(),
        statuses.len()
    );
    assert!(scenario.agent_log().contains("configuration reloaded"));
}

#[test]
fn bad_reload_changes_nothing() {
    let scenario = scenario("badreload");
    let url = scenario.echo_url(PROTECTED_PORT, "/api/echo");

    scenario
        .rewrite_config(|text| add_header_rule(text).replace("/32]", "/33]"))
        .unwrap();
    scenario
        .wait_for_log("config reload rejected", Duration::from_secs(5))
        .unwrap();

    let log = scenario.agent_log();
    assert!(
        log.contains("allowed_cidrs[1]"),
        "the rejection names the key: {log}"
    );
    let outcome = scenario.curl("frontend", &url, &[]).unwrap();
    assert_eq!(outcome.status, 200, "{outcome:?}");
    assert_eq!(
        outcome.echoed_header(CLIENT_ID_HEADER).unwrap(),
        ["frontend"]
    );
    assert_eq!(
        outcome.echoed_header("x-caller-id").unwrap(),
        Vec::<String>::new()
    );
    let denied = scenario.curl("intruder", &url, &[]).unwrap();
    assert_eq!(denied.status, 403, "{denied:?}");
}

#[test]
fn pods_come_and_go_without_restart() {
    let scenario = scenario("podset");
    let url = scenario.echo_url(PROTECTED_PORT, "/api/echo");
    assert_eq!(scenario.curl("intruder", &url, &[]).unwrap().status, 403);
    let workloads = scenario.dir.path().join("workloads.yaml");
    let original = std::fs::read_to_string(&workloads).unwrap();

    // Without intruder in the file its connections are no longer steered on the way
    // out, so it arrives at echo's agent without a token.
    scenario
        .rewrite_workloads(&["frontend", "echo", "stranger"])
        .unwrap();
    scenario
        .wait_for_log("pod removed", Duration::from_secs(5))
        .unwrap();
    let bare = scenario.curl("intruder", &url, &[]).unwrap();
    assert_eq!(bare.status, 401, "{bare:?}\n{}", scenario.agent_log());

    // Back in the file, intruder is steered again and gets its own token.
    std::fs::write(&workloads, original).unwrap();
    scenario
        .wait_for_log("pods.added=1", Duration::from_secs(5))
        .unwrap();
    let denied = scenario.curl("intruder", &url, &[]).unwrap();
    assert_eq!(denied.status, 403, "{denied:?}\n{}", scenario.agent_log());
    let records = scenario.audit_records().unwrap();
    let last = records
        .iter()
        .rev()
        .find(|r| r["direction"] == "inbound")
        .unwrap();
    assert_eq!(last["reason"], "client_id_not_allowed");
}

#[test]
fn changed_pod_stays_steered() {
    let scenario = Arc::new(scenario("podchange"));
    let url = scenario.echo_url(PROTECTED_PORT, "/api/echo");
    let stop = Arc::new(AtomicBool::new(false));

    // New connections from frontend, back to back: one curl run, one connection.
    let load = {
        let scenario = scenario.clone();
        let stop = stop.clone();
        let url = url.clone();
        std::thread::spawn(move || {
            let mut statuses = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                statuses.push(scenario.curl("frontend", &url, &[]).unwrap().status);
            }
            statuses
        })
    };
    std::thread::sleep(Duration::from_millis(300));

    // A new label changes the pod, so the agent replaces its steering while frontend
    // keeps connecting. A connection that bypassed the agent would reach echo's agent
    // without a token and get 401.
    let workloads = scenario.dir.path().join("workloads.yaml");
    let mut document: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(&workloads).unwrap()).unwrap();
    let frontend = document["pods"]
        .as_sequence_mut()
        .unwrap()
        .iter_mut()
        .find(|pod| pod["name"] == "frontend")
        .unwrap();
    frontend["labels"] = serde_yaml::from_str("{tier: web}").unwrap();
    let staged = workloads.with_extension("new");
    std::fs::write(&staged, serde_yaml::to_string(&document).unwrap()).unwrap();
    std::fs::rename(&staged, &workloads).unwrap();
    scenario
        .wait_for_log("pods.replaced=1", Duration::from_secs(5))
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::SeqCst);
    let statuses = load.join().unwrap();

    assert!(statuses.len() >= 5, "{statuses:?}");
    let failed: Vec<&u16> = statuses.iter().filter(|s| **s != 200).collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {failed:?}\n{}",
        failed.len(),
        statuses.len(),
        scenario.agent_log()
    );
    let after = scenario.curl("frontend", &url, &[]).unwrap();
    assert_eq!(after.status, 200, "{after:?}\n{}", scenario.agent_log());
}

#[test]
fn sighup_reloads() {
    let scenario = scenario("sighup");
    scenario
        .signal_agent(nix::sys::signal::Signal::SIGHUP)
        .unwrap();
    scenario
        .wait_for_log("configuration reloaded", Duration::from_secs(5))
        .unwrap();
    let log = scenario.agent_log();
    let line = log
        .lines()
        .find(|l| l.contains("configuration reloaded"))
        .unwrap();
    assert!(line.contains("SIGHUP"), "{line}");
    let url = scenario.echo_url(PROTECTED_PORT, "/api/echo");
    assert_eq!(scenario.curl("frontend", &url, &[]).unwrap().status, 200);
}
