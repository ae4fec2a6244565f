//! Read when Prometheus scrapes, not pushed: the retry's jitter kind (a
//! run-time switch), `retry_jitter_kind{kind}`, 1 for the kind in force, 0
//! for the others; and the client-side throttle's probability of shedding
//! an attempt now, `client_throttle_probability`; the concurrency limit and
//! the calls in flight under it, `concurrency_limit` and
//! `concurrency_limit_in_flight` (both absent while it is off).

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{Gauge, IntGauge, IntGaugeVec, Opts};

use crate::reliability::{JitterKind, Reliability};

pub struct JitterCollector {
    reliability: Reliability,
    desc: Vec<Desc>,
}

fn gauge() -> IntGaugeVec {
    IntGaugeVec::new(
        Opts::new(
            "retry_jitter_kind",
            "1 for the retry's jitter kind now (RETRY_JITTER_KIND, or as switched at /admin/reliability), 0 for the others.",
        ),
        &["kind"],
    )
    .expect("valid metric")
}

impl JitterCollector {
    pub fn new(reliability: Reliability) -> Self {
        let desc = gauge().desc().into_iter().cloned().collect();
        Self { reliability, desc }
    }
}

impl Collector for JitterCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.desc.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let now = self.reliability.switches().retry_jitter;
        let g = gauge();
        for kind in JitterKind::ALL {
            g.with_label_values(&[kind.as_str()])
                .set(i64::from(kind == now));
        }
        g.collect()
    }
}

pub struct ThrottleCollector {
    reliability: Reliability,
    desc: Vec<Desc>,
}

fn probability_gauge() -> Gauge {
    Gauge::new(
        "client_throttle_probability",
        "The probability that client-side throttling (THROTTLE) sheds a charge attempt now: max(0, (requests - K x accepts) / (requests + 1)) over THROTTLE_WINDOW; 0 while it is off.",
    )
    .expect("valid metric")
}

impl ThrottleCollector {
    pub fn new(reliability: Reliability) -> Self {
        let desc = probability_gauge().desc().into_iter().cloned().collect();
        Self { reliability, desc }
    }
}

impl Collector for ThrottleCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.desc.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let g = probability_gauge();
        if self.reliability.switches().throttle_enabled {
            g.set(self.reliability.throttle().probability());
        }
        g.collect()
    }
}

pub struct LimitCollector {
    reliability: Reliability,
    desc: Vec<Desc>,
}

fn limit_gauges() -> (IntGauge, IntGauge) {
    (
        IntGauge::new(
            "concurrency_limit",
            "The limit on charge calls in flight now (CONCURRENCY_LIMIT; absent while off).",
        )
        .expect("valid metric"),
        IntGauge::new(
            "concurrency_limit_in_flight",
            "Charge calls in flight under the concurrency limit (CONCURRENCY_LIMIT; absent while off).",
        )
        .expect("valid metric"),
    )
}

impl LimitCollector {
    pub fn new(reliability: Reliability) -> Self {
        let (a, b) = limit_gauges();
        let desc = a.desc().into_iter().chain(b.desc()).cloned().collect();
        Self { reliability, desc }
    }
}

impl Collector for LimitCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.desc.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let (limit, in_flight) = limit_gauges();
        let Some((now, flying)) = self.reliability.limit().now() else {
            return Vec::new();
        };
        limit.set(i64::from(now));
        in_flight.set(i64::from(flying));
        let mut families = limit.collect();
        families.extend(in_flight.collect());
        families
    }
}
