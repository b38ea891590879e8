//! `cargo xtask demo`: builds the node scenario (four pods, the identity provider, the
//! agent), sends allowed and denied requests, prints each outcome with the audit records
//! it produced, and removes everything it made.

use std::time::Duration;

use anyhow::Context;
use tokenmesh_e2e::{
    scenario::{Binaries, CLIENT_ID_HEADER, PLAIN_PORT, PROTECTED_PORT, Scenario},
    topology::require_root,
};

struct Step {
    title: &'static str,
    pod: &'static str,
    port: u16,
    headers: &'static [&'static str],
    unenrolled: bool,
}

const STEPS: [Step; 6] = [
    Step {
        title: "frontend calls echo: the agent adds frontend's token, echo's agent accepts it",
        pod: "frontend",
        port: PROTECTED_PORT,
        headers: &[],
        unenrolled: false,
    },
    Step {
        title: "frontend forges the client id header and sends its own token",
        pod: "frontend",
        port: PROTECTED_PORT,
        headers: &[
            "x-tokenmesh-client-id: admin",
            "Authorization: Bearer made-up",
        ],
        unenrolled: false,
    },
    Step {
        title: "intruder calls echo with a valid token of a client echo does not allow",
        pod: "intruder",
        port: PROTECTED_PORT,
        headers: &[],
        unenrolled: false,
    },
    Step {
        title: "stranger holds a valid frontend token but calls from outside the allowed networks",
        pod: "stranger",
        port: PROTECTED_PORT,
        headers: &[],
        unenrolled: false,
    },
    Step {
        title: "a process in intruder's network namespace but outside the pods' cgroups, so not steered, calls echo without a token",
        pod: "intruder",
        port: PROTECTED_PORT,
        headers: &[],
        unenrolled: true,
    },
    Step {
        title: "frontend calls a port that is not intercepted: untouched, not audited",
        pod: "frontend",
        port: PLAIN_PORT,
        headers: &[],
        unenrolled: false,
    },
];

fn main() -> anyhow::Result<()> {
    require_root()?;
    let echo = std::env::current_exe()?
        .parent()
        .context("the demo binary has no folder")?
        .join("echo");
    let binaries = Binaries::locate(echo)?;
    println!("Setting up a node: pods frontend, echo, intruder and stranger in their own");
    println!("network namespaces and cgroups, oidc-provider on loopback, and the agent.\n");
    let mut scenario = Scenario::start("demo", binaries)?;
    for (name, pod) in ["frontend", "echo", "intruder", "stranger"].map(|n| (n, scenario.pod(n))) {
        println!("  {name:<9} {}", pod.ip);
    }
    println!(
        "\nAgent config: {} (removed when the demo ends)\n",
        scenario.config_path.display()
    );

    for (i, step) in STEPS.iter().enumerate() {
        run_step(&scenario, i + 1, step)?;
    }

    println!(
        "{}. The agent stops (SIGTERM); its programs stay attached.",
        STEPS.len() + 1
    );
    scenario.stop_agent()?;
    let url = scenario.echo_url(PROTECTED_PORT, "/api/echo");
    let outcome = scenario.curl("frontend", &url, &[])?;
    let result = if outcome.exit_code == 7 {
        "connection refused: no bypass while the agent is down".to_string()
    } else {
        format!(
            "UNEXPECTED: curl exit {} status {}",
            outcome.exit_code, outcome.status
        )
    };
    println!("   frontend -> {url}\n   {result}\n");
    println!("Cleaning up: programs, pins, namespaces, cgroups and processes.");
    drop(scenario);
    std::thread::sleep(Duration::from_millis(100));
    println!("Done.");
    Ok(())
}

fn run_step(scenario: &Scenario, number: usize, step: &Step) -> anyhow::Result<()> {
    let before = scenario.audit_records()?.len();
    let url = scenario.echo_url(step.port, "/api/echo");
    let outcome = if step.unenrolled {
        scenario.curl_unenrolled(step.pod, &url)?
    } else {
        scenario.curl(step.pod, &url, step.headers)?
    };
    println!("{number}. {}", step.title);
    println!("   {} -> {url}", step.pod);
    if !step.headers.is_empty() {
        println!(
            "   request headers from the app: {}",
            step.headers.join(", ")
        );
    }
    if outcome.status == 200 {
        let client = outcome.echoed_header(CLIENT_ID_HEADER)?;
        let authorization = outcome.echoed_header("authorization")?;
        println!(
            "   200 OK; the app saw {CLIENT_ID_HEADER}: {}, authorization: {}",
            show(&client),
            show(&authorization)
        );
    } else {
        let reason = outcome.body.trim();
        println!("   {} {reason}", outcome.status);
    }
    let records = scenario.audit_records()?;
    let new = &records[before.min(records.len())..];
    if new.is_empty() {
        println!("   audit: no record");
    }
    for record in new {
        println!(
            "   audit: {:<8} {:<5} {:<22} status={:<3} client={:<9} {} -> {} ({} ms)",
            text(&record["direction"]),
            text(&record["decision"]),
            text(&record["reason"]),
            text(&record["status"]),
            text(&record["client_id"]),
            text(&record["source_ip"]),
            text(&record["destination"]),
            record["latency_ms"],
        );
    }
    println!();
    Ok(())
}

fn show(values: &[String]) -> String {
    if values.is_empty() {
        "(none)".into()
    } else {
        values.join(", ")
    }
}

fn text(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(text) => text.clone(),
        serde_json::Value::Number(number) => number.to_string(),
        _ => "-".into(),
    }
}
