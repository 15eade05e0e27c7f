//! `sandwarden chat ID`: a conversation with an API session.
//!
//! On a terminal it is a small line editor in raw mode: Enter sends the line and the reply
//! streams back; Ctrl-C cancels the running turn, a second Ctrl-C leaves (at the prompt, Ctrl-C
//! clears the line, then leaves; Ctrl-D on an empty line leaves). What is typed while a turn runs
//! is held, not sent: it is the next prompt's text, to edit or send. A question the agent asks is
//! answered inline: a (approve once), s (approve for the session) or d (deny), then Enter; any
//! other line is refused and the question goes on waiting. With stdin not a terminal (a pipe, a
//! file) each line is a message, sent one after another. Either way chat exits non-zero when a
//! turn failed.

use super::attach::RawMode;
use super::{Client, Connection, Decision, ExitStatus, Question, TurnEvent, hint, seg};
use anyhow::bail;
use futures::StreamExt;
use std::collections::VecDeque;
use std::io::Write;
use std::sync::Arc;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;

pub async fn chat(conn: &Connection, id: &str) -> anyhow::Result<()> {
    let c = Arc::new(Client::new(conn)?);
    let session = c
        .call(
            reqwest::Method::GET,
            &format!("/v1/sessions/{}", seg(id)),
            None,
            Some(id),
        )
        .await?;
    if session["kind"] == "tui" {
        bail!(hint("tui_session", Some(id), &session).unwrap_or_default());
    }
    let failures = if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        interactive(c, id).await?
    } else {
        piped(&c, id).await?
    };
    if failures > 0 {
        return Err(ExitStatus {
            code: 1,
            message: format!(
                "{failures} turn(s) failed in this chat; `sandwarden history {id}` shows what was recorded"
            ),
        }
        .into());
    }
    Ok(())
}

/// A line per message from a pipe; Ctrl-C (SIGINT) cancels the running turn.
async fn piped(c: &Client, id: &str) -> anyhow::Result<usize> {
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut failures = 0;
    while let Some(line) = lines.next_line().await? {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let mut turn = match c.open_turn(id, line).await {
            Ok(turn) => turn,
            Err(e) => {
                eprintln!("error: {e:#}");
                failures += 1;
                continue;
            }
        };
        let mut interrupt = std::pin::pin!(tokio::signal::ctrl_c());
        let mut out = std::io::stdout();
        loop {
            let event = tokio::select! {
                event = turn.next() => event,
                _ = &mut interrupt => {
                    c.call(reqwest::Method::POST, &format!("/v1/sessions/{}/cancel", seg(id)), None, Some(id)).await?;
                    eprintln!("[cancelling the turn]");
                    continue;
                }
            };
            match event {
                Some(Ok(TurnEvent::Text(t))) => {
                    print!("{t}");
                    let _ = out.flush();
                }
                Some(Ok(TurnEvent::Note(n))) => eprintln!("{n}"),
                Some(Ok(TurnEvent::Asked(q))) => eprintln!(
                    "[input required] {}: answer with `sandwarden approve {id} {}` or `sandwarden deny {id} {}`",
                    q.title, q.request_id, q.request_id
                ),
                Some(Ok(TurnEvent::Done { cancelled })) => {
                    println!();
                    if cancelled {
                        eprintln!("[cancelled]");
                    }
                    break;
                }
                Some(Ok(TurnEvent::Failed(why))) => {
                    println!();
                    eprintln!("error: {why}");
                    failures += 1;
                    break;
                }
                Some(Err(e)) => {
                    eprintln!("error: {e:#}");
                    failures += 1;
                    break;
                }
                None => {
                    eprintln!("error: the event stream ended before the turn finished");
                    failures += 1;
                    break;
                }
            }
        }
    }
    Ok(failures)
}

/// A key a person pressed, as the editor reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Key {
    Char(char),
    Enter,
    Backspace,
    /// Ctrl-C.
    Interrupt,
    /// Ctrl-D.
    Eof,
    /// Ctrl-U.
    ClearLine,
}

/// Turns the bytes of a raw-mode terminal into keys: UTF-8 characters, the control keys the
/// editor knows, and escape sequences (arrows, function keys) skipped whole.
#[derive(Default)]
struct KeyReader {
    utf8: Vec<u8>,
    escape: Escape,
}

#[derive(Default, PartialEq, Eq)]
enum Escape {
    #[default]
    None,
    /// After ESC.
    Started,
    /// Just after ESC [.
    SequenceStart,
    /// Inside a control sequence (ESC [ or ESC O), until its final byte.
    Sequence,
    /// The raw bytes of a mouse report (ESC [ M and three bytes) still to skip.
    Mouse(u8),
}

impl KeyReader {
    fn feed(&mut self, b: u8) -> Option<Key> {
        match self.escape {
            Escape::Started => {
                self.escape = match b {
                    b'[' => Escape::SequenceStart,
                    b'O' => Escape::Sequence,
                    _ => Escape::None,
                };
                return None;
            }
            Escape::SequenceStart if b == b'M' => {
                self.escape = Escape::Mouse(3);
                return None;
            }
            Escape::Mouse(left) => {
                self.escape = if left > 1 {
                    Escape::Mouse(left - 1)
                } else {
                    Escape::None
                };
                return None;
            }
            Escape::SequenceStart | Escape::Sequence => {
                self.escape = if (0x40..=0x7e).contains(&b) {
                    Escape::None
                } else {
                    Escape::Sequence
                };
                return None;
            }
            Escape::None => {}
        }
        if !self.utf8.is_empty() || b >= 0x80 {
            self.utf8.push(b);
            return match std::str::from_utf8(&self.utf8) {
                Ok(s) => {
                    let c = s.chars().next();
                    self.utf8.clear();
                    c.map(Key::Char)
                }
                Err(e) if e.error_len().is_none() && self.utf8.len() < 4 => None,
                Err(_) => {
                    self.utf8.clear();
                    None
                }
            };
        }
        match b {
            0x03 => Some(Key::Interrupt),
            0x04 => Some(Key::Eof),
            0x08 | 0x7f => Some(Key::Backspace),
            b'\r' | b'\n' => Some(Key::Enter),
            0x15 => Some(Key::ClearLine),
            0x1b => {
                self.escape = Escape::Started;
                None
            }
            b if b >= 0x20 => Some(Key::Char(char::from(b))),
            _ => None,
        }
    }
}

/// Raw-mode output: every newline also returns the carriage.
fn show(text: &str) {
    let mut out = std::io::stdout();
    let _ = out.write_all(text.replace('\n', "\r\n").as_bytes());
    let _ = out.flush();
}

/// The conversation's state on a terminal.
struct Conversation {
    client: Arc<Client>,
    id: String,
    /// The line being typed (or held while a turn runs).
    input: String,
    /// The running turn's events.
    turn: Option<(
        mpsc::Receiver<anyhow::Result<TurnEvent>>,
        tokio::task::JoinHandle<()>,
    )>,
    /// Questions of the running turn not answered yet, the oldest first.
    questions: VecDeque<Question>,
    /// What is typed to answer the oldest question (a, s or d, then Enter).
    answer: String,
    /// Ctrl-C presses during the running turn.
    interrupts: u8,
    /// Whether the cursor is at the start of a line.
    line_start: bool,
    failures: usize,
}

impl Conversation {
    fn prompt(&self) {
        show(&format!("\r\x1b[K> {}", self.input));
    }

    fn line(&mut self, text: &str) {
        if !self.line_start {
            show("\n");
        }
        show(&format!("{text}\n"));
        self.line_start = true;
    }

    async fn start_turn(&mut self, text: String) {
        show("\n");
        self.line_start = true;
        match self.client.open_turn(&self.id, &text).await {
            Ok(mut events) => {
                let (tx, rx) = mpsc::channel(64);
                let forward = tokio::spawn(async move {
                    while let Some(event) = events.next().await {
                        if tx.send(event).await.is_err() {
                            return;
                        }
                    }
                });
                self.turn = Some((rx, forward));
                self.interrupts = 0;
            }
            Err(e) => {
                self.failures += 1;
                self.line(&format!("error: {e:#}"));
            }
        }
    }

    fn end_turn(&mut self) {
        if let Some((_, forward)) = self.turn.take() {
            forward.abort();
        }
        self.questions.clear();
        self.answer.clear();
        if !self.line_start {
            show("\n");
            self.line_start = true;
        }
    }

    /// One event of the running turn.
    fn on_event(&mut self, event: Option<anyhow::Result<TurnEvent>>) {
        match event {
            Some(Ok(TurnEvent::Text(t))) => {
                if !t.is_empty() {
                    self.line_start = t.ends_with('\n');
                    show(&t);
                }
            }
            Some(Ok(TurnEvent::Note(n))) => self.line(&n),
            Some(Ok(TurnEvent::Asked(q))) => {
                match &q.client_tool {
                    Some(name) => self.line(&format!(
                        "[the agent called client tool {name}: chat cannot run it; answer request {} through the API]",
                        q.request_id
                    )),
                    None => self.line(&format!(
                        "[approval] {}: type a (approve once), s (approve for the session) or d (deny), then Enter",
                        q.title
                    )),
                }
                if q.client_tool.is_none() {
                    self.questions.push_back(q);
                    self.show_answer();
                }
            }
            Some(Ok(TurnEvent::Done { cancelled })) => {
                if cancelled {
                    self.line("[cancelled]");
                }
                self.end_turn();
            }
            Some(Ok(TurnEvent::Failed(why))) => {
                self.failures += 1;
                self.line(&format!("error: {why}"));
                self.end_turn();
            }
            Some(Err(e)) => {
                self.failures += 1;
                self.line(&format!("error: {e:#}"));
                self.end_turn();
            }
            None => {
                self.failures += 1;
                self.line("error: the event stream ended before the turn finished");
                self.end_turn();
            }
        }
    }

    /// The answer being typed to the oldest question, on a line of its own.
    fn show_answer(&mut self) {
        if !self.questions.is_empty() {
            show(&format!("\r\x1b[Kanswer (a/s/d)> {}", self.answer));
            self.line_start = false;
        }
    }

    /// A key while a question waits: the answer is typed and sent with Enter, so keys typed
    /// ahead (or a stray one) never answer it. `None`: the key is not the answer's (Ctrl-C).
    async fn on_key_for_question(&mut self, key: &Key) -> Option<()> {
        match key {
            Key::Char(c) => self.answer.push(*c),
            Key::Backspace => {
                self.answer.pop();
            }
            Key::ClearLine => self.answer.clear(),
            Key::Eof => {}
            Key::Interrupt => return None,
            Key::Enter => {
                let decision = match self.answer.trim().to_lowercase().as_str() {
                    "a" | "approve" => Some(Decision::ApproveOnce),
                    "s" | "session" => Some(Decision::ApproveSession),
                    "d" | "deny" => Some(Decision::Deny),
                    _ => None,
                };
                self.answer.clear();
                match (decision, self.questions.front().cloned()) {
                    (Some(decision), Some(q)) => {
                        self.questions.pop_front();
                        match self.client.answer(&self.id, &q.request_id, decision).await {
                            Ok(()) => self.line(&format!("[{}]", decision.done())),
                            Err(e) => self.line(&format!("error: {e:#}")),
                        }
                    }
                    _ => self.line(
                        "[answer a (approve once), s (approve for the session) or d (deny), then Enter]",
                    ),
                }
            }
        }
        self.show_answer();
        Some(())
    }

    /// A key while a turn runs. `false`: leave the chat.
    async fn on_key_in_turn(&mut self, key: Key) -> bool {
        if !self.questions.is_empty() && self.on_key_for_question(&key).await.is_some() {
            return true;
        }
        match key {
            Key::Interrupt if self.interrupts == 0 => {
                self.interrupts = 1;
                let asked = self
                    .client
                    .call(
                        reqwest::Method::POST,
                        &format!("/v1/sessions/{}/cancel", seg(&self.id)),
                        None,
                        Some(&self.id),
                    )
                    .await;
                match asked {
                    Ok(_) => self.line("[cancelling the turn; Ctrl-C again leaves]"),
                    Err(e) => self.line(&format!("error: {e:#}")),
                }
            }
            Key::Interrupt => return false,
            // Held for the next prompt: never sent while a turn runs.
            Key::Char(c) => self.input.push(c),
            Key::Backspace => {
                self.input.pop();
            }
            Key::ClearLine => self.input.clear(),
            Key::Enter | Key::Eof => {}
        }
        true
    }

    /// A key at the prompt. `false`: leave the chat.
    async fn on_key_at_prompt(&mut self, key: Key) -> bool {
        match key {
            Key::Char(c) => self.input.push(c),
            Key::Backspace => {
                self.input.pop();
            }
            Key::ClearLine => self.input.clear(),
            Key::Interrupt if !self.input.is_empty() => self.input.clear(),
            Key::Interrupt => return false,
            Key::Eof if self.input.is_empty() => return false,
            Key::Eof => {}
            Key::Enter => {
                let text = std::mem::take(&mut self.input);
                if text.trim().is_empty() {
                    return true;
                }
                self.start_turn(text.trim().to_string()).await;
            }
        }
        true
    }
}

async fn interactive(client: Arc<Client>, id: &str) -> anyhow::Result<usize> {
    let raw = RawMode::enable()?;
    // Mouse reporting off, whoever turned it on: its reports are not typing.
    show("\x1b[?1000l\x1b[?1002l\x1b[?1003l\x1b[?1006l");
    show(&format!(
        "[chat with {id}: Enter sends; Ctrl-C cancels a turn, twice leaves; Ctrl-D leaves]\n"
    ));
    let (keys_tx, mut keys) = mpsc::channel(256);
    let reader = tokio::spawn(async move {
        let mut stdin = tokio::io::stdin();
        let mut buf = [0u8; 1024];
        let mut parse = KeyReader::default();
        while let Ok(n) = stdin.read(&mut buf).await {
            if n == 0 {
                break;
            }
            for b in &buf[..n] {
                if let Some(k) = parse.feed(*b)
                    && keys_tx.send(k).await.is_err()
                {
                    return;
                }
            }
        }
    });
    let mut chat = Conversation {
        client,
        id: id.to_string(),
        input: String::new(),
        turn: None,
        questions: VecDeque::new(),
        answer: String::new(),
        interrupts: 0,
        line_start: true,
        failures: 0,
    };
    loop {
        if chat.turn.is_none() {
            chat.prompt();
        }
        let running = chat.turn.is_some();
        tokio::select! {
            key = keys.recv() => {
                let Some(key) = key else { break };
                let stay = if running {
                    chat.on_key_in_turn(key).await
                } else {
                    chat.on_key_at_prompt(key).await
                };
                if !stay {
                    break;
                }
            }
            event = async {
                match chat.turn.as_mut() {
                    Some((rx, _)) => rx.recv().await,
                    None => std::future::pending().await,
                }
            }, if running => chat.on_event(event),
        }
    }
    chat.end_turn();
    show("\r\x1b[K");
    reader.abort();
    drop(raw);
    Ok(chat.failures)
}

#[cfg(test)]
mod tests {
    use super::{Key, KeyReader};

    fn keys(bytes: &[u8]) -> Vec<Key> {
        let mut r = KeyReader::default();
        bytes.iter().filter_map(|b| r.feed(*b)).collect()
    }

    #[test]
    fn keys_are_read_from_raw_bytes() {
        assert_eq!(
            keys("hé\u{7f}\r".as_bytes()),
            vec![Key::Char('h'), Key::Char('é'), Key::Backspace, Key::Enter]
        );
        // Arrows and function keys are skipped whole; control keys are known.
        assert_eq!(
            keys(b"\x1b[A\x1b[15~x\x03\x04\x15\x1bOPy"),
            vec![
                Key::Char('x'),
                Key::Interrupt,
                Key::Eof,
                Key::ClearLine,
                Key::Char('y')
            ]
        );
        // Mouse reports (X10 and SGR) are skipped whole: their bytes are not keys.
        assert_eq!(keys(b"\x1b[Ma!!\x1b[<64;10;5Mq"), vec![Key::Char('q')]);
        // A broken UTF-8 sequence is dropped, the next character read.
        assert_eq!(keys(&[0xe2, 0x28, b'z']), vec![Key::Char('z')]);
    }
}
