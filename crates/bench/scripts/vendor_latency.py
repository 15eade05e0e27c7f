"""`sandwarden-bench vendors`' client: the time from posting a message to its first streamed event,
through the native API (plain HTTP), the Anthropic SDK (`/anthropic`) and the OpenAI SDK
(`/openai/v1`), each on an echo session of its own with its event stream open the whole run; turns
interleaved one by one, rotating which route goes first. Prints one JSON object: the microseconds of
each route's turns after the warm-up."""

import json
import os
import time
from contextlib import ExitStack

import anthropic
import httpx
import openai

URL = os.environ["SANDWARDEN_URL"].rstrip("/")
KEY = os.environ["SANDWARDEN_KEY"]
TURNS = int(os.environ.get("SANDWARDEN_TURNS", "300"))
WARM_UP = 20
META = {"sandwarden.harness": "echo"}


def micros(t0):
    return int((time.perf_counter() - t0) * 1e6)


with ExitStack() as stack:
    http = stack.enter_context(
        httpx.Client(base_url=URL, headers={"Authorization": f"Bearer {KEY}"}, timeout=60))
    native = http.post("/v1/sessions", json={"harness": "echo"}).json()["id"]
    http.get(f"/v1/sessions/{native}?wait=true&timeout=30")
    sse = stack.enter_context(http.stream(
        "GET", f"/v1/sessions/{native}/events", headers={"Accept": "text/event-stream"}))
    lines = sse.iter_lines()

    def native_turn(i):
        t0 = time.perf_counter()
        turn = http.post(f"/v1/sessions/{native}/messages",
                         json={"text": f"native {i}", "async": True}).json()["turn_id"]
        first = None
        for line in lines:
            if not line.startswith("data:"):
                continue
            event = json.loads(line[5:])
            if event.get("turn_id") != turn:
                continue
            if first is None:
                first = micros(t0)
            if event["type"] in ("done", "error"):
                return first

    ant = anthropic.Anthropic(base_url=f"{URL}/anthropic", api_key=KEY, max_retries=0)
    env = ant.beta.environments.create(name="bench")
    agent = ant.beta.agents.create(name="bench", model="echo-small", metadata=META)
    asid = ant.beta.sessions.create(agent=agent.id, environment_id=env.id).id
    a_sdk = asid
    a_stream = iter(stack.enter_context(ant.beta.sessions.events.stream(a_sdk)))

    def anthropic_turn(i):
        t0 = time.perf_counter()
        ant.beta.sessions.events.send(a_sdk, events=[
            {"type": "user.message", "content": [{"type": "text", "text": f"anthropic {i}"}]}])
        first = None
        for event in a_stream:
            if first is None:
                first = micros(t0)
            if event.type == "session.status_idle":
                return first

    oai = openai.OpenAI(base_url=f"{URL}/openai/v1", api_key=KEY, max_retries=0)
    osid = oai.beta.agents.sessions.create(environment={"type": "openai_hosted"},
                                           agent={"model": "echo-small"}, metadata=META).id
    o_sdk = osid
    o_stream = iter(stack.enter_context(oai.beta.agents.sessions.events.stream(o_sdk)))

    def openai_turn(i):
        t0 = time.perf_counter()
        oai.beta.agents.sessions.events.create(o_sdk, events=[{
            "type": "agent.session.input.message",
            "input": [{"role": "user", "content": [{"type": "input_text", "text": f"openai {i}"}]}]}])
        first, ended = None, False
        for event in o_stream:
            if first is None:
                first = micros(t0)
            if event.type == "agent.session.turn.completed":
                ended = True
            if event.type == "agent.session.idle" and ended:
                return first

    # The vendor routes with plain HTTP too, as the native route is timed: what the server's
    # translation adds, without the SDKs' own work. Each on a session of its own (a stream sees
    # every turn of its session).
    asid = ant.beta.sessions.create(agent=agent.id, environment_id=env.id).id
    osid = oai.beta.agents.sessions.create(environment={"type": "openai_hosted"},
                                           agent={"model": "echo-small"}, metadata=META).id
    a_sse = stack.enter_context(http.stream(
        "GET", f"/anthropic/v1/sessions/{asid}/events/stream",
        headers={"Accept": "text/event-stream"}))
    a_lines = a_sse.iter_lines()

    def raw_turn(lines, post, done):
        t0 = time.perf_counter()
        post()
        first = None
        for line in lines:
            if not line.startswith("data:"):
                continue
            if first is None:
                first = micros(t0)
            if done(json.loads(line[5:])):
                return first

    def anthropic_http(i):
        return raw_turn(
            a_lines,
            lambda: http.post(f"/anthropic/v1/sessions/{asid}/events", json={"events": [
                {"type": "user.message", "content": [{"type": "text", "text": f"a-http {i}"}]}]}),
            lambda e: e["type"] == "session.status_idle")

    o_sse = stack.enter_context(http.stream(
        "GET", f"/openai/v1/agents/sessions/{osid}/events",
        headers={"Accept": "text/event-stream"}))
    o_lines = o_sse.iter_lines()
    o_ended = []

    def openai_done(e):
        if e["type"] == "agent.session.turn.completed":
            o_ended.append(True)
        if e["type"] == "agent.session.idle" and o_ended:
            o_ended.clear()
            return True
        return False

    def openai_http(i):
        return raw_turn(
            o_lines,
            lambda: http.post(f"/openai/v1/agents/sessions/{osid}/events", json={"events": [{
                "type": "agent.session.input.message",
                "input": [{"role": "user", "content": [
                    {"type": "input_text", "text": f"o-http {i}"}]}]}]}),
            openai_done)

    routes = [("native", native_turn), ("anthropic", anthropic_turn), ("openai", openai_turn),
              ("anthropic_http", anthropic_http), ("openai_http", openai_http)]
    samples = {name: [] for name, _ in routes}
    for i in range(WARM_UP + TURNS):
        for k in range(len(routes)):
            name, turn = routes[(i + k) % len(routes)]
            us = turn(i)
            if i >= WARM_UP:
                samples[name].append(us)
    print(json.dumps(samples))
