//! The PostgreSQL backend: the pool (limits, timeouts), migrations under the migrator's advisory
//! lock, the turn path (a turn's start is one statement: the session's conditional update decides
//! and the inserts follow from its result; events and turn ends go through one writer task so
//! events commit in `seq` order), and LISTEN/NOTIFY between replicas.

use super::{
    Begin, Begun, Event, Message, Notice, Options, Result, Session, StoreError, Turn, Write,
};
use super::{WriteFailed, json, now};
use backon::{ExponentialBuilder, Retryable};
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use sqlx::{PgPool, Row};
use std::str::FromStr;
use std::time::Duration;
use tokio::sync::broadcast;

/// Carries `REPLICA FIRST LAST SESSION_ID` after events of a session were committed.
const EVENTS_CHANNEL: &str = "sandwarden_events";
/// Carries `REPLICA SESSION_ID` after a session changed.
const CHANGES_CHANNEL: &str = "sandwarden_changes";

/// `?` placeholders numbered `$1, $2, …` (the queries shared with SQLite have no `?` in literals).
pub(super) fn numbered(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 16);
    let mut n = 0;
    for c in sql.chars() {
        if c == '?' {
            n += 1;
            out.push('$');
            out.push_str(&n.to_string());
        } else {
            out.push(c);
        }
    }
    out
}

/// Connects the pool, applies migrations (two replicas starting together: the second waits on
/// the advisory lock, then finds nothing to do), starts the writer on `rx` and the listener.
pub(super) async fn open(
    url: &str,
    options: &Options,
    rx: flume::Receiver<Write>,
) -> Result<(PgPool, broadcast::Sender<Notice>)> {
    let shown = super::Location::Postgres(url.to_string()).display();
    let open_error = |source| StoreError::Open {
        path: shown.clone(),
        source,
    };
    let connect = PgConnectOptions::from_str(url)
        .map_err(open_error)?
        .application_name("sandwarden")
        .options([(
            "statement_timeout",
            options.statement_timeout.as_millis().to_string(),
        )]);
    let pool = PgPoolOptions::new()
        .max_connections(options.max_connections.max(2))
        .acquire_timeout(options.acquire_timeout)
        .idle_timeout(Duration::from_secs(300))
        .connect_with(connect)
        .await
        .map_err(open_error)?;
    sqlx::migrate!("src/store/migrations/postgres")
        .run(&pool)
        .await
        .map_err(StoreError::Migrate)?;
    let (notices, _) = broadcast::channel(4096);
    let mut listener = PgListener::connect_with(&pool).await.map_err(open_error)?;
    listener
        .listen_all([EVENTS_CHANNEL, CHANGES_CHANNEL])
        .await
        .map_err(open_error)?;
    tokio::spawn(listen(listener, notices.clone(), options.replica.clone()));
    tokio::spawn(write(pool.clone(), rx, options.replica.clone()));
    Ok((pool, notices))
}

/// Sends `NOTIFY sandwarden_changes` in the background.
pub(super) fn announce(pool: PgPool, replica: &str, session_id: &str) {
    let payload = format!("{replica} {session_id}");
    tokio::spawn(async move {
        if let Err(e) = sqlx::query("SELECT pg_notify($1, $2)")
            .bind(CHANGES_CHANNEL)
            .bind(payload)
            .execute(&pool)
            .await
        {
            tracing::debug!(error = %e, "announcing a session change failed");
        }
    });
}

/// A notice from another replica (our own are skipped: this replica already acted on them).
fn parse(channel: &str, payload: &str, me: &str) -> Option<Notice> {
    let (replica, rest) = payload.split_once(' ')?;
    if replica == me {
        return None;
    }
    match channel {
        EVENTS_CHANNEL => {
            let mut parts = rest.splitn(3, ' ');
            let first = parts.next()?.parse().ok()?;
            let last = parts.next()?.parse().ok()?;
            let session_id = parts.next()?.to_string();
            Some(Notice::Events {
                session_id,
                first,
                last,
            })
        }
        CHANGES_CHANNEL => Some(Notice::Changed(rest.to_string())),
        _ => None,
    }
}

/// Relays notifications as `Notice`s; after the listening connection was lost (notifications
/// may have been missed), reconnects and sends `Notice::Lost`.
async fn listen(mut listener: PgListener, notices: broadcast::Sender<Notice>, me: String) {
    loop {
        match listener.try_recv().await {
            Ok(Some(n)) => {
                if let Some(notice) = parse(n.channel(), n.payload(), &me) {
                    let _ = notices.send(notice);
                }
            }
            Ok(None) => {
                let _ = notices.send(Notice::Lost);
            }
            Err(e) => {
                tracing::warn!(error = %e, "listening for other replicas failed; reconnecting");
                // A query through the listener reconnects it (and re-subscribes); the interval
                // paces the attempts while the database is down.
                let mut tick = tokio::time::interval(Duration::from_millis(500));
                loop {
                    tick.tick().await;
                    if sqlx::query("SELECT 1").execute(&mut listener).await.is_ok() {
                        break;
                    }
                }
                let _ = notices.send(Notice::Lost);
            }
        }
    }
}

/// A turn's start in one statement: the session moves from `ready` to `running` (returned, with
/// its last event seq), and the turn, the user's message and the pending delivery are inserted
/// from that row, so nothing is inserted when the session was not `ready`; other replicas are
/// told of the change on commit.
pub(super) async fn begin(pool: &PgPool, b: &Begin) -> Result<Option<Begun>, sqlx::Error> {
    let t = &b.turn;
    let m = &b.user;
    let d = b.delivery.as_ref();
    let row = sqlx::query(
        "WITH s AS (UPDATE sessions SET status = 'running', phase = 'running', \
           updated_at = $1, last_active_at = $1 \
           WHERE id = $2 AND tenant = $3 AND status = 'ready' AND kind = 'api' RETURNING *), \
         t AS (INSERT INTO turns (id, session_id, status, mode, options, created_at, replica) \
           SELECT $4, s.id, $5, $6, $7, $1, $8 FROM s), \
         m AS (INSERT INTO messages (id, session_id, turn_id, role, text, parts, metadata, created_at) \
           SELECT $9, s.id, $4, $10, $11, $12, $13, $14 FROM s), \
         d AS (INSERT INTO webhook_deliveries (id, turn_id, session_id, url, status, attempts, \
           created_at, updated_at, include_messages, sealed_token, shape) \
           SELECT $15, $4, s.id, $16, $17, $18, $19, $19, $20, $21, $23 FROM s \
           WHERE $15::text IS NOT NULL) \
         SELECT s.*, (SELECT COALESCE(MAX(seq), 0) FROM events WHERE session_id = $2) AS last_seq, \
           pg_notify($22, $8 || ' ' || s.id) AS announced \
         FROM s",
    )
    .bind(&t.created_at)
    .bind(&t.session_id)
    .bind(&b.tenant)
    .bind(&t.id)
    .bind(t.status.as_str())
    .bind(&t.mode)
    .bind(t.options.to_string())
    .bind(&b.replica)
    .bind(&m.id)
    .bind(&m.role)
    .bind(&m.text)
    .bind(m.parts.to_string())
    .bind(m.metadata.to_string())
    .bind(&m.created_at)
    .bind(d.map(|d| d.id.clone()))
    .bind(d.map(|d| d.url.clone()))
    .bind(d.map(|d| d.status.clone()))
    .bind(d.map(|d| d.attempts))
    .bind(d.map(|d| d.created_at.clone()))
    .bind(d.map(|d| d.include_messages))
    .bind(d.and_then(|d| d.sealed_token.clone()))
    .bind(CHANGES_CHANNEL)
    .bind(d.and_then(|d| d.shape.clone()))
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|r| Begun {
        last_seq: Some(r.get("last_seq")),
        session: session_row!(&r),
    }))
}

/// Inserts events (a retry after an unknown outcome inserts nothing twice) and, in the same
/// statement, notifies other replicas per session after the commit.
async fn insert_events(pool: &PgPool, events: &[&Event], me: &str) -> Result<(), sqlx::Error> {
    finish(pool, events, None, me).await
}

/// Events and, if given, a turn's end, in one statement: the events (notifying other replicas
/// per session on commit), the turn's outcome, the assistant's message, and a running session
/// back to `ready` (a dead or deleted one stays so; one another turn already holds is left
/// alone, should this be a retry after the first attempt committed), also announced.
async fn finish(
    pool: &PgPool,
    events: &[&Event],
    end: Option<(&Turn, Option<&Message>)>,
    me: &str,
) -> Result<(), sqlx::Error> {
    const EVENTS: &str = "ins AS (INSERT INTO events (session_id, seq, turn_id, type, ts, data) \
           SELECT * FROM UNNEST($1::text[], $2::int8[], $3::text[], $4::text[], $5::text[], $6::text[]) \
           ON CONFLICT DO NOTHING RETURNING session_id, seq)";
    const NOTIFY: &str = "SELECT pg_notify($7, $8 || ' ' || MIN(seq) || ' ' || MAX(seq) || ' ' || session_id) \
         FROM ins GROUP BY session_id";
    let sql = match end {
        None => format!("WITH {EVENTS} {NOTIFY}"),
        Some(_) => format!(
            "WITH {EVENTS}, \
             u AS (INSERT INTO usage_daily (tenant, session_id, day, input_tokens, output_tokens, turns, turn_ms) \
               SELECT s.tenant, s.id, $27, $28, $29, 1, $30 FROM sessions s JOIN turns tt ON tt.session_id = s.id \
               WHERE tt.id = $14 AND tt.status = 'running' \
               ON CONFLICT (tenant, session_id, day) DO UPDATE SET \
                 input_tokens = usage_daily.input_tokens + excluded.input_tokens, \
                 output_tokens = usage_daily.output_tokens + excluded.output_tokens, \
                 turns = usage_daily.turns + 1, turn_ms = usage_daily.turn_ms + excluded.turn_ms), \
             t AS (UPDATE turns SET status = $9, text = $10, usage = $11, error = $12, \
               finished_at = $13, stop_reason = $26 WHERE id = $14), \
             m AS (INSERT INTO messages (id, session_id, turn_id, role, text, parts, metadata, created_at) \
               SELECT $15, $16, $17, $18, $19, $20, $21, $22 WHERE $15::text IS NOT NULL \
               ON CONFLICT (id) DO NOTHING), \
             s AS (UPDATE sessions SET last_active_at = $23, updated_at = $23, \
               status = CASE WHEN status IN ('running', 'input_required') THEN 'ready' ELSE status END, \
               phase = CASE WHEN status IN ('running', 'input_required') THEN 'ready' ELSE phase END \
               WHERE id = $24 AND NOT EXISTS (SELECT 1 FROM turns \
                 WHERE session_id = $24 AND status = 'running' AND id <> $14)) \
             {NOTIFY} UNION ALL SELECT pg_notify($25, $8 || ' ' || $24)"
        ),
    };
    let mut q = sqlx::query(&sql)
        .bind(
            events
                .iter()
                .map(|e| e.session_id.clone())
                .collect::<Vec<_>>(),
        )
        .bind(events.iter().map(|e| e.seq).collect::<Vec<_>>())
        .bind(events.iter().map(|e| e.turn_id.clone()).collect::<Vec<_>>())
        .bind(events.iter().map(|e| e.kind.clone()).collect::<Vec<_>>())
        .bind(events.iter().map(|e| e.ts.clone()).collect::<Vec<_>>())
        .bind(
            events
                .iter()
                .map(|e| e.data.to_string())
                .collect::<Vec<_>>(),
        )
        .bind(EVENTS_CHANNEL)
        .bind(me);
    if let Some((turn, reply)) = end {
        q = q
            .bind(turn.status.as_str())
            .bind(&turn.text)
            .bind(turn.usage.as_ref().map(|u| u.to_string()))
            .bind(turn.error.as_ref().map(|e| e.to_string()))
            .bind(&turn.finished_at)
            .bind(&turn.id)
            .bind(reply.map(|m| m.id.clone()))
            .bind(reply.map(|m| m.session_id.clone()))
            .bind(reply.map(|m| m.turn_id.clone()))
            .bind(reply.map(|m| m.role.clone()))
            .bind(reply.map(|m| m.text.clone()))
            .bind(reply.map(|m| m.parts.to_string()))
            .bind(reply.map(|m| m.metadata.to_string()))
            .bind(reply.map(|m| m.created_at.clone()))
            .bind(now())
            .bind(&turn.session_id)
            .bind(CHANGES_CHANNEL)
            .bind(&turn.stop_reason);
        let used = super::TurnUsage::of(turn);
        q = q
            .bind(used.day)
            .bind(used.input_tokens)
            .bind(used.output_tokens)
            .bind(used.turn_ms);
    }
    q.execute(pool).await?;
    Ok(())
}

/// Retries `op` while the database is unreachable: a turn's events and end wait for it to come
/// back rather than be lost (every write here is safe to repeat).
async fn persist<F, Fut>(op: F) -> Result<(), sqlx::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), sqlx::Error>>,
{
    op.retry(
        ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(2))
            .without_max_times(),
    )
    .when(|e| super::unavailable(e).is_some())
    .notify(|e, after| {
        tracing::warn!(error = %e, retry_in = ?after, "the database is unreachable; holding turn writes");
    })
    .await
}

/// The one writer of events and turn ends: takes whatever is queued and writes it in queue
/// order, the events with the first turn end (one statement, so a lone turn's end and its last
/// events cost one round trip), then any further ends; answers after the commits.
async fn write(pool: PgPool, rx: flume::Receiver<Write>, me: String) {
    while let Ok(first) = rx.recv_async().await {
        let mut batch = vec![first];
        while batch.len() < 256 {
            match rx.try_recv() {
                Ok(w) => batch.push(w),
                Err(_) => break,
            }
        }
        let events: Vec<&Event> = batch
            .iter()
            .filter_map(|w| match w {
                Write::Events(e) => Some(e.iter()),
                _ => None,
            })
            .flatten()
            .collect();
        let mut pending: &[&Event] = &events;
        let mut ended: Vec<Result<(), WriteFailed>> = Vec::new();
        let mut stored: Result<(), WriteFailed> = Ok(());
        for w in &batch {
            if let Write::Finish(end, _) = w {
                let result = match &stored {
                    Err(e) => Err(e.clone()),
                    Ok(()) => {
                        let with_last: Vec<&Event> =
                            pending.iter().copied().chain(end.2.as_ref()).collect();
                        persist(|| finish(&pool, &with_last, Some((&end.0, end.1.as_ref())), &me))
                            .await
                            .map_err(|e| {
                                tracing::error!(error = %e, turn_id = %end.0.id, "ending a turn failed");
                                WriteFailed::from(&e)
                            })
                    }
                };
                if !pending.is_empty() {
                    stored = result.clone();
                    pending = &[];
                }
                ended.push(result);
            }
        }
        if !pending.is_empty() {
            stored = persist(|| insert_events(&pool, pending, &me))
                .await
                .map_err(|e| {
                    tracing::error!(error = %e, n = pending.len(), "storing events failed");
                    WriteFailed::from(&e)
                });
        }
        let mut ended = ended.into_iter();
        for w in batch {
            match w {
                Write::Events(_) => {}
                Write::Flush(tx) => {
                    let _ = tx.send(stored.clone());
                }
                Write::Finish(_, tx) => {
                    let _ = tx.send(ended.next().unwrap_or_else(|| stored.clone()));
                }
                Write::Begin(b, tx) => {
                    let begun = begin(&pool, &b).await;
                    let _ = tx.send(
                        begun
                            .map(|b| b.map(|b| b.session))
                            .map_err(|e| WriteFailed::from(&e)),
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_numbered_in_order() {
        assert_eq!(
            numbered("SELECT * FROM t WHERE a = ? AND (? IS NULL OR b = ?)"),
            "SELECT * FROM t WHERE a = $1 AND ($2 IS NULL OR b = $3)"
        );
    }

    #[test]
    fn notices_from_this_replica_are_skipped() {
        assert_eq!(parse(EVENTS_CHANNEL, "r1 3 5 s 1", "r1"), None);
        assert_eq!(
            parse(EVENTS_CHANNEL, "r2 3 5 ses sion", "r1"),
            Some(Notice::Events {
                session_id: "ses sion".into(),
                first: 3,
                last: 5
            })
        );
        assert_eq!(
            parse(CHANGES_CHANNEL, "r2 s9", "r1"),
            Some(Notice::Changed("s9".into()))
        );
        assert_eq!(parse(EVENTS_CHANNEL, "garbage", "r1"), None);
    }
}
