//! The lab's claims, as the shipped experiments state them, in their quick
//! profile: a change that breaks a claim fails here. In-memory experiments
//! run on the virtual clock (each variant's whole service on a paused tokio
//! clock), so a run is the same every time: each is run twice and its
//! figures.json and timeline.csv must match byte for byte. The crash
//! experiment's replicas and the Postgres runs keep the real clock.

use std::path::{Path, PathBuf};
use std::process::Command;

use reliability_lab::experiment;

/// Real-clock experiments measure timing on the wall clock: two at once on
/// two cores distort each other (seen: the crash experiment's replicas,
/// starved by a 500 orders/s experiment beside them, held no order at the
/// kill). They take turns; simulated runs need no turn.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn shipped(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("experiments")
        .join(format!("{name}.toml"))
}

/// A directory of its own under the system's temporary one.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("reliability-lab-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

async fn claims_hold(name: &str) {
    let e = experiment::load(&shipped(name), true).unwrap();
    assert_eq!(e.clock, experiment::Clock::Virtual);
    let mut progress = Vec::new();
    let outcome = experiment::run::run(&e, None, &mut progress).await.unwrap();
    let report = experiment::report::markdown(&outcome);
    assert!(
        outcome.passed(),
        "{name}: a claim failed\n{}\n{report}",
        failed_claims(&outcome)
    );
    assert!(!outcome.verdicts.is_empty());
    for v in &outcome.variants {
        assert!(
            v.figures["accepted"].unwrap() > 0.0,
            "{name}/{}: no order was taken, so the claims were not tested\n{report}",
            v.name
        );
    }
    let progress = String::from_utf8_lossy(&progress);
    let runs = outcome.variants.len();
    assert!(
        progress.contains(&format!("[{runs}/{runs}]")),
        "progress counts the runs: {progress}"
    );
    assert!(
        outcome.speed.is_some(),
        "a simulated run says how fast it went"
    );

    // Exact replay: the same file and seed write the same files.
    let again = experiment::run::run(&e, None, &mut std::io::sink())
        .await
        .unwrap();
    let (first, second) = (scratch(&format!("{name}-1")), scratch(&format!("{name}-2")));
    let digest = experiment::report::write(&outcome, &first).unwrap();
    assert_eq!(experiment::report::write(&again, &second).unwrap(), digest);
    for file in ["figures.json", "timeline.csv"] {
        let (a, b) = (
            std::fs::read(first.join(file)).unwrap(),
            std::fs::read(second.join(file)).unwrap(),
        );
        assert!(a == b, "{name}: two runs wrote different {file}");
    }
    let _ = std::fs::remove_dir_all(&first);
    let _ = std::fs::remove_dir_all(&second);
}

/// The failed hypotheses with the figures they read, first in a failure's
/// message: a long report can be cut short in a CI log.
fn failed_claims(outcome: &experiment::run::Outcome) -> String {
    outcome
        .verdicts
        .iter()
        .filter(|v| !v.passed)
        .map(|v| {
            let values: Vec<String> = v
                .values
                .iter()
                .map(|(figure, value)| match value {
                    Some(x) => format!("{figure} = {x}"),
                    None => format!("{figure} = none"),
                })
                .collect();
            format!(
                "FAILED: {}\n  {}\n  measured: {}",
                v.claim,
                v.expr,
                values.join(", ")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test]
async fn the_outage_experiments_claims_hold() {
    claims_hold("outage").await;
}

#[tokio::test]
async fn the_double_charge_experiments_claims_hold() {
    claims_hold("double-charge").await;
}

#[tokio::test]
async fn the_retry_budget_experiments_claims_hold() {
    claims_hold("retry-budget").await;
}

#[tokio::test]
async fn the_half_open_experiments_claims_hold() {
    claims_hold("half-open").await;
}

#[tokio::test]
async fn the_brownout_timeout_experiments_claims_hold() {
    claims_hold("brownout-timeout").await;
}

#[tokio::test]
async fn the_metastable_experiments_claims_hold() {
    claims_hold("metastable").await;
}

#[tokio::test]
async fn the_flapping_experiments_claims_hold() {
    claims_hold("flapping").await;
}

#[tokio::test]
async fn the_flapping_curve_experiments_claims_hold() {
    claims_hold("flapping-curve").await;
}

#[tokio::test]
async fn the_metastable_map_experiments_claims_hold() {
    claims_hold("metastable-map").await;
}

#[tokio::test]
async fn the_jitter_experiments_claims_hold() {
    claims_hold("jitter").await;
}

#[tokio::test]
async fn the_adaptive_limit_experiments_claims_hold() {
    claims_hold("adaptive-limit").await;
}

#[tokio::test]
async fn the_hedging_experiments_claims_hold() {
    claims_hold("hedging").await;
}

#[tokio::test]
async fn the_slow_calls_experiments_claims_hold() {
    claims_hold("slow-calls").await;
}

#[test]
fn every_shipped_experiment_file_is_valid_in_both_profiles() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments");
    let files = experiment::files(&dir).unwrap();
    assert!(files.len() >= 5, "{files:?}");
    for file in files {
        for quick in [false, true] {
            experiment::load(&file, quick).unwrap_or_else(|e| panic!("{e}"));
        }
    }
}

fn binary() -> Command {
    Command::new(env!("CARGO_BIN_EXE_reliability-lab"))
}

#[test]
fn the_command_line_lists_runs_and_reports_and_says_what_is_wrong_with_a_file() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let list = binary()
        .args(["experiment", "list"])
        .current_dir(root)
        .output()
        .unwrap();
    assert!(list.status.success());
    let listed = String::from_utf8_lossy(&list.stdout);
    for name in [
        "outage",
        "double-charge",
        "retry-budget",
        "half-open",
        "brownout-timeout",
    ] {
        assert!(listed.contains(name), "{listed}");
    }

    let dir = std::env::temp_dir().join(format!("reliability-lab-exp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let bad = dir.join("bad.toml");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        &bad,
        "title = \"t\"\nclaim = \"c\"\n[base]\nPAYMENT_FAILURE_RATE = 3\n[[variants]]\nname = \"a\"\n[traffic]\nrate = 10\nduration = \"1s\"\n",
    )
    .unwrap();
    let out = binary()
        .args(["experiment", "run"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("line 4") && err.contains("PAYMENT_FAILURE_RATE"),
        "{err}"
    );

    // A small experiment whose hypothesis fails: exit status 1, and the
    // report is written all the same.
    let failing = dir.join("failing.toml");
    std::fs::write(
        &failing,
        "title = \"t\"\nclaim = \"c\"\n[base]\nPAYMENT_LATENCY_MIN = \"0ms\"\nPAYMENT_LATENCY_MAX = \"0ms\"\n\
         [[variants]]\nname = \"a\"\n[traffic]\nrate = 20\nduration = \"500ms\"\n\
         [[hypotheses]]\nclaim = \"impossible\"\nexpr = \"accepted[a] > 1000000\"\n",
    )
    .unwrap();
    let report = dir.join("report");
    let out = binary()
        .args(["experiment", "run"])
        .arg(&failing)
        .arg("--out")
        .arg(&report)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for file in ["report.md", "figures.json", "timeline.csv"] {
        assert!(report.join(file).is_file(), "{file} missing");
    }
    let md = std::fs::read_to_string(report.join("report.md")).unwrap();
    assert!(md.contains("**FAIL**"), "{md}");
    let figures: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(report.join("figures.json")).unwrap())
            .unwrap();
    assert_eq!(figures["passed"], false);
    assert_eq!(figures["variants"]["a"]["figures"]["accepted"], 10.0);
    let csv = std::fs::read_to_string(report.join("timeline.csv")).unwrap();
    assert!(csv.starts_with("variant,"), "{csv}");
    assert!(csv.lines().count() > 2, "{csv}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A sweep over one parameter: every variant runs at every value, the
/// hypotheses name cells and read shapes, and the report draws each
/// `[[charts]]` figure against the parameter, one line per variant.
const CURVE: &str = r#"
title = "Rates"
claim = "the breaker opens more often the more traffic it carries"
[base]
PAYMENT_FAILURE_RATE = 0.3
PAYMENT_LATENCY_MIN = "1ms"
PAYMENT_LATENCY_MAX = "2ms"
RETRY_INITIAL_INTERVAL = "10ms"
BREAKER_OPEN_DURATION = "1s"
WORKER_COUNT = 20
[[variants]]
name = "consecutive"
[[variants]]
name = "no_breaker"
settings = { BREAKER_ENABLED = false }
[traffic]
rate = 10
duration = "4s"
[[sweep]]
name = "rate"
values = [5, 50, 500]
[[charts]]
figure = "success_ratio"
[[charts]]
figure = "breaker_opened"
title = "Openings against the rate"
[[hypotheses]]
claim = "without a breaker nothing is lost to it"
expr = "count(success_ratio[no_breaker] < 0.9) == 0"
[[hypotheses]]
claim = "at 500 orders/s the breaker opens"
expr = "breaker_opened[consecutive, rate=500] > 0"
[[hypotheses]]
claim = "the lowest rate at which it completes under 90%"
expr = "smallest(rate, success_ratio[consecutive] < 0.9) >= 50"
"#;

#[tokio::test]
async fn a_sweep_runs_every_variant_in_every_cell_and_draws_a_figure_against_it() {
    let e = experiment::file::parse("rates", CURVE, false).unwrap();
    assert_eq!(e.cells.len(), 3);
    let mut progress = Vec::new();
    let outcome = experiment::run::run(&e, None, &mut progress).await.unwrap();
    let report = experiment::report::markdown(&outcome);
    assert!(outcome.passed(), "{}\n{report}", failed_claims(&outcome));
    assert_eq!(outcome.variants.len(), 6);
    let accepted: Vec<f64> = (0..3)
        .map(|c| outcome.result("no_breaker", c).unwrap().figures["accepted"].unwrap())
        .collect();
    assert_eq!(accepted, [20.0, 200.0, 2000.0], "each cell at its own rate");
    let progress = String::from_utf8_lossy(&progress);
    assert!(
        progress.contains("[6/6]") && progress.contains("rate=500"),
        "{progress}"
    );
    // The verdict shows what the shape came to.
    let shape = &outcome.verdicts[2];
    assert!(
        shape.values[0].0.starts_with("smallest(rate, "),
        "{shape:?}"
    );
    assert!(shape.values[0].1.is_some_and(|r| r >= 50.0), "{shape:?}");

    let charts = experiment::charts::svgs(&outcome);
    let titles: Vec<&str> = charts.iter().map(|c| c.title.as_str()).collect();
    assert_eq!(
        titles,
        ["success_ratio against rate", "Openings against the rate"]
    );
    for chart in &charts {
        assert_eq!(chart.svg.matches("<circle").count(), 6, "a point per run");
        assert!(chart.svg.contains("consecutive") && chart.svg.contains("no_breaker"));
        assert!(
            chart.svg.contains("log scale"),
            "5 to 500 reads on a log scale"
        );
    }
    assert!(
        report.contains("### success_ratio") && report.contains("| rate=50 |"),
        "{report}"
    );

    let dir = scratch("curve");
    experiment::report::write(&outcome, &dir).unwrap();
    let figures: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("figures.json")).unwrap()).unwrap();
    assert_eq!(
        figures["sweep"][0]["values"],
        serde_json::json!(["5", "50", "500"])
    );
    assert_eq!(figures["cells"][2]["at"]["rate"], "500");
    assert_eq!(
        figures["cells"][2]["variants"]["no_breaker"]["figures"]["accepted"],
        2000.0
    );
    let csv = std::fs::read_to_string(dir.join("timeline.csv")).unwrap();
    assert!(csv.starts_with("variant,rate,"), "{}", &csv[..80]);
    assert!(csv.lines().any(|l| l.starts_with("consecutive,500,")));
    assert!(dir.join("chart-sweep-success_ratio.svg").is_file());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Two swept parameters draw a map per variant, each cell a run with its
/// value written in it and coloured by the map's verdict; a schedule reads
/// a parameter as `$name`.
const MAP: &str = r#"
title = "A map"
claim = "outages longer than the open period cost more"
[base]
PAYMENT_FAILURE_RATE = 0
PAYMENT_LATENCY_MIN = "1ms"
PAYMENT_LATENCY_MAX = "2ms"
BREAKER_OPEN_DURATION = "500ms"
[[variants]]
name = "both"
[[variants]]
name = "retry_only"
settings = { BREAKER_ENABLED = false }
[traffic]
rate = 40
duration = "3s"
[[sweep]]
name = "RETRY_MAX_ATTEMPTS"
values = [1, 3]
[[sweep]]
name = "outage"
values = ["500ms", "1500ms"]
[[schedule]]
at = "500ms"
fault = "start"
payment = { mode = "outage" }
[[schedule]]
at = "$outage"
fault = "end"
payment = { mode = "normal" }
[[maps]]
figure = "success_ratio"
verdict = "success_ratio >= 0.75"
[[hypotheses]]
claim = "a longer outage fails more orders"
expr = "count(success_ratio[retry_only, outage=1500ms] < success_ratio[retry_only, outage=500ms]) == 2"
"#;

#[tokio::test]
async fn a_two_parameter_sweep_draws_a_map_per_variant() {
    let e = experiment::file::parse("map", MAP, false).unwrap();
    assert_eq!(e.cells.len(), 4);
    // The cell's value reached both the settings and the schedule.
    assert_eq!(e.cells[3].variants[0].config.retry_max_attempts, 3);
    assert_eq!(
        e.cells[3].schedule[1].at,
        std::time::Duration::from_millis(1500)
    );
    let outcome = experiment::run::run(&e, None, &mut std::io::sink())
        .await
        .unwrap();
    assert!(outcome.passed(), "{}", failed_claims(&outcome));
    let charts = experiment::charts::svgs(&outcome);
    assert_eq!(charts.len(), 2, "a map per variant");
    assert_eq!(charts[1].slug, "map-success_ratio-retry_only");
    let map = &charts[0].svg;
    assert!(
        map.contains("success_ratio &gt;= 0.75") || map.contains("success_ratio >= 0.75"),
        "{map}"
    );
    for value in ["500ms", "1500ms", "RETRY_MAX_ATTEMPTS"] {
        assert!(map.contains(value), "{value} labels an axis");
    }
    // Row by row from the top (the second parameter's largest value
    // first), each row's label then its cells, each with its value.
    let texts: Vec<&str> = map
        .split("</text>")
        .filter_map(|t| t.rsplit_once('>').map(|(_, text)| text.trim()))
        .filter(|t| !t.is_empty())
        .collect();
    let value = |c: usize| {
        let v = outcome.result("both", c).unwrap().figures["success_ratio"].unwrap();
        format!("{}", (v * 1000.0).round() / 1000.0)
    };
    assert_eq!(
        texts[1..7],
        [
            "1500ms",
            &value(1),
            &value(3),
            "500ms",
            &value(0),
            &value(2)
        ],
        "{texts:?}"
    );
    assert_eq!(
        texts[7..9],
        ["1", "3"],
        "the first parameter's values along the bottom"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_html_report_shows_every_chart_in_a_real_browser() {
    let Some(browser) = crate::helpers::Browser::launch().await else {
        return;
    };
    let text = r#"
title = "A short outage"
claim = "the breaker opens"
[base]
PAYMENT_FAILURE_RATE = 0
PAYMENT_LATENCY_MIN = "1ms"
PAYMENT_LATENCY_MAX = "3ms"
BREAKER_OPEN_DURATION = "500ms"
[[variants]]
name = "both"
[[variants]]
name = "retry_only"
settings = { BREAKER_ENABLED = false }
[traffic]
rate = 40
duration = "2s"
[[schedule]]
at = "500ms"
fault = "start"
payment = { mode = "outage" }
[[schedule]]
at = "1500ms"
fault = "end"
payment = { mode = "normal" }
[[hypotheses]]
claim = "it opened"
expr = "breaker_opened[both] >= 1"
"#;
    let e = experiment::file::parse("short-outage", text, false).unwrap();
    let outcome = experiment::run::run(&e, None, &mut std::io::sink())
        .await
        .unwrap();
    assert!(outcome.passed());
    let dir = std::env::temp_dir().join(format!("reliability-lab-html-{}", std::process::id()));
    experiment::report::write(&outcome, &dir).unwrap();
    let page = dir.join("report.html");
    let html = std::fs::read_to_string(&page).unwrap();
    // Self-contained: nothing is loaded from elsewhere (the SVG namespace
    // URI is a name, not a fetch).
    for fetch in ["src=", "href=", "url(", "@import"] {
        assert!(!html.contains(fetch), "{fetch} in the report");
    }

    browser.open(&format!("file://{}", page.display())).await;
    let charts = browser
        .eval(
            "[...document.querySelectorAll('figure svg')].map(s => { const r = s.getBoundingClientRect(); \
             return [r.width, r.height, s.querySelectorAll('polyline, path, rect').length, s.textContent]; })",
        )
        .await;
    let charts = charts.as_array().unwrap();
    assert_eq!(charts.len(), 6, "five line charts and the breaker bands");
    for chart in charts {
        assert!(chart[0].as_f64().unwrap() > 400.0, "{chart}");
        assert!(chart[1].as_f64().unwrap() > 100.0, "{chart}");
        assert!(chart[2].as_u64().unwrap() > 5, "drawn marks: {chart}");
        let text = chart[3].as_str().unwrap();
        assert!(text.contains("seconds since the start"), "{text}");
    }
    // Both variants appear in a legend, and the verdict is on the page.
    let legend = charts[0][3].as_str().unwrap();
    assert!(
        legend.contains("both") && legend.contains("retry_only"),
        "{legend}"
    );
    assert_eq!(browser.text(".pass").await, "every hypothesis holds");
    let shot = dir.join("report.png");
    browser.screenshot(&shot).await;
    assert!(std::fs::metadata(&shot).unwrap().len() > 10_000);
    assert_eq!(browser.errors(), Vec::<String>::new());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A sweep's report in a real browser: a map per variant, every cell a
/// coloured rectangle with its value, and a curve with its points.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweeps_maps_and_curves_show_in_a_real_browser() {
    let Some(browser) = crate::helpers::Browser::launch().await else {
        return;
    };
    let dir = scratch("sweep-html");
    for (name, text) in [("map", MAP), ("curve", CURVE)] {
        let e = experiment::file::parse(name, text, false).unwrap();
        let outcome = experiment::run::run(&e, None, &mut std::io::sink())
            .await
            .unwrap();
        experiment::report::write(&outcome, &dir.join(name)).unwrap();
    }
    browser
        .open(&format!("file://{}", dir.join("map/report.html").display()))
        .await;
    let maps = browser
        .eval(
            "[...document.querySelectorAll('figure svg')].map(s => { const r = s.getBoundingClientRect(); \
             return [r.width, r.height, [...s.querySelectorAll('rect')].map(x => x.getAttribute('fill')), s.textContent]; })",
        )
        .await;
    let maps = maps.as_array().unwrap();
    assert_eq!(maps.len(), 2, "a map per variant");
    for map in maps {
        assert!(
            map[0].as_f64().unwrap() > 400.0 && map[1].as_f64().unwrap() > 100.0,
            "{map}"
        );
        let fills: Vec<&str> = map[2]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|f| f.as_str())
            .filter(|f| ["#BBF7D0", "#FECACA"].contains(&f.to_uppercase().as_str()))
            .collect();
        assert_eq!(fills.len(), 4, "four cells, each green or red: {map}");
        let text = map[3].as_str().unwrap();
        assert!(
            text.contains("1500ms") && text.contains("RETRY_MAX_ATTEMPTS"),
            "{text}"
        );
    }
    assert_eq!(browser.text(".pass").await, "every hypothesis holds");
    browser.screenshot(&dir.join("map.png")).await;
    assert!(std::fs::metadata(dir.join("map.png")).unwrap().len() > 10_000);

    browser
        .open(&format!(
            "file://{}",
            dir.join("curve/report.html").display()
        ))
        .await;
    let points = browser
        .eval("[...document.querySelectorAll('figure svg')].map(s => s.querySelectorAll('circle').length)")
        .await;
    assert_eq!(
        points,
        serde_json::json!([6, 6]),
        "two curves, a point per run"
    );
    assert_eq!(browser.errors(), Vec::<String>::new());
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_database_url_the_variants_run_on_postgres_and_the_claims_still_hold() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let Some(db) = crate::helpers::TestDb::create().await else {
        return;
    };
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments/double-charge.toml");
    let e = experiment::load(&path, true).unwrap();
    let outcome = experiment::run::run(&e, Some(&db.url), &mut std::io::sink())
        .await
        .unwrap();
    assert!(
        outcome.passed(),
        "{}",
        experiment::report::markdown(&outcome)
    );
    // The orders are in the database: both variants' accepted orders.
    let accepted: f64 = outcome
        .variants
        .iter()
        .map(|v| v.figures["accepted"].unwrap())
        .sum();
    let (stored,): (i64,) = sqlx::query_as("SELECT count(*) FROM orders")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(stored as f64, accepted);
    // Both variants ran on one database with the same seed: each still took
    // its orders (seeded ids would have collided with the first variant's).
    for v in &outcome.variants {
        assert!(v.figures["accepted"].unwrap() > 0.0, "{}", v.name);
    }
    db.destroy().await;
}

/// Runs a shipped experiment with replicas, quick, on `db` with the debug
/// binary: its outcome, its report and its progress lines.
async fn replicas_quick(
    name: &str,
    db: &crate::helpers::TestDb,
) -> (experiment::run::Outcome, String, String) {
    processes_quick(name, Some(&db.url)).await
}

/// Runs a shipped experiment whose services or providers are processes of
/// the debug binary, quick: its outcome, its report and its progress lines.
async fn processes_quick(
    name: &str,
    database_url: Option<&str>,
) -> (experiment::run::Outcome, String, String) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("experiments/{name}.toml"));
    let e = experiment::load(&path, true).unwrap();
    let mut progress = Vec::new();
    let outcome = experiment::run::run_using(
        &e,
        database_url,
        Path::new(env!("CARGO_BIN_EXE_reliability-lab")),
        1,
        &mut progress,
    )
    .await
    .unwrap_or_else(|err| panic!("{err:#}\n{}", String::from_utf8_lossy(&progress)));
    let report = experiment::report::markdown(&outcome);
    (
        outcome,
        report,
        String::from_utf8_lossy(&progress).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_partition_experiments_claims_hold_with_a_replica_cut_off_by_its_relay() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let Some(db) = crate::helpers::TestDb::create().await else {
        return;
    };
    let (outcome, report, progress) = replicas_quick("partition", &db).await;
    assert!(outcome.passed(), "a claim failed\n{report}\n{progress}");
    assert!(
        progress.contains("replica a cut off from Postgres holding")
            && progress.contains("replica a reconnected"),
        "{progress}"
    );
    // The cut-off replica ran on: its timeline goes past the cut.
    let v = &outcome.variants[0];
    let fault = v.record.fault.expect("the cut marks the fault");
    let timelines = v.record.timelines(&v.name);
    let a_end = timelines[0].1.last().unwrap().t;
    assert!(a_end > fault.end.unwrap(), "a until {a_end}: {fault:?}");
    let (open,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM orders WHERE status IN ('pending', 'processing')")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(open, 0);
    eprintln!("{report}");
    db.destroy().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_crash_experiments_claims_hold_with_two_replica_processes_on_postgres() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let Some(db) = crate::helpers::TestDb::create().await else {
        return;
    };
    let (outcome, report, progress) = replicas_quick("crash", &db).await;
    assert!(outcome.passed(), "a claim failed\n{report}");
    let v = &outcome.variants[0];
    // What the figures say is what the database holds.
    let (stored, open): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE status IN ('pending', 'processing')) FROM orders",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(v.figures["accepted"], Some(stored as f64), "{report}");
    assert_eq!(open, 0);
    // Each replica's timeline is kept: the killed one's ends at the kill.
    let fault = v.record.fault.expect("the kill marks the fault");
    let timelines = v.record.timelines(&v.name);
    assert_eq!(timelines.len(), 2);
    assert_eq!(timelines[0].0, "two_replicas/a");
    let a_end = timelines[0].1.last().unwrap().t;
    let b_end = timelines[1].1.last().unwrap().t;
    assert!(
        a_end <= fault.start + 0.5 && b_end > fault.start + 1.0,
        "a until {a_end}, b until {b_end}, kill at {}",
        fault.start
    );
    assert!(
        progress.contains("replica a killed (SIGKILL)"),
        "{progress}"
    );
    db.destroy().await;
}

/// An experiment whose provider is a chain of processes: its claims hold,
/// and what it read from each provider's /metrics adds up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tiers_experiments_claims_hold_with_a_chain_of_provider_processes() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let (outcome, report, _) = processes_quick("tiers", None).await;
    assert!(outcome.passed(), "{}\n{report}", failed_claims(&outcome));
    assert!(report.contains("a chain of 2 `reliability-lab provider` processes"));
    let every = outcome.result("every_tier", 0).unwrap();
    let figure = |name: &str| every.figures[name].unwrap();
    assert_eq!(figure("calls_tier2"), 3.0 * figure("calls_tier1"));
    assert_eq!(figure("payment_calls"), figure("calls_tier1"));
    assert_eq!(every.figures["calls_tier3"], None, "two tiers only");
    // The service's own timeline counts its attempts across the network.
    let attempts: f64 = every
        .record
        .samples
        .iter()
        .map(|s| s.payment_calls_per_s * s.interval)
        .sum();
    assert!(
        (attempts - figure("calls_tier1")).abs() <= 1.0,
        "timeline {attempts}, provider {}",
        figure("calls_tier1")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_network_faults_experiments_claims_hold_over_real_sockets() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let (outcome, report, _) = processes_quick("network-faults", None).await;
    assert!(outcome.passed(), "{}\n{report}", failed_claims(&outcome));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_exhaustion_experiments_claims_hold_over_real_sockets() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let (outcome, report, _) = processes_quick("pool-exhaustion", None).await;
    assert!(outcome.passed(), "{}\n{report}", failed_claims(&outcome));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retry_after_experiments_claims_hold_with_a_squeezed_provider() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let (outcome, report, _) = processes_quick("retry-after", None).await;
    assert!(outcome.passed(), "{}\n{report}", failed_claims(&outcome));
    assert!(
        report.contains("- at 3s: fault starts, faults { rate_limit = 5 }"),
        "the schedule's fault steps are reported\n{report}"
    );
}

#[test]
fn an_experiment_with_replicas_is_skipped_with_a_line_saying_why_when_there_is_no_postgres() {
    let out = std::env::temp_dir().join(format!("rl-skip-{}", std::process::id()));
    let output = binary()
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("DATABASE_URL")
        .args([
            "experiment",
            "run",
            "experiments/crash.toml",
            "--quick",
            "--out",
        ])
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.contains("crash: skipped: its 2 replicas share their orders through Postgres; give --database-url"),
        "{stderr}"
    );
    assert!(!out.exists(), "a skipped experiment writes no report");
}

/// What the README tells a user to do by hand: the flapping experiment's
/// quick profile run twice, once with two busy loops beside it, writes the
/// same figures.json and timeline.csv, and says so with the same digest.
#[test]
fn the_same_seed_writes_the_same_files_on_an_idle_machine_and_a_busy_one() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let dir = scratch("replay");
    let run = |out: &Path| {
        let output = binary()
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .args([
                "experiment",
                "run",
                "experiments/flapping.toml",
                "--quick",
                "--out",
            ])
            .arg(out)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        assert!(output.status.success(), "{stderr}");
        stderr
    };
    let idle = run(&dir.join("idle"));
    let stop = Arc::new(AtomicBool::new(false));
    let loops: Vec<_> = (0..2)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut x = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                }
            })
        })
        .collect();
    let busy = run(&dir.join("busy"));
    stop.store(true, Ordering::Relaxed);
    for l in loops {
        l.join().unwrap();
    }
    for file in ["figures.json", "timeline.csv"] {
        let a = std::fs::read(dir.join("idle").join(file)).unwrap();
        let b = std::fs::read(dir.join("busy").join(file)).unwrap();
        assert!(a == b, "{file} differs between the idle and the busy run");
    }
    let digest = |stderr: &str| {
        stderr
            .lines()
            .find(|l| l.starts_with("digest: figures.json "))
            .unwrap_or_else(|| panic!("no digest in {stderr}"))
            .to_owned()
    };
    assert_eq!(digest(&idle), digest(&busy));
    assert!(
        idle.lines()
            .any(|l| l.starts_with("simulated ") && l.contains("×")),
        "{idle}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--clock real` keeps the wall clock and real sockets for an in-memory
/// experiment; `--clock virtual` is refused where it cannot run.
#[test]
fn the_clock_can_be_chosen_and_virtual_is_refused_for_replicas() {
    let dir = scratch("clock");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("tiny.toml");
    std::fs::write(
        &file,
        "title = \"t\"\nclaim = \"c\"\n[base]\nPAYMENT_FAILURE_RATE = 0\nPAYMENT_LATENCY_MIN = \"1ms\"\nPAYMENT_LATENCY_MAX = \"2ms\"\n\
         [[variants]]\nname = \"a\"\n[traffic]\nrate = 20\nduration = \"500ms\"\n\
         [[hypotheses]]\nclaim = \"all complete\"\nexpr = \"success_ratio[a] == 1\"\n",
    )
    .unwrap();
    let real = binary()
        .args(["experiment", "run", "--clock", "real", "--out"])
        .arg(dir.join("real"))
        .arg(&file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&real.stderr);
    assert!(real.status.success(), "{stderr}");
    assert!(
        !stderr.contains("simulated "),
        "a real run simulates nothing: {stderr}"
    );
    let figures: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("real/figures.json")).unwrap())
            .unwrap();
    assert_eq!(figures["variants"]["a"]["figures"]["accepted"], 10.0);

    let refused = binary()
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args([
            "experiment",
            "run",
            "experiments/crash.toml",
            "--quick",
            "--clock",
            "virtual",
        ])
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("replicas") && stderr.contains("real clock"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
