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

# Everruns: run() on a new session and again on it.
async def everruns():
    agent = AgentClient(agent_url=f"{BASE}/compat/everruns/{HARNESS}", credential=KEY)
    session = (await agent.create_session())["id"]
    for _ in range(2):
        prompt = "everruns " + nonce()
        reply = await asyncio.wait_for(agent.run(prompt, session), 300)
        check(answer_to(prompt) in reply, f"everruns: {reply!r}")
    await agent.close()

asyncio.run(everruns())

# Stewrd: one turn in a sandbox of its own.
prompt = "stewrd " + nonce()
r = Stewrd(KEY, base_url=f"{BASE}/compat/stewrd/{HARNESS}", timeout=300).agent.run(prompt)
check(answer_to(prompt) in r.message, f"stewrd: {r.message!r}")

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
check(call("DELETE", f"/api/v1/managed_agents/sessions/{lap}")["status"] == "deleted", "lap: delete")

# Karta's calls: a session of the default template under a project, a turn.
call("POST", "/v1/projects", {"ref": "real-" + nonce(), "template": HARNESS})
project = call("GET", "/v1/projects")["projects"][-1]["ref"]
karta = call("POST", f"/v1/projects/{project}/sessions", {"metadata": {"user": "u"}})["id"]
prompt = "karta " + nonce()
reply = call("POST", f"/v1/projects/{project}/sessions/{karta}/messages", {"text": prompt})
check(answer_to(prompt) in reply["text"] and reply["agent"] == "default", f"karta: {reply}")
call("DELETE", f"/v1/projects/{project}/sessions/{karta}")
print("real agent behind the seed clients: ok")
