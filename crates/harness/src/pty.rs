//! The TUI kind: one program under a PTY the server owns, shared by any number of WebSocket viewers.
//!
//! The PTY outlives viewers; a new viewer first gets the recent output (a bounded ring) so it can
//! redraw. One reader task feeds every viewer through a bounded queue; a viewer that cannot keep up
//! within a grace period is disconnected (it may re-attach and replay), so memory stays bounded and
//! one stuck client cannot stall the program for long. It must not know about ACP or turns.

use super::bind::{self, CheckedBind};
use super::process::{GroupHandle, child_env, not_found_reason, terminal_lines};
use super::{HarnessConfig, StartMode};
use crate::event::{Control, ExitStatus, Health, Phase};
use crate::problem::Problem;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use axum::http::StatusCode;
use bytes::Bytes;
use futures::{FutureExt, SinkExt, StreamExt};
use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

/// Chunks queued per viewer before the reader waits on it.
const VIEWER_QUEUE: usize = 64;
/// How long the reader waits on a full viewer before disconnecting it.
const SLOW_VIEWER_GRACE: Duration = Duration::from_secs(2);
/// How long one write to a viewer may block before the viewer is given up.
const VIEWER_WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// PTY read size; also the largest chunk a viewer receives.
const READ_CHUNK: usize = 32 * 1024;
/// After the program exits, how long to wait for its last output before closing viewers.
const DRAIN_AFTER_EXIT: Duration = Duration::from_millis(500);

/// A program that exits 127 (not found) within this long of its start could not be run.
const NOT_FOUND_WINDOW: Duration = Duration::from_secs(5);

/// How long a stop waits for the viewers' close frames to go out.
const VIEWER_CLOSE_WAIT: Duration = Duration::from_secs(2);

/// WebSocket close codes.
const CLOSE_NORMAL: u16 = 1000;
const CLOSE_GOING_AWAY: u16 = 1001;
const CLOSE_TRY_AGAIN_LATER: u16 = 1013;

#[derive(Debug, Clone)]
pub struct TermStatus {
    pub phase: Phase,
    pub reason: Option<String>,
    pub exit: Option<ExitStatus>,
    pub generation: u64,
}

/// What the reader hands viewers.
#[derive(Debug, Clone)]
enum Frame {
    Data(Bytes),
    Exit(ExitStatus),
}

/// Recent output, at most `cap` bytes.
struct Ring {
    buf: VecDeque<u8>,
    cap: usize,
}

impl Ring {
    fn push(&mut self, data: &[u8]) {
        if data.len() >= self.cap {
            self.buf.clear();
            self.buf.extend(&data[data.len() - self.cap..]);
            return;
        }
        let overflow = (self.buf.len() + data.len()).saturating_sub(self.cap);
        self.buf.drain(..overflow);
        self.buf.extend(data);
    }

    fn snapshot(&self) -> Vec<u8> {
        let (a, b) = self.buf.as_slices();
        [a, b].concat()
    }
}

type Writer = Arc<tokio::sync::Mutex<pty_process::OwnedWritePty>>;

struct Viewer {
    id: u64,
    tx: mpsc::Sender<Frame>,
}

struct Inner {
    generation: u64,
    ring: Ring,
    viewers: Vec<Viewer>,
    next_viewer: u64,
    writer: Option<Writer>,
    child: Option<GroupHandle>,
    size: (u16, u16),
    env: BTreeMap<String, String>,
    cwd: PathBuf,
    bound: bool,
    used: bool,
}

/// What a viewer's text frame asks for: a valid resize, or a frame to answer with (a pong, or
/// an error saying what clients may send).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlAsk {
    Resize { cols: u16, rows: u16 },
    Reply(Control),
}

/// Reads a viewer's text frame. Pure, so the WebSocket control path can be fuzzed on its own.
pub fn read_control(text: &str) -> ControlAsk {
    let reply = match serde_json::from_str::<Control>(text) {
        Ok(Control::Resize { cols, rows }) => {
            if cols == 0 || rows == 0 || cols > 2000 || rows > 1000 {
                Control::Error {
                    message: "resize needs 1..=2000 cols and 1..=1000 rows".into(),
                }
            } else {
                return ControlAsk::Resize { cols, rows };
            }
        }
        Ok(Control::Ping) => Control::Pong,
        Ok(other) => Control::Error {
            message: format!("{other:?} is a server frame; clients send resize or ping"),
        },
        Err(e) => Control::Error {
            message: format!(
                "text frames carry JSON control ({{\"type\":\"resize\",\"cols\":C,\"rows\":R}} or {{\"type\":\"ping\"}}); send terminal input as binary frames ({e})"
            ),
        },
    };
    ControlAsk::Reply(reply)
}

pub struct Terminal {
    cfg: Arc<HarnessConfig>,
    inner: Mutex<Inner>,
    status: watch::Sender<TermStatus>,
    shutdown: CancellationToken,
    /// The viewers' WebSocket tasks: a stop waits (bounded) for them to send their close frame
    /// before the process exits.
    viewer_tasks: tokio_util::task::TaskTracker,
}

fn lock(m: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A viewer's view at the moment it attached.
struct Attachment {
    id: u64,
    replay: Vec<u8>,
    rx: mpsc::Receiver<Frame>,
    writer: Option<Writer>,
    exited: Option<ExitStatus>,
}

impl Terminal {
    pub fn new(cfg: Arc<HarnessConfig>, shutdown: CancellationToken) -> Arc<Self> {
        let (status, _) = watch::channel(TermStatus {
            phase: Phase::Standby,
            reason: None,
            exit: None,
            generation: 0,
        });
        let term = Arc::new(Terminal {
            inner: Mutex::new(Inner {
                generation: 0,
                ring: Ring {
                    buf: VecDeque::new(),
                    cap: cfg.replay_bytes,
                },
                viewers: Vec::new(),
                next_viewer: 0,
                writer: None,
                child: None,
                size: cfg.tty_size,
                env: BTreeMap::new(),
                cwd: cfg.workdir.clone(),
                bound: false,
                used: false,
            }),
            cfg,
            status,
            viewer_tasks: tokio_util::task::TaskTracker::new(),
            shutdown,
        });
        if term.cfg.start == StartMode::Boot {
            term.start();
        }
        term
    }

    pub fn status(&self) -> watch::Receiver<TermStatus> {
        self.status.subscribe()
    }

    pub fn health(&self) -> Health {
        let s = self.status.borrow().clone();
        let g = lock(&self.inner);
        Health {
            phase: s.phase,
            kind: "tui".into(),
            reason: s.reason,
            exit: s.exit,
            stderr_tail: Vec::new(),
            turn_id: None,
            bound: g.bound,
            used: g.used,
            viewers: Some(g.viewers.len()),
            agent: None,
        }
    }

    fn set_status(
        &self,
        generation: u64,
        phase: Phase,
        reason: Option<String>,
        exit: Option<ExitStatus>,
    ) {
        self.status.send_if_modified(|s| {
            if s.generation > generation {
                return false;
            }
            *s = TermStatus {
                phase,
                reason,
                exit,
                generation,
            };
            true
        });
    }

    fn start(self: &Arc<Self>) {
        let (generation, env, cwd, (cols, rows)) = {
            let mut g = lock(&self.inner);
            g.generation += 1;
            g.ring.buf.clear();
            (g.generation, g.env.clone(), g.cwd.clone(), g.size)
        };
        self.set_status(generation, Phase::Starting, None, None);
        let spawned = (|| -> Result<_, String> {
            let (pty, pts) = pty_process::open().map_err(|e| format!("cannot open a PTY: {e}"))?;
            pty.resize(pty_process::Size::new(rows, cols))
                .map_err(|e| format!("cannot size the PTY: {e}"))?;
            let argv = &self.cfg.argv;
            let mut env = child_env(&env);
            if !env.iter().any(|(k, _)| k == "TERM") {
                env.push(("TERM".into(), "xterm-256color".into()));
            }
            let child = pty_process::Command::new(&argv[0])
                .args(&argv[1..])
                .current_dir(&cwd)
                .env_clear()
                .envs(env)
                .kill_on_drop(true)
                .spawn(pts)
                .map_err(|e| format!("cannot start {:?}: {e}", argv[0]))?;
            Ok((pty, child))
        })();
        let (pty, mut child) = match spawned {
            Ok(ok) => ok,
            Err(reason) => {
                tracing::warn!(%reason, "program failed to start");
                self.set_status(generation, Phase::Failed, Some(reason), None);
                return;
            }
        };
        let pid = child.id().and_then(|p| i32::try_from(p).ok()).unwrap_or(0);
        let (reader, writer) = pty.into_split();
        let (exited_tx, exited_rx) = watch::channel(false);
        let group = GroupHandle::new(pid, exited_rx);
        {
            let mut g = lock(&self.inner);
            g.writer = Some(Arc::new(tokio::sync::Mutex::new(writer)));
            g.child = Some(group.clone());
        }
        self.set_status(generation, Phase::Ready, None, None);
        tracing::info!(pid, generation, program = %self.cfg.argv[0], "program started under a PTY");
        let (drained_tx, drained_rx) = oneshot::channel();
        tokio::spawn(self.clone().pump(generation, reader, drained_tx));
        let me = self.clone();
        let started = std::time::Instant::now();
        tokio::spawn(async move {
            let status = child.wait().await;
            let ran = started.elapsed();
            let _ = exited_tx.send(true);
            let _ = tokio::time::timeout(DRAIN_AFTER_EXIT, drained_rx).await;
            // Whatever the program left behind in its group goes with it.
            group.stop(Duration::ZERO).await;
            let exit = status.map(ExitStatus::from).unwrap_or(ExitStatus {
                code: None,
                signal: None,
            });
            me.finish(generation, exit, ran).await;
        });
    }

    /// Reads the PTY until end of file and hands every chunk to the ring and the viewers.
    async fn pump(
        self: Arc<Self>,
        generation: u64,
        mut reader: pty_process::OwnedReadPty,
        drained: oneshot::Sender<()>,
    ) {
        let mut buf = vec![0u8; READ_CHUNK];
        loop {
            match reader.read(&mut buf).await {
                Ok(0) => break,
                Ok(mut n) => {
                    // The kernel hands out PTY output a few KiB at a time: take what is already
                    // there too, so a flood travels in fewer, larger frames.
                    while n < buf.len() {
                        match reader.read(&mut buf[n..]).now_or_never() {
                            Some(Ok(m)) if m > 0 => n += m,
                            _ => break,
                        }
                    }
                    self.broadcast(generation, Bytes::copy_from_slice(&buf[..n]))
                        .await
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                // Linux reports EIO on the master once the last slave closes: that is end of file.
                Err(e) if e.raw_os_error() == Some(nix::libc::EIO) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "reading the PTY failed");
                    break;
                }
            }
        }
        let _ = drained.send(());
    }

    async fn broadcast(&self, generation: u64, data: Bytes) {
        let viewers: Vec<(u64, mpsc::Sender<Frame>)> = {
            let mut g = lock(&self.inner);
            if g.generation != generation {
                return;
            }
            g.ring.push(&data);
            g.viewers.iter().map(|v| (v.id, v.tx.clone())).collect()
        };
        let mut dropped = Vec::new();
        for (id, tx) in viewers {
            match tx.try_send(Frame::Data(data.clone())) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(frame)) => {
                    if !matches!(
                        tokio::time::timeout(SLOW_VIEWER_GRACE, tx.send(frame)).await,
                        Ok(Ok(()))
                    ) {
                        tracing::info!(viewer = id, "disconnecting a viewer that does not keep up");
                        dropped.push(id);
                    }
                }
                Err(mpsc::error::TrySendError::Closed(_)) => dropped.push(id),
            }
        }
        if !dropped.is_empty() {
            lock(&self.inner)
                .viewers
                .retain(|v| !dropped.contains(&v.id));
        }
    }

    /// The program ended after running `ran`. One that exits 127 (not found) within
    /// `NOT_FOUND_WINDOW` could not be run: the terminal is `failed`, with the line it printed
    /// ("cannot run …") as the reason; any other end is `exited`.
    async fn finish(&self, generation: u64, exit: ExitStatus, ran: Duration) {
        let (viewers, output) = {
            let mut g = lock(&self.inner);
            if g.generation != generation {
                return;
            }
            g.writer = None;
            // A stop ended the program (it raises the token before it hangs up): that is not
            // an exit to report. The viewers stay attached and hear of the stop (1001) from
            // their own tasks, which it woke; an exit queued here could reach one first.
            if self.shutdown.is_cancelled() {
                return;
            }
            (std::mem::take(&mut g.viewers), g.ring.snapshot())
        };
        tracing::info!(%exit, "program exited");
        let not_found = (ran < NOT_FOUND_WINDOW)
            .then(|| not_found_reason(Some(exit), &terminal_lines(&output)))
            .flatten();
        match not_found {
            Some(reason) => {
                tracing::warn!(%reason, "the program could not be run");
                self.set_status(generation, Phase::Failed, Some(reason), Some(exit));
            }
            None => self.set_status(
                generation,
                Phase::Exited,
                Some(format!("the program exited ({exit})")),
                Some(exit),
            ),
        }
        for v in viewers {
            let _ = tokio::time::timeout(SLOW_VIEWER_GRACE, v.tx.send(Frame::Exit(exit))).await;
        }
    }

    /// Waits until the program runs (starting it if it waits for a bind) or has ended.
    async fn wait_started(self: &Arc<Self>) -> Result<(), Problem> {
        let mut rx = self.status.subscribe();
        loop {
            let s = rx.borrow_and_update().clone();
            match s.phase {
                Phase::Ready | Phase::Exited => return Ok(()),
                Phase::Standby => self.start(),
                Phase::Failed => {
                    return Err(Problem::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "program_failed",
                        s.reason
                            .unwrap_or_else(|| "the program could not start".into()),
                    ));
                }
                Phase::Starting => {}
            }
            if rx.changed().await.is_err() {
                return Err(super::acp::shutting_down());
            }
        }
    }

    fn attach(&self) -> Attachment {
        let (tx, rx) = mpsc::channel(VIEWER_QUEUE);
        let mut g = lock(&self.inner);
        g.used = true;
        g.next_viewer += 1;
        let id = g.next_viewer;
        let exited = self.status.borrow().exit;
        if exited.is_none() {
            g.viewers.push(Viewer { id, tx });
        }
        Attachment {
            id,
            replay: g.ring.snapshot(),
            rx,
            writer: g.writer.clone(),
            exited,
        }
    }

    fn detach(&self, id: u64) {
        lock(&self.inner).viewers.retain(|v| v.id != id);
    }

    /// Checks that a WebSocket may attach now (before the upgrade, so errors are plain HTTP).
    pub async fn ready_for_attach(self: &Arc<Self>) -> Result<(), Problem> {
        if self.shutdown.is_cancelled() {
            return Err(super::acp::shutting_down());
        }
        self.wait_started().await
    }

    /// Serves one viewer until it leaves, the program ends, or the server shuts down.
    pub async fn serve_viewer(self: Arc<Self>, socket: WebSocket) {
        let tasks = self.viewer_tasks.clone();
        tasks.track_future(self.run_viewer(socket)).await;
    }

    async fn run_viewer(self: Arc<Self>, socket: WebSocket) {
        let mut at = self.attach();
        let (mut sink, mut stream) = socket.split();
        let id = at.id;
        tracing::debug!(viewer = id, replay = at.replay.len(), "viewer attached");
        let mut replay_ok = true;
        for chunk in at.replay.chunks(READ_CHUNK) {
            if sink
                .send(Message::Binary(Bytes::copy_from_slice(chunk)))
                .await
                .is_err()
            {
                replay_ok = false;
                break;
            }
        }
        if let (true, Some(exit)) = (replay_ok, at.exited) {
            tell_exit(&mut sink, exit).await;
            return;
        }
        if replay_ok {
            loop {
                // A stop began (woken by it, or by output written before it): the viewer
                // learns that the server is going away; `finish` reports no exit a stop caused.
                if self.shutdown.is_cancelled() {
                    let _ = sink
                        .send(close_frame(CLOSE_GOING_AWAY, "server shutting down"))
                        .await;
                    break;
                }
                tokio::select! {
                    frame = at.rx.recv() => match frame {
                        Some(Frame::Data(data)) => {
                            // Write what is queued with one flush, not one syscall per chunk.
                            let mut batch = vec![data];
                            let mut exit = None;
                            while batch.len() < VIEWER_QUEUE {
                                match at.rx.try_recv() {
                                    Ok(Frame::Data(more)) => batch.push(more),
                                    Ok(Frame::Exit(e)) => { exit = Some(e); break; }
                                    Err(_) => break,
                                }
                            }
                            let write = async {
                                for data in batch {
                                    sink.feed(Message::Binary(data)).await?;
                                }
                                sink.flush().await
                            };
                            // A client that stops reading is dropped by the pump; this ends its task.
                            if !matches!(tokio::time::timeout(VIEWER_WRITE_TIMEOUT, write).await, Ok(Ok(()))) {
                                break;
                            }
                            if let Some(exit) = exit {
                                tell_exit(&mut sink, exit).await;
                                break;
                            }
                        }
                        Some(Frame::Exit(exit)) => {
                            tell_exit(&mut sink, exit).await;
                            break;
                        }
                        None => {
                            let _ = sink.send(close_frame(CLOSE_TRY_AGAIN_LATER, "too slow: re-attach to replay the screen")).await;
                            break;
                        }
                    },
                    msg = stream.next() => match msg {
                        Some(Ok(Message::Binary(input))) => {
                            if let Some(w) = &at.writer {
                                let mut w = w.lock().await;
                                if w.write_all(&input).await.is_err() { break; }
                            }
                        }
                        Some(Ok(Message::Text(text))) => {
                            if let Some(reply) = self.control(&at, text.as_str()).await
                                && sink.send(reply).await.is_err() { break; }
                        }
                        Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                        Some(Ok(_)) => {} // ping/pong frames are answered by the WebSocket layer
                    },
                    // The loop's top says so and ends.
                    () = self.shutdown.cancelled() => {}
                }
            }
        }
        self.detach(id);
        tracing::debug!(viewer = id, "viewer detached");
    }

    async fn control(&self, at: &Attachment, text: &str) -> Option<Message> {
        let reply = match read_control(text) {
            ControlAsk::Resize { cols, rows } => {
                if let Some(w) = &at.writer
                    && let Err(e) = w.lock().await.resize(pty_process::Size::new(rows, cols))
                {
                    tracing::warn!(error = %e, "resizing the PTY failed");
                }
                lock(&self.inner).size = (cols, rows);
                return None;
            }
            ControlAsk::Reply(reply) => reply,
        };
        serde_json::to_string(&reply)
            .ok()
            .map(|s| Message::Text(s.into()))
    }

    /// Late binding: restarts the program with per-session env, files and cwd before first use.
    pub async fn bind(self: &Arc<Self>, checked: CheckedBind) -> Result<Health, Problem> {
        if !checked.mcp_servers.is_empty() {
            return Err(Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_bind",
                crate::event::TUI_MCP,
            ));
        }
        if !checked.client_tools.is_empty() {
            return Err(Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_bind",
                crate::event::TUI_CLIENT_TOOLS,
            ));
        }
        if checked.instructions.is_some() {
            return Err(Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_bind",
                crate::event::TUI_INSTRUCTIONS,
            ));
        }
        let old = {
            let mut g = lock(&self.inner);
            if g.used {
                return Err(super::acp::already_used());
            }
            bind::write_files(&checked).map_err(|e| {
                Problem::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "bind_failed",
                    format!("writing the bound files failed: {e}"),
                )
            })?;
            g.env = checked.env;
            g.cwd = checked.cwd;
            g.bound = true;
            g.generation += 1; // the old program's exit is not reported
            g.writer = None;
            g.child.take()
        };
        if let Some(child) = old {
            child.hang_up(self.cfg.shutdown_grace).await;
        }
        self.start();
        Ok(self.health())
    }

    pub async fn stop(&self) {
        let child = lock(&self.inner).child.clone();
        if let Some(child) = child {
            child.hang_up(self.cfg.shutdown_grace).await;
        }
        // The viewers are told (1001) by their own tasks; without this wait the process could
        // exit before a busy machine ran them, and a viewer would see its connection just drop.
        self.viewer_tasks.close();
        let _ = tokio::time::timeout(VIEWER_CLOSE_WAIT, self.viewer_tasks.wait()).await;
    }
}

/// Tells a viewer the program ended: its exit status, then a normal close.
async fn tell_exit<S: futures::Sink<Message> + Unpin>(sink: &mut S, exit: ExitStatus) {
    let _ = sink.send(exit_message(exit)).await;
    let _ = sink.send(close_frame(CLOSE_NORMAL, "program exited")).await;
}

fn close_frame(code: u16, reason: &'static str) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: Utf8Bytes::from_static(reason),
    }))
}

fn exit_message(exit: ExitStatus) -> Message {
    let frame = Control::Exit {
        code: exit.code,
        signal: exit.signal,
    };
    Message::Text(serde_json::to_string(&frame).unwrap_or_default().into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_keeps_the_newest_bytes() {
        let mut r = Ring {
            buf: VecDeque::new(),
            cap: 8,
        };
        r.push(b"abcdef");
        r.push(b"ghij");
        assert_eq!(r.snapshot(), b"cdefghij");
        r.push(b"0123456789");
        assert_eq!(r.snapshot(), b"23456789");
    }
}
