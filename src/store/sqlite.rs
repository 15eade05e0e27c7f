//! The SQLite backend's opening and its turn-path writer: one thread owning one connection commits
//! whatever is queued (turn starts, events, turn ends) as one transaction of cached prepared
//! statements, so SQLite's single writer lock is never contended and no statement is parsed twice.

use super::{
    Begin, Event, EventQueue, Message, Result, Session, StoreError, Turn, Unavailable, Write,
    WriteFailed, json, now,
};
use rusqlite::OptionalExtension;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};
use std::path::Path;
use std::str::FromStr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long the writer's thread waits for SQLite's write lock held by another connection.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the background checkpoint runs. Short, so each pass copies little and its sync of
/// the database file is small: at a 1 s period under a sustained load the WAL reached 85 MiB
/// and the sync after copying it stalled the next commits for 50–120 ms.
pub const CHECKPOINT_EVERY: Duration = Duration::from_millis(200);
/// SQLite's default page size, which the store keeps: the size of a WAL frame's page.
pub const PAGE_BYTES: i64 = 4096;
/// WAL length (in frames, a page each) past which the writer completes a checkpoint itself, so
/// the WAL starts over (`finish_checkpoint`): about 16 MiB.
pub const RESTART_FRAMES: i64 = 4096;
/// The WAL file's size once a checkpoint has started it over (`journal_size_limit`, bytes): a
/// burst that grew it far past this does not leave that much disk taken for good. Four times
/// `RESTART_FRAMES`, so a WAL that starts over at its usual length is rewritten in place rather
/// than cut back each time: cutting it frees blocks the next commits allocate again, and on this
/// project's machines (ext4 mounted with `discard`) each cut took 4–7 ms on the writer's thread
/// and the commits around it stalled (docs/benchmarks.md, "WAL checkpoints and tail latency").
pub const WAL_SIZE_LIMIT: i64 = 4 * RESTART_FRAMES * PAGE_BYTES;
/// How long events alone wait for company before they are committed.
const EVENTS_LINGER: Duration = Duration::from_millis(2);
/// How often events that could not be written are tried again when nothing else is written.
const UNSAVED_RETRY: Duration = Duration::from_secs(1);
/// At most this many unwritten events are kept in memory while the store is unwritable.
const UNSAVED_LIMIT: usize = 100_000;

/// Opens (creating if needed) `DIR/sandwarden.db`, applies pending migrations and starts the
/// writer on `rx` and the background checkpoints.
pub(super) async fn open(
    data_dir: &Path,
    rx: flume::Receiver<Write>,
) -> Result<(SqlitePool, Arc<Writer>)> {
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
        .pragma("wal_autocheckpoint", "0")
        .pragma("journal_size_limit", WAL_SIZE_LIMIT.to_string());
    let pool = SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(options)
        .await
        .map_err(open_error)?;
    sqlx::migrate!("src/store/migrations/sqlite")
        .run(&pool)
        .await
        .map_err(StoreError::Migrate)?;
    // One connection writes the turn path, so those writes never wait on each other for
    // SQLite's lock.
    let conn = writer_connection(&path)
        .map_err(|e| open_error(sqlx::Error::Io(std::io::Error::other(e))))?;
    let writer = Arc::new(Writer {
        state: Mutex::new(WriterState {
            conn,
            unsaved: Vec::new(),
        }),
        queued: EventQueue::default(),
        wal_frames: AtomicI64::new(0),
    });
    let thread = writer.clone();
    std::thread::Builder::new()
        .name("sqlite-writer".into())
        .spawn(move || write(&thread, rx))
        .map_err(|e| open_error(sqlx::Error::Io(e)))?;
    tokio::spawn(checkpoint(pool.clone(), writer.clone()));
    Ok((pool, writer))
}

/// Copies the WAL into the database file every `CHECKPOINT_EVERY`, off the request path.
/// PASSIVE: it never waits for, nor blocks, readers and the writer. It publishes the WAL's
/// length in frames, so the writer knows when to finish a checkpoint itself (see
/// `RESTART_FRAMES`).
async fn checkpoint(pool: SqlitePool, writer: Arc<Writer>) {
    let mut tick = tokio::time::interval(CHECKPOINT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .fetch_one(&pool)
            .await
        {
            // (busy, frames in the WAL, frames copied into the database)
            Ok(row) => writer
                .wal_frames
                .store(row.try_get(1).unwrap_or(0), Ordering::Relaxed),
            Err(e) => tracing::warn!(error = %e, "checkpointing the store failed"),
        }
    }
}

/// Opens the writer's own connection (rusqlite, on the writer's thread) with the pool's settings.
fn writer_connection(path: &Path) -> rusqlite::Result<rusqlite::Connection> {
    let conn = rusqlite::Connection::open(path)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.pragma_update(None, "wal_autocheckpoint", "0")?;
    conn.pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT)?;
    conn.set_prepared_statement_cache_capacity(32);
    Ok(conn)
}

/// The turn path's writer: its connection and the events it could not write yet, shared by the
/// writer's thread and the requests that commit inline (`Writer::try_inline`). A request that
/// finds the writer idle commits its own write on its own thread; otherwise it queues the write
/// for the thread, which commits whatever is queued as one transaction (a group commit).
pub(super) struct Writer {
    state: Mutex<WriterState>,
    /// Events on their way to the writer: appends push here, every commit takes them all.
    pub(super) queued: EventQueue,
    /// The WAL's length in frames, as the last background checkpoint found it.
    wal_frames: AtomicI64,
}

struct WriterState {
    conn: rusqlite::Connection,
    /// Events of failed batches, kept while the store cannot be written (see `keep_unsaved`).
    unsaved: Vec<Event>,
}

impl Writer {
    fn lock(&self) -> std::sync::MutexGuard<'_, WriterState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Commits `w` (with the events queued before it) on the caller's thread when nothing else
    /// is being written: the connection is free, nothing waits in `channel`, no failed events
    /// wait for a retry, the WAL does not need its restart, and SQLite's write lock is free at
    /// once. That saves two thread hand-offs per write, about a third of a short turn's time in
    /// serve. It blocks the caller for one commit (≈ 0.1 ms), never for a lock: anything else
    /// hands `w` back, to be sent to the writer's thread.
    pub(super) fn try_inline(&self, w: Write, channel: &flume::Sender<Write>) -> Result<(), Write> {
        if !channel.is_empty() || self.wal_frames.load(Ordering::Relaxed) >= RESTART_FRAMES {
            return Err(w);
        }
        let Ok(mut state) = self.state.try_lock() else {
            return Err(w);
        };
        if !state.unsaved.is_empty() {
            return Err(w);
        }
        // Another connection writing (a session's create): queue rather than wait here.
        let _ = state.conn.busy_timeout(Duration::ZERO);
        let begun = state
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate);
        if let Ok(tx) = begun {
            let _ = tx.busy_timeout(BUSY_TIMEOUT);
            let batch = [Write::Events(self.queued.take()), w];
            return match commit_in(tx, &batch) {
                Ok(begun) => {
                    answer(batch, &Ok(begun));
                    Ok(())
                }
                // Rolled back: the writer's thread does it again, with its retries and reports.
                Err(_) => {
                    let [events, w] = batch;
                    if let Write::Events(events) = events {
                        self.queued.put_back(events);
                    }
                    Err(w)
                }
            };
        }
        drop(begun);
        let _ = state.conn.busy_timeout(BUSY_TIMEOUT);
        Err(w)
    }
}

/// The writer's thread: takes whatever is queued (events, turn starts and ends from every
/// session) and commits it as one transaction of cached prepared statements, so a burst costs
/// one commit. Answers go out after the commit. If a batch fails, its operations are retried one
/// by one, so only a bad one fails.
///
/// Events were broadcast before they were stored, and their seqs are taken: when the store
/// cannot be written (full, read-only, failing), they are kept and written with the next batch
/// (or after `UNSAVED_RETRY`), so the session's stored events stay gap-free once it recovers.
fn write(writer: &Writer, rx: flume::Receiver<Write>) {
    let mut carried: Option<Write> = None;
    loop {
        let retrying = !writer.lock().unsaved.is_empty();
        let first = match carried.take() {
            Some(w) => w,
            None if retrying => match rx.recv_timeout(UNSAVED_RETRY) {
                Ok(w) => w,
                Err(flume::RecvTimeoutError::Disconnected) => return,
                Err(flume::RecvTimeoutError::Timeout) => Write::Events(Vec::new()),
            },
            None => match rx.recv() {
                Ok(w) => w,
                Err(_) => return,
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
                next = rx.recv_timeout(EVENTS_LINGER).ok();
            }
        }
        let mut state = writer.lock();
        // The queued events were appended before anything sent after them: a turn's end commits
        // with its events. Events kept from a failed batch go first.
        let waiting = writer.queued.take();
        if !waiting.is_empty() {
            batch.insert(0, Write::Events(waiting));
        }
        if !state.unsaved.is_empty() {
            batch.insert(0, Write::Events(std::mem::take(&mut state.unsaved)));
        }
        let WriterState { conn, unsaved } = &mut *state;
        match commit(conn, &batch) {
            Ok(begun) => answer(batch, &Ok(begun)),
            Err(e) if batch.len() > 1 => {
                tracing::warn!(error = %e, ops = batch.len(), "a write batch failed; retrying its parts alone");
                for w in batch {
                    let result = commit(conn, std::slice::from_ref(&w));
                    if let Err(e) = &result {
                        tracing::error!(error = %e, "a write failed");
                        keep_unsaved(unsaved, &w, e);
                    }
                    answer(vec![w], &result.map_err(|e| failed(&e)));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "a write failed");
                for w in &batch {
                    keep_unsaved(unsaved, w, &e);
                }
                answer(batch, &Err(failed(&e)));
            }
        }
        finish_checkpoint(conn, &writer.wal_frames);
    }
}

/// Completes a checkpoint from the writer's connection when the WAL has grown long. The
/// background checkpoint copies the bulk, but under a steady stream of commits it never catches
/// the writer, and SQLite only starts the WAL over when a write begins with every frame copied:
/// without this the WAL grows for as long as the load lasts. Here no write is in flight, so
/// the pass copies the few frames left, and the next commit starts the WAL from its beginning.
fn finish_checkpoint(conn: &rusqlite::Connection, wal_frames: &AtomicI64) {
    if wal_frames.load(Ordering::Relaxed) < RESTART_FRAMES {
        return;
    }
    // (busy, frames in the WAL, frames copied): busy when the background checkpoint is running,
    // in which case this is tried again after the next batch.
    match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get::<_, i64>(0)) {
        Ok(1) => {}
        Ok(_) => wal_frames.store(0, Ordering::Relaxed),
        Err(e) => {
            wal_frames.store(0, Ordering::Relaxed);
            tracing::warn!(error = %e, "checkpointing the store from its writer failed");
        }
    }
}

/// Why a failed write means the data dir cannot be written now (and the caller may retry).
fn unavailable(e: &rusqlite::Error) -> Option<Unavailable> {
    match e {
        rusqlite::Error::SqliteFailure(f, _) => {
            super::sqlite_unavailable(u32::try_from(f.extended_code).unwrap_or(0))
        }
        _ => None,
    }
}

fn failed(e: &rusqlite::Error) -> WriteFailed {
    WriteFailed {
        message: e.to_string(),
        unavailable: unavailable(e),
    }
}

/// Keeps the events of a failed write for the next attempt when the store was unwritable (not
/// when a row was refused), up to `UNSAVED_LIMIT` events.
fn keep_unsaved(unsaved: &mut Vec<Event>, w: &Write, e: &rusqlite::Error) {
    let Write::Events(events) = w else { return };
    if unavailable(e).is_none() {
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

fn answer(batch: impl IntoIterator<Item = Write>, result: &Result<Vec<Session>, WriteFailed>) {
    let done = || result.as_ref().map(|_| ()).map_err(Clone::clone);
    for w in batch {
        match w {
            Write::Events(_) => {}
            Write::Flush(tx) | Write::Finish(_, tx) => {
                let _ = tx.send(done());
            }
            Write::Begin(b, tx) => {
                let session = result
                    .as_ref()
                    .map(|begun| begun.iter().find(|s| s.id == b.turn.session_id).cloned());
                let _ = tx.send(session.map_err(Clone::clone));
            }
        }
    }
}

/// Runs `batch` as one transaction: the events first (they were queued before the turn ends
/// that follow them), then the starts and ends in queue order. Returns the sessions whose turns
/// started. Dropping the transaction on an error rolls back what ran.
fn commit(conn: &mut rusqlite::Connection, batch: &[Write]) -> rusqlite::Result<Vec<Session>> {
    let any = batch.iter().any(|w| match w {
        Write::Events(e) => !e.is_empty(),
        Write::Flush(_) => false,
        Write::Begin(..) | Write::Finish(..) => true,
    });
    if !any {
        return Ok(Vec::new());
    }
    commit_in(
        conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?,
        batch,
    )
}

/// `commit` within a transaction already begun (and holding SQLite's write lock).
fn commit_in(tx: rusqlite::Transaction<'_>, batch: &[Write]) -> rusqlite::Result<Vec<Session>> {
    {
        let mut insert = tx.prepare_cached(
            "INSERT OR IGNORE INTO events (session_id, seq, turn_id, type, ts, data) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?;
        for w in batch {
            let events = match w {
                Write::Events(events) => events.as_slice(),
                Write::Finish(end, _) => end.2.as_slice(),
                Write::Flush(_) | Write::Begin(..) => continue,
            };
            for e in events {
                insert.execute(rusqlite::params![
                    e.session_id,
                    e.seq,
                    e.turn_id,
                    e.kind,
                    e.ts,
                    e.data.to_string()
                ])?;
            }
        }
    }
    let mut begun = Vec::new();
    for w in batch {
        match w {
            Write::Finish(end, _) => finish(&tx, &end.0, end.1.as_ref())?,
            Write::Begin(b, _) => begun.extend(begin(&tx, b)?),
            Write::Events(_) | Write::Flush(_) => {}
        }
    }
    tx.commit()?;
    Ok(begun)
}

fn insert_message(tx: &rusqlite::Transaction<'_>, m: &Message) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO messages (id, session_id, turn_id, role, text, parts, metadata, created_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?
    .execute(rusqlite::params![
        m.id,
        m.session_id,
        m.turn_id,
        m.role,
        m.text,
        m.parts.to_string(),
        m.metadata.to_string(),
        m.created_at
    ])?;
    Ok(())
}

/// A turn's start: the session moves from `ready` to `running` (returning it), and only then are
/// the turn, the user's message and the pending webhook delivery inserted.
fn begin(tx: &rusqlite::Transaction<'_>, b: &Begin) -> rusqlite::Result<Option<Session>> {
    let t = &b.turn;
    let session = tx
        .prepare_cached(
            "UPDATE sessions SET status = 'running', phase = 'running', updated_at = ?1, \
             last_active_at = ?1 WHERE id = ?2 AND tenant = ?3 AND status = 'ready' \
             AND kind = 'api' RETURNING *",
        )?
        .query_row(
            rusqlite::params![t.created_at, t.session_id, b.tenant],
            session_of,
        )
        .optional()?;
    if session.is_none() {
        return Ok(None);
    }
    tx.prepare_cached(
        "INSERT INTO turns (id, session_id, status, mode, options, created_at, replica) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(rusqlite::params![
        t.id,
        t.session_id,
        t.status.as_str(),
        t.mode,
        t.options.to_string(),
        t.created_at,
        b.replica
    ])?;
    insert_message(tx, &b.user)?;
    if let Some(d) = &b.delivery {
        tx.prepare_cached(
            "INSERT INTO webhook_deliveries (id, turn_id, session_id, url, status, attempts, \
             created_at, updated_at, include_messages, sealed_token, shape) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        )?
        .execute(rusqlite::params![
            d.id,
            d.turn_id,
            d.session_id,
            d.url,
            d.status,
            d.attempts,
            d.created_at,
            d.updated_at,
            d.include_messages,
            d.sealed_token,
            d.shape
        ])?;
    }
    Ok(session)
}

/// A turn's end: its outcome, the assistant's message, and a running session back to `ready`
/// (a dead or deleted one stays so).
fn finish(
    tx: &rusqlite::Transaction<'_>,
    turn: &Turn,
    reply: Option<&Message>,
) -> rusqlite::Result<()> {
    // Counted once: only while the turn is still running (a retried end adds nothing).
    let used = super::TurnUsage::of(turn);
    tx.prepare_cached(
        "INSERT INTO usage_daily (tenant, session_id, day, input_tokens, output_tokens, turns, turn_ms) \
         SELECT s.tenant, s.id, ?2, ?3, ?4, 1, ?5 FROM sessions s JOIN turns t ON t.session_id = s.id \
         WHERE t.id = ?1 AND t.status = 'running' \
         ON CONFLICT (tenant, session_id, day) DO UPDATE SET \
           input_tokens = input_tokens + excluded.input_tokens, \
           output_tokens = output_tokens + excluded.output_tokens, \
           turns = turns + 1, turn_ms = turn_ms + excluded.turn_ms",
    )?
    .execute(rusqlite::params![
        turn.id,
        used.day,
        used.input_tokens,
        used.output_tokens,
        used.turn_ms
    ])?;
    tx.prepare_cached(
        "UPDATE turns SET status = ?1, text = ?2, usage = ?3, error = ?4, finished_at = ?5, \
         stop_reason = ?7 WHERE id = ?6",
    )?
    .execute(rusqlite::params![
        turn.status.as_str(),
        turn.text,
        turn.usage.as_ref().map(|u| u.to_string()),
        turn.error.as_ref().map(|e| e.to_string()),
        turn.finished_at,
        turn.id,
        turn.stop_reason,
    ])?;
    if let Some(m) = reply {
        insert_message(tx, m)?;
    }
    tx.prepare_cached(
        "UPDATE sessions SET last_active_at = ?1, \
         status = CASE WHEN status IN ('running', 'input_required') THEN 'ready' ELSE status END, \
         phase = CASE WHEN status IN ('running', 'input_required') THEN 'ready' ELSE phase END, \
         updated_at = ?1 WHERE id = ?2",
    )?
    .execute(rusqlite::params![now(), turn.session_id])?;
    Ok(())
}

/// A `Session` from a row of `sessions`, as rusqlite reads it.
fn session_of(r: &rusqlite::Row<'_>) -> rusqlite::Result<Session> {
    Ok(Session {
        id: r.get("id")?,
        name: r.get("name")?,
        tenant: r.get("tenant")?,
        harness: r.get("harness")?,
        kind: r.get("kind")?,
        status: super::stored_status(&r.get::<_, String>("status")?),
        phase: r.get("phase")?,
        failure_reason: r.get("failure_reason")?,
        title: r.get("title")?,
        metadata: json(&r.get::<_, String>("metadata")?),
        sandbox_id: r.get("sandbox_id")?,
        endpoint: r.get("endpoint")?,
        idle_timeout_s: r.get("idle_timeout_s")?,
        idempotency_key: r.get("idempotency_key")?,
        request_hash: r.get("request_hash")?,
        created_at: r.get("created_at")?,
        updated_at: r.get("updated_at")?,
        last_active_at: r.get("last_active_at")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Frames in the WAL, as a checkpoint that copies nothing new reports them.
    fn wal_length(conn: &rusqlite::Connection) -> i64 {
        conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get(1))
            .expect("checkpoint")
    }

    /// Bytes of text in each row `insert` writes.
    const ROW_BYTES: usize = 512;

    fn insert(conn: &rusqlite::Connection, n: usize) {
        for i in 0..n {
            conn.execute(
                "INSERT INTO t (v) VALUES (?1)",
                [format!("{i:0>ROW_BYTES$}")],
            )
            .expect("insert");
        }
    }

    /// A WAL of 200 commits, then `finish_checkpoint` told it has `frames`, then one commit:
    /// the WAL's length after that commit.
    fn length_after(frames: i64) -> i64 {
        let dir = tempfile::tempdir().expect("tempdir");
        let conn = writer_connection(&dir.path().join("wal.db")).expect("open");
        conn.execute("CREATE TABLE t (v TEXT)", []).expect("create");
        insert(&conn, 200);
        let known = AtomicI64::new(frames);
        finish_checkpoint(&conn, &known);
        if frames >= RESTART_FRAMES {
            assert_eq!(known.load(Ordering::Relaxed), 0, "the length is reset");
        }
        insert(&conn, 1);
        wal_length(&conn)
    }

    #[test]
    fn a_wal_that_grew_past_the_limit_is_cut_back_when_it_starts_over() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("wal.db");
        let conn = writer_connection(&db).expect("open");
        conn.execute("CREATE TABLE t (v TEXT)", []).expect("create");
        // One transaction with a limit's worth of text (and the pages' own overhead besides):
        // the WAL file grows past the limit.
        conn.execute_batch("BEGIN").expect("begin");
        insert(&conn, WAL_SIZE_LIMIT as usize / ROW_BYTES);
        conn.execute_batch("COMMIT").expect("commit");
        let wal = dir.path().join("wal.db-wal");
        let size = || std::fs::metadata(&wal).expect("wal file").len();
        assert!(size() > WAL_SIZE_LIMIT as u64, "grown: {}", size());
        finish_checkpoint(&conn, &AtomicI64::new(RESTART_FRAMES));
        insert(&conn, 1);
        assert!(
            size() <= WAL_SIZE_LIMIT as u64,
            "the WAL file is {} bytes after it started over",
            size()
        );
    }

    #[test]
    fn the_writer_starts_a_long_wal_over_and_leaves_a_short_one() {
        let left = length_after(RESTART_FRAMES - 1);
        assert!(
            left > 200,
            "below the threshold the WAL is left to grow: {left}"
        );
        let restarted = length_after(RESTART_FRAMES);
        assert!(
            restarted <= 2,
            "the next commit starts the WAL over: {restarted} frames"
        );
    }
}
