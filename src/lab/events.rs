//! The lab's feed: timeline samples and changes (breaker transitions, setting
//! changes), broadcast to whoever listens, with the recent changes kept.
//!
//! Publishing never waits. Listeners read from a bounded broadcast channel;
//! one that falls more than `FEED_CAPACITY` events behind skips to the
//! newest and is told how many it missed, so a slow or stuck page costs
//! memory for at most that many events and never delays the recorder, the
//! breaker or a request.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::sync::broadcast;
use tokio::time::Instant;

use super::sample::Sample;
use crate::payment::Mode;
use crate::reliability::{BreakerObserver, BreakerState, Rejection};

/// Events a listener may fall behind before it skips.
pub const FEED_CAPACITY: usize = 256;
/// Changes kept for a page that connects later.
pub const RECENT_CHANGES: usize = 50;

/// One thing the feed carries.
#[derive(Debug, Clone)]
pub enum LabEvent {
    Sample(Arc<Sample>),
    Change(Arc<Change>),
}

/// What changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    /// The breaker moved between states (by itself or by a reset).
    Breaker,
    /// The payment simulator's settings (from the admin API, or a brownout
    /// ending by itself).
    Payment,
    /// The retry and breaker switches.
    Reliability,
    /// The built-in traffic generator started or stopped.
    Load,
    /// The breaker's policy or figures (from the admin API).
    BreakerSettings,
}

/// One change, as a page lists it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Change {
    pub at: DateTime<Utc>,
    /// Seconds since the service started (the timeline's clock).
    pub t: f64,
    pub kind: ChangeKind,
    /// One line for people: "breaker closed → open".
    pub summary: String,
    /// The new state or settings, as the matching admin endpoint shows them.
    #[schema(value_type = Object)]
    pub detail: serde_json::Value,
}

/// The feed.
pub struct Feed {
    sender: broadcast::Sender<LabEvent>,
    recent: Mutex<VecDeque<Arc<Change>>>,
    /// The payment mode the feed last reported, so the recorder can tell a
    /// brownout that ended by itself from one an admin ended.
    payment_mode: Mutex<Option<Mode>>,
    started: Instant,
}

impl std::fmt::Debug for Feed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Feed").finish_non_exhaustive()
    }
}

impl Feed {
    /// A feed whose clock starts at `started` (the service's start).
    pub fn new(started: Instant) -> Self {
        let (sender, _) = broadcast::channel(FEED_CAPACITY);
        Self {
            sender,
            recent: Mutex::new(VecDeque::with_capacity(RECENT_CHANGES)),
            payment_mode: Mutex::new(None),
            started,
        }
    }

    /// Seconds on the timeline's clock now.
    pub fn clock(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// A new listener: it gets every event published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<LabEvent> {
        self.sender.subscribe()
    }

    /// The recent changes, oldest first.
    pub fn recent_changes(&self) -> Vec<Arc<Change>> {
        lock(&self.recent).iter().cloned().collect()
    }

    pub(crate) fn publish_sample(&self, sample: Arc<Sample>) {
        // No listener is not an error.
        let _ = self.sender.send(LabEvent::Sample(sample));
    }

    /// Records a change and tells every listener.
    pub fn publish(&self, kind: ChangeKind, summary: impl Into<String>, detail: serde_json::Value) {
        let change = Arc::new(Change {
            at: crate::clock::now(),
            t: self.clock(),
            kind,
            summary: summary.into(),
            detail,
        });
        {
            let mut recent = lock(&self.recent);
            if recent.len() == RECENT_CHANGES {
                recent.pop_front();
            }
            recent.push_back(change.clone());
        }
        let _ = self.sender.send(LabEvent::Change(change));
    }

    /// Notes the payment mode a published change set.
    pub fn payment_mode_set(&self, mode: Mode) {
        *lock(&self.payment_mode) = Some(mode);
    }

    /// Notes the mode the recorder saw; true when it differs from the last
    /// one noted (the first sighting only sets it).
    pub(crate) fn payment_mode_seen(&self, mode: Mode) -> bool {
        let mut last = lock(&self.payment_mode);
        let changed = last.is_some_and(|m| m != mode);
        *last = Some(mode);
        changed
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The feed hears the breaker's transitions (its rejections are counted by
/// the metrics and sampled by the timeline).
impl BreakerObserver for Feed {
    fn state_changed(&self, from: BreakerState, to: BreakerState) {
        self.publish(
            ChangeKind::Breaker,
            format!("breaker {from} → {to}"),
            serde_json::json!({ "from": from, "to": to }),
        );
    }

    fn rejected(&self, _kind: Rejection) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_listener_that_falls_behind_skips_and_is_told_how_far() {
        let feed = Feed::new(Instant::now());
        let mut rx = feed.subscribe();
        for _ in 0..FEED_CAPACITY + 10 {
            feed.publish(ChangeKind::Load, "x", serde_json::Value::Null);
        }
        match rx.recv().await {
            Err(broadcast::error::RecvError::Lagged(n)) => assert_eq!(n, 10),
            other => panic!("expected a lag, got {other:?}"),
        }
        // Then it reads on from the oldest event still held.
        assert!(rx.recv().await.is_ok());
    }

    #[test]
    fn only_the_most_recent_changes_are_kept() {
        let feed = Feed::new(Instant::now());
        for i in 0..RECENT_CHANGES + 5 {
            feed.publish(ChangeKind::Load, format!("{i}"), serde_json::Value::Null);
        }
        let recent = feed.recent_changes();
        assert_eq!(recent.len(), RECENT_CHANGES);
        assert_eq!(recent[0].summary, "5");
        assert_eq!(
            recent.last().unwrap().summary,
            format!("{}", RECENT_CHANGES + 4)
        );
    }

    #[test]
    fn a_breaker_transition_becomes_a_change() {
        let feed = Feed::new(Instant::now());
        feed.state_changed(BreakerState::Closed, BreakerState::Open);
        let recent = feed.recent_changes();
        assert_eq!(recent[0].kind, ChangeKind::Breaker);
        assert_eq!(recent[0].summary, "breaker closed → open");
        assert_eq!(recent[0].detail["to"], "open");
    }

    #[test]
    fn the_recorder_reports_a_mode_change_nobody_published() {
        let feed = Feed::new(Instant::now());
        assert!(!feed.payment_mode_seen(Mode::Normal));
        feed.payment_mode_set(Mode::Brownout);
        assert!(!feed.payment_mode_seen(Mode::Brownout));
        // The brownout ended by itself.
        assert!(feed.payment_mode_seen(Mode::Normal));
        assert!(!feed.payment_mode_seen(Mode::Normal));
    }
}
