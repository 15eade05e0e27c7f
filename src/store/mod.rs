//! The store: sessions, turns, messages, events, webhook deliveries, sandboxes and API keys, in an
//! SQLite file (one replica) or in PostgreSQL (several replicas), with versioned migrations for
//! each. Most queries are written once and run on either; the turn path (starts, events, ends)
//! has a writer per backend (`sqlite`, `postgres`). With PostgreSQL the store also relays what
//! other replicas did (`Notice`s from LISTEN/NOTIFY).
//!
//! It stores what it is given and answers queries; it holds no session logic and must never be
//! handed per-session env or secrets.

pub use crate::status::{SessionStatus, TurnStatus};
use serde::{Deserialize, Serialize};
use sqlx::{PgPool, Row, SqlitePool};
use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{broadcast, oneshot};

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
    #[error("a turn write failed: {}", .0.message)]
    Write(WriteFailed),
    #[error("a row with this key already exists")]
    Conflict,
    #[error("--store {0:?} is neither a postgres:// URL nor a path to an SQLite data dir")]
    Location(String),
    #[error(
        "no store connection within the acquire timeout ({})",
        if *.all_in_use { "every one in use" } else { "a new one could not be opened" }
    )]
    NoConnection { all_in_use: bool },
}

impl StoreError {
    /// Whether the database could not be reached (down, restarting, no free connection), as
    /// opposed to a query it refused: worth retrying shortly.
    pub fn is_unavailable(&self) -> bool {
        self.unavailable().is_some()
    }

    /// A pool timeout told apart, from the pool's state just after it: with every connection
    /// open and in use the store is busy; with fewer, new ones could not be opened (the database
    /// is unreachable or refusing them).
    fn after_acquire(self, open: u32, max: u32) -> StoreError {
        match self {
            StoreError::Query(sqlx::Error::PoolTimedOut) => StoreError::NoConnection {
                all_in_use: open >= max,
            },
            other => other,
        }
    }

    /// Why the database could not be used, when that is the failure (not a query it refused).
    pub fn unavailable(&self) -> Option<Unavailable> {
        match self {
            StoreError::NoConnection { all_in_use: true } => Some(Unavailable::Busy),
            StoreError::NoConnection { all_in_use: false } => Some(Unavailable::Unreachable),
            StoreError::Open { source, .. } => {
                Some(unavailable(source).unwrap_or(Unavailable::Unreachable))
            }
            StoreError::WriterGone => Some(Unavailable::Stopping),
            StoreError::Query(e) => unavailable(e),
            StoreError::Write(w) => w.unavailable,
            _ => None,
        }
    }
}

/// Why the store cannot serve a request now; each is worth retrying, and each says what would
/// fix it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unavailable {
    /// Every pooled connection stayed in use for the whole acquire timeout.
    Busy,
    /// No connection within the acquire timeout, for a reason not known here (all in use, or
    /// none could be opened).
    NoConnection,
    /// The database could not be reached, or it is starting, stopping or refusing connections.
    Unreachable,
    /// SQLite: another connection held the lock longer than the busy timeout.
    Locked,
    /// SQLite: the data dir cannot be written (full, read-only or failing).
    CannotWrite,
    /// The store's writer has stopped: the server is shutting down.
    Stopping,
}

impl Unavailable {
    /// What a client (and an operator reading the session) is told.
    pub fn detail(self) -> &'static str {
        match self {
            Unavailable::Busy => {
                "every connection to the session store stayed busy for the acquire timeout; retry \
                 shortly (an operator can raise --store-max-connections or \
                 --store-acquire-timeout, or the database's capacity)"
            }
            Unavailable::NoConnection => {
                "no connection to the session store came free or could be opened within the \
                 acquire timeout; retry shortly"
            }
            Unavailable::Unreachable => {
                "the session store cannot be reached right now; retry shortly"
            }
            Unavailable::Locked => {
                "the session store stayed locked by another writer past its busy timeout; retry \
                 shortly"
            }
            Unavailable::CannotWrite => {
                "the session store cannot write its data dir (full, read-only or failing); retry \
                 once an operator has freed it"
            }
            Unavailable::Stopping => {
                "the session store is stopping with the server; retry shortly (another replica \
                 answers if there is one)"
            }
        }
    }
}

/// Errors that say the database is unreachable, busy or unwritable, not that a query was wrong.
pub(crate) fn unavailable(e: &sqlx::Error) -> Option<Unavailable> {
    match e {
        sqlx::Error::PoolTimedOut => Some(Unavailable::NoConnection),
        sqlx::Error::Io(_) | sqlx::Error::Tls(_) => Some(Unavailable::Unreachable),
        sqlx::Error::PoolClosed | sqlx::Error::WorkerCrashed => Some(Unavailable::Stopping),
        sqlx::Error::Database(d) => {
            let c = d.code()?;
            match c.parse::<u32>() {
                // SQLite's numeric codes, with their extended codes.
                Ok(n) if c.len() < 5 => sqlite_unavailable(n),
                // PostgreSQL's SQLSTATE: class 08 (connection exception), 57P0x (shutting
                // down, cannot connect now), 53300 (too many connections).
                _ if c.starts_with("08") || c.starts_with("57P") => Some(Unavailable::Unreachable),
                _ if c == "53300" => Some(Unavailable::Busy),
                _ => None,
            }
        }
        _ => None,
    }
}

/// SQLite's primary result code (the low byte of an extended one) when it says the store cannot
/// be written now: SQLITE_BUSY (5) and SQLITE_LOCKED (6) outlasted the busy timeout;
/// SQLITE_READONLY (8), SQLITE_IOERR (10), SQLITE_FULL (13) and SQLITE_CANTOPEN (14) are an
/// operator's to fix.
pub(crate) fn sqlite_unavailable(code: u32) -> Option<Unavailable> {
    match code & 0xff {
        5 | 6 => Some(Unavailable::Locked),
        8 | 10 | 13 | 14 => Some(Unavailable::CannotWrite),
        _ => None,
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// A session as stored (the API shows `session::view::SessionView`).
#[derive(Debug, Clone, PartialEq)]
pub struct Session {
    pub id: String,
    /// The id the client picked at create, if it did: a name within its tenant, which `id` is
    /// derived from (see `session::scoped_id`).
    pub name: Option<String>,
    pub tenant: String,
    pub harness: String,
    pub kind: String,
    pub status: SessionStatus,
    pub phase: Option<String>,
    pub failure_reason: Option<String>,
    pub title: Option<String>,
    pub metadata: serde_json::Value,
    pub sandbox_id: Option<String>,
    pub endpoint: Option<String>,
    pub idle_timeout_s: i64,
    pub idempotency_key: Option<String>,
    pub request_hash: Option<String>,
    pub created_at: String,
    pub updated_at: String,
    pub last_active_at: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Turn {
    pub id: String,
    pub session_id: String,
    pub status: TurnStatus,
    pub mode: String,
    pub options: serde_json::Value,
    pub text: Option<String>,
    pub usage: Option<serde_json::Value>,
    pub error: Option<serde_json::Value>,
    pub created_at: String,
    pub finished_at: Option<String>,
    /// Why the agent ended the turn (`end_turn`, `cancelled`, …), when it said.
    pub stop_reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub id: String,
    pub session_id: String,
    pub turn_id: String,
    pub role: String,
    pub text: String,
    pub parts: serde_json::Value,
    pub metadata: serde_json::Value,
    pub created_at: String,
}

/// The session event envelope: `seq` is per session and gap-free.
#[derive(utoipa::ToSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
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

/// An insert's outcome, a row that exists already being `Conflict`.
fn unique(result: std::result::Result<(), sqlx::Error>) -> Result<()> {
    match result {
        Ok(()) => Ok(()),
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Err(StoreError::Conflict),
        Err(e) => Err(e.into()),
    }
}

/// An object a vendor-compatible API keeps (an agent, an environment, a session's record), one
/// version of it: `body` is the object as that API shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct VendorObject {
    pub tenant: String,
    pub kind: String,
    pub id: String,
    pub version: i64,
    pub body: serde_json::Value,
    pub created_at: String,
    pub archived_at: Option<String>,
}

type ObjectRow = (String, String, String, i64, String, String, Option<String>);

impl From<ObjectRow> for VendorObject {
    fn from((tenant, kind, id, version, body, created_at, archived_at): ObjectRow) -> Self {
        VendorObject {
            tenant,
            kind,
            id,
            version,
            // The store holds only bodies this code wrote; one edited by hand reads as null.
            body: serde_json::from_str(&body).unwrap_or(serde_json::Value::Null),
            created_at,
            archived_at,
        }
    }
}

/// A webhook delivery: what clients see, plus what a restart needs to resume it.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
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
    pub include_messages: bool,
    /// The client's token, sealed under the server secret; `None` once the delivery ended.
    pub sealed_token: Option<String>,
    /// The payload, fixed at the first attempt so every retry sends the same bytes.
    pub body: Option<String>,
    /// The payload's shape when its client reads another than the native one (JSON, see
    /// `webhook::payload`).
    pub shape: Option<String>,
}

/// The owner of sandboxes every replica manages (see `Store::owns`).
pub const SHARED_OWNER: &str = "*";

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct SandboxRow {
    pub id: String,
    pub template: String,
    pub endpoint: String,
    pub pid: Option<i64>,
    pub session_id: Option<String>,
    /// The replica that started it (its process lives there), or `SHARED_OWNER`; `None` in rows
    /// from before replicas. Written as this replica when `None`.
    pub owner: Option<String>,
}

/// Filters for listing sessions.
#[derive(Debug, Clone, Default)]
pub struct SessionFilter {
    pub status: Option<String>,
    /// Leave out deleted sessions.
    pub present: bool,
    pub harness: Option<String>,
    /// Sessions created after this (created_at, id) pair, for cursor pagination (before it,
    /// newest first).
    pub after: Option<(String, String)>,
    /// The newest first (`after` then means before).
    pub newest_first: bool,
    pub limit: i64,
}

/// A turn that started: the session as it now is and, with a shared store, the session's last
/// event seq read in the same statement (the previous turn may have run on another replica).
#[derive(Debug, Clone, PartialEq)]
pub struct Begun {
    pub session: Session,
    pub last_seq: Option<i64>,
}

/// A new turn as the writer records it.
struct Begin {
    tenant: String,
    turn: Turn,
    user: Message,
    delivery: Option<Delivery>,
    /// The replica running the turn.
    replica: String,
}

/// Why a write queued for a writer failed (the error itself stays with the writer, which logs it).
#[derive(Debug, Clone)]
pub struct WriteFailed {
    message: String,
    unavailable: Option<Unavailable>,
}

impl From<&sqlx::Error> for WriteFailed {
    fn from(e: &sqlx::Error) -> Self {
        WriteFailed {
            message: e.to_string(),
            unavailable: unavailable(e),
        }
    }
}

type Done = oneshot::Sender<Result<(), WriteFailed>>;

/// What the writer is asked to do, in queue order.
enum Write {
    Events(Vec<Event>),
    Flush(Done),
    /// A turn's end and its last event, committed with the events queued before it (one
    /// commit, in order).
    Finish(Box<(Turn, Option<Message>, Option<Event>)>, Done),
    /// A turn's start: answered with the session it moved to `running`, if it was `ready`.
    Begin(
        Box<Begin>,
        oneshot::Sender<Result<Option<Session>, WriteFailed>>,
    ),
}

/// Where the store lives: an SQLite file in the data dir, or a PostgreSQL database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    Sqlite(PathBuf),
    Postgres(String),
}

impl Location {
    /// `--store`: unset means SQLite in `data_dir`; `postgres://` or `postgresql://` a database.
    pub fn parse(store: Option<&str>, data_dir: &Path) -> Result<Location> {
        match store.map(str::trim) {
            None | Some("") => Ok(Location::Sqlite(data_dir.to_path_buf())),
            Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                Ok(Location::Postgres(url.to_string()))
            }
            Some(other) if other.starts_with("sqlite://") => Ok(Location::Sqlite(PathBuf::from(
                other.trim_start_matches("sqlite://"),
            ))),
            Some(other) => Err(StoreError::Location(redact(other))),
        }
    }

    /// The location without a password, for logs and messages.
    pub fn display(&self) -> String {
        match self {
            Location::Sqlite(dir) => dir.join("sandwarden.db").display().to_string(),
            Location::Postgres(url) => redact(url),
        }
    }
}

/// A connection URL with its password (if any) replaced, so it can be logged.
fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("****"));
            u.to_string()
        }
        Ok(u) => u.to_string(),
        Err(_) => "<not a URL>".into(),
    }
}

/// How the store connects: who this replica is, and the PostgreSQL pool's limits.
#[derive(Debug, Clone)]
pub struct Options {
    /// This replica's stable id (sandboxes it starts and turns it runs are recorded under it).
    pub replica: String,
    pub max_connections: u32,
    /// How long a query waits for a free (or new) connection before the store reports itself
    /// unavailable.
    pub acquire_timeout: Duration,
    /// PostgreSQL's `statement_timeout` for every connection.
    pub statement_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            replica: "local".into(),
            max_connections: 16,
            acquire_timeout: Duration::from_secs(3),
            statement_timeout: Duration::from_secs(15),
        }
    }
}

/// Something another replica did, relayed from PostgreSQL's LISTEN/NOTIFY.
#[derive(Debug, Clone, PartialEq)]
pub enum Notice {
    /// Events `first..=last` of a session were committed.
    Events {
        session_id: String,
        first: i64,
        last: i64,
    },
    /// A session changed (status, turn).
    Changed(String),
    /// Notices may have been missed (the listening connection was lost and is back): whoever
    /// follows something should re-read it.
    Lost,
}

#[derive(Clone)]
enum Db {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// Runs `$body` with `$pool` bound to whichever pool the store has: the same query text and
/// binds, typed for each backend.
/// A pool timeout comes out as `NoConnection`, saying whether every connection was in use.
macro_rules! on_db {
    ($store:expr, |$pool:ident| $body:expr) => {
        match &$store.db {
            Db::Sqlite($pool) => async { Ok($body) }.await.map_err(|e: StoreError| {
                e.after_acquire($pool.size(), $pool.options().get_max_connections())
            })?,
            Db::Postgres($pool) => async { Ok($body) }.await.map_err(|e: StoreError| {
                e.after_acquire($pool.size(), $pool.options().get_max_connections())
            })?,
        }
    };
}

/// A `Session` from a row of `sessions` (of either backend).
/// A session's stored status word. The store holds only the words this code writes; any other (a
/// row edited by hand) reads as `dead`, so such a session is never served.
pub(crate) fn stored_status(word: &str) -> SessionStatus {
    SessionStatus::parse(word).unwrap_or_else(|| {
        tracing::error!(
            status = word,
            "a session with an unknown stored status; treated as dead"
        );
        SessionStatus::Dead
    })
}

/// A turn's stored status word; any other (a row edited by hand) reads as `failed`.
pub(crate) fn stored_turn_status(word: &str) -> TurnStatus {
    TurnStatus::parse(word).unwrap_or_else(|| {
        tracing::error!(
            status = word,
            "a turn with an unknown stored status; treated as failed"
        );
        TurnStatus::Failed
    })
}

macro_rules! session_row {
    ($r:expr) => {{
        let r = $r;
        Session {
            id: r.get("id"),
            name: r.get("name"),
            tenant: r.get("tenant"),
            harness: r.get("harness"),
            kind: r.get("kind"),
            status: crate::store::stored_status(&r.get::<String, _>("status")),
            phase: r.get("phase"),
            failure_reason: r.get("failure_reason"),
            title: r.get("title"),
            metadata: json(&r.get::<String, _>("metadata")),
            sandbox_id: r.get("sandbox_id"),
            endpoint: r.get("endpoint"),
            idle_timeout_s: r.get("idle_timeout_s"),
            idempotency_key: r.get("idempotency_key"),
            request_hash: r.get("request_hash"),
            created_at: r.get("created_at"),
            updated_at: r.get("updated_at"),
            last_active_at: r.get("last_active_at"),
        }
    }};
}

/// What one ended turn adds to its tenant's usage.
pub(crate) struct TurnUsage {
    /// The UTC day it ended, `YYYY-MM-DD`.
    pub day: String,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub turn_ms: i64,
}

impl TurnUsage {
    pub fn of(turn: &Turn) -> TurnUsage {
        let tokens = |name: &str| {
            turn.usage
                .as_ref()
                .and_then(|u| u[name].as_i64())
                .unwrap_or(0)
                .max(0)
        };
        let at = |t: &str| humantime::parse_rfc3339_weak(t).ok();
        let end = turn.finished_at.as_deref().and_then(at);
        let turn_ms = match (at(&turn.created_at), end) {
            (Some(a), Some(b)) => b
                .duration_since(a)
                .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
            _ => 0,
        };
        let mut day =
            humantime::format_rfc3339_seconds(end.unwrap_or_else(std::time::SystemTime::now))
                .to_string();
        day.truncate(10);
        TurnUsage {
            day,
            input_tokens: tokens("input_tokens"),
            output_tokens: tokens("output_tokens"),
            turn_ms,
        }
    }
}

/// Where a page of a session's history or events ends, chosen from the rows' sizes before
/// any row is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageCut {
    /// The page's last seq.
    pub last: i64,
    /// The page's stored size in bytes.
    pub bytes: i64,
    /// Whether more rows follow.
    pub more: bool,
}

impl PageCut {
    /// Cuts `rows` (seq and size, in order, up to `limit + 1` of them) after `limit` rows or
    /// before `max_bytes` would be passed, keeping at least one.
    fn of(rows: &[(i64, i64)], limit: i64, max_bytes: i64) -> Option<PageCut> {
        let (mut bytes, mut last) = (0, None);
        for (i, (seq, size)) in rows.iter().enumerate() {
            if i as i64 == limit || (i > 0 && bytes + size > max_bytes) {
                break;
            }
            bytes += size;
            last = Some(*seq);
        }
        let last = last?;
        // Rows come in either order (oldest or newest first): more follow when the last row
        // read is not in the page.
        let more = rows.last().is_some_and(|(seq, _)| *seq != last);
        Some(PageCut { last, bytes, more })
    }

    /// Where the next page starts, when more follow.
    pub fn next(&self) -> Option<i64> {
        self.more.then_some(self.last)
    }
}

/// Where a page of a session's history starts: after a message, the oldest first, or before
/// one, the newest first (`Before(i64::MAX)`: the newest page).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HistoryFrom {
    After(i64),
    Before(i64),
}

impl HistoryFrom {
    /// The page whose cut ended at `last`, as `messages_through`'s `(after, last)`: in order
    /// either way.
    pub fn span(self, last: i64) -> (i64, i64) {
        match self {
            HistoryFrom::After(after) => (after, last),
            // `last` is the page's oldest message.
            HistoryFrom::Before(before) => (last - 1, before.saturating_sub(1)),
        }
    }
}

/// A tenant's use, in total or of one session, over some days.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Usage {
    pub tenant: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub turns: i64,
    pub turn_seconds: f64,
    /// How long its sandboxes ran (live, or until the session ended) within the period.
    pub sandbox_seconds: f64,
}

/// What `Notice::Changed` carries when API keys were revoked (no session id looks like it).
pub const KEYS_CHANGED: &str = "!keys";

/// An API key as the store keeps it: its hash, never the key.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ApiKey {
    pub id: String,
    pub tenant: String,
    #[serde(skip)]
    pub key_hash: String,
    pub admin: bool,
    pub origin: String,
    pub created_at: String,
    pub last_used_at: Option<String>,
    pub revoked_at: Option<String>,
    /// The tenant's quotas as set on this key (unset ones: the server's defaults).
    pub limits: crate::session::quota::Limits,
}

macro_rules! key_row {
    ($r:expr) => {{
        let r = $r;
        ApiKey {
            id: r.get("id"),
            tenant: r.get("tenant"),
            key_hash: r.get("key_hash"),
            admin: r.get("admin"),
            origin: r.get("origin"),
            created_at: r.get("created_at"),
            last_used_at: r.get("last_used_at"),
            revoked_at: r.get("revoked_at"),
            limits: serde_json::from_str(&r.get::<String, _>("limits")).unwrap_or_default(),
        }
    }};
}

macro_rules! turn_row {
    ($r:expr) => {{
        let r = $r;
        Turn {
            id: r.get("id"),
            session_id: r.get("session_id"),
            status: stored_turn_status(r.get("status")),
            mode: r.get("mode"),
            options: json(&r.get::<String, _>("options")),
            text: r.get("text"),
            usage: opt_json(r.get("usage")),
            error: opt_json(r.get("error")),
            created_at: r.get("created_at"),
            finished_at: r.get("finished_at"),
            stop_reason: r.get("stop_reason"),
        }
    }};
}

macro_rules! message_row {
    ($r:expr) => {{
        let r = $r;
        Message {
            id: r.get("id"),
            session_id: r.get("session_id"),
            turn_id: r.get("turn_id"),
            role: r.get("role"),
            text: r.get("text"),
            parts: json(&r.get::<String, _>("parts")),
            metadata: json(&r.get::<String, _>("metadata")),
            created_at: r.get("created_at"),
        }
    }};
}

macro_rules! event_row {
    ($r:expr) => {{
        let r = $r;
        let seq: i64 = r.get("seq");
        Event {
            id: seq.to_string(),
            seq,
            session_id: r.get("session_id"),
            turn_id: r.get("turn_id"),
            kind: r.get("type"),
            ts: r.get("ts"),
            data: json(&r.get::<String, _>("data")),
        }
    }};
}

mod postgres;
mod sqlite;
/// The SQLite store's WAL settings, for the benchmark that reports the WAL's size.
pub use sqlite::{CHECKPOINT_EVERY, PAGE_BYTES, RESTART_FRAMES, WAL_SIZE_LIMIT};

/// Events waiting for the SQLite writer, which takes them all into each batch it commits: a
/// turn's events wake the writer once (when the queue was empty), not once each.
#[derive(Default)]
struct EventQueue(std::sync::Mutex<Vec<Event>>);

/// Past this many waiting events, appends go through the writer's bounded channel instead, so a
/// store that cannot keep up slows the turns down rather than growing memory.
const QUEUED_EVENTS_LIMIT: usize = 8192;

enum Queued {
    /// Queued; the writer must be woken (the queue was empty).
    First,
    Behind,
    Full(Vec<Event>),
}

impl EventQueue {
    fn push(&self, events: Vec<Event>) -> Queued {
        let mut q = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if q.len() + events.len() > QUEUED_EVENTS_LIMIT {
            return Queued::Full(events);
        }
        let first = q.is_empty();
        q.extend(events);
        if first { Queued::First } else { Queued::Behind }
    }

    /// Returns events taken for a commit that did not happen, ahead of any queued since.
    fn put_back(&self, mut events: Vec<Event>) {
        let mut q = self.0.lock().unwrap_or_else(|e| e.into_inner());
        events.append(&mut q);
        *q = events;
    }

    fn take(&self) -> Vec<Event> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Handle to the store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    db: Db,
    writer: flume::Sender<Write>,
    /// SQLite only: the writer, for writes committed on the caller's thread when it is idle,
    /// and its queue of events (see `EventQueue`).
    inline: Option<Arc<sqlite::Writer>>,
    replica: Arc<str>,
    notices: Option<broadcast::Sender<Notice>>,
}

pub fn now() -> String {
    humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string()
}

/// `now()` moved by `by` (for leases).
fn later(by: Duration) -> String {
    humantime::format_rfc3339_micros(std::time::SystemTime::now() + by).to_string()
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or(serde_json::Value::Null)
}

fn opt_json(text: Option<String>) -> Option<serde_json::Value> {
    text.map(|t| json(&t))
}

/// `?, ?, …` for `n` values.
fn placeholders(n: usize) -> String {
    vec!["?"; n].join(", ")
}

impl Store {
    /// Opens (creating if needed) `DIR/sandwarden.db` and applies pending migrations.
    pub async fn open(data_dir: &Path) -> Result<Store> {
        Store::connect(
            &Location::Sqlite(data_dir.to_path_buf()),
            &Options::default(),
        )
        .await
    }

    /// Opens the store at `location` and applies pending migrations (PostgreSQL: under the
    /// migrator's advisory lock, so replicas starting together apply each migration once).
    pub async fn connect(location: &Location, options: &Options) -> Result<Store> {
        let (tx, rx) = flume::bounded(1024);
        let (db, notices, inline) = match location {
            Location::Sqlite(dir) => {
                let (pool, writer) = sqlite::open(dir, rx).await?;
                (Db::Sqlite(pool), None, Some(writer))
            }
            Location::Postgres(url) => {
                let (pool, notices) = postgres::open(url, options, rx).await?;
                (Db::Postgres(pool), Some(notices), None)
            }
        };
        Ok(Store {
            db,
            writer: tx,
            inline,
            replica: options.replica.as_str().into(),
            notices,
        })
    }

    /// Whether several replicas may share this store (PostgreSQL).
    pub fn is_shared(&self) -> bool {
        matches!(self.db, Db::Postgres(_))
    }

    /// This replica's id, as recorded on the sandboxes it starts and the turns it runs.
    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// What other replicas do, for a shared store; `None` for SQLite (nobody else writes).
    pub fn notices(&self) -> Option<broadcast::Receiver<Notice>> {
        self.notices.as_ref().map(broadcast::Sender::subscribe)
    }

    /// Tells other replicas that a session changed (after the change was committed). Does not
    /// wait: a lost notice only delays a long-poll until its next re-read.
    pub fn announce(&self, session_id: &str) {
        if let Db::Postgres(pool) = &self.db {
            postgres::announce(pool.clone(), &self.replica, session_id);
        }
    }

    /// The query text for this backend: `?` placeholders numbered `$1, $2, …` for PostgreSQL.
    fn sql<'a>(&self, text: &'a str) -> Cow<'a, str> {
        match self.db {
            Db::Sqlite(_) => Cow::Borrowed(text),
            Db::Postgres(_) => Cow::Owned(postgres::numbered(text)),
        }
    }

    /// Whether the database answers (for `/readyz`).
    pub async fn ping(&self) -> Result<()> {
        on_db!(self, |pool| sqlx::query("SELECT 1")
            .execute(pool)
            .await?
            .rows_affected());
        Ok(())
    }

    // ---- API keys

    /// Checks this replica's server-secret fingerprint against the one the store was set up
    /// with, recording it when the store has none yet (or when `replace`, for an operator who
    /// changes the secret on purpose). Returns the stored fingerprint when it differs.
    pub async fn check_secret_fingerprint(
        &self,
        fingerprint: &str,
        replace: bool,
    ) -> Result<Option<String>> {
        let upsert = if replace {
            "INSERT INTO settings (name, value) VALUES ('secret_fingerprint', ?) \
             ON CONFLICT (name) DO UPDATE SET value = excluded.value"
        } else {
            "INSERT INTO settings (name, value) VALUES ('secret_fingerprint', ?) \
             ON CONFLICT (name) DO NOTHING"
        };
        self.execute(upsert, &[Some(fingerprint)]).await?;
        let sql = self.sql("SELECT value FROM settings WHERE name = 'secret_fingerprint'");
        let stored: Option<String> = on_db!(self, |pool| sqlx::query_scalar(&sql)
            .fetch_optional(pool)
            .await?);
        Ok(stored.filter(|s| s != fingerprint))
    }

    /// Records a key (by its hash) for `tenant`; `origin` is `env`, `generated` or `api`. A key
    /// already known is made valid again (the environment's key is valid while it is set).
    /// Returns the key's id.
    pub async fn insert_key(
        &self,
        tenant: &str,
        key_hash: &str,
        admin: bool,
        origin: &str,
        limits: &crate::session::quota::Limits,
    ) -> Result<String> {
        let id = format!("key_{}", uuid::Uuid::now_v7().simple());
        let limits = serde_json::to_string(limits).unwrap_or_else(|_| "{}".into());
        let sql = self.sql(
            "INSERT INTO api_keys (id, tenant, key_hash, admin, created_at, origin, limits) \
             VALUES (?, ?, ?, ?, ?, ?, ?) \
             ON CONFLICT (key_hash) DO UPDATE SET revoked_at = NULL RETURNING id",
        );
        Ok(on_db!(self, |pool| sqlx::query_scalar(&sql)
            .bind(&id)
            .bind(tenant)
            .bind(key_hash)
            .bind(admin)
            .bind(now())
            .bind(origin)
            .bind(&limits)
            .fetch_one(pool)
            .await?))
    }

    /// Revokes every key from the environment but the one with `keep_hash`: the admin key was
    /// rotated. Returns how many were revoked.
    pub async fn retire_env_keys(&self, keep_hash: &str) -> Result<u64> {
        self.execute(
            "UPDATE api_keys SET revoked_at = ? \
             WHERE origin = 'env' AND key_hash <> ? AND revoked_at IS NULL",
            &[Some(&now()), Some(keep_hash)],
        )
        .await
    }

    /// A valid (unrevoked) key by its hash.
    pub async fn find_key(&self, key_hash: &str) -> Result<Option<ApiKey>> {
        let sql = self.sql("SELECT * FROM api_keys WHERE key_hash = ? AND revoked_at IS NULL");
        Ok(on_db!(self, |pool| sqlx::query(&sql)
            .bind(key_hash)
            .fetch_optional(pool)
            .await?
            .map(|r| key_row!(r))))
    }

    /// Every key (revoked ones too), of one tenant or of all, oldest first.
    pub async fn list_keys(&self, tenant: Option<&str>) -> Result<Vec<ApiKey>> {
        let sql = self
            .sql("SELECT * FROM api_keys WHERE (? IS NULL OR tenant = ?) ORDER BY created_at, id");
        Ok(on_db!(self, |pool| sqlx::query(&sql)
            .bind(tenant)
            .bind(tenant)
            .fetch_all(pool)
            .await?
            .iter()
            .map(|r| key_row!(r))
            .collect()))
    }

    pub async fn get_key(&self, id: &str) -> Result<Option<ApiKey>> {
        let sql = self.sql("SELECT * FROM api_keys WHERE id = ?");
        Ok(on_db!(self, |pool| sqlx::query(&sql)
            .bind(id)
            .fetch_optional(pool)
            .await?
            .map(|r| key_row!(r))))
    }

    /// Revokes a key (kept, marked) unless it is the last valid admin key; tells the other
    /// replicas, which drop it from their caches. Returns whether it is revoked now (false: it
    /// is the last admin key, and stays valid).
    pub async fn revoke_key(&self, id: &str) -> Result<bool> {
        let n = self
            .execute(
                "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, ?) WHERE id = ? \
                 AND (NOT admin OR revoked_at IS NOT NULL OR \
                      (SELECT COUNT(*) FROM api_keys WHERE admin AND revoked_at IS NULL) > 1)",
                &[Some(&now()), Some(id)],
            )
            .await?;
        self.announce(KEYS_CHANGED);
        Ok(n == 1)
    }

    /// Replaces a key's limits; tells the other replicas (their caches drop the key). Returns
    /// whether the key exists.
    pub async fn set_key_limits(
        &self,
        id: &str,
        limits: &crate::session::quota::Limits,
    ) -> Result<bool> {
        let limits = serde_json::to_string(limits).unwrap_or_else(|_| "{}".into());
        let n = self
            .execute(
                "UPDATE api_keys SET limits = ? WHERE id = ?",
                &[Some(&limits), Some(id)],
            )
            .await?;
        self.announce(KEYS_CHANGED);
        Ok(n == 1)
    }

    /// Usage per tenant and session from day `since` (`YYYY-MM-DD`, UTC) on: of one tenant,
    /// or of all.
    pub async fn usage(&self, tenant: Option<&str>, since: &str) -> Result<Vec<Usage>> {
        let sql = self.sql(
            "SELECT tenant, session_id, CAST(SUM(input_tokens) AS BIGINT) AS i, \
             CAST(SUM(output_tokens) AS BIGINT) AS o, CAST(SUM(turns) AS BIGINT) AS n, \
             CAST(SUM(turn_ms) AS BIGINT) AS ms FROM usage_daily \
             WHERE (? IS NULL OR tenant = ?) AND day >= ? \
             GROUP BY tenant, session_id ORDER BY tenant, session_id",
        );
        let turns: Vec<Usage> = on_db!(self, |pool| sqlx::query(&sql)
            .bind(tenant)
            .bind(tenant)
            .bind(since)
            .fetch_all(pool)
            .await?
            .iter()
            .map(|r| Usage {
                tenant: r.get("tenant"),
                session_id: Some(r.get("session_id")),
                input_tokens: r.get("i"),
                output_tokens: r.get("o"),
                turns: r.get("n"),
                turn_seconds: r.get::<i64, _>("ms") as f64 / 1000.0,
                sandbox_seconds: 0.0,
            })
            .collect());
        let mut by_session: std::collections::BTreeMap<(String, String), Usage> = turns
            .into_iter()
            .map(|u| {
                (
                    (u.tenant.clone(), u.session_id.clone().unwrap_or_default()),
                    u,
                )
            })
            .collect();
        // Sandbox time: every session live in the period, from its start (or the period's) to
        // now, or to when it ended.
        let sessions = self.sql(
            "SELECT tenant, id, status, created_at, updated_at FROM sessions \
             WHERE (? IS NULL OR tenant = ?) AND (updated_at >= ? OR \
             status IN ('creating', 'ready', 'running', 'input_required'))",
        );
        let rows: Vec<(String, String, String, String, String)> =
            on_db!(self, |pool| sqlx::query_as(&sessions)
                .bind(tenant)
                .bind(tenant)
                .bind(since)
                .fetch_all(pool)
                .await?);
        let at = |t: &str| humantime::parse_rfc3339_weak(t).ok();
        let from = at(&format!("{since}T00:00:00Z"));
        let now = std::time::SystemTime::now();
        for (tenant, id, status, created, updated) in rows {
            let live = matches!(
                status.as_str(),
                "creating" | "ready" | "running" | "input_required"
            );
            let end = if live { Some(now) } else { at(&updated) };
            let start = match (at(&created), from) {
                (Some(c), Some(f)) => Some(c.max(f)),
                (c, _) => c,
            };
            let seconds = match (start, end) {
                (Some(s), Some(e)) => e.duration_since(s).map_or(0.0, |d| d.as_secs_f64()),
                _ => 0.0,
            };
            let key = (tenant.clone(), id.clone());
            if seconds <= 0.0 && !by_session.contains_key(&key) {
                continue;
            }
            let entry = by_session.entry(key).or_insert_with(|| Usage {
                tenant,
                session_id: Some(id),
                ..Usage::default()
            });
            entry.sandbox_seconds = seconds;
        }
        Ok(by_session.into_values().collect())
    }

    /// A tenant's use over all its turns (what budgets are checked against).
    pub async fn tenant_usage(&self, tenant: &str) -> Result<Usage> {
        let sql = self.sql(
            "SELECT CAST(COALESCE(SUM(input_tokens), 0) AS BIGINT) AS i, \
             CAST(COALESCE(SUM(output_tokens), 0) AS BIGINT) AS o, \
             CAST(COALESCE(SUM(turns), 0) AS BIGINT) AS n, \
             CAST(COALESCE(SUM(turn_ms), 0) AS BIGINT) AS ms \
             FROM usage_daily WHERE tenant = ?",
        );
        Ok(on_db!(self, |pool| {
            let r = sqlx::query(&sql).bind(tenant).fetch_one(pool).await?;
            Usage {
                tenant: tenant.to_string(),
                session_id: None,
                input_tokens: r.get("i"),
                output_tokens: r.get("o"),
                turns: r.get("n"),
                turn_seconds: r.get::<i64, _>("ms") as f64 / 1000.0,
                sandbox_seconds: 0.0,
            }
        }))
    }

    /// How many sessions are live (not deleted, failed or dead): of `tenant`, or of everyone.
    pub async fn live_sessions(&self, tenant: Option<&str>) -> Result<u64> {
        let sql = self.sql(
            "SELECT COUNT(*) FROM sessions WHERE (? IS NULL OR tenant = ?) \
             AND status IN ('creating', 'ready', 'running', 'input_required')",
        );
        let n: i64 = on_db!(self, |pool| sqlx::query_scalar(&sql)
            .bind(tenant)
            .bind(tenant)
            .fetch_one(pool)
            .await?);
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Records that a key was used (at most about once a minute per key and replica).
    /// `tenant`'s live sessions, counted per harness (template).
    pub async fn live_per_harness(&self, tenant: &str) -> Result<Vec<(String, u64)>> {
        let sql = self.sql(
            "SELECT harness, COUNT(*) AS n FROM sessions WHERE tenant = ? \
             AND status IN ('creating', 'ready', 'running', 'input_required') GROUP BY harness",
        );
        Ok(on_db!(self, |pool| sqlx::query(&sql)
            .bind(tenant)
            .fetch_all(pool)
            .await?
            .iter()
            .map(|r| (
                r.get::<String, _>("harness"),
                u64::try_from(r.get::<i64, _>("n")).unwrap_or(0)
            ))
            .collect()))
    }

    pub async fn touch_key(&self, id: &str) -> Result<()> {
        self.execute(
            "UPDATE api_keys SET last_used_at = ? WHERE id = ?",
            &[Some(&now()), Some(id)],
        )
        .await?;
        Ok(())
    }

    pub async fn has_admin_key(&self) -> Result<bool> {
        let sql = "SELECT COUNT(*) FROM api_keys WHERE admin AND revoked_at IS NULL";
        let n: i64 = on_db!(self, |pool| sqlx::query_scalar(sql).fetch_one(pool).await?);
        Ok(n > 0)
    }

    // ---- sessions

    pub async fn insert_session(&self, s: &Session) -> Result<()> {
        let sql = self.sql(
            "INSERT INTO sessions (id, name, tenant, harness, kind, status, phase, failure_reason, \
             title, metadata, sandbox_id, endpoint, idle_timeout_s, idempotency_key, \
             request_hash, created_at, updated_at, last_active_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        );
        let result = on_db!(self, |pool| sqlx::query(&sql)
            .bind(&s.id)
            .bind(&s.name)
            .bind(&s.tenant)
            .bind(&s.harness)
            .bind(&s.kind)
            .bind(s.status.as_str())
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
            .execute(pool)
            .await
            .map(|_| ()));
        unique(result)
    }

    /// The one session matching `filter` (a `WHERE` clause with `?`s for `binds`), if any.
    async fn one_session(&self, filter: &str, binds: &[&str]) -> Result<Option<Session>> {
        let text = format!("SELECT * FROM sessions WHERE {filter}");
        let sql = self.sql(&text);
        Ok(on_db!(self, |pool| {
            let mut q = sqlx::query(&sql);
            for b in binds {
                q = q.bind(*b);
            }
            q.fetch_optional(pool).await?.map(|r| session_row!(&r))
        }))
    }

    /// A session of `tenant` (another tenant's session is simply not found).
    pub async fn get_session(&self, tenant: &str, id: &str) -> Result<Option<Session>> {
        self.one_session("id = ? AND tenant = ?", &[id, tenant])
            .await
    }

    pub async fn get_session_any(&self, id: &str) -> Result<Option<Session>> {
        self.one_session("id = ?", &[id]).await
    }

    pub async fn session_by_sandbox(&self, sandbox_id: &str) -> Result<Option<Session>> {
        self.one_session("sandbox_id = ?", &[sandbox_id]).await
    }

    pub async fn find_idempotent(&self, tenant: &str, key: &str) -> Result<Option<Session>> {
        self.one_session("tenant = ? AND idempotency_key = ?", &[tenant, key])
            .await
    }

    pub async fn list_sessions(&self, tenant: &str, f: &SessionFilter) -> Result<Vec<Session>> {
        // Newest first from no cursor: before every timestamp (`~` sorts after digits).
        let (after_ts, after_id) = match (&f.after, f.newest_first) {
            (Some(after), _) => after.clone(),
            (None, false) => Default::default(),
            (None, true) => ("~".to_string(), String::new()),
        };
        let order = if f.newest_first {
            "AND (created_at < ? OR (created_at = ? AND id < ?)) ORDER BY created_at DESC, id DESC"
        } else {
            "AND (created_at > ? OR (created_at = ? AND id > ?)) ORDER BY created_at, id"
        };
        let text = format!(
            "SELECT * FROM sessions WHERE tenant = ? \
             AND (? IS NULL OR status = ?) AND (? = 0 OR status <> 'deleted') \
             AND (? IS NULL OR harness = ?) {order} LIMIT ?"
        );
        let sql = self.sql(&text);
        Ok(on_db!(self, |pool| sqlx::query(&sql)
            .bind(tenant)
            .bind(&f.status)
            .bind(&f.status)
            .bind(i64::from(f.present))
            .bind(&f.harness)
            .bind(&f.harness)
            .bind(&after_ts)
            .bind(&after_ts)
            .bind(&after_id)
            .bind(f.limit)
            .fetch_all(pool)
            .await?
            .iter()
            .map(|r| session_row!(r))
            .collect()))
    }

    /// Sessions in any of `statuses`, across tenants (for supervision and reaping).
    pub async fn sessions_with_status(&self, statuses: &[SessionStatus]) -> Result<Vec<Session>> {
        let text = format!(
            "SELECT * FROM sessions WHERE status IN ({})",
            placeholders(statuses.len())
        );
        let sql = self.sql(&text);
        Ok(on_db!(self, |pool| {
            let mut q = sqlx::query(&sql);
            for s in statuses {
                q = q.bind(s.as_str());
            }
            q.fetch_all(pool)
                .await?
                .iter()
                .map(|r| session_row!(r))
                .collect()
        }))
    }

    /// Compare-and-set of the status: changes it only from one of `from`. Returns whether it did,
    /// so of several replicas seeing the same failure exactly one records it.
    pub async fn transition(
        &self,
        id: &str,
        from: &[SessionStatus],
        to: SessionStatus,
        failure_reason: Option<&str>,
    ) -> Result<bool> {
        let ts = now();
        let text = format!(
            "UPDATE sessions SET status = ?, failure_reason = COALESCE(?, failure_reason), \
             phase = ?, updated_at = ? WHERE id = ? AND status IN ({})",
            placeholders(from.len())
        );
        let sql = self.sql(&text);
        let changed = on_db!(self, |pool| {
            let mut q = sqlx::query(&sql)
                .bind(to.as_str())
                .bind(failure_reason)
                .bind(to.as_str())
                .bind(&ts)
                .bind(id);
            for f in from {
                q = q.bind(f.as_str());
            }
            q.execute(pool).await?.rows_affected()
        });
        Ok(changed == 1)
    }

    /// Runs a statement whose binds are all text, returning the rows it changed.
    async fn execute(&self, sql: &str, binds: &[Option<&str>]) -> Result<u64> {
        let sql = self.sql(sql);
        Ok(on_db!(self, |pool| {
            let mut q = sqlx::query(&sql);
            for b in binds {
                q = q.bind(*b);
            }
            q.execute(pool).await?.rows_affected()
        }))
    }

    /// Removes a session that never got past `creating` (its create request was refused).
    pub async fn forget_creating(&self, id: &str) -> Result<()> {
        self.execute(
            "DELETE FROM sessions WHERE id = ? AND status = 'creating'",
            &[Some(id)],
        )
        .await?;
        Ok(())
    }

    pub async fn set_sandbox(&self, id: &str, sandbox_id: &str, endpoint: &str) -> Result<()> {
        self.execute(
            "UPDATE sessions SET sandbox_id = ?, endpoint = ?, updated_at = ? WHERE id = ?",
            &[Some(sandbox_id), Some(endpoint), Some(&now()), Some(id)],
        )
        .await?;
        Ok(())
    }

    pub async fn touch(&self, id: &str) -> Result<()> {
        self.execute(
            "UPDATE sessions SET last_active_at = ? WHERE id = ?",
            &[Some(&now()), Some(id)],
        )
        .await?;
        Ok(())
    }

    // ---- turns and messages

    /// Records a new turn and the user's message (and the turn's webhook delivery, pending), and
    /// moves the session from `ready` to `running`, in one transaction, before the harness is
    /// dialled, announcing the change to other replicas (as `finish_turn` does). Returns the session as it now is, or `None`, changing nothing, when `tenant` has
    /// no such API session in `ready`. One round trip to the database: no read before it. The
    /// conditional update is the turn lock: of two replicas starting a turn at once, one wins.
    pub async fn begin_turn(
        &self,
        tenant: &str,
        turn: &Turn,
        user: &Message,
        delivery: Option<&Delivery>,
    ) -> Result<Option<Begun>> {
        let begin = Begin {
            tenant: tenant.to_string(),
            turn: turn.clone(),
            user: user.clone(),
            delivery: delivery.cloned(),
            replica: self.replica.to_string(),
        };
        if let Db::Postgres(pool) = &self.db {
            return Ok(postgres::begin(pool, &begin).await?);
        }
        let (tx, rx) = oneshot::channel();
        self.send(Write::Begin(Box::new(begin), tx)).await?;
        let session = rx
            .await
            .map_err(|_| StoreError::WriterGone)?
            .map_err(StoreError::Write)?;
        Ok(session.map(|session| Begun {
            session,
            last_seq: None,
        }))
    }

    /// Records that this replica is alive for `lease` more.
    pub async fn heartbeat(&self, lease: Duration) -> Result<()> {
        self.execute(
            "INSERT INTO replicas (id, alive_until) VALUES (?, ?) \
             ON CONFLICT (id) DO UPDATE SET alive_until = excluded.alive_until",
            &[Some(&self.replica), Some(&later(lease))],
        )
        .await?;
        Ok(())
    }

    /// Running turns of other replicas that stopped beating (crashed, or gone for good): nobody
    /// will end them but another replica.
    pub async fn orphaned_turns(&self) -> Result<Vec<Turn>> {
        let sql = self.sql(
            "SELECT t.* FROM turns t LEFT JOIN replicas r ON r.id = t.replica \
             WHERE t.status = 'running' AND t.replica IS NOT NULL AND t.replica <> ? \
             AND (r.id IS NULL OR r.alive_until < ?)",
        );
        Ok(on_db!(self, |pool| sqlx::query(&sql)
            .bind(&*self.replica)
            .bind(now())
            .fetch_all(pool)
            .await?
            .iter()
            .map(|r| turn_row!(r))
            .collect()))
    }

    /// Takes over a running turn (compare-and-set on its status, so of several replicas finding
    /// the same orphan one ends it). Returns whether this call did.
    pub async fn take_over_turn(&self, turn_id: &str) -> Result<bool> {
        let n = self
            .execute(
                "UPDATE turns SET replica = ? WHERE id = ? AND status = 'running' AND replica <> ?",
                &[Some(&self.replica), Some(turn_id), Some(&self.replica)],
            )
            .await?;
        Ok(n == 1)
    }

    /// The turn running on a session, if any (for a `409` that names it).
    pub async fn running_turn(&self, session_id: &str) -> Result<Option<String>> {
        let sql = self.sql(
            "SELECT id FROM turns WHERE session_id = ? AND status = 'running' \
             ORDER BY created_at DESC LIMIT 1",
        );
        Ok(on_db!(self, |pool| sqlx::query_scalar(&sql)
            .bind(session_id)
            .fetch_optional(pool)
            .await?))
    }

    /// Removes a turn the harness refused as the client's mistake (nothing ran), with its user
    /// message, and returns the session to `ready`, as if the message had never been accepted.
    pub async fn discard_turn(&self, session_id: &str, turn_id: &str) -> Result<()> {
        let messages = self.sql("DELETE FROM messages WHERE session_id = ? AND turn_id = ?");
        let deliveries =
            self.sql("DELETE FROM webhook_deliveries WHERE session_id = ? AND turn_id = ?");
        let turns = self.sql("DELETE FROM turns WHERE session_id = ? AND id = ?");
        let session = self.sql(
            "UPDATE sessions SET status = 'ready', phase = 'ready' WHERE id = ? AND status = 'running'",
        );
        on_db!(self, |pool| {
            let mut tx = pool.begin().await?;
            for sql in [&messages, &deliveries, &turns] {
                sqlx::query(sql)
                    .bind(session_id)
                    .bind(turn_id)
                    .execute(&mut *tx)
                    .await?;
            }
            sqlx::query(&session)
                .bind(session_id)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
        });
        Ok(())
    }

    /// Ends a turn with its outcome, the assistant's message when there is one, and the turn's
    /// last event (`done` or `error`) when given; a running session becomes `ready`. Committed by
    /// the event writer in one transaction with the events queued before it, so a turn that reads
    /// as ended always has its events, its last one included.
    pub async fn finish_turn(
        &self,
        turn: &Turn,
        reply: Option<&Message>,
        last: Option<&Event>,
    ) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.send(Write::Finish(
            Box::new((turn.clone(), reply.cloned(), last.cloned())),
            tx,
        ))
        .await?;
        rx.await
            .map_err(|_| StoreError::WriterGone)?
            .map_err(StoreError::Write)
    }

    pub async fn get_turn(&self, session_id: &str, turn_id: &str) -> Result<Option<Turn>> {
        let sql = self.sql("SELECT * FROM turns WHERE id = ? AND session_id = ?");
        Ok(on_db!(self, |pool| sqlx::query(&sql)
            .bind(turn_id)
            .bind(session_id)
            .fetch_optional(pool)
            .await?
            .map(|r| turn_row!(&r))))
    }

    /// How many messages each of the tenant's sessions of `harness` not deleted holds (sessions
    /// without any are absent).
    pub async fn message_counts(
        &self,
        tenant: &str,
        harness: &str,
    ) -> Result<std::collections::HashMap<String, i64>> {
        let sql = self.sql(
            "SELECT m.session_id, CAST(COUNT(*) AS BIGINT) FROM messages m \
             JOIN sessions s ON s.id = m.session_id \
             WHERE s.tenant = ? AND s.harness = ? AND s.status <> 'deleted' \
             GROUP BY m.session_id",
        );
        let rows: Vec<(String, i64)> = on_db!(self, |pool| sqlx::query_as(&sql)
            .bind(tenant)
            .bind(harness)
            .fetch_all(pool)
            .await?);
        Ok(rows.into_iter().collect())
    }

    /// The session's newest turn, with its text (`None` before its first).
    pub async fn last_turn(&self, session_id: &str) -> Result<Option<Turn>> {
        let sql = self.sql(
            "SELECT * FROM turns WHERE session_id = ? ORDER BY created_at DESC, id DESC LIMIT 1",
        );
        Ok(on_db!(self, |pool| sqlx::query(&sql)
            .bind(session_id)
            .fetch_optional(pool)
            .await?
            .map(|r| turn_row!(&r))))
    }

    /// A page of a session's turns, oldest first: those created after `after` (`created_at`,
    /// `id`), at most `limit`, without their text (a turn's text may be as large as its answer;
    /// `get_turn` reads it).
    pub async fn list_turns(
        &self,
        session_id: &str,
        after: Option<(String, String)>,
        limit: i64,
    ) -> Result<Vec<Turn>> {
        let (after_ts, after_id) = after.unwrap_or_default();
        let sql = self.sql(
            "SELECT id, session_id, status, mode, options, CAST(NULL AS TEXT) AS text, usage, \
             error, created_at, finished_at, stop_reason FROM turns WHERE session_id = ? \
             AND (created_at > ? OR (created_at = ? AND id > ?)) \
             ORDER BY created_at, id LIMIT ?",
        );
        Ok(on_db!(self, |pool| sqlx::query(&sql)
            .bind(session_id)
            .bind(&after_ts)
            .bind(&after_ts)
            .bind(&after_id)
            .bind(limit)
            .fetch_all(pool)
            .await?
            .iter()
            .map(|r| turn_row!(r))
            .collect()))
    }

    /// Turns this replica was running when it stopped (other replicas' turns are theirs).
    pub async fn running_turns(&self) -> Result<Vec<Turn>> {
        let sql = self.sql(
            "SELECT * FROM turns WHERE status = 'running' AND (replica = ? OR replica IS NULL)",
        );
        Ok(on_db!(self, |pool| sqlx::query(&sql)
            .bind(&*self.replica)
            .fetch_all(pool)
            .await?
            .iter()
            .map(|r| turn_row!(r))
            .collect()))
    }

    pub async fn list_messages(
        &self,
        session_id: &str,
        turn_id: Option<&str>,
    ) -> Result<Vec<Message>> {
        let sql = self.sql(
            "SELECT * FROM messages WHERE session_id = ? AND (? IS NULL OR turn_id = ?) ORDER BY seq",
        );
        Ok(on_db!(self, |pool| sqlx::query(&sql)
            .bind(session_id)
            .bind(turn_id)
            .bind(turn_id)
            .fetch_all(pool)
            .await?
            .iter()
            .map(|r| message_row!(r))
            .collect()))
    }

    /// Where one page of a session's history ends: from `from` on, at most `limit` messages and
    /// no more than `max_bytes` of text, parts and metadata together, but always at least one.
    /// `None` when no message lies that way. Read the page with `messages_through` over
    /// `from.span(cut.last)`.
    pub async fn message_cut(
        &self,
        session_id: &str,
        from: HistoryFrom,
        limit: i64,
        max_bytes: i64,
    ) -> Result<Option<PageCut>> {
        let (bound, way) = match from {
            HistoryFrom::After(after) => (after, "seq > ? ORDER BY seq"),
            HistoryFrom::Before(before) => (before, "seq < ? ORDER BY seq DESC"),
        };
        let text = format!(
            "SELECT seq, CAST(LENGTH(text) + LENGTH(parts) + LENGTH(metadata) AS BIGINT) \
             FROM messages WHERE session_id = ? AND {way} LIMIT ?"
        );
        let sizes = self.sql(&text);
        let rows: Vec<(i64, i64)> = on_db!(self, |pool| sqlx::query_as(&sizes)
            .bind(session_id)
            .bind(bound)
            .bind(limit + 1)
            .fetch_all(pool)
            .await?);
        Ok(PageCut::of(&rows, limit, max_bytes))
    }

    /// The messages after `after` up to and including `last`, oldest first.
    pub async fn messages_through(
        &self,
        session_id: &str,
        after: i64,
        last: i64,
    ) -> Result<Vec<Message>> {
        let page = self.sql(
            "SELECT * FROM messages WHERE session_id = ? AND seq > ? AND seq <= ? ORDER BY seq",
        );
        Ok(on_db!(self, |pool| sqlx::query(&page)
            .bind(session_id)
            .bind(after)
            .bind(last)
            .fetch_all(pool)
            .await?
            .iter()
            .map(|r| message_row!(r))
            .collect()))
    }

    // ---- events

    /// Hands a turn's start or end to the writer: committed here and now when the SQLite
    /// writer is idle, else queued for its thread.
    async fn send(&self, w: Write) -> Result<()> {
        let w = match &self.inline {
            Some(writer) => match writer.try_inline(w, &self.writer) {
                Ok(()) => return Ok(()),
                Err(w) => w,
            },
            None => w,
        };
        self.writer
            .send_async(w)
            .await
            .map_err(|_| StoreError::WriterGone)
    }

    /// Queues events for the batching writer; `flush` waits until everything queued is durable.
    pub async fn append_events(&self, events: Vec<Event>) -> Result<()> {
        let events = match &self.inline {
            None => events,
            Some(writer) => match writer.queued.push(events) {
                Queued::Behind => return Ok(()),
                // An empty write wakes the writer, which takes the queue with its batch.
                Queued::First => Vec::new(),
                Queued::Full(events) => events,
            },
        };
        self.writer
            .send_async(Write::Events(events))
            .await
            .map_err(|_| StoreError::WriterGone)
    }

    pub async fn flush(&self) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.writer
            .send_async(Write::Flush(tx))
            .await
            .map_err(|_| StoreError::WriterGone)?;
        rx.await
            .map_err(|_| StoreError::WriterGone)?
            .map_err(StoreError::Write)
    }

    pub async fn last_seq(&self, session_id: &str) -> Result<i64> {
        let sql = self.sql("SELECT MAX(seq) FROM events WHERE session_id = ?");
        let seq: Option<i64> = on_db!(self, |pool| sqlx::query_scalar(&sql)
            .bind(session_id)
            .fetch_one(pool)
            .await?);
        Ok(seq.unwrap_or(0))
    }

    pub async fn list_events(
        &self,
        session_id: &str,
        since: i64,
        limit: i64,
    ) -> Result<Vec<Event>> {
        let sql =
            self.sql("SELECT * FROM events WHERE session_id = ? AND seq > ? ORDER BY seq LIMIT ?");
        Ok(on_db!(self, |pool| sqlx::query(&sql)
            .bind(session_id)
            .bind(since)
            .bind(limit)
            .fetch_all(pool)
            .await?
            .iter()
            .map(|r| event_row!(r))
            .collect()))
    }

    /// Where one page of a session's events ends: the events after `since`, at most `limit`
    /// and no more than `max_bytes` of data together, but always at least one. Read the page
    /// with `events_through`.
    pub async fn event_cut(
        &self,
        session_id: &str,
        since: i64,
        limit: i64,
        max_bytes: i64,
    ) -> Result<Option<PageCut>> {
        let sizes = self.sql(
            "SELECT seq, CAST(LENGTH(data) AS BIGINT) FROM events \
             WHERE session_id = ? AND seq > ? ORDER BY seq LIMIT ?",
        );
        let rows: Vec<(i64, i64)> = on_db!(self, |pool| sqlx::query_as(&sizes)
            .bind(session_id)
            .bind(since)
            .bind(limit + 1)
            .fetch_all(pool)
            .await?);
        Ok(PageCut::of(&rows, limit, max_bytes))
    }

    /// The events after `since` up to and including `last`, in order.
    pub async fn events_through(
        &self,
        session_id: &str,
        since: i64,
        last: i64,
    ) -> Result<Vec<Event>> {
        let sql = self
            .sql("SELECT * FROM events WHERE session_id = ? AND seq > ? AND seq <= ? ORDER BY seq");
        Ok(on_db!(self, |pool| sqlx::query(&sql)
            .bind(session_id)
            .bind(since)
            .bind(last)
            .fetch_all(pool)
            .await?
            .iter()
            .map(|r| event_row!(r))
            .collect()))
    }

    // ---- objects of the vendor-compatible APIs

    /// Stores one version of a vendor object; `Conflict` when that version exists (two updates
    /// raced: the loser retries on the newer version).
    pub async fn put_object(&self, o: &VendorObject) -> Result<()> {
        let sql = self.sql(
            "INSERT INTO vendor_objects (tenant, kind, id, version, body, created_at, archived_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?)",
        );
        let result = on_db!(self, |pool| sqlx::query(&sql)
            .bind(&o.tenant)
            .bind(&o.kind)
            .bind(&o.id)
            .bind(o.version)
            .bind(o.body.to_string())
            .bind(&o.created_at)
            .bind(&o.archived_at)
            .execute(pool)
            .await
            .map(|_| ()));
        unique(result)
    }

    /// Replaces the body (and `archived_at`) of the stored version `o.version` of an object.
    pub async fn update_object(&self, o: &VendorObject) -> Result<()> {
        let sql = self.sql(
            "UPDATE vendor_objects SET body = ?, archived_at = ? \
             WHERE tenant = ? AND kind = ? AND id = ? AND version = ?",
        );
        on_db!(self, |pool| sqlx::query(&sql)
            .bind(o.body.to_string())
            .bind(&o.archived_at)
            .bind(&o.tenant)
            .bind(&o.kind)
            .bind(&o.id)
            .bind(o.version)
            .execute(pool)
            .await?
            .rows_affected());
        Ok(())
    }

    /// An object of `tenant`: its newest version, or `version`.
    pub async fn get_object(
        &self,
        tenant: &str,
        kind: &str,
        id: &str,
        version: Option<i64>,
    ) -> Result<Option<VendorObject>> {
        let sql = self.sql(
            "SELECT tenant, kind, id, version, body, created_at, archived_at FROM vendor_objects \
             WHERE tenant = ? AND kind = ? AND id = ? AND (? IS NULL OR version = ?) \
             ORDER BY version DESC LIMIT 1",
        );
        let row: Option<ObjectRow> = on_db!(self, |pool| sqlx::query_as(&sql)
            .bind(tenant)
            .bind(kind)
            .bind(id)
            .bind(version)
            .bind(version)
            .fetch_optional(pool)
            .await?);
        Ok(row.map(VendorObject::from))
    }

    /// Every version of an object, oldest first, at most `limit` after version `after`.
    pub async fn object_versions(
        &self,
        tenant: &str,
        kind: &str,
        id: &str,
        after: i64,
        limit: i64,
    ) -> Result<Vec<VendorObject>> {
        let sql = self.sql(
            "SELECT tenant, kind, id, version, body, created_at, archived_at FROM vendor_objects \
             WHERE tenant = ? AND kind = ? AND id = ? AND version > ? ORDER BY version LIMIT ?",
        );
        let rows: Vec<ObjectRow> = on_db!(self, |pool| sqlx::query_as(&sql)
            .bind(tenant)
            .bind(kind)
            .bind(id)
            .bind(after)
            .bind(limit)
            .fetch_all(pool)
            .await?);
        Ok(rows.into_iter().map(VendorObject::from).collect())
    }

    /// A page of a tenant's objects of one kind (the newest version of each), by creation:
    /// oldest first after `after` (`created_at`, `id`), or newest first before it when `desc`.
    pub async fn list_objects(
        &self,
        tenant: &str,
        kind: &str,
        after: Option<(String, String)>,
        desc: bool,
        include_archived: bool,
        limit: i64,
    ) -> Result<Vec<VendorObject>> {
        let (order, cmp, start) = if desc {
            ("DESC", "<", "~")
        } else {
            ("", ">", "")
        };
        let (after_ts, after_id) = after.unwrap_or_else(|| (start.to_string(), String::new()));
        let text = format!(
            "SELECT tenant, kind, id, version, body, created_at, archived_at FROM vendor_objects v \
             WHERE tenant = ? AND kind = ? AND (? OR archived_at IS NULL) \
             AND version = (SELECT MAX(version) FROM vendor_objects w \
                 WHERE w.tenant = v.tenant AND w.kind = v.kind AND w.id = v.id) \
             AND (created_at {cmp} ? OR (created_at = ? AND id {cmp} ?)) \
             ORDER BY created_at {order}, id {order} LIMIT ?"
        );
        let sql = self.sql(&text);
        let rows: Vec<ObjectRow> = on_db!(self, |pool| sqlx::query_as(&sql)
            .bind(tenant)
            .bind(kind)
            .bind(include_archived)
            .bind(&after_ts)
            .bind(&after_ts)
            .bind(&after_id)
            .bind(limit)
            .fetch_all(pool)
            .await?);
        Ok(rows.into_iter().map(VendorObject::from).collect())
    }

    /// How many objects of one kind a tenant keeps (each counted once, whatever its versions).
    pub async fn count_objects(&self, tenant: &str, kind: &str) -> Result<i64> {
        self.of_objects(
            "SELECT COUNT(*) FROM vendor_objects WHERE tenant = ? AND kind = ? AND version = 1",
            tenant,
            kind,
        )
        .await
    }

    /// How many bytes of JSON a tenant's objects of one kind take, every version counted.
    pub async fn object_bytes(&self, tenant: &str, kind: &str) -> Result<i64> {
        self.of_objects(
            "SELECT COALESCE(SUM(LENGTH(body)), 0) FROM vendor_objects WHERE tenant = ? AND kind = ?",
            tenant,
            kind,
        )
        .await
    }

    /// One number about a tenant's objects of one kind: `query` takes the tenant and the kind.
    async fn of_objects(&self, query: &str, tenant: &str, kind: &str) -> Result<i64> {
        let sql = self.sql(query);
        let n: i64 = on_db!(self, |pool| sqlx::query_scalar(&sql)
            .bind(tenant)
            .bind(kind)
            .fetch_one(pool)
            .await?);
        Ok(n)
    }

    /// Deletes every version of an object; whether there was one.
    pub async fn delete_object(&self, tenant: &str, kind: &str, id: &str) -> Result<bool> {
        let sql = self.sql("DELETE FROM vendor_objects WHERE tenant = ? AND kind = ? AND id = ?");
        let n = on_db!(self, |pool| sqlx::query(&sql)
            .bind(tenant)
            .bind(kind)
            .bind(id)
            .execute(pool)
            .await?
            .rows_affected());
        Ok(n > 0)
    }

    /// The `seq` of a turn's first event, if it has one yet.
    pub async fn turn_first_seq(&self, session_id: &str, turn_id: &str) -> Result<Option<i64>> {
        let sql = self.sql("SELECT MIN(seq) FROM events WHERE session_id = ? AND turn_id = ?");
        let first: Option<i64> = on_db!(self, |pool| sqlx::query_scalar(&sql)
            .bind(session_id)
            .bind(turn_id)
            .fetch_one(pool)
            .await?);
        Ok(first)
    }

    // ---- webhook deliveries

    /// Inserts or updates a delivery; the body, once set, is kept, and so is its claim.
    pub async fn upsert_delivery(&self, d: &Delivery) -> Result<()> {
        let sql = self.sql(
            "INSERT INTO webhook_deliveries (id, turn_id, session_id, url, status, attempts, last_status, \
             last_error, created_at, updated_at, include_messages, sealed_token, body, shape) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
             ON CONFLICT (id) DO UPDATE SET status = excluded.status, attempts = excluded.attempts, \
             last_status = excluded.last_status, last_error = excluded.last_error, \
             updated_at = excluded.updated_at, sealed_token = excluded.sealed_token, \
             body = COALESCE(webhook_deliveries.body, excluded.body)",
        );
        on_db!(self, |pool| sqlx::query(&sql)
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
            .bind(&d.shape)
            .execute(pool)
            .await?
            .rows_affected());
        Ok(())
    }

    pub async fn deliveries(&self, turn_id: &str) -> Result<Vec<Delivery>> {
        let sql =
            self.sql("SELECT * FROM webhook_deliveries WHERE turn_id = ? ORDER BY created_at");
        Ok(on_db!(self, |pool| sqlx::query_as(&sql)
            .bind(turn_id)
            .fetch_all(pool)
            .await?))
    }

    /// Claims pending deliveries whose turn has ended and that no replica holds (never claimed,
    /// or its lease ran out; with `mine`, also those this replica held before a restart), for
    /// `lease`. With PostgreSQL, `FOR UPDATE SKIP LOCKED`: replicas claiming at once take
    /// different rows.
    pub async fn claim_deliveries(&self, lease: Duration, mine: bool) -> Result<Vec<Delivery>> {
        let lock = match self.db {
            Db::Sqlite(_) => "",
            Db::Postgres(_) => "FOR UPDATE OF d SKIP LOCKED",
        };
        let text = format!(
            "UPDATE webhook_deliveries SET claimed_by = ?, claimed_until = ? WHERE id IN (\
             SELECT d.id FROM webhook_deliveries d JOIN turns t ON t.id = d.turn_id \
             WHERE d.status = 'pending' AND t.status <> 'running' \
             AND (d.claimed_until IS NULL OR d.claimed_until < ? OR (? AND d.claimed_by = ?)) \
             ORDER BY d.created_at LIMIT 100 {lock}) RETURNING *"
        );
        let sql = self.sql(&text);
        let ts = now();
        Ok(on_db!(self, |pool| sqlx::query_as(&sql)
            .bind(&*self.replica)
            .bind(later(lease))
            .bind(&ts)
            .bind(mine)
            .bind(&*self.replica)
            .fetch_all(pool)
            .await?))
    }

    /// Claims (or renews this replica's claim on) one pending delivery for `lease`. False when
    /// another replica holds it or it ended: then this replica must not deliver it.
    pub async fn claim_delivery(&self, id: &str, lease: Duration) -> Result<bool> {
        let until = later(lease);
        let n = self
            .execute(
                "UPDATE webhook_deliveries SET claimed_by = ?, claimed_until = ? \
                 WHERE id = ? AND status = 'pending' \
                 AND (claimed_by = ? OR claimed_until IS NULL OR claimed_until < ?)",
                &[
                    Some(&self.replica),
                    Some(&until),
                    Some(id),
                    Some(&self.replica),
                    Some(&now()),
                ],
            )
            .await?;
        Ok(n == 1)
    }

    // ---- sandboxes

    /// Records a sandbox this replica started.
    pub async fn insert_sandbox(&self, s: &SandboxRow) -> Result<()> {
        let sql = self.sql(
            "INSERT INTO sandboxes (id, template, endpoint, pid, session_id, created_at, owner) \
             VALUES (?, ?, ?, ?, ?, ?, ?)",
        );
        on_db!(self, |pool| sqlx::query(&sql)
            .bind(&s.id)
            .bind(&s.template)
            .bind(&s.endpoint)
            .bind(s.pid)
            .bind(&s.session_id)
            .bind(now())
            .bind(s.owner.as_deref().unwrap_or(&self.replica))
            .execute(pool)
            .await?
            .rows_affected());
        Ok(())
    }

    pub async fn claim_sandbox(&self, sandbox_id: &str, session_id: &str) -> Result<bool> {
        let n = self
            .execute(
                "UPDATE sandboxes SET session_id = ? WHERE id = ? AND session_id IS NULL",
                &[Some(session_id), Some(sandbox_id)],
            )
            .await?;
        Ok(n == 1)
    }

    pub async fn delete_sandbox(&self, sandbox_id: &str) -> Result<()> {
        self.execute("DELETE FROM sandboxes WHERE id = ?", &[Some(sandbox_id)])
            .await?;
        Ok(())
    }

    pub async fn get_sandbox(&self, id: &str) -> Result<Option<SandboxRow>> {
        let sql = self.sql(
            "SELECT id, template, endpoint, pid, session_id, owner FROM sandboxes WHERE id = ?",
        );
        Ok(on_db!(self, |pool| sqlx::query_as(&sql)
            .bind(id)
            .fetch_optional(pool)
            .await?))
    }

    /// Every replica's sandboxes (see `SandboxRow::owner` for whose they are).
    pub async fn list_sandboxes(&self) -> Result<Vec<SandboxRow>> {
        let sql = "SELECT id, template, endpoint, pid, session_id, owner FROM sandboxes ORDER BY created_at";
        Ok(on_db!(self, |pool| sqlx::query_as(sql)
            .fetch_all(pool)
            .await?))
    }

    /// Test and benchmark support: creates an empty database with a random name on the
    /// PostgreSQL server at `base` and returns its URL, so each test has its own.
    pub async fn scratch_database(base: &str) -> Result<String> {
        let mut url = url::Url::parse(base).map_err(|_| StoreError::Location(redact(base)))?;
        let name = format!("sw_{}", uuid::Uuid::new_v4().simple());
        let admin = PgPool::connect(base)
            .await
            .map_err(|source| StoreError::Open {
                path: redact(base),
                source,
            })?;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&admin)
            .await?;
        admin.close().await;
        url.set_path(&name);
        Ok(url.to_string())
    }

    /// Whether this replica manages the sandbox: it started it, or the sandbox is shared (a
    /// Kubernetes Sandbox, which every replica reaches and watches). Rows from before replicas
    /// count as its own.
    pub fn owns(&self, row: &SandboxRow) -> bool {
        row.owner
            .as_deref()
            .is_none_or(|o| o == &*self.replica || o == SHARED_OWNER)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn session(id: &str, kind: &str) -> Session {
        let ts = now();
        Session {
            id: id.into(),
            name: None,
            tenant: "t1".into(),
            harness: "echo".into(),
            kind: kind.into(),
            status: SessionStatus::Ready,
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
            status: TurnStatus::Running,
            mode: "sync".into(),
            options: json!({}),
            text: None,
            usage: None,
            error: None,
            created_at: ts.clone(),
            finished_at: None,
            stop_reason: None,
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

    /// The PostgreSQL server the tests may use (`SANDWARDEN_TEST_POSTGRES`); `None` (the test
    /// skips, saying so) when unset, unless `SANDWARDEN_REQUIRE_POSTGRES=1`.
    fn postgres_server() -> Option<String> {
        match std::env::var("SANDWARDEN_TEST_POSTGRES") {
            Ok(url) if !url.is_empty() => Some(url),
            _ => {
                assert!(
                    std::env::var("SANDWARDEN_REQUIRE_POSTGRES").as_deref() != Ok("1"),
                    "SANDWARDEN_REQUIRE_POSTGRES=1 but SANDWARDEN_TEST_POSTGRES is unset (scripts/start-postgres)"
                );
                eprintln!(
                    "SKIPPED: SANDWARDEN_TEST_POSTGRES is unset (run scripts/start-postgres)"
                );
                None
            }
        }
    }

    fn replica(name: &str) -> Options {
        Options {
            replica: name.into(),
            ..Options::default()
        }
    }

    async fn seeded(store: Store) -> Store {
        for (id, kind) in [("s1", "api"), ("s2", "api"), ("s3", "api"), ("tui", "tui")] {
            store
                .insert_session(&session(id, kind))
                .await
                .expect("insert");
        }
        store
    }

    /// A fresh PostgreSQL database and two stores on it, as two replicas would have.
    async fn postgres_pair() -> Option<(Store, Store)> {
        let url = Store::scratch_database(&postgres_server()?)
            .await
            .expect("scratch database");
        let location = Location::Postgres(url);
        let (ra, rb) = (replica("ra"), replica("rb"));
        let (a, b) = tokio::join!(
            Store::connect(&location, &ra),
            Store::connect(&location, &rb)
        );
        Some((seeded(a.expect("replica a")).await, b.expect("replica b")))
    }

    /// Runs a store test against SQLite (`NAME::sqlite`) and PostgreSQL (`NAME::postgres`).
    macro_rules! on_both_backends {
        ($name:ident) => {
            mod $name {
                use super::*;

                #[tokio::test]
                async fn sqlite() {
                    let dir = tempfile::tempdir().expect("tempdir");
                    let store = Store::open(dir.path()).await.expect("open");
                    super::$name(seeded(store).await).await;
                }

                #[tokio::test]
                async fn postgres() {
                    if let Some((store, _other)) = postgres_pair().await {
                        super::$name(store).await;
                    }
                }
            }
        };
    }

    on_both_backends!(a_turn_begins_only_on_a_ready_api_session_of_the_tenant);
    on_both_backends!(a_failing_write_fails_alone_when_batched_with_others);
    on_both_backends!(a_status_changes_once_when_raced);
    on_both_backends!(events_are_stored_in_order_and_listed_after_a_seq);
    on_both_backends!(history_pages_stop_at_the_count_or_the_size);
    on_both_backends!(a_turns_usage_is_counted_once_for_its_tenant);
    on_both_backends!(the_secret_fingerprint_is_kept_until_replaced);
    on_both_backends!(a_delivery_is_claimed_once_until_its_lease_runs_out);

    async fn a_turn_begins_only_on_a_ready_api_session_of_the_tenant(store: Store) {
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
        let begun = begun.expect("began");
        assert_eq!(begun.session.status, SessionStatus::Running);
        if store.is_shared() {
            assert_eq!(begun.last_seq, Some(0));
        }
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
        done.status = TurnStatus::Completed;
        done.finished_at = Some(now());
        store.finish_turn(&done, None, None).await.expect("finish");
        let s = store
            .get_session("t1", "s1")
            .await
            .expect("get")
            .expect("session");
        assert_eq!(s.status, SessionStatus::Ready);
        assert!(
            store
                .begin_turn("t1", &t2, &m2, None)
                .await
                .expect("begin")
                .is_some()
        );
    }

    async fn a_failing_write_fails_alone_when_batched_with_others(store: Store) {
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
        assert_eq!(
            second.expect("good start").map(|b| b.session.id),
            Some("s2".into())
        );
        assert!(store.get_turn("s2", "fresh").await.expect("get").is_some());
        let s3 = store
            .get_session("t1", "s3")
            .await
            .expect("get")
            .expect("s3");
        assert_eq!(
            s3.status,
            SessionStatus::Ready,
            "the failed start was rolled back"
        );
    }

    async fn a_status_changes_once_when_raced(store: Store) {
        let live = [SessionStatus::Ready, SessionStatus::Running];
        let (a, b) = tokio::join!(
            store.transition("s1", &live, SessionStatus::Dead, Some("one")),
            store.transition("s1", &live, SessionStatus::Dead, Some("two")),
        );
        assert!(
            a.expect("first") ^ b.expect("second"),
            "exactly one transition"
        );
        let s = store.get_session_any("s1").await.expect("get").expect("s1");
        assert_eq!(s.status, SessionStatus::Dead);
    }

    /// One page of the history as the API reads it: cut by count and size, then read.
    async fn read_page(
        store: &Store,
        session_id: &str,
        from: HistoryFrom,
        limit: i64,
        max_bytes: i64,
    ) -> Result<(Vec<Message>, Option<i64>)> {
        let Some(cut) = store
            .message_cut(session_id, from, limit, max_bytes)
            .await?
        else {
            return Ok((Vec::new(), None));
        };
        let (after, last) = from.span(cut.last);
        let messages = store.messages_through(session_id, after, last).await?;
        Ok((messages, cut.next()))
    }

    async fn history_pages_stop_at_the_count_or_the_size(store: Store) {
        for i in 0..5 {
            let (mut t, mut user) = turn("s1", &format!("page-{i}"));
            user.text = if i == 2 {
                "y".repeat(1000)
            } else {
                format!("m{i}")
            };
            store
                .begin_turn("t1", &t, &user, None)
                .await
                .expect("begin");
            t.status = TurnStatus::Completed;
            t.stop_reason = Some(format!("reason-{i}"));
            store.finish_turn(&t, None, None).await.expect("finish");
        }
        let texts = |page: &[Message]| page.iter().map(|m| m.text.len()).collect::<Vec<_>>();
        let firsts = |page: &[Message]| page.iter().map(|m| m.text.clone()).collect::<Vec<_>>();
        let (page, next) = read_page(&store, "s1", HistoryFrom::After(0), 2, 1 << 20)
            .await
            .expect("page");
        assert_eq!(firsts(&page), ["m0", "m1"]);
        let next = next.expect("more follow");
        // By size: the long message is alone on its page (but a page is never empty).
        let (page, next) = read_page(&store, "s1", HistoryFrom::After(next), 10, 500)
            .await
            .expect("page");
        assert_eq!(texts(&page), [1000]);
        let (page, next) = read_page(
            &store,
            "s1",
            HistoryFrom::After(next.expect("more")),
            10,
            500,
        )
        .await
        .expect("page");
        assert_eq!(
            (firsts(&page), next),
            (vec!["m3".to_string(), "m4".into()], None)
        );
        // From the newest end back: each page in order, cut the same way.
        let (page, next) = read_page(&store, "s1", HistoryFrom::Before(i64::MAX), 2, 1 << 20)
            .await
            .expect("page");
        assert_eq!(firsts(&page), ["m3", "m4"]);
        let (page, next) = read_page(
            &store,
            "s1",
            HistoryFrom::Before(next.expect("more")),
            10,
            500,
        )
        .await
        .expect("page");
        assert_eq!(texts(&page), [1000]);
        let (page, next) = read_page(
            &store,
            "s1",
            HistoryFrom::Before(next.expect("more")),
            10,
            500,
        )
        .await
        .expect("page");
        assert_eq!(
            (firsts(&page), next),
            (vec!["m0".to_string(), "m1".into()], None)
        );
        let t = store
            .get_turn("s1", "page-4")
            .await
            .expect("get")
            .expect("turn");
        assert_eq!(t.stop_reason.as_deref(), Some("reason-4"));
    }

    async fn a_turns_usage_is_counted_once_for_its_tenant(store: Store) {
        let (mut t, user) = turn("s2", "used-1");
        store
            .begin_turn("t1", &t, &user, None)
            .await
            .expect("begin")
            .expect("began");
        t.status = TurnStatus::Completed;
        t.usage = Some(json!({"input_tokens": 3, "output_tokens": 4, "total_tokens": 7}));
        t.finished_at = Some(now());
        store.finish_turn(&t, None, None).await.expect("finish");
        // A retried end (after an unknown outcome) adds nothing.
        store.finish_turn(&t, None, None).await.expect("again");
        let used = store.tenant_usage("t1").await.expect("usage");
        assert_eq!(
            (used.input_tokens, used.output_tokens, used.turns),
            (3, 4, 1)
        );
        assert_eq!(store.tenant_usage("nobody").await.expect("none").turns, 0);
        let rows = store.usage(None, "2000-01-01").await.expect("rows");
        let s2 = rows
            .iter()
            .find(|u| u.session_id.as_deref() == Some("s2"))
            .expect("s2's usage");
        assert_eq!((s2.turns, s2.input_tokens), (1, 3));
        // Every live session has run its sandbox for some time; only s2 took a turn.
        assert_eq!(rows.len(), 4, "{rows:?}");
        assert!(rows.iter().all(|u| u.sandbox_seconds > 0.0), "{rows:?}");
        assert!(
            store
                .usage(Some("t1"), "2999-01-01")
                .await
                .expect("later")
                .is_empty()
        );
    }

    async fn the_secret_fingerprint_is_kept_until_replaced(store: Store) {
        assert_eq!(
            store
                .check_secret_fingerprint("aaa", false)
                .await
                .expect("first"),
            None
        );
        assert_eq!(
            store
                .check_secret_fingerprint("aaa", false)
                .await
                .expect("same"),
            None
        );
        assert_eq!(
            store
                .check_secret_fingerprint("bbb", false)
                .await
                .expect("other"),
            Some("aaa".to_string())
        );
        assert_eq!(
            store
                .check_secret_fingerprint("bbb", true)
                .await
                .expect("replace"),
            None
        );
        assert_eq!(
            store
                .check_secret_fingerprint("aaa", false)
                .await
                .expect("old"),
            Some("bbb".to_string())
        );
    }

    async fn events_are_stored_in_order_and_listed_after_a_seq(store: Store) {
        let events: Vec<Event> = (1..=300)
            .map(|seq| Event {
                id: seq.to_string(),
                seq,
                session_id: "s2".into(),
                turn_id: Some("t".into()),
                kind: "text".into(),
                ts: now(),
                data: json!({ "n": seq }),
            })
            .collect();
        store
            .append_events(events[..150].to_vec())
            .await
            .expect("append");
        // Again, overlapping: a retried write stores nothing twice.
        store
            .append_events(events[100..].to_vec())
            .await
            .expect("append");
        store.flush().await.expect("flush");
        assert_eq!(store.last_seq("s2").await.expect("last"), 300);
        let after = store.list_events("s2", 250, 10).await.expect("list");
        let seqs: Vec<i64> = after.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, (251..=260).collect::<Vec<_>>());
        assert_eq!(after[0].data, json!({ "n": 251 }));
    }

    async fn a_delivery_is_claimed_once_until_its_lease_runs_out(store: Store) {
        let (t, m) = turn("s1", "hooked");
        let d = Delivery {
            id: "whd_1".into(),
            turn_id: "hooked".into(),
            session_id: "s1".into(),
            url: "https://example.com/hook".into(),
            status: "pending".into(),
            attempts: 0,
            last_status: None,
            last_error: None,
            created_at: now(),
            updated_at: now(),
            include_messages: false,
            shape: None,
            sealed_token: Some("sealed".into()),
            body: None,
        };
        store
            .begin_turn("t1", &t, &m, Some(&d))
            .await
            .expect("begin")
            .expect("began");
        let lease = Duration::from_secs(60);
        assert!(
            store
                .claim_deliveries(lease, true)
                .await
                .expect("claim")
                .is_empty(),
            "not while its turn runs"
        );
        let mut done = t.clone();
        done.status = TurnStatus::Completed;
        done.finished_at = Some(now());
        store.finish_turn(&done, None, None).await.expect("finish");
        let claimed = store.claim_deliveries(lease, false).await.expect("claim");
        assert_eq!(claimed.len(), 1);
        assert_eq!(claimed[0].sealed_token.as_deref(), Some("sealed"));
        assert!(
            store
                .claim_deliveries(lease, false)
                .await
                .expect("claim")
                .is_empty(),
            "claimed once"
        );
        assert!(store.claim_delivery("whd_1", lease).await.expect("renew"));
        // A lease that already ran out is free for anyone.
        assert!(
            store
                .claim_deliveries(Duration::ZERO, true)
                .await
                .expect("claim")
                .len()
                == 1
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(
            store
                .claim_deliveries(lease, false)
                .await
                .expect("claim")
                .len(),
            1,
            "taken over after the lease"
        );
    }

    #[tokio::test]
    async fn replicas_share_one_turn_lock_and_claim_deliveries_apart() {
        let Some((a, b)) = postgres_pair().await else {
            return;
        };
        let (ta, ma) = turn("s1", "turn-a");
        let (tb, mb) = turn("s1", "turn-b");
        let (ra, rb) = tokio::join!(
            a.begin_turn("t1", &ta, &ma, None),
            b.begin_turn("t1", &tb, &mb, None)
        );
        let won = [ra.expect("a"), rb.expect("b")]
            .iter()
            .filter(|r| r.is_some())
            .count();
        assert_eq!(won, 1, "one turn at a time across replicas");
        let running = b
            .running_turn("s1")
            .await
            .expect("running")
            .expect("a turn");
        assert!(running == "turn-a" || running == "turn-b");
        // Only the replica that ran a turn recovers it.
        let theirs = a.running_turns().await.expect("a's").len()
            + b.running_turns().await.expect("b's").len();
        assert_eq!(theirs, 1);
    }

    #[tokio::test]
    async fn events_committed_by_one_replica_are_announced_to_the_other() {
        let Some((a, b)) = postgres_pair().await else {
            return;
        };
        let mut notices = b.notices().expect("a shared store relays notices");
        let event = |seq: i64| Event {
            id: seq.to_string(),
            seq,
            session_id: "s1".into(),
            turn_id: None,
            kind: "text".into(),
            ts: now(),
            data: json!({}),
        };
        a.append_events(vec![event(1), event(2)])
            .await
            .expect("append");
        a.flush().await.expect("flush");
        a.announce("s1");
        let mut seen = Vec::new();
        while seen.len() < 2 {
            let n = tokio::time::timeout(Duration::from_secs(10), notices.recv())
                .await
                .expect("a notice within 10 s")
                .expect("notice");
            seen.push(n);
        }
        assert!(seen.contains(&Notice::Events {
            session_id: "s1".into(),
            first: 1,
            last: 2
        }));
        assert!(seen.contains(&Notice::Changed("s1".into())));
        // A replica does not hear itself.
        assert!(a.notices().expect("notices").try_recv().is_err());
    }

    #[tokio::test]
    async fn replicas_migrating_at_once_apply_each_migration_once() {
        let Some(server) = postgres_server() else {
            return;
        };
        let url = Store::scratch_database(&server).await.expect("scratch");
        let location = Location::Postgres(url.clone());
        let opens = (0..4).map(|i| {
            let location = location.clone();
            async move { Store::connect(&location, &replica(&format!("r{i}"))).await }
        });
        for opened in futures::future::join_all(opens).await {
            opened.expect("every replica opens");
        }
        let pool = PgPool::connect(&url).await.expect("connect");
        let applied: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM _sqlx_migrations")
            .fetch_one(&pool)
            .await
            .expect("count");
        let files = std::fs::read_dir(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/src/store/migrations/postgres"
        ))
        .expect("migrations dir")
        .count();
        assert_eq!(applied as usize, files);
    }

    #[test]
    fn only_an_unreachable_busy_or_unwritable_database_counts_as_unavailable() {
        let timed_out = || StoreError::Query(sqlx::Error::PoolTimedOut);
        assert_eq!(timed_out().unavailable(), Some(Unavailable::NoConnection));
        assert_eq!(
            timed_out().after_acquire(16, 16).unavailable(),
            Some(Unavailable::Busy)
        );
        assert_eq!(
            timed_out().after_acquire(0, 16).unavailable(),
            Some(Unavailable::Unreachable)
        );
        assert!(matches!(
            StoreError::Conflict.after_acquire(16, 16),
            StoreError::Conflict
        ));
        for why in [
            Unavailable::Busy,
            Unavailable::NoConnection,
            Unavailable::Unreachable,
            Unavailable::Locked,
            Unavailable::CannotWrite,
            Unavailable::Stopping,
        ] {
            assert!(!why.detail().contains("  "), "{:?}", why.detail());
        }
        assert_eq!(
            unavailable(&sqlx::Error::Io(std::io::Error::from(
                std::io::ErrorKind::ConnectionRefused
            ))),
            Some(Unavailable::Unreachable)
        );
        assert_eq!(unavailable(&sqlx::Error::RowNotFound), None);
        assert_eq!(sqlite_unavailable(13), Some(Unavailable::CannotWrite));
        assert_eq!(sqlite_unavailable(5 | (3 << 8)), Some(Unavailable::Locked));
        assert_eq!(
            sqlite_unavailable(19),
            None,
            "a constraint is the query's fault"
        );
        assert_eq!(
            StoreError::WriterGone.unavailable(),
            Some(Unavailable::Stopping)
        );
        assert!(!StoreError::Conflict.is_unavailable());
    }

    #[test]
    fn a_store_location_is_a_postgres_url_or_a_data_dir() {
        let dir = Path::new("/var/lib/sw");
        assert_eq!(
            Location::parse(None, dir).expect("default"),
            Location::Sqlite(dir.into())
        );
        assert_eq!(
            Location::parse(Some("postgresql://u:p@db/sw"), dir).expect("pg"),
            Location::Postgres("postgresql://u:p@db/sw".into())
        );
        let bad = Location::parse(Some("mysql://u:hunter2@db/sw"), dir)
            .expect_err("refused")
            .to_string();
        assert!(!bad.contains("hunter2"), "{bad}");
        assert_eq!(
            Location::Postgres("postgres://u:hunter2@db/sw".into()).display(),
            "postgres://u:****@db/sw"
        );
    }

    /// An SQLite store in `dir` with the schema an earlier release left (its first `migrations`
    /// migrations) and session `s1` of tenant `t1` in `status`.
    async fn old_sqlite_store(
        dir: &std::path::Path,
        migrations: usize,
        status: &str,
    ) -> SqlitePool {
        let options = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(dir.join("sandwarden.db"))
            .create_if_missing(true);
        let pool = SqlitePool::connect_with(options).await.expect("old store");
        let mut old = sqlx::migrate!("src/store/migrations/sqlite");
        old.migrations = Cow::Owned(old.migrations[..migrations].to_vec());
        old.run(&pool).await.expect("old migrations");
        let s = session("s1", "api");
        sqlx::query(
            "INSERT INTO sessions (id, tenant, harness, kind, status, idle_timeout_s, \
             created_at, updated_at, last_active_at) VALUES (?, ?, ?, ?, ?, 60, ?, ?, ?)",
        )
        .bind(&s.id)
        .bind(&s.tenant)
        .bind(&s.harness)
        .bind(&s.kind)
        .bind(status)
        .bind(&s.created_at)
        .bind(&s.updated_at)
        .bind(&s.last_active_at)
        .execute(&pool)
        .await
        .expect("session");
        pool
    }

    #[tokio::test]
    async fn an_sqlite_store_from_before_replicas_keeps_its_turns_and_sandboxes_as_its_own() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            // The schema as the previous release left it: the first two migrations only.
            let pool = old_sqlite_store(dir.path(), 2, "running").await;
            sqlx::query(
                "INSERT INTO turns (id, session_id, status, mode, created_at) \
                 VALUES ('old-turn', 's1', 'running', 'sync', ?)",
            )
            .bind(now())
            .execute(&pool)
            .await
            .expect("turn");
            sqlx::query(
                "INSERT INTO sandboxes (id, template, endpoint, session_id, created_at) \
                 VALUES ('sbx-old', 'echo', 'http://127.0.0.1:1', 's1', ?)",
            )
            .bind(now())
            .execute(&pool)
            .await
            .expect("sandbox");
            pool.close().await;
        }
        let store = Store::open(dir.path()).await.expect("upgraded");
        let turns = store.running_turns().await.expect("running");
        assert_eq!(turns.len(), 1, "its interrupted turn is recovered here");
        let sandboxes = store.list_sandboxes().await.expect("sandboxes");
        assert_eq!(sandboxes.len(), 1);
        assert!(store.owns(&sandboxes[0]), "its sandbox is its own");
        assert!(store.orphaned_turns().await.expect("orphans").is_empty());
    }

    /// Migration 0005 rebuilds `messages` without `AUTOINCREMENT`: the history written before it
    /// keeps its order, and messages written after it come after it, even when the newest old
    /// message had been deleted (its `seq` may be handed out again, still past every stored one).
    #[tokio::test]
    async fn an_sqlite_store_from_before_lean_messages_keeps_its_history_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let pool = old_sqlite_store(dir.path(), 4, "ready").await;
            for (id, role) in [("m-b", "user"), ("m-a", "assistant"), ("m-gone", "user")] {
                sqlx::query(
                    "INSERT INTO messages (id, session_id, turn_id, role, text, parts, created_at) \
                     VALUES (?, 's1', 'old-turn', ?, 'x', '[]', ?)",
                )
                .bind(id)
                .bind(role)
                .bind(now())
                .execute(&pool)
                .await
                .expect("message");
            }
            sqlx::query("DELETE FROM messages WHERE id = 'm-gone'")
                .execute(&pool)
                .await
                .expect("delete");
            pool.close().await;
        }
        let store = Store::open(dir.path()).await.expect("upgraded");
        let (t, user) = turn("s1", "new-turn");
        assert!(
            store
                .begin_turn("t1", &t, &user, None)
                .await
                .expect("begin")
                .is_some()
        );
        let mut done = t.clone();
        done.status = TurnStatus::Completed;
        done.finished_at = Some(now());
        let reply = Message {
            id: "m-reply".into(),
            role: "assistant".into(),
            ..user.clone()
        };
        store
            .finish_turn(&done, Some(&reply), None)
            .await
            .expect("finish");
        let ids: Vec<String> = store
            .list_messages("s1", None)
            .await
            .expect("history")
            .into_iter()
            .map(|m| m.id)
            .collect();
        assert_eq!(ids, ["m-b", "m-a", "msg-new-turn", "m-reply"]);
    }

    /// A turn's start committed on the caller's thread must not wait there for SQLite's lock:
    /// with another connection holding it, the start goes to the writer's thread, and this
    /// (single-threaded) runtime keeps running the task that lets the lock go.
    #[tokio::test(flavor = "current_thread")]
    async fn a_start_never_waits_for_the_lock_on_the_callers_thread() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = seeded(Store::open(dir.path()).await.expect("open")).await;
        let holder = rusqlite::Connection::open(dir.path().join("sandwarden.db")).expect("open");
        holder
            .execute_batch("BEGIN IMMEDIATE; UPDATE sessions SET title = 'held' WHERE id = 's2'")
            .expect("lock");
        let (t, user) = turn("s1", "turn-1");
        let tried = std::time::Instant::now();
        let start = tokio::spawn({
            let store = store.clone();
            async move { store.begin_turn("t1", &t, &user, None).await }
        });
        // Runs once the start has been tried and is waiting: had the start held the thread in
        // SQLite's busy wait (5 s), this would run only after it.
        let released = tokio::spawn(async move {
            let held_for = tried.elapsed();
            holder.execute_batch("COMMIT").expect("unlock");
            held_for
        });
        let held_for = released.await.expect("release task");
        assert!(
            held_for < Duration::from_secs(2),
            "the caller's thread was held for {held_for:?}"
        );
        let begun = start.await.expect("start task").expect("begin");
        assert_eq!(
            begun.expect("ready session").session.status,
            SessionStatus::Running
        );
        let turn = store.get_turn("s1", "turn-1").await.expect("read");
        assert_eq!(turn.expect("recorded").status, TurnStatus::Running);
    }
}
