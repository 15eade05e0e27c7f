//! The CLI client of the public API: sessions, messages streamed as they arrive, approvals,
//! history and events, keys and usage, a chat REPL and a terminal attach. It speaks HTTP and
//! WebSocket only. Every failure exits non-zero with a message that says what to do next (the
//! CLI verb to use, where there is one) and what was asked of which server.

mod attach;
mod chat;

pub use attach::{DETACH_KEY, attach};
pub use chat::chat;

use anyhow::{Context, bail};
use futures::StreamExt;
use serde_json::{Value, json};
use std::io::Write;

#[derive(Debug, clap::Args, Clone)]
pub struct Connection {
    /// The server's root URL, with its scheme (`http://host:port`, without `/v1`).
    #[arg(
        long,
        env = "SANDWARDEN_URL",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    pub url: String,
    /// The API key (`serve` prints the admin key on its first start; `keys create` makes more).
    #[arg(
        long = "api-key",
        env = "SANDWARDEN_API_KEY",
        hide_env_values = true,
        global = true
    )]
    pub api_key: Option<String>,
}

/// The CLI ends with this exit status (a terminal program's own, for `attach`), after printing
/// `message` when there is one.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ExitStatus {
    pub code: u8,
    pub message: String,
}

/// The server's root from `--url`/`SANDWARDEN_URL`, or an error saying how to write it.
pub fn server_root(url: &str) -> anyhow::Result<String> {
    let Some((scheme, rest)) = url.trim().split_once("://") else {
        let root = url.trim().trim_end_matches('/');
        bail!(
            "the server URL {url:?} has no scheme: write it as http://{root} (set SANDWARDEN_URL or pass --url)"
        );
    };
    let rest = rest.trim_end_matches('/');
    let root = format!("{scheme}://{rest}");
    if scheme != "http" && scheme != "https" {
        bail!(
            "the server URL {url:?} must start with http:// or https:// (set SANDWARDEN_URL or pass --url)"
        );
    }
    if let Some(base) = root.strip_suffix("/v1") {
        bail!(
            "the server URL {url:?} ends in /v1: give the server's root, {base} (the CLI adds /v1 itself; set SANDWARDEN_URL or pass --url)"
        );
    }
    if rest.is_empty() {
        bail!("the server URL {url:?} names no host (set SANDWARDEN_URL or pass --url)");
    }
    let parsed = url::Url::parse(&root).with_context(|| {
        format!("the server URL {url:?} is not a URL (set SANDWARDEN_URL or pass --url)")
    })?;
    if parsed.host_str().is_none() {
        bail!("the server URL {url:?} names no host (set SANDWARDEN_URL or pass --url)");
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        // It would be printed in every error; the API key is the credential.
        bail!(
            "the server URL holds a user or password: leave them out (the API key goes in SANDWARDEN_API_KEY)"
        );
    }
    Ok(root)
}

/// What the person should do about a refusal, in CLI verbs, when the problem's type says.
fn hint(kind: &str, id: Option<&str>, v: &Value) -> Option<String> {
    let id = id.unwrap_or("ID");
    Some(match kind {
        "unauthorized" => "the API key was refused: set SANDWARDEN_API_KEY (or --api-key) to the key `sandwarden serve` printed, or one `sandwarden keys create` made".into(),
        "session_not_found" => format!("there is no session {id} for this key: `sandwarden session list` shows yours"),
        "tui_session" => format!("{id} is a terminal session: attach to it with `sandwarden attach {id}`"),
        "not_a_terminal" => format!("{id} runs an API agent, not a terminal: talk to it with `sandwarden chat {id}` or `sandwarden send {id} TEXT`"),
        "turn_in_progress" => format!("a turn is running in {id}: wait for it, or stop it with `sandwarden cancel {id}`"),
        "no_turn_running" => format!("no turn is running in {id}: nothing to cancel"),
        "session_not_usable" => format!(
            "{id} is {} and takes no more work{}: start another with `sandwarden session create TEMPLATE`",
            v["session_status"].as_str().unwrap_or("ended"),
            v["detail"].as_str().map(|d| format!(" ({d})")).unwrap_or_default()
        ),
        "session_not_ready" => format!("{id} is still starting: wait with `sandwarden session get {id} --wait`"),
        "unknown_harness" => "no such template: `sandwarden templates` lists them".into(),
        "input_not_found" => format!("that question is not waiting for an answer (answered already, or its turn ended): `sandwarden events {id}` shows the session's questions"),
        "not_found" => "the server has no such route: is SANDWARDEN_URL the sandwarden server's root?".into(),
        _ => return None,
    })
}

pub struct Client {
    base: String,
    key: String,
    http: reqwest::Client,
}

impl Client {
    pub fn new(c: &Connection) -> anyhow::Result<Client> {
        let base = server_root(&c.url)?;
        let Some(key) = c.api_key.clone().filter(|k| !k.is_empty()) else {
            bail!(
                "no API key: set SANDWARDEN_API_KEY (printed by `sandwarden serve` on first start) or pass --api-key"
            );
        };
        Ok(Client {
            base,
            key,
            http: reqwest::Client::new(),
        })
    }

    /// A request to `path` (under the server's root) with the key.
    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.key)
    }

    /// Sends a request; a failure says what to do, and what was asked of which server.
    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
        id: Option<&str>,
    ) -> anyhow::Result<reqwest::Response> {
        let mut req = self.request(method.clone(), path);
        if let Some(b) = body {
            req = req.json(b);
        }
        let asked = format!("{method} {}{path}", self.base);
        let resp = req.send().await.map_err(|e| {
            anyhow::anyhow!(
                "cannot reach sandwarden at {} ({}): is `sandwarden serve` running there? Set SANDWARDEN_URL or pass --url [{asked}]",
                self.base,
                root_cause(&e)
            )
        })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let problem = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|t| t.contains("json"));
        let text = resp.text().await.unwrap_or_default();
        let v: Value = if problem {
            serde_json::from_str(&text).unwrap_or(Value::Null)
        } else {
            Value::Null
        };
        Err(refusal(&self.base, status.as_u16(), &v, id, &asked))
    }

    /// A JSON call: the answer's body, or an error as for `send`.
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
        id: Option<&str>,
    ) -> anyhow::Result<Value> {
        let resp = self.send(method, path, body.as_ref(), id).await?;
        let text = resp.text().await.context("reading the server's answer")?;
        Ok(serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }
}

/// One segment of a URL's path: everything but letters, digits and `-._~` percent-encoded, so an
/// id (a session's, or a question's from the agent) cannot reach another route.
pub(crate) fn seg(id: &str) -> String {
    let mut out = String::with_capacity(id.len());
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `text` (from the server, or an agent through it) safe to print on a person's terminal: control
/// characters other than newline and tab, which could move the cursor, retitle the window or
/// write the clipboard (escape sequences), are shown in caret notation (`^[`) instead.
pub(crate) fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\n' | '\t' => out.push(c),
            // A line's end as CR LF is just a line's end.
            '\r' if chars.peek() == Some(&'\n') => {}
            '\u{0}'..='\u{1f}' => {
                out.push('^');
                out.push(char::from(c as u8 + 64));
            }
            '\u{7f}' => out.push_str("^?"),
            '\u{80}'..='\u{9f}' => out.push('\u{fffd}'),
            _ => out.push(c),
        }
    }
    out
}

/// A refusal by the server (`v`: its problem document, if it sent one) in CLI terms: what to do,
/// then what was asked.
fn refusal(base: &str, status: u16, v: &Value, id: Option<&str>, asked: &str) -> anyhow::Error {
    let kind = v["type"].as_str().unwrap_or("");
    if kind.is_empty() {
        return anyhow::anyhow!(
            "the server at {base} answered {status} without a sandwarden error: is SANDWARDEN_URL the sandwarden server's root? [{asked}]"
        );
    }
    let message =
        hint(kind, id, v).unwrap_or_else(|| v["detail"].as_str().unwrap_or("").to_string());
    anyhow::anyhow!(
        "{} [{status} {}: {asked}]",
        printable(&message),
        printable(kind)
    )
}

/// The innermost cause of a transport error (reqwest's own message names only the URL).
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

/// `path` with the query's `name=value` pairs, if any.
fn with_query(path: &str, query: &[String]) -> String {
    if query.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{}", query.join("&"))
    }
}

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

#[derive(Debug, clap::Subcommand)]
pub enum SessionCommand {
    /// Create a session and print it (JSON).
    Create {
        /// The template to run, e.g. echo or shell (`sandwarden templates` lists them).
        harness: String,
        /// A title to tell the session by.
        #[arg(long)]
        title: Option<String>,
        /// Per-session environment, NAME=VALUE (repeatable; never stored).
        #[arg(long = "env")]
        env: Vec<String>,
        /// Wait until the sandbox is ready (shows progress).
        #[arg(long)]
        wait: bool,
    },
    /// List your sessions: id, template, status, title.
    List {
        /// Only sessions in this status (creating, ready, running, input_required, failed, dead,
        /// deleted).
        #[arg(long)]
        status: Option<String>,
        /// Only sessions of this template.
        #[arg(long)]
        harness: Option<String>,
    },
    /// Show one session (JSON).
    Get {
        /// The session's id (or the name it was created with).
        id: String,
        /// Wait until it is no longer creating or running.
        #[arg(long)]
        wait: bool,
    },
    /// Delete a session and stop its sandbox (idempotent; its history stays readable).
    Delete {
        /// The session's id (or name).
        id: String,
    },
}

#[derive(Debug, clap::Subcommand)]
pub enum KeysCommand {
    /// Create an API key for a tenant and print it (shown only now; the server keeps its hash).
    Create {
        /// The tenant the key acts for (letters, digits, `-`, `_`, `.`).
        #[arg(long)]
        tenant: String,
    },
    /// List API keys: id, tenant, created, last used, revoked (never the keys themselves).
    List {
        /// Only this tenant's keys.
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Revoke an API key at once (on every replica); its requests are refused from then on.
    Revoke {
        /// The key's id (`key_…`, as `keys list` shows it).
        id: String,
    },
}

/// Prints "waiting…" progress on stderr, one dot per poll, and always ends its line.
struct Progress {
    started: bool,
}

impl Progress {
    fn tick(&mut self, what: &str) {
        if !self.started {
            eprint!("{what}");
            self.started = true;
        }
        eprint!(".");
        let _ = std::io::stderr().flush();
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if self.started {
            eprintln!();
        }
    }
}

/// `sandwarden session …`.
pub async fn session(conn: &Connection, cmd: SessionCommand) -> anyhow::Result<()> {
    let c = Client::new(conn)?;
    use reqwest::Method;
    match cmd {
        SessionCommand::Create {
            harness,
            title,
            env,
            wait,
        } => {
            let mut envs = serde_json::Map::new();
            for e in env {
                let (k, v) = e
                    .split_once('=')
                    .with_context(|| format!("--env {e:?} must look like NAME=VALUE"))?;
                envs.insert(k.to_string(), Value::String(v.to_string()));
            }
            let mut s = c
                .call(
                    Method::POST,
                    "/v1/sessions",
                    Some(json!({"harness": harness, "title": title, "env": envs})),
                    None,
                )
                .await?;
            if wait {
                let id = s["id"].as_str().unwrap_or_default().to_string();
                let mut progress = Progress { started: false };
                while s["status"] == "creating" {
                    progress.tick("waiting for the sandbox");
                    s = c
                        .call(
                            Method::GET,
                            &format!("/v1/sessions/{}?wait=true&timeout=5", seg(&id)),
                            None,
                            Some(&id),
                        )
                        .await?;
                }
                drop(progress);
                if s["status"] == "failed" {
                    print_json(&s);
                    bail!(
                        "the session failed to start: {}",
                        s["failure_reason"].as_str().unwrap_or("no reason given")
                    );
                }
            }
            print_json(&s);
        }
        SessionCommand::List { status, harness } => {
            let mut query = vec![];
            if let Some(s) = status {
                query.push(format!("status={s}"));
            }
            if let Some(h) = harness {
                query.push(format!("harness={h}"));
            }
            let mut cursor: Option<String> = None;
            loop {
                let mut q = query.clone();
                if let Some(cur) = &cursor {
                    q.push(format!("cursor={cur}"));
                }
                let page = c
                    .call(Method::GET, &with_query("/v1/sessions", &q), None, None)
                    .await?;
                for s in page["sessions"].as_array().into_iter().flatten() {
                    println!(
                        "{}\t{}\t{}\t{}",
                        s["id"].as_str().unwrap_or(""),
                        s["harness"].as_str().unwrap_or(""),
                        s["status"].as_str().unwrap_or(""),
                        s["title"].as_str().unwrap_or("")
                    );
                }
                match page["next_cursor"].as_str() {
                    Some(next) => cursor = Some(next.to_string()),
                    None => break,
                }
            }
        }
        SessionCommand::Get { id, wait } => {
            let path = if wait {
                format!("/v1/sessions/{}?wait=true&timeout=60", seg(&id))
            } else {
                format!("/v1/sessions/{}", seg(&id))
            };
            print_json(&c.call(Method::GET, &path, None, Some(&id)).await?);
        }
        SessionCommand::Delete { id } => {
            print_json(
                &c.call(
                    Method::DELETE,
                    &format!("/v1/sessions/{}", seg(&id)),
                    None,
                    Some(&id),
                )
                .await?,
            );
        }
    }
    Ok(())
}

/// `sandwarden templates`: one line per template (name, kind, warm sandboxes, idle and turn
/// timeouts).
pub async fn templates(conn: &Connection) -> anyhow::Result<()> {
    let c = Client::new(conn)?;
    let list = c
        .call(reqwest::Method::GET, "/v1/templates", None, None)
        .await?;
    println!("NAME\tKIND\tWARM\tIDLE_TIMEOUT_S\tTURN_TIMEOUT_S");
    for t in list["templates"].as_array().into_iter().flatten() {
        println!(
            "{}\t{}\t{}\t{}\t{}",
            t["name"].as_str().unwrap_or(""),
            t["kind"].as_str().unwrap_or(""),
            t["warm_pool"],
            t["idle_timeout_s"],
            t["turn_timeout_s"]
        );
    }
    Ok(())
}

/// `sandwarden keys …`: the admin's key lifecycle (needs the admin key).
pub async fn keys(conn: &Connection, cmd: KeysCommand) -> anyhow::Result<()> {
    use reqwest::Method;
    let c = Client::new(conn)?;
    match cmd {
        KeysCommand::Create { tenant } => {
            let k = c
                .call(
                    Method::POST,
                    "/v1/api-keys",
                    Some(json!({ "tenant": tenant })),
                    None,
                )
                .await?;
            eprintln!(
                "created key {} for tenant {} (shown only now; the server keeps only its hash):",
                k["id"].as_str().unwrap_or(""),
                k["tenant"].as_str().unwrap_or("")
            );
            println!("{}", k["key"].as_str().unwrap_or(""));
        }
        KeysCommand::List { tenant } => {
            let path = match &tenant {
                Some(t) => format!("/v1/api-keys?tenant={t}"),
                None => "/v1/api-keys".to_string(),
            };
            let list = c.call(Method::GET, &path, None, None).await?;
            println!("ID\tTENANT\tADMIN\tCREATED\tLAST USED\tREVOKED");
            for k in list["api_keys"].as_array().into_iter().flatten() {
                let field = |name: &str| k[name].as_str().unwrap_or("-").to_string();
                println!(
                    "{}\t{}\t{}\t{}\t{}\t{}",
                    field("id"),
                    field("tenant"),
                    if k["admin"] == true { "admin" } else { "-" },
                    field("created_at"),
                    field("last_used_at"),
                    field("revoked_at"),
                );
            }
        }
        KeysCommand::Revoke { id } => {
            let k = c
                .call(Method::DELETE, &format!("/v1/api-keys/{id}"), None, None)
                .await?;
            println!(
                "revoked {} (tenant {}) at {}",
                k["id"].as_str().unwrap_or(""),
                k["tenant"].as_str().unwrap_or(""),
                k["revoked_at"].as_str().unwrap_or("")
            );
        }
    }
    Ok(())
}

/// `sandwarden usage`: tokens, turns and sandbox time per tenant (a tenant's key sees its own;
/// the admin key every tenant's, or one with `--tenant`).
pub async fn usage(
    conn: &Connection,
    since: Option<&str>,
    tenant: Option<&str>,
) -> anyhow::Result<()> {
    let c = Client::new(conn)?;
    let mut query = Vec::new();
    if let Some(s) = since {
        query.push(format!("since={s}"));
    }
    if let Some(t) = tenant {
        query.push(format!("tenant={t}"));
    }
    let answer = c
        .call(
            reqwest::Method::GET,
            &with_query("/v1/usage", &query),
            None,
            None,
        )
        .await?;
    println!("TENANT\tSESSIONS\tTURNS\tINPUT_TOKENS\tOUTPUT_TOKENS\tTURN_S\tSANDBOX_S");
    for t in answer["tenants"].as_array().into_iter().flatten() {
        println!(
            "{}\t{}\t{}\t{}\t{}\t{:.1}\t{:.1}",
            t["tenant"].as_str().unwrap_or(""),
            t["sessions"].as_array().map_or(0, Vec::len),
            t["turns"],
            t["input_tokens"],
            t["output_tokens"],
            t["turn_seconds"].as_f64().unwrap_or(0.0),
            t["sandbox_seconds"].as_f64().unwrap_or(0.0),
        );
    }
    Ok(())
}

/// `sandwarden cancel ID`: stops the session's running turn.
pub async fn cancel(conn: &Connection, id: &str) -> anyhow::Result<()> {
    let c = Client::new(conn)?;
    let answer = c
        .call(
            reqwest::Method::POST,
            &format!("/v1/sessions/{}/cancel", seg(id)),
            None,
            Some(id),
        )
        .await?;
    println!(
        "cancelling turn {}",
        answer["turn_id"].as_str().unwrap_or("")
    );
    Ok(())
}

/// An answer to an agent's question: approve once, approve for the rest of the session, deny.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    ApproveOnce,
    ApproveSession,
    Deny,
}

impl Decision {
    fn wire(self) -> &'static str {
        match self {
            Decision::ApproveOnce => "approve_once",
            Decision::ApproveSession => "approve_session",
            Decision::Deny => "deny",
        }
    }

    fn done(self) -> &'static str {
        match self {
            Decision::ApproveOnce => "approved",
            Decision::ApproveSession => "approved for the session",
            Decision::Deny => "denied",
        }
    }
}

impl Client {
    async fn answer(&self, id: &str, request_id: &str, decision: Decision) -> anyhow::Result<()> {
        // A dot segment would be resolved away however it is encoded.
        if request_id.is_empty() || request_id == "." || request_id == ".." {
            bail!("{request_id:?} is not a question's request id");
        }
        self.call(
            reqwest::Method::POST,
            &format!("/v1/sessions/{}/inputs/{}", seg(id), seg(request_id)),
            Some(json!({ "decision": decision.wire() })),
            Some(id),
        )
        .await?;
        Ok(())
    }
}

/// `sandwarden approve|deny ID [REQUEST_ID]`: answers a question the agent asked; without a
/// request id, the one question that waits.
pub async fn decide(
    conn: &Connection,
    id: &str,
    request_id: Option<&str>,
    decision: Decision,
) -> anyhow::Result<()> {
    let c = Client::new(conn)?;
    let request_id = match request_id {
        Some(r) => r.to_string(),
        None => {
            let waiting = c
                .call(
                    reqwest::Method::GET,
                    &format!("/v1/sessions/{}/inputs", seg(id)),
                    None,
                    Some(id),
                )
                .await?;
            let questions: Vec<(String, String)> = waiting["inputs"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|e| {
                    let q = TurnEvent::parse("input_required", &e.to_string());
                    match q {
                        Some(TurnEvent::Asked(q)) => (q.request_id, q.title),
                        _ => (String::new(), String::new()),
                    }
                })
                .collect();
            match questions.as_slice() {
                [] => bail!("no question waits in {id}: nothing to answer"),
                [(request_id, _)] => request_id.clone(),
                several => bail!(
                    "{} questions wait in {id}; name one: {}",
                    several.len(),
                    several
                        .iter()
                        .map(|(r, title)| format!("{r} ({title})"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            }
        }
    };
    c.answer(id, &request_id, decision).await?;
    println!("{}: {}", printable(&request_id), decision.done());
    Ok(())
}

/// `sandwarden history ID`: the session's messages, oldest first, read page by page.
pub async fn history(conn: &Connection, id: &str) -> anyhow::Result<()> {
    let c = Client::new(conn)?;
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(cur) => format!("/v1/sessions/{}/messages?cursor={cur}", seg(id)),
            None => format!("/v1/sessions/{}/messages", seg(id)),
        };
        let page = c.call(reqwest::Method::GET, &path, None, Some(id)).await?;
        for m in page["messages"].as_array().into_iter().flatten() {
            println!(
                "[{}] {}: {}",
                printable(m["created_at"].as_str().unwrap_or("")),
                printable(m["role"].as_str().unwrap_or("")),
                printable(m["text"].as_str().unwrap_or(""))
            );
        }
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_string()),
            None => return Ok(()),
        }
    }
}

/// `sandwarden events ID [--since SEQ] [--follow]`: the session's events, one JSON line each;
/// `--follow` keeps printing new ones as they happen (Ctrl-C ends).
pub async fn events(conn: &Connection, id: &str, since: i64, follow: bool) -> anyhow::Result<()> {
    let c = Client::new(conn)?;
    if follow {
        use eventsource_stream::Eventsource;
        let resp = c
            .send(
                reqwest::Method::GET,
                &format!("/v1/sessions/{}/events?stream=true&since={since}", seg(id)),
                None,
                Some(id),
            )
            .await?;
        let mut events = sandwarden_proto::event::without_bom(resp.bytes_stream()).eventsource();
        let mut stop = std::pin::pin!(tokio::signal::ctrl_c());
        loop {
            tokio::select! {
                event = events.next() => match event {
                    Some(Ok(e)) if !e.data.is_empty() => println!("{}", e.data),
                    Some(Ok(_)) => {}
                    Some(Err(e)) => bail!("the event stream broke: {e}; resume with `sandwarden events {id} --follow --since SEQ`"),
                    None => bail!("the server ended the event stream; resume with `sandwarden events {id} --follow --since SEQ`"),
                },
                _ = &mut stop => return Ok(()),
            }
        }
    }
    let mut since = since;
    loop {
        let page = c
            .call(
                reqwest::Method::GET,
                &format!("/v1/sessions/{}/events?since={since}&limit=1000", seg(id)),
                None,
                Some(id),
            )
            .await?;
        for e in page["events"].as_array().into_iter().flatten() {
            println!("{e}");
        }
        since = page["next_since"].as_i64().unwrap_or(since);
        if page["has_more"] != true {
            return Ok(());
        }
    }
}

/// `sandwarden send ID TEXT`: one message; the reply streams to stdout, tool activity and
/// questions to stderr. A question the agent asks is answered with `sandwarden approve|deny`.
pub async fn send(conn: &Connection, id: &str, text: &str) -> anyhow::Result<()> {
    let c = Client::new(conn)?;
    let mut turn = c.open_turn(id, text).await?;
    let mut out = std::io::stdout();
    while let Some(event) = turn.next().await {
        match event? {
            TurnEvent::Text(t) => {
                print!("{t}");
                let _ = out.flush();
            }
            TurnEvent::Note(n) => eprintln!("{n}"),
            TurnEvent::Asked(q) => eprintln!(
                "[input required] {}: answer with `sandwarden approve {id} {}` (add --session to allow it for the session) or `sandwarden deny {id} {}`",
                q.title, q.request_id, q.request_id
            ),
            TurnEvent::Done { .. } => {
                println!();
                return Ok(());
            }
            TurnEvent::Failed(why) => {
                println!();
                bail!("{why}");
            }
        }
    }
    bail!(
        "the event stream ended before the turn finished; `sandwarden history {id}` shows what was recorded"
    )
}

/// A question the agent asked during a turn.
#[derive(Debug, Clone)]
pub struct Question {
    pub request_id: String,
    pub title: String,
    /// A client tool call (answered with its output through the API, not with a decision).
    pub client_tool: Option<String>,
}

/// What a turn's event stream says, for a person.
#[derive(Debug)]
pub enum TurnEvent {
    Text(String),
    /// Reasoning and tool activity, a line each.
    Note(String),
    Asked(Question),
    Done {
        cancelled: bool,
    },
    Failed(String),
}

impl TurnEvent {
    /// The event named `kind` with its envelope `data` (JSON), when a person should see it.
    fn parse(kind: &str, data: &str) -> Option<TurnEvent> {
        let v: Value = serde_json::from_str(data).ok()?;
        let d = &v["data"];
        let s = |v: &Value| printable(v.as_str().unwrap_or(""));
        Some(match kind {
            "text" => TurnEvent::Text(s(&d["text"])),
            "reasoning" => TurnEvent::Note(format!("[thinking] {}", s(&d["text"]))),
            "tool_use" => TurnEvent::Note(format!("[tool] {} {}", s(&d["title"]), s(&d["status"]))),
            "tool_result" => {
                TurnEvent::Note(format!("[tool {}] {}", s(&d["status"]), s(&d["output"])))
            }
            "input_required" => TurnEvent::Asked(Question {
                request_id: s(&d["request_id"]),
                title: printable(
                    d["tool"]["title"]
                        .as_str()
                        .or(d["client_tool"]["name"].as_str())
                        .unwrap_or("the agent asks"),
                ),
                client_tool: d["client_tool"]["name"].as_str().map(printable),
            }),
            "done" => TurnEvent::Done {
                cancelled: d["stop_reason"] == "cancelled",
            },
            "error" if d["code"] == "cancelled" => TurnEvent::Done { cancelled: true },
            "error" => TurnEvent::Failed(format!(
                "the turn failed: {} ({})",
                s(&d["message"]),
                s(&d["code"])
            )),
            _ => return None,
        })
    }
}

impl Client {
    /// Sends `text` to session `id` as a streamed turn: its events, as they arrive.
    pub(crate) async fn open_turn(
        &self,
        id: &str,
        text: &str,
    ) -> anyhow::Result<
        impl futures::Stream<Item = anyhow::Result<TurnEvent>> + Send + Unpin + 'static,
    > {
        use eventsource_stream::Eventsource;
        let resp = self
            .send(
                reqwest::Method::POST,
                &format!("/v1/sessions/{}/messages", seg(id)),
                Some(&json!({"text": text, "stream": true})),
                Some(id),
            )
            .await?;
        let events = sandwarden_proto::event::without_bom(resp.bytes_stream()).eventsource();
        Ok(Box::pin(events.filter_map(|event| async move {
            match event {
                Ok(e) => TurnEvent::parse(&e.event, &e.data).map(Ok),
                Err(e) => Some(Err(anyhow::anyhow!("the event stream broke: {e}"))),
            }
        })))
    }
}

#[cfg(test)]
mod tests {
    use super::{printable, server_root};

    #[test]
    fn an_id_stays_one_path_segment() {
        assert_eq!(super::seg("ses_01-a.b~c"), "ses_01-a.b~c");
        assert_eq!(
            super::seg("../../ses_x/cancel#é"),
            "..%2F..%2Fses_x%2Fcancel%23%C3%A9"
        );
    }

    #[test]
    fn escape_sequences_are_shown_not_run() {
        assert_eq!(
            printable("ok\n\ttab \u{1b}]52;c;aGk=\u{7}\u{1b}[2J\r\u{9b}1m\u{7f}"),
            "ok\n\ttab ^[]52;c;aGk=^G^[[2J^M\u{fffd}1m^?"
        );
        assert_eq!(printable("plain é ✓\r\nnext"), "plain é ✓\nnext");
    }

    #[test]
    fn a_server_url_is_its_root_with_a_scheme() {
        assert_eq!(
            server_root("http://127.0.0.1:8080/").ok().as_deref(),
            Some("http://127.0.0.1:8080")
        );
        for (url, says) in [
            ("127.0.0.1:8080", "has no scheme"),
            ("localhost:8080", "has no scheme"),
            ("http://127.0.0.1:8080/v1", "ends in /v1"),
            ("ftp://host", "must start with http:// or https://"),
            ("http://", "names no host"),
            ("http://me:secret@host:8080", "holds a user or password"),
        ] {
            let err = server_root(url).expect_err(url).to_string();
            assert!(err.contains(says), "{url}: {err}");
        }
    }
}
