"""Drives sandwarden through the official `openai` SDK's Agents sessions API (`client.beta.agents`),
as a client would: only `base_url` and the API key point at sandwarden. Run by
tests/light/vendor_sdks.rs with SANDWARDEN_URL and SANDWARDEN_KEY (a tenant's key); exits
non-zero, saying what differed, on the first failed expectation. Every prompt carries its own
nonce, so a turn holding another prompt's answer is caught."""

import os
import time

import openai

from common import check, nonce

BASE = os.environ["SANDWARDEN_URL"].rstrip("/") + "/openai/v1"
KEY = os.environ["SANDWARDEN_KEY"]
client = openai.OpenAI(base_url=BASE, api_key=KEY, max_retries=0, timeout=60)
agents = client.beta.agents
sessions = agents.sessions


def message(text):
    return {"type": "agent.session.input.message",
            "input": [{"role": "user", "content": [{"type": "input_text", "text": text}]}]}


def follow(stream, on_event=None):
    """Reads events until the session is idle after a turn ended (or failed)."""
    events, ended = [], False
    for event in stream:
        events.append(event)
        if on_event:
            on_event(event)
        if event.type in ("agent.session.turn.completed", "agent.session.turn.failed",
                          "agent.session.turn.cancelled"):
            ended = True
        if event.type == "agent.session.failed" or (event.type == "agent.session.idle" and ended):
            return events
    check(False, "the stream ended before the session went idle")


def final_text(events):
    return "".join(
        part.text
        for e in events
        if e.type == "agent.session.turn.item.done" and e.item.type == "message"
        and e.item.role == "assistant"
        for part in e.item.content
    )


agent = agents.create(model="echo-small", name="echo agent",
                      metadata={"sandwarden.harness": "echo"})
check(agent.id and agent.model == "echo-small", f"agent: {agent}")
check(agents.retrieve(agent.id).name == "echo agent", "agent retrieve")

session = sessions.create(environment={"type": "openai_hosted"}, agent_id=agent.id)
check(session.status == "idle", f"a new session is idle: {session.status}")
sid = session.id

# ---- the SDK's own helper: submit input, stream to idle, collect the final answer

n1 = nonce()
with sessions.stream(sid, input=f"hello {n1}") as turn:
    result = turn.get_final_result()
check(result.turn.status == "completed", f"turn: {result.turn}")
check([m.content[0].text for m in result.messages] == [f"hello {n1}"], f"{result.messages}")

# ---- instructions reach the agent (ACP `systemPrompt`), a stored agent's and an inline one's

for how in ("stored", "inline"):
    n = nonce()
    said = f"Answer like an egret {how} {n}."
    if how == "stored":
        instructed = agents.create(model="echo-small", instructions=said,
                                   metadata={"sandwarden.harness": "echo"})
        check(agents.retrieve(instructed.id).instructions == said, "the agent keeps them")
        s = sessions.create(environment={"type": "openai_hosted"}, agent_id=instructed.id)
    else:
        s = sessions.create(environment={"type": "openai_hosted"},
                            agent={"model": "echo-small", "instructions": said},
                            metadata={"sandwarden.harness": "echo"})
    check(s.agent.instructions == said, f"{how}: the session shows them: {s.agent}")
    with sessions.stream(s.id, input="/system") as turn:
        result = turn.get_final_result()
    got = "".join(c.text for m in result.messages for c in m.content)
    check(got == f"system prompt: {said}", f"{how}: {got!r}")
    sessions.delete(s.id)

# ---- files: uploaded, staged into a session's environment at creation and between turns,
# read by the agent, listed back

import base64

n = nonce()
up = client.files.create(file=(f"data-{n}.txt", f"data of {n}\n".encode()), purpose="user_data")
check(up.object == "file" and up.bytes == len(f"data of {n}\n") and up.purpose == "user_data", f"{up}")
check(client.files.retrieve(up.id).filename == f"data-{n}.txt", "file retrieve")
check(up.id in [f.id for f in client.files.list()], "the upload is listed")
check(client.files.content(up.id).read() == f"data of {n}\n".encode(), "file content")
with_files = sessions.create(
    environment={"type": "openai_hosted", "files": [
        {"type": "file_id", "file_id": up.id, "path": "/workspace/data.txt"},
        {"type": "inline", "path": "/workspace/in/line.txt",
         "data": base64.b64encode(f"inline {n}".encode()).decode()}]},
    agent_id=agent.id)
env_id = with_files.environment.id
check(env_id and agents.environments.retrieve(env_id).status == "connected", f"{env_id}")


def said(session_id, text):
    with sessions.stream(session_id, input=text) as turn:
        result = turn.get_final_result()
    return "".join(c.text for m in result.messages for c in m.content)


check(said(with_files.id, "/cat data.txt") == f"data of {n}\n", "a file_id file at creation")
check(said(with_files.id, "/cat in/line.txt") == f"inline {n}", "an inline file at creation")
staged = agents.environments.files.upload(env_id, file=("later.txt", f"later {n}".encode()),
                                          path="/workspace/later.txt")
check(staged.file.path == "/workspace/later.txt" and staged.file.size_bytes == len(f"later {n}"),
      f"staged: {staged}")
check(said(with_files.id, "/cat later.txt") == f"later {n}", "a file staged between turns")
paths = [f.path for f in agents.environments.files.list(env_id, limit=1, order="asc")]
check(paths == sorted(paths) and {"/workspace/data.txt", "/workspace/later.txt",
                                  "/workspace/in/line.txt"} <= set(paths), f"listed: {paths}")
sessions.delete(with_files.id)
check(client.files.delete(up.id).deleted, "file deleted")
try:
    client.files.retrieve(up.id)
    check(False, "a deleted file must be gone")
except openai.NotFoundError:
    pass

# ---- text deltas, a second prompt

n2 = nonce()
with sessions.events.stream(sid) as stream:
    sessions.events.create(sid, events=[message(f"/slow 3 piece-{n2}")])
    events = follow(stream)
deltas = [e.delta for e in events if e.type == "agent.session.turn.output_text.delta"]
check(len(deltas) == 3 and "".join(deltas) == final_text(events), f"deltas {deltas}")
check(final_text(events).count(f"piece-{n2}") == 3, final_text(events))

# ---- approvals: one approved, one denied

for decision in ("approve", "deny"):
    n = nonce()
    with sessions.events.stream(sid) as stream:
        sessions.events.create(sid, events=[message(f"/ask may I {n}?")])
        events = []
        for event in stream:
            events.append(event)
            if event.type == "agent.session.requires_action":
                break
        actions = events[-1].session.required_actions
        check(len(actions) == 1 and actions[0].type == "mcp_approval_request", f"{actions}")
        check(n in actions[0].request.name, f"the request names the call: {actions[0]}")
        snapshot = sessions.retrieve(sid)
        check(snapshot.status == "requires_action", f"{snapshot.status}")
        check(snapshot.required_actions[0].request_id == actions[0].request_id, "retrieve agrees")
        sessions.events.create(sid, events=[{
            "type": "agent.session.input.mcp_approval_request_result",
            "request_id": actions[0].request_id,
            "response": {"type": "mcp_tool_call", "decision": decision},
        }])
        events += follow(stream)
    tool = [e.item for e in events if e.type == "agent.session.turn.item.done"
            and e.item.type == "command_execution"]
    check(len(tool) == 1, f"one command item: {tool}")
    expected = "permission granted" if decision == "approve" else "permission denied"
    check(expected in final_text(events), f"{decision}: {final_text(events)!r}")
    check(tool[0].status == ("completed" if decision == "approve" else "failed"), f"{tool[0]}")

# ---- a cancel, and a message sent while a turn runs: it waits its turn

n3 = nonce()
with sessions.events.stream(sid) as stream:
    sessions.events.create(sid, events=[message("/slow 60 long")])
    cancelled = []

    def cancel(event):
        if event.type == "agent.session.turn.created" and not cancelled:
            cancelled.append(True)
            sessions.events.create(sid, events=[message(f"queued {n3}")])
            sessions.events.create(sid, events=[{"type": "agent.session.input.cancel"}])

    started = time.monotonic()
    events = follow(stream, on_event=cancel)
    check(any(e.type == "agent.session.turn.cancelled" for e in events), [e.type for e in events])
    check(time.monotonic() - started < 20, "the cancel stopped the turn early")
    events = follow(stream)
check(final_text(events) == f"queued {n3}", f"the queued message's turn: {final_text(events)!r}")
sessions.events.create(sid, events=[{"type": "agent.session.input.cancel"}])

# ---- Idempotency-Key: the same input sent twice runs once

turns_before = len(list(sessions.turns.list(sid)))
n4 = nonce()
with sessions.events.stream(sid) as stream:
    sessions.events.create(sid, events=[message(f"once {n4}")], idempotency_key=f"key-{n4}")
    sessions.events.create(sid, events=[message(f"once {n4}")], idempotency_key=f"key-{n4}")
    follow(stream)
check(len(list(sessions.turns.list(sid))) == turns_before + 1, "one turn for one key")

# ---- a client-defined function: the SDK's helper runs it and sends its result

seen_calls = []


def lookup(args):
    seen_calls.append(args)
    return f"heron-{args['q']}"


fn_agent = agents.create(model="echo-small", metadata={"sandwarden.harness": "echo"}, tools=[{
    "type": "function", "name": "lookup", "description": "looks a word up",
    "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}])
fn_session = sessions.create(environment={"type": "openai_hosted"}, agent_id=fn_agent.id).id
n5 = nonce()
with sessions.stream(fn_session, input='/calltool lookup {"q": "%s"}' % n5,
                     tool_handlers={"lookup": lookup}) as turn:
    result = turn.get_final_result()
check(seen_calls == [{"q": n5}], f"the handler ran once with the call's arguments: {seen_calls}")
check(result.messages[-1].content[0].text == f"tool lookup answered: heron-{n5}",
      f"{result.messages}")

# ---- a reconnect in the middle of a turn: the items listed and the new stream hold it once

n7 = nonce()
stream = sessions.events.stream(sid)
sessions.events.create(sid, events=[message(f"/slow 6 part-{n7}")])
for event in stream:
    if event.type == "agent.session.turn.output_text.delta":
        break
stream.close()
with sessions.events.stream(sid) as stream:
    merged = {i.id: i for i in sessions.items.list(sid, limit=100)}
    for event in follow(stream):
        if event.type == "agent.session.turn.item.done":
            merged.setdefault(event.item.id, event.item)
answers = [i for i in merged.values() if i.type == "message" and i.role == "assistant"
           and f"part-{n7}" in i.content[0].text]
check(len(answers) == 1, f"the answer arrives once after the reconnect: {len(answers)}")
check(answers[0].content[0].text.count(f"part-{n7}") == 6, f"and whole: {answers[0]}")

# ---- history: items and turns, paged; each turn holds its own prompt's answer

items = list(sessions.items.list(sid, limit=2, order="asc"))
ids = [i.id for i in items]
check(len(ids) == len(set(ids)), "no item twice")
check([i.id for i in sessions.items.list(sid, limit=100, order="asc")] == ids, "pages agree")
newest_first = list(sessions.items.list(sid, limit=3))
check([i.id for i in newest_first] == list(reversed(ids)), "the default order is newest first")
prompt = None
for item in items:
    if item.type == "message" and item.role == "user":
        prompt = item.content[0].text
    elif item.type == "message" and prompt and prompt.startswith(("hello ", "once ", "queued ")):
        check(item.content[0].text == prompt, f"{item.content[0].text!r} answers {prompt!r}")
turns = list(sessions.turns.list(sid, order="asc"))
check([t.status for t in turns] == ["completed"] * 4 + ["cancelled"] + ["completed"] * 3,
      f"{[t.status for t in turns]}")
first = sessions.turns.retrieve(turns[0].id, session_id=sid)
check(first.usage.output_tokens > 0, f"usage is carried: {first.usage}")
turn_items = list(sessions.turns.items.list(turns[0].id, session_id=sid))
check([i.type for i in turn_items] == ["message", "message"], f"{turn_items}")
check(turn_items[1].content[0].text == f"hello {n1}", f"{turn_items}")

# ---- creating with input, streamed

n6 = nonce()
stream = sessions.create(environment={"type": "openai_hosted"}, agent={"model": "echo-small"},
                         metadata={"sandwarden.harness": "echo"}, input=f"streamed {n6}",
                         stream=True)
events = follow(stream)
check(events[0].type == "agent.session.created", events[0].type)
check(final_text(events) == f"streamed {n6}", final_text(events))
other = events[0].session.id

# ---- refusals, read through the SDK's own exception types

def refused(exc, call, what):
    try:
        call()
    except exc as e:
        check(isinstance(e.body, dict) and "message" in e.body, f"{what}: OpenAI's shape {e.body}")
        return e
    check(False, f"{what} must raise {exc.__name__}")


refused(openai.BadRequestError, lambda: agents.create(
    model="echo-small", tools=[{"type": "web_search"}]), "a hosted tool")
refused(openai.BadRequestError, lambda: agents.create(
    model="echo-small", instructions="x" * (32 * 1024 + 1)), "instructions over 32 KiB")
refused(openai.BadRequestError, lambda: sessions.create(
    environment={"type": "openai_hosted", "network": {"access": "restricted"}}, agent_id=agent.id),
    "a restricted network naming no domains")
# A restricted network narrows the session's sandbox's egress where sandboxes go out through
# serve's egress proxy (SANDWARDEN_NARROWS=1: bubblewrap here), and is refused elsewhere.
restricted = {"type": "openai_hosted",
              "network": {"access": "restricted", "allowed_domains": ["allowed.example"]}}
if os.environ.get("SANDWARDEN_NARROWS") == "1":
    narrowed = sessions.create(environment=restricted, agent_id=agent.id)
    with sessions.stream(narrowed.id, input="narrowed hello") as turn:
        check(turn.get_final_result().messages[0].content[0].text == "narrowed hello", "runs")
    sessions.delete(narrowed.id)
else:
    refused(openai.BadRequestError, lambda: sessions.create(environment=restricted,
                                                            agent_id=agent.id),
            "a restricted network without the egress proxy")
refused(openai.BadRequestError, lambda: sessions.events.create(sid, events=[{
    "type": "agent.session.input.tool_result", "turn_id": "t", "call_id": "c", "success": True}]),
    "a tool result for no call")
refused(openai.NotFoundError, lambda: sessions.retrieve("ses_nope"), "an unknown session")
refused(openai.BadRequestError, lambda: sessions.create(
    environment={"type": "openai_hosted", "files": [
        {"type": "inline", "path": "/etc/passwd", "data": "eA=="}]}, agent_id=agent.id),
    "a staged file outside /workspace")
refused(openai.NotFoundError, lambda: sessions.create(
    environment={"type": "openai_hosted", "files": [
        {"type": "file_id", "file_id": "file_nope", "path": "/workspace/x"}]}, agent_id=agent.id),
    "a staged file of an unknown id")
refused(openai.NotFoundError, lambda: agents.environments.retrieve("env_ses_nope"),
        "an unknown environment")
refused(openai.NotFoundError, lambda: list(sessions.artifacts.list(sid)), "artifacts")
bad = openai.OpenAI(base_url=BASE, api_key="sk-not-a-key", max_retries=0)
refused(openai.AuthenticationError, lambda: bad.beta.agents.sessions.retrieve(sid), "a wrong key")

# ---- delete

check(sid in [s.id for s in sessions.list()], "sessions listed")
import threading

# A stream open when the session is deleted is told so (`agent.session.failed`), and ends.
told = []


def watch():
    with sessions.events.stream(other) as stream:
        for event in stream:
            told.append(event)


watcher = threading.Thread(target=watch, daemon=True)
watcher.start()
time.sleep(0.5)
deleted = sessions.delete(other)
watcher.join(timeout=20)
check(not watcher.is_alive() and [e.type for e in told[-1:]] == ["agent.session.failed"],
      f"the open stream is told the session ended: {[e.type for e in told]}")
check(told[-1].session.status == "failed", f"{told[-1]}")
check(deleted.deleted, f"{deleted}")
refused(openai.NotFoundError, lambda: sessions.retrieve(other), "a deleted session")
check(agents.delete(agent.id).deleted, "agent deleted")

print(f"session {sid}")
print("openai agents: every step passed")
