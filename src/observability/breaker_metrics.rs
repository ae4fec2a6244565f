//! The breaker's figures that change on every call, read when Prometheus
//! scrapes rather than pushed on each call: the consecutive count, the
//! failure-rate window (calls and the share that failed), and which policy
//! is in force. A collector of its own, so that `/metrics` asks the breaker
//! once per scrape.

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{Gauge, IntGauge, IntGaugeVec, Opts};

use crate::reliability::Breaker;

pub struct BreakerCollector {
    breaker: Breaker,
    descs: Vec<Desc>,
}

const CONSECUTIVE: (&str, &str) = (
    "circuit_breaker_consecutive_failures",
    "Failures in a row the breaker has counted (the consecutive policy opens on BREAKER_FAILURE_THRESHOLD).",
);
const WINDOW_CALLS: (&str, &str) = (
    "circuit_breaker_window_calls",
    "Calls in the failure-rate policy's window now (present under that policy only).",
);
const WINDOW_RATIO: (&str, &str) = (
    "circuit_breaker_window_failure_ratio",
    "Share of the calls in the failure-rate policy's window that failed, slow calls included (present under that policy once the window holds a call).",
);
const POLICY: (&str, &str) = (
    "circuit_breaker_policy",
    "1 for the policy that opens the breaker now, 0 for the other.",
);
const POLICIES: [&str; 2] = ["consecutive", "failure_rate"];

fn int_gauge((name, help): (&str, &str)) -> IntGauge {
    IntGauge::new(name, help).expect("valid metric")
}

fn policy_gauge() -> IntGaugeVec {
    IntGaugeVec::new(Opts::new(POLICY.0, POLICY.1), &["policy"]).expect("valid metric")
}

impl BreakerCollector {
    pub fn new(breaker: Breaker) -> Self {
        let mut descs = Vec::new();
        descs.extend(int_gauge(CONSECUTIVE).desc().into_iter().cloned());
        descs.extend(int_gauge(WINDOW_CALLS).desc().into_iter().cloned());
        descs.extend(
            Gauge::new(WINDOW_RATIO.0, WINDOW_RATIO.1)
                .expect("valid metric")
                .desc()
                .into_iter()
                .cloned(),
        );
        descs.extend(policy_gauge().desc().into_iter().cloned());
        Self { breaker, descs }
    }
}

impl Collector for BreakerCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let snapshot = self.breaker.snapshot();
        let mut families = Vec::new();
        let consecutive = int_gauge(CONSECUTIVE);
        consecutive.set(i64::from(snapshot.consecutive_failures));
        families.extend(consecutive.collect());
        if let Some(calls) = snapshot.window_calls {
            let gauge = int_gauge(WINDOW_CALLS);
            gauge.set(i64::try_from(calls).unwrap_or(i64::MAX));
            families.extend(gauge.collect());
        }
        if let Some(ratio) = snapshot.window_failure_rate {
            let gauge = Gauge::new(WINDOW_RATIO.0, WINDOW_RATIO.1).expect("valid metric");
            gauge.set(ratio);
            families.extend(gauge.collect());
        }
        let policy = policy_gauge();
        for name in POLICIES {
            policy
                .with_label_values(&[name])
                .set(i64::from(name == snapshot.policy));
        }
        families.extend(policy.collect());
        families
    }
}
