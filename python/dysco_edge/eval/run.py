"""The evaluation loop: cases x methods on one model, each result appended to a JSONL file.

Per case the prompt's common prefix is prefilled once and reused by every method that
decodes without rescaling (plain, dysco, static, random); attention-temperature scaling
changes every layer's keys and values, so it prefills again and drops its cache afterwards.
Each record's cost is what one answer costs alone: prefill_s (the shared prefill, or the
method's own) + decode_s (the method's remaining prompt tokens and its answer).
"""
from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..runtime.decode import plan_warmups
from .methods import HEAD_KINDS, Decoding, Method, resolve
from ..progress import Progress
from .prompts import PromptRenderer, Rendered
from .results import append_record, done_keys, open_for_append
from .scoring import score
from .tasks import Case, case_seed, check_split, make_case, task_spec
from ..errors import InputError

SAFETY = 1.5  # a new case starts only if 1.5x the slowest case so far still fits the time limit


@dataclass(frozen=True)
class EvalPlan:
    model: Path
    tasks: tuple[str, ...]
    lengths: tuple[int, ...]
    split: str
    n: int
    methods: tuple[Method, ...]
    out: Path
    base_seed: int = 0
    head_map: Path | None = None
    n_gpu_layers: int = 0
    flash_attn: bool = False
    n_threads: int | None = None
    n_batch: int = 512
    time_limit: float | None = None  # seconds; stop before a case that might not finish in time
    shard: tuple[int, int] = (0, 1)  # (k, n): only the case indices i with i % n == k (parallel runs)

    def __post_init__(self):
        for task in self.tasks:
            task_spec(task)
        check_split(self.split)
        if not self.tasks or not self.lengths or not self.methods:
            raise InputError("give at least one task, one length and one method")
        if min(self.lengths) < 128 or len(set(self.lengths)) != len(self.lengths):
            raise InputError(f"lengths must be distinct and >= 128 tokens, got {list(self.lengths)}")
        for method in self.methods:
            method.check_complete()
        if self.n < 1:
            raise InputError(f"--n must be >= 1, got {self.n}")
        if not 0 <= self.shard[0] < self.shard[1]:
            raise InputError(f"--shard K/N needs 0 <= K < N, got {self.shard[0]}/{self.shard[1]}")
        if self.time_limit is not None and self.time_limit <= 0:
            raise InputError(f"--time-limit must be > 0 seconds, got {self.time_limit}")


@dataclass(frozen=True)
class WorkItem:
    task: str
    length: int
    index: int
    seed: int
    methods: tuple[Method, ...]


@dataclass(frozen=True)
class RunSummary:
    written: int
    already_done: int
    remaining: int
    stopped_for_time: bool


def pending_work(plan: EvalPlan, done: set[tuple], model_name: str) -> list[WorkItem]:
    """Unfinished (case, methods), case index outermost: a cut-short run leaves every cell about as full."""
    work = []
    for index in range(plan.shard[0], plan.n, plan.shard[1]):
        for length in sorted(plan.lengths):
            for task in plan.tasks:
                seed = case_seed(task, plan.split, length, index, plan.base_seed)
                todo = tuple(m for m in plan.methods
                             if (model_name, task, plan.split, length, seed, m.label) not in done)
                if todo:
                    work.append(WorkItem(task, length, index, seed, todo))
    return work


def load_model(plan: EvalPlan):
    from ..api import Model  # loads llama.cpp: only once there is work

    model = Model(plan.model, n_ctx=max(plan.lengths), n_gpu_layers=plan.n_gpu_layers, flash_attn=plan.flash_attn,
                  n_batch=plan.n_batch, n_threads=plan.n_threads, head_map=plan.head_map)
    trained = model.n_ctx_train
    if max(plan.lengths) > trained:
        model.close()
        raise InputError(f"length {max(plan.lengths)} is beyond {plan.model.name}'s training context of "
                         f"{trained} tokens; drop it from --lengths")
    return model


def run_eval(plan: EvalPlan, *, stream=None, open_runner=None) -> RunSummary:
    """Run every unfinished (case, method) of the plan, appending each result as it finishes.

    open_runner(plan): a context manager giving an object with .case(item) and .run(case, methods)
    (default: the plan's model on llama.cpp). Progress goes to `stream` (default: stderr now).
    """
    stream = stream or sys.stderr
    start = time.perf_counter()
    done = done_keys(plan.out)
    work = pending_work(plan, done, plan.model.name)
    total = sum(len(item.methods) for item in work)
    print(f"eval: {plan.model.name}, {plan.split}, {total} results to compute "
          f"({len(done)} already in {plan.out})", file=stream, flush=True)
    if not work:
        return RunSummary(0, len(done), 0, False)
    progress, written, slowest = Progress("eval", total=total, unit="case", stream=stream), 0, 0.0
    try:
        with (open_runner or model_runner)(plan) as runner, open_for_append(plan.out) as f:
            for item in work:
                if plan.time_limit is not None and time.perf_counter() - start + SAFETY * slowest > plan.time_limit:
                    break
                began = time.perf_counter()
                for record in runner.run(runner.case(item), item.methods):
                    append_record(f, record)
                    written += 1
                    progress.step(f"{item.task}@{item.length} #{item.index} {record['method']}")
                slowest = max(slowest, time.perf_counter() - began)
    finally:
        progress.close()
    return RunSummary(written, len(done), total - written, written < total)


@contextlib.contextmanager
def model_runner(plan: EvalPlan) -> Iterator[CaseRunner]:
    model = load_model(plan)
    try:
        yield CaseRunner(model, plan)
    finally:
        model.close()


class CaseRunner:
    """Runs methods on cases for one loaded model."""

    def __init__(self, model, plan: EvalPlan):
        self.model, self.plan = model, plan
        self.renderer = PromptRenderer(model)
        self.head_map = model.head_map() if any(m.kind in HEAD_KINDS for m in plan.methods) else None
        for method in plan.methods:  # fail now, not after an hour of other methods
            resolve(method, head_map=self.head_map, shape=model.shape, n_prompt=1000, answer_warmup=4, seed=0)

    def case(self, item: WorkItem) -> Case:
        return make_case(item.task, split=self.plan.split, length=item.length, index=item.index,
                         measure=self.renderer.count, base_seed=self.plan.base_seed)

    def run(self, case: Case, methods: tuple[Method, ...]) -> Iterator[dict]:
        rendered = self.renderer.render(case.draft.prompt, case.draft.stop)
        plans = [(m, resolve(m, head_map=self.head_map, shape=self.model.shape, n_prompt=len(rendered.ids),
                             answer_warmup=rendered.answer_warmup, seed=case.seed)) for m in methods]
        shared = [(m, d) for m, d in plans if d.attn_scale == 1.0]
        if shared:
            prefill_s = self._prefill(rendered.ids[:shared_prefix(len(rendered.ids), [d for _, d in shared])])
            for method, decoding in shared:
                yield self._answer(case, rendered, method, decoding, prefill_s)
        for method, decoding in plans:
            if decoding.attn_scale != 1.0:
                yield self._scaled_answer(case, rendered, method, decoding)

    def _prefill(self, ids: list[int]) -> float:
        began = time.perf_counter()
        self.model.prefill(ids)
        return time.perf_counter() - began

    def _answer(self, case: Case, rendered: Rendered, method: Method, decoding: Decoding, prefill_s: float) -> dict:
        began = time.perf_counter()
        generation = self.model.generate(token_ids=rendered.ids, dysco=decoding.config, temperature=0.0,
                                         max_new_tokens=case.draft.max_new_tokens, stop=rendered.stop)
        return self._record(case, method, decoding, generation, prefill_s, time.perf_counter() - began)

    def _scaled_answer(self, case: Case, rendered: Rendered, method: Method, decoding: Decoding) -> dict:
        with self.model.attention_scale(decoding.attn_scale):
            prefill_s = self._prefill(rendered.ids[:-1])
            return self._answer(case, rendered, method, decoding, prefill_s)

    def _record(self, case: Case, method: Method, decoding: Decoding, generation, prefill_s: float,
                decode_s: float) -> dict:
        gold = case.draft.gold
        return {
            "model": self.plan.model.name, "task": case.task, "split": case.split, "length": case.length,
            "index": case.index, "seed": case.seed, "method": method.label, "kind": method.kind,
            "score": score(case.draft.scorer, generation.text, gold), "scorer": case.draft.scorer,
            "prediction": generation.text, "gold": list(gold) if isinstance(gold, tuple) else gold,
            "n_prompt": generation.n_prompt, "n_generated": len(generation.token_ids),
            "finish": generation.finish_reason, "prefill_s": round(prefill_s, 4), "decode_s": round(decode_s, 4),
            "wall_s": round(prefill_s + decode_s, 4), "settings": settings(decoding),
            "details": dict(case.draft.details), "backend": self.backend(),
        }

    def backend(self) -> dict:
        return {"n_gpu_layers": self.plan.n_gpu_layers, "flash_attn": self.plan.flash_attn,
                "n_threads": self.plan.n_threads}


def shared_prefix(n_prompt: int, decodings: list[Decoding]) -> int:
    """Prompt tokens every method prefills the same way: all but those fed one at a time."""
    fed = 1
    for d in decodings:
        if d.config is not None:
            fed = max(fed, plan_warmups(n_prompt, d.config.context_warmup, d.config.intervention_warmup).fed)
    return max(0, n_prompt - fed)


def settings(decoding: Decoding) -> dict:
    """What the method did for this case, for the record."""
    if decoding.config is None:
        return {"attn_scale": decoding.attn_scale} if decoding.attn_scale != 1.0 else {}
    out = decoding.config.to_dict()
    out.pop("template_sequences")
    return out
