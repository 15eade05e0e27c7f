//! The session and turn logic in one process, without HTTP: the orchestrator's own methods over
//! a fresh store and the in-process runtime (each sandbox's harness server a task of this test,
//! the echo agent a process). Each refusal is asserted as the `SessionError` the rule gives, and
//! each test checks that a refusal changed nothing; `routes` checks how the API words them.

use crate::common::ADMIN_KEY;
use crate::common::in_process::{self, InProcess};
use sandwarden::session::quota::{Budget, Limits};
use sandwarden::session::turn::{Outcome, Started};
use sandwarden::session::{CreateRequest, Orchestrator, SessionError};
use sandwarden::status::{SessionStatus, TurnStatus};
use sandwarden::store::SessionFilter;
use sandwarden::tokens::Tokens;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

struct Logic {
    orch: Arc<Orchestrator>,
    runtime: Arc<InProcess>,
    _dir: tempfile::TempDir,
}

impl Logic {
    async fn new() -> Logic {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = in_process::store_with_keys(dir.path(), &[("default", ADMIN_KEY, true)]).await;
        let tokens = Tokens::new(b"session-logic-secret".to_vec());
        let runtime = Arc::new(InProcess::new(tokens.clone(), dir.path().join("sandboxes")));
        let orch = in_process::orchestrator(
            store,
            runtime.clone(),
            tokens,
            in_process::templates(&["echo"]),
            "http://127.0.0.1:1",
        )
        .await;
        Logic {
            orch,
            runtime,
            _dir: dir,
        }
    }

    async fn create(
        &self,
        tenant: &str,
        body: serde_json::Value,
        key: Option<&str>,
        limits: &Limits,
    ) -> Result<(String, bool), SessionError> {
        let req: CreateRequest = serde_json::from_value(body).expect("a create request");
        let (s, created) = self
            .orch
            .create(tenant, req, key.map(String::from), limits)
            .await?;
        Ok((s.id, created))
    }

    /// An echo session of `tenant` named `name`.
    async fn named(
        &self,
        tenant: &str,
        name: &str,
        limits: &Limits,
    ) -> Result<(String, bool), SessionError> {
        self.create(tenant, json!({"harness": "echo", "id": name}), None, limits)
            .await
    }

    /// A ready echo session of `tenant` named `name`.
    async fn ready(&self, tenant: &str, name: &str) -> String {
        let (id, _) = self
            .named(tenant, name, &Limits::default())
            .await
            .expect("created");
        let s = self
            .orch
            .wait(tenant, &id, Duration::from_secs(30))
            .await
            .expect("read");
        assert_eq!(s.status, SessionStatus::Ready, "{:?}", s.failure_reason);
        id
    }

    async fn send(
        &self,
        tenant: &str,
        session: &str,
        text: &str,
        limits: &Limits,
    ) -> Result<Started, SessionError> {
        let req = serde_json::from_value(json!({ "text": text })).expect("a message");
        self.orch
            .start_turn(tenant, session, req, "sync", limits)
            .await
    }

    /// How many sessions the tenant has.
    async fn sessions(&self, tenant: &str) -> usize {
        self.orch
            .list(
                tenant,
                &SessionFilter {
                    limit: 100,
                    ..SessionFilter::default()
                },
            )
            .await
            .expect("list")
            .len()
    }
}

/// The turn's outcome once it has ended.
async fn ended(mut started: Started) -> Arc<Outcome> {
    let done = tokio::time::timeout(
        Duration::from_secs(30),
        started.done.wait_for(Option::is_some),
    )
    .await
    .expect("the turn ends")
    .expect("outcome");
    done.clone().expect("some")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_a_client_can_fix_is_refused_by_its_rule_and_makes_nothing() {
    let t = Logic::new().await;
    let none = Limits::default();
    let refused = t
        .create("acme", json!({"harness": "nonesuch"}), None, &none)
        .await
        .expect_err("unknown harness");
    assert!(
        matches!(&refused, SessionError::Invalid { code, detail }
            if code == "unknown_harness" && detail.contains("echo")),
        "{refused:?}"
    );
    let refused = t
        .named("acme", "ses_mine", &none)
        .await
        .expect_err("a server id");
    assert!(
        matches!(&refused, SessionError::Invalid { code, .. } if code == "invalid_session"),
        "{refused:?}"
    );

    // A name is the tenant's own: taken twice by one tenant, once each by two.
    let (alpha, created) = t.named("acme", "alpha", &none).await.expect("alpha");
    assert!(created);
    let refused = t
        .named("acme", "alpha", &none)
        .await
        .expect_err("alpha again");
    assert!(
        matches!(&refused, SessionError::Exists(name) if name == "alpha"),
        "{refused:?}"
    );
    let (globex_alpha, _) = t
        .named("globex", "alpha", &none)
        .await
        .expect("globex's alpha");
    assert_ne!(alpha, globex_alpha);

    // An Idempotency-Key returns its session for the same request, and refuses another.
    let first = json!({"harness": "echo", "title": "first title"});
    let (keyed, created) = t
        .create("acme", first.clone(), Some("key-one"), &none)
        .await
        .expect("keyed");
    assert!(created);
    let (again, created) = t
        .create("acme", first, Some("key-one"), &none)
        .await
        .expect("replayed");
    assert_eq!((again.as_str(), created), (keyed.as_str(), false));
    let refused = t
        .create(
            "acme",
            json!({"harness": "echo", "title": "second title"}),
            Some("key-one"),
            &none,
        )
        .await
        .expect_err("the key with another request");
    assert!(
        matches!(refused, SessionError::IdempotencyKeyReused),
        "{refused:?}"
    );

    // At the tenant's live-session quota: refused with its use; another tenant is not held.
    let two = Limits {
        live_sessions: Some(2),
        ..Limits::default()
    };
    let refused = t
        .named("acme", "third", &two)
        .await
        .expect_err("a third live session");
    assert!(
        matches!(
            refused,
            SessionError::Quota {
                limit: "live_sessions",
                used: 2,
                max: 2,
                ..
            }
        ),
        "{refused:?}"
    );
    t.named("globex", "beta", &two)
        .await
        .expect("globex holds one");

    assert_eq!(t.sessions("acme").await, 2, "no refusal made a session");
    let refused = t.orch.get("acme", "third").await.expect_err("not made");
    assert!(matches!(refused, SessionError::NotFound(_)), "{refused:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_turn_holds_its_session_until_cancelled_and_no_turn_holds_anothers_prompt() {
    let t = Logic::new().await;
    let none = Limits::default();
    let id = t.ready("acme", "turns").await;

    let slow = t
        .send("acme", &id, "/slow 400 slow-chunk", &none)
        .await
        .expect("the slow turn starts");
    let slow_turn = slow.turn_id.clone();
    let refused = t
        .send("acme", &id, "second-prompt-beta", &none)
        .await
        .err()
        .expect("a second turn while one runs");
    assert!(
        matches!(&refused, SessionError::TurnInProgress { turn_id: Some(running) } if *running == slow_turn),
        "{refused:?}"
    );
    // Another tenant learns nothing of it: no session by that id.
    let refused = t
        .send("globex", &id, "globex-prompt", &none)
        .await
        .err()
        .expect("another tenant's session");
    assert!(matches!(refused, SessionError::NotFound(_)), "{refused:?}");
    let refused = t.orch.cancel("globex", &id).await.expect_err("not theirs");
    assert!(matches!(refused, SessionError::NotFound(_)), "{refused:?}");

    let cancelled = t.orch.cancel("acme", &id).await.expect("cancel");
    assert_eq!(cancelled["turn_id"], slow_turn.as_str());
    let outcome = ended(slow).await;
    assert_eq!(outcome.status, TurnStatus::Cancelled, "{:?}", outcome.error);
    let refused = t.orch.cancel("acme", &id).await.expect_err("nothing runs");
    assert!(
        matches!(refused, SessionError::NoTurnRunning),
        "{refused:?}"
    );

    // The next turn answers its own prompt only.
    let next = ended(
        t.send("acme", &id, "third-prompt-gamma", &none)
            .await
            .expect("the next turn"),
    )
    .await;
    assert_eq!(next.status, TurnStatus::Completed);
    assert!(next.text.contains("third-prompt-gamma"), "{}", next.text);
    assert!(
        !next.text.contains("slow-chunk") && !next.text.contains("second-prompt-beta"),
        "a turn holds another prompt's answer: {}",
        next.text
    );
    let refused = t
        .orch
        .turn_view("acme", &id, "turn_nonesuch")
        .await
        .expect_err("no such turn");
    assert!(
        matches!(&refused, SessionError::TurnNotFound(turn) if turn == "turn_nonesuch"),
        "{refused:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turn_is_refused_before_it_runs_by_the_tenants_limits_and_budget() {
    let t = Logic::new().await;
    let id = t.ready("acme", "limits").await;
    let two_parts = serde_json::from_value(json!({
        "parts": [{"type": "text", "text": "part-one"}, {"type": "text", "text": "part-two"}]
    }))
    .expect("message");
    let one_part = Limits {
        message_parts: Some(1),
        ..Limits::default()
    };
    let refused = t
        .orch
        .start_turn("acme", &id, two_parts, "sync", &one_part)
        .await
        .err()
        .expect("two parts");
    assert!(
        matches!(
            refused,
            SessionError::Quota {
                limit: "message_parts",
                used: 2,
                max: 1,
                ..
            }
        ),
        "{refused:?}"
    );
    let short = Limits {
        message_bytes: Some(8),
        ..Limits::default()
    };
    let refused = t
        .send("acme", &id, "a message longer than eight bytes", &short)
        .await
        .err()
        .expect("too long");
    assert!(
        matches!(
            refused,
            SessionError::Quota {
                limit: "message_bytes",
                max: 8,
                ..
            }
        ),
        "{refused:?}"
    );

    // A budget of one second of turn time, used up by a turn that took longer.
    let budget = Limits {
        budget: Some(Budget {
            tokens: None,
            turn_seconds: Some(1),
        }),
        ..Limits::default()
    };
    let spent = ended(
        t.send("acme", &id, "/slow 15 spending-chunk", &budget)
            .await
            .expect("within budget"),
    )
    .await;
    assert_eq!(spent.status, TurnStatus::Completed, "{:?}", spent.error);
    let refused = t
        .send("acme", &id, "over-budget-prompt", &budget)
        .await
        .err()
        .expect("budget used up");
    assert!(
        matches!(
            refused,
            SessionError::Budget {
                budget: "turn_seconds",
                max: 1,
                ..
            }
        ),
        "{refused:?}"
    );

    // None of the refused messages is in the history.
    let page = t
        .orch
        .history(
            "acme",
            &Limits::default(),
            &id,
            sandwarden::store::HistoryFrom::After(0),
            100,
        )
        .await
        .expect("history");
    let texts: Vec<String> = page
        .items
        .iter()
        .map(|m| serde_json::to_string(m).expect("json"))
        .collect();
    assert_eq!(texts.len(), 2, "one turn: its prompt and its answer");
    for refused in ["part-one", "eight bytes", "over-budget-prompt"] {
        assert!(
            texts.iter().all(|m| !m.contains(refused)),
            "{refused} was recorded: {texts:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_dead_and_deleted_sessions_are_told_apart() {
    let t = Logic::new().await;
    let none = Limits::default();

    // A turn the agent fails: the reply is the failure with the agent's words.
    let failing = t.ready("acme", "failing").await;
    let failed = ended(
        t.send("acme", &failing, "/fail omen-of-failure", &none)
            .await
            .expect("started"),
    )
    .await;
    let refused = failed.into_reply().expect_err("a failed turn");
    assert!(
        matches!(&refused, SessionError::TurnFailed(f) if !f.timed_out && f.message.contains("omen-of-failure")),
        "{refused:?}"
    );
    // The session still takes messages after its turn failed.
    let after = ended(
        t.send("acme", &failing, "after-the-failure", &none)
            .await
            .expect("still ready"),
    )
    .await;
    assert!(after.text.contains("after-the-failure"), "{}", after.text);

    // A sandbox that is gone: the message finds it unreachable, and the session is dead.
    let lost = t.ready("acme", "lost").await;
    let sandbox = t
        .orch
        .get("acme", &lost)
        .await
        .expect("read")
        .sandbox_id
        .expect("bound");
    t.runtime.kill(&sandbox);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let refused = t
        .send("acme", &lost, "to-a-lost-sandbox", &none)
        .await
        .err()
        .expect("unreachable");
    assert!(
        matches!(refused, SessionError::Unreachable { turn_id: Some(_) }),
        "{refused:?}"
    );
    let refused = t
        .send("acme", &lost, "to-a-dead-session", &none)
        .await
        .err()
        .expect("dead");
    assert!(
        matches!(
            refused,
            SessionError::NotUsable {
                status: SessionStatus::Dead,
                reason: Some(_)
            }
        ),
        "{refused:?}"
    );

    // A deleted session: its own status, and the other sessions are untouched.
    let gone = t.ready("acme", "deleted").await;
    t.orch.delete("acme", &gone).await.expect("delete");
    let refused = t
        .send("acme", &gone, "to-a-deleted-session", &none)
        .await
        .err()
        .expect("deleted");
    assert!(
        matches!(
            refused,
            SessionError::NotUsable {
                status: SessionStatus::Deleted,
                ..
            }
        ),
        "{refused:?}"
    );
    let s = t.orch.get("acme", &failing).await.expect("read");
    assert_eq!(s.status, SessionStatus::Ready);
}
