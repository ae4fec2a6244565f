//! The monitoring stack in deploy/ and docker-compose.yml, checked with the
//! real tools: promtool runs the rules' unit tests, a real Prometheus
//! scrapes the running binary and evaluates every rule and every dashboard
//! query, and docker-compose (which needs no daemon for `config`) validates
//! the compose file, whose mounts and ports are then checked here.
//!
//! The tools come from Debian (`prometheus`, `docker-compose`); `.ci/run`
//! installs them. Without them these tests say so and pass, except under
//! CI=true, where they fail. They run on the real clock: Prometheus scrapes
//! on its own schedule.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::helpers::{free_port_below_32768, repo, run, spawn_binary};

/// The tool's path, or None after saying why the test does not run.
fn tool(name: &str, package: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        let why = format!("{name} is not installed (Debian: apt-get install {package})");
        if std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false") {
            panic!("{why}; .ci/run installs it");
        }
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "SKIPPED a monitoring test: {why}");
    }
    found
}

#[test]
fn the_rules_pass_their_promtool_unit_tests_and_the_config_checks() {
    let Some(promtool) = tool("promtool", "prometheus") else {
        return;
    };
    let dir = repo().join("deploy/prometheus");
    run(Command::new(&promtool)
        .args(["test", "rules", "rules_test.yml"])
        .current_dir(&dir))
    .unwrap();
    run(Command::new(&promtool)
        .args(["check", "config", "prometheus.yml"])
        .current_dir(&dir))
    .unwrap();
}

/// Every query of every dashboard panel, with Grafana's interval variables
/// given values that suit a 1 s scrape.
fn dashboard_queries() -> Vec<(String, String)> {
    let path = repo().join("deploy/grafana/dashboards/reliability-lab.json");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        let title = panel["title"].as_str().unwrap();
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "panel {title:?} has no query");
        for target in targets {
            let expr = target["expr"].as_str().unwrap();
            let expr = expr
                .replace("$__rate_interval", "20s")
                .replace("$__interval", "5s");
            assert!(!expr.contains('$'), "an unknown variable in {expr}");
            queries.push((title.to_owned(), expr));
        }
    }
    queries
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_the_service_and_every_rule_and_panel_query_returns_data() {
    let Some(prometheus) = tool("prometheus", "prometheus") else {
        return;
    };
    // The binary with a little built-in traffic and a quick provider that
    // declines 30% of charges, behind a breaker that does not open (at 40
    // orders a second five failures in a row come within seconds, and then
    // no call would reach the provider while Prometheus watches).
    let service = spawn_binary(&[
        ("LOAD_RATE", "40"),
        ("BREAKER_FAILURE_THRESHOLD", "1000"),
        ("PAYMENT_LATENCY_MIN", "5ms"),
        ("PAYMENT_LATENCY_MAX", "20ms"),
    ])
    .await;

    let dir = std::env::temp_dir().join(format!("rlab-prom-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
         rule_files:\n  - {rules}\n\
         scrape_configs:\n  - job_name: reliability-lab\n    static_configs:\n      - targets: [\"{addr}\"]\n",
        rules = repo().join("deploy/prometheus/rules.yml").display(),
        addr = service.addr,
    );
    std::fs::write(dir.join("prometheus.yml"), config).unwrap();
    let port = free_port_below_32768();
    let mut server = tokio::process::Command::new(&prometheus)
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
        .kill_on_drop(true)
        .spawn()
        .expect("prometheus starts");
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let log = || std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default();

    let query = |expr: String| {
        let client = client.clone();
        let base = base.clone();
        async move {
            let response = client
                .get(format!("{base}/api/v1/query"))
                .query(&[("query", expr.as_str())])
                .send()
                .await
                .ok()?;
            response.json::<Value>().await.ok()
        }
    };

    // Twenty seconds of scrapes: enough for every rate() window above.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        if let Some(v) = query("count_over_time(up[1m])".to_owned()).await {
            if v["data"]["result"][0]["value"][1]
                .as_str()
                .is_some_and(|n| n.parse::<f64>().unwrap_or(0.0) >= 20.0)
            {
                break;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "Prometheus did not scrape the service 20 times in 90 s; its log:\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let up = query("up".to_owned()).await.unwrap();
    assert_eq!(up["data"]["result"][0]["value"][1], "1", "{up}");

    // Every panel's query runs and returns at least one series.
    let mut empty = Vec::new();
    for (title, expr) in dashboard_queries() {
        let v = query(expr.clone()).await.expect("Prometheus answers");
        assert_eq!(v["status"], "success", "panel {title:?}: {expr}: {v}");
        let result = v["data"]["result"].as_array().unwrap();
        let has_number = result.iter().any(|series| {
            series["value"][1]
                .as_str()
                .and_then(|n| n.parse::<f64>().ok())
                .is_some_and(|n| n.is_finite())
        });
        if !has_number {
            empty.push(format!("{title}: {expr} -> {v}"));
        }
    }
    assert!(
        empty.is_empty(),
        "panels without data:\n{}",
        empty.join("\n")
    );

    // Every rule has been evaluated, without an error.
    let rules: Value = client
        .get(format!("{base}/api/v1/rules"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut seen = BTreeSet::new();
    for group in rules["data"]["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            let name = rule["name"].as_str().unwrap().to_owned();
            assert_eq!(rule["health"], "ok", "rule {name}: {rule}");
            assert!(
                rule["lastError"].as_str().unwrap_or("").is_empty(),
                "rule {name}: {rule}"
            );
            seen.insert(name);
        }
    }
    let rules_file = std::fs::read_to_string(repo().join("deploy/prometheus/rules.yml")).unwrap();
    let declared = rules_file
        .lines()
        .filter(|l| {
            l.trim_start().starts_with("- record:") || l.trim_start().starts_with("- alert:")
        })
        .count();
    assert_eq!(seen.len(), declared, "every rule loaded: {seen:?}");
    // The recording rules produce series from the live service.
    for record in [
        "reliability_lab:payment_calls_per_order:ratio_rate5m",
        "reliability_lab:http_5xx:ratio_rate5m",
    ] {
        let v = query(record.to_owned()).await.unwrap();
        assert!(
            !v["data"]["result"].as_array().unwrap().is_empty(),
            "{record} has no series: {v}"
        );
    }
    // Declined charges were retried: more than one call per finished order.
    let v = query("reliability_lab:payment_calls_per_order:ratio_rate5m".to_owned())
        .await
        .unwrap();
    let calls_per_order: f64 = v["data"]["result"][0]["value"][1]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        calls_per_order.is_finite() && calls_per_order > 1.0,
        "{calls_per_order}: {v}"
    );

    server.kill().await.ok();
    let _ = std::fs::remove_dir_all(&dir);
}

/// `docker-compose config` output as JSON (docker-compose depends on
/// python3-yaml, so the conversion needs nothing more).
fn compose_config() -> Option<Value> {
    let compose = tool("docker-compose", "docker-compose")?;
    let out = Command::new(compose)
        .args(["-f", "docker-compose.yml", "config"])
        .current_dir(repo())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "docker-compose config refused the file: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut python = Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    python.stdin.take().unwrap().write_all(&out.stdout).unwrap();
    let json = python.wait_with_output().unwrap();
    assert!(json.status.success());
    Some(serde_json::from_slice(&json.stdout).unwrap())
}

#[test]
fn the_compose_file_validates_starts_in_order_and_mounts_only_what_exists() {
    let Some(config) = compose_config() else {
        return;
    };
    let services = config["services"].as_object().unwrap();
    let names: BTreeSet<&str> = services.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        BTreeSet::from(["app", "grafana", "postgres", "prometheus", "provider"])
    );

    let operations = std::fs::read_to_string(repo().join("docs/operations.md")).unwrap();
    let mut ports = BTreeMap::new();
    for (name, service) in services {
        assert!(
            service["healthcheck"]["test"].is_array(),
            "{name} has no healthcheck"
        );
        for port in service["ports"].as_array().into_iter().flatten() {
            let published = port["published"].as_u64().unwrap();
            assert!(
                ports.insert(published, name.clone()).is_none(),
                "port {published} published twice"
            );
            assert!(
                operations.contains(&format!("localhost:{published}")),
                "docs/operations.md does not mention {name}'s port {published}"
            );
        }
        // Every bind mount's source exists in the repository.
        for volume in service["volumes"].as_array().into_iter().flatten() {
            let volume = volume.as_str().unwrap();
            let source = volume.split(':').next().unwrap();
            if source.starts_with('/') {
                assert!(
                    Path::new(source).exists(),
                    "{name} mounts {source}, which does not exist"
                );
            }
        }
    }
    // Start order: each waits for the one it needs to be healthy.
    for (service, needs) in [
        ("app", "postgres"),
        ("app", "provider"),
        ("prometheus", "app"),
        ("grafana", "prometheus"),
    ] {
        assert_eq!(
            services[service]["depends_on"][needs]["condition"], "service_healthy",
            "{service} must wait for {needs}"
        );
    }
    // The app's healthcheck is the binary's own subcommand (the image has
    // no curl); tests/api/binary.rs runs it against a live service.
    assert_eq!(
        services["app"]["healthcheck"]["test"],
        serde_json::json!(["CMD", "/usr/local/bin/reliability-lab", "healthcheck"])
    );
    // The provider runs from the same image, and the service charges it
    // across the compose network; Prometheus scrapes both.
    assert_eq!(
        services["provider"]["command"],
        serde_json::json!(["provider"])
    );
    assert_eq!(
        services["provider"]["healthcheck"]["test"],
        serde_json::json!([
            "CMD",
            "/usr/local/bin/reliability-lab",
            "healthcheck",
            "http://127.0.0.1:8090/healthz"
        ])
    );
    assert_eq!(
        services["app"]["environment"]["PAYMENT_URL"],
        "http://provider:8090"
    );
    let scrape = std::fs::read_to_string(repo().join("deploy/prometheus/prometheus.yml")).unwrap();
    for target in ["app:8080", "provider:8090"] {
        assert!(
            scrape.contains(&format!("\"{target}\"")),
            "{target} is not scraped"
        );
    }

    // Grafana's provisioning points at the compose stack's Prometheus and
    // at the directory the dashboards are mounted in.
    let datasource = std::fs::read_to_string(
        repo().join("deploy/grafana/provisioning/datasources/prometheus.yml"),
    )
    .unwrap();
    assert!(
        datasource.contains("url: http://prometheus:9090"),
        "{datasource}"
    );
    let uid = datasource
        .lines()
        .find_map(|l| l.trim().strip_prefix("uid: "))
        .expect("the datasource has a uid");
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("deploy/grafana/dashboards/reliability-lab.json"))
            .unwrap(),
    )
    .unwrap();
    for panel in dashboard["panels"].as_array().unwrap() {
        assert_eq!(panel["datasource"]["uid"], uid, "panel {}", panel["title"]);
        for target in panel["targets"].as_array().unwrap() {
            assert_eq!(target["datasource"]["uid"], uid, "panel {}", panel["title"]);
        }
    }
    let provider = std::fs::read_to_string(
        repo().join("deploy/grafana/provisioning/dashboards/reliability-lab.yml"),
    )
    .unwrap();
    let dashboards_mount = services["grafana"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .find(|v| v.contains("deploy/grafana/dashboards"))
        .expect("the dashboards are mounted");
    let target = dashboards_mount.split(':').nth(1).unwrap();
    assert!(
        provider.contains(&format!("path: {target}")),
        "{provider} vs {target}"
    );
    // Prometheus loads the rules file the tests above test.
    let prometheus =
        std::fs::read_to_string(repo().join("deploy/prometheus/prometheus.yml")).unwrap();
    assert!(prometheus.contains("- rules.yml") && prometheus.contains("app:8080"));
}
