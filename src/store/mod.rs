//! The store: sessions, turns, messages, events, webhook deliveries, sandboxes and API keys in an
//! SQLite file, with versioned migrations.
//!
//! It stores what it is given and answers queries; it holds no session logic and must never be
//! handed per-session env or secrets.

use serde::{Deserialize, Serialize};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{QueryBuilder, Row, SqliteConnection, SqlitePool};
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("opening the store at {path}")]
    Open {
        path: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("migrating the store")]
    Migrate(#[source] sqlx::migrate::MigrateError),
    #[error("store query failed")]
    Query(#[from] sqlx::Error),
    #[error("stored JSON is corrupt")]
    Json(#[from] serde_json::Error),
    #[error("the store writer has stopped")]
    WriterGone,
    #[error("a row with this key already exists")]
    Conflict,
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// A session as stored and as the API shows it (the API adds `tty_url`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Session {
    pub id: String,
    #[serde(skip)]
    pub tenant: String,
    pub harness: String,
    pub kind: String,
    pub status: String,
    pub phase: Option<String>,
    pub failure_reason: Option<String>,
    pub title: Option<String>,
    pub metadata: serde_json::Value,
    #[serde(skip)]
    pub sandbox_id: Option<String>,
    #[serde(skip)]
    pub endpoint: Option<String>,
    pub idle_timeout_s: i64,
    #[serde(skip)]
    pub idempotency_key: Option<String>,
    #[serde(skip)]
    pub request_hash: Option<String>,
    pub created_at: String,
    pub updated_at: String,
    pub last_active_at: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Turn {
    pub id: String,
    pub session_id: String,
    pub status: String,
    pub mode: String,
    pub options: serde_json::Value,
    pub text: Option<String>,
    pub usage: Option<serde_json::Value>,
    pub error: Option<serde_json::Value>,
    pub created_at: String,
    pub finished_at: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub id: String,
    #[serde(skip)]
    pub session_id: String,
    pub turn_id: String,
    pub role: String,
    pub text: String,
    pub parts: serde_json::Value,
    pub metadata: serde_json::Value,
    pub created_at: String,
}

/// The session event envelope: `seq` is per session and gap-free.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub id: String,
    pub seq: i64,
    pub session_id: String,
    pub turn_id: Option<String>,
    #[serde(rename = "type")]
    pub kind: String,
    pub ts: String,
    pub data: serde_json::Value,
}

/// A webhook delivery: what clients see, plus what a restart needs to resume it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow)]
pub struct Delivery {
    pub id: String,
    pub turn_id: String,
    pub session_id: String,
    pub url: String,
    pub status: String,
    pub attempts: i64,
    pub last_status: Option<i64>,
    pub last_error: Option<String>,
    pub created_at: String,
    pub updated_at: String,
    #[serde(skip)]
    pub include_messages: bool,
    /// The client's token, sealed under the server secret; `None` once the delivery ended.
    #[serde(skip)]
    pub sealed_token: Option<String>,
    /// The payload, fixed at the first attempt so every retry sends the same bytes.
    #[serde(skip)]
    pub body: Option<String>,
}

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct SandboxRow {
    pub id: String,
    pub template: String,
    pub endpoint: String,
    pub pid: Option<i64>,
    pub session_id: Option<String>,
}

/// Filters for listing sessions.
#[derive(Debug, Clone, Default)]
pub struct SessionFilter {
    pub status: Option<String>,
    pub harness: Option<String>,
    /// Sessions created after this (created_at, id) pair, for cursor pagination.
    pub after: Option<(String, String)>,
    pub limit: i64,
}

/// A new turn as the writer records it.
struct Begin {
    tenant: String,
    turn: Turn,
    user: Message,
    delivery: Option<Delivery>,
}

type Done = oneshot::Sender<Result<(), String>>;

const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);
/// How long events alone wait for company before they are committed.
const EVENTS_LINGER: Duration = Duration::from_millis(2);

/// What the writer is asked to do, in queue order.
enum Write {
    Events(Vec<Event>),
    Flush(Done),
    /// A turn's end, committed with the events queued before it (one commit, in order).
    Finish(Box<(Turn, Option<Message>)>, Done),
    /// A turn's start: answered with the session it moved to `running`, if it was `ready`.
    Begin(Box<Begin>, oneshot::Sender<Result<Option<Session>, String>>),
}

/// Handle to the store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    pool: SqlitePool,
    writer: mpsc::Sender<Write>,
}

pub fn now() -> String {
    humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string()
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or(serde_json::Value::Null)
}

fn opt_json(text: Option<String>) -> Option<serde_json::Value> {
    text.map(|t| json(&t))
}

impl Store {
    /// Opens (creating if needed) `DIR/sandwarden.db` and applies pending migrations.
    pub async fn open(data_dir: &Path) -> Result<Store> {
        std::fs::create_dir_all(data_dir).map_err(|e| StoreError::Open {
            path: data_dir.display().to_string(),
            source: sqlx::Error::Io(e),
        })?;
        let path = data_dir.join("sandwarden.db");
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))
            .map_err(|source| StoreError::Open {
                path: path.display().to_string(),
                source,
            })?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(5))
            // Checkpoints run in the background (below), not inside whichever commit crosses
            // the WAL threshold: that commit would otherwise pay for syncing the database file.
            .pragma("wal_autocheckpoint", "0");
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .map_err(|source| StoreError::Open {
                path: path.display().to_string(),
                source,
            })?;
        sqlx::migrate!("src/store/migrations")
            .run(&pool)
            .await
            .map_err(StoreError::Migrate)?;
        let (tx, rx) = mpsc::channel(1024);
        // The writer owns one connection, so writes never wait on each other for SQLite's lock.
        let conn = pool
            .acquire()
            .await
            .map_err(|source| StoreError::Open {
                path: path.display().to_string(),
                source,
            })?
            .detach();
        tokio::spawn(write(conn, rx));
        tokio::spawn(checkpoint(pool.clone()));
        Ok(Store { pool, writer: tx })
    }

    // ---- API keys

    pub async fn insert_key(&self, tenant: &str, key_hash: &str, admin: bool) -> Result<String> {
        let id = format!("key_{}", uuid::Uuid::now_v7().simple());
        sqlx::query(
            "INSERT INTO api_keys (id, tenant, key_hash, admin, created_at) VALUES (?, ?, ?, ?, ?) \
             ON CONFLICT (key_hash) DO NOTHING",
        )
        .bind(&id)
        .bind(tenant)
        .bind(key_hash)
        .bind(admin)
        .bind(now())
        .execute(&self.pool)
        .await?;
        Ok(id)
    }

    /// The tenant and admin flag of a key, by its hash.
    pub async fn find_key(&self, key_hash: &str) -> Result<Option<(String, bool)>> {
        let row = sqlx::query("SELECT tenant, admin FROM api_keys WHERE key_hash = ?")
            .bind(key_hash)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| (r.get("tenant"), r.get::<bool, _>("admin"))))
    }

    pub async fn has_admin_key(&self) -> Result<bool> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM api_keys WHERE admin = 1")
            .fetch_one(&self.pool)
            .await?;
        Ok(n > 0)
    }

    // ---- sessions

    pub async fn insert_session(&self, s: &Session) -> Result<()> {
        let result = sqlx::query(
            "INSERT INTO sessions (id, tenant, harness, kind, status, phase, failure_reason, title, \
             metadata, sandbox_id, endpoint, idle_timeout_s, idempotency_key, request_hash, \
             created_at, updated_at, last_active_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&s.id)
        .bind(&s.tenant)
        .bind(&s.harness)
        .bind(&s.kind)
        .bind(&s.status)
        .bind(&s.phase)
        .bind(&s.failure_reason)
        .bind(&s.title)
        .bind(s.metadata.to_string())
        .bind(&s.sandbox_id)
        .bind(&s.endpoint)
        .bind(s.idle_timeout_s)
        .bind(&s.idempotency_key)
        .bind(&s.request_hash)
        .bind(&s.created_at)
        .bind(&s.updated_at)
        .bind(&s.last_active_at)
        .execute(&self.pool)
        .await;
        match result {
            Ok(_) => Ok(()),
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Err(StoreError::Conflict),
            Err(e) => Err(e.into()),
        }
    }

    fn session_from(row: &sqlx::sqlite::SqliteRow) -> Session {
        Session {
            id: row.get("id"),
            tenant: row.get("tenant"),
            harness: row.get("harness"),
            kind: row.get("kind"),
            status: row.get("status"),
            phase: row.get("phase"),
            failure_reason: row.get("failure_reason"),
            title: row.get("title"),
            metadata: json(&row.get::<String, _>("metadata")),
            sandbox_id: row.get("sandbox_id"),
            endpoint: row.get("endpoint"),
            idle_timeout_s: row.get("idle_timeout_s"),
            idempotency_key: row.get("idempotency_key"),
            request_hash: row.get("request_hash"),
            created_at: row.get("created_at"),
            updated_at: row.get("updated_at"),
            last_active_at: row.get("last_active_at"),
        }
    }

    /// A session of `tenant` (another tenant's session is simply not found).
    pub async fn get_session(&self, tenant: &str, id: &str) -> Result<Option<Session>> {
        let row = sqlx::query("SELECT * FROM sessions WHERE id = ? AND tenant = ?")
            .bind(id)
            .bind(tenant)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(Self::session_from))
    }

    pub async fn get_session_any(&self, id: &str) -> Result<Option<Session>> {
        let row = sqlx::query("SELECT * FROM sessions WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(Self::session_from))
    }

    pub async fn session_by_sandbox(&self, sandbox_id: &str) -> Result<Option<Session>> {
        let row = sqlx::query("SELECT * FROM sessions WHERE sandbox_id = ?")
            .bind(sandbox_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(Self::session_from))
    }

    pub async fn find_idempotent(&self, tenant: &str, key: &str) -> Result<Option<Session>> {
        let row = sqlx::query("SELECT * FROM sessions WHERE tenant = ? AND idempotency_key = ?")
            .bind(tenant)
            .bind(key)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(Self::session_from))
    }

    pub async fn list_sessions(&self, tenant: &str, f: &SessionFilter) -> Result<Vec<Session>> {
        let (after_ts, after_id) = f.after.clone().unwrap_or_default();
        let rows = sqlx::query(
            "SELECT * FROM sessions WHERE tenant = ? \
             AND (? IS NULL OR status = ?) AND (? IS NULL OR harness = ?) \
             AND (created_at > ? OR (created_at = ? AND id > ?)) \
             ORDER BY created_at, id LIMIT ?",
        )
        .bind(tenant)
        .bind(&f.status)
        .bind(&f.status)
        .bind(&f.harness)
        .bind(&f.harness)
        .bind(&after_ts)
        .bind(&after_ts)
        .bind(&after_id)
        .bind(f.limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(Self::session_from).collect())
    }

    /// Sessions in any of `statuses`, across tenants (for supervision and reaping).
    pub async fn sessions_with_status(&self, statuses: &[&str]) -> Result<Vec<Session>> {
        let mut out = Vec::new();
        for status in statuses {
            let rows = sqlx::query("SELECT * FROM sessions WHERE status = ?")
                .bind(status)
                .fetch_all(&self.pool)
                .await?;
            out.extend(rows.iter().map(Self::session_from));
        }
        Ok(out)
    }

    /// Compare-and-set of the status: changes it only from one of `from`. Returns whether it did.
    pub async fn transition(
        &self,
        id: &str,
        from: &[&str],
        to: &str,
        failure_reason: Option<&str>,
    ) -> Result<bool> {
        let from_json = serde_json::to_string(from)?;
        let ts = now();
        let result = sqlx::query(
            "UPDATE sessions SET status = ?, failure_reason = COALESCE(?, failure_reason), \
             phase = ?, updated_at = ? \
             WHERE id = ? AND status IN (SELECT value FROM json_each(?))",
        )
        .bind(to)
        .bind(failure_reason)
        .bind(to)
        .bind(&ts)
        .bind(id)
        .bind(from_json)
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() == 1)
    }

    /// Removes a session that never got past `creating` (its create request was refused).
    pub async fn forget_creating(&self, id: &str) -> Result<()> {
        sqlx::query("DELETE FROM sessions WHERE id = ? AND status = 'creating'")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn set_sandbox(&self, id: &str, sandbox_id: &str, endpoint: &str) -> Result<()> {
        sqlx::query(
            "UPDATE sessions SET sandbox_id = ?, endpoint = ?, updated_at = ? WHERE id = ?",
        )
        .bind(sandbox_id)
        .bind(endpoint)
        .bind(now())
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn touch(&self, id: &str) -> Result<()> {
        sqlx::query("UPDATE sessions SET last_active_at = ? WHERE id = ?")
            .bind(now())
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    // ---- turns and messages

    /// Records a new turn and the user's message (and the turn's webhook delivery, pending), and
    /// moves the session from `ready` to `running`, in one transaction, before the harness is
    /// dialled. Returns the session as it now is, or `None`, changing nothing, when `tenant` has
    /// no such API session in `ready`. One round trip to the database: no read before it.
    pub async fn begin_turn(
        &self,
        tenant: &str,
        turn: &Turn,
        user: &Message,
        delivery: Option<&Delivery>,
    ) -> Result<Option<Session>> {
        let (tx, rx) = oneshot::channel();
        let begin = Begin {
            tenant: tenant.to_string(),
            turn: turn.clone(),
            user: user.clone(),
            delivery: delivery.cloned(),
        };
        self.writer
            .send(Write::Begin(Box::new(begin), tx))
            .await
            .map_err(|_| StoreError::WriterGone)?;
        rx.await
            .map_err(|_| StoreError::WriterGone)?
            .map_err(|e| StoreError::Query(sqlx::Error::Protocol(e)))
    }

    /// Removes a turn the harness refused as the client's mistake (nothing ran), with its user
    /// message, and returns the session to `ready`, as if the message had never been accepted.
    pub async fn discard_turn(&self, session_id: &str, turn_id: &str) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM messages WHERE session_id = ? AND turn_id = ?")
            .bind(session_id)
            .bind(turn_id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM turns WHERE session_id = ? AND id = ?")
            .bind(session_id)
            .bind(turn_id)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "UPDATE sessions SET status = 'ready', phase = 'ready' WHERE id = ? AND status = 'running'",
        )
        .bind(session_id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Ends a turn with its outcome and, when there is one, the assistant's message; a running
    /// session becomes `ready`. Committed by the event writer together with the events queued
    /// before it, so the turn's events are durable when this returns.
    pub async fn finish_turn(&self, turn: &Turn, reply: Option<&Message>) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.writer
            .send(Write::Finish(Box::new((turn.clone(), reply.cloned())), tx))
            .await
            .map_err(|_| StoreError::WriterGone)?;
        rx.await
            .map_err(|_| StoreError::WriterGone)?
            .map_err(|e| StoreError::Query(sqlx::Error::Protocol(e)))
    }

    fn turn_from(r: &sqlx::sqlite::SqliteRow) -> Turn {
        Turn {
            id: r.get("id"),
            session_id: r.get("session_id"),
            status: r.get("status"),
            mode: r.get("mode"),
            options: json(&r.get::<String, _>("options")),
            text: r.get("text"),
            usage: opt_json(r.get("usage")),
            error: opt_json(r.get("error")),
            created_at: r.get("created_at"),
            finished_at: r.get("finished_at"),
        }
    }

    pub async fn get_turn(&self, session_id: &str, turn_id: &str) -> Result<Option<Turn>> {
        let row = sqlx::query("SELECT * FROM turns WHERE id = ? AND session_id = ?")
            .bind(turn_id)
            .bind(session_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(Self::turn_from))
    }

    pub async fn running_turns(&self) -> Result<Vec<Turn>> {
        let rows = sqlx::query("SELECT * FROM turns WHERE status = 'running'")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(Self::turn_from).collect())
    }

    pub async fn list_messages(
        &self,
        session_id: &str,
        turn_id: Option<&str>,
    ) -> Result<Vec<Message>> {
        let rows = sqlx::query(
            "SELECT * FROM messages WHERE session_id = ? AND (? IS NULL OR turn_id = ?) ORDER BY seq",
        )
        .bind(session_id)
        .bind(turn_id)
        .bind(turn_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| Message {
                id: r.get("id"),
                session_id: r.get("session_id"),
                turn_id: r.get("turn_id"),
                role: r.get("role"),
                text: r.get("text"),
                parts: json(&r.get::<String, _>("parts")),
                metadata: json(&r.get::<String, _>("metadata")),
                created_at: r.get("created_at"),
            })
            .collect())
    }

    // ---- events

    /// Queues events for the batching writer; `flush` waits until everything queued is durable.
    pub async fn append_events(&self, events: Vec<Event>) -> Result<()> {
        self.writer
            .send(Write::Events(events))
            .await
            .map_err(|_| StoreError::WriterGone)
    }

    pub async fn flush(&self) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.writer
            .send(Write::Flush(tx))
            .await
            .map_err(|_| StoreError::WriterGone)?;
        rx.await
            .map_err(|_| StoreError::WriterGone)?
            .map_err(|e| StoreError::Query(sqlx::Error::Protocol(e)))
    }

    pub async fn last_seq(&self, session_id: &str) -> Result<i64> {
        let seq: Option<i64> =
            sqlx::query_scalar("SELECT MAX(seq) FROM events WHERE session_id = ?")
                .bind(session_id)
                .fetch_one(&self.pool)
                .await?;
        Ok(seq.unwrap_or(0))
    }

    pub async fn list_events(
        &self,
        session_id: &str,
        since: i64,
        limit: i64,
    ) -> Result<Vec<Event>> {
        let rows = sqlx::query(
            "SELECT * FROM events WHERE session_id = ? AND seq > ? ORDER BY seq LIMIT ?",
        )
        .bind(session_id)
        .bind(since)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| {
                let session_id: String = r.get("session_id");
                let seq: i64 = r.get("seq");
                Event {
                    id: seq.to_string(),
                    seq,
                    session_id,
                    turn_id: r.get("turn_id"),
                    kind: r.get("type"),
                    ts: r.get("ts"),
                    data: json(&r.get::<String, _>("data")),
                }
            })
            .collect())
    }

    // ---- webhook deliveries

    pub async fn upsert_delivery(&self, d: &Delivery) -> Result<()> {
        upsert_delivery(&self.pool, d).await?;
        Ok(())
    }

    pub async fn deliveries(&self, turn_id: &str) -> Result<Vec<Delivery>> {
        Ok(
            sqlx::query_as(
                "SELECT * FROM webhook_deliveries WHERE turn_id = ? ORDER BY created_at",
            )
            .bind(turn_id)
            .fetch_all(&self.pool)
            .await?,
        )
    }

    /// Deliveries that had not ended when the server last stopped.
    pub async fn pending_deliveries(&self) -> Result<Vec<Delivery>> {
        Ok(sqlx::query_as(
            "SELECT * FROM webhook_deliveries WHERE status = 'pending' ORDER BY created_at",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    // ---- sandboxes

    pub async fn insert_sandbox(&self, s: &SandboxRow) -> Result<()> {
        sqlx::query(
            "INSERT INTO sandboxes (id, template, endpoint, pid, session_id, created_at) VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(&s.id)
        .bind(&s.template)
        .bind(&s.endpoint)
        .bind(s.pid)
        .bind(&s.session_id)
        .bind(now())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn claim_sandbox(&self, sandbox_id: &str, session_id: &str) -> Result<bool> {
        let r =
            sqlx::query("UPDATE sandboxes SET session_id = ? WHERE id = ? AND session_id IS NULL")
                .bind(session_id)
                .bind(sandbox_id)
                .execute(&self.pool)
                .await?;
        Ok(r.rows_affected() == 1)
    }

    pub async fn delete_sandbox(&self, sandbox_id: &str) -> Result<()> {
        sqlx::query("DELETE FROM sandboxes WHERE id = ?")
            .bind(sandbox_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn get_sandbox(&self, id: &str) -> Result<Option<SandboxRow>> {
        Ok(sqlx::query_as::<_, SandboxRow>(
            "SELECT id, template, endpoint, pid, session_id FROM sandboxes WHERE id = ?",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?)
    }

    pub async fn list_sandboxes(&self) -> Result<Vec<SandboxRow>> {
        Ok(sqlx::query_as::<_, SandboxRow>(
            "SELECT id, template, endpoint, pid, session_id FROM sandboxes ORDER BY created_at",
        )
        .fetch_all(&self.pool)
        .await?)
    }
}

/// Inserts or updates a delivery; the body, once set, is kept.
async fn upsert_delivery(
    ex: impl sqlx::SqliteExecutor<'_>,
    d: &Delivery,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO webhook_deliveries (id, turn_id, session_id, url, status, attempts, last_status, \
         last_error, created_at, updated_at, include_messages, sealed_token, body) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
         ON CONFLICT (id) DO UPDATE SET status = excluded.status, attempts = excluded.attempts, \
         last_status = excluded.last_status, last_error = excluded.last_error, \
         updated_at = excluded.updated_at, sealed_token = excluded.sealed_token, \
         body = COALESCE(webhook_deliveries.body, excluded.body)",
    )
    .bind(&d.id)
    .bind(&d.turn_id)
    .bind(&d.session_id)
    .bind(&d.url)
    .bind(&d.status)
    .bind(d.attempts)
    .bind(d.last_status)
    .bind(&d.last_error)
    .bind(&d.created_at)
    .bind(&d.updated_at)
    .bind(d.include_messages)
    .bind(&d.sealed_token)
    .bind(&d.body)
    .execute(ex)
    .await?;
    Ok(())
}

/// Copies the WAL into the database file every second, off the request path. PASSIVE: it never
/// waits for, nor blocks, readers and the writer.
async fn checkpoint(pool: SqlitePool) {
    let mut tick = tokio::time::interval(CHECKPOINT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .execute(&pool)
            .await
        {
            tracing::warn!(error = %e, "checkpointing the store failed");
        }
    }
}

/// The one writer of the turn path: takes whatever is queued (events, turn starts and ends from
/// every session) and commits it as one transaction sent to SQLite in one round trip, so a burst
/// costs one commit and a lone turn step costs one statement batch. Answers go out after the
/// commit. If a batch fails, its operations are retried one by one, so only a bad one fails.
async fn write(mut conn: SqliteConnection, mut rx: mpsc::Receiver<Write>) {
    let mut carried: Option<Write> = None;
    loop {
        let first = match carried.take() {
            Some(w) => w,
            None => match rx.recv().await {
                Some(w) => w,
                None => return,
            },
        };
        let mut batch = Vec::new();
        let mut beginning = std::collections::HashSet::new();
        let mut events = 0;
        let mut next = Some(first);
        while let Some(w) = next.take() {
            if let Write::Begin(b, _) = &w
                && !beginning.insert(b.turn.session_id.clone())
            {
                // Two starts of one session in a batch could not tell their answers apart.
                carried = Some(w);
                break;
            }
            if let Write::Events(e) = &w {
                events += e.len();
            }
            batch.push(w);
            if events >= 2048 || batch.len() >= 256 {
                break;
            }
            next = rx.try_recv().ok();
            // Nobody waits on events alone (they are broadcast before they are stored): hold
            // them briefly, so a turn's end or the next start usually carries them in its commit.
            if next.is_none() && batch.iter().all(|w| matches!(w, Write::Events(_))) {
                next = tokio::time::timeout(EVENTS_LINGER, rx.recv())
                    .await
                    .ok()
                    .flatten();
            }
        }
        match commit(&mut conn, &batch).await {
            Ok(rows) => answer(batch, &Ok(rows)),
            Err(e) if batch.len() > 1 => {
                tracing::warn!(error = %e, ops = batch.len(), "a write batch failed; retrying its parts alone");
                for w in batch {
                    let result = commit(&mut conn, std::slice::from_ref(&w)).await;
                    if let Err(e) = &result {
                        tracing::error!(error = %e, "a write failed");
                    }
                    answer(vec![w], &result.map_err(|e| e.to_string()));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "a write failed");
                answer(batch, &Err(e.to_string()));
            }
        }
    }
}

fn answer(batch: Vec<Write>, result: &Result<Vec<sqlx::sqlite::SqliteRow>, String>) {
    let done = || result.as_ref().map(|_| ()).map_err(Clone::clone);
    for w in batch {
        match w {
            Write::Events(_) => {}
            Write::Flush(tx) | Write::Finish(_, tx) => {
                let _ = tx.send(done());
            }
            Write::Begin(b, tx) => {
                let session = result.as_ref().map(|rows| {
                    rows.iter()
                        .find(|r| {
                            r.try_get::<&str, _>("id")
                                .is_ok_and(|id| id == b.turn.session_id)
                        })
                        .map(Store::session_from)
                });
                let _ = tx.send(session.map_err(Clone::clone));
            }
        }
    }
}

/// Runs `batch` as one transaction in one multi-statement query.
async fn commit(
    conn: &mut SqliteConnection,
    batch: &[Write],
) -> Result<Vec<sqlx::sqlite::SqliteRow>, sqlx::Error> {
    // SQLite takes a limited number of bound values per statement: 6 per event row.
    const ROWS_PER_STATEMENT: usize = 150;
    let mut q = QueryBuilder::<sqlx::Sqlite>::new("BEGIN IMMEDIATE; ");
    let mut any = false;
    let events: Vec<&Event> = batch
        .iter()
        .filter_map(|w| match w {
            Write::Events(e) => Some(e.iter()),
            _ => None,
        })
        .flatten()
        .collect();
    for chunk in events.chunks(ROWS_PER_STATEMENT) {
        any = true;
        q.push("INSERT OR IGNORE INTO events (session_id, seq, turn_id, type, ts, data) ");
        q.push_values(chunk, |mut row, e| {
            row.push_bind(e.session_id.clone())
                .push_bind(e.seq)
                .push_bind(e.turn_id.clone())
                .push_bind(e.kind.clone())
                .push_bind(e.ts.clone())
                .push_bind(e.data.to_string());
        });
        q.push("; ");
    }
    for w in batch {
        match w {
            Write::Finish(end, _) => {
                any = true;
                push_finish(&mut q, &end.0, end.1.as_ref());
            }
            Write::Begin(b, _) => {
                any = true;
                push_begin(&mut q, b);
            }
            Write::Events(_) | Write::Flush(_) => {}
        }
    }
    if !any {
        return Ok(Vec::new());
    }
    q.push("COMMIT;");
    let result = sqlx::Executor::fetch_all(&mut *conn, q.build()).await;
    if result.is_err() {
        // The batch stopped part way, inside its transaction: undo what ran.
        let _ = sqlx::Executor::execute(&mut *conn, "ROLLBACK").await;
    }
    result
}

/// `INSERT INTO messages …`; with `only_if_changed`, only when the previous statement changed a
/// row (chains a turn's inserts on the session's conditional update).
fn push_message(q: &mut QueryBuilder<'_, sqlx::Sqlite>, m: &Message, only_if_changed: bool) {
    q.push("INSERT INTO messages (id, session_id, turn_id, role, text, parts, metadata, created_at) SELECT ");
    let mut cols = q.separated(", ");
    cols.push_bind(m.id.clone())
        .push_bind(m.session_id.clone())
        .push_bind(m.turn_id.clone())
        .push_bind(m.role.clone())
        .push_bind(m.text.clone())
        .push_bind(m.parts.to_string())
        .push_bind(m.metadata.to_string())
        .push_bind(m.created_at.clone());
    q.push(if only_if_changed {
        " WHERE changes() = 1; "
    } else {
        "; "
    });
}

/// A turn's start: the session moves from `ready` to `running` (returning it), and only then are
/// the turn, the user's message and the pending webhook delivery inserted.
fn push_begin(q: &mut QueryBuilder<'_, sqlx::Sqlite>, b: &Begin) {
    let t = &b.turn;
    q.push("UPDATE sessions SET status = 'running', phase = 'running', updated_at = ")
        .push_bind(t.created_at.clone())
        .push(", last_active_at = ")
        .push_bind(t.created_at.clone())
        .push(" WHERE id = ")
        .push_bind(t.session_id.clone())
        .push(" AND tenant = ")
        .push_bind(b.tenant.clone())
        .push(" AND status = 'ready' AND kind = 'api' RETURNING *; ");
    q.push("INSERT INTO turns (id, session_id, status, mode, options, created_at) SELECT ");
    q.separated(", ")
        .push_bind(t.id.clone())
        .push_bind(t.session_id.clone())
        .push_bind(t.status.clone())
        .push_bind(t.mode.clone())
        .push_bind(t.options.to_string())
        .push_bind(t.created_at.clone());
    q.push(" WHERE changes() = 1; ");
    push_message(q, &b.user, true);
    if let Some(d) = &b.delivery {
        q.push(
            "INSERT INTO webhook_deliveries (id, turn_id, session_id, url, status, attempts, \
             created_at, updated_at, include_messages, sealed_token) SELECT ",
        );
        q.separated(", ")
            .push_bind(d.id.clone())
            .push_bind(d.turn_id.clone())
            .push_bind(d.session_id.clone())
            .push_bind(d.url.clone())
            .push_bind(d.status.clone())
            .push_bind(d.attempts)
            .push_bind(d.created_at.clone())
            .push_bind(d.updated_at.clone())
            .push_bind(d.include_messages)
            .push_bind(d.sealed_token.clone());
        q.push(" WHERE changes() = 1; ");
    }
}

/// A turn's end: its outcome, the assistant's message, and a running session back to `ready`
/// (a dead or deleted one stays so).
fn push_finish(q: &mut QueryBuilder<'_, sqlx::Sqlite>, turn: &Turn, reply: Option<&Message>) {
    q.push("UPDATE turns SET status = ")
        .push_bind(turn.status.clone())
        .push(", text = ")
        .push_bind(turn.text.clone())
        .push(", usage = ")
        .push_bind(turn.usage.as_ref().map(|u| u.to_string()))
        .push(", error = ")
        .push_bind(turn.error.as_ref().map(|e| e.to_string()))
        .push(", finished_at = ")
        .push_bind(turn.finished_at.clone())
        .push(" WHERE id = ")
        .push_bind(turn.id.clone())
        .push("; ");
    if let Some(m) = reply {
        push_message(q, m, false);
    }
    let ts = now();
    q.push("UPDATE sessions SET last_active_at = ")
        .push_bind(ts.clone())
        .push(
            ", status = CASE WHEN status IN ('running', 'input_required') THEN 'ready' ELSE status END, \
             phase = CASE WHEN status IN ('running', 'input_required') THEN 'ready' ELSE phase END, \
             updated_at = ",
        )
        .push_bind(ts)
        .push(" WHERE id = ")
        .push_bind(turn.session_id.clone())
        .push("; ");
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn session(id: &str, kind: &str) -> Session {
        let ts = now();
        Session {
            id: id.into(),
            tenant: "t1".into(),
            harness: "echo".into(),
            kind: kind.into(),
            status: "ready".into(),
            phase: Some("ready".into()),
            failure_reason: None,
            title: None,
            metadata: json!({}),
            sandbox_id: Some(format!("sbx-{id}")),
            endpoint: Some("http://127.0.0.1:1".into()),
            idle_timeout_s: 60,
            idempotency_key: None,
            request_hash: None,
            created_at: ts.clone(),
            updated_at: ts.clone(),
            last_active_at: ts,
        }
    }

    fn turn(session_id: &str, id: &str) -> (Turn, Message) {
        let ts = now();
        let turn = Turn {
            id: id.into(),
            session_id: session_id.into(),
            status: "running".into(),
            mode: "sync".into(),
            options: json!({}),
            text: None,
            usage: None,
            error: None,
            created_at: ts.clone(),
            finished_at: None,
        };
        let user = Message {
            id: format!("msg-{id}"),
            session_id: session_id.into(),
            turn_id: id.into(),
            role: "user".into(),
            text: "hi".into(),
            parts: json!([{"type": "text", "text": "hi"}]),
            metadata: json!({}),
            created_at: ts,
        };
        (turn, user)
    }

    async fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).await.expect("open");
        for (id, kind) in [("s1", "api"), ("s2", "api"), ("s3", "api"), ("tui", "tui")] {
            store
                .insert_session(&session(id, kind))
                .await
                .expect("insert");
        }
        (dir, store)
    }

    #[tokio::test]
    async fn a_turn_begins_only_on_a_ready_api_session_of_the_tenant() {
        let (_dir, store) = store().await;
        let (t, m) = turn("s1", "turn-1");
        assert_eq!(
            store.begin_turn("t2", &t, &m, None).await.expect("begin"),
            None
        );
        let (tt, tm) = turn("tui", "turn-tui");
        assert_eq!(
            store.begin_turn("t1", &tt, &tm, None).await.expect("begin"),
            None
        );
        let begun = store.begin_turn("t1", &t, &m, None).await.expect("begin");
        assert_eq!(begun.map(|s| s.status), Some("running".into()));
        let (t2, m2) = turn("s1", "turn-2");
        assert_eq!(
            store.begin_turn("t1", &t2, &m2, None).await.expect("begin"),
            None
        );
        // Refused starts left nothing behind.
        assert!(store.get_turn("s1", "turn-2").await.expect("get").is_none());
        assert!(
            store
                .get_turn("tui", "turn-tui")
                .await
                .expect("get")
                .is_none()
        );
        assert_eq!(
            store.list_messages("s1", None).await.expect("list").len(),
            1
        );

        let mut done = t.clone();
        done.status = "completed".into();
        done.finished_at = Some(now());
        store.finish_turn(&done, None).await.expect("finish");
        let s = store
            .get_session("t1", "s1")
            .await
            .expect("get")
            .expect("session");
        assert_eq!(s.status, "ready");
        assert!(
            store
                .begin_turn("t1", &t2, &m2, None)
                .await
                .expect("begin")
                .is_some()
        );
    }

    #[tokio::test]
    async fn a_failing_write_fails_alone_when_batched_with_others() {
        let (_dir, store) = store().await;
        let (t, m) = turn("s1", "dup");
        assert!(
            store
                .begin_turn("t1", &t, &m, None)
                .await
                .expect("begin")
                .is_some()
        );
        // Queued together: the same turn id again (a unique violation) and a good start.
        let (bad, bad_msg) = turn("s3", "dup");
        let (good, good_msg) = turn("s2", "fresh");
        let (first, second) = tokio::join!(
            store.begin_turn("t1", &bad, &bad_msg, None),
            store.begin_turn("t1", &good, &good_msg, None),
        );
        assert!(first.is_err(), "{first:?}");
        assert_eq!(second.expect("good start").map(|s| s.id), Some("s2".into()));
        assert!(store.get_turn("s2", "fresh").await.expect("get").is_some());
        let s3 = store
            .get_session("t1", "s3")
            .await
            .expect("get")
            .expect("s3");
        assert_eq!(s3.status, "ready", "the failed start was rolled back");
    }
}
