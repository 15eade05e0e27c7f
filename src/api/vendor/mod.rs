//! What the vendor-compatible APIs share: their stored objects (`VendorObject`), the checks and
//! errors of their requests, and the reading of a session's native event log through a
//! vendor's translator, for its history and its live stream.
//!
//! A translator is a pure function of the stored native events read in `seq` order, so no vendor
//! keeps a log of its own: the history and the live stream run the same translation and give an
//! event the same id. An event's place is where the translator emitted it, `(seq, k)`: the native
//! event that completed it and its rank among what that native event completed. What a
//! translator holds back (a run of text, a tool call whose permission is not known) belongs to one
//! turn, so replaying a turn from its first event rebuilds it.

pub mod anthropic;
pub(crate) mod files;
pub mod openai;
mod queue;

use super::{AppState, Caller};
use crate::session::SessionError;
use crate::store::{Event, Message, StoreError, VendorObject};
use axum::Json;
use axum::extract::Query;
use axum::http::StatusCode;
use axum::response::Response;
use axum::response::sse::Event as SseEvent;
use futures::StreamExt;
use sandwarden_proto::problem::Problem;
use serde_json::{Map, Value, json};
use std::collections::VecDeque;
use std::convert::Infallible;

/// Where an event was emitted: the native `seq` that completed it, and its rank there.
pub type Place = (i64, u32);

/// One translated event and its place.
#[derive(Debug, Clone, PartialEq)]
pub struct Out {
    pub place: Place,
    /// Stream-only events (previews, deltas) are not part of the history.
    pub preview: bool,
    pub event: Value,
}

impl Out {
    pub fn kind(&self) -> &str {
        self.event["type"].as_str().unwrap_or("")
    }
}

/// A vendor's reading of the native event log.
pub trait Translate {
    /// Whether `e` is the first event of a turn (it needs the turn's user message).
    fn opens_turn(&self, e: &Event) -> bool;
    /// Translates one native event (`user`: the turn's user message, with its first event);
    /// what it completed.
    fn push(&mut self, e: &Event, user: Option<&Message>) -> Vec<Out>;
    /// What a live stream says last when its session has ended (deleted, archived, reaped, or
    /// its sandbox lost) rather than the client hanging up: `status` is the native status
    /// (`deleted` when the session is gone).
    fn ended(&self, session_id: &str, status: &str) -> Vec<Value>;
}

/// Native events read per store query while translating.
const BATCH: i64 = 500;

fn invalid(message: impl Into<String>) -> Problem {
    Problem::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
}

fn not_found(what: &str, id: &str) -> Problem {
    Problem::new(
        StatusCode::NOT_FOUND,
        &format!("{}_not_found", what.replace(' ', "_")),
        format!("no {what} {id:?}"),
    )
}

/// The first version of a new object.
fn first_version(tenant: &str, kind: &str, id: String, body: Value, now: String) -> VendorObject {
    VendorObject {
        tenant: tenant.to_string(),
        kind: kind.to_string(),
        id,
        version: 1,
        body,
        created_at: now,
        archived_at: None,
    }
}

fn store_problem(e: StoreError) -> Problem {
    Problem::from(SessionError::Store(e))
}

fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}

/// A JSON body, with the parse error said in Anthropic's words.
fn body_of<T: serde::de::DeserializeOwned>(
    body: Result<Json<T>, axum::extract::rejection::JsonRejection>,
) -> Result<T, Problem> {
    // The native mapping: a body too large is 413, one that stalled 408, bad JSON 400/422.
    body.map(|Json(b)| b).map_err(Problem::from)
}

/// `metadata`: at most 16 string pairs (`null` values delete keys on update).
fn checked_metadata(given: Option<&Value>) -> Result<Map<String, Value>, Problem> {
    let Some(given) = given.filter(|v| !v.is_null()) else {
        return Ok(Map::new());
    };
    let map = given
        .as_object()
        .ok_or_else(|| invalid("`metadata` is an object of string values"))?;
    if map.len() > 16 {
        return Err(invalid("`metadata` holds at most 16 pairs"));
    }
    for (k, v) in map {
        let fits = v.as_str().is_some_and(|v| v.len() <= 512) || v.is_null();
        if !fits || k.len() > 64 {
            return Err(invalid(format!(
                "`metadata.{k}`: keys are at most 64 bytes and values strings of at most 512"
            )));
        }
    }
    Ok(map.clone())
}

fn limit_of(given: Option<i64>, default: i64, max: i64) -> Result<i64, Problem> {
    let limit = given.unwrap_or(default);
    if !(1..=max).contains(&limit) {
        return Err(invalid(format!("`limit` is between 1 and {max}")));
    }
    Ok(limit)
}

fn query_of<T>(
    q: Result<Query<T>, axum::extract::rejection::QueryRejection>,
) -> Result<T, Problem> {
    q.map(|Query(q)| q)
        .map_err(|e| invalid(format!("the query: {}", e.body_text())))
}

async fn object(
    orch: &AppState,
    tenant: &str,
    kind: &str,
    id: &str,
    version: Option<i64>,
) -> Result<VendorObject, Problem> {
    let what = kind.trim_start_matches("anthropic.");
    orch.store
        .get_object(tenant, kind, id, version)
        .await
        .map_err(store_problem)?
        .ok_or_else(|| not_found(what, id))
}

async fn archive(orch: &AppState, mut o: VendorObject) -> Result<Value, Problem> {
    if o.archived_at.is_none() {
        let now = crate::store::now();
        o.body["archived_at"] = json!(now);
        o.body["updated_at"] = json!(now);
        o.archived_at = Some(now);
        orch.store.update_object(&o).await.map_err(store_problem)?;
    }
    Ok(o.body)
}

/// `metadata` patched: keys set to `null` are deleted.
fn merged_metadata(old: &Value, patch: Option<&Value>) -> Result<Value, Problem> {
    let patch = checked_metadata(patch)?;
    let mut merged = old.as_object().cloned().unwrap_or_default();
    for (k, v) in patch {
        if v.is_null() {
            merged.remove(&k);
        } else {
            merged.insert(k, v);
        }
    }
    if merged.len() > 16 {
        return Err(invalid("`metadata` holds at most 16 pairs"));
    }
    Ok(Value::Object(merged))
}

/// Removes a vendor session: its native session stops and its record goes (`404` from then on).
async fn discard_session(
    orch: &AppState,
    caller: &Caller,
    kind: &str,
    id: &str,
) -> Result<(), Problem> {
    stop_native(orch, caller, id).await?;
    orch.store
        .delete_object(&caller.tenant, kind, id)
        .await
        .map_err(store_problem)?;
    Ok(())
}

/// Stops the native session (its sandbox goes; its history stays readable).
async fn stop_native(orch: &AppState, caller: &Caller, id: &str) -> Result<(), Problem> {
    match orch.delete(&caller.tenant, id).await {
        Ok(_) | Err(SessionError::NotFound(_)) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Feeds native events to the translator, looking up each turn's user message as it opens.
struct Reader<T> {
    translator: T,
    /// The prompt of the turn being translated.
    user: Option<std::sync::Arc<Message>>,
}

impl<T: Translate> Reader<T> {
    fn new(translator: T) -> Self {
        Reader {
            translator,
            user: None,
        }
    }

    async fn push(&mut self, orch: &AppState, e: &Event) -> Result<Vec<Out>, StoreError> {
        let user = match &e.turn_id {
            Some(turn) if self.translator.opens_turn(e) => {
                // The hub keeps the prompt of a turn started here: a live stream shows it
                // without waiting on the store.
                let prompt = match orch.hub.prompt(&e.session_id, turn) {
                    Some(m) => Some(m),
                    None => orch
                        .store
                        .list_messages(&e.session_id, Some(turn))
                        .await?
                        .into_iter()
                        .find(|m| m.role == "user")
                        .map(std::sync::Arc::new),
                };
                self.user = prompt;
                self.user.as_deref()
            }
            _ => None,
        };
        Ok(self.translator.push(e, user))
    }
}

/// Where translation must start to rebuild what the event at `seq` belongs to: just before its
/// turn's first event (a turn's events are contiguous).
async fn replay_start(orch: &AppState, session_id: &str, seq: i64) -> Result<i64, StoreError> {
    if seq <= 0 {
        return Ok(0);
    }
    let Some(e) = orch
        .store
        .list_events(session_id, seq - 1, 1)
        .await?
        .pop()
        .filter(|e| e.seq == seq)
    else {
        return Ok(seq);
    };
    let Some(turn) = &e.turn_id else {
        return Ok(seq);
    };
    Ok(orch
        .store
        .turn_first_seq(session_id, turn)
        .await?
        .map_or(seq, |first| first - 1))
}

pub(crate) fn place_token((seq, k): Place) -> String {
    format!("{seq}.{k}")
}

pub(crate) fn parse_place(token: &str) -> Option<Place> {
    let (seq, k) = token.split_once('.')?;
    Some((seq.parse().ok()?, k.parse().ok()?))
}

/// The most a history answer holds (its events' JSON), like a native page.
const PAGE_BYTES: usize = 4 << 20;

/// The translated history after `after` (the place of the last event a previous page ended
/// with): at most `limit` events `keep` accepts and `max_bytes` of them, and whether more may
/// follow. The native pages read count against the caller's answer memory while translated.
pub(crate) async fn history<T: Translate>(
    orch: &AppState,
    caller: &Caller,
    session_id: &str,
    after: Option<Place>,
    (limit, max_bytes): (usize, usize),
    keep: impl Fn(&Out) -> bool,
    translator: T,
) -> Result<(Vec<Out>, bool), Problem> {
    let mut since = match after {
        Some((seq, _)) => replay_start(orch, session_id, seq)
            .await
            .map_err(store_problem)?,
        None => 0,
    };
    let mut reader = Reader::new(translator);
    let (mut outs, mut bytes) = (Vec::new(), 0usize);
    loop {
        let page = orch
            .event_page(&caller.tenant, &caller.limits, session_id, since, BATCH)
            .await?;
        let Some(tail) = page.items.last() else { break };
        since = tail.seq;
        for e in &page.items {
            for out in reader.push(orch, e).await.map_err(store_problem)? {
                if out.preview || after.is_some_and(|a| out.place <= a) || !keep(&out) {
                    continue;
                }
                bytes += out.event.to_string().len();
                if bytes > max_bytes && !outs.is_empty() {
                    return Ok((outs, true));
                }
                outs.push(out);
                if outs.len() == limit {
                    return Ok((outs, true));
                }
            }
        }
        if page.next.is_none() {
            break;
        }
    }
    Ok((outs, false))
}

/// `value` as JSON, its size counted against the caller's answer memory until it is sent.
pub(crate) async fn admitted_json(
    orch: &AppState,
    caller: &Caller,
    value: &Value,
) -> Result<Response, Problem> {
    let bytes = value.to_string().len();
    let admitted = orch
        .admit_answer(&caller.tenant, &caller.limits, bytes)
        .await?;
    Ok(super::json_holding(value, admitted))
}

/// The most objects of one kind a tenant keeps here, and versions of one agent.
const MAX_OBJECTS: i64 = 10_000;
const MAX_VERSIONS: i64 = 1_000;
/// The most a stored object's JSON may take.
const MAX_OBJECT_BYTES: usize = 64 << 10;

/// Refuses a new object past the tenant's count, or one too large.
async fn check_room(
    orch: &AppState,
    tenant: &str,
    kind: &str,
    body: &Value,
) -> Result<(), Problem> {
    check_size(body)?;
    let n = orch
        .store
        .count_objects(tenant, kind)
        .await
        .map_err(store_problem)?;
    if n >= MAX_OBJECTS {
        return Err(Problem::new(
            StatusCode::FORBIDDEN,
            "object_limit",
            format!("a tenant keeps at most {MAX_OBJECTS} of these; delete or archive some first"),
        ));
    }
    Ok(())
}

fn check_size(body: &Value) -> Result<(), Problem> {
    if body.to_string().len() > MAX_OBJECT_BYTES {
        return Err(invalid(format!(
            "the object is over {} KiB; send shorter fields",
            MAX_OBJECT_BYTES >> 10
        )));
    }
    Ok(())
}

/// The most an agent's standing instructions (`system`, `instructions`) may take: what a
/// native session takes (the stored agent as a whole stays within `MAX_OBJECT_BYTES`).
const MAX_AGENT_INSTRUCTIONS_BYTES: usize = sandwarden_proto::event::MAX_INSTRUCTIONS_BYTES;

/// An agent's standing instructions: bounded, no NUL.
fn checked_instructions(field: &str, value: Option<&str>) -> Result<(), Problem> {
    short(field, value, MAX_AGENT_INSTRUCTIONS_BYTES)?;
    if value.is_some_and(|v| {
        v.chars()
            .any(|c| c.is_control() && !matches!(c, '\n' | '\r' | '\t'))
    }) {
        return Err(invalid(format!(
            "`{field}` holds a control character (only newlines and tabs may be in it)"
        )));
    }
    Ok(())
}

/// The packages an environment asks for, by package manager (`aliases` maps a vendor's names
/// for a manager onto the templates' `apt`, `cargo`, `gem`, `go`, `npm`, `pip`).
fn wanted_packages(
    given: &Value,
    aliases: &[(&str, &str)],
) -> Result<std::collections::BTreeMap<String, Vec<String>>, Problem> {
    const MANAGERS: [&str; 6] = ["apt", "cargo", "gem", "go", "npm", "pip"];
    let mut wanted = std::collections::BTreeMap::new();
    let Some(map) = given.as_object() else {
        return if given.is_null() {
            Ok(wanted)
        } else {
            Err(invalid("`packages` lists packages by package manager"))
        };
    };
    for (manager, list) in map {
        if manager == "type" || list.is_null() {
            continue;
        }
        let name = aliases
            .iter()
            .find(|(from, _)| from == manager)
            .map_or(manager.as_str(), |(_, to)| to);
        if !MANAGERS.contains(&name) {
            return Err(invalid(format!(
                "`packages.{manager}` is no package manager here"
            )));
        }
        let names: Vec<String> = list
            .as_array()
            .filter(|l| l.len() <= 100)
            .and_then(|l| l.iter().map(|p| p.as_str().map(String::from)).collect())
            .ok_or_else(|| invalid(format!("`packages.{manager}` lists at most 100 names")))?;
        if !names.is_empty() {
            wanted.insert(name.to_string(), names);
        }
    }
    Ok(wanted)
}

/// Refuses a session whose environment asks for packages its harness's template does not provide
/// (nothing is installed per session: a template's image has what it lists in `packages`).
fn check_packages(
    orch: &AppState,
    harness: &str,
    wanted: &std::collections::BTreeMap<String, Vec<String>>,
) -> Result<(), Problem> {
    let templates = orch.templates();
    let provided = templates.get(harness).map(|t| &t.packages);
    let mut missing = Vec::new();
    for (manager, names) in wanted {
        let has = provided.and_then(|p| p.get(manager));
        for name in names {
            if !has.is_some_and(|h| h.contains(name)) {
                missing.push(format!("{manager} {name}"));
            }
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    let offered: Vec<String> = provided
        .into_iter()
        .flatten()
        .flat_map(|(m, names)| names.iter().map(move |n| format!("{m} {n}")))
        .collect();
    Err(invalid(format!(
        "`packages`: the harness {harness:?} does not provide {}; nothing is installed per \
         session, so its template's image must (listing them in the template's `packages`). It \
         provides: {}",
        missing.join(", "),
        if offered.is_empty() {
            "none".to_string()
        } else {
            offered.join(", ")
        }
    )))
}

/// A text field: at most `max` bytes.
fn short(field: &str, value: Option<&str>, max: usize) -> Result<(), Problem> {
    if value.is_some_and(|v| v.len() > max) {
        return Err(invalid(format!("`{field}` is at most {max} bytes")));
    }
    Ok(())
}

/// How a live stream opens: the frames it sends first, and where it starts (after the place
/// of an event the client has; `None`: from now on).
#[derive(Default)]
pub(crate) struct Opening {
    pub first: Vec<SseEvent>,
    pub after: Option<Place>,
}

impl Opening {
    fn first(first: Vec<SseEvent>) -> Opening {
        Opening { first, after: None }
    }
}

/// The live stream of a session's translated events, from now on or after a place, as SSE
/// (`frame` makes each frame). A turn running where the stream starts is replayed from its start
/// without being sent, so what it completes afterwards is whole and carries its history id.
/// Holds `slot` (the tenant's stream quota) while open.
pub(crate) async fn live<T: Translate + Send + 'static>(
    orch: &AppState,
    caller: &Caller,
    session_id: String,
    slot: crate::session::quota::Slot,
    translator: T,
    frame: fn(&Out) -> SseEvent,
    opening: Opening,
) -> Result<Response, Problem> {
    let Opening { first, after } = opening;
    // Subscribed before the log is read, so nothing falls between the two.
    let rx = orch.hub.subscribe(&session_id);
    let now = match after {
        Some((seq, _)) => seq,
        None => orch
            .store
            .last_seq(&session_id)
            .await
            .map_err(store_problem)?,
    };
    let mut start = replay_start(orch, &session_id, now)
        .await
        .map_err(store_problem)?;
    // A finished turn needs no replay: its last event ended it.
    if start < now && after.is_none() {
        let last = orch
            .store
            .list_events(&session_id, now - 1, 1)
            .await
            .map_err(store_problem)?;
        if last
            .first()
            .is_some_and(|e| e.kind == "done" || e.kind == "error")
        {
            start = now;
        }
    }
    let session_id_for_end = session_id.clone();
    let natives = Box::pin(super::native_events(
        orch.clone(),
        caller,
        session_id,
        rx,
        super::Follow::Since(start),
    ));
    let state = LiveState {
        natives,
        reader: Reader::new(translator),
        orch: orch.clone(),
        pending: VecDeque::new(),
        after: after.unwrap_or((now, u32::MAX)),
        tenant: caller.tenant.clone(),
        session_id: session_id_for_end,
        ended: false,
    };
    let first = futures::stream::iter(first.into_iter().map(Ok::<_, Infallible>));
    let frames = futures::stream::unfold(state, move |mut st| async move {
        loop {
            if let Some(out) = st.pending.pop_front() {
                return Some((Ok::<_, Infallible>(frame(&out)), st));
            }
            if st.ended {
                return None;
            }
            let Some(e) = st.natives.next().await else {
                // The native stream ends when the session's channel goes (it was deleted) or
                // the server shuts down: a session that has ended says so, once.
                st.ended = true;
                let status = match st.orch.store.get_session(&st.tenant, &st.session_id).await {
                    Ok(None) => "deleted".to_string(),
                    Ok(Some(s)) if !s.status.is_live() => s.status.as_str().to_string(),
                    _ => return None,
                };
                st.pending.extend(
                    st.reader
                        .translator
                        .ended(&st.session_id, &status)
                        .into_iter()
                        .map(|event| Out {
                            place: (i64::MAX, 0),
                            preview: true,
                            event,
                        }),
                );
                continue;
            };
            match st.reader.push(&st.orch, &e).await {
                // What the replay of a running turn completes up to where the stream starts is
                // history already.
                Ok(outs) => st
                    .pending
                    .extend(outs.into_iter().filter(|o| o.place > st.after)),
                Err(err) => {
                    tracing::warn!(error = %err, "a vendor event stream could not read the store; ending it");
                    return None;
                }
            }
        }
    });
    Ok(super::sse(super::holding(first.chain(frames), slot)))
}

struct LiveState<S, T> {
    natives: std::pin::Pin<Box<S>>,
    reader: Reader<T>,
    orch: AppState,
    pending: VecDeque<Out>,
    /// The place the stream starts after: what the replay completes up to it is not sent.
    after: Place,
    tenant: String,
    session_id: String,
    /// Whether the end of the session has been told.
    ended: bool,
}

/// The tokens a session's turns used: input and output.
async fn session_usage(orch: &AppState, session_id: &str) -> Result<(u64, u64), StoreError> {
    let (mut input, mut output) = (0u64, 0u64);
    let mut after = None;
    loop {
        let turns = orch
            .store
            .list_turns(session_id, after.clone(), 500)
            .await?;
        for t in &turns {
            if let Some(u) = &t.usage {
                input += u["input_tokens"].as_u64().unwrap_or(0);
                output += u["output_tokens"].as_u64().unwrap_or(0);
            }
        }
        match turns.last() {
            Some(t) if turns.len() == 500 => after = Some((t.created_at.clone(), t.id.clone())),
            _ => return Ok((input, output)),
        }
    }
}

/// A vendor's error body, from the answer's status (a `422` already made `400`), the problem
/// document and the request's id.
type ErrorShape = fn(StatusCode, &Value, Option<String>) -> Value;

/// Rewrites the problem documents answered under a vendor's mount (its routes' and the key
/// check's) into the vendor's error shape, which its SDK reads into its exception types. A `409`
/// says `x-should-retry: false`: retrying a conflict unchanged cannot succeed, and both SDKs
/// retry 409s otherwise.
async fn vendor_shape(
    req: axum::extract::Request,
    next: axum::middleware::Next,
    shape: ErrorShape,
) -> Response {
    use axum::http::{HeaderValue, header};
    let request_id = req
        .headers()
        .get(crate::api::REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    let response = next.run(req).await;
    let is_problem = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes() == b"application/problem+json");
    if !is_problem {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    // Problem documents are small; one that cannot be read keeps its status with a generic body.
    let bytes = axum::body::to_bytes(body, 1 << 20)
        .await
        .unwrap_or_default();
    let doc: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    if parts.status == StatusCode::UNPROCESSABLE_ENTITY {
        parts.status = StatusCode::BAD_REQUEST;
    }
    let body = shape(parts.status, &doc, request_id);
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if parts.status == StatusCode::CONFLICT {
        parts
            .headers
            .insert("x-should-retry", HeaderValue::from_static("false"));
    }
    Response::from_parts(parts, axum::body::Body::from(body.to_string()))
}

/// A route a vendor API does not serve: `404` naming it and where the supported ones are said.
fn unsupported_route(req: &axum::extract::Request, api: &str, doc: &str) -> Problem {
    Problem::new(
        StatusCode::NOT_FOUND,
        "not_supported",
        format!(
            "{} {} is not supported by sandwarden's {api}: {doc} lists what is mapped and what is \
             refused",
            req.method(),
            req.uri().path()
        ),
    )
}
