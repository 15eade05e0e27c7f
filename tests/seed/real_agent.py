"""The seed platforms' clients and a chat client in front of a real agent CLI (the template in
SANDWARDEN_HARNESS, against the fake model): each sends its own prompt and must get the fake
model's answer to that prompt, and nothing of another's. Exits non-zero on the first expectation
that does not hold."""

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request

from everruns_sdk import AgentClient
from stewrd import Stewrd

# The checks the vendor SDKs' clients use (tests/sdk/common.py).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "sdk"))
from common import check, nonce  # noqa: E402

BASE = os.environ["SANDWARDEN_URL"].rstrip("/")
KEY = os.environ["SANDWARDEN_KEY"]
HARNESS = os.environ["SANDWARDEN_HARNESS"]
MOTUS = os.path.join(os.path.dirname(sys.executable), "motus")


def answer_to(prompt):
    """What the fake model answers a prompt (docs/fake-model.md)."""
    return "You said: " + prompt


# Motus: its CLI's chat loop, one turn.
prompt = "motus " + nonce()
out = subprocess.run([MOTUS, "serve", "chat", f"{BASE}/compat/motus/{HARNESS}", prompt],
                     env={**os.environ, "LITHOSAI_API_KEY": KEY}, capture_output=True, text=True,
                     timeout=300)
check(out.returncode == 0 and answer_to(prompt) in out.stdout, f"motus: {out.stdout}{out.stderr}")
MOTUS_ENV = {**os.environ, "LITHOSAI_API_KEY": KEY}
MURL = f"{BASE}/compat/motus/{HARNESS}"
session = json.loads(subprocess.run([MOTUS, "serve", "create", MURL], env=MOTUS_ENV,
                                    capture_output=True, text=True, timeout=300).stdout)["session_id"]
n = nonce()
out = subprocess.run([MOTUS, "serve", "chat", MURL, f"BASH echo ok-{n} > motus-{n}.txt", "--session", session],
                     env=MOTUS_ENV, input="y\n", capture_output=True, text=True, timeout=300)
check("[approval]" in out.stdout and "Tool done." in out.stdout, f"motus approval: {out.stdout}{out.stderr}")
history = json.loads(subprocess.run([MOTUS, "serve", "messages", MURL, session], env=MOTUS_ENV,
                                    capture_output=True, text=True, timeout=60).stdout)
check(history[-1]["content"].endswith("Tool done."), f"motus history: {history}")
out = subprocess.run([MOTUS, "serve", "delete", MURL, session], env=MOTUS_ENV, capture_output=True,
                     text=True, timeout=60)
check(out.returncode == 0, f"motus delete: {out.stdout}")

# Everruns: run() (streamed) on a new session and again on it, an approval, a cancel, the events.
async def everruns():
    agent = AgentClient(agent_url=f"{BASE}/compat/everruns/{HARNESS}", credential=KEY)
    session = (await agent.create_session())["id"]
    for _ in range(2):
        prompt = "everruns " + nonce()
        reply = await asyncio.wait_for(agent.run(prompt, session), 300)
        check(answer_to(prompt) in reply, f"everruns: {reply!r}")

    async def until(status):
        for _ in range(1500):
            s = await agent.get_session(session)
            if s["status"] == status:
                return s
            await asyncio.sleep(0.1)
        raise AssertionError(f"everruns: never {status}")

    n = nonce()
    await agent.send_message(session, f"BASH echo ok-{n} > everruns-{n}.txt")
    waiting = await until("waitingfortoolresults")
    await agent.submit_tool_approvals(session, {"decisions": [
        {"approval_id": waiting["pending_approvals"][0]["approval_id"], "decision": "approve"}]})
    await until("idle")
    await agent.send_message(session, "SLOW 500 60")
    await until("active")
    await asyncio.sleep(1)
    await agent.cancel(session)
    await until("idle")
    kinds = [e.type for e in await agent.list_events(session, limit=1000)]
    for k in ("tool.started", "tool.completed", "turn.cancelled", "turn.completed"):
        check(k in kinds, f"everruns events hold {k}: {kinds}")
    await agent.close()

asyncio.run(everruns())

# Stewrd: one turn in a sandbox of its own, then one streamed.
stewrd = Stewrd(KEY, base_url=f"{BASE}/compat/stewrd/{HARNESS}", timeout=300)
prompt = "stewrd " + nonce()
r = stewrd.agent.run(prompt)
check(answer_to(prompt) in r.message, f"stewrd: {r.message!r}")
prompt = "stewrd streamed " + nonce()
events = list(stewrd.agent.stream(prompt))
check(events[-1].type == "done" and answer_to(prompt) in events[-1].response.message,
      f"stewrd stream: {[e.type for e in events]}")

# A Chat Completions client, with plain HTTP.
prompt = "chat " + nonce()
request = urllib.request.Request(
    BASE + "/v1/chat/completions", method="POST",
    headers={"authorization": "Bearer " + KEY, "content-type": "application/json"},
    data=json.dumps({"model": HARNESS, "messages": [{"role": "user", "content": prompt}]}).encode())
with urllib.request.urlopen(request, timeout=300) as resp:
    text = json.load(resp)["choices"][0]["message"]["content"]
check(answer_to(prompt) in text, f"chat: {text!r}")
def call(method, path, body=None):
    request = urllib.request.Request(
        BASE + path, method=method,
        headers={"authorization": "Bearer " + KEY, "content-type": "application/json"},
        data=None if body is None else json.dumps(body).encode())
    with urllib.request.urlopen(request, timeout=300) as resp:
        return json.load(resp)


def sse(method, path, body, until):
    """The `data:` frames of a stream, up to the one `until` holds for."""
    request = urllib.request.Request(
        BASE + path, method=method,
        headers={"authorization": "Bearer " + KEY, "content-type": "application/json"},
        data=json.dumps(body).encode())
    frames = []
    with urllib.request.urlopen(request, timeout=300) as resp:
        for raw in resp:
            line = raw.decode().rstrip("\n")
            if line.startswith("data: "):
                frame = json.loads(line[6:])
                frames.append(frame)
                if until(frame):
                    break
    return frames


# The LiteLLM Agent Platform's calls (lap.mjs): create, wait for ready, a turn, delete.
created = call("POST", f"/api/v1/managed_agents/agents/{HARNESS}/session", {"title": "lap-cli"})
lap = created["id"]
for _ in range(600):
    if call("GET", f"/api/v1/managed_agents/sessions/{lap}")["status"] == "ready":
        break
    time.sleep(0.2)
prompt = "lap " + nonce()
parts = call("POST", f"/api/v1/managed_agents/sessions/{lap}/message", {"text": prompt})["parts"]
text = "".join(p.get("text", "") for p in parts if p.get("type") == "text")
check(answer_to(prompt) in text, f"lap: {text!r}")
prompt = "lap streamed " + nonce()
frames = sse("POST", f"/api/v1/managed_agents/sessions/{lap}/message_stream", {"text": prompt},
             lambda f: f.get("type") in ("done", "error"))
streamed = "".join(f["event"]["data"].get("text", "") for f in frames
                   if f.get("type") == "harness_event" and f["event"]["type"] == "text")
check(frames[-1]["type"] == "done" and answer_to(prompt) in streamed, f"lap stream: {streamed!r}")
check(len(call("GET", f"/api/v1/managed_agents/sessions/{lap}/messages")["messages"]) >= 4, "lap history")
check(call("DELETE", f"/api/v1/managed_agents/sessions/{lap}")["status"] == "deleted", "lap: delete")

# Karta's calls: a session of the default template under a project, a turn.
call("POST", "/v1/projects", {"ref": "real-" + nonce(), "template": HARNESS})
project = call("GET", "/v1/projects")["projects"][-1]["ref"]
karta = call("POST", f"/v1/projects/{project}/sessions", {"metadata": {"user": "u"}})["id"]
prompt = "karta " + nonce()
reply = call("POST", f"/v1/projects/{project}/sessions/{karta}/messages", {"text": prompt})
check(answer_to(prompt) in reply["text"] and reply["agent"] == "default", f"karta: {reply}")
prompt = "karta streamed " + nonce()
frames = sse("POST", f"/v1/projects/{project}/sessions/{karta}/messages", {"text": prompt, "stream": True},
             lambda f: f.get("type") in ("done", "error"))
streamed = "".join(f["data"]["part"]["text"] for f in frames if f.get("type") == "text")
check(answer_to(prompt) in streamed, f"karta stream: {streamed!r}")
# An approval answered with PUT, then the turn's end.
n = nonce()
call("POST", f"/v1/projects/{project}/sessions/{karta}/messages",
     {"text": f"BASH echo ok-{n} > karta-{n}.txt", "async": True})
asked = None
for _ in range(1500):
    events = call("GET", f"/v1/projects/{project}/sessions/{karta}/events?since=0&limit=1000")["events"]
    asked = next((e for e in events if e["type"] == "input_required"), None)
    if asked:
        break
    time.sleep(0.1)
check(asked is not None, "karta: the agent asked")
call("PUT", f"/v1/projects/{project}/sessions/{karta}/inputs/{asked['data']['request_id']}",
     {"decision": "approve_once"})
for _ in range(1500):
    s = call("GET", f"/v1/projects/{project}/sessions/{karta}?wait=true&timeout=10")
    if s["status"] == "ready":
        break
history = call("GET", f"/v1/projects/{project}/sessions/{karta}/messages")["messages"]
check(history[-1]["text"].endswith("Tool done."), f"karta: the approved turn ended: {history[-1]}")
call("DELETE", f"/v1/projects/{project}/sessions/{karta}")
print("real agent behind the seed clients: ok")
