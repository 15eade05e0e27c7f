"""Both vendor SDKs against a real agent CLI behind sandwarden (tests/real_harnesses.rs runs it with
the fake model behind the CLI): a turn answered with its own prompt, a shell command the agent asks
to run allowed (its file appears in the session) and one denied (no file), an interrupt followed by
a turn that holds only its own answer. SANDWARDEN_URL, SANDWARDEN_KEY, SANDWARDEN_HARNESS and
SANDWARDEN_MODEL (the model option the agent offers) say where and what."""

import json
import os
import urllib.error
import urllib.request

import anthropic
import openai

from common import check, nonce

URL = os.environ["SANDWARDEN_URL"].rstrip("/")
KEY = os.environ["SANDWARDEN_KEY"]
HARNESS = os.environ["SANDWARDEN_HARNESS"]
MODEL = os.environ["SANDWARDEN_MODEL"]
META = {"sandwarden.harness": HARNESS}


def native_file(session_id, path):
    """A file of the session's working directory through the native API; None when missing."""
    req = urllib.request.Request(f"{URL}/v1/sessions/{session_id}/files/{path}",
                                 headers={"Authorization": f"Bearer {KEY}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.read().decode()
    except urllib.error.HTTPError as e:
        check(e.code == 404, f"reading {path}: {e.code} {e.read()!r}")
        return None


# ---- Anthropic

client = anthropic.Anthropic(base_url=f"{URL}/anthropic", api_key=KEY, max_retries=0, timeout=300)
beta = client.beta
env = beta.environments.create(name="real")
agent = beta.agents.create(name=HARNESS, model=MODEL, metadata=META)
sid = beta.sessions.create(agent=agent.id, environment_id=env.id).id


def a_turn(text, confirm=None, on_event=None):
    """One turn; `confirm` answers each tool confirmation ("allow"/"deny"). The events."""
    events = []
    with beta.sessions.events.stream(sid) as stream:
        beta.sessions.events.send(sid, events=[
            {"type": "user.message", "content": [{"type": "text", "text": text}]}])
        for event in stream:
            events.append(event)
            if on_event:
                on_event(event)
            if event.type != "session.status_idle":
                continue
            if event.stop_reason.type != "requires_action":
                return events
            check(confirm, f"{HARNESS}: unexpected confirmation asked: {event}")
            for blocked in event.stop_reason.event_ids:
                beta.sessions.events.send(sid, events=[{
                    "type": "user.tool_confirmation", "tool_use_id": blocked, "result": confirm}])
    check(False, f"{HARNESS}: the stream ended before idle: {[e.type for e in events]}")


def text_of(events):
    return "".join(b.text for e in events if e.type == "agent.message" for b in e.content)


n = nonce()
events = a_turn(f"hello pelican {n}")
check(f"You said: hello pelican {n}" in text_of(events), f"{HARNESS}: {text_of(events)!r}")

for verdict in ("allow", "deny"):
    n = nonce()
    events = a_turn(f"BASH echo ok-{n} > {verdict}-{n}.txt", confirm=verdict)
    asked = [e for e in events if e.type == "agent.tool_use" and e.evaluated_permission == "ask"]
    check(asked, f"{HARNESS}: the command asked first: {[e.type for e in events]}")
    written = native_file(sid, f"{verdict}-{n}.txt")
    if verdict == "allow":
        check(written == f"ok-{n}\n", f"{HARNESS}: allowed command wrote {written!r}")
    else:
        check(written is None, f"{HARNESS}: a denied command wrote {written!r}")

interrupted = []


def interrupt(event):
    if event.type == "session.status_running" and not interrupted:
        interrupted.append(True)
        beta.sessions.events.send(sid, events=[{"type": "user.interrupt"}])


a_turn("SLOW 500 40", on_event=interrupt)
n = nonce()
after = text_of(a_turn(f"after the interrupt egret {n}"))
check(f"You said: after the interrupt egret {n}" in after and "tick" not in after,
      f"{HARNESS}: the turn after the interrupt holds {after!r}")

# ---- OpenAI

oai = openai.OpenAI(base_url=f"{URL}/openai/v1", api_key=KEY, max_retries=0, timeout=300)
sessions = oai.beta.agents.sessions
session = sessions.create(environment={"type": "openai_hosted"}, agent={"model": MODEL},
                          metadata=META)
n = nonce()
with sessions.stream(session.id, input=f"hello heron {n}") as turn:
    result = turn.get_final_result()
answer = "".join(c.text for m in result.messages for c in m.content)
check(f"You said: hello heron {n}" in answer, f"{HARNESS}: {answer!r}")

n = nonce()
with sessions.events.stream(session.id) as stream:
    sessions.events.create(session.id, events=[{
        "type": "agent.session.input.message",
        "input": [{"role": "user", "content": [
            {"type": "input_text", "text": f"BASH echo ok-{n} > approved-{n}.txt"}]}]}])
    ended = False
    for event in stream:
        if event.type == "agent.session.requires_action":
            for action in event.session.required_actions:
                sessions.events.create(session.id, events=[{
                    "type": "agent.session.input.mcp_approval_request_result",
                    "request_id": action.request_id,
                    "response": {"type": "mcp_tool_call", "decision": "approve"}}])
        if event.type == "agent.session.turn.completed":
            ended = True
        if event.type == "agent.session.idle" and ended:
            break
check(native_file(session.id, f"approved-{n}.txt") == f"ok-{n}\n", f"{HARNESS}: approved")

print(json.dumps({"harness": HARNESS, "passed": True}))
