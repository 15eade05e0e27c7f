//! Per-tenant quotas: what one tenant may hold at once (live sessions, running turns, open event
//! streams and terminals, connections, requests in flight) and send (parts and bytes per message). A key carries its tenant's
//! limits; what it leaves unset comes from `serve`'s defaults, and the server-wide cap on live
//! sessions bounds every tenant together. Over a limit the request is answered
//! `429 quota_exceeded`, naming the limit, the use and the maximum, and changes nothing.

use super::SessionError;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A tenant's limits as set on its key (`POST`/`PATCH /v1/api-keys`); unset ones take the
/// server's defaults.
#[derive(utoipa::ToSchema, Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Sessions not yet deleted, failed or dead (creating, ready, running, input_required).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live_sessions: Option<u64>,
    /// Turns running at once (on this replica).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrent_turns: Option<u64>,
    /// Event streams (SSE) and attached terminals open at once (on this replica).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open_streams: Option<u64>,
    /// Client connections counted against the tenant at once (on this replica): a connection
    /// counts from its first request with the tenant's key until it closes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open_connections: Option<u64>,
    /// Requests being answered at once (on this replica), until their response's headers; an
    /// event stream's body counts under `open_streams` instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrent_requests: Option<u64>,
    /// Parts in one message (at most 256 for everyone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_parts: Option<u64>,
    /// Bytes of text and inline data in one message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_bytes: Option<u64>,
    /// MiB of memory the tenant's live sandboxes may be given together: each sandbox counts
    /// its template's memory limit (`container.memory_mib`), which every runtime enforces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox_memory_mib: Option<u64>,
    /// MiB of history and event pages being answered at once (on this replica): each page
    /// counts twice its stored size, from before it is read until its answer is sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer_mib: Option<u64>,
    /// Requests a second this key may send, sustained (this replica's count, per key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_rate: Option<u64>,
    /// Requests this key may send at once above `request_rate` before it is held to it (the
    /// bucket's size; default: twice the rate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_burst: Option<u64>,
    /// What the tenant's turns may use in all, counted from the agents' reported usage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<Budget>,
}

/// A tenant's budget: tokens (input and output together) and turn time, over all its turns.
#[derive(utoipa::ToSchema, Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub turn_seconds: Option<u64>,
}

/// Refuses a turn when the tenant has used its budget: `402 budget_exhausted`, before anything
/// runs.
pub fn check_budget(budget: &Budget, used: &crate::store::Usage) -> Result<(), SessionError> {
    let tokens = (used.input_tokens + used.output_tokens).max(0) as u64;
    let spent = [
        ("tokens", budget.tokens, tokens),
        (
            "turn_seconds",
            budget.turn_seconds,
            used.turn_seconds as u64,
        ),
    ];
    for (name, max, used) in spent {
        if let Some(max) = max
            && used >= max
        {
            return Err(SessionError::Budget {
                budget: name,
                used,
                max,
            });
        }
    }
    Ok(())
}

impl Limits {
    /// Checks limits a client sent: every one at least 1.
    pub fn validate(&self) -> Result<(), String> {
        for (name, v) in self.fields() {
            if v == Some(0) {
                return Err(format!(
                    "limits.{name} must be at least 1 (leave it out for the server's default)"
                ));
            }
        }
        if let Some(b) = &self.budget
            && (b.tokens == Some(0) || b.turn_seconds == Some(0))
        {
            return Err("limits.budget's tokens and turn_seconds must be at least 1".into());
        }
        if self
            .message_parts
            .is_some_and(|n| n > sandwarden_proto::event::MAX_PARTS as u64)
        {
            return Err(format!(
                "limits.message_parts is at most {}",
                sandwarden_proto::event::MAX_PARTS
            ));
        }
        Ok(())
    }

    fn fields(&self) -> [(&'static str, Option<u64>); 11] {
        [
            ("live_sessions", self.live_sessions),
            ("concurrent_turns", self.concurrent_turns),
            ("open_streams", self.open_streams),
            ("open_connections", self.open_connections),
            ("concurrent_requests", self.concurrent_requests),
            ("message_parts", self.message_parts),
            ("message_bytes", self.message_bytes),
            ("sandbox_memory_mib", self.sandbox_memory_mib),
            ("answer_mib", self.answer_mib),
            ("request_rate", self.request_rate),
            ("request_burst", self.request_burst),
        ]
    }

    /// These limits, with the unset ones taken from `defaults`.
    pub fn or(&self, defaults: &Limits) -> Limits {
        Limits {
            live_sessions: self.live_sessions.or(defaults.live_sessions),
            concurrent_turns: self.concurrent_turns.or(defaults.concurrent_turns),
            open_streams: self.open_streams.or(defaults.open_streams),
            open_connections: self.open_connections.or(defaults.open_connections),
            concurrent_requests: self.concurrent_requests.or(defaults.concurrent_requests),
            message_parts: self.message_parts.or(defaults.message_parts),
            message_bytes: self.message_bytes.or(defaults.message_bytes),
            sandbox_memory_mib: self.sandbox_memory_mib.or(defaults.sandbox_memory_mib),
            answer_mib: self.answer_mib.or(defaults.answer_mib),
            request_rate: self.request_rate.or(defaults.request_rate),
            request_burst: self.request_burst.or(defaults.request_burst),
            budget: self.budget.clone().or_else(|| defaults.budget.clone()),
        }
    }
}

/// Checks a message's parts against the tenant's per-message limits.
pub fn check_message(
    parts: &[sandwarden_proto::event::Part],
    limits: &Limits,
) -> Result<(), SessionError> {
    use sandwarden_proto::event::Part;
    let n = parts.len() as u64;
    if let Some(max) = limits.message_parts
        && n > max
    {
        return Err(SessionError::quota(
            "message_parts",
            n,
            max,
            "send fewer parts",
        ));
    }
    let bytes: usize = parts
        .iter()
        .map(|p| match p {
            Part::Text { text } => text.len(),
            Part::Image { data, url, .. } => {
                data.as_ref().map_or(0, String::len) + url.as_ref().map_or(0, String::len)
            }
            Part::File {
                text, data, url, ..
            } => [text, data, url]
                .iter()
                .map(|f| f.as_ref().map_or(0, String::len))
                .sum(),
        })
        .sum();
    if let Some(max) = limits.message_bytes
        && bytes as u64 > max
    {
        return Err(SessionError::quota(
            "message_bytes",
            bytes as u64,
            max,
            "send a smaller message",
        ));
    }
    Ok(())
}

/// What tenants hold at once of one kind (event streams, connections, requests in flight), per
/// tenant, on this replica: each held one is a `Slot`, given back when it drops.
#[derive(Clone)]
pub struct Held {
    /// The limit it counts against, as the 429 names it.
    limit: &'static str,
    /// What a refused client should do.
    hint: &'static str,
    counts: Arc<Mutex<HashMap<String, u64>>>,
}

impl Held {
    pub fn new(limit: &'static str, hint: &'static str) -> Held {
        Held {
            limit,
            hint,
            counts: Arc::default(),
        }
    }

    /// Takes one of the tenant's slots, held until the returned guard drops; refused with
    /// `429 quota_exceeded` when it already holds `max`.
    pub fn take(&self, tenant: &str, max: Option<u64>) -> Result<Slot, SessionError> {
        self.take_n(tenant, 1, max)
            .map_err(|used| SessionError::quota(self.limit, used, max.unwrap_or(0), self.hint))
    }

    /// Takes `amount` of the tenant's allowance at once, held until the returned guard drops;
    /// refused, with what the tenant holds, when that would bring it past `max`.
    fn take_n(&self, tenant: &str, amount: u64, max: Option<u64>) -> Result<Slot, u64> {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let n = counts.entry(tenant.to_string()).or_insert(0);
        if let Some(max) = max
            && n.saturating_add(amount) > max
        {
            let used = *n;
            if used == 0 {
                counts.remove(tenant);
            }
            return Err(used);
        }
        *n += amount;
        Ok(Slot {
            held: self.clone(),
            tenant: tenant.to_string(),
            amount,
        })
    }
}

/// One thing a tenant holds (a stream, a connection, a request, bytes being answered); gives
/// its share back when dropped.
pub struct Slot {
    held: Held,
    tenant: String,
    amount: u64,
}

impl Slot {
    /// The tenant this slot is counted against.
    pub fn tenant(&self) -> &str {
        &self.tenant
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = self.held.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = counts.get_mut(&self.tenant) {
            *n = n.saturating_sub(self.amount);
            if *n == 0 {
                counts.remove(&self.tenant);
            }
        }
    }
}

/// Requests per key over time, on this replica (`request_rate`, `request_burst`): a token
/// bucket per key, holding up to the burst and refilled at the rate. A request that finds it
/// empty is refused with how long until the next one may come.
#[derive(Clone, Default)]
pub struct Rates {
    buckets: Arc<Mutex<HashMap<String, Bucket>>>,
}

struct Bucket {
    /// Requests the key may send now (fractions accrue between requests).
    tokens: f64,
    /// When `tokens` was last brought up to date.
    at: std::time::Instant,
}

/// Buckets kept before full ones (keys quiet long enough to have refilled) are forgotten.
const RATE_BUCKETS_KEPT: usize = 10_000;

impl Rates {
    /// Counts one request of `key_id` against its limits; refused with `RateLimited` when it
    /// has sent its burst and the rate has not yet given it another.
    pub fn take(&self, key_id: &str, limits: &Limits) -> Result<(), SessionError> {
        self.take_at(key_id, limits, std::time::Instant::now())
    }

    fn take_at(
        &self,
        key_id: &str,
        limits: &Limits,
        now: std::time::Instant,
    ) -> Result<(), SessionError> {
        let Some(rate) = limits.request_rate else {
            return Ok(());
        };
        let burst = limits
            .request_burst
            .unwrap_or(rate.saturating_mul(2))
            .max(1);
        let (rate_f, burst_f) = (rate as f64, burst as f64);
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= RATE_BUCKETS_KEPT && !buckets.contains_key(key_id) {
            buckets.retain(|_, b| {
                b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate_f < burst_f
            });
        }
        // Found without allocating (every keyed request comes here); made on a key's first.
        if !buckets.contains_key(key_id) {
            buckets.insert(
                key_id.to_string(),
                Bucket {
                    tokens: burst_f,
                    at: now,
                },
            );
        }
        let Some(bucket) = buckets.get_mut(key_id) else {
            return Ok(());
        };
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate_f).min(burst_f);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return Ok(());
        }
        let wait = (1.0 - bucket.tokens) / rate_f;
        Err(SessionError::RateLimited {
            rate,
            burst,
            retry_after_s: (wait.ceil() as u64).max(1),
        })
    }
}

/// Open event streams and terminals per tenant, on this replica (`open_streams`).
#[derive(Clone)]
pub struct Streams(Held);

impl Default for Streams {
    fn default() -> Self {
        Streams(Held::new(
            "open_streams",
            "close an event stream or a terminal first",
        ))
    }
}

impl Streams {
    /// Takes one of the tenant's stream slots; refused when it already holds `max`.
    pub fn open(&self, tenant: &str, max: Option<u64>) -> Result<Slot, SessionError> {
        self.0.take(tenant, max)
    }
}

/// Memory for history and event pages being answered, on this replica: a page is admitted
/// before it is read, counting twice its stored bytes (the rows read and the JSON written from
/// them are both in memory for a while), and keeps its share until its answer has been sent.
/// Each tenant may hold `answer_mib` (429 over it); everyone together `--answer-memory-mib`,
/// for which a page waits as long as a client may pause (`--client-timeout`; 503 after that).
#[derive(Clone)]
pub struct Answers {
    /// Server-wide, in KiB; `None`: no cap.
    server: Option<(Arc<Semaphore>, u64)>,
    /// How long a page waits for the server's memory.
    wait: std::time::Duration,
    /// Per tenant, in KiB.
    tenants: Held,
}

/// A page's share of the answer memory, given back when dropped (with the answer's body).
pub struct Admitted {
    _server: Option<OwnedSemaphorePermit>,
    _tenant: Slot,
}

impl Answers {
    /// `server_mib`: the cap for everyone together (`None`: none), waited for up to `wait`.
    pub fn new(server_mib: Option<u64>, wait: std::time::Duration) -> Answers {
        let server = server_mib.map(|mib| {
            let kib = mib.saturating_mul(1024).min(Semaphore::MAX_PERMITS as u64);
            (Arc::new(Semaphore::new(kib as usize)), kib)
        });
        Answers {
            server,
            wait,
            tenants: Held::new("answer_mib", "fetch fewer or smaller pages at once"),
        }
    }

    /// Admits a page of `stored_bytes` for `tenant`, whose allowance is `tenant_mib`. A page
    /// larger than an allowance on its own is admitted when nothing else holds it (it counts as
    /// the whole allowance), so every page can be fetched.
    pub async fn admit(
        &self,
        tenant: &str,
        stored_bytes: i64,
        tenant_mib: Option<u64>,
    ) -> Result<Admitted, SessionError> {
        let tenant_kib = tenant_mib.map(|m| m.saturating_mul(1024));
        let mut kib = (stored_bytes.max(0) as u64)
            .saturating_mul(2)
            .div_ceil(1024)
            .max(1);
        if let Some(max) = tenant_kib {
            kib = kib.min(max);
        }
        if let Some((_, total)) = &self.server {
            kib = kib.min(*total);
        }
        let slot = self
            .tenants
            .take_n(tenant, kib, tenant_kib)
            .map_err(|used_kib| {
                SessionError::quota(
                    "answer_mib",
                    used_kib.div_ceil(1024),
                    tenant_mib.unwrap_or(0),
                    "fetch fewer or smaller pages at once (a page counts twice its size until its \
                 answer is sent)",
                )
            })?;
        let server = match &self.server {
            None => None,
            Some((sem, _)) => {
                let wanted = u32::try_from(kib).unwrap_or(u32::MAX);
                match tokio::time::timeout(self.wait, sem.clone().acquire_many_owned(wanted)).await
                {
                    Ok(Ok(permit)) => Some(permit),
                    _ => {
                        return Err(SessionError::AnswersBusy);
                    }
                }
            }
        };
        Ok(Admitted {
            _server: server,
            _tenant: slot,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_keys_rate_allows_its_burst_then_refills_at_the_rate() {
        let rates = Rates::default();
        let limits = Limits {
            request_rate: Some(4),
            request_burst: Some(3),
            ..Limits::default()
        };
        let t0 = std::time::Instant::now();
        for _ in 0..3 {
            rates.take_at("k1", &limits, t0).expect("within the burst");
        }
        let refused = rates
            .take_at("k1", &limits, t0)
            .expect_err("past the burst");
        assert!(
            matches!(
                refused,
                SessionError::RateLimited {
                    rate: 4,
                    burst: 3,
                    retry_after_s: 1
                }
            ),
            "{refused:?}"
        );
        // Another key has its own bucket.
        rates.take_at("k2", &limits, t0).expect("another key");
        // A quarter of a second gives one request back, not two.
        let later = t0 + std::time::Duration::from_millis(250);
        rates.take_at("k1", &limits, later).expect("refilled one");
        assert!(rates.take_at("k1", &limits, later).is_err());
        // A long pause refills no more than the burst.
        let much_later = t0 + std::time::Duration::from_secs(60);
        for _ in 0..3 {
            rates
                .take_at("k1", &limits, much_later)
                .expect("a whole burst");
        }
        assert!(rates.take_at("k1", &limits, much_later).is_err());
        // Without a rate nothing is counted; the burst defaults to twice the rate.
        let unlimited = Limits::default();
        for _ in 0..1000 {
            rates.take_at("k3", &unlimited, t0).expect("no rate");
        }
        let doubled = Limits {
            request_rate: Some(2),
            ..Limits::default()
        };
        for _ in 0..4 {
            rates.take_at("k4", &doubled, t0).expect("twice the rate");
        }
        assert!(rates.take_at("k4", &doubled, t0).is_err());
    }

    #[test]
    fn stream_slots_are_counted_per_tenant_and_given_back() {
        let streams = Streams::default();
        let a1 = streams.open("a", Some(2)).expect("first");
        let _a2 = streams.open("a", Some(2)).expect("second");
        let refused = streams.open("a", Some(2)).err().expect("third refused");
        assert!(
            matches!(
                refused,
                SessionError::Quota {
                    limit: "open_streams",
                    used: 2,
                    max: 2,
                    ..
                }
            ),
            "{refused:?}"
        );
        let _b = streams.open("b", Some(1)).expect("another tenant");
        drop(a1);
        let _a3 = streams.open("a", Some(2)).expect("a slot came back");
    }

    #[test]
    fn each_kind_of_slot_is_refused_under_its_own_limit() {
        let connections = Held::new("open_connections", "close some");
        let requests = Held::new("concurrent_requests", "wait");
        let c = connections.take("a", Some(1)).expect("a connection");
        assert_eq!(c.tenant(), "a");
        let _r = requests
            .take("a", Some(1))
            .expect("a request, counted apart");
        let refused = connections.take("a", Some(1)).err().expect("refused");
        assert!(matches!(
            refused,
            SessionError::Quota {
                limit: "open_connections",
                ..
            }
        ));
        let refused = requests.take("a", Some(1)).err().expect("refused");
        assert!(matches!(
            refused,
            SessionError::Quota {
                limit: "concurrent_requests",
                ..
            }
        ));
        assert!(connections.take("a", None).is_ok(), "no limit, no refusal");
    }

    #[tokio::test]
    async fn answer_memory_is_held_per_tenant_and_waited_for_server_wide() {
        let answers = Answers::new(Some(3), std::time::Duration::from_secs(30));
        let mib = 1024 * 1024 / 2; // stored bytes counting 1 MiB
        let a = answers.admit("a", mib, Some(2)).await.expect("1 of a's 2");
        let _a2 = answers.admit("a", mib, Some(2)).await.expect("2 of a's 2");
        let refused = answers
            .admit("a", 1, Some(2))
            .await
            .err()
            .expect("a is full");
        assert!(
            matches!(
                refused,
                SessionError::Quota {
                    limit: "answer_mib",
                    used: 2,
                    max: 2,
                    ..
                }
            ),
            "{refused:?}"
        );
        let b = answers
            .admit("b", mib, Some(2))
            .await
            .expect("b has its own");
        // The server's 3 MiB are taken: b's next page waits until one is answered.
        let answers2 = answers.clone();
        let waiting = tokio::spawn(async move { answers2.admit("b", mib, Some(2)).await });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "waits for the server's memory");
        drop(a);
        waiting
            .await
            .expect("joined")
            .expect("admitted once a's page was sent");
        drop(b);
        // A page past a tenant's whole allowance gets through alone, counting as all of it.
        let huge = answers.admit("c", 100 * mib, Some(1)).await.expect("alone");
        assert!(answers.admit("c", 1, Some(1)).await.is_err());
        drop(huge);
    }

    #[tokio::test(start_paused = true)]
    async fn a_page_waits_for_the_servers_memory_as_long_as_allowed_then_is_503() {
        let wait = std::time::Duration::from_secs(30);
        let answers = Answers::new(Some(1), wait);
        let held = answers.admit("a", 512 * 1024, None).await.expect("1 MiB");
        let started = tokio::time::Instant::now();
        let refused = answers.admit("b", 1, Some(1)).await.err().expect("no room");
        assert!(matches!(refused, SessionError::AnswersBusy), "{refused:?}");
        assert_eq!(started.elapsed(), wait, "waited exactly the allowed time");
        // The refused wait kept nothing: once a's page is sent, b's whole 1 MiB fits at once.
        drop(held);
        let started = tokio::time::Instant::now();
        answers
            .admit("b", 512 * 1024, Some(1))
            .await
            .expect("b's whole allowance");
        assert_eq!(started.elapsed(), std::time::Duration::ZERO);
    }

    #[test]
    fn limits_take_defaults_and_refuse_zero() {
        let mine = Limits {
            live_sessions: Some(3),
            ..Limits::default()
        };
        let defaults = Limits {
            live_sessions: Some(50),
            concurrent_turns: Some(20),
            ..Limits::default()
        };
        let l = mine.or(&defaults);
        assert_eq!((l.live_sessions, l.concurrent_turns), (Some(3), Some(20)));
        let zero = Limits {
            open_streams: Some(0),
            ..Limits::default()
        };
        assert!(zero.validate().is_err());
        assert!(serde_json::from_str::<Limits>(r#"{"sessions": 3}"#).is_err());
    }
}
