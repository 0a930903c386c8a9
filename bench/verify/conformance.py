"""Golden conformance: every case of ../shared/golden/smollm2_reference.json through our
DySCO loop; per case, whether the generated tokens equal the reference and the mean /
minimum Jaccard overlap of the selected set per intervention step.

    python bench/verify/conformance.py [--model F32_OR_Q4_GGUF] [--golden PATH] [--flash-attn]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np

from dysco_edge.config import DyscoConfig
from dysco_edge.runtime.bookkeeping import HostBookkeeping
from dysco_edge.runtime.decode import dysco_tokens, plan_warmups
from dysco_edge.runtime.engine import Engine, EngineOptions, Sampler

import llama_cpp

GOLDEN = Path(__file__).resolve().parents[3] / "shared" / "golden" / "smollm2_reference.json"

_spec = importlib.util.spec_from_file_location("reference_harness", Path(__file__).with_name("reference_harness.py"))
reference_harness = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reference_harness)

# the reference harness hid these prompt tokens from attention (its pad id; see reference_harness.py)
REFERENCE_PAD_ID = 1


def golden_path() -> Path:
    return Path(os.environ.get("DYSCO_GOLDEN", GOLDEN))


def conformance_engine(model, flash_attn: bool = False, n_gpu_layers: int = 0) -> Engine:
    """F32 KV cache; two sequences on a unified cache, as the reference harness replay needs."""
    f32 = llama_cpp.GGML_TYPE_F32
    return Engine(model, EngineOptions(n_ctx=4096, flash_attn=flash_attn, type_k=f32, type_v=f32,
                                       n_gpu_layers=n_gpu_layers, n_seq_max=2, kv_unified=True))


def run_case(engine: Engine, case: dict, harness: bool = True) -> dict:
    """Our loop on one case; `harness` feeds the model as the reference harness did."""
    cfg = DyscoConfig(qr_heads=tuple(map(tuple, case["qr_heads"])), **case["config"])
    prompt = case["prompt_ids"]
    warm = plan_warmups(len(prompt), cfg.context_warmup, cfg.intervention_warmup)
    engine.clear()  # the harness also needs a fresh cache: its slots are token indices
    target = reference_harness.ReferenceHarness(engine, prompt, warm.fed, REFERENCE_PAD_ID) if harness else engine
    trace = []
    try:
        tokens = list(dysco_tokens(target, prompt, cfg, warm, reuse=0, sampler=Sampler(),
                                   max_new_tokens=int(case["max_new_tokens"]),
                                   is_end=engine.is_end, trace=trace,
                                   bookkeeping=HostBookkeeping if harness else None))
    finally:
        if harness:
            target.close()
    reference = {step["pos"]: set(step["selected"]) for step in case["intervention_steps"]}
    jaccard = [len(set(s.selected.tolist()) & reference[s.pos]) / len(set(s.selected.tolist()) | reference[s.pos])
               for s in trace if s.pos in reference]
    agree = sum(a == b for a, b in zip(tokens, case["generated"]))
    return {"id": case["id"], "tokens_equal": tokens == case["generated"],
            "token_agreement": agree / max(len(tokens), len(case["generated"])),
            "steps_compared": len(jaccard), "jaccard_mean": float(np.mean(jaccard)),
            "jaccard_min": float(np.min(jaccard))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True, help="SmolLM2-135M-Instruct GGUF (F32 for conformance)")
    ap.add_argument("--golden", default=None)
    ap.add_argument("--flash-attn", action="store_true")
    ap.add_argument("--n-gpu-layers", type=int, default=0)
    args = ap.parse_args()
    golden = json.loads(Path(args.golden or golden_path()).read_text())
    engine = conformance_engine(args.model, args.flash_attn, args.n_gpu_layers)
    print("| case | tokens equal | token agreement | steps | mean Jaccard | min Jaccard |")
    print("|---|---|---|---|---|---|")
    for case in golden["cases"]:
        r = run_case(engine, case)
        print(f"| {r['id']} | {r['tokens_equal']} | {r['token_agreement']:.2f} | {r['steps_compared']} "
              f"| {r['jaccard_mean']:.3f} | {r['jaccard_min']:.3f} |")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
