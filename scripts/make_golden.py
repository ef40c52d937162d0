#!/usr/bin/env python3
"""Golden fixtures from HuggingFace transformers' GPTJForCausalLM.

Builds small GPT-J checkpoints with seeded weights, saves them in the HF layouts our loader must
read (single safetensors, sharded safetensors + index, torch-zip pytorch_model.bin), and records
HF's outputs (last-position logits in f32 and f16, 32-token greedy continuations) in
expected.json. Run through scripts/make-golden.sh (which sets up the CPU torch venv).

    usage: make_golden.py [OUT_DIR]   (default engine/tests/fixtures/golden)

Everything is deterministic: fixed seeds, deterministic algorithms, one CPU thread, eager
attention. Rerunning with the same torch/transformers versions reproduces the files bit for bit
(safetensors/bin payloads and expected.json).
"""
import json
from collections import OrderedDict
import os
import shutil
import sys
from pathlib import Path

import torch

torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)

import safetensors  # noqa: E402
import transformers  # noqa: E402
from transformers import GPTJConfig, GPTJForCausalLM  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
OUT = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "engine" / "tests" / "fixtures" / "golden"

PROMPT_LENS = [1, 5, 17, 40]
NEW_TOKENS = 32
TOP_LOGPROBS = 5  # OpenAI's legacy completions allow logprobs 0..5
PREFIX_LEN = 23  # rot_partial, 40-token prompt: logits at position PREFIX_LEN-1 (chunked prefill split)

# Weight scales (see README): every parameter is overwritten with seeded values. Chosen by a
# small scan so that greedy continuations are varied (no single-token loops: with q/k at 0.1
# attention is near-uniform and every prompt collapses onto one attractor token), and every
# greedy step's top1-top2 margin is >= 1e-2 (robust to f32 rounding differences).
QK_STD = 0.3  # q_proj, k_proj (attention scores of a few units: neither uniform nor one-hot)
W_STD = 0.1  # v_proj, out_proj
MLP_STD = 0.07  # fc_in, fc_out weights
WTE_STD = 1.0  # token embeddings (residual stream starts at unit scale)
LM_HEAD_STD = 0.6  # logits std ~4-5
MIN_GREEDY_MARGIN = 1e-3  # fail if any greedy step is closer to a tie than this
LN_STD = 0.1  # LayerNorm weight = 1 + LN_STD * N(0,1)
BIAS_STD = 0.05  # every bias (ln_1, ln_f, fc_in, fc_out, lm_head)

MODELS = {
    "rot_partial": dict(
        seed=1234,
        config=dict(vocab_size=512, n_positions=128, n_embd=64, n_layer=3, n_head=4, rotary_dim=8),
    ),
    "odd_heads": dict(
        seed=5678,
        config=dict(vocab_size=384, n_positions=128, n_embd=48, n_layer=2, n_head=3, rotary_dim=16),
    ),
}


def f32(x: float) -> float:
    # 9 significant digits round-trip any f32 exactly.
    return float(f"{x:.9g}")


def make_model(name: str, spec: dict) -> GPTJForCausalLM:
    cfg = GPTJConfig(
        **spec["config"],
        n_inner=None,
        activation_function="gelu_new",
        layer_norm_epsilon=1e-5,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=None,
        eos_token_id=None,  # nothing stops generation early
        pad_token_id=None,
        tie_word_embeddings=False,
    )
    cfg._attn_implementation = "eager"
    torch.manual_seed(spec["seed"])
    model = GPTJForCausalLM(cfg)
    model.config._attn_implementation = "eager"
    gen = torch.Generator().manual_seed(spec["seed"])
    with torch.no_grad():
        for pname, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if pname.endswith(".bias"):
                val = BIAS_STD * noise
            elif ".ln_" in pname or pname.startswith("transformer.ln_f"):
                val = 1.0 + LN_STD * noise
            elif pname == "transformer.wte.weight":
                val = WTE_STD * noise
            elif pname == "lm_head.weight":
                val = LM_HEAD_STD * noise
            elif pname.endswith(("q_proj.weight", "k_proj.weight")):
                val = QK_STD * noise
            elif ".mlp." in pname:
                val = MLP_STD * noise
            else:
                val = W_STD * noise
            p.copy_(val)
    names = {n for n, _ in model.named_parameters()}
    assert "lm_head.bias" in names and not any(n.endswith(("q_proj.bias", "out_proj.bias")) for n in names)
    assert model.transformer.wte.weight.data_ptr() != model.lm_head.weight.data_ptr(), "tied weights"
    model.eval()
    return model


@torch.no_grad()
def logits_of(model, ids: list[int]) -> torch.Tensor:
    """All-position logits [seq, vocab] of a plain full-sequence forward (no cache), as f32."""
    out = model(input_ids=torch.tensor([ids], dtype=torch.long), use_cache=False)
    return out.logits[0].float()


@torch.no_grad()
def logprobs_of(model, ids: list[int]) -> dict:
    """Log-probabilities of a plain full-sequence forward over `ids`: for each position t < len-1,
    log_softmax(logits[t]) at ids[t+1] and the TOP_LOGPROBS largest (ids, values), in f32."""
    lp = torch.log_softmax(logits_of(model, ids), dim=-1)
    top = torch.topk(lp[:-1], TOP_LOGPROBS, dim=-1)
    nxt = torch.tensor(ids[1:], dtype=torch.long)
    return {
        "token_logprobs": [f32(x) for x in lp[:-1].gather(1, nxt[:, None])[:, 0].tolist()],
        "top_ids": top.indices.tolist(),
        "top_logprobs": [[f32(x) for x in row] for row in top.values.tolist()],
    }


@torch.no_grad()
def greedy(model, ids: list[int], n: int) -> tuple[list[int], list[float]]:
    """Manual argmax loop, feeding the full sequence at every step (the plain reference)."""
    seq = list(ids)
    out, margins = [], []
    for _ in range(n):
        last = logits_of(model, seq)[-1]
        top2 = torch.topk(last, 2)
        tok = int(torch.argmax(last))
        assert tok == int(top2.indices[0])
        margins.append(float(top2.values[0] - top2.values[1]))
        out.append(tok)
        seq.append(tok)
    return out, margins


def save_dir(model, path: Path, **kw):
    if path.exists():
        shutil.rmtree(path)
    model.save_pretrained(path, **kw)
    # Only the files the brief asks for: config.json + weights (+ index when sharded).
    gc = path / "generation_config.json"
    if gc.exists():
        gc.unlink()


def save_bin(model, path: Path):
    """pytorch_model.bin in torch's zip format, HF tensor names (transformers 5 dropped
    safe_serialization=False, so write it the way transformers 4 did: torch.save of the state dict)."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    model.config.save_pretrained(path)
    # An OrderedDict like HF/torch state dicts (real GPT-J .bin files pickle collections.OrderedDict);
    # every tensor gets its own storage (clone), so the archive holds one data/N record per tensor.
    sd = OrderedDict((k, v.detach().clone().contiguous()) for k, v in model.state_dict().items())
    assert not any("embed_positions" in k for k in sd), "non-persistent buffer leaked into state dict"
    torch.save(sd, path / "pytorch_model.bin", _use_new_zipfile_serialization=True)


def check_reload(path: Path, ids: list[int], want: torch.Tensor):
    m = GPTJForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    m.eval()
    got = logits_of(m, ids)[-1]
    if not torch.equal(got, want):
        raise SystemExit(f"reload mismatch for {path}: max abs diff {(got - want).abs().max().item()}")
    print(f"  reload ok: {path.relative_to(OUT.parent) if OUT.parent in path.parents else path}")


def fmt_list(xs) -> str:
    return "[" + ",".join(repr(x) for x in xs) + "]"


def write_expected(path: Path, doc: dict):
    """JSON with one array per line (compact but diff-able)."""
    lines = ["{"]
    head = [f' "{k}": {json.dumps(doc[k])}' for k in ("model", "transformers", "torch")]
    lines.append(",\n".join(head) + ",")
    lines.append(' "cases": [')
    case_txt = []
    for c in doc["cases"]:
        parts = [
            f'   "prompt_ids": {fmt_list(c["prompt_ids"])}',
            f'   "greedy_ids": {fmt_list(c["greedy_ids"])}',
            f'   "last_logits": {fmt_list(c["last_logits"])}',
            f'   "last_logits_f16": {fmt_list(c["last_logits_f16"])}',
        ]
        lp = c["logprobs"]
        parts.append(
            f'   "logprobs": {{"token_logprobs": {fmt_list(lp["token_logprobs"])},\n'
            f'    "top_ids": {json.dumps(lp["top_ids"])},\n'
            f'    "top_logprobs": {json.dumps(lp["top_logprobs"])}}}'
        )
        if "prefix_logits" in c:
            p = c["prefix_logits"]
            parts.append(f'   "prefix_logits": {{"len": {p["len"]}, "last_logits": {fmt_list(p["last_logits"])}}}')
        case_txt.append("  {\n" + ",\n".join(parts) + "\n  }")
    lines.append(",\n".join(case_txt))
    lines.append(" ]")
    lines.append("}")
    path.write_text("\n".join(lines) + "\n")
    # Round-trip check.
    assert json.loads(path.read_text()) == doc


def build(name: str, spec: dict) -> dict:
    print(f"== {name}: {spec['config']}")
    model = make_model(name, spec)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(spec["seed"] + 1)
    prompts = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in PROMPT_LENS]

    half = make_model(name, spec).half()
    half.eval()

    cases, all_margins = [], []
    for ids in prompts:
        lg = logits_of(model, ids)
        last = lg[-1]
        toks, margins = greedy(model, ids, NEW_TOKENS)
        all_margins += margins
        last16 = logits_of(half, ids)[-1]
        rel16 = ((last16 - last).abs().max() / last.abs().max()).item()
        case = {
            "prompt_ids": ids,
            "last_logits": [f32(x) for x in last.tolist()],
            "greedy_ids": toks,
            "last_logits_f16": [f32(x) for x in last16.tolist()],
            "logprobs": logprobs_of(model, ids + toks),
        }
        if name == "rot_partial" and len(ids) == 40:
            pre_full = lg[PREFIX_LEN - 1]
            pre_alone = logits_of(model, ids[:PREFIX_LEN])[-1]
            d = (pre_full - pre_alone).abs().max().item()
            assert d < 1e-5, f"prefix logits: full vs truncated forward differ by {d}"
            case["prefix_logits"] = {"len": PREFIX_LEN, "last_logits": [f32(x) for x in pre_full.tolist()]}
        cases.append(case)
        top2 = torch.topk(last, 2).values
        print(
            f"  prompt len {len(ids):2d}: logits std {last.std().item():.3f} range "
            f"[{last.min().item():.2f}, {last.max().item():.2f}] top1-top2 {float(top2[0] - top2[1]):.4f} "
            f"f16 rel err {rel16:.2e} greedy distinct {len(set(toks))}/32 min step margin {min(margins):.4f}"
        )
        print(f"    greedy: {toks}")
    m = torch.tensor(all_margins)
    print(
        f"  greedy step top1-top2 margins: min {m.min().item():.4f} median {m.median().item():.4f} "
        f"(< 1e-3: {(m < 1e-3).sum().item()}, < 1e-2: {(m < 1e-2).sum().item()} of {len(m)})"
    )
    assert m.min().item() >= MIN_GREEDY_MARGIN, "a greedy step is a near-tie: pick other seeds/scales"

    doc = {
        "model": name,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "cases": cases,
    }
    first_ids, first_logits = prompts[0], logits_of(model, prompts[0])[-1]

    d = OUT / name
    save_dir(model, d)
    write_expected(d / "expected.json", doc)
    check_reload(d, first_ids, first_logits)
    if name == "odd_heads":
        ds = OUT / "odd_heads_sharded"
        save_dir(model, ds, max_shard_size="150KB")
        idx = json.loads((ds / "model.safetensors.index.json").read_text())
        shards = sorted(set(idx["weight_map"].values()))
        assert "metadata" in idx and len(shards) >= 2, idx
        assert set(idx["weight_map"]) == set(model.state_dict()), "index does not cover every tensor"
        check_reload(ds, first_ids, first_logits)
        db = OUT / "odd_heads_bin"
        save_bin(model, db)
        check_reload(db, first_ids, first_logits)
    return doc


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, safetensors {safetensors.__version__}")
    for name, spec in MODELS.items():
        build(name, spec)
    print(f"wrote {OUT}:")
    total = 0
    for p in sorted(OUT.rglob("*")):
        if p.is_file():
            total += p.stat().st_size
            print(f"  {p.stat().st_size:>9}  {p.relative_to(OUT)}")
    print(f"  {total:>9}  total")


if __name__ == "__main__":
    main()
