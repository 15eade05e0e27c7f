"""everruns-sdk's AgentClient, unchanged, against sandwarden's Everruns mount: the agent URL is
SANDWARDEN_URL/compat/everruns/echo and the credential the tenant's API key. Exits non-zero on
the first expectation that does not hold."""

import asyncio
import os
import sys

from everruns_sdk import AgentClient
from everruns_sdk.errors import ApiError, EverrunsError

# The checks the vendor SDKs' clients use (tests/sdk/common.py).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "sdk"))
from common import check, nonce  # noqa: E402

URL = os.environ["SANDWARDEN_URL"] + "/compat/everruns/echo"
KEY = os.environ["SANDWARDEN_KEY"]


async def wait_status(agent, sid, want, tries=200):
    for _ in range(tries):
        s = await agent.get_session(sid)
        if s["status"] == want:
            return s
        await asyncio.sleep(0.05)
    raise AssertionError(f"session never {want}: {s}")


async def main():
    agent = AgentClient(agent_url=URL, credential=KEY)
    card = await agent.card()
    check(card["name"] == "echo", f"the card names the agent: {card}")

    session = await agent.create_session(title="everruns-" + nonce())
    sid = session["id"]
    print(f"session {sid}")
    check(session["status"] in ("idle", "started"), f"a new session: {session}")

    # run() sends, follows the SSE stream to turn.completed, and returns the reply; twice on one
    # session (the second skips the first turn's events through list_events' sequences).
    first, second = "first " + nonce(), "second " + nonce()
    check(await agent.run(first, sid) == first, "run() returns the first turn's reply")
    check(await agent.run(second, sid) == second, "run() returns the second turn's reply, not the first")
    fresh = "fresh " + nonce()
    check(await agent.run(fresh) == fresh, "run() on a session it creates")

    # send_message answers at once with the user message it created.
    third = "third " + nonce()
    sent = await agent.send_message(sid, third)
    check(sent["role"] == "user" and sent["content"][0]["text"] == third, f"the created message: {sent}")
    await wait_status(agent, sid, "idle")

    events = await agent.list_events(sid)
    kinds = [e.type for e in events]
    for k in ("input.message", "turn.started", "output.message.delta",
              "output.message.completed", "turn.completed", "session.idled"):
        check(k in kinds, f"the events hold {k}: {kinds}")
    seqs = [e.sequence for e in events]
    check(seqs == sorted(seqs) and len(set(seqs)) == len(seqs), f"sequences increase: {seqs}")
    replies = [e.data["message"]["content"][0]["text"] for e in events
               if e.type == "output.message.completed"]
    check(replies == [first, second, third], f"each turn's reply once, in order: {replies}")
    # Paging forward from a sequence gives only what follows it.
    later = await agent.list_events(sid, after_sequence=seqs[len(seqs) // 2])
    check([e.sequence for e in later] == seqs[len(seqs) // 2 + 1:], "after_sequence pages forward")

    # A stream resumed by since_id starts after that event.
    stream = agent.stream_events(sid, since_id=events[-3].id, max_retries=0)
    got = []
    async def read():
        async for e in stream:
            got.append(e.id)
            if len(got) == 2:
                break
    await asyncio.wait_for(read(), 10)
    stream.stop()
    await stream.aclose()
    check(got == [e.id for e in events[-2:]], f"since_id resumes after it: {got}")

    # An approval: the session waits, names it, and takes the decision.
    await agent.send_message(sid, "/ask may I " + nonce())
    waiting = await wait_status(agent, sid, "waitingfortoolresults")
    approvals = waiting["pending_approvals"]
    check(len(approvals) == 1, f"one pending approval: {waiting}")
    await agent.submit_tool_approvals(sid, {"decisions": [
        {"approval_id": approvals[0]["approval_id"], "decision": "reject"}]})
    await wait_status(agent, sid, "idle")
    last = (await agent.list_events(sid, after_sequence=seqs[-1]))
    done = [e for e in last if e.type == "output.message.completed"]
    check(done and "denied" in done[-1].data["message"]["content"][0]["text"],
          f"the agent was refused: {[e.type for e in last]}")
    try:
        await agent.submit_tool_approvals(sid, {"decisions": [
            {"approval_id": approvals[0]["approval_id"], "decision": "approve"}]})
        check(False, "an answered approval is not answered twice")
    except ApiError as e:
        check(e.code == "no_pending_approval", f"the error names why: {e.code}")

    # Cancel: a running turn ends as turn.cancelled; an idle session takes a cancel too.
    await agent.send_message(sid, "/slow 100 tick")
    await wait_status(agent, sid, "active")
    await agent.cancel(sid)
    await wait_status(agent, sid, "idle")
    await agent.cancel(sid)
    tail = await agent.list_events(sid, after_sequence=seqs[-1])
    check("turn.cancelled" in [e.type for e in tail], f"the cancel is an event: {[e.type for e in tail]}")

    # A failing turn: run() raises with the native code.
    try:
        await agent.run("/fail everruns " + nonce(), sid)
        check(False, "a failed turn raises")
    except EverrunsError as e:
        check("agent_error" in str(e), f"the failure names its code: {e}")

    # Sending while a turn runs is refused (a running turn is not steered here).
    await agent.send_message(sid, "/slow 30 tick")
    try:
        await agent.send_message(sid, "steer " + nonce())
        check(False, "a message while a turn runs is refused")
    except ApiError as e:
        check(e.code == "turn_in_progress", f"the refusal names why: {e.code}")
    await agent.cancel(sid)

    listed = await agent.list_sessions(limit=100)
    check(sid in [s["id"] for s in listed["data"]], "the session is listed")
    try:
        await agent.answer_questions(sid, {"answers": {}})
        check(False, "question answers are refused")
    except ApiError as e:
        check(e.code == "not_supported", f"refused as not supported: {e.code}")
    await agent.close()
    print("everruns: ok")


asyncio.run(main())
