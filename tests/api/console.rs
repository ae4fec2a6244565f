//! The console page in a real headless Chromium, against the real binary:
//! what a user sees and clicks.
//!
//! These tests wait on the wall clock (a browser has no paused clock), but
//! only for things to appear, with generous deadlines; nothing asserts how
//! fast.

use std::path::PathBuf;

use serde_json::Value;

use crate::helpers::{spawn_binary, Browser, Running};

/// A lab whose breaker story plays out in seconds: fast payments that
/// rarely fail, a 2 s open period, a seed.
async fn lab(extra: &[(&str, &str)]) -> Running {
    let mut env = vec![
        ("PAYMENT_SEED", "7"),
        ("PAYMENT_FAILURE_RATE", "0.05"),
        ("PAYMENT_LATENCY_MIN", "5ms"),
        ("PAYMENT_LATENCY_MAX", "20ms"),
        ("RETRY_INITIAL_INTERVAL", "20ms"),
        ("RETRY_MAX_INTERVAL", "100ms"),
        ("BREAKER_OPEN_DURATION", "2s"),
    ];
    env.extend_from_slice(extra);
    spawn_binary(&env).await
}

/// Waits until the page says its event stream is live.
async fn wait_live(browser: &Browser, what: &str) {
    browser
        .wait_for(
            "document.getElementById('connection').dataset.state === 'live'",
            what,
        )
        .await;
}

/// Opens the console and waits for its event stream.
async fn open_live(browser: &Browser, lab: &Running) {
    browser.open(&lab.url("/")).await;
    wait_live(browser, "the event stream").await;
}

fn number(v: &str) -> f64 {
    v.trim().parse().unwrap_or(0.0)
}

#[tokio::test]
async fn the_console_loads_without_errors_and_shows_refusals_in_the_apis_words() {
    let Some(browser) = Browser::launch().await else {
        return;
    };
    let lab = lab(&[]).await;
    open_live(&browser, &lab).await;
    browser
        .wait_for(
            "document.getElementById('queue-capacity').textContent === '100'",
            "the hello event",
        )
        .await;
    assert_eq!(browser.text("#breaker-state").await, "closed");
    assert_eq!(browser.text("#payment-mode").await, "normal");
    assert_eq!(browser.text("#breaker-threshold").await, "5");
    assert_eq!(browser.errors(), Vec::<String>::new(), "console errors");

    // A rate the API refuses: the page shows the API's own message, and
    // nothing starts.
    browser.type_into("#load-rate", "9999").await;
    browser.click("#load-start").await;
    browser
        .wait_for(
            "document.getElementById('message').textContent.includes('rate must be')",
            "the refusal",
        )
        .await;
    let message = browser.text("#message").await;
    assert!(message.contains("from 0.1 to 5000"), "{message}");
    let load = lab.get_json(&reqwest::Client::new(), "/admin/load").await;
    assert_eq!(load["running"], false, "{load}");

    // Latency min above max: refused, and the slider goes back.
    browser
        .eval("(() => { const e = document.getElementById('latency-min'); e.value = 1500; e.dispatchEvent(new Event('change')); })()")
        .await;
    browser
        .wait_for(
            "document.getElementById('message').textContent.includes('latency_min')",
            "the latency refusal",
        )
        .await;

    // The breaker's policy from the page: the card shows the window, the
    // API has it, and the change is listed.
    assert_eq!(
        browser
            .eval("document.getElementById('breaker-rate-line').hidden")
            .await,
        true
    );
    browser
        .eval("(() => { const e = document.getElementById('breaker-policy'); e.value = 'failure_rate'; e.dispatchEvent(new Event('change')); })()")
        .await;
    browser
        .wait_for(
            "!document.getElementById('breaker-rate-line').hidden && document.getElementById('breaker-consecutive-line').hidden",
            "the failure-rate line",
        )
        .await;
    assert_eq!(browser.text("#breaker-rate-limit").await, "50%");
    assert_eq!(browser.text("#breaker-min-calls").await, "20");
    assert_eq!(browser.text("#breaker-window").await, "10");
    let breaker = lab
        .get_json(&reqwest::Client::new(), "/admin/breaker")
        .await;
    assert_eq!(breaker["policy"], "failure_rate", "{breaker}");
    browser
        .wait_for(
            "[...document.querySelectorAll('#changes li')].some(li => li.textContent.includes('breaker policy failure_rate'))",
            "the change listed",
        )
        .await;

    // The jitter kind, from its select: the API has it, and the change is
    // listed; a change made elsewhere shows in the select.
    assert_eq!(
        browser
            .eval("document.getElementById('retry-jitter').value")
            .await,
        "proportional"
    );
    browser
        .eval("(() => { const e = document.getElementById('retry-jitter'); e.value = 'full'; e.dispatchEvent(new Event('change')); })()")
        .await;
    browser
        .wait_for(
            "[...document.querySelectorAll('#changes li')].some(li => li.textContent.includes('full jitter'))",
            "the jitter change listed",
        )
        .await;
    let switches = lab
        .get_json(&reqwest::Client::new(), "/admin/reliability")
        .await;
    assert_eq!(switches["retry_jitter"], "full", "{switches}");
    reqwest::Client::new()
        .put(lab.url("/admin/reliability"))
        .json(&serde_json::json!({"retry_jitter": "decorrelated"}))
        .send()
        .await
        .unwrap();
    browser
        .wait_for(
            "document.getElementById('retry-jitter').value === 'decorrelated'",
            "the select following a change made elsewhere",
        )
        .await;

    // Client-side throttling, from its checkbox.
    assert_eq!(
        browser
            .eval("document.getElementById('throttle-enabled').checked")
            .await,
        false
    );
    browser.click("#throttle-enabled").await;
    browser
        .wait_for(
            "[...document.querySelectorAll('#changes li')].some(li => li.textContent.includes('throttling on'))",
            "the throttling change listed",
        )
        .await;
    let switches = lab
        .get_json(&reqwest::Client::new(), "/admin/reliability")
        .await;
    assert_eq!(switches["throttle_enabled"], true, "{switches}");
    browser.click("#hedge-enabled").await;
    browser
        .wait_for(
            "[...document.querySelectorAll('#changes li')].some(li => li.textContent.includes('hedging on'))",
            "the hedging change listed",
        )
        .await;
    browser
        .eval("(() => { const e = document.getElementById('concurrency-limit'); e.value = 'vegas'; e.dispatchEvent(new Event('change')); })()")
        .await;
    browser
        .wait_for(
            "[...document.querySelectorAll('#changes li')].some(li => li.textContent.includes('vegas concurrency limit'))",
            "the limit change listed",
        )
        .await;

    // Chromium logs each refused request; nothing else may appear.
    let errors = browser.errors();
    assert_eq!(errors.len(), 2, "{errors:#?}");
    assert!(
        errors.iter().all(|e| e.contains("status of 422")),
        "{errors:#?}"
    );
}

#[tokio::test]
async fn traffic_and_an_outage_from_the_page_open_the_breaker_and_a_probe_closes_it() {
    let Some(browser) = Browser::launch().await else {
        return;
    };
    let lab = lab(&[]).await;
    let client = reqwest::Client::new();
    open_live(&browser, &lab).await;

    // Traffic from the page moves the counters and the charts.
    browser.type_into("#load-rate", "40").await;
    browser.click("#load-start").await;
    browser
        .wait_for(
            "Number(document.getElementById('total-completed').textContent) > 20",
            "completed orders",
        )
        .await;
    browser
        .wait_for(
            "Number(document.getElementById('chart-orders').dataset.max) > 0",
            "the orders chart",
        )
        .await;
    let load = lab.get_json(&client, "/admin/load").await;
    assert_eq!(load["running"], true, "{load}");
    assert_eq!(load["rate"], 40.0, "{load}");
    assert!(browser
        .text("#load-status")
        .await
        .starts_with("running at 40/s"));
    let dwell = std::env::var("CONSOLE_SCREENSHOT_DWELL")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    tokio::time::sleep(std::time::Duration::from_secs(dwell)).await;

    // Outage: the breaker opens, and the page says so in words and colour.
    browser.click("#mode-outage").await;
    browser
        .wait_for(
            "document.getElementById('breaker-card').dataset.state === 'open'",
            "the breaker to open",
        )
        .await;
    assert_eq!(browser.text("#breaker-state").await, "open");
    let failed_before = number(&browser.text("#total-failed").await);
    browser
        .wait_for(
            &format!(
                "Number(document.getElementById('total-failed').textContent) > {failed_before}"
            ),
            "orders to fail fast",
        )
        .await;
    browser
        .wait_for(
            "Number(document.getElementById('chart-retries').dataset.max) > 0",
            "rejections on the chart",
        )
        .await;
    if dwell > 0 {
        // Long enough for the fail-fast to show on the charts; then a moment
        // when the breaker is open (its 2 s periods end in failed probes).
        tokio::time::sleep(std::time::Duration::from_secs(15)).await;
        browser
            .wait_for(
                "document.getElementById('breaker-card').dataset.state === 'open' && \
                 parseFloat(document.getElementById('breaker-countdown').textContent) > 1",
                "the breaker open",
            )
            .await;
    }
    let shot = std::env::var_os("CONSOLE_SCREENSHOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("reliability-lab-console-outage.png"));
    browser.screenshot(&shot).await;
    assert!(std::fs::metadata(&shot).unwrap().len() > 10_000);

    // Provider back, then reset: closed at once.
    browser.click("#mode-normal").await;
    browser
        .wait_for(
            "document.getElementById('payment-mode').textContent === 'normal'",
            "normal mode",
        )
        .await;
    browser.click("#breaker-reset").await;
    browser
        .wait_for(
            "document.getElementById('breaker-state').textContent === 'closed'",
            "the reset",
        )
        .await;
    let breaker = lab.get_json(&client, "/admin/breaker").await;
    assert_eq!(breaker["state"], "closed", "{breaker}");

    // Another outage, then normal: after the open period one probe decides,
    // and the list of changes tells the story.
    browser.click("#mode-outage").await;
    browser
        .wait_for(
            "document.getElementById('breaker-card').dataset.state === 'open'",
            "the breaker to open again",
        )
        .await;
    browser.click("#mode-normal").await;
    browser
        .wait_for(
            "[...document.querySelectorAll('#changes li')].some(li => li.textContent.includes('half_open → closed'))",
            "the probe to close the breaker",
        )
        .await;
    let changes = browser
        .eval("[...document.querySelectorAll('#changes li')].map(li => li.textContent)")
        .await;
    let changes: Vec<&str> = changes
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    // Newest first: closed by the probe, after half-open, after open.
    let position = |needle: &str| {
        changes
            .iter()
            .position(|c| c.contains(needle))
            .unwrap_or_else(|| panic!("{needle} missing from {changes:#?}"))
    };
    assert!(position("half_open → closed") < position("open → half_open"));
    assert!(position("open → half_open") < position("closed → open"));
    assert_eq!(browser.text("#breaker-state").await, "closed");

    browser.click("#load-stop").await;
    browser
        .wait_for(
            "document.getElementById('load-status').textContent.startsWith('stopped')",
            "traffic to stop",
        )
        .await;
    assert_eq!(browser.errors(), Vec::<String>::new(), "console errors");
}

/// With deferral on, orders that meet the open breaker show as deferred,
/// and go back to zero once the breaker has closed.
#[tokio::test]
async fn deferred_orders_show_while_the_breaker_is_open_and_drain_once_it_closes() {
    let Some(browser) = Browser::launch().await else {
        return;
    };
    let lab = lab(&[("BREAKER_DEFER", "on"), ("DEFER_RATE", "50")]).await;
    open_live(&browser, &lab).await;
    browser.type_into("#load-rate", "40").await;
    browser.click("#load-start").await;
    browser.click("#mode-outage").await;
    browser
        .wait_for(
            "Number(document.getElementById('total-deferred').textContent) > 10",
            "orders deferred at the open breaker",
        )
        .await;
    assert_eq!(browser.text("#breaker-state").await, "open");
    let metrics = reqwest::get(lab.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("worker_jobs_total{status=\"deferred\"}") && !l.ends_with(" 0")),
        "deferrals counted in /metrics"
    );
    browser.click("#mode-normal").await;
    browser
        .wait_for(
            "document.getElementById('breaker-state').textContent === 'closed' && \
             Number(document.getElementById('total-deferred').textContent) === 0",
            "the deferred orders to drain once the breaker closed",
        )
        .await;
    browser.click("#load-stop").await;
    assert_eq!(browser.errors(), Vec::<String>::new(), "console errors");
}

#[tokio::test]
async fn with_an_admin_token_the_page_asks_for_it_and_says_when_it_is_wrong() {
    let Some(browser) = Browser::launch().await else {
        return;
    };
    let lab = lab(&[("ADMIN_TOKEN", "correct-horse-battery")]).await;
    browser.open(&lab.url("/")).await;
    browser
        .wait_for(
            "!document.getElementById('token-form').hidden",
            "the token prompt",
        )
        .await;
    assert_eq!(
        browser
            .eval("document.getElementById('console').hidden")
            .await,
        true
    );

    browser.type_into("#token-input", "wrong-token-123").await;
    browser.click("#token-submit").await;
    browser
        .wait_for(
            "!document.getElementById('token-error').hidden",
            "the wrong-token message",
        )
        .await;
    let error = browser.text("#token-error").await;
    assert!(error.contains("refused"), "{error}");

    browser
        .type_into("#token-input", "correct-horse-battery")
        .await;
    browser.click("#token-submit").await;
    wait_live(&browser, "the event stream with the right token").await;
    assert_eq!(
        browser
            .eval("document.getElementById('console').hidden")
            .await,
        false
    );
    // Controls work with the token too.
    browser.click("#mode-outage").await;
    browser
        .wait_for(
            "document.getElementById('payment-mode').textContent === 'outage'",
            "the outage",
        )
        .await;
    // The token never went into a URL.
    let url = browser.eval("location.href").await;
    assert!(!url.as_str().unwrap().contains("correct-horse"), "{url}");
}

/// With PAYMENT_URL the page says where charges go, shows the client's
/// pool instead of the in-process simulator's controls, and changes the
/// remote provider's network faults through the service's admin API.
#[tokio::test]
async fn with_a_remote_provider_the_page_shows_its_pool_and_changes_its_faults() {
    let Some(browser) = Browser::launch().await else {
        return;
    };
    let mut config = reliability_lab::provider::ProviderConfig::defaults();
    config.listen_addr = "127.0.0.1:0".parse().unwrap();
    config.admin_token = Some("provider-token-1".into());
    config.simulator.payment_latency_min = std::time::Duration::from_millis(5);
    config.simulator.payment_latency_max = std::time::Duration::from_millis(20);
    let provider = reliability_lab::provider::Provider::bind(config)
        .await
        .unwrap();
    let provider_url = format!("http://{}", provider.local_addr());
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(provider.run(stop.clone()));
    let lab = lab(&[
        ("PAYMENT_URL", provider_url.as_str()),
        ("PAYMENT_ADMIN_TOKEN", "provider-token-1"),
        ("PAYMENT_MAX_CONNECTIONS", "8"),
    ])
    .await;
    open_live(&browser, &lab).await;
    browser
        .wait_for(
            "document.getElementById('provider-where').textContent.startsWith('remote: http://127.0.0.1:')",
            "the remote provider's URL",
        )
        .await;
    assert_eq!(
        browser.text("#provider-where").await,
        format!("remote: {provider_url}")
    );
    assert_eq!(browser.text("#pool-max").await, "8");
    assert_eq!(
        browser
            .eval("document.getElementById('local-provider').hidden")
            .await,
        true,
        "the in-process simulator's controls are hidden"
    );
    browser
        .wait_for(
            "document.getElementById('fault-now').textContent === 'now: none'",
            "the provider's faults",
        )
        .await;

    // Stall a fifth of the charges from the page: the provider has it.
    browser
        .eval("document.getElementById('fault-kind').value = 'stall'")
        .await;
    browser.type_into("#fault-rate", "0.2").await;
    browser.click("#fault-apply").await;
    browser
        .wait_for(
            "document.getElementById('fault-now').textContent === 'now: stall at 0.2'",
            "the change, as the provider reports it",
        )
        .await;
    let faults: Value = reqwest::Client::new()
        .get(format!("{provider_url}/admin/faults"))
        .bearer_auth("provider-token-1")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(faults["fault"], "stall");
    assert_eq!(faults["rate"], 0.2);
    browser
        .wait_for(
            "document.getElementById('changes').textContent.includes('provider faults: stall at 0.2')",
            "the change in the feed",
        )
        .await;
    // Traffic: the pool's connections show.
    browser.type_into("#load-rate", "20").await;
    browser.click("#load-start").await;
    browser
        .wait_for(
            "Number(document.getElementById('pool-open').textContent) >= 1",
            "an open connection",
        )
        .await;
    let shot = std::env::var_os("CONSOLE_REMOTE_SCREENSHOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("reliability-lab-console-remote.png"));
    browser.screenshot(&shot).await;
    assert_eq!(browser.errors(), Vec::<String>::new(), "console errors");
    stop.cancel();
}
