//! The SQLite backend's opening and its turn-path writer: one task owning one connection commits
//! whatever is queued (turn starts, events, turn ends) as one transaction in one multi-statement
//! query, so SQLite's single writer lock is never contended.

use super::{
    Begin, Event, Message, Result, Session, StoreError, Turn, Write, WriteFailed, json, now,
};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{QueryBuilder, Row, SqliteConnection, SqlitePool};
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;
use tokio::sync::mpsc;

const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);
/// How long events alone wait for company before they are committed.
const EVENTS_LINGER: Duration = Duration::from_millis(2);
/// How often events that could not be written are tried again when nothing else is written.
const UNSAVED_RETRY: Duration = Duration::from_secs(1);
/// At most this many unwritten events are kept in memory while the store is unwritable.
const UNSAVED_LIMIT: usize = 100_000;

/// Opens (creating if needed) `DIR/sandwarden.db`, applies pending migrations and starts the
/// writer on `rx` and the background checkpoints.
pub(super) async fn open(data_dir: &Path, rx: mpsc::Receiver<Write>) -> Result<SqlitePool> {
    std::fs::create_dir_all(data_dir).map_err(|e| StoreError::Open {
        path: data_dir.display().to_string(),
        source: sqlx::Error::Io(e),
    })?;
    let path = data_dir.join("sandwarden.db");
    let open_error = |source| StoreError::Open {
        path: path.display().to_string(),
        source,
    };
    let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))
        .map_err(open_error)?
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
        .map_err(open_error)?;
    sqlx::migrate!("src/store/migrations/sqlite")
        .run(&pool)
        .await
        .map_err(StoreError::Migrate)?;
    // The writer owns one connection, so writes never wait on each other for SQLite's lock.
    let conn = pool.acquire().await.map_err(open_error)?.detach();
    tokio::spawn(write(conn, rx));
    tokio::spawn(checkpoint(pool.clone()));
    Ok(pool)
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
///
/// Events were broadcast before they were stored, and their seqs are taken: when the store
/// cannot be written (full, read-only, failing), they are kept and written with the next batch
/// (or after `UNSAVED_RETRY`), so the session's stored events stay gap-free once it recovers.
async fn write(mut conn: SqliteConnection, mut rx: mpsc::Receiver<Write>) {
    let mut carried: Option<Write> = None;
    let mut unsaved: Vec<Event> = Vec::new();
    loop {
        let first = match carried.take() {
            Some(w) => w,
            None if !unsaved.is_empty() => {
                match tokio::time::timeout(UNSAVED_RETRY, rx.recv()).await {
                    Ok(Some(w)) => w,
                    Ok(None) => return,
                    Err(_) => Write::Events(Vec::new()),
                }
            }
            None => match rx.recv().await {
                Some(w) => w,
                None => return,
            },
        };
        let mut batch = Vec::new();
        let mut beginning = std::collections::HashSet::new();
        let mut events = unsaved.len();
        if !unsaved.is_empty() {
            batch.push(Write::Events(std::mem::take(&mut unsaved)));
        }
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
                        keep_unsaved(&mut unsaved, &w, e);
                    }
                    answer(vec![w], &result.map_err(|e| WriteFailed::from(&e)));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "a write failed");
                for w in &batch {
                    keep_unsaved(&mut unsaved, w, &e);
                }
                answer(batch, &Err(WriteFailed::from(&e)));
            }
        }
    }
}

/// Keeps the events of a failed write for the next attempt when the store was unwritable (not
/// when a row was refused), up to `UNSAVED_LIMIT` events.
fn keep_unsaved(unsaved: &mut Vec<Event>, w: &Write, e: &sqlx::Error) {
    let Write::Events(events) = w else { return };
    if !super::transient(e) {
        return;
    }
    if unsaved.len() + events.len() > UNSAVED_LIMIT {
        tracing::error!(
            dropped = events.len(),
            "the store has been unwritable too long; events are lost"
        );
        return;
    }
    unsaved.extend(events.iter().cloned());
}

fn answer(batch: Vec<Write>, result: &Result<Vec<sqlx::sqlite::SqliteRow>, WriteFailed>) {
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
                        .map(|r| session_row!(r))
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
    q.push(
        "INSERT INTO turns (id, session_id, status, mode, options, created_at, replica) SELECT ",
    );
    q.separated(", ")
        .push_bind(t.id.clone())
        .push_bind(t.session_id.clone())
        .push_bind(t.status.clone())
        .push_bind(t.mode.clone())
        .push_bind(t.options.to_string())
        .push_bind(t.created_at.clone())
        .push_bind(b.replica.clone());
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
