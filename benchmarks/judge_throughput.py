"""Judge scoring throughput: augrel's LabelTokenScorer against what a first script does, on real pairs.

Rows, all on the same model and the same TREC DL 2019 pairs, measured side by side in one run:

- naive: one pair at a time, fp32, the whole prompt through ``model.generate()``, then parse the digit;
- scorer variants: one forward pass per batch reading the grade-token distribution, with and without the
  shared-prefix KV cache, in fp32 and in bf16 (where the CPU computes bf16 natively), and the default
  with the decoder through ``torch.compile`` (its compile time printed, not counted; not with ``--quick``).

FLOPs per pair are counted from the model's shapes (2 x multiply-adds of every linear layer per token, plus
attention scores and values over the context); the machine's matmul peak is measured in the same dtype with
a large square matmul on the same threads. Prints a table and ends with
``RESULT pairs_per_s=.. speedup_vs_generate=.. frac_of_matmul_peak=..``.

    python benchmarks/judge_throughput.py [--quick] [--model gemma3-270m] [--pairs N]
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.judge import LabelTokenScorer
from models.loading import cpu_description, load_causal_lm, resolve_dtype
from models.prompts import UMBRELA
from pipelines.data import PrepareConfig, prepare
from pipelines.io import read_table

DATA = Path(os.environ.get("AUGREL_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))


def matmul_peak(dtype: torch.dtype, n: int = 2048, seconds: float = 3.0) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def flops_per_pair(config, suffix_tokens: float, prefix_tokens: int, prefix_cached: bool) -> float:
    """Forward FLOPs for one pair from the model's shapes (embedding lookups and the 4-row head are ~free)."""
    c = getattr(config, "text_config", config)
    h, layers, inter = c.hidden_size, c.num_hidden_layers, c.intermediate_size
    heads, kv = c.num_attention_heads, c.num_key_value_heads
    hd = getattr(c, "head_dim", h // heads)
    linear = h * heads * hd + 2 * h * kv * hd + heads * hd * h + 3 * h * inter  # q, k, v, o, gate, up, down
    tokens = suffix_tokens if prefix_cached else suffix_tokens + prefix_tokens
    context = prefix_tokens + suffix_tokens / 2 if prefix_cached else (prefix_tokens + suffix_tokens) / 2
    attention = 2 * 2 * heads * hd * context  # q.k and p.v per token
    return layers * tokens * (2 * linear + attention)


def naive_generate(lm, template, rows) -> tuple[float, list[int | None]]:
    """What a first script does: format the prompt, generate, parse a digit. One pair at a time."""
    tok, model = lm.tokenizer, lm.model
    labels = []
    t0 = time.perf_counter()
    for r in rows:
        prompt = template.prefix_text() + template.pair_text(r["query"], r["text"])
        ids = tok(prompt, return_tensors="pt", truncation=True, max_length=1024)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
        text = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
        m = re.search(r"[0-3]", text)
        labels.append(int(m.group()) if m else None)
    return len(rows) / (time.perf_counter() - t0), labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer pairs (same comparison), under 2 minutes")
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--pairs", type=int, help="pairs for the scorer rows")
    ap.add_argument("--naive-pairs", type=int, help="pairs for the naive generate row")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument(
        "--no-compile",
        action="store_true",
        help="skip the torch.compile row (minutes to compile; --quick skips it)",
    )
    args = ap.parse_args()
    n = args.pairs or (48 if args.quick else 400)
    n_naive = args.naive_pairs or (6 if args.quick else 24)
    torch.manual_seed(0)

    prepared = Path(os.environ.get("AUGREL_BENCH_CACHE", "/tmp/augrel-bench")) / "dl19"
    if not (prepared / "pairs").exists():
        prepare(PrepareConfig(format="trec-dl", src=str(DATA / "trec-dl-2019"), out=str(prepared)))
    table = read_table(prepared / "pairs")
    idx = np.random.default_rng(0).permutation(table.num_rows)[:n]
    rows = table.take(idx).to_pylist()
    template = UMBRELA
    threads = torch.get_num_threads()

    results = []
    lm32 = load_causal_lm(args.model, dtype="fp32", device="cpu")
    naive_rate, _ = naive_generate(lm32, template, rows[:n_naive])
    results.append(("naive: generate + parse, fp32, batch 1", "fp32", naive_rate, None))

    def run(lm, label, dtype_name, prefix_cache, compile=False):
        s = LabelTokenScorer(lm.model, lm.tokenizer, template, batch_size=args.batch_size,
                             prefix_cache=prefix_cache, compile=compile)  # fmt: skip
        t0 = time.perf_counter()
        # warm-up: for the compiled row, every batch shape class once (the longest batches come first)
        warm = rows[: 2 * args.batch_size] if compile else rows[:4]
        s.score([r["query"] for r in warm], [r["text"] for r in warm])
        if compile:
            label += f" (compiled in {time.perf_counter() - t0:.0f}s)"
        t0 = time.perf_counter()
        r = s.score([r["query"] for r in rows], [r["text"] for r in rows])
        rate = n / (time.perf_counter() - t0)
        prefix = len(s.encoder.prefix_ids)
        suffix = float(r.n_tokens.mean()) - prefix
        flops = flops_per_pair(lm.model.config, suffix, prefix, prefix_cache)
        results.append((label, dtype_name, rate, flops))
        return r

    run(lm32, f"scorer fp32, batch {args.batch_size}, no prefix cache", "fp32", False)
    del lm32
    bf16_ok = resolve_dtype("auto", "cpu") == torch.bfloat16
    best_dtype = "bf16" if bf16_ok else "fp32"
    lm = load_causal_lm(args.model, dtype=best_dtype, device="cpu")
    run(lm, f"scorer {best_dtype}, batch {args.batch_size}, no prefix cache", best_dtype, False)
    run(lm, f"scorer {best_dtype}, batch {args.batch_size}, prefix KV cache (default)", best_dtype, True)
    if not (args.no_compile or args.quick):  # compiling alone takes 2-3 minutes
        run(lm, "  + torch.compile", best_dtype, True, compile=True)

    peak = {"fp32": matmul_peak(torch.float32)}
    if bf16_ok:
        peak["bf16"] = matmul_peak(torch.bfloat16)

    print(f"\njudge throughput: {args.model}, TREC DL 2019 pairs ({n} scored, {n_naive} for the naive row), "
          f"{threads} threads; {cpu_description()}")  # fmt: skip
    print("matmul peak: " + ", ".join(f"{k} {v / 1e12:.2f} TFLOP/s" for k, v in peak.items()))
    print(f"{'method':<56} {'pairs/s':>8} {'vs naive':>9} {'GFLOP/pair':>11} {'TFLOP/s':>8} {'of peak':>8}")
    for label, dt, rate, flops in results:
        tf = rate * flops / 1e12 if flops else None
        frac = tf * 1e12 / peak[dt] if flops else None
        print(f"{label:<56} {rate:>8.2f} {rate / naive_rate:>8.1f}x "
              f"{(flops or 0) / 1e9:>11.1f} {tf or 0:>8.3f} {(frac or 0):>7.1%}")  # fmt: skip
    best = max(results[1:], key=lambda r: r[2])
    frac = best[2] * best[3] / peak[best[1]]
    print(f"RESULT pairs_per_s={best[2]:.2f} speedup_vs_generate={best[2] / naive_rate:.1f} "
          f"frac_of_matmul_peak={frac:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
