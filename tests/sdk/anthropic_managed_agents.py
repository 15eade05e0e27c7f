"""Drives sandwarden through the official `anthropic` SDK's Managed Agents API, as a client would:
only `base_url` and the API key point at sandwarden. Run by tests/light/vendor_sdks.rs with
SANDWARDEN_URL (serve's base URL) and SANDWARDEN_KEY (a tenant's key); exits non-zero, saying
what differed, on the first failed expectation. Every prompt carries its own nonce, so a turn
holding another prompt's answer is caught."""

import os
import time

import anthropic

from common import check, nonce

BASE = os.environ["SANDWARDEN_URL"].rstrip("/") + "/anthropic"
KEY = os.environ["SANDWARDEN_KEY"]
client = anthropic.Anthropic(base_url=BASE, api_key=KEY, max_retries=0, timeout=60)
beta = client.beta

seen_on_streams = {}


def follow(stream, until_idle=True, on_event=None):
    """Reads a stream until the session idles (any stop reason but requires_action, unless
    until_idle is False, which stops at requires_action too). Returns the events read."""
    events = []
    for event in stream:
        events.append(event)
        if getattr(event, "id", None):
            seen_on_streams.setdefault(event.id, event)
        if on_event:
            on_event(event)
        if event.type == "session.status_idle":
            if event.stop_reason.type != "requires_action" or not until_idle:
                return events
        if event.type == "session.status_terminated":
            return events
    check(False, "the stream ended before the session went idle")


def turn(session_id, text, deltas=False):
    """Sends one message with a stream open first (as the SDK's runner does); the events."""
    kwargs = {"event_deltas": ["agent.message"]} if deltas else {}
    with beta.sessions.events.stream(session_id, **kwargs) as stream:
        sent = beta.sessions.events.send(
            session_id,
            events=[{"type": "user.message", "content": [{"type": "text", "text": text}]}],
        )
        check(len(sent.data) == 1 and sent.data[0].type == "user.message", f"send answer: {sent}")
        return sent.data[0].id, follow(stream)


def answer_text(events):
    return "".join(
        block.text
        for e in events
        if e.type == "agent.message"
        for block in e.content
        if block.type == "text"
    )


# ---- resources

env = beta.environments.create(name=f"dev-{nonce()}")
check(env.id.startswith("env_") and env.type == "environment", f"environment: {env}")
check(beta.environments.retrieve(env.id).name == env.name, "environment retrieve")

agent = beta.agents.create(
    name="echo agent",
    model="echo-small",
    metadata={"sandwarden.harness": "echo"},
)
check(agent.version == 1 and agent.model.id == "echo-small", f"agent: {agent}")
updated = beta.agents.update(agent.id, version=1, description="answers with what it is told")
check(updated.version == 2, f"an update makes version 2: {updated}")
check(beta.agents.retrieve(agent.id, version=1).description is None, "version 1 is kept")
try:
    beta.agents.update(agent.id, version=1, description="stale")
    check(False, "an update naming an old version must conflict")
except anthropic.ConflictError:
    pass

session = beta.sessions.create(agent=agent.id, environment_id=env.id, title="sdk flow")
check(session.status == "idle", f"a new session is idle: {session.status}")
check(session.agent.version == 2, "the session runs the agent's latest version")
sid = session.id

# ---- an agent's system prompt reaches the agent (ACP `systemPrompt`, added to its own)

n = nonce()
instructed = beta.agents.create(
    name="instructed", model="echo-small", system=f"Answer like a heron {n}.",
    metadata={"sandwarden.harness": "echo"},
)
check(instructed.system == f"Answer like a heron {n}.", f"the agent keeps its system: {instructed}")
instructed_sid = beta.sessions.create(agent=instructed.id, environment_id=env.id).id
_, said = turn(instructed_sid, "/system")
check(answer_text(said) == f"system prompt: Answer like a heron {n}.",
      f"system: {answer_text(said)!r}")
beta.sessions.delete(instructed_sid)
for event in said:  # the history checks below are of the main session's streams
    seen_on_streams.pop(getattr(event, "id", None), None)

# ---- files: uploaded, given to a session as resources (at creation and added), read by the
# agent, listed back as the session's files and downloaded

main_session_seen = dict(seen_on_streams)
n = nonce()
up = beta.files.upload(file=(f"notes-{n}.txt", f"notes of {n}\n".encode(), "text/plain"))
check(up.id.startswith("file_") and up.size_bytes == len(f"notes of {n}\n"), f"upload: {up}")
check(up.filename == f"notes-{n}.txt" and up.mime_type == "text/plain", f"upload: {up}")
check(beta.files.retrieve_metadata(up.id).filename == up.filename, "file metadata")
check(up.id in [f.id for f in beta.files.list()], "the upload is listed")
check(beta.files.download(up.id).read() == f"notes of {n}\n".encode(), "download")
more = beta.files.upload(file=("more.csv", f"a,b\n{n},2\n".encode(), "text/csv"))
with_files = beta.sessions.create(
    agent=agent.id, environment_id=env.id,
    resources=[{"type": "file", "file_id": up.id, "mount_path": "/workspace/notes.txt"}])
fsid = with_files.id
check([r.file_id for r in with_files.resources] == [up.id], f"resources: {with_files.resources}")
_, said = turn(fsid, "/cat notes.txt")
check(answer_text(said) == f"notes of {n}\n", f"the agent reads the resource: {answer_text(said)!r}")
added = beta.sessions.resources.add(fsid, type="file", file_id=more.id, mount_path="/data/more.csv")
check(added.mount_path == "/data/more.csv" and added.id.startswith("sesrsc_"), f"{added}")
_, said = turn(fsid, "/cat data/more.csv")
check(answer_text(said) == f"a,b\n{n},2\n", f"the added resource: {answer_text(said)!r}")
listed = list(beta.sessions.resources.list(fsid))
check([r.file_id for r in listed] == [up.id, more.id], f"resources listed: {listed}")
check(beta.sessions.resources.retrieve(added.id, session_id=fsid).file_id == more.id, "retrieve")
outputs = {f.filename: f for f in beta.files.list(scope_id=fsid)}
check({"notes.txt", "more.csv"} <= set(outputs), f"the session's files: {sorted(outputs)}")
check(outputs["more.csv"].scope.id == fsid and outputs["more.csv"].downloadable, "scoped")
check(beta.files.download(outputs["more.csv"].id).read() == f"a,b\n{n},2\n".encode(),
      "a session's file downloaded")
gone = beta.sessions.resources.delete(added.id, session_id=fsid)
check(gone.type == "session_resource_deleted", f"{gone}")
check([r.id for r in beta.sessions.resources.list(fsid)] == [listed[0].id], "one left")
seen_on_streams = main_session_seen  # the history checks below are of the main session's
beta.sessions.delete(fsid)
check(beta.files.delete(more.id).id == more.id, "file deleted")
try:
    beta.files.retrieve_metadata(more.id)
    check(False, "a deleted file must be gone")
except anthropic.NotFoundError:
    pass

# ---- a plain turn, buffered and with previews

n1 = nonce()
user_id, events = turn(sid, f"hello {n1}")
kinds = [e.type for e in events]
check(kinds[0] == "user.message" and events[0].id == user_id, f"the turn opens with the message: {kinds}")
check("session.status_running" in kinds, f"running before work: {kinds}")
check(events[-1].stop_reason.type == "end_turn", f"ends end_turn: {events[-1]}")
check(answer_text(events) == f"hello {n1}", f"the echo: {answer_text(events)!r}")

n2 = nonce()
_, events = turn(sid, f"/slow 3 piece-{n2}", deltas=True)
starts = [e for e in events if e.type == "event_start"]
deltas = [e for e in events if e.type == "event_delta"]
messages = [e for e in events if e.type == "agent.message"]
check(len(messages) == 1 and len(deltas) == 3, f"3 previews, 1 message: {[e.type for e in events]}")
check(starts[0].event.id == messages[0].id, "the preview names the message it becomes")
check("".join(d.delta.content.text for d in deltas) == answer_text(messages), "previews add up")
check(all(f"piece-{n2}" in line for line in answer_text(events).splitlines()), answer_text(events))

# ---- approvals: one allowed, one denied

for verdict in ("allow", "deny"):
    n = nonce()
    with beta.sessions.events.stream(sid) as stream:
        beta.sessions.events.send(
            sid,
            events=[{"type": "user.message", "content": [{"type": "text", "text": f"/ask may I {n}?"}]}],
        )
        events = follow(stream, until_idle=False)
        idle = events[-1]
        check(idle.stop_reason.type == "requires_action", f"asks: {idle}")
        blocked = idle.stop_reason.event_ids
        tool_use = [e for e in events if e.type == "agent.tool_use"]
        check([t.id for t in tool_use] == blocked, f"blocked on its tool use: {blocked}")
        check(tool_use[0].evaluated_permission == "ask", f"{tool_use[0]}")
        check(beta.sessions.retrieve(sid).status == "idle", "idle while it waits")
        beta.sessions.events.send(
            sid,
            events=[{"type": "user.tool_confirmation", "tool_use_id": blocked[0], "result": verdict}],
        )
        events = follow(stream)
    result = [e for e in events if e.type == "agent.tool_result"]
    check(result and result[0].tool_use_id == blocked[0], f"the result answers the call: {events}")
    expected = "permission granted" if verdict == "allow" else "permission denied"
    check(expected in answer_text(events), f"{verdict}: {answer_text(events)!r}")
    check(result[0].is_error == (verdict == "deny"), f"{result[0]}")

# ---- an interrupt, and a message sent during a turn: it waits its turn

n4 = nonce()
queued = []
with beta.sessions.events.stream(sid) as stream:
    beta.sessions.events.send(
        sid,
        events=[{"type": "user.message", "content": [{"type": "text", "text": "/slow 60 long"}]}],
    )
    interrupted = []

    def interrupt(event):
        if event.type == "session.status_running" and not interrupted:
            interrupted.append(True)
            sent = beta.sessions.events.send(sid, events=[{"type": "user.message", "content": [
                {"type": "text", "text": f"queued {n4}"}]}])
            queued.append(sent.data[0].id)
            beta.sessions.events.send(sid, events=[{"type": "user.interrupt"}])

    started = time.monotonic()
    events = follow(stream, on_event=interrupt)
    check(interrupted and events[-1].type == "session.status_idle", f"{[e.type for e in events]}")
    check(time.monotonic() - started < 20, "the interrupt stopped the turn early")
    check(answer_text(events).count("long") < 60, "the turn did not run to its end")
    events = follow(stream)
check(events[0].type == "user.message" and events[0].id == queued[0],
      f"the queued message opens the next turn, with the id its send gave: {events[0]}")
check(answer_text(events) == f"queued {n4}", f"{answer_text(events)!r}")
# Interrupting an idle session is no error.
beta.sessions.events.send(sid, events=[{"type": "user.interrupt"}])

# ---- a client-defined (custom) tool: the agent calls it, the client answers

tool_agent = beta.agents.create(
    name="with a tool", model="echo-small", metadata={"sandwarden.harness": "echo"},
    tools=[{"type": "custom", "name": "lookup", "description": "looks a word up",
            "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}}}],
)
tool_session = beta.sessions.create(agent=tool_agent.id, environment_id=env.id).id
main_session_seen = dict(seen_on_streams)
for failing in (False, True):
    n = nonce()
    with beta.sessions.events.stream(tool_session) as stream:
        beta.sessions.events.send(tool_session, events=[{"type": "user.message", "content": [
            {"type": "text", "text": '/calltool lookup {"q": "osprey-%s"}' % n}]}])
        events = follow(stream, until_idle=False)
        idle = events[-1]
        check(idle.stop_reason.type == "requires_action", f"the call waits: {idle}")
        call = [e for e in events if e.type == "agent.custom_tool_use"]
        check(len(call) == 1 and call[0].name == "lookup", f"{[e.type for e in events]}")
        check(call[0].input == {"q": f"osprey-{n}"}, f"the call's input: {call[0].input}")
        check(idle.stop_reason.event_ids == [call[0].id], "blocked on the call")
        beta.sessions.events.send(tool_session, events=[{
            "type": "user.custom_tool_result", "custom_tool_use_id": call[0].id,
            "content": [{"type": "text", "text": f"heron-{n}"}], "is_error": failing}])
        events = follow(stream)
    verdict = "failed" if failing else "answered"
    check(answer_text(events) == f"tool lookup {verdict}: heron-{n}", f"{answer_text(events)!r}")
# The history checks below are of the first session's streams.
seen_on_streams = main_session_seen

# ---- a reconnect in the middle of a turn

n5 = nonce()
stream = beta.sessions.events.stream(sid)
beta.sessions.events.send(
    sid,
    events=[{"type": "user.message", "content": [{"type": "text", "text": f"/slow 6 part-{n5}"}]}],
)
first = []
for event in stream:
    first.append(event)
    if event.type == "session.status_running":
        break
stream.close()
with beta.sessions.events.stream(sid) as stream:
    history = list(beta.sessions.events.list(sid, limit=1000))
    merged = {e.id: e for e in history}
    rest = follow(stream)
    for e in rest:
        merged.setdefault(e.id, e)
texts = [e for e in merged.values() if e.type == "agent.message" and f"part-{n5}" in answer_text([e])]
check(len(texts) == 1, f"the message arrives once after the reconnect: {len(texts)}")
check(answer_text(texts).count(f"part-{n5}") == 6, f"and whole: {answer_text(texts)!r}")

# ---- history: paged, each event once, each turn holding its own prompt's answer

paged = list(beta.sessions.events.list(sid, limit=3))
ids = [e.id for e in paged]
check(len(ids) == len(set(ids)), "no event twice in the history")
whole = list(beta.sessions.events.list(sid, limit=1000))
check([e.id for e in whole] == ids, "pages of 3 and one page of 1000 agree")
for event_id, event in seen_on_streams.items():
    if event.type in ("event_start", "event_delta"):
        continue
    check(event_id in ids, f"{event.type} {event_id} from a stream is in the history")
prompts = [e for e in paged if e.type == "user.message"]
check(len(prompts) == 7, f"seven prompts: {len(prompts)}")
# The answer to each prompt comes before the next prompt.
current = None
for e in paged:
    if e.type == "user.message":
        current = e.content[0].text
    elif e.type == "agent.message" and current and current.startswith(("hello ", "queued ")):
        check(answer_text([e]) == current, f"{answer_text([e])!r} answers {current!r}")
only_messages = list(beta.sessions.events.list(sid, types=["user.message"]))
check([e.id for e in only_messages] == [e.id for e in prompts], "filtered by type")

usage = beta.sessions.retrieve(sid).usage
check(usage.output_tokens > 0, f"usage is carried: {usage}")

# ---- refusals, read through the SDK's own exception types

def refused(exc, call, what):
    try:
        call()
    except exc as e:
        check(e.body and e.body.get("type") == "error", f"{what}: Anthropic's error shape {e.body}")
        return e
    check(False, f"{what} must raise {exc.__name__}")


refused(anthropic.NotFoundError, lambda: list(beta.sessions.threads.list(sid)), "threads")
refused(
    anthropic.BadRequestError,
    lambda: beta.agents.create(
        name="x", model="echo-small",
        tools=[{"type": "custom", "name": "look up!", "input_schema": {"type": "object"}}],
    ),
    "a custom tool with a name no tool may have",
)
refused(
    anthropic.BadRequestError,
    lambda: beta.agents.create(name="x", model="echo-small", system="x" * (32 * 1024 + 1)),
    "a system prompt over 32 KiB",
)
# `limited` networking narrows the session's sandbox's egress where sandboxes go out through
# serve's egress proxy (SANDWARDEN_NARROWS=1: bubblewrap here), and is refused elsewhere.
limited = {"type": "cloud", "networking": {"type": "limited", "allowed_hosts": ["allowed.example"],
                                           "allow_package_managers": True}}
if os.environ.get("SANDWARDEN_NARROWS") == "1":
    narrow_env = beta.environments.create(name="narrow", config=limited)
    check(narrow_env.config.networking.type == "limited", f"{narrow_env.config}")
    check(narrow_env.config.networking.allowed_hosts == ["allowed.example"], f"{narrow_env.config}")
    narrow_sid = beta.sessions.create(agent=agent.id, environment_id=narrow_env.id).id
    _, said = turn(narrow_sid, "narrowed hello")
    check(answer_text(said) == "narrowed hello", f"a narrowed session runs: {answer_text(said)!r}")
    for event in said:
        seen_on_streams.pop(getattr(event, "id", None), None)
    beta.sessions.delete(narrow_sid)
else:
    refused(anthropic.BadRequestError, lambda: beta.environments.create(name="x", config=limited),
            "limited networking without the egress proxy")
refused(
    anthropic.BadRequestError,
    lambda: beta.environments.create(
        name="x", config={"type": "cloud", "networking": {"type": "limited",
                                                          "allowed_hosts": ["bad host!"]}}),
    "limited networking naming no host",
)
refused(
    anthropic.BadRequestError,
    lambda: beta.sessions.create(agent=agent.id, environment_id=env.id, resources=[
        {"type": "github_repository", "url": "https://example.com/r.git"}]),
    "a repository resource",
)
refused(
    anthropic.BadRequestError,
    lambda: beta.sessions.create(agent=agent.id, environment_id=env.id, resources=[
        {"type": "file", "file_id": up.id, "mount_path": "/workspace/../../etc/x"}]),
    "a mount path out of the working directory",
)
refused(
    anthropic.NotFoundError,
    lambda: beta.sessions.create(agent=agent.id, environment_id=env.id, resources=[
        {"type": "file", "file_id": "file_nope"}]),
    "a resource of an unknown file",
)
refused(
    anthropic.BadRequestError,
    lambda: beta.sessions.events.send(
        sid, events=[{"type": "user.custom_tool_result", "custom_tool_use_id": "x", "content": []}]
    ),
    "a custom tool result for no call",
)
refused(anthropic.NotFoundError, lambda: beta.sessions.retrieve("sesn_nope"), "an unknown session")
unknown_model = beta.agents.create(
    name="wrong model", model="claude-opus-4-1", metadata={"sandwarden.harness": "echo"}
)
other = beta.sessions.create(agent=unknown_model.id, environment_id=env.id)
refused(
    anthropic.BadRequestError,
    lambda: beta.sessions.events.send(
        other.id, events=[{"type": "user.message", "content": [{"type": "text", "text": "hi"}]}]
    ),
    "a model the agent does not offer",
)
bad = anthropic.Anthropic(base_url=BASE, api_key="sk-not-a-key", max_retries=0)
refused(anthropic.AuthenticationError, lambda: bad.beta.sessions.retrieve(sid), "a wrong key")

# ---- archive and delete

import threading

# A stream open when the session is archived is told so, and ends.
told = []


def watch():
    with beta.sessions.events.stream(sid) as stream:
        for event in stream:
            told.append(event.type)


watcher = threading.Thread(target=watch, daemon=True)
watcher.start()
time.sleep(0.5)
archived = beta.sessions.archive(sid)
watcher.join(timeout=20)
check(not watcher.is_alive() and told[-1:] == ["session.status_terminated"],
      f"the open stream is told the session ended: {told}")
check(archived.archived_at is not None and archived.status == "terminated", f"{archived}")
check(beta.sessions.retrieve(sid).archived_at is not None, "the archive is kept")
listed = [s.id for s in beta.sessions.list(include_archived=True)]
check(sid in listed and other.id in listed, f"sessions listed: {listed}")
check(sid not in [s.id for s in beta.sessions.list()], "archived sessions are left out by default")
deleted = beta.sessions.delete(other.id)
check(deleted.type == "session_deleted", f"{deleted}")
refused(anthropic.NotFoundError, lambda: beta.sessions.retrieve(other.id), "a deleted session")
check(beta.environments.delete(env.id).type == "environment_deleted", "environment deleted")

print(f"session {sid}")
print("anthropic managed agents: every step passed")
