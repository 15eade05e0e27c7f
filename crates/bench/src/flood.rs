//! `sandwarden-bench flood`: issue 18's descriptor flood, measured. One release `serve` with its
//! default caps; tenant `flooder` opens `--connections` connections, each asking for its session's
//! event stream, and keeps every one, answered or refused; tenant `steady` sends messages to its
//! echo session, quiet and then during the flood, side by side in one run. serve's descriptors and
//! memory are sampled throughout. The flood's client is the test kit's (`sandwarden_testkit::flood`),
//! which tests/light/tenancy.rs uses too.

use crate::bench::{BenchArgs, fmt_us, histogram, load_average, machine_line, row};
use crate::serve::{KEY, create_as, get_session_as as session, start_serve_args, unary_turn_as};
use anyhow::Context;
use hdrhistogram::Histogram;
use sandwarden_testkit::flood::{flood, hold, outcomes};
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;

/// Flood connections being opened at once by each flood worker process.
const IN_FLIGHT: usize = 400;
/// The steady tenant's messages before measuring, then in the quiet and the after phases.
const WARM_UP: usize = 100;
const QUIET: usize = 2000;
const AFTER: usize = 500;
/// How often a fresh connection asks for `/healthz` during the flood.
const HEALTH_EVERY: Duration = Duration::from_millis(50);
/// How often serve's descriptors and memory are read. Listing /proc/PID/fd costs about 1 µs per
/// descriptor, in this process, which also times the steady tenant: every 5 ms it kept 10–20 % of
/// a core busy beside the turns being timed.
const SAMPLE_EVERY: Duration = Duration::from_millis(50);

/// A tenant's key, made with the admin key.
async fn tenant_key(http: &reqwest::Client, base: &str, tenant: &str) -> anyhow::Result<String> {
    let v: serde_json::Value = http
        .post(format!("{base}/v1/api-keys"))
        .bearer_auth(KEY)
        .json(&json!({ "tenant": tenant }))
        .send()
        .await?
        .json()
        .await?;
    Ok(v["key"]
        .as_str()
        .with_context(|| format!("no key in {v}"))?
        .to_string())
}

/// A new `echo` session of the key's tenant, once it is ready.
async fn echo_session(http: &reqwest::Client, base: &str, key: &str) -> anyhow::Result<String> {
    let v = create_as(http, base, key, "echo").await?;
    let id = v["id"]
        .as_str()
        .with_context(|| format!("no session id in {v}"))?
        .to_string();
    let s = session(http, base, key, &format!("{id}?wait=true&timeout=60")).await?;
    anyhow::ensure!(s["status"] == "ready", "session did not become ready: {s}");
    Ok(id)
}

/// One unary message of the steady tenant: microseconds from the POST to the whole reply.
async fn say(http: &reqwest::Client, base: &str, key: &str, id: &str) -> anyhow::Result<u64> {
    Ok(unary_turn_as(http, base, key, id, "steady").await?.0)
}

/// serve's descriptors and resident memory, at their peaks while sampled.
#[derive(Default, Clone, Copy)]
struct Peaks {
    fds: usize,
    rss_kib: u64,
}

/// Reads serve's descriptors and memory every `SAMPLE_EVERY` until `stop`.
fn sample(pid: u32, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Peaks> {
    std::thread::spawn(move || {
        let mut peaks = Peaks::default();
        while !stop.load(Ordering::Relaxed) {
            peaks.fds = peaks.fds.max(sandwarden::procfs::open_files(pid));
            peaks.rss_kib = peaks.rss_kib.max(sandwarden::procfs::rss_kib(pid));
            std::thread::sleep(SAMPLE_EVERY);
        }
        peaks
    })
}

/// Most flood connections one process keeps: a process may not hold more descriptors than its
/// hard limit (often 20,000 or less, and raising it needs privileges), so a larger flood is
/// spread over worker processes (`sandwarden-bench flood-worker`).
const PER_WORKER: usize = 8000;

/// What a worker is told, in `SANDWARDEN_FLOOD_WORKER`: `ADDR PATH KEY COUNT`.
const WORKER_ENV: &str = "SANDWARDEN_FLOOD_WORKER";

/// A flood worker: opens its share of the flood, prints how the connections were answered (one
/// JSON line: outcome → [connections, closed by serve]), then keeps them all until its stdin
/// closes.
pub async fn worker() -> anyhow::Result<String> {
    use std::io::Write;
    let task = std::env::var(WORKER_ENV).with_context(|| format!("{WORKER_ENV} is unset"))?;
    let fields: Vec<&str> = task.split(' ').collect();
    let [addr, path, key, count] = fields[..] else {
        anyhow::bail!("{WORKER_ENV} must be `ADDR PATH KEY COUNT`");
    };
    let count: usize = count.parse().context("COUNT")?;
    sandwarden::serve::raise_nofile(count as u64 + IN_FLIGHT as u64 + 256)?;
    let held = flood(addr, path, key, true, count, IN_FLIGHT).await;
    let mut stdout = std::io::stdout();
    writeln!(stdout, "{}", serde_json::to_string(&outcomes(&held))?)?;
    stdout.flush()?;
    let mut rest = Vec::new();
    tokio::io::stdin().read_to_end(&mut rest).await?;
    drop(held);
    Ok(String::new())
}

/// The flood over `workers` processes; returns once every connection is answered, with the
/// outcomes, and the workers, which keep their connections until dropped.
async fn flood_in_workers(
    addr: &str,
    path: &str,
    key: &str,
    n: usize,
    nice: u8,
) -> anyhow::Result<(BTreeMap<String, (usize, usize)>, Vec<tokio::process::Child>)> {
    use tokio::io::AsyncBufReadExt;
    let workers = n.div_ceil(PER_WORKER);
    let mut children = Vec::new();
    for w in 0..workers {
        let share = n / workers + usize::from(w < n % workers);
        let exe = std::env::current_exe()?;
        let mut command = if nice == 0 {
            tokio::process::Command::new(exe)
        } else {
            let mut c = tokio::process::Command::new("nice");
            c.args(["-n", &nice.to_string()]).arg(exe);
            c
        };
        children.push(
            command
                .arg("flood-worker")
                .env(WORKER_ENV, format!("{addr} {path} {key} {share}"))
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .context("starting a flood worker")?,
        );
    }
    let reports = children.iter_mut().map(|child| async move {
        let stdout = child.stdout.take().context("a worker's stdout")?;
        let mut line = String::new();
        tokio::io::BufReader::new(stdout)
            .read_line(&mut line)
            .await?;
        let got: BTreeMap<String, (usize, usize)> =
            serde_json::from_str(&line).with_context(|| format!("a flood worker said {line:?}"))?;
        anyhow::Ok(got)
    });
    let mut all = BTreeMap::new();
    for got in futures::future::join_all(reports).await {
        for (name, (count, closed)) in got? {
            let entry: &mut (usize, usize) = all.entry(name).or_default();
            entry.0 += count;
            entry.1 += closed;
        }
    }
    Ok((all, children))
}

/// `/healthz` on a fresh connection to `addr` every `HEALTH_EVERY` while `flooding`: the
/// answered ones' times, and how many failed.
async fn health_checks(
    addr: String,
    flooding: Arc<AtomicBool>,
) -> anyhow::Result<(Histogram<u64>, usize)> {
    let mut answered = histogram()?;
    let mut failed = 0usize;
    while flooding.load(Ordering::Relaxed) {
        let t = Instant::now();
        let h = hold(&addr, "/healthz", "", false).await;
        if h.status == Some(200) {
            answered.record(t.elapsed().as_micros() as u64)?;
        } else {
            failed += 1;
        }
        tokio::time::sleep(HEALTH_EVERY).await;
    }
    Ok((answered, failed))
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

pub async fn run(args: &BenchArgs) -> anyhow::Result<String> {
    let n = args.connections;
    let nice = args.flood_nice;
    anyhow::ensure!(n > 0, "--connections must be at least 1");
    // serve with its default caps (the bench harness lifts them for the other scenarios).
    let defaults = [
        ("SANDWARDEN_TENANT_STREAMS", "500"),
        ("SANDWARDEN_TENANT_CONNECTIONS", "1000"),
        ("SANDWARDEN_TENANT_REQUESTS", "500"),
    ]
    .map(|(k, v)| (k.to_string(), v.to_string()));
    let serve = start_serve_args(
        |_| {
            Ok(["--pool", "echo=2", "--probe-listen", "127.0.0.1:0"]
                .map(String::from)
                .to_vec())
        },
        &defaults,
    )?;
    let probes = serve.probes.clone().context("no probes address")?;
    let pid = serve.child.id();
    let base = serve.base.clone();
    let addr = base.trim_start_matches("http://").to_string();
    let serve_limit = std::fs::read_to_string(format!("/proc/{pid}/limits"))
        .ok()
        .and_then(|l| {
            l.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3).map(str::to_string))
        })
        .unwrap_or_else(|| "unknown".into());
    let mut out = format!(
        "Command: `sandwarden-bench flood --connections {n}` (release build; {IN_FLIGHT} flood \
         connections being opened at once per worker process, every one kept; serve with its default \
         caps: `--tenant-streams 500 --tenant-connections 1000 --tenant-requests 500`, no \
         request rate (`--key-request-rate 0`: it would refuse the flood before these caps), \
         `--max-connections` three quarters of its open-file limit). Machine: {}; load average at \
         the start {}; serve's open-file limit {serve_limit}; the flood's client: {} worker \
         processes of at most {PER_WORKER} connections each, at niceness {nice}.\n\n",
        machine_line(),
        load_average(),
        n.div_ceil(PER_WORKER),
    );

    let http = reqwest::Client::builder().tcp_nodelay(true).build()?;
    let flood_key = tenant_key(&http, &base, "flooder").await?;
    let steady_key = tenant_key(&http, &base, "steady").await?;
    let target = echo_session(&http, &base, &flood_key).await?;
    let own = echo_session(&http, &base, &steady_key).await?;
    for _ in 0..WARM_UP {
        say(&http, &base, &steady_key, &own).await?;
    }
    let mut quiet = histogram()?;
    for _ in 0..QUIET {
        quiet.record(say(&http, &base, &steady_key, &own).await?)?;
    }
    let fds_before = sandwarden::procfs::open_files(pid);
    let rss_before = sandwarden::procfs::rss_kib(pid);

    // The flood, with the steady tenant's messages and fresh `/healthz` connections alongside.
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = sample(pid, stop.clone());
    let flooding = Arc::new(AtomicBool::new(true));
    let t0 = Instant::now();
    let events = format!("/v1/sessions/{target}/events");
    // The flood and the health checks are tasks of their own, so that this one, which times
    // the steady tenant, is not also the one polling the flood's connections.
    let flood_run = tokio::spawn({
        let flooding = flooding.clone();
        let (addr, events, key) = (addr.clone(), events.clone(), flood_key.clone());
        async move {
            let held = flood_in_workers(&addr, &events, &key, n, nice).await;
            flooding.store(false, Ordering::Relaxed);
            (held, t0.elapsed())
        }
    });
    let health_run = tokio::spawn(health_checks(addr.clone(), flooding.clone()));
    let probes_run = tokio::spawn(health_checks(probes, flooding.clone()));
    let mut during = histogram()?;
    while flooding.load(Ordering::Relaxed) {
        during.record(say(&http, &base, &steady_key, &own).await?)?;
    }
    let (held, flood_wall) = flood_run.await?;
    let (outcomes, workers) = held?;
    let (health, health_failed) = health_run.await??;
    let (probed, probes_failed) = probes_run.await??;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let fds_held = sandwarden::procfs::open_files(pid);
    let mut after = histogram()?;
    for _ in 0..AFTER {
        after.record(say(&http, &base, &steady_key, &own).await?)?;
    }
    stop.store(true, Ordering::Relaxed);
    let peaks = sampler.join().unwrap_or_default();
    let hwm = sandwarden::procfs::peak_rss_kib(pid);
    let mut statuses = Vec::new();
    for (key, id) in [(&flood_key, &target), (&steady_key, &own)] {
        let s = session(&http, &base, key, id).await?;
        statuses.push(s["status"].as_str().unwrap_or("unknown").to_string());
    }

    out.push_str("### The other tenant's messages (unary echo turns, one at a time)\n\n");
    out.push_str("| phase | p50 | p99 | p99.9 | samples |\n|---|---|---|---|---|\n");
    out.push_str(&row("quiet, before the flood", &quiet));
    out.push('\n');
    out.push_str(&row(
        &format!("during the flood ({n} connections opened)"),
        &during,
    ));
    out.push('\n');
    out.push_str(&row("after, the flood's connections still held", &after));
    out.push_str("\n\n");
    let ratio = |h: &Histogram<u64>| {
        h.value_at_quantile(0.99) as f64 / quiet.value_at_quantile(0.99).max(1) as f64
    };
    out.push_str(&format!(
        "p99 during the flood / quiet p99: **{:.2}×** (target: at most 2×); after: {:.2}×.\n\n",
        ratio(&during),
        ratio(&after),
    ));
    out.push_str(&format!(
        "### The flood\n\n{n} connections asking for one session's event stream, all opened in \
         {:.1} s and kept by the client.\n\n| answer | connections | of them closed by serve \
         |\n|---|---|---|\n",
        flood_wall.as_secs_f64()
    ));
    for (name, (count, closed)) in outcomes {
        out.push_str(&format!("| {name} | {count} | {closed} |\n"));
    }
    out.push_str(&format!(
        "\n| serve | value |\n|---|---|\n\
         | open descriptors before the flood | {fds_before} |\n\
         | open descriptors at the peak (sampled every {} ms) | {} |\n\
         | open descriptors with the flood's connections held, 1 s after | {fds_held} |\n\
         | open-file limit | {serve_limit} |\n\
         | resident memory before the flood | {} |\n\
         | resident memory at the peak (sampled) | {} |\n\
         | VmHWM (peak since start) | {} |\n\
         | `/healthz` on a fresh connection every {} ms during the flood | {} answered (p50 {}, \
         max {}), {health_failed} failed |\n\
         | the same on `--probe-listen` | {} answered (p50 {}, max {}), {probes_failed} failed |\n\
         | sessions after (flooder's, steady's) | {} |\n\n",
        SAMPLE_EVERY.as_millis(),
        peaks.fds,
        mib(rss_before),
        mib(peaks.rss_kib),
        mib(hwm),
        HEALTH_EVERY.as_millis(),
        health.len(),
        fmt_us(health.value_at_quantile(0.5)),
        fmt_us(health.max()),
        probed.len(),
        fmt_us(probed.value_at_quantile(0.5)),
        fmt_us(probed.max()),
        statuses.join(", "),
    ));
    drop(workers);
    Ok(out)
}
