"""The official openai and anthropic SDKs' chat APIs (Chat Completions, Responses, Messages)
against sandwarden's chat adapters, as any chat client would use them: only the base URL and the
key are sandwarden's, `model` names the template. Run by tests/light/vendor_sdks.rs; exits
non-zero on the first expectation that does not hold."""

import os

import json
import urllib.request

import anthropic
import openai

from common import check, nonce

BASE = os.environ["SANDWARDEN_URL"].rstrip("/")
KEY = os.environ["SANDWARDEN_KEY"]
oa = openai.OpenAI(base_url=BASE + "/v1", api_key=KEY, max_retries=0, timeout=60)
an = anthropic.Anthropic(base_url=BASE, api_key=KEY, max_retries=0, timeout=60)


def chat(messages, **kw):
    return oa.chat.completions.create(model="echo", messages=messages, **kw)


# Chat Completions: a turn, the system message as the agent's system prompt, streamed with usage.
said = "hello " + nonce()
r = chat([{"role": "user", "content": said}])
check(r.choices[0].message.content == said and r.choices[0].finish_reason == "stop", f"{r}")
check(r.usage.total_tokens > 0, f"usage: {r.usage}")
marker = "SYSTEM-" + nonce()
r = chat([{"role": "system", "content": marker}, {"role": "user", "content": "/system"}])
check(marker in r.choices[0].message.content, f"the system message reached the agent: {r}")
streamed = "streamed " + nonce()
chunks = list(chat([{"role": "user", "content": streamed}], stream=True,
                   stream_options={"include_usage": True}))
text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
check(text == streamed, f"the chunks make the answer: {text!r}")
check(chunks[-1].usage and chunks[-1].usage.total_tokens > 0, "a last chunk with usage")

# A conversation sent whole to a new session: the earlier turns come as context.
earlier = "earlier " + nonce()
r = chat([{"role": "user", "content": earlier}, {"role": "assistant", "content": earlier},
          {"role": "user", "content": "now " + nonce()}])
check(earlier in r.choices[0].message.content, f"the earlier turns were sent: {r}")

# Without a session each request has a sandbox of its own; `X-Sandwarden-Session: new` keeps one,
# which later requests continue by its id (only their newest message is sent).
body = "kept " + nonce()
raw = oa.chat.completions.with_raw_response.create(
    model="echo", messages=[{"role": "user", "content": "/write note.txt " + body}],
    extra_headers={"X-Sandwarden-Session": "new"})
session = raw.headers["x-sandwarden-session"]
print(f"session {session}")
r = chat([{"role": "user", "content": "/write note.txt x"}, {"role": "assistant", "content": "ok"},
          {"role": "user", "content": "/cat note.txt"}],
         extra_headers={"X-Sandwarden-Session": session})
check(r.choices[0].message.content == body, f"the kept session's sandbox: {r}")
try:
    chat([{"role": "user", "content": "/cat note.txt"}])
    check(False, "a one-shot request saw another's file")
except openai.InternalServerError as e:
    check("cannot read" in str(e), f"a new sandbox: {e}")

# What has no counterpart is refused in OpenAI's shape.
for kw in ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, {"n": 2}):
    try:
        chat([{"role": "user", "content": "x"}], **kw)
        check(False, f"refused: {kw}")
    except openai.BadRequestError as e:
        check(e.status_code == 400, f"{e}")
try:
    oa.chat.completions.create(model="no-such-template", messages=[{"role": "user", "content": "x"}])
    check(False, "an unknown model")
except openai.NotFoundError as e:
    check("echo" in e.message, f"the error lists the templates: {e.message}")

# Responses: a turn, continued by previous_response_id in the same sandbox, retrieved, streamed.
body = "resp " + nonce()
first = oa.responses.create(model="echo", input="/write r.txt " + body, instructions="be brief")
check(first.output_text == "wrote r.txt" and first.status == "completed", f"{first}")
second = oa.responses.create(model="echo", input="/cat r.txt", previous_response_id=first.id)
check(second.output_text == body, f"previous_response_id continues the session: {second.output_text}")
check(oa.responses.retrieve(second.id).output_text == body, "a response is retrieved")
streamed = "rstream " + nonce()
events = list(oa.responses.create(model="echo", input=streamed, stream=True))
kinds = [e.type for e in events]
check(kinds[0] == "response.created" and kinds[-1] == "response.completed", f"{kinds}")
check([e.sequence_number for e in events] == list(range(len(events))), "sequence numbers")
check(events[-1].response.output_text == streamed, "the completed response holds the text")
with oa.responses.stream(model="echo", input="helper " + streamed) as s:
    for _ in s:
        pass
    check(s.get_final_response().output_text == "helper " + streamed, "the SDK's stream helper")
gone = oa.responses.create(model="echo", input="/write g.txt gone", store=False)
try:
    oa.responses.create(model="echo", input="/cat g.txt", previous_response_id=gone.id)
    check(False, "a response not stored is not continued")
except openai.NotFoundError:
    pass
try:
    oa.responses.create(model="echo", input="x", previous_response_id="resp_bogus")
    check(False, "a made-up previous_response_id")
except openai.NotFoundError:
    pass

# Anthropic Messages: a turn with a system prompt, the SDK's stream helper, x-api-key auth.
marker = "ANTH-" + nonce()
m = an.messages.create(model="echo", max_tokens=256, system=marker,
                       messages=[{"role": "user", "content": "/system"}])
check(marker in m.content[0].text and m.stop_reason == "end_turn", f"{m}")
said = "astream " + nonce()
with an.messages.stream(model="echo", max_tokens=256, messages=[{"role": "user", "content": said}]) as s:
    check("".join(s.text_stream) == said, "the text stream")
    check(s.get_final_message().content[0].text == said, "the final message")
said = "xkey " + nonce()
request = urllib.request.Request(
    BASE + "/v1/messages", method="POST",
    headers={"x-api-key": KEY, "anthropic-version": "2023-06-01", "content-type": "application/json"},
    data=json.dumps({"model": "echo", "max_tokens": 64,
                     "messages": [{"role": "user", "content": said}]}).encode())
with urllib.request.urlopen(request, timeout=60) as r:
    check(json.load(r)["content"][0]["text"] == said, "x-api-key authenticates")
try:
    an.messages.create(model="echo", max_tokens=64, messages=[{"role": "assistant", "content": "x"}])
    check(False, "a conversation ending with the assistant")
except anthropic.BadRequestError as e:
    check("user" in e.message, f"{e.message}")
# A chat client cannot answer the agent's questions: each is refused and the turn goes on.
r = chat([{"role": "user", "content": "/ask may I " + nonce()}])
check("permission denied" in r.choices[0].message.content, f"refused: {r}")
with an.messages.stream(model="echo", max_tokens=64,
                        messages=[{"role": "user", "content": "/ask " + nonce()}]) as s:
    check("permission denied" in "".join(s.text_stream), "refused in a stream")
print("chat: ok")
