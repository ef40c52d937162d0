"""HuggingFace transformers as a performance peer for gptj, on the same machine and model shape.

Two modes (run through scripts/hf-peer.sh, which uses the pinned CPU venv):

  decode  single-stream and static-batch generation with `model.generate`: for each batch
          size, the time to generate exactly --output-tokens new tokens (min = max, greedy)
          after a --prompt-tokens prompt, as output tokens/s, plus the decode time per step
          (generate(L) - generate(1)) / (L - 1), which leaves the prefill out.

  serve   a KServe V1 predict server around `generate` (`POST /v1/models/{name}:predict`,
          `GET /v1/models/{name}`, `GET /v2/health/ready`), so `gptj load --protocol v1` can
          drive it with the same load as gptj. --max-batch 1 is the seed's sequential server
          (one instance at a time); --max-batch B > 1 is request-level (static) batching: the
          worker takes up to B waiting instances, left-pads them and runs them to the end of
          the longest before taking more.

The model is GPT-J's `small` shape (12 layers, n_embd 768, 12 heads, rotary_dim 64, vocab
50400) with random weights (seeded), the shape of gptj's builtin:small, or --model DIR for a
checkpoint in HuggingFace layout. The tokenizer is GPT-J's (assets/tokenizer/tokenizer.json).
"""

import argparse
import json
import os
import queue
import statistics
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch
import transformers
from transformers import GPTJConfig, GPTJForCausalLM, PreTrainedTokenizerFast

HERE = os.path.dirname(os.path.abspath(__file__))
TOKENIZER = os.path.join(HERE, "..", "assets", "tokenizer", "tokenizer.json")
EOS = 50256

SHAPES = {
    "tiny": dict(n_embd=128, n_layer=2, n_head=4, rotary_dim=16),
    "small": dict(n_embd=768, n_layer=12, n_head=12, rotary_dim=64),
}


def load_model(args):
    if args.model in SHAPES:
        torch.manual_seed(0)
        config = GPTJConfig(
            vocab_size=50400, n_positions=2048, bos_token_id=EOS, eos_token_id=EOS,
            **SHAPES[args.model],
        )
        model = GPTJForCausalLM(config)
    else:
        model = GPTJForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32)
    model.eval()
    model.generation_config.pad_token_id = EOS
    return model


def load_tokenizer():
    tok = PreTrainedTokenizerFast(tokenizer_file=TOKENIZER)
    tok.pad_token_id = EOS
    tok.eos_token_id = EOS
    tok.padding_side = "left"
    return tok


@torch.inference_mode()
def generate(model, input_ids, attention_mask, new_tokens, min_new_tokens=None, do_sample=False):
    return model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens if min_new_tokens is None else min_new_tokens,
        do_sample=do_sample,
        use_cache=True,
        pad_token_id=EOS,
    )


def cmd_decode(args):
    model = load_model(args)
    g = torch.Generator().manual_seed(1)
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        ids = torch.randint(1000, 40000, (batch, args.prompt_tokens), generator=g)
        mask = torch.ones_like(ids)
        generate(model, ids, mask, 4)  # warm-up
        full, one = [], []
        for _ in range(args.repeats):
            t = time.perf_counter()
            out = generate(model, ids, mask, args.output_tokens)
            full.append(time.perf_counter() - t)
            assert out.shape[1] == args.prompt_tokens + args.output_tokens
            t = time.perf_counter()
            generate(model, ids, mask, 1)
            one.append(time.perf_counter() - t)
        secs, prefill = statistics.median(full), statistics.median(one)
        step_ms = (secs - prefill) / (args.output_tokens - 1) * 1e3
        row = dict(batch=batch, seconds=secs, output_tokens_per_s=batch * args.output_tokens / secs,
                   decode_ms_per_step=step_ms, decode_tokens_per_s=batch * 1e3 / step_ms,
                   prefill_s=prefill, runs_s=full)
        rows.append(row)
        print(f"batch {batch}: {secs:.2f} s, {row['output_tokens_per_s']:.1f} tok/s, "
              f"decode {step_ms:.1f} ms/step", file=sys.stderr, flush=True)
    print(f"\nHF transformers {transformers.__version__}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, model {args.model} f32, prompt {args.prompt_tokens}, "
          f"output {args.output_tokens}, median of {args.repeats}\n")
    print("| batch | seconds | output tok/s | decode ms/step | decode tok/s |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['batch']} | {r['seconds']:.2f} | {r['output_tokens_per_s']:.1f} | "
              f"{r['decode_ms_per_step']:.1f} | {r['decode_tokens_per_s']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(transformers=transformers.__version__, torch=torch.__version__,
                           threads=torch.get_num_threads(), model=args.model,
                           prompt_tokens=args.prompt_tokens, output_tokens=args.output_tokens,
                           rows=rows), f, indent=2)


class Work:
    """One instance waiting for the worker."""

    def __init__(self, prompt, max_new, min_new, do_sample):
        self.prompt, self.max_new, self.min_new, self.do_sample = prompt, max_new, min_new, do_sample
        self.text = None
        self.error = None
        self.done = threading.Event()


def worker(model, tok, jobs, max_batch, context):
    while True:
        batch = [jobs.get()]
        while len(batch) < max_batch:
            try:
                batch.append(jobs.get_nowait())
            except queue.Empty:
                break
        try:
            enc = tok([w.prompt for w in batch], return_tensors="pt", padding=True)
            prompt_len = enc["input_ids"].shape[1]
            max_new = max(w.max_new for w in batch)
            max_new = min(max_new, context - prompt_len)
            min_new = min(min(w.min_new for w in batch), max_new)
            out = generate(model, enc["input_ids"], enc["attention_mask"], max_new, min_new,
                           any(w.do_sample for w in batch))
            for i, w in enumerate(batch):
                ids = out[i, prompt_len:prompt_len + w.max_new].tolist()
                if EOS in ids:
                    ids = ids[: ids.index(EOS)]
                w.text = w.prompt + tok.decode(ids)
        except Exception as e:  # noqa: BLE001 - reported to the client as a 500
            for w in batch:
                w.error = str(e)
        for w in batch:
            w.done.set()


def make_handler(name, tok, jobs, context):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def reply(self, status, body):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path in (f"/v1/models/{name}", "/v2/health/ready", "/v2/health/live"):
                self.reply(200, {"name": name, "ready": True})
            else:
                self.reply(404, {"error": f"no route {self.path}"})

        def do_POST(self):
            length = int(self.headers.get("content-length", 0))
            raw = self.rfile.read(length)
            if self.path != f"/v1/models/{name}:predict":
                return self.reply(404, {"error": f"model or route not found: {self.path}"})
            try:
                body = json.loads(raw)
                instances = body["instances"]
                p = body.get("parameters", {})
                work = []
                for prompt in instances:
                    n_prompt = len(tok(prompt)["input_ids"])
                    max_new = p.get("max_new_tokens") or max(1, p.get("max_length", n_prompt + 50) - n_prompt)
                    min_new = p.get("min_new_tokens") or max(0, p.get("min_length", 0) - n_prompt)
                    if n_prompt + max_new > context:
                        return self.reply(400, {"error": f"prompt {n_prompt} + {max_new} new tokens > {context}"})
                    work.append(Work(prompt, max_new, min_new, bool(p.get("do_sample", False))))
            except (ValueError, KeyError, TypeError) as e:
                return self.reply(400, {"error": f"bad request: {e}"})
            for w in work:
                jobs.put(w)
            for w in work:
                w.done.wait()
            if any(w.error for w in work):
                return self.reply(500, {"error": next(w.error for w in work if w.error)})
            preds = [{"generated_text": w.text} for w in work]
            self.reply(200, {"predictions": preds[0] if len(preds) == 1 else [[x] for x in preds]})

    return Handler


def cmd_serve(args):
    model = load_model(args)
    tok = load_tokenizer()
    jobs = queue.Queue()
    generate(model, tok(["warm up"], return_tensors="pt")["input_ids"], None, 2)
    threading.Thread(target=worker, args=(model, tok, jobs, args.max_batch, 2048), daemon=True).start()
    # socketserver's default listen backlog is 5: 64 clients connecting at once overflow it and
    # some connections fail. Take them all, as the gptj server does.
    ThreadingHTTPServer.request_queue_size = 1024
    server = ThreadingHTTPServer((args.host, args.port), make_handler(args.model_name, tok, jobs, 2048))
    server.daemon_threads = True
    print(f"hf_peer: serving {args.model} on http://{args.host}:{args.port} "
          f"(max batch {args.max_batch}, {torch.get_num_threads()} threads)", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small", help="tiny, small (random weights) or a checkpoint directory")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    sub = ap.add_subparsers(dest="mode", required=True)
    d = sub.add_parser("decode", help="single-stream and static-batch generate() throughput")
    d.add_argument("--batches", default="1,2,4,8,16")
    d.add_argument("--prompt-tokens", type=int, default=128)
    d.add_argument("--output-tokens", type=int, default=128)
    d.add_argument("--repeats", type=int, default=3)
    d.add_argument("--json")
    s = sub.add_parser("serve", help="a KServe V1 predict server around generate()")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8081)
    s.add_argument("--max-batch", type=int, default=1, help="1 = sequential (the seed's server)")
    s.add_argument("--model-name", default="eleutherai-gpt-j-6b")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    {"decode": cmd_decode, "serve": cmd_serve}[args.mode](args)


if __name__ == "__main__":
    main()
