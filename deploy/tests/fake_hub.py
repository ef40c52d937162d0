#!/usr/bin/env python3
"""A stand-in for the HuggingFace hub, for deploy/image-test.sh (Python's standard library only).

    fake_hub.py --make DIR                 # write a tiny random-weight GPT-J checkpoint into DIR
    fake_hub.py --serve DIR --port 18090 --repo gptj-test/tiny-random --rate 8000000

It serves DIR's files the way gptj's downloader asks for them
(`/api/models/<repo>/revision/<rev>` for the file list, `/<repo>/resolve/<rev>/<file>` for a file),
at most --rate bytes per second, so that the server's model download (and its readiness 503)
lasts a few seconds. The checkpoint has GPT-J's architecture and tokenizer with small
dimensions: its text is noise, but every request runs through the real loader, cache and engine.
"""

from __future__ import annotations

import argparse
import array
import json
import random
import shutil
import struct
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

TOKENIZER = Path(__file__).resolve().parents[2] / "assets" / "tokenizer" / "tokenizer.json"
CONFIG = {
    "architectures": ["GPTJForCausalLM"], "model_type": "gptj", "activation_function": "gelu_new",
    "vocab_size": 50400, "n_positions": 2048, "n_embd": 64, "n_layer": 2, "n_head": 4, "rotary_dim": 16,
    "n_inner": None, "layer_norm_epsilon": 1e-5, "bos_token_id": 50256, "eos_token_id": 50256,
    "tie_word_embeddings": False, "torch_dtype": "float32",
}


def make(out: Path) -> None:
    c = CONFIG
    n, v, inner = c["n_embd"], c["vocab_size"], 4 * c["n_embd"]
    shapes: dict[str, list[int]] = {"transformer.wte.weight": [v, n]}
    for i in range(c["n_layer"]):
        h = f"transformer.h.{i}."
        shapes |= {h + "ln_1.weight": [n], h + "ln_1.bias": [n]}
        for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[h + f"attn.{p}.weight"] = [n, n]
        shapes |= {h + "mlp.fc_in.weight": [inner, n], h + "mlp.fc_in.bias": [inner],
                   h + "mlp.fc_out.weight": [n, inner], h + "mlp.fc_out.bias": [n]}
    shapes |= {"transformer.ln_f.weight": [n], "transformer.ln_f.bias": [n], "lm_head.weight": [v, n],
               "lm_head.bias": [v]}
    rng = random.Random(0)
    block = array.array("f", (rng.gauss(0.0, 0.02) for _ in range(65536))).tobytes()
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, shape in shapes.items():
        count = 1
        for d in shape:
            count *= d
        if name.endswith("ln_1.weight") or name.endswith("ln_f.weight"):
            data = array.array("f", [1.0] * count).tobytes()
        elif name.endswith(".bias"):
            data = bytes(4 * count)
        else:
            data = (block * (4 * count // len(block) + 1))[: 4 * count]
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for b in blobs:
            f.write(b)
    (out / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")
    shutil.copy(TOKENIZER, out / "tokenizer.json")
    print(f"wrote {out}: {sum(p.stat().st_size for p in out.iterdir())} bytes")


def serve(root: Path, port: int, repo: str, rate: int) -> None:
    files = sorted(p.name for p in root.iterdir() if p.is_file())

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            listing = f"/api/models/{repo}/revision/"
            resolve = f"/{repo}/resolve/"
            if self.path.startswith(listing):
                body = json.dumps({"id": repo, "siblings": [{"rfilename": f} for f in files]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            elif self.path.startswith(resolve) and self.path.rsplit("/", 1)[-1] in files:
                path = root / self.path.rsplit("/", 1)[-1]
                self.send_response(200)
                self.send_header("Content-Length", str(path.stat().st_size))
                self.end_headers()
                with open(path, "rb") as f:
                    while chunk := f.read(rate // 10 or 1):
                        self.wfile.write(chunk)
                        time.sleep(0.1)
            else:
                self.send_error(404)

        def log_message(self, fmt, *args):
            sys.stderr.write("fake hub: " + fmt % args + "\n")

    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--make", type=Path)
    ap.add_argument("--serve", type=Path)
    ap.add_argument("--port", type=int, default=18090)
    ap.add_argument("--repo", default="gptj-test/tiny-random")
    ap.add_argument("--rate", type=int, default=8_000_000, help="bytes per second")
    a = ap.parse_args()
    if a.make:
        make(a.make)
    if a.serve:
        serve(a.serve, a.port, a.repo, a.rate)


if __name__ == "__main__":
    main()
