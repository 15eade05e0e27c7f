//! Prometheus metrics from one registry; names carry their units.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::LazyLock;
use std::time::Instant;
use tracing::span::{Attributes, Id};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;

/// The target of the spans that time the steps of the message path (`turn.begin`, `turn.dial`,
/// `turn.harness`, `turn.finish`, and `message` around them all). `step_timings` records how
/// long each lived into `sandwarden_step_duration_seconds{step}`, whatever the log filter says.
pub const STEPS: &str = "sandwarden::steps";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StepLabel {
    /// The span's name (a literal: no allocation per observation on the message path).
    pub step: &'static str,
}

type StepFamily = Family<StepLabel, Histogram, fn() -> Histogram>;

/// One per process, as the spans it is fed from are: from 20 µs up, each bucket 1.25× the last.
static STEP_DURATION: LazyLock<StepFamily> = LazyLock::new(|| {
    Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.000_02, 1.25, 56)))
});

/// When a step's span began.
struct Began(Instant);

/// Times the spans of target `STEPS` from their creation to their close.
struct StepTimings;

impl<S> Layer<S> for StepTimings
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, _attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(Began(Instant::now()));
        }
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(&id) else { return };
        let Some(began) = span.extensions().get::<Began>().map(|b| b.0) else {
            return;
        };
        STEP_DURATION
            .get_or_create(&StepLabel { step: span.name() })
            .observe(began.elapsed().as_secs_f64());
    }
}

/// The layer that feeds `sandwarden_step_duration_seconds`, seeing only the step spans.
pub fn step_timings<S>() -> impl Layer<S> + Send + Sync
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    StepTimings.with_filter(tracing_subscriber::filter::filter_fn(|m| {
        m.target() == STEPS
    }))
}

/// A span timing one step of the message path (see `STEPS`).
#[macro_export]
macro_rules! step {
    ($name:literal) => {
        tracing::info_span!(target: "sandwarden::steps", $name)
    };
}

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
        registry.register_with_unit(
            "step_duration",
            "Time each step of the message path took: turn.begin (the turn's first commit), \
             turn.dial (until the harness answers), turn.harness (its events to the last), \
             turn.finish (the outcome's commit), message (the whole request after auth)",
            prometheus_client::registry::Unit::Seconds,
            STEP_DURATION.clone(),
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
