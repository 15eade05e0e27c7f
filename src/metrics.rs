//! Prometheus metrics from one registry; names carry their units.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClaimLabel {
    pub kind: String,
}

pub struct Metrics {
    registry: Registry,
    pub http_requests: Family<StatusLabel, Counter>,
    pub turns: Family<OutcomeLabel, Counter>,
    pub turn_duration: Histogram,
    pub claims: Family<ClaimLabel, Counter>,
    pub claim_duration: Histogram,
    pub dead_sessions: Counter,
    pub webhook_attempts: Family<OutcomeLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("sandwarden");
        let http_requests = Family::<StatusLabel, Counter>::default();
        let turns = Family::<OutcomeLabel, Counter>::default();
        let turn_duration = Histogram::new(exponential_buckets(0.001, 2.0, 20));
        let claims = Family::<ClaimLabel, Counter>::default();
        let claim_duration = Histogram::new(exponential_buckets(0.0005, 2.0, 18));
        let dead_sessions = Counter::default();
        let webhook_attempts = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests by status code",
            http_requests.clone(),
        );
        registry.register("turns", "Turns by outcome", turns.clone());
        registry.register_with_unit(
            "turn_duration",
            "Turn duration",
            prometheus_client::registry::Unit::Seconds,
            turn_duration.clone(),
        );
        registry.register(
            "claims",
            "Sandboxes claimed for new sessions, warm or cold",
            claims.clone(),
        );
        registry.register_with_unit(
            "claim_duration",
            "Time from create request to a sandbox bound to the session",
            prometheus_client::registry::Unit::Seconds,
            claim_duration.clone(),
        );
        registry.register(
            "dead_sessions",
            "Sessions marked dead",
            dead_sessions.clone(),
        );
        registry.register(
            "webhook_attempts",
            "Webhook delivery attempts by outcome",
            webhook_attempts.clone(),
        );
        Metrics {
            registry,
            http_requests,
            turns,
            turn_duration,
            claims,
            claim_duration,
            dead_sessions,
            webhook_attempts,
        }
    }
}

impl Metrics {
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    pub fn turn(&self, outcome: &str) {
        self.turns
            .get_or_create(&OutcomeLabel {
                outcome: outcome.into(),
            })
            .inc();
    }

    pub fn claim(&self, kind: &str) {
        self.claims
            .get_or_create(&ClaimLabel { kind: kind.into() })
            .inc();
    }
}
