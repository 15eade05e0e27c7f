//! Leader election over a `coordination.k8s.io/v1` Lease, so several `serve` replicas can run and
//! only one reconciles. The algorithm is the one Kubernetes' own components use: read the Lease;
//! take it when it has no holder or its holder has not renewed it for a whole lease duration as
//! measured on this replica's clock (no clock comparison across machines); renew it while held;
//! every write is a replace carrying the `resourceVersion` that was read, so two candidates can
//! never both win. A leader that cannot renew within the renew deadline stops leading before its
//! lease can expire for others.
//!
//! (kube-lease-manager's release for kube 2 relies on server-side-apply conflicts for the same
//! guarantee; a compare-and-set replace needs nothing beyond what every API server does.)

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::chrono::Utc;
use kube::api::{Api, PostParams};
use std::future::Future;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How long a lease lasts, how often it is renewed or retried, and how long a leader keeps
/// leading without a successful renewal.
#[derive(Debug, Clone, Copy)]
pub struct Timings {
    pub lease: Duration,
    pub retry: Duration,
    pub renew_deadline: Duration,
}

impl Default for Timings {
    fn default() -> Self {
        Timings {
            lease: Duration::from_secs(15),
            retry: Duration::from_secs(2),
            renew_deadline: Duration::from_secs(10),
        }
    }
}

/// What a candidate should do with the Lease it read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// It is ours: write a new renew time.
    Renew,
    /// Free or expired: take it over.
    Acquire,
    /// Another live holder has it.
    Follow,
}

/// Decides from the Lease's holder and how long this replica has seen its record unchanged.
/// Pure.
pub fn decide(holder: Option<&str>, me: &str, unchanged_for: Duration, lease: Duration) -> Step {
    match holder.filter(|h| !h.is_empty()) {
        Some(h) if h == me => Step::Renew,
        None => Step::Acquire,
        Some(_) if unchanged_for >= lease => Step::Acquire,
        Some(_) => Step::Follow,
    }
}

/// A candidate for one Lease.
pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    timings: Timings,
    /// The last record seen (resourceVersion) and when this replica first saw it.
    seen: Option<(String, Instant)>,
}

impl Elector {
    pub fn new(api: Api<Lease>, name: &str, identity: &str, timings: Timings) -> Self {
        Elector {
            api,
            name: name.to_string(),
            identity: identity.to_string(),
            timings,
            seen: None,
        }
    }

    fn spec(&self, previous: Option<&LeaseSpec>, acquire: bool) -> LeaseSpec {
        let now = MicroTime(Utc::now());
        let transitions = previous.and_then(|s| s.lease_transitions).unwrap_or(0);
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(
                i32::try_from(self.timings.lease.as_secs().max(1)).unwrap_or(i32::MAX),
            ),
            acquire_time: if acquire {
                Some(now.clone())
            } else {
                previous.and_then(|s| s.acquire_time.clone())
            },
            renew_time: Some(now),
            lease_transitions: Some(if acquire && previous.is_some() {
                transitions + 1
            } else {
                transitions
            }),
            ..Default::default()
        }
    }

    /// One attempt to take or keep the lease. `Ok(true)` when this replica holds it now.
    pub async fn try_hold(&mut self) -> Result<bool, kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..Default::default()
                },
                spec: Some(self.spec(None, true)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let rv = lease.metadata.resource_version.clone().unwrap_or_default();
        let first_seen = match &self.seen {
            Some((seen_rv, at)) if *seen_rv == rv => *at,
            _ => {
                let now = Instant::now();
                self.seen = Some((rv, now));
                now
            }
        };
        let holder = lease.spec.as_ref().and_then(|s| s.holder_identity.clone());
        let step = decide(
            holder.as_deref(),
            &self.identity,
            first_seen.elapsed(),
            self.timings.lease,
        );
        if step == Step::Follow {
            return Ok(false);
        }
        lease.spec = Some(self.spec(lease.spec.as_ref(), step == Step::Acquire));
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(written) => {
                self.seen = written
                    .metadata
                    .resource_version
                    .map(|rv| (rv, Instant::now()));
                Ok(true)
            }
            // Someone else wrote it first: they hold it, or renewed it.
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Gives the lease up (at shutdown) so another replica can take over at once.
    pub async fn release(&mut self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.name).await else {
            return;
        };
        let ours = lease
            .spec
            .as_ref()
            .and_then(|s| s.holder_identity.as_deref())
            == Some(self.identity.as_str());
        if !ours {
            return;
        }
        if let Some(spec) = lease.spec.as_mut() {
            spec.holder_identity = None;
            spec.renew_time = None;
        }
        if let Err(e) = self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            tracing::warn!(error = %e, "releasing the leader lease failed; it expires on its own");
        }
    }

    /// Runs `lead` whenever this replica holds the lease, cancelling the token it was given
    /// once the lease is lost (renewals failing past the renew deadline, or another holder).
    /// Returns after `shutdown`, releasing the lease if held.
    pub async fn run<F, Fut>(mut self, shutdown: CancellationToken, lead: F)
    where
        F: Fn(CancellationToken) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let mut leading: Option<(CancellationToken, tokio::task::JoinHandle<()>)> = None;
        let mut renewed = Instant::now();
        loop {
            let held = match self.try_hold().await {
                Ok(held) => held,
                Err(e) => {
                    tracing::warn!(error = %e, lease = %self.name, "leader lease: the API failed");
                    // Keep leading until the renew deadline: a blip must not stop the controllers.
                    leading.is_some() && renewed.elapsed() < self.timings.renew_deadline
                }
            };
            if held {
                renewed = Instant::now();
            }
            match (&leading, held) {
                (None, true) => {
                    tracing::info!(identity = %self.identity, lease = %self.name, "leading");
                    let token = shutdown.child_token();
                    leading = Some((token.clone(), tokio::spawn(lead(token))));
                }
                (Some(_), false) => {
                    tracing::warn!(identity = %self.identity, lease = %self.name, "lost the leader lease; stopping the controllers");
                    if let Some((token, task)) = leading.take() {
                        token.cancel();
                        let _ = task.await;
                    }
                }
                _ => {}
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(self.timings.retry) => {}
            }
        }
        if let Some((token, task)) = leading.take() {
            token.cancel();
            let _ = task.await;
            self.release().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decide_takes_free_or_stale_leases_and_keeps_its_own() {
        let lease = Duration::from_secs(15);
        assert_eq!(decide(None, "a", Duration::ZERO, lease), Step::Acquire);
        assert_eq!(decide(Some(""), "a", Duration::ZERO, lease), Step::Acquire);
        assert_eq!(decide(Some("a"), "a", Duration::ZERO, lease), Step::Renew);
        assert_eq!(
            decide(Some("b"), "a", Duration::from_secs(14), lease),
            Step::Follow
        );
        assert_eq!(
            decide(Some("b"), "a", Duration::from_secs(15), lease),
            Step::Acquire,
            "a holder silent for a whole lease is presumed gone"
        );
    }
}
