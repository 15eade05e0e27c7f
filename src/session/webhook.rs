//! Webhooks: a turn's outcome POSTed to the client's URL, signed, retried with backoff, and every
//! attempt recorded. Private, loopback and link-local targets are refused unless allowed.

use super::Orchestrator;
use super::message::WebhookSpec;
use super::turn::Outcome;
use crate::egress::is_private;
use crate::store::{self, Delivery};
use backon::{ExponentialBuilder, Retryable};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

const ATTEMPTS: usize = 6;

/// Resolves webhook hosts at connect time and refuses names with a private address among
/// theirs: `check_target` looked the name up before, but it could be re-pointed at a private
/// address by the time the connection is made (DNS rebinding). IP literals never come here.
struct PublicOnly;

impl reqwest::dns::Resolve for PublicOnly {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_string();
        Box::pin(async move {
            let addrs: Vec<std::net::SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if addrs.iter().any(|a| is_private(a.ip())) {
                return Err(format!(
                    "{host:?} resolved to a private, loopback or link-local address when connecting; \
                     webhooks may not reach those (an operator can allow them with --allow-private-webhooks)"
                )
                .into());
            }
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// The HTTP client webhooks are POSTed with: bounded time, no redirects (a public target could
/// otherwise send the request on to a private one), and, unless private targets are allowed,
/// names resolved by `PublicOnly`.
fn webhook_client(allow_private: bool) -> reqwest::Client {
    let builder = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .redirect(reqwest::redirect::Policy::none());
    let builder = if allow_private {
        builder
    } else {
        builder.dns_resolver(Arc::new(PublicOnly))
    };
    builder.build().unwrap_or_default()
}

/// Checks a webhook URL: http(s), a host, and (unless allowed) no private address.
pub async fn check_target(raw: &str, allow_private: bool) -> Result<(), String> {
    let url = url::Url::parse(raw).map_err(|e| format!("webhook.url {raw:?} is not a URL: {e}"))?;
    if url.scheme() != "http" && url.scheme() != "https" {
        return Err("webhook.url must be http:// or https://".into());
    }
    let Some(host) = url.host_str() else {
        return Err("webhook.url has no host".into());
    };
    if allow_private {
        return Ok(());
    }
    let port = url.port_or_known_default().unwrap_or(443);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let addrs: Vec<IpAddr> = match host.parse::<IpAddr>() {
        Ok(ip) => vec![ip],
        Err(_) => tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| format!("webhook.url host {host:?} does not resolve: {e}"))?
            .map(|a| a.ip())
            .collect(),
    };
    if addrs.iter().any(|ip| is_private(*ip)) {
        return Err(format!(
            "webhook.url {host:?} points at a private, loopback or link-local address, which is refused; \
             use a public address (an operator can allow private targets with --allow-private-webhooks)"
        ));
    }
    Ok(())
}

/// `t=<unix seconds>,v1=<hex HMAC-SHA256 of "t.body" keyed by the webhook token>`.
pub fn signature(token: &str, timestamp: u64, body: &[u8]) -> String {
    let mut mac = match Hmac::<Sha256>::new_from_slice(token.as_bytes()) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!(
        "t={timestamp},v1={}",
        hex::encode(mac.finalize().into_bytes())
    )
}

/// Aborts a background task when dropped (the claim renewal ends with its delivery).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

enum Attempt {
    Retry(String),
    GiveUp(String),
}

/// The delivery of a turn's webhook, recorded as pending with the turn itself (before the harness
/// is dialled) so a restart finds it. The token is stored only sealed under the server secret.
pub fn pending(
    orch: &Orchestrator,
    hook: &WebhookSpec,
    session_id: &str,
    turn_id: &str,
) -> Delivery {
    let now = store::now();
    Delivery {
        id: format!("whd_{}", uuid::Uuid::now_v7().simple()),
        turn_id: turn_id.to_string(),
        session_id: session_id.to_string(),
        url: hook.url.clone(),
        status: "pending".into(),
        attempts: 0,
        last_status: None,
        last_error: None,
        created_at: now.clone(),
        updated_at: now,
        include_messages: hook.include_messages,
        sealed_token: hook.token.as_deref().map(|t| orch.tokens.seal(t)),
        body: None,
        shape: hook.shape.clone(),
    }
}

/// The payload POSTed for a turn's outcome: the native one, or in the shape its delivery names
/// (`{"dialect": "motus", "session_id": …}`: Motus' `WebhookPayload`).
fn payload(outcome: &Outcome, include_messages: bool, shape: Option<&str>) -> String {
    let shape: serde_json::Value = shape
        .and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or_default();
    if shape["dialect"] == "motus" {
        let failed = outcome.status == crate::status::TurnStatus::Failed;
        let mut payload = serde_json::json!({
            "session_id": shape["session_id"],
            "status": if failed { "error" } else { "idle" },
            "response": (!failed).then(|| serde_json::json!({
                "role": "assistant", "content": outcome.text,
            })),
            "error": outcome.error.as_ref().map(|e| e["message"].clone()),
        });
        if include_messages {
            payload["messages"] = outcome
                .messages
                .iter()
                .map(|m| serde_json::json!({ "role": m.role, "content": m.text }))
                .collect();
        }
        return payload.to_string();
    }
    let mut payload = serde_json::json!({
        "type": format!("turn.{}", outcome.status),
        "session_id": outcome.session_id, "turn_id": outcome.turn_id, "status": outcome.status,
        "stop_reason": outcome.stop_reason, "text": outcome.text, "parts": outcome.parts,
        "usage": outcome.usage, "error": outcome.error,
    });
    if include_messages {
        payload["messages"] = serde_json::to_value(&outcome.messages).unwrap_or_default();
    }
    payload.to_string()
}

/// Resumes pending deliveries of ended turns that no replica holds, with the attempts they have
/// left: at start (`mine`: also those this replica held before it stopped; runs after its
/// interrupted turns were ended) and then periodically, taking over from a replica that died
/// (its claim ran out). Each delivery is claimed by one replica at a time.
pub async fn resume(orch: &Arc<Orchestrator>, mine: bool) {
    let pending = match orch
        .store
        .claim_deliveries(orch.config.webhook_lease, mine)
        .await
    {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(error = %e, "reading pending webhook deliveries failed");
            return;
        }
    };
    for mut record in pending {
        let token = match record.sealed_token.as_deref() {
            None => None,
            Some(sealed) => match orch.tokens.open(sealed) {
                Some(t) => Some(t),
                None => {
                    record.status = "failed".into();
                    record.sealed_token = None;
                    record.last_error = Some(
                        "the webhook token could not be recovered after a restart (the server secret changed)"
                            .into(),
                    );
                    record.updated_at = store::now();
                    let _ = orch.store.upsert_delivery(&record).await;
                    continue;
                }
            },
        };
        let outcome = if record.body.is_some() {
            None
        } else {
            match orch
                .stored_outcome(&record.session_id, &record.turn_id)
                .await
            {
                Some(o) => Some(Arc::new(o)),
                None => continue, // the turn is gone with its session
            }
        };
        tracing::info!(delivery = %record.id, attempts = record.attempts, "resuming a webhook delivery");
        let me = orch.clone();
        tokio::spawn(async move { deliver(&me, record, token, outcome).await });
    }
}

/// Delivers the outcome (or the body fixed at an earlier attempt); retries network errors, 408,
/// 429 and 5xx with exponential backoff, up to `ATTEMPTS` attempts in all across restarts.
pub async fn deliver(
    orch: &Arc<Orchestrator>,
    mut record: Delivery,
    token: Option<String>,
    outcome: Option<Arc<Outcome>>,
) {
    let body = match (&record.body, &outcome) {
        (Some(body), _) => body.clone(),
        (None, Some(o)) => payload(o, record.include_messages, record.shape.as_deref()),
        (None, None) => return,
    };
    record.body = Some(body.clone());
    // Once per replica: the turn's end and the periodic resume may both reach a fresh delivery.
    let Some(_in_flight) = orch.delivering(&record.id) else {
        return;
    };
    // One replica at a time: whoever holds the claim delivers, renewing it until done.
    let lease = orch.config.webhook_lease;
    match orch.store.claim_delivery(&record.id, lease).await {
        Ok(true) => {}
        Ok(false) => {
            tracing::debug!(delivery = %record.id, "another replica delivers this webhook");
            return;
        }
        Err(e) => {
            // Left unclaimed: a replica's periodic resume picks it up when the store is back.
            tracing::warn!(error = %e, delivery = %record.id, "claiming a webhook delivery failed");
            return;
        }
    }
    let renew = {
        let store = orch.store.clone();
        let id = record.id.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(lease / 3);
            tick.tick().await;
            loop {
                tick.tick().await;
                if let Err(e) = store.claim_delivery(&id, lease).await {
                    tracing::warn!(error = %e, delivery = %id, "renewing a webhook claim failed");
                }
            }
        })
    };
    let _stop_renewing = AbortOnDrop(renew);
    let event = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["type"].as_str().map(String::from))
        .unwrap_or_default();
    let turn_id = record.turn_id.clone();
    let left = ATTEMPTS
        .saturating_sub(usize::try_from(record.attempts).unwrap_or(ATTEMPTS))
        .max(1);
    let hook_url = record.url.clone();
    let http = webhook_client(orch.config.allow_private_webhooks);
    let record = tokio::sync::Mutex::new(&mut record);
    let attempt = || async {
        // Checked again at each attempt: a name may resolve elsewhere by now.
        if let Err(m) = check_target(&hook_url, orch.config.allow_private_webhooks).await {
            return Err(Attempt::GiveUp(m));
        }
        let ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut req = http
            .post(&hook_url)
            .header("content-type", "application/json")
            .header("x-sandwarden-event", &event)
            .body(body.clone());
        let mut rec = record.lock().await;
        req = req.header("x-sandwarden-delivery", rec.id.clone());
        if let Some(token) = &token {
            req = req.bearer_auth(token).header(
                "x-sandwarden-signature",
                signature(token, ts, body.as_bytes()),
            );
        }
        rec.attempts += 1;
        let result = req.send().await;
        rec.updated_at = store::now();
        let verdict = match result {
            Ok(resp) if resp.status().is_success() => {
                rec.status = "delivered".into();
                rec.sealed_token = None;
                rec.last_status = Some(i64::from(resp.status().as_u16()));
                rec.last_error = None;
                Ok(())
            }
            Ok(resp) => {
                let code = resp.status();
                rec.last_status = Some(i64::from(code.as_u16()));
                let said = if code.is_redirection() {
                    format!("answered {code}; webhooks do not follow redirects: give the final URL")
                } else {
                    format!("answered {code}")
                };
                rec.last_error = Some(said.clone());
                if code.is_server_error() || code.as_u16() == 429 || code.as_u16() == 408 {
                    Err(Attempt::Retry(said))
                } else {
                    Err(Attempt::GiveUp(said))
                }
            }
            Err(e) => {
                rec.last_status = None;
                rec.last_error = Some(e.to_string());
                Err(Attempt::Retry(e.to_string()))
            }
        };
        let outcome_label = if verdict.is_ok() {
            "delivered"
        } else {
            "failed"
        };
        orch.metrics
            .webhook_attempts
            .get_or_create(&crate::metrics::OutcomeLabel {
                outcome: outcome_label.into(),
            })
            .inc();
        let _ = orch.store.upsert_delivery(&rec).await;
        verdict
    };
    let result = attempt
        .retry(
            ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(200))
                .with_max_delay(Duration::from_secs(30))
                .with_max_times(left - 1)
                .with_jitter(),
        )
        .when(|e| matches!(e, Attempt::Retry(_)))
        .await;
    let mut rec = record.lock().await;
    if let Err(Attempt::Retry(m) | Attempt::GiveUp(m)) = result {
        rec.status = "failed".into();
        rec.sealed_token = None;
        rec.last_error = Some(m);
        rec.updated_at = store::now();
        let _ = orch.store.upsert_delivery(&rec).await;
        tracing::warn!(turn_id = %turn_id, attempts = rec.attempts, "webhook delivery failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_ranges_are_recognized() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:10.0.0.1",
            "::127.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "2002:a9fe:a9fe::1",
            "2002:7f00:1::",
            "fec0::1",
            "198.18.0.1",
            "240.0.0.1",
            "255.255.255.255",
        ] {
            assert!(is_private(ip.parse().expect("ip")), "{ip}");
        }
        for ip in [
            "8.8.8.8",
            "1.1.1.1",
            "2606:4700::1111",
            "64:ff9b::808:808",
            "2002:808:808::1",
        ] {
            assert!(!is_private(ip.parse().expect("ip")), "{ip}");
        }
    }

    #[tokio::test]
    async fn targets_are_checked() {
        assert!(check_target("ftp://x/y", true).await.is_err());
        assert!(check_target("not a url", true).await.is_err());
        assert!(check_target("http://127.0.0.1:9/x", false).await.is_err());
        assert!(check_target("http://[::1]:9/x", false).await.is_err());
        assert!(check_target("http://127.0.0.1:9/x", true).await.is_ok());
        // Other spellings of loopback and the metadata address, and names that resolve there.
        for url in [
            "http://2130706433/",
            "http://0x7f.1/",
            "http://0177.0.0.1/",
            "http://[::ffff:127.0.0.1]/",
            "http://[::ffff:a9fe:a9fe]/",
            "http://[64:ff9b::a9fe:a9fe]/",
            "http://localhost:9/x",
            "http://localhost./x",
        ] {
            let refused = check_target(url, false).await;
            assert!(refused.is_err(), "{url} was allowed");
        }
    }

    #[tokio::test]
    async fn names_resolving_to_private_addresses_are_refused_at_connect_time() {
        use reqwest::dns::Resolve;
        let name: reqwest::dns::Name = "localhost".parse().expect("a name");
        let refused = PublicOnly.resolve(name).await.err().map(|e| e.to_string());
        assert!(
            refused
                .as_deref()
                .is_some_and(|m| m.contains("--allow-private-webhooks")),
            "{refused:?}"
        );
    }

    #[tokio::test]
    async fn the_strict_client_does_not_connect_to_a_private_name() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let refused = webhook_client(false)
            .post(format!("http://localhost:{port}/hook"))
            .send()
            .await
            .expect_err("a private name is refused");
        let said: Vec<String> =
            std::iter::successors(Some(&refused as &dyn std::error::Error), |e| e.source())
                .map(ToString::to_string)
                .collect();
        assert!(
            said.iter().any(|m| m.contains("--allow-private-webhooks")),
            "refused by the resolver: {said:?}"
        );
        // A connection would be waiting in the backlog by now; there is none.
        let accepted = tokio::time::timeout(Duration::from_millis(200), listener.accept()).await;
        assert!(accepted.is_err(), "the client connected anyway");
    }

    #[test]
    fn signature_is_keyed_and_timestamped() {
        let a = signature("k", 1, b"body");
        assert!(a.starts_with("t=1,v1="));
        assert_ne!(a, signature("k2", 1, b"body"));
        assert_ne!(a, signature("k", 2, b"body"));
    }
}
