//! Shared helpers: start a real `sandwarden harness` process on 127.0.0.1:0 and talk to it.
#![allow(dead_code)]

use sandwarden::event::{EventType, Part, TurnEvent, TurnRequest};
use sandwarden::harness_client::HarnessClient;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub const TOKEN: &str = "test-token-0123456789";

pub struct Harness {
    child: Child,
    pub addr: String,
    pub client: HarnessClient,
    pub workdir: tempfile::TempDir,
}

impl Harness {
    /// Starts `sandwarden harness` with `args` (plus listen, token and workdir).
    pub fn start(args: &[&str]) -> Harness {
        let workdir = tempfile::tempdir().expect("tempdir");
        let mut child = Command::new(env!("CARGO_BIN_EXE_sandwarden"))
            .arg("harness")
            .args(["--listen", "127.0.0.1:0"])
            .args(["--workdir", workdir.path().to_str().expect("utf8 path")])
            .args(args)
            .env("SANDWARDEN_TOKEN", TOKEN)
            .env("SANDWARDEN_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn sandwarden harness");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read listen line");
        let v: serde_json::Value = serde_json::from_str(&line).expect("listen line is JSON");
        let addr = v["listening"]
            .as_str()
            .expect("listening address")
            .to_string();
        let client = HarnessClient::new(format!("http://{addr}"), TOKEN);
        Harness {
            child,
            addr,
            client,
            workdir,
        }
    }

    pub fn api(extra: &[&str]) -> Harness {
        let mut args = vec!["--kind", "api", "--agent", "sandwarden echo-agent"];
        args.extend_from_slice(extra);
        Harness::start(&args)
    }

    pub fn tui(command: &str, extra: &[&str]) -> Harness {
        let mut args = vec!["--kind", "tui", "--command", command];
        args.extend_from_slice(extra);
        Harness::start(&args)
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Waits (bounded) until health reports `phase`.
    pub async fn wait_phase(&self, phase: &str) -> serde_json::Value {
        let mut last = serde_json::Value::Null;
        for _ in 0..200 {
            if let Ok(h) = self.client.health().await {
                last = serde_json::to_value(&h).expect("health json");
                if last["phase"] == phase {
                    return last;
                }
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("health never reached {phase}; last: {last}");
    }

    /// Sends SIGTERM and waits (bounded) for the process to exit; returns its status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        signal(self.pid(), nix::sys::signal::Signal::SIGTERM);
        for _ in 0..200 {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("harness did not exit within 5 s of SIGTERM");
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            signal(self.pid(), nix::sys::signal::Signal::SIGTERM);
            for _ in 0..100 {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub fn signal(pid: i32, sig: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
}

/// Direct children of a process, from /proc.
pub fn children(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for task in tasks.flatten() {
            if let Ok(list) = std::fs::read_to_string(task.path().join("children")) {
                out.extend(
                    list.split_whitespace()
                        .filter_map(|p| p.parse::<i32>().ok()),
                );
            }
        }
    }
    out
}

pub fn alive(pid: i32) -> bool {
    // A zombie still has a /proc entry; it is dead for our purposes.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Resident memory of a process in KiB.
pub fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

pub fn text_turn(text: &str) -> TurnRequest {
    TurnRequest {
        turn_id: None,
        parts: vec![Part::Text { text: text.into() }],
        timeout_s: None,
    }
}

pub fn texts(events: &[TurnEvent]) -> String {
    events
        .iter()
        .filter(|e| e.kind == EventType::Text)
        .filter_map(|e| e.data["text"].as_str())
        .collect()
}

pub fn kinds(events: &[TurnEvent]) -> Vec<EventType> {
    events.iter().map(|e| e.kind).collect()
}

pub async fn post_json(url: &str, token: Option<&str>, body: &str) -> (u16, serde_json::Value) {
    let mut req = reqwest::Client::new()
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_string());
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.expect("request sent");
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    (
        status,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
    )
}
