//! Experiments whose provider is a process of its own (`provider =
//! "process"`): a chain of `tiers` processes of this binary's `provider`
//! command, each on a free loopback port, the bottom one charging and each
//! one above it charging through the one below (`UPSTREAM_URL`). The
//! service the runner builds charges the top one over HTTP (`PAYMENT_URL`).
//!
//! Every provider starts with the variant's provider settings and the
//! experiment's seed. The schedule's `payment` changes go to the bottom
//! (where charges are drawn), its `faults` to the top (the socket the
//! service's client meets). After the run each provider's `/metrics` is
//! read for the figures: calls at each tier, the bottom's charges and
//! duplicates, faults staged and charges refused by a rate limit.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};

use super::figures::TierReading;
use super::file::Step;
use super::process::{request, sigterm, start_process, Started};

/// How long a provider may take to stop after SIGTERM.
const STOP_LIMIT: Duration = Duration::from_secs(10);

/// One provider of the chain.
struct Tier {
    name: String,
    started: Started,
}

/// The chain of provider processes, top (what the service calls) first.
pub(super) struct Chain {
    tiers: Vec<Tier>,
    token: Option<String>,
}

/// The sum of every series of `name` in a text exposition (its labels
/// whatever they are); 0 when absent.
pub(super) fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            let value = match rest.chars().next()? {
                ' ' => rest,
                '{' => &rest[rest.find('}')? + 1..],
                _ => return None,
            };
            value.trim().split(' ').next()?.parse::<f64>().ok()
        })
        .sum()
}

impl Chain {
    /// Starts `tiers` providers, the bottom first, each above it given the
    /// address of the one below.
    pub async fn start(
        binary: &Path,
        tiers: usize,
        settings: &[(String, String)],
        seed: u64,
    ) -> anyhow::Result<Self> {
        let token = settings
            .iter()
            .find(|(k, _)| k == "ADMIN_TOKEN")
            .map(|(_, v)| v.clone());
        let mut started: Vec<Tier> = Vec::with_capacity(tiers);
        for index in (0..tiers).rev() {
            let name = format!("provider {}", index + 1);
            let mut env: Vec<(String, String)> = settings.to_vec();
            env.push(("PAYMENT_SEED".into(), seed.to_string()));
            if let Some(below) = started.last() {
                env.push((
                    "UPSTREAM_URL".into(),
                    format!("http://{}", below.started.addr),
                ));
            }
            let process = start_process(
                binary,
                &["provider"],
                &name,
                &env,
                "payment provider listening",
                false,
            )
            .await?;
            started.push(Tier {
                name,
                started: process,
            });
        }
        started.reverse();
        Ok(Self {
            tiers: started,
            token,
        })
    }

    /// The URL of the provider the service calls.
    pub fn url(&self) -> String {
        format!("http://{}", self.tiers[0].started.addr)
    }

    /// Sends a step's provider changes: payment to the bottom, faults to
    /// the top.
    pub async fn apply(&self, step: &Step) -> anyhow::Result<()> {
        let bottom = self.tiers.last().expect("at least one tier");
        let top = &self.tiers[0];
        for (tier, path, body) in [
            (bottom, "/admin/payment", &step.payment_json),
            (top, "/admin/faults", &step.faults),
        ] {
            let Some(body) = body else { continue };
            let (status, answer) = request(
                tier.started.addr,
                "PUT",
                path,
                Some(body.to_string()),
                self.token.as_deref(),
            )
            .await
            .with_context(|| format!("{}: PUT {path}", tier.name))?;
            if status != 200 {
                bail!(
                    "{}: PUT {path} answered {status}: {}",
                    tier.name,
                    String::from_utf8_lossy(&answer)
                );
            }
        }
        Ok(())
    }

    /// Each provider's figures, top first.
    pub async fn readings(&self) -> anyhow::Result<Vec<TierReading>> {
        let mut readings = Vec::with_capacity(self.tiers.len());
        for tier in &self.tiers {
            let (status, body) = request(tier.started.addr, "GET", "/metrics", None, None)
                .await
                .with_context(|| format!("{}: GET /metrics", tier.name))?;
            if status != 200 {
                bail!("{}: GET /metrics answered {status}", tier.name);
            }
            let text = String::from_utf8_lossy(&body);
            let count = |name: &str| metric_sum(&text, name).round() as u64;
            readings.push(TierReading {
                requests: count("provider_requests_total"),
                charges: count("payment_charges_total"),
                duplicate_charges: count("payment_duplicate_charges_total"),
                faults: count("provider_faults_total"),
                rate_limited: count("provider_rate_limited_total"),
            });
        }
        Ok(readings)
    }

    /// Stops every provider (SIGTERM, then a kill after `STOP_LIMIT`), top
    /// first, saying so when one had to be killed or had died.
    pub async fn stop(self, progress: &mut (dyn Write + Send)) {
        for mut tier in self.tiers {
            if let Ok(Some(status)) = tier.started.child.try_wait() {
                let logs = tier.started.logs.lock().unwrap_or_else(|p| p.into_inner());
                let _ = writeln!(
                    progress,
                    "  {} had exited during the run ({status}):\n{}",
                    tier.name,
                    logs.iter().cloned().collect::<Vec<_>>().join("\n")
                );
                continue;
            }
            sigterm(&tier.started.child);
            if tokio::time::timeout(STOP_LIMIT, tier.started.child.wait())
                .await
                .is_err()
            {
                let _ = writeln!(
                    progress,
                    "  {} did not stop within {STOP_LIMIT:?}; killed",
                    tier.name
                );
                let _ = tier.started.child.kill().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_metric_is_summed_over_its_labels_and_nothing_else() {
        let text = "# HELP provider_faults_total x\n\
                    # TYPE provider_faults_total counter\n\
                    provider_faults_total{fault=\"stall\"} 3\n\
                    provider_faults_total{fault=\"refuse\"} 4\n\
                    provider_faults_totally 100\n\
                    provider_requests_total 12\n";
        assert_eq!(metric_sum(text, "provider_faults_total"), 7.0);
        assert_eq!(metric_sum(text, "provider_requests_total"), 12.0);
        assert_eq!(metric_sum(text, "payment_charges_total"), 0.0);
    }
}
