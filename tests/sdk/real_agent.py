"""Both vendor SDKs against a real agent CLI behind sandwarden (tests/real_harnesses.rs runs it with
the fake model behind the CLI): a turn answered with its own prompt, a shell command the agent asks
to run allowed (its file appears in the session) and one denied (no file), a client-defined tool
the agent calls and the client answers, an interrupt followed by a turn that holds only its own
answer, a reconnect in the middle of a turn, the history paged. The agents carry a system prompt
(Anthropic `system`, OpenAI `instructions`). SANDWARDEN_URL, SANDWARDEN_KEY, SANDWARDEN_HARNESS and
SANDWARDEN_MODEL (the model option the agent offers) say where and what. The last line printed
says what the model must have seen, for the Rust side to check in the fake model's records."""

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
system_marker = f"standing-order-{nonce()}"
agent = beta.agents.create(
    name=HARNESS, model=MODEL, metadata=META, system=f"Obey {system_marker}.",
    tools=[{"type": "agent_toolset_20260401"},
           {"type": "custom", "name": "lookup", "description": "looks a word up",
            "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}}}])
sid = beta.sessions.create(agent=agent.id, environment_id=env.id).id
streamed = {}


def a_turn(text, confirm=None, on_event=None, tool_answer=None):
    """One turn; `confirm` answers each tool confirmation ("allow"/"deny"), `tool_answer` each
    call of the custom tool (its input → the text answered). The events."""
    events = []
    with beta.sessions.events.stream(sid) as stream:
        beta.sessions.events.send(sid, events=[
            {"type": "user.message", "content": [{"type": "text", "text": text}]}])
        for event in stream:
            events.append(event)
            if getattr(event, "id", None) and event.type not in ("event_start", "event_delta"):
                streamed[event.id] = event
            if on_event:
                on_event(event)
            if event.type != "session.status_idle":
                continue
            if event.stop_reason.type != "requires_action":
                return events
            by_id = {e.id: e for e in events if getattr(e, "id", None)}
            for blocked in event.stop_reason.event_ids:
                if blocked in by_id and by_id[blocked].type == "agent.custom_tool_use":
                    check(tool_answer, f"{HARNESS}: unexpected custom tool call: {by_id[blocked]}")
                    beta.sessions.events.send(sid, events=[{
                        "type": "user.custom_tool_result", "custom_tool_use_id": blocked,
                        "content": [{"type": "text", "text": tool_answer(by_id[blocked].input)}]}])
                    continue
                check(confirm, f"{HARNESS}: unexpected confirmation asked: {event}")
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
        # What the agent wrote, listed as the session's files and downloaded through the SDK.
        outputs = {f.filename: f for f in beta.files.list(scope_id=sid)}
        check(f"{verdict}-{n}.txt" in outputs, f"{HARNESS}: the session's files: {sorted(outputs)}")
        got = beta.files.download(outputs[f"{verdict}-{n}.txt"].id).read()
        check(got == f"ok-{n}\n".encode(), f"{HARNESS}: downloaded {got!r}")
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

# A client-defined tool: the agent calls it (through the harness's MCP server), the client answers.
n = nonce()
tool_inputs = []


def lookup(given):
    tool_inputs.append(given)
    return f"found-{given.get('q')}"


events = a_turn('CALLTOOL lookup {"q": "osprey-%s"}' % n, confirm="allow", tool_answer=lookup)
check(tool_inputs == [{"q": f"osprey-{n}"}], f"{HARNESS}: the tool's calls: {tool_inputs}")
check("Tool done." in text_of(events), f"{HARNESS}: after the tool: {text_of(events)!r}")
anthropic_tool_answer = f"found-osprey-{n}"

# A reconnect in the middle of a turn: the history re-listed and the new stream hold it once.
n = nonce()
stream = beta.sessions.events.stream(sid)
beta.sessions.events.send(sid, events=[
    {"type": "user.message", "content": [{"type": "text", "text": f"SLOW 150 6 {n}"}]}])
for event in stream:
    if event.type == "session.status_running":
        break
stream.close()
with beta.sessions.events.stream(sid) as stream:
    merged = {e.id: e for e in beta.sessions.events.list(sid, limit=1000)}
    rest = []
    for event in stream:
        rest.append(event)
        if event.type == "session.status_idle":
            break
    for e in rest:
        merged.setdefault(e.id, e)
ticks = [e for e in merged.values() if e.type == "agent.message" and "tick 6" in text_of([e])]
check(len(ticks) == 1, f"{HARNESS}: the answer arrives once after the reconnect: {len(ticks)}")
check(text_of(ticks) == "tick 1 tick 2 tick 3 tick 4 tick 5 tick 6",
      f"{HARNESS}: and whole: {text_of(ticks)!r}")

# The history, paged: each event once, every streamed event in it, prompts in the order sent.
paged = list(beta.sessions.events.list(sid, limit=3))
ids = [e.id for e in paged]
check(len(ids) == len(set(ids)), f"{HARNESS}: no event twice in the history")
check([e.id for e in beta.sessions.events.list(sid, limit=1000)] == ids,
      f"{HARNESS}: pages of 3 and one page of 1000 agree")
for event_id, event in streamed.items():
    check(event_id in ids, f"{HARNESS}: {event.type} {event_id} from a stream is in the history")
prompts = [e.content[0].text for e in paged if e.type == "user.message"]
check(prompts[0].startswith("hello pelican") and prompts[-1].startswith("SLOW 150 6"),
      f"{HARNESS}: the prompts in order: {prompts}")

beta.sessions.delete(sid)
try:
    beta.sessions.retrieve(sid)
    check(False, f"{HARNESS}: a deleted session must be gone")
except anthropic.NotFoundError:
    pass

# ---- OpenAI

oai = openai.OpenAI(base_url=f"{URL}/openai/v1", api_key=KEY, max_retries=0, timeout=300)
sessions = oai.beta.agents.sessions
instructions_marker = f"house-rule-{nonce()}"
session = sessions.create(
    environment={"type": "openai_hosted"}, metadata=META,
    agent={"model": MODEL, "instructions": f"Follow {instructions_marker}.", "tools": [{
        "type": "function", "name": "lookup", "description": "looks a word up",
        "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}]})
n = nonce()
with sessions.stream(session.id, input=f"hello heron {n}") as turn:
    result = turn.get_final_result()
answer = "".join(c.text for m in result.messages for c in m.content)
check(f"You said: hello heron {n}" in answer, f"{HARNESS}: {answer!r}")

def o_message(text):
    return {"type": "agent.session.input.message",
            "input": [{"role": "user", "content": [{"type": "input_text", "text": text}]}]}


def o_turn(text, decision="approve", tool=None, on_event=None, stream=None):
    """One turn over a stream opened first (or `stream`); each approval answered `decision`,
    each function call by `tool` (its arguments → its output). The events, to idle."""
    own = stream is None
    stream = stream or sessions.events.stream(session.id)
    events, ended, answered = [], False, set()
    try:
        if text is not None:
            sessions.events.create(session.id, events=[o_message(text)])
        for event in stream:
            events.append(event)
            if on_event:
                on_event(event)
            if event.type == "agent.session.requires_action":
                for action in event.session.required_actions:
                    key = getattr(action, "call_id", None) or getattr(action, "request_id", None)
                    if key in answered:
                        continue
                    answered.add(key)
                    if action.type == "function_call":
                        check(tool, f"{HARNESS}: unexpected function call: {action}")
                        sessions.events.create(session.id, events=[{
                            "type": "agent.session.input.tool_result",
                            "turn_id": action.turn_id, "call_id": action.call_id,
                            "success": True, "output": tool(json.loads(action.arguments))}])
                    else:
                        sessions.events.create(session.id, events=[{
                            "type": "agent.session.input.mcp_approval_request_result",
                            "request_id": action.request_id,
                            "response": {"type": "mcp_tool_call", "decision": decision}}])
            if event.type in ("agent.session.turn.completed", "agent.session.turn.failed",
                              "agent.session.turn.cancelled"):
                ended = True
            if event.type == "agent.session.idle" and ended:
                return events
    finally:
        if own:
            stream.close()
    check(False, f"{HARNESS}: the stream ended before idle: {[e.type for e in events]}")


def o_text(events):
    return "".join(p.text for e in events if e.type == "agent.session.turn.item.done"
                   and e.item.type == "message" and e.item.role == "assistant"
                   for p in e.item.content)


# An approval approved (the file appears) and one denied (none does).
for decision in ("approve", "deny"):
    n = nonce()
    o_turn(f"BASH echo ok-{n} > {decision}-{n}.txt", decision=decision)
    written = native_file(session.id, f"{decision}-{n}.txt")
    if decision == "approve":
        check(written == f"ok-{n}\n", f"{HARNESS}: approved command wrote {written!r}")
        listed = [f.path for f in oai.beta.agents.environments.files.list(session.environment.id)]
        check(f"/workspace/approve-{n}.txt" in listed, f"{HARNESS}: the environment: {listed}")
    else:
        check(written is None, f"{HARNESS}: a denied command wrote {written!r}")

# A client-defined function: the agent calls it, the client's result goes back, the turn ends.
n = nonce()
calls = []


def lookup_fn(args):
    calls.append(args)
    return f"found-{args.get('q')}"


o_turn('CALLTOOL lookup {"q": "kite-%s"}' % n, tool=lookup_fn)
check(calls == [{"q": f"kite-{n}"}], f"{HARNESS}: the function's calls: {calls}")
function_answer = f"found-kite-{n}"

# A cancel mid-turn, then a turn that holds only its own answer.
cancelled = []


def cancel(event):
    if event.type == "agent.session.turn.output_text.delta" and not cancelled:
        cancelled.append(True)
        sessions.events.create(session.id, events=[{"type": "agent.session.input.cancel"}])


events = o_turn("SLOW 500 40", on_event=cancel)
check(cancelled and any(e.type == "agent.session.turn.cancelled" for e in events),
      f"{HARNESS}: the cancel ends the turn: {[e.type for e in events]}")
n = nonce()
after = o_text(o_turn(f"after the cancel plover {n}"))
check(f"You said: after the cancel plover {n}" in after and "tick" not in after,
      f"{HARNESS}: the turn after the cancel holds {after!r}")

# A reconnect in the middle of a turn: the items listed and the new stream hold it once.
stream = sessions.events.stream(session.id)
sessions.events.create(session.id, events=[o_message("SLOW 150 6")])
for event in stream:
    if event.type == "agent.session.turn.output_text.delta":
        break
stream.close()
with sessions.events.stream(session.id) as stream:
    merged = {i.id: i for i in sessions.items.list(session.id, limit=100)}
    for event in o_turn(None, stream=stream):
        if event.type == "agent.session.turn.item.done":
            merged.setdefault(event.item.id, event.item)
ticks = [i for i in merged.values() if i.type == "message" and i.role == "assistant"
         and "tick 6" in i.content[0].text]
check(len(ticks) == 1, f"{HARNESS}: the answer arrives once after the reconnect: {len(ticks)}")
check(ticks[0].content[0].text == "tick 1 tick 2 tick 3 tick 4 tick 5 tick 6",
      f"{HARNESS}: and whole: {ticks[0].content[0].text!r}")

# Items paged: each once, pages of 2 equal one page; each prompt in the order sent.
paged = list(sessions.items.list(session.id, limit=2, order="asc"))
ids = [i.id for i in paged]
check(len(ids) == len(set(ids)), f"{HARNESS}: no item twice")
check(ids == [i.id for i in sessions.items.list(session.id, limit=100, order="asc")],
      f"{HARNESS}: pages of 2 and one page agree")
prompts = [i.content[0].text for i in paged if i.type == "message" and i.role == "user"]
check(prompts[0].startswith("hello heron") and prompts[-1] == "SLOW 150 6",
      f"{HARNESS}: the prompts in order: {prompts}")

sessions.delete(session.id)
try:
    sessions.retrieve(session.id)
    check(False, f"{HARNESS}: a deleted session must be gone")
except openai.NotFoundError:
    pass

print(json.dumps({"harness": HARNESS, "passed": True,
                  "model_saw": [system_marker, instructions_marker, anthropic_tool_answer,
                                function_answer]}))
