"""The stewrd client, unchanged, against sandwarden's Stewrd mount (base URL
SANDWARDEN_URL/compat/stewrd/echo). Exits non-zero on the first expectation that does not hold."""

import os
import sys

from stewrd import Stewrd, StewrdError
from stewrd.types import InputFile, ToolDefinition

# The checks the vendor SDKs' clients use (tests/sdk/common.py).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "sdk"))
from common import check, nonce  # noqa: E402

client = Stewrd(os.environ["SANDWARDEN_KEY"], base_url=os.environ["SANDWARDEN_URL"] + "/compat/stewrd/echo")

said = "hello " + nonce()
r = client.agent.run(said)
check(r.status == "completed" and r.message == said, f"run answers the turn: {r}")
check(r.files == [], "a turn that writes nothing returns no file")
check(r.usage.tokens_used > 0, f"the usage is counted: {r.usage}")

# Input files are in the working directory; what the turn writes comes back, not the inputs.
body = "report " + nonce()
r = client.agent.run("/write out/report.md " + body, files=[InputFile(name="in.txt", content="input " + nonce())])
check([(f.name, f.content) for f in r.files] == [("out/report.md", body)], f"the written file: {r.files}")
seen = "seen " + nonce()
r = client.agent.run("/cat in.txt", files=[InputFile(name="in.txt", content=seen)])
check(r.message == seen, f"the input file reached the agent: {r.message}")

# Streamed: tokens, then a done carrying the reply and the files.
streamed = "streamed " + nonce()
events = list(client.agent.stream("/write s.txt " + streamed))
kinds = [e.type for e in events]
check(kinds[-1] == "done" and "token" in kinds, f"tokens then done: {kinds}")
text = "".join(e.content for e in events if e.type == "token")
done = events[-1].response
check(text == done.message == "wrote s.txt", f"the tokens make the reply: {text!r} / {done.message!r}")
check([(f.name, f.content) for f in done.files] == [("s.txt", streamed)], f"the streamed files: {done.files}")

# Each request has a sandbox of its own: a file of one is not in the next.
try:
    r = client.agent.run("/cat s.txt")
    check(False, f"a file of another request was read: {r}")
except StewrdError as e:
    check(e.status == 502 and "cannot read" in e.message, f"the next request's sandbox is new: {e!r}")

# What has no counterpart is refused in Stewrd's error shape, not dropped.
for kwargs in ({"tools": [ToolDefinition(name="t", description="d", parameters={})]},
               {"capabilities": ["research"]}):
    try:
        client.agent.run("x", **kwargs)
        check(False, f"refused: {kwargs}")
    except StewrdError as e:
        check(e.status == 422 and e.code == "not_supported", f"the refusal: {e!r}")
try:
    client.agent.run("/fail stewrd " + nonce())
    check(False, "a failed turn raises")
except StewrdError as e:
    check(e.status == 502 and e.code == "turn_failed", f"the failure: {e!r}")
# Nobody can answer the agent's questions here: each is refused, and the turn goes on.
r = client.agent.run("/ask may I " + nonce())
check("permission denied" in r.message, f"the question was refused: {r.message}")
print("stewrd: ok")
