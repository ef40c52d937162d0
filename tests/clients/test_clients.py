"""Client compatibility: the clients and harnesses users already run, unchanged, against the
real `gptj serve --model builtin:tiny` binary on 127.0.0.1.

    tests/clients/run.sh [PATH_TO_GPTJ]

Starts the server (with an API key and the example chat template), runs every check, prints
one line per check, stops the server, and exits non-zero if any check failed. The whole run
is bounded (DEADLINE seconds); the server is killed on the way out whatever happens.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.error
import urllib.request

import numpy as np
import openai
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

MODEL = "eleutherai-gpt-j-6b"
KEY = "client-suite-key"
DEADLINE = 150
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEMPLATE = os.path.join(ROOT, "assets", "chat-template.jinja")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, binary, extra=()):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="gptj-clients-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(
            [binary, "serve", "--model", "builtin:tiny", "--host", "127.0.0.1",
             "--port", str(self.port), "--api-key", KEY, "--chat-template", TEMPLATE, *extra],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )

    def wait_ready(self, timeout=60):
        end = time.time() + timeout
        while time.time() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gptj serve exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                with urllib.request.urlopen(f"{self.base}/v2/health/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"not ready after {timeout}s:\n{self.logs()}")

    def logs(self):
        with open(self.log.name, errors="replace") as f:
            return f.read()[-4000:]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def post(server, path, body, key=KEY):
    """A plain HTTP POST, as harnesses send: (status, headers, parsed JSON or raw text)."""
    req = urllib.request.Request(
        server.base + path, data=json.dumps(body).encode(), method="POST",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            status, headers, raw = r.status, r.headers, r.read().decode()
    except urllib.error.HTTPError as e:
        status, headers, raw = e.code, e.headers, e.read().decode()
    try:
        return status, headers, json.loads(raw)
    except json.JSONDecodeError:
        return status, headers, raw


def sse_data(raw):
    """The `data:` payloads of an SSE body, as vLLM's benchmark client reads them."""
    out = []
    for line in raw.splitlines():
        line = line.strip()
        if line.startswith("data:"):
            out.append(line[len("data:"):].strip())
    return out


CHECKS = []


def check(f):
    CHECKS.append(f)
    return f


@check
def completions_plain_on_both_bases(s, c, c_openai):
    a = c.completions.create(model=MODEL, prompt="Hello, my name is", max_tokens=6, temperature=0)
    assert a.object == "text_completion" and len(a.choices) == 1, a
    assert a.choices[0].finish_reason in ("length", "stop"), a
    assert 1 <= a.usage.completion_tokens <= 6, a.usage
    b = c_openai.completions.create(model=MODEL, prompt="Hello, my name is", max_tokens=6, temperature=0)
    assert a.choices[0].text == b.choices[0].text, (a, b)


@check
def completions_stream_matches_plain(s, c, _):
    plain = c.completions.create(model=MODEL, prompt="The sky is", max_tokens=8, temperature=0)
    chunks = list(c.completions.create(model=MODEL, prompt="The sky is", max_tokens=8,
                                       temperature=0, stream=True,
                                       stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == plain.choices[0].text, (text, plain)
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens, chunks[-1]
    reasons = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert reasons == [plain.choices[0].finish_reason], reasons


@check
def completions_n_and_seed(s, c, _):
    ask = dict(model=MODEL, prompt="Once upon a time", max_tokens=5, temperature=1.0, n=3, seed=11)
    a, b = c.completions.create(**ask), c.completions.create(**ask)
    assert sorted(ch.index for ch in a.choices) == [0, 1, 2], a
    assert [ch.text for ch in a.choices] == [ch.text for ch in b.choices], (a, b)


@check
def completions_stop_and_echo(s, c, _):
    base = c.completions.create(model=MODEL, prompt="A B C", max_tokens=10, temperature=0)
    text = base.choices[0].text
    stop = next((ch for ch in text[1:] if not ch.isspace()), None)
    assert stop, f"no stop candidate in {text!r}"
    cut = c.completions.create(model=MODEL, prompt="A B C", max_tokens=10, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[: text.index(stop)], (text, stop, cut)
    assert cut.choices[0].finish_reason == "stop", cut
    echo = c.completions.create(model=MODEL, prompt="A B C", max_tokens=3, temperature=0, echo=True)
    assert echo.choices[0].text.startswith("A B C"), echo


@check
def chat_plain_and_stream(s, c, _):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    a = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6, temperature=0)
    assert a.object == "chat.completion", a
    assert a.choices[0].message.role == "assistant", a
    assert isinstance(a.choices[0].message.content, str), a
    chunks = list(c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant", chunks[0]
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == a.choices[0].message.content, (text, a)
    assert chunks[-1].usage.prompt_tokens == a.usage.prompt_tokens, chunks[-1]


@check
def logprobs_through_the_sdk(s, c, _):
    # Completions: the legacy listing, as the SDK types it.
    a = c.completions.create(model=MODEL, prompt="The sky is", max_tokens=4, temperature=0, logprobs=2)
    lp = a.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset), lp
    assert len(lp.tokens) == a.usage.completion_tokens, (lp, a.usage)
    assert all(x <= 0 for x in lp.token_logprobs), lp
    # Chat: logprobs.content entries with token, logprob, bytes and top_logprobs.
    msgs = [{"role": "user", "content": "Hi"}]
    b = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4, temperature=0,
                                  logprobs=True, top_logprobs=2)
    content = b.choices[0].logprobs.content
    assert len(content) == b.usage.completion_tokens, b
    for e in content:
        assert bytes(e.bytes).decode("utf-8", "replace") == e.token, e
        assert len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob == e.logprob, e


@check
def models_list_and_retrieve(s, c, c_openai):
    for client in (c, c_openai):
        ids = [m.id for m in client.models.list()]
        assert ids == [MODEL], ids
        assert client.models.retrieve(MODEL).id == MODEL
    try:
        c_openai.models.retrieve("gpt-4")
        raise AssertionError("retrieving an unknown model succeeded")
    except openai.NotFoundError as e:
        assert e.status_code == 404, e


@check
def errors_have_openai_types(s, c, _):
    try:
        c.completions.create(model=MODEL, prompt="x", max_tokens=2, top_p=2)
        raise AssertionError("top_p=2 was accepted")
    except openai.BadRequestError as e:
        assert e.type == "invalid_request_error", e.body
        assert e.code == "validation" and e.param == "top_p", e.body
        assert e.response.headers["x-should-retry"] == "false", e.response.headers
    bad_key = openai.OpenAI(base_url=s.base + "/v1", api_key="wrong", max_retries=0)
    try:
        bad_key.completions.create(model=MODEL, prompt="x", max_tokens=2)
        raise AssertionError("a wrong key was accepted")
    except openai.AuthenticationError as e:
        assert e.type == "authentication_error", e.body


@check
def tokenize_detokenize_vllm_shape(s, c, _):
    for prefix in ("", "/openai"):
        st, _, v = post(s, prefix + "/tokenize",
                        {"model": MODEL, "prompt": "Hello world", "add_special_tokens": True})
        assert st == 200, v
        assert v["count"] == len(v["tokens"]) > 0 and v["max_model_len"] > 0, v
        st, _, d = post(s, prefix + "/detokenize", {"model": MODEL, "tokens": v["tokens"]})
        assert (st, d) == (200, {"prompt": "Hello world"}), d
    st, _, v = post(s, "/tokenize", {"prompt": "x"}, key="wrong")
    assert st == 401, v


@check
def vllm_benchmark_request_shapes(s, c, _):
    # vLLM's benchmarks/backend_request_func.py, openai-completions backend.
    body = {"model": MODEL, "prompt": "Benchmark prompt", "temperature": 0.0,
            "repetition_penalty": 1.0, "max_tokens": 12, "logprobs": None, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}
    st, _, raw = post(s, "/v1/completions", body)
    assert st == 200, raw
    data = sse_data(raw)
    assert data[-1] == "[DONE]", data
    events = [json.loads(d) for d in data[:-1]]
    text = "".join(e["choices"][0]["text"] for e in events if e["choices"])
    usage = events[-1]["usage"]
    assert usage["completion_tokens"] == 12, usage
    assert isinstance(text, str)
    # openai-chat backend.
    body = {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
            "temperature": 0.0, "max_completion_tokens": 9, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}
    st, _, raw = post(s, "/v1/chat/completions", body)
    assert st == 200, raw
    data = sse_data(raw)
    assert data[-1] == "[DONE]", data
    assert json.loads(data[-2])["usage"]["completion_tokens"] == 9, data[-2]


def lm_eval_parse_logprobs(out, ctxlens):
    """lm-evaluation-harness's LocalCompletionsAPI.parse_logprobs, restated: per choice, the
    summed log-probability of the tokens after the context and whether each was the most likely."""
    res = []
    for choice, ctxlen in zip(sorted(out["choices"], key=lambda ch: ch["index"]), ctxlens):
        assert ctxlen > 0
        lps = choice["logprobs"]["token_logprobs"][ctxlen:-1]
        tops = choice["logprobs"]["top_logprobs"][ctxlen:-1]
        res.append((sum(lps), all(tok == max(top.values()) for tok, top in zip(lps, tops))))
    return res


@check
def lm_eval_loglikelihood_request_shape(s, c, _):
    # lm-eval's local-completions loglikelihood payload: token-id prompts, batched, echoed.
    st, _, v = post(s, "/tokenize", {"model": MODEL, "prompt": "The capital of France is Paris"})
    assert st == 200, v
    ids = v["tokens"]
    ctxlen = 5
    other = ids[:ctxlen] + [ids[-1], ids[1]]
    payload = {"model": MODEL, "prompt": [ids, other], "temperature": 0, "max_tokens": 1,
               "logprobs": 1, "seed": 1234, "echo": True}
    st, _, out = post(s, "/v1/completions", payload)
    assert st == 200, out
    for choice, prompt in zip(out["choices"], [ids, other]):
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(prompt) + 1, lp
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None, lp
        assert all(x <= 0 for x in lp["token_logprobs"][1:]), lp
        assert all(1 <= len(t) <= 2 for t in lp["top_logprobs"][1:]), lp
        # The generated (greedy) token is its position's most likely.
        assert lp["token_logprobs"][-1] == max(lp["top_logprobs"][-1].values()), lp
    res = lm_eval_parse_logprobs(out, [ctxlen, ctxlen])
    assert all(isinstance(g, bool) and ll < 0 for ll, g in res), res
    # Each prompt alone, through the openai SDK: the same numbers as in the batch.
    for prompt, (ll, greedy) in zip([ids, other], res):
        one = c.completions.create(model=MODEL, prompt=[prompt], temperature=0, max_tokens=1,
                                   logprobs=1, seed=1234, echo=True)
        alone = lm_eval_parse_logprobs(one.model_dump(), [ctxlen])
        assert alone == [(ll, greedy)], (alone, ll, greedy)
        assert one.choices[0].logprobs.text_offset[0] == 0, one


@check
def tritonclient_http(s, c, _):
    t = triton.InferenceServerClient(url=f"127.0.0.1:{s.port}")
    assert t.is_server_live() and t.is_server_ready()
    assert t.is_model_ready(MODEL)
    meta = t.get_model_metadata(MODEL)
    assert meta["inputs"][0]["name"] == "text_input", meta
    # A fresh dict per call: tritonclient adds its binary-extension header to the one passed.
    auth = {"Authorization": f"Bearer {KEY}"}
    inp = triton.InferInput("text_input", [2], "BYTES")
    inp.set_data_from_numpy(np.array(["Hello", "Goodbye"], dtype=object), binary_data=False)
    params = {"max_tokens": 4, "temperature": 0}
    out = [triton.InferRequestedOutput("text_output", binary_data=False)]
    r = t.infer(MODEL, [inp], outputs=out, parameters=params, headers=dict(auth), request_id="r1")
    texts = r.as_numpy("text_output")
    assert texts.shape == (2,), texts
    assert r.get_response()["id"] == "r1", r.get_response()
    for prompt, text in zip(["Hello", "Goodbye"], texts):
        text = text.decode() if isinstance(text, bytes) else text
        st, _, g = post(s, f"/v2/models/{MODEL}/generate",
                        {"text_input": prompt, "parameters": params})
        assert st == 200 and g["text_output"] == text, (g, text)
    # tritonclient's defaults: the input in binary form, binary output asked for (the JSON
    # answer still reads).
    binp = triton.InferInput("text_input", [2], "BYTES")
    binp.set_data_from_numpy(np.array(["Hello", "Goodbye"], dtype=object))
    r = t.infer(MODEL, [binp], parameters=params, headers=dict(auth))
    assert list(r.as_numpy("text_output")) == list(texts), (r.as_numpy("text_output"), texts)
    bad = triton.InferInput("prompt", [1], "BYTES")
    bad.set_data_from_numpy(np.array(["x"], dtype=object), binary_data=False)
    try:
        t.infer(MODEL, [bad], headers=dict(auth))
        raise AssertionError("a wrong input name was accepted")
    except InferenceServerException as e:
        assert "text_input" in str(e), e


def timeouts_are_not_retried(binary):
    """The openai SDK retries 5xx twice by default; a 504 carries `x-should-retry: false`, so
    the request that timed out runs once."""
    s = Server(binary, ["--request-timeout", "1s"])
    try:
        s.wait_ready()
        c = openai.OpenAI(base_url=s.base + "/v1", api_key=KEY)  # default retries
        try:
            c.completions.create(model=MODEL, prompt="a", max_tokens=2000, extra_body={"ignore_eos": True})
            raise AssertionError("a 2000-token request finished within 1s")
        except openai.InternalServerError as e:
            assert e.status_code == 504 and e.code == "timeout", e.body
        with urllib.request.urlopen(s.base + "/metrics", timeout=10) as r:
            metrics = r.read().decode()
        timeouts = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                       if line.startswith("gptj_request_failed_total{") and 'reason="timeout"' in line)
        assert timeouts == 1, f"{timeouts} timed-out requests: the SDK retried"
    finally:
        s.stop()
        os.unlink(s.log.name)


def main():
    binary = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "target", "debug", "gptj")
    started = time.time()
    signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(TimeoutError(f"over {DEADLINE}s")))
    signal.alarm(DEADLINE)
    server = Server(binary)
    failed = []
    try:
        server.wait_ready()
        c = openai.OpenAI(base_url=server.base + "/v1", api_key=KEY, max_retries=0)
        c_openai = openai.OpenAI(base_url=server.base + "/openai/v1", api_key=KEY, max_retries=0)
        for f in CHECKS:
            t0 = time.time()
            try:
                f(server, c, c_openai)
                print(f"ok    {f.__name__} ({time.time() - t0:.1f}s)")
            except Exception:  # noqa: BLE001 - every failure is reported, then the next runs
                failed.append(f.__name__)
                print(f"FAIL  {f.__name__}\n{traceback.format_exc()}")
    except Exception:  # noqa: BLE001
        failed.append("setup")
        print(f"FAIL  setup\n{traceback.format_exc()}")
    finally:
        server.stop()
    t0 = time.time()
    try:
        timeouts_are_not_retried(binary)
        print(f"ok    timeouts_are_not_retried ({time.time() - t0:.1f}s)")
    except Exception:  # noqa: BLE001
        failed.append("timeouts_are_not_retried")
        print(f"FAIL  timeouts_are_not_retried\n{traceback.format_exc()}")
    signal.alarm(0)
    if failed:
        print(f"server log (tail):\n{server.logs()}")
    os.unlink(server.log.name)
    total = len(CHECKS) + 1
    print(f"{total - len([f for f in failed if f != 'setup'])}/{total} client checks passed "
          f"in {time.time() - started:.1f}s")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
