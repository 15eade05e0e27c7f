//! The CLI client of the public API: sessions, messages streamed as they arrive, a chat REPL and a
//! terminal attach. It speaks HTTP and WebSocket only, using the shared wire types.

use anyhow::{Context, bail};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use std::io::Write;
use std::time::Duration;

#[derive(Debug, clap::Args, Clone)]
pub struct Connection {
    /// The server's URL.
    #[arg(
        long,
        env = "SANDWARDEN_URL",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    pub url: String,
    /// The API key.
    #[arg(
        long = "api-key",
        env = "SANDWARDEN_API_KEY",
        hide_env_values = true,
        global = true
    )]
    pub api_key: Option<String>,
}

#[derive(Debug, clap::Subcommand)]
pub enum SessionCommand {
    /// Create a session and print it (JSON).
    Create {
        /// The harness (template) name, e.g. echo or shell.
        harness: String,
        #[arg(long)]
        title: Option<String>,
        /// Per-session environment, NAME=VALUE (repeatable; never stored).
        #[arg(long = "env")]
        env: Vec<String>,
        /// Wait until the sandbox is ready (shows progress).
        #[arg(long)]
        wait: bool,
    },
    /// List your sessions.
    List {
        #[arg(long)]
        status: Option<String>,
        #[arg(long)]
        harness: Option<String>,
    },
    /// Show one session.
    Get {
        id: String,
        /// Long-poll until it is no longer creating or running.
        #[arg(long)]
        wait: bool,
    },
    /// Delete a session (idempotent).
    Delete { id: String },
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

pub struct Client {
    base: String,
    key: String,
    http: reqwest::Client,
}

impl Client {
    pub fn new(c: &Connection) -> anyhow::Result<Client> {
        let Some(key) = c.api_key.clone() else {
            bail!(
                "no API key: set SANDWARDEN_API_KEY (printed by `sandwarden serve` on first start) or pass --api-key"
            );
        };
        Ok(Client {
            base: c.url.trim_end_matches('/').to_string(),
            key,
            http: reqwest::Client::new(),
        })
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.key);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.with_context(|| {
            format!(
                "cannot reach sandwarden at {} (is `sandwarden serve` running? set SANDWARDEN_URL)",
                self.base
            )
        })?;
        let status = resp.status();
        let text = resp.text().await?;
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if !status.is_success() {
            let detail = v["detail"].as_str().unwrap_or("");
            bail!(
                "{status}: {detail} ({})",
                v["type"].as_str().unwrap_or("error")
            );
        }
        Ok(v)
    }
}

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

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
                )
                .await?;
            if wait {
                let id = s["id"].as_str().unwrap_or_default().to_string();
                while s["status"] == "creating" {
                    eprint!(".");
                    let _ = std::io::stderr().flush();
                    s = c
                        .call(
                            Method::GET,
                            &format!("/v1/sessions/{id}?wait=true&timeout=5"),
                            None,
                        )
                        .await?;
                }
                eprintln!();
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
                    .call(Method::GET, &format!("/v1/sessions?{}", q.join("&")), None)
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
                format!("/v1/sessions/{id}?wait=true&timeout=60")
            } else {
                format!("/v1/sessions/{id}")
            };
            print_json(&c.call(Method::GET, &path, None).await?);
        }
        SessionCommand::Delete { id } => {
            print_json(
                &c.call(Method::DELETE, &format!("/v1/sessions/{id}"), None)
                    .await?,
            );
        }
    }
    Ok(())
}

/// `sandwarden keys …`: the admin's key lifecycle (needs the admin key).
/// `sandwarden templates`: one line per template (name, kind, warm sandboxes, idle and turn
/// timeouts).
pub async fn templates(conn: &Connection) -> anyhow::Result<()> {
    let c = Client::new(conn)?;
    let list = c.call(reqwest::Method::GET, "/v1/templates", None).await?;
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
            let list = c.call(Method::GET, &path, None).await?;
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
                .call(Method::DELETE, &format!("/v1/api-keys/{id}"), None)
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

/// Sends one message and prints the reply as it streams; tool activity goes to stderr.
pub async fn send(conn: &Connection, id: &str, text: &str) -> anyhow::Result<()> {
    let c = Client::new(conn)?;
    stream_turn(&c, id, text).await
}

async fn stream_turn(c: &Client, id: &str, text: &str) -> anyhow::Result<()> {
    use eventsource_stream::Eventsource;
    let resp = c
        .http
        .post(format!("{}/v1/sessions/{id}/messages", c.base))
        .bearer_auth(&c.key)
        .json(&json!({"text": text, "stream": true}))
        .send()
        .await
        .with_context(|| format!("cannot reach sandwarden at {}", c.base))?;
    if !resp.status().is_success() {
        let status = resp.status();
        let v: Value = resp.json().await.unwrap_or_default();
        bail!(
            "{status}: {} ({})",
            v["detail"].as_str().unwrap_or(""),
            v["type"].as_str().unwrap_or("error")
        );
    }
    let mut events = sandwarden_proto::event::without_bom(resp.bytes_stream()).eventsource();
    let mut out = std::io::stdout();
    while let Some(event) = events.next().await {
        let event = event.map_err(|e| anyhow::anyhow!("the event stream broke: {e}"))?;
        let v: Value = serde_json::from_str(&event.data).unwrap_or_default();
        let data = &v["data"];
        match event.event.as_str() {
            "text" => {
                print!("{}", data["text"].as_str().unwrap_or(""));
                let _ = out.flush();
            }
            "reasoning" => eprintln!("[thinking] {}", data["text"].as_str().unwrap_or("")),
            "tool_use" => eprintln!(
                "[tool] {} {}",
                data["title"].as_str().unwrap_or(""),
                data["status"].as_str().unwrap_or("")
            ),
            "tool_result" => eprintln!(
                "[tool {}] {}",
                data["status"].as_str().unwrap_or(""),
                data["output"].as_str().unwrap_or("")
            ),
            "input_required" => eprintln!(
                "[input required] {} — answer with POST /v1/sessions/{id}/inputs/{}",
                data["tool"]["title"].as_str().unwrap_or(""),
                data["request_id"].as_str().unwrap_or("")
            ),
            "done" => {
                println!();
                return Ok(());
            }
            "error" => {
                println!();
                bail!(
                    "the turn failed: {} ({})",
                    data["message"].as_str().unwrap_or(""),
                    data["code"].as_str().unwrap_or("")
                );
            }
            _ => {}
        }
    }
    bail!("the event stream ended before the turn finished")
}

/// A REPL: each line is a message; the reply streams back. Ctrl-D ends it.
pub async fn chat(conn: &Connection, id: &str) -> anyhow::Result<()> {
    use tokio::io::AsyncBufReadExt;
    let c = Client::new(conn)?;
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    loop {
        eprint!("> ");
        let _ = std::io::stderr().flush();
        let Some(line) = lines.next_line().await? else {
            break;
        };
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if let Err(e) = stream_turn(&c, id, line).await {
            eprintln!("error: {e:#}");
        }
    }
    Ok(())
}

/// The key that detaches `attach` (Ctrl-]), as in telnet.
pub const DETACH_KEY: u8 = 0x1d;

/// Attaches this terminal to a TUI session: raw mode, resize on window change, Ctrl-] detaches.
pub async fn attach(conn: &Connection, id: &str) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let c = Client::new(conn)?;
    let ws_url = format!("{}/v1/sessions/{id}/tty", c.base.replacen("http", "ws", 1));
    let mut req = ws_url.into_client_request()?;
    req.headers_mut()
        .insert("authorization", format!("Bearer {}", c.key).parse()?);
    let (ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .map_err(|e| match e {
            tokio_tungstenite::tungstenite::Error::Http(resp) => {
                let body = resp
                    .body()
                    .as_ref()
                    .map(|b| String::from_utf8_lossy(b).to_string())
                    .unwrap_or_default();
                anyhow::anyhow!("cannot attach ({}): {body}", resp.status())
            }
            other => anyhow::anyhow!("cannot attach: {other}"),
        })?;
    let (mut tx, mut rx) = ws.split();
    let tty = std::io::IsTerminal::is_terminal(&std::io::stdin());
    let _raw = if tty { Some(RawMode::enable()?) } else { None };
    if tty {
        eprint!("[attached to {id}; Ctrl-] detaches]\r\n");
        if let Ok((cols, rows)) = crossterm::terminal::size() {
            tx.send(Message::Text(
                json!({"type":"resize","cols":cols,"rows":rows})
                    .to_string()
                    .into(),
            ))
            .await?;
        }
    }
    let mut winch = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())?;
    let mut stdin = tokio::io::stdin();
    let mut stdout = tokio::io::stdout();
    let mut buf = vec![0u8; 8192];
    let mut stdin_open = true;
    loop {
        tokio::select! {
            n = stdin.read(&mut buf), if stdin_open => {
                let n = n?;
                if n == 0 { stdin_open = false; continue; }
                let input = &buf[..n];
                if let Some(pos) = input.iter().position(|b| *b == DETACH_KEY) {
                    if pos > 0 { tx.send(Message::Binary(input[..pos].to_vec().into())).await?; }
                    let _ = tx.send(Message::Close(None)).await;
                    eprint!("\r\n[detached]\r\n");
                    return Ok(());
                }
                tx.send(Message::Binary(input.to_vec().into())).await?;
            }
            msg = rx.next() => match msg {
                Some(Ok(Message::Binary(b))) => { stdout.write_all(&b).await?; stdout.flush().await?; }
                Some(Ok(Message::Text(t))) => {
                    let v: Value = serde_json::from_str(&t).unwrap_or_default();
                    if v["type"] == "exit" {
                        eprint!("\r\n[the program exited: {}]\r\n", v["code"]);
                    }
                }
                Some(Ok(Message::Close(_))) | None => return Ok(()),
                Some(Ok(_)) => {}
                Some(Err(e)) => bail!("the terminal connection broke: {e}"),
            },
            _ = winch.recv() => {
                if let Ok((cols, rows)) = crossterm::terminal::size() {
                    tx.send(Message::Text(json!({"type":"resize","cols":cols,"rows":rows}).to_string().into())).await?;
                }
            }
            () = tokio::time::sleep(Duration::from_secs(30)) => {
                tx.send(Message::Text(r#"{"type":"ping"}"#.into())).await?;
            }
        }
    }
}

/// Raw terminal mode for the life of the value.
struct RawMode;

impl RawMode {
    fn enable() -> anyhow::Result<RawMode> {
        crossterm::terminal::enable_raw_mode().context("switching the terminal to raw mode")?;
        Ok(RawMode)
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = crossterm::terminal::disable_raw_mode();
    }
}
