//! `sandwarden-bench postgres`: what the PostgreSQL store costs on the message path, against the
//! SQLite store and the harness reached directly (interleaved in one run, same client), and how
//! long an event takes to reach an SSE client on another replica than the one running the turn.

use crate::bench::{
    BenchArgs, TOKEN, fmt_added, histogram, machine_line, row, start_harness, wait_ready,
};
use crate::serve::{KEY, Serve, create, start_serve_env, unary_turn, wait_ready_session};
use anyhow::Context;
use futures::StreamExt;
use hdrhistogram::Histogram;
use sandwarden_proto::harness_client::HarnessClient;
use serde_json::json;
use std::collections::HashMap;
use std::time::{Duration, Instant};

const TEMPLATES: &str = r#"[{"name":"sh","kind":"tui","command":"sh","pool":0}]"#;

/// A `serve` on the PostgreSQL database `db` with the shared `secret`.
fn start_on(db: &str, secret: &str) -> anyhow::Result<Serve> {
    start_serve_env(
        1,
        "local",
        TEMPLATES,
        &[
            ("SANDWARDEN_STORE".into(), db.into()),
            ("SANDWARDEN_SECRET".into(), secret.into()),
        ],
    )
}

/// A ready echo session on `base`.
async fn session(http: &reqwest::Client, base: &str) -> anyhow::Result<String> {
    let s = create(http, base, "echo").await?;
    let id = s["id"].as_str().context("session id")?.to_string();
    wait_ready_session(http, base, &id).await?;
    Ok(id)
}

/// Follows a session's events on `base`, sending `(seq, when it arrived)` until the stream ends.
fn follow(
    http: reqwest::Client,
    base: String,
    id: String,
    arrived: tokio::sync::mpsc::UnboundedSender<(i64, Instant)>,
) -> tokio::task::JoinHandle<anyhow::Result<()>> {
    tokio::spawn(async move {
        use eventsource_stream::Eventsource;
        let resp = http
            .get(format!("{base}/v1/sessions/{id}/events"))
            .header("accept", "text/event-stream")
            .bearer_auth(KEY)
            .send()
            .await?;
        anyhow::ensure!(resp.status().is_success(), "events: {}", resp.status());
        let mut events = resp.bytes_stream().eventsource();
        while let Some(e) = events.next().await {
            let e = e.map_err(|e| anyhow::anyhow!("{e}"))?;
            let seq: i64 = e.id.parse().context("event id")?;
            if arrived.send((seq, Instant::now())).is_err() {
                break;
            }
        }
        Ok(())
    })
}

pub async fn run(args: &BenchArgs) -> anyhow::Result<String> {
    let server = args
        .postgres
        .clone()
        .or_else(|| std::env::var("SANDWARDEN_TEST_POSTGRES").ok())
        .context("bench postgres needs a PostgreSQL server: --postgres URL (or SANDWARDEN_TEST_POSTGRES, e.g. from scripts/start-postgres)")?;
    let turns = (args.round_trips / 5).max(200);
    let http = reqwest::Client::builder().tcp_nodelay(true).build()?;
    let secret = hex::encode(rand::random::<[u8; 32]>());
    let db = sandwarden::store::Store::scratch_database(&server).await?;
    let mut out = format!(
        "Command: `sandwarden-bench postgres --round-trips {}` (release build; {turns} turns per path; \
         PostgreSQL {} on loopback, a fresh database, fsync={}, synchronous_commit={}). Machine: {}; \
         load average at the start {} (other work shares the cores).\n\n",
        args.round_trips,
        setting(&db, "server_version").await,
        setting(&db, "fsync").await,
        setting(&db, "synchronous_commit").await,
        machine_line(),
        crate::bench::load_average(),
    );

    // Message path: the harness directly, serve on SQLite, serve on PostgreSQL.
    let direct = start_harness(&["--kind", "api", "--agent", "sandwarden echo-agent"])?;
    let direct_base = format!("http://{}", direct.addr);
    wait_ready(&HarnessClient::new(direct_base.clone(), TOKEN)).await?;
    let sqlite = start_serve_env(1, "local", TEMPLATES, &[])?;
    let postgres = start_on(&db, &secret)?;
    let s_id = session(&http, &sqlite.base).await?;
    let p_id = session(&http, &postgres.base).await?;
    let body_direct = json!({"parts": [{"type": "text", "text": "ping"}]});
    let direct_turn = || async {
        let t0 = Instant::now();
        let r = http
            .post(format!("{direct_base}/v1/turns"))
            .bearer_auth(TOKEN)
            .json(&body_direct)
            .send()
            .await?;
        // The whole turn: read the stream to its end.
        r.bytes().await?;
        anyhow::Ok(t0.elapsed().as_micros() as u64)
    };
    for _ in 0..20 {
        direct_turn().await?;
        unary_turn(&http, &sqlite.base, &s_id, "ping").await?;
        unary_turn(&http, &postgres.base, &p_id, "ping").await?;
    }
    let (mut d, mut s, mut p) = (histogram()?, histogram()?, histogram()?);
    let block = 20;
    let mut done = 0;
    while done < turns {
        for _ in 0..block {
            d.record(direct_turn().await?)?;
        }
        for _ in 0..block {
            s.record(unary_turn(&http, &sqlite.base, &s_id, "ping").await?.0)?;
        }
        for _ in 0..block {
            p.record(unary_turn(&http, &postgres.base, &p_id, "ping").await?.0)?;
        }
        done += block;
    }
    drop(direct);
    drop(sqlite);
    out.push_str("### Message path: PostgreSQL store vs SQLite store vs the harness directly\n\n");
    out.push_str("| path | p50 | p99 | p99.9 | samples |\n|---|---|---|---|---|\n");
    out.push_str(&row("harness directly: whole turn", &d));
    out.push('\n');
    out.push_str(&row("through serve, SQLite store: unary message", &s));
    out.push('\n');
    out.push_str(&row("through serve, PostgreSQL store: unary message", &p));
    out.push_str("\n\n");
    let added = |a: &Histogram<u64>, q: f64| fmt_added(a, &d, q);
    out.push_str(&format!(
        "Added over the harness directly: SQLite p50 {}, p99 {}; PostgreSQL p50 {}, p99 {}. \
         A PostgreSQL turn makes two statements on its path, each one round trip: the start \
         (the session's conditional update with the turn's inserts) and the end (with the events \
         queued before it), which also carry the notices to other replicas.\n\n",
        added(&s, 0.5),
        added(&s, 0.99),
        added(&p, 0.5),
        added(&p, 0.99),
    ));

    // Fan-out: turns on replica A, the same session's events followed on A and on B.
    let other = start_on(&db, &secret)?;
    let f_id = session(&http, &postgres.base).await?;
    let (tx_a, mut rx_a) = tokio::sync::mpsc::unbounded_channel();
    let (tx_b, mut rx_b) = tokio::sync::mpsc::unbounded_channel();
    let on_a = follow(http.clone(), postgres.base.clone(), f_id.clone(), tx_a);
    let on_b = follow(http.clone(), other.base.clone(), f_id.clone(), tx_b);
    // Both streams are subscribed once they have answered; give them that moment.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let fan_turns = (turns / 2).max(100);
    for _ in 0..fan_turns {
        unary_turn(&http, &postgres.base, &f_id, "ping").await?;
    }
    // The session's last seq, paging through its history.
    let mut last = 0;
    loop {
        let page: serde_json::Value = http
            .get(format!(
                "{}/v1/sessions/{f_id}/events?since={last}&limit=1000",
                postgres.base
            ))
            .bearer_auth(KEY)
            .send()
            .await?
            .json()
            .await?;
        match page["events"].as_array().context("events")?.last() {
            Some(e) => last = e["seq"].as_i64().context("seq")?,
            None => break,
        }
    }
    let seen_a = arrivals(&mut rx_a, last).await?;
    let seen_b = arrivals(&mut rx_b, last).await?;
    on_a.abort();
    on_b.abort();
    let mut fan = histogram()?;
    for (seq, at_a) in &seen_a {
        if let Some(at_b) = seen_b.get(seq) {
            fan.record(at_b.saturating_duration_since(*at_a).as_micros().max(1) as u64)?;
        }
    }
    out.push_str("### Event fan-out across replicas\n\n");
    out.push_str(&format!(
        "{fan_turns} turns on replica A; the session's events followed over SSE on A (the replica \
         running the turn) and on B (LISTEN/NOTIFY, then a read of the new rows). Delay of each \
         event on B after A:\n\n"
    ));
    out.push_str("| delay | p50 | p99 | p99.9 | samples |\n|---|---|---|---|---|\n");
    out.push_str(&row("event on replica B after replica A", &fan));
    out.push_str("\n\n");
    out.push_str(
        "A publishes to its own subscribers before the event is committed; B sees it after the \
         writer's commit (events wait for company at most until the writer's current batch ends), \
         the notification and one indexed read.\n",
    );
    Ok(out)
}

/// When each of events `1..=last` arrived on one stream.
async fn arrivals(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<(i64, Instant)>,
    last: i64,
) -> anyhow::Result<HashMap<i64, Instant>> {
    let mut seen = HashMap::new();
    while seen.len() < usize::try_from(last).unwrap_or(0) {
        let (seq, at) = tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await
            .context("a stream stalled")?
            .context("a stream ended")?;
        seen.insert(seq, at);
    }
    Ok(seen)
}

/// A server setting, for the report (`?` if it cannot be read).
async fn setting(db: &str, name: &str) -> String {
    let read = async {
        let pool = sqlx::PgPool::connect(db).await?;
        let v: String = sqlx::query_scalar("SELECT current_setting($1)")
            .bind(name)
            .fetch_one(&pool)
            .await?;
        pool.close().await;
        anyhow::Ok(v)
    };
    match read.await {
        Ok(v) => v.split_whitespace().next().unwrap_or("?").to_string(),
        Err(_) => "?".into(),
    }
}
