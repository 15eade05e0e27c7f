//! Fuzzing on stable Rust, as ordinary tests: each target feeds a parser seeded, mutated and
//! generated inputs for a bounded count (or time) and fails on a panic or a broken property,
//! printing the input and the seed that reproduces it. Not coverage-guided (cargo-fuzz needs
//! nightly); see docs/reliability.md, "Hostile input", for why and for how long it has run.
//!
//! `SANDWARDEN_FUZZ_ITERS` (inputs per target, default 3000), `SANDWARDEN_FUZZ_SECS` (stop
//! sooner), `SANDWARDEN_FUZZ_SEED` (replay a run). `scripts/fuzz` runs them longer.

use agent_client_protocol::v1::schema::{RequestPermissionRequest, SessionUpdate};
use axum::response::IntoResponse;
use axum::response::sse::{Event, Sse};
use futures::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sandwarden::session::message::MessageRequest;
use sandwarden_harness::map::{input_required, map_update};
use sandwarden_harness::pty::{ControlAsk, read_control};
use sandwarden_proto::event::{
    BindRequest, Control, EventType, InputAnswer, TurnEvent, TurnRequest,
};
use serde_json::{Value, json};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::{Duration, Instant};

/// How much fuzzing a run does, and from which seed.
struct Budget {
    iters: u64,
    until: Option<Instant>,
    seed: u64,
}

fn budget() -> Budget {
    let var = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    Budget {
        iters: var("SANDWARDEN_FUZZ_ITERS").unwrap_or(3000),
        until: var("SANDWARDEN_FUZZ_SECS").map(|s| Instant::now() + Duration::from_secs(s)),
        seed: var("SANDWARDEN_FUZZ_SEED").unwrap_or_else(rand::random),
    }
}

/// JSON fragments that tend to reach corners: structure, escapes, edge numbers, the schema's keys.
const TOKENS: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    ",",
    ":",
    "\"",
    "\\",
    "\\u0000",
    "\\ud800",
    "\\udc00",
    "null",
    "true",
    "false",
    "0",
    "-0",
    "1e999",
    "-1",
    "18446744073709551616",
    "4294967296",
    "65536",
    "\u{0}",
    "\n",
    "\r\n",
    "\u{feff}",
    "é",
    "😀",
    "\"type\"",
    "\"text\"",
    "\"parts\"",
    "\"image\"",
    "\"data\"",
    "\"mime_type\"",
    "\"url\"",
    "\"webhook\"",
    "\"async\"",
    "\"stream\"",
    "\"env\"",
    "\"files\"",
    "\"path\"",
    "\"content\"",
    "\"content_base64\"",
    "\"cwd\"",
    "\"resize\"",
    "\"cols\"",
    "\"rows\"",
    "\"ping\"",
    "\"sessionUpdate\"",
    "\"toolCallId\"",
    "\"status\"",
    "\"rawInput\"",
    "\"rawOutput\"",
    "\"entries\"",
    "\"options\"",
    "\"decision\"",
    "data: ",
    "event: ",
    "id: ",
    "retry: ",
    ":\n",
    "\n\n",
];

/// Applies one to eight random edits to `input`, some using `others` (the seeds) and `TOKENS`.
fn mutate(rng: &mut StdRng, input: &[u8], others: &[Vec<u8>]) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..rng.random_range(1..=8) {
        let at = if out.is_empty() {
            0
        } else {
            rng.random_range(0..=out.len())
        };
        match rng.random_range(0..8) {
            0 if !out.is_empty() => {
                let i = rng.random_range(0..out.len());
                out[i] ^= 1 << rng.random_range(0..8);
            }
            1 => out.insert(at, rng.random()),
            2 if !out.is_empty() => {
                let end = (at + rng.random_range(1..16)).min(out.len());
                let start = at.min(end);
                out.drain(start..end);
            }
            3 if at < out.len() => {
                let end = (at + rng.random_range(1..64)).min(out.len());
                let piece = out[at..end].to_vec();
                let times = rng.random_range(1..64);
                for _ in 0..times {
                    out.splice(at..at, piece.iter().copied());
                }
            }
            4 | 5 => {
                let t = TOKENS[rng.random_range(0..TOKENS.len())];
                out.splice(at..at, t.bytes());
            }
            6 if !others.is_empty() => {
                let other = &others[rng.random_range(0..others.len())];
                let from = rng.random_range(0..=other.len());
                out.splice(at..at, other[from..].iter().copied());
            }
            _ => out.truncate(at),
        }
        out.truncate(1 << 20);
    }
    out
}

/// A random string with the characters that break line-based and escaped formats.
fn any_string(rng: &mut StdRng) -> String {
    const PIECES: &[&str] = &[
        "a",
        "text",
        " ",
        "\n",
        "\r",
        "\r\n",
        "\n\n",
        "data: x",
        ":",
        "\u{0}",
        "\\",
        "\"",
        "é",
        "😀",
        "\u{2028}",
        "\u{feff}",
        "id: 7",
        "event: done",
    ];
    (0..rng.random_range(0..12))
        .map(|_| PIECES[rng.random_range(0..PIECES.len())])
        .collect()
}

/// A random JSON value (no floats: they need not survive a round trip bit for bit).
fn any_json(rng: &mut StdRng, depth: u32) -> Value {
    match rng.random_range(0..if depth == 0 { 4 } else { 6 }) {
        0 => Value::Null,
        1 => Value::Bool(rng.random()),
        2 => json!(rng.random::<i64>()),
        3 => Value::String(any_string(rng)),
        4 => Value::Array(
            (0..rng.random_range(0..4))
                .map(|_| any_json(rng, depth - 1))
                .collect(),
        ),
        _ => Value::Object(
            (0..rng.random_range(0..4))
                .map(|_| (any_string(rng), any_json(rng, depth - 1)))
                .collect(),
        ),
    }
}

/// Makes one input from scratch.
type Generator = dyn Fn(&mut StdRng) -> Vec<u8>;

/// Runs `check` on `budget` inputs: each a seed, a mutation of one, or (if given) generated;
/// with no seeds, every input is generated.
/// A panic fails the test with the input, written out so it can become a regression test.
fn fuzz(name: &str, seeds: &[&str], generate: Option<&Generator>, check: &dyn Fn(&[u8])) {
    let b = budget();
    let mut rng = StdRng::seed_from_u64(b.seed);
    let seeds: Vec<Vec<u8>> = seeds.iter().map(|s| s.as_bytes().to_vec()).collect();
    let started = Instant::now();
    let mut n = 0u64;
    while n < b.iters && b.until.is_none_or(|t| Instant::now() < t) {
        let input = match (rng.random_range(0..10), generate) {
            (_, Some(g)) if seeds.is_empty() => g(&mut rng),
            (_, None) if seeds.is_empty() => Vec::new(),
            (0, _) => seeds[rng.random_range(0..seeds.len())].clone(),
            (1..=3, Some(g)) => g(&mut rng),
            _ => {
                let base = seeds[rng.random_range(0..seeds.len())].clone();
                mutate(&mut rng, &base, &seeds)
            }
        };
        n += 1;
        if catch_unwind(AssertUnwindSafe(|| check(&input))).is_err() {
            let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz-crashes");
            let _ = std::fs::create_dir_all(&dir);
            let file = dir.join(format!("{name}-{}-{n}", b.seed));
            let _ = std::fs::write(&file, &input);
            panic!(
                "fuzz target {name} failed on input {n} (SANDWARDEN_FUZZ_SEED={}), saved in {}: {:?}",
                b.seed,
                file.display(),
                String::from_utf8_lossy(&input)
            );
        }
    }
    eprintln!(
        "fuzz {name}: {n} inputs in {:.1} s (SANDWARDEN_FUZZ_SEED={})",
        started.elapsed().as_secs_f64(),
        b.seed
    );
}

#[test]
fn fuzz_message_bodies() {
    let workdir = tempfile::tempdir().expect("workdir");
    fuzz(
        "message_body",
        &[
            r#"{"text":"hello"}"#,
            r#"{"parts":[{"type":"text","text":"hi"},{"type":"image","data":"aGk=","mime_type":"image/png"}]}"#,
            r#"{"message":{"role":"user","content":[{"type":"text","text":"x"}]},"stream":true}"#,
            r#"{"content":"x","model":"m","thinking":true,"webhook":{"url":"https://h/x","token":"t","include_messages":true}}"#,
            r#"{"parts":[{"type":"image","url":"https://example.com/a.png"}],"async":true}"#,
        ],
        Some(&|rng: &mut StdRng| {
            let mut v = json!({});
            for key in [
                "text", "parts", "message", "content", "model", "thinking", "agent",
            ] {
                if rng.random_bool(0.4) {
                    v[key] = any_json(rng, 3);
                }
            }
            v.to_string().into_bytes()
        }),
        &|input| {
            if let Ok(req) = serde_json::from_slice::<MessageRequest>(input) {
                let options = req.turn_options();
                let _ = options.validate();
                if let Ok(parts) = req.parts() {
                    // What the API accepted is what the harness is sent: it must survive the trip.
                    let turn = TurnRequest {
                        turn_id: None,
                        parts,
                        timeout_s: None,
                        options,
                    };
                    let wire = serde_json::to_vec(&turn).expect("a turn serializes");
                    let back: TurnRequest =
                        serde_json::from_slice(&wire).expect("the harness reads what serve sent");
                    assert_eq!(back.parts, turn.parts);
                }
            }
            if let Ok(turn) = serde_json::from_slice::<TurnRequest>(input) {
                let _ = turn.validate();
            }
            if let Ok(bind) = serde_json::from_slice::<BindRequest>(input) {
                let _ = sandwarden_harness::bind::check(&bind, workdir.path());
            }
            let _ = serde_json::from_slice::<InputAnswer>(input);
        },
    );
}

/// The kinds of event, for generated ones.
const KINDS: [EventType; 9] = [
    EventType::Text,
    EventType::Reasoning,
    EventType::ToolUse,
    EventType::ToolResult,
    EventType::StepStart,
    EventType::StepFinish,
    EventType::InputRequired,
    EventType::Error,
    EventType::Done,
];

/// Encodes events as the servers do (axum's SSE), then decodes them as the clients do
/// (eventsource-stream) from the bytes cut at `cuts`.
fn sse_round_trip(events: &[TurnEvent], cuts: &[usize]) -> Vec<TurnEvent> {
    futures::executor::block_on(async {
        let frames: Vec<Result<Event, std::convert::Infallible>> = events
            .iter()
            .map(|e| {
                Ok(Event::default()
                    .id(e.index.to_string())
                    .event(e.kind.as_str())
                    .json_data(e)
                    .expect("an event serializes"))
            })
            .collect();
        let body = Sse::new(futures::stream::iter(frames))
            .into_response()
            .into_body();
        let bytes = axum::body::to_bytes(body, usize::MAX)
            .await
            .expect("the SSE body");
        let mut chunks = Vec::new();
        let mut from = 0;
        for &c in cuts {
            let c = c.min(bytes.len()).max(from);
            chunks.push(Ok::<_, std::io::Error>(bytes.slice(from..c)));
            from = c;
        }
        chunks.push(Ok(bytes.slice(from..)));
        use eventsource_stream::Eventsource;
        sandwarden_proto::event::without_bom(futures::stream::iter(chunks))
            .eventsource()
            .map(|e| {
                let e = e.expect("a well-formed stream decodes");
                serde_json::from_str::<TurnEvent>(&e.data).expect("the data is the event")
            })
            .collect()
            .await
    })
}

#[test]
fn fuzz_event_sse_codec() {
    // Property: any events, however their bytes are cut into chunks, decode to themselves.
    fuzz(
        "sse_round_trip",
        &[],
        Some(&|rng: &mut StdRng| {
            let n = rng.random_range(1..6);
            let mut v = Vec::new();
            for i in 0..n {
                v.push(json!({
                    "turn_id": any_string(rng), "index": i,
                    "type": KINDS[rng.random_range(0..KINDS.len())],
                    "ts": any_string(rng), "data": any_json(rng, 3),
                }));
            }
            let cuts: Vec<usize> = (0..rng.random_range(0..8))
                .map(|_| rng.random_range(0..2000))
                .collect();
            json!({"events": v, "cuts": cuts}).to_string().into_bytes()
        }),
        &|input| {
            let Ok(v) = serde_json::from_slice::<Value>(input) else {
                return;
            };
            let Ok(events) = serde_json::from_value::<Vec<TurnEvent>>(v["events"].clone()) else {
                return;
            };
            let mut cuts: Vec<usize> =
                serde_json::from_value(v["cuts"].clone()).unwrap_or_default();
            cuts.sort_unstable();
            assert_eq!(sse_round_trip(&events, &cuts), events);
        },
    );
    // And raw bytes as a stream from a broken or hostile peer: decoding must not panic.
    fuzz(
        "sse_decode",
        &[
            "id: 0\nevent: text\ndata: {\"turn_id\":\"t\",\"index\":0,\"type\":\"text\",\"ts\":\"x\",\"data\":{}}\n\n",
            ": heartbeat\n\nretry: 10\ndata: a\ndata: b\n\n",
            "data:x\r\n\r\nevent:done\rdata:{}\r\r",
            // Found by this target: a leading byte-order mark panicked eventsource-stream.
            "\u{feff}data: x\n\n",
            "\u{feff}\u{feff}",
            "\u{feff}: h0eartbeat\n\nreStry: 1\"s4294967296tream\"0\n\ndata: b=\n\n",
        ],
        None,
        &|input| {
            futures::executor::block_on(async {
                use eventsource_stream::Eventsource;
                let chunks: Vec<Result<bytes::Bytes, std::io::Error>> = input
                    .chunks(7)
                    .map(|c| Ok(bytes::Bytes::copy_from_slice(c)))
                    .collect();
                let mut s = sandwarden_proto::event::without_bom(futures::stream::iter(chunks))
                    .eventsource();
                while let Some(e) = s.next().await {
                    if let Ok(e) = e {
                        let _ = serde_json::from_str::<TurnEvent>(&e.data);
                    }
                }
            });
        },
    );
}

#[test]
fn fuzz_acp_mapping() {
    fuzz(
        "acp_map",
        &[
            r#"{"sessionUpdate":"agent_message_chunk","content":{"type":"text","text":"hel"}}"#,
            r#"{"sessionUpdate":"agent_thought_chunk","content":{"type":"text","text":"hmm"}}"#,
            r#"{"sessionUpdate":"tool_call","toolCallId":"t1","title":"write a.txt","kind":"edit","status":"pending","rawInput":{"path":"a.txt"},"content":[{"type":"diff","path":"a.txt","oldText":"a","newText":"b"}],"locations":[{"path":"a.txt","line":3}]}"#,
            r#"{"sessionUpdate":"tool_call_update","toolCallId":"t1","status":"completed","rawOutput":{"ok":true},"content":[{"type":"content","content":{"type":"text","text":"done"}}]}"#,
            r#"{"sessionUpdate":"plan","entries":[{"content":"step","priority":"high","status":"pending"}]}"#,
            r#"{"sessionUpdate":"agent_message_chunk","content":{"type":"image","data":"aGk=","mimeType":"image/png"}}"#,
            r#"{"sessionUpdate":"agent_message_chunk","content":{"type":"resource_link","uri":"file:///a","name":"a"}}"#,
            r#"{"sessionUpdate":"user_message_chunk","content":{"type":"text","text":"me"}}"#,
            r#"{"sessionUpdate":"available_commands_update","availableCommands":[{"name":"x","description":"y"}]}"#,
            r#"{"sessionId":"s","toolCall":{"toolCallId":"t","title":"rm -rf build","kind":"execute"},"options":[{"optionId":"yes","name":"Allow","kind":"allow_once"},{"optionId":"no","name":"Deny","kind":"reject_once"}]}"#,
        ],
        None,
        &|input| {
            if let Ok(update) = serde_json::from_slice::<SessionUpdate>(input)
                && let Some((kind, data)) = map_update(&update)
            {
                assert!(data.is_object(), "{kind:?} data is an object: {data}");
                serde_json::to_string(&data).expect("mapped data serializes");
            }
            if let Ok(req) = serde_json::from_slice::<RequestPermissionRequest>(input) {
                let data = input_required("req_1", &req);
                assert!(data.is_object(), "input_required is an object: {data}");
            }
        },
    );
}

#[test]
fn fuzz_websocket_control_frames() {
    fuzz(
        "ws_control",
        &[
            r#"{"type":"resize","cols":80,"rows":24}"#,
            r#"{"type":"ping"}"#,
            r#"{"type":"pong"}"#,
            r#"{"type":"exit","code":0}"#,
            r#"{"type":"error","message":"x"}"#,
        ],
        None,
        &|input| {
            let Ok(text) = std::str::from_utf8(input) else {
                return;
            };
            match read_control(text) {
                ControlAsk::Resize { cols, rows } => {
                    assert!((1..=2000).contains(&cols) && (1..=1000).contains(&rows));
                }
                ControlAsk::Reply(reply) => {
                    assert!(
                        matches!(reply, Control::Pong | Control::Error { .. }),
                        "a client frame is answered with pong or error: {reply:?}"
                    );
                    serde_json::to_string(&reply).expect("the reply serializes");
                }
            }
        },
    );
}
