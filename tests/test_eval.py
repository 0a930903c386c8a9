"""The evaluation harness: task generators, scoring, methods, results file, intervals, report,
and (slow) a smoke run of `dysco-edge eval` + `eval-report` on SmolLM2."""
from __future__ import annotations

import contextlib
import itertools
import json
import re
import subprocess
import sys
from pathlib import Path

import models
import numpy as np
import pytest
from dysco_edge.eval.methods import Method, parse_methods, random_heads, resolve
from dysco_edge.eval.report import comparisons, write_report
from dysco_edge.eval.results import read_records
from dysco_edge.eval.run import EvalPlan, run_eval
from dysco_edge.eval.scoring import (
    final_number,
    first_number,
    path_prefix,
    score,
    sequence_ratio,
    set_overlap,
)
from dysco_edge.eval.stats import bootstrap_group_mean, estimate, wilson
from dysco_edge.eval.tasks import (
    CHAIN_HOPS,
    HOPS,
    LONG_TASKS,
    MRCR_REPEATS,
    PASSAGE_PIECES,
    PASSAGE_REPEATS,
    ROUTE_HOPS,
    TASKS,
    case_seed,
    fit_units,
    make_case,
)
from dysco_edge.heads.maps import HeadMap, ModelShape

REPO = Path(__file__).resolve().parent.parent
BENCH_HEADS = REPO / "bench" / "speed" / "smollm2-bench-heads.json"


def chars(prompt) -> int:
    """A stand-in tokenizer: about four characters a token."""
    return len(prompt.text()) // 4


def case(task, length=2048, index=0, split="dev", measure=chars):
    return make_case(task, split=split, length=length, index=index, measure=measure)


# ---- generators ----

@pytest.mark.parametrize("task", TASKS)
def test_generators_are_deterministic_per_seed(task):
    assert case(task) == case(task)
    assert case(task).draft.prompt != case(task, index=1).draft.prompt


@pytest.mark.parametrize("task", TASKS)
def test_dev_and_test_never_share_a_seed_or_a_prompt(task):
    for length in (1024, 4096):
        dev = {case_seed(task, "dev", length, i) for i in range(200)}
        test = {case_seed(task, "test", length, i) for i in range(200)}
        assert len(dev) == len(test) == 200 and not dev & test
    dev_prompts = {case(task, index=i).draft.prompt for i in range(10)}
    test_prompts = {case(task, index=i, split="test").draft.prompt for i in range(10)}
    assert not dev_prompts & test_prompts


@pytest.mark.parametrize("task,length", [(t, n) for t in TASKS for n in (512, 2048, 16384)
                                          if n >= 2048 or t not in LONG_TASKS])
def test_prompts_fill_their_length_without_passing_it(task, length):
    c = case(task, length=length)
    budget = length - c.draft.max_new_tokens
    unit = 320 if task == "passage" else 40  # a passage task grows by whole rounds of up to ~300 tokens
    assert budget - max(0.03 * budget, unit) <= c.n_tokens <= budget and c.n_tokens == chars(c.draft.prompt)


def test_too_short_a_length_is_refused_by_name():
    with pytest.raises(ValueError, match="length 64 is too short for task vt"):
        case("vt", length=64)


def test_fit_units_finds_the_largest_that_fits():
    sizes = {n: 100 + 7 * n + (n % 3) for n in range(5000)}  # not exactly linear
    for budget in (200, 1000, 9999):
        got = fit_units(sizes.__getitem__, budget, 4)
        assert sizes[got] <= budget and sizes[got] >= 0.995 * budget - 7


def _user_text(c) -> str:
    return c.draft.prompt.turns[-1][1]


def test_passkey_gold_is_the_asked_vault_key():
    for i in range(20):
        c = case("passkey", index=i)
        keys = dict(re.findall(r"The secret passkey of the (\w+) vault is (\d+)\.", _user_text(c)))
        asked = re.search(r"What is the secret passkey of the (\w+) vault\?", _user_text(c)).group(1)
        assert len(keys) == 4 and keys[asked] == c.draft.gold


def test_kv_gold_is_the_value_in_the_json_object():
    for i in range(20):
        c = case("kv", index=i)
        text = _user_text(c)
        body = text[text.index("{"):text.rindex("}") + 1]
        obj = json.loads(body)
        assert len(obj) == body.count('": "')  # no key twice
        asked = re.search(r'value of the key "([^"]+)"', text).group(1)
        assert obj[asked] == c.draft.gold and list(obj.values()).count(c.draft.gold) == 1


def test_path_gold_follows_the_roads():
    for i in range(20):
        c = case("path", index=i)
        roads = re.findall(r"There is a one-way road from (\w+) to (\w+)\.", _user_text(c))
        outgoing = dict(roads)
        assert len(outgoing) == len(roads)  # exactly one outgoing road per city
        city = re.search(r"Start in (\w+) and", _user_text(c)).group(1)
        route = []
        for _ in range(HOPS):
            city = outgoing[city]
            route.append(city)
        assert tuple(route) == c.draft.gold and len(set(route)) == HOPS


def test_mrcr_gold_is_the_nth_matching_answer():
    for i in range(20):
        c = case("mrcr", index=i)
        turns = c.draft.prompt.turns
        ordinal, kind, topic = re.search(r"Reproduce the (\w+) (\w+) about (.+) that you", turns[-1][1]).groups()
        nth = ["first", "second", "third", "fourth"].index(ordinal)
        answers = [turns[j + 1][1] for j in range(0, len(turns) - 1, 2)
                   if turns[j][1] == f"Write a {kind} about {topic}."]
        assert len(answers) == MRCR_REPEATS and answers[nth] == c.draft.gold and len(set(answers)) == MRCR_REPEATS


def test_vt_gold_is_every_variable_holding_the_value():
    for i in range(20):
        c = case("vt", index=i)
        text = _user_text(c)
        values = {}
        for name, ref, number in re.findall(r"VAR (\w+) = (?:VAR (\w+)|(\d+))\.", text):
            values[name] = values[ref] if ref else number  # a reference is always to an earlier line
        asked = re.search(r"assigned the value (\d+)", text).group(1)
        assert {n for n, v in values.items() if v == asked} == set(c.draft.gold)


def _follow(edges: dict, start: str, steps: int) -> list:
    out = [start]
    for _ in range(steps):
        out.append(edges[out[-1]])
    return out[1:]


def test_route_gold_lists_every_city_along_the_roads():
    for i in range(20):
        c = case("route", index=i, length=2048)
        roads = re.findall(r"There is a one-way road from (\w+) to (\w+)\.", _user_text(c))
        outgoing = dict(roads)
        assert len(outgoing) == len(roads) and len(roads) > ROUTE_HOPS  # one road out of a city, decoys too
        start = re.search(r"Start in (\w+) and follow", _user_text(c)).group(1)
        assert tuple(_follow(outgoing, start, ROUTE_HOPS)) == c.draft.gold
        assert len({city[:3] for city in (start, *c.draft.gold)}) == ROUTE_HOPS + 1  # names start apart
        assert c.draft.prompt.answer_prefix == "1."
        assert all(e in _user_text(c) for e in c.draft.evidence) and len(c.draft.evidence) == ROUTE_HOPS
        at = [_user_text(c).index(e) for e in c.draft.evidence]
        assert at == sorted(at)  # a travel log: the route's roads in route order
    shuffled = [case("route:ordered=0", index=i) for i in range(20)]
    assert any([_user_text(c).index(e) for e in c.draft.evidence] != sorted(_user_text(c).index(e) for e in
               c.draft.evidence) for c in shuffled)


def test_long_tasks_take_a_difficulty_option_by_name():
    assert len(case("route:hops=4").draft.gold) == 4 and len(case("route:hops=12").draft.gold) == 12
    assert case("route:hops=4").task == "route:hops=4" and case("route").draft.gold != case("route:hops=4").draft.gold
    assert case("chain:hops=2").draft.details["hops"] == 2 and case("passage:repeats=5").draft.details["repeats"] == 5
    assert case("route:hops=3+decoys=0").draft.details["decoys"] == 0
    with pytest.raises(ValueError, match="task route: unknown option 'depth' \\(options: hops, decoys, ordered\\)"):
        case("route:depth=3")
    with pytest.raises(ValueError, match="task passage: repeats must be a whole number from 1 to 8, got '9'"):
        case("passage:repeats=9")
    with pytest.raises(ValueError, match="task kv: unknown option 'hops' \\(options: none\\)"):
        case("kv:hops=2")


def test_passage_gold_is_the_nth_long_passage_of_its_request():
    for i in range(20):
        c = case("passage", index=i, length=4096)
        turns = c.draft.prompt.turns
        ordinal, kind, topic = re.search(r"Reproduce the (\w+) (.+?) about (.+) that you", turns[-1][1]).groups()
        nth = ["first", "second", "third"].index(ordinal)
        answers = [turns[j + 1][1] for j in range(0, len(turns) - 1, 2)
                   if turns[j][1] == f"Write a {kind} about {topic}."]
        assert len(answers) == PASSAGE_REPEATS == len(set(answers)) and answers[nth] == c.draft.gold
        assert PASSAGE_PIECES[0] <= c.draft.gold.count("\n") + 1 <= PASSAGE_PIECES[1]
        assert c.draft.max_new_tokens > len(c.draft.gold) // 4 and c.draft.evidence == (c.draft.gold,)


def test_chain_gold_is_the_value_the_asked_variable_holds():
    for i in range(20):
        c = case("chain", index=i, length=2048)
        text = _user_text(c)
        values, refs = {}, {}
        for name, ref, number in re.findall(r"VAR (\w+) = (?:VAR (\w+)|(\d+))\.", text):
            assert name not in values and name not in refs  # every variable assigned once
            (refs if ref else values)[name] = ref or number
        asked = re.search(r"What is the value of VAR (\w+)\?", text).group(1)
        hops = 0
        while asked in refs:
            asked, hops = refs[asked], hops + 1
        assert hops == CHAIN_HOPS and values[asked] == c.draft.gold
        assert all(e in text for e in c.draft.evidence) and len(c.draft.evidence) == CHAIN_HOPS + 1


# ---- scoring ----

def test_scoring_rules():
    assert first_number(" 482,913. Done", "482913") == 1.0
    assert first_number(" It is 12 then 482913", "482913") == 0.0
    assert first_number(" no number", "482913") == 0.0
    assert path_prefix(" Kel -> Mar -> Ost", ("Kel", "Mar", "Ost")) == 1.0
    assert path_prefix(" Kel -> Ulm -> Ost", ("Kel", "Mar", "Ost")) == pytest.approx(1 / 3)
    assert path_prefix(" kel, then Mar", ("Kel", "Mar", "Ost")) == pytest.approx(2 / 3)
    assert path_prefix("Kel\nMar\nOst\n", ("Kel", "Mar", "Ost", "Ulm")) == 0.75
    assert path_prefix(" Kel\n2. Mar\n3. Ulm", ("Kel", "Mar", "Ost")) == pytest.approx(2 / 3)  # a numbered list
    assert final_number("VAR A = VAR B.\nVAR B = 12345.\n\nAnswer: 12,345", "12345") == 1.0
    assert final_number("VAR A = 12345.\nAnswer: 54321 (or 12345)", "12345") == 0.0
    assert final_number("VAR A = VAR B.\nVAR B = 12345.", "12345") == 1.0
    assert final_number("VAR B = 12345. So it is 7", "12345") == 0.0
    assert sequence_ratio("  Quiet rain over the river. ", "quiet rain over the river") == 1.0
    assert 0 < sequence_ratio("quiet rain", "quiet rain over the river") < 1
    assert set_overlap(" ABCDE, FGHIJ", ("ABCDE", "FGHIJ", "KLMNO", "PQRST")) == 0.5
    assert set_overlap(" ABCDE FGHIJ KLMNO PQRST VWXYZ", ("ABCDE", "FGHIJ", "KLMNO", "PQRST")) == 0.8
    with pytest.raises(ValueError, match="unknown scoring rule 'nope'"):
        score("nope", "", "")


# ---- methods ----

SHAPE = ModelShape(architecture="llama", n_layer=30, n_head=9, n_head_kv=3, n_embd=576)


def test_method_specs_parse_and_print():
    methods = parse_methods("plain,dysco:strength=3,top_k=none,top_p=0.9;random:layers=all,attnts:factor=1.25")
    assert [m.label for m in methods] == ["plain", "dysco:strength=3,top_k=none,top_p=0.9",
                                          "random:layers=all", "attnts:factor=1.25"]
    assert [Method.parse(m.label) for m in methods] == list(methods)
    with pytest.raises(ValueError, match="needs a factor"):
        Method.parse("attnts").check_complete()
    for bad, message in (("dysco:strength=-1", "strength"),
                         ("plain:factor=2", "unknown option"), ("dysco:top_k=5,top_k_ratio=0.1", "not both"),
                         ("plain,plain", "without repeats"), ("beam", "unknown method")):
        with pytest.raises(ValueError, match=message):
            parse_methods(bad)


def test_tuned_options_fill_unset_ones_and_reach_the_ablations():
    tuned = {"dysco": {"strength": 3, "top_k": 64}, "attnts": {"factor": 1.2}}
    assert Method.parse("static").with_tuned(tuned).label == "static:strength=3,top_k=64"
    assert Method.parse("random:top_k_ratio=0.1").with_tuned(tuned).label == "random:strength=3,top_k_ratio=0.1"
    assert Method.parse("attnts").with_tuned(tuned).label == "attnts:factor=1.2"


def test_random_heads_are_seeded_capped_and_never_qr_heads():
    qr = {(12, 1), (14, 3), (20, 7)}
    heads = random_heads(5, 3, 9, 20, qr)
    assert heads == random_heads(5, 3, 9, 20, qr) != random_heads(6, 3, 9, 20, qr)
    assert len(set(heads)) == 3 and not set(heads) & qr and max(layer for layer, _ in heads) <= 20
    with pytest.raises(ValueError, match="layers=all"):
        random_heads(0, 10, 2, 1, {(0, 0)})


def test_resolve_builds_each_methods_config():
    head_map = HeadMap.from_dict(json.loads(BENCH_HEADS.read_text()))
    args = {"head_map": head_map, "shape": SHAPE, "n_prompt": 1000, "answer_warmup": 9, "seed": 3}
    dysco = resolve(Method.parse("dysco:top_k_ratio=0.05"), **args).config
    assert dysco.qr_heads == head_map.to_config().qr_heads and dysco.top_k == 50 and dysco.intervention_warmup == 9
    assert resolve(Method.parse("static"), **args).config.dynamic is False
    rand = resolve(Method.parse("random"), **args).config
    assert len(rand.qr_heads) == len(dysco.qr_heads) and rand.l_max <= dysco.l_max
    assert resolve(Method.parse("attnts:factor=1.3"), **args).attn_scale == 1.3
    assert resolve(Method.parse("plain"), **args).config is None
    with pytest.raises(ValueError, match="--head-map"):
        resolve(Method.parse("dysco"), **{**args, "head_map": None})


def test_fast_method_is_dysco_in_fast_mode_and_compared_with_exact():
    head_map = HeadMap.from_dict(json.loads(BENCH_HEADS.read_text()))
    args = {"head_map": head_map, "shape": SHAPE, "n_prompt": 1000, "answer_warmup": 9, "seed": 3}
    fast = resolve(Method.parse("fast:strength=3"), **args).config
    exact = resolve(Method.parse("dysco:strength=3"), **args).config
    assert fast.mode == "fast" and exact.mode == "exact" and fast.replace(mode="exact") == exact
    assert Method("fast").with_tuned({"dysco": {"decay": 0.5}}).get("decay") == 0.5
    assert ("fast", "dysco") in comparisons(["plain", "dysco", "fast"])
    with pytest.raises(ValueError, match="mode"):
        Method.parse("dysco:mode=quick")


# ---- results file: resume after an interruption ----

class FakeRunner:
    """Records like the real runner's, without a model; can stop as if Ctrl-C was pressed."""

    def __init__(self, plan, interrupt_after=None):
        self.plan, self.calls, self.interrupt_after = plan, [], interrupt_after

    def case(self, item):
        return item

    def run(self, item, methods):
        for m in methods:
            if self.interrupt_after is not None and len(self.calls) == self.interrupt_after:
                raise KeyboardInterrupt
            self.calls.append((item.task, item.index, m.label))
            yield {"model": self.plan.model.name, "task": item.task, "split": self.plan.split, "length": item.length,
                   "index": item.index, "seed": item.seed, "method": m.label, "kind": m.kind, "score": 1.0,
                   "wall_s": 0.0, "prefill_s": 0.0, "n_generated": 1}


def fake_plan(tmp_path, **kw):
    return EvalPlan(Path("m.gguf"), ("passkey", "kv"), (1024,), "dev", 3, parse_methods("plain,dysco"),
                    tmp_path / "r.jsonl", **kw)


def test_resume_skips_finished_cases_and_interruptions_lose_nothing(tmp_path):
    plan = fake_plan(tmp_path)
    first = FakeRunner(plan, interrupt_after=5)
    with pytest.raises(KeyboardInterrupt):
        run_eval(plan, open_runner=lambda p: contextlib.nullcontext(first))
    assert len(read_records(plan.out)) == 5
    with open(plan.out, "a") as f:
        f.write('{"model": "m.gguf", "task": "pass')  # a write torn by a crash
    second = FakeRunner(plan)
    summary = run_eval(plan, open_runner=lambda p: contextlib.nullcontext(second))
    records = read_records(plan.out)
    assert summary.written == len(second.calls) == 7 and summary.remaining == 0
    assert not set(first.calls) & set(second.calls)
    assert len(records) == 12 == len({(r["task"], r["index"], r["method"]) for r in records})
    third = FakeRunner(plan)
    assert run_eval(plan, open_runner=lambda p: contextlib.nullcontext(third)).written == 0 and not third.calls


def test_shards_split_the_cases_of_one_plan_between_runs(tmp_path):
    (tmp_path / "whole").mkdir()
    whole = FakeRunner(fake_plan(tmp_path / "whole"))
    run_eval(whole.plan, open_runner=lambda p: contextlib.nullcontext(whole))
    parts = []
    for k in range(2):
        (tmp_path / str(k)).mkdir()
        runner = FakeRunner(fake_plan(tmp_path / str(k), shard=(k, 2)))
        run_eval(runner.plan, open_runner=lambda p: contextlib.nullcontext(runner))
        parts.append(set(runner.calls))
    assert not parts[0] & parts[1] and parts[0] | parts[1] == set(whole.calls)
    with pytest.raises(ValueError, match="--shard K/N needs 0 <= K < N, got 2/2"):
        fake_plan(tmp_path, shard=(2, 2))


def test_time_limit_stops_between_cases(tmp_path):
    plan = fake_plan(tmp_path, time_limit=1e-9)
    runner = FakeRunner(plan)
    summary = run_eval(plan, open_runner=lambda p: contextlib.nullcontext(runner))
    assert summary.written == 0 and summary.remaining == 12 and summary.stopped_for_time


# ---- intervals ----

def test_wilson_matches_known_values():
    assert wilson(8, 10) == pytest.approx((0.4902, 0.9433), abs=5e-5)
    assert wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=5e-5)
    assert wilson(50, 100) == pytest.approx((0.4038, 0.5962), abs=5e-5)


def test_bootstrap_matches_the_exact_resampling_distribution():
    values = [0.0, 0.25, 1.0, 1.0, 0.5]
    exact = sorted(np.mean(s) for s in itertools.product(values, repeat=len(values)))  # all 5^5 resamples
    want = np.percentile(exact, [2.5, 97.5])
    got = bootstrap_group_mean([values], n_boot=20000)
    assert got == pytest.approx(tuple(want), abs=0.03)


def test_estimate_picks_wilson_for_exact_match_and_bootstrap_otherwise():
    assert estimate([1.0, 0.0, 1.0], exact=True).how == "wilson"
    assert estimate([1.0, 0.0, 1.0], exact=False).how == "bootstrap"
    partial = estimate([1.0, 0.5, 0.0, 0.25], exact=False)
    assert partial.how == "bootstrap" and partial.low <= partial.mean <= partial.high
    with pytest.raises(ValueError, match="other than 0 or 1"):
        estimate([0.5], exact=True)


# ---- report ----

def synthetic_records():
    out = []
    for (method, kind), task, length, i in itertools.product(
            [("plain", "plain"), ("dysco", "dysco"), ("random", "random")], ["passkey", "mrcr"], [1024, 2048], range(10)):
        good = {"plain": 5, "dysco": 8, "random": 4}[method]
        value = float(i < good) if task == "passkey" else 0.05 * good
        out.append({"model": "m.gguf", "task": task, "split": "test", "length": length, "index": i,
                    "seed": case_seed(task, "test", length, i), "method": method, "kind": kind, "score": value,
                    "wall_s": 1.0, "prefill_s": 0.5, "n_generated": 4, "backend": {"n_gpu_layers": 0}})
    return out


def test_report_tables_and_plot(tmp_path):
    results = tmp_path / "res.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in synthetic_records()))
    md = write_report([results], tmp_path / "docs", command="dysco-edge eval ...").read_text()
    assert "| passkey | dysco | 0.80 [0.49, 0.94] | 0.80 [0.49, 0.94] |" in md  # Wilson 8/10
    assert "| mrcr | plain | 0.25 [0.25, 0.25] |" in md
    assert "| **all tasks** | dysco | 0.60 [" in md
    assert "| dysco − plain | +0.22 [" in md and "| dysco − random | +0.30 [" in md
    assert "1.00 s (0.50 prefill, 4 tok)" in md
    pytest.importorskip("matplotlib")
    assert (tmp_path / "docs" / "res-m-gguf-test.png").stat().st_size > 10_000


# ---- the real thing, small ----

@pytest.mark.slow
def test_prompt_lengths_with_the_real_tokenizers():
    from dysco_edge import Model
    from dysco_edge.eval.prompts import PromptRenderer
    for path, length in ((models.smollm2_q4_1(), 2048), (models.gemma3_270m(), 4096)):
        with Model(path, n_ctx=256, n_threads=1) as model:
            renderer = PromptRenderer(model)
            for task in TASKS:
                c = case(task, length=length, measure=renderer.count)
                rendered = renderer.render(c.draft.prompt, c.draft.stop)
                budget = length - c.draft.max_new_tokens
                unit = 320 if task == "passage" else 40
                assert len(rendered.ids) == c.n_tokens and budget - max(0.03 * budget, unit) <= c.n_tokens <= budget


@pytest.mark.slow
def test_eval_smoke_on_smollm2(tmp_path):
    out, docs = tmp_path / "smoke.jsonl", tmp_path / "docs"
    cmd = [sys.executable, "-m", "dysco_edge.cli", "eval", str(models.smollm2_q4_1()),
           "--tasks", "passkey," + ",".join(LONG_TASKS), "--lengths", "1536", "--n", "1", "--methods", "plain,dysco", "--head-map", str(BENCH_HEADS),
           "--threads", "2", "--out", str(out)]
    first = subprocess.run(cmd + ["--report", str(docs)], capture_output=True, text=True, timeout=300, check=False)
    assert first.returncode == 0, first.stderr
    records = read_records(out)
    assert len(records) == 8 and {r["method"] for r in records} == {"plain", "dysco"}
    assert {r["task"] for r in records} == {"passkey", *LONG_TASKS}
    assert all(0 <= r["score"] <= 1 and r["n_prompt"] + r["n_generated"] <= 1536 for r in records)
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert again.returncode == 0 and "0 results to compute" in again.stderr and len(read_records(out)) == 8
    assert "| passkey | plain |" in (docs / "smoke.md").read_text()
    assert (docs / "smoke-smollm2-135m-instruct-q4-1-gguf-dev.png").stat().st_size > 10_000
    report = subprocess.run([sys.executable, "-m", "dysco_edge.cli", "eval-report", str(out), "--out", str(docs),
                             "--name", "again", "--reproduce", "dysco-edge eval ..."],
                            capture_output=True, text=True, timeout=120, check=False)
    assert report.returncode == 0, report.stderr
    assert "dysco-edge eval ..." in (docs / "again.md").read_text()


@pytest.mark.slow
def test_attention_scaling_runs_on_its_own_cache_and_leaves_none_behind():
    from dysco_edge.eval.run import CaseRunner, model_runner, pending_work
    plan = EvalPlan(models.smollm2_q4_1(), ("passkey",), (384,), "dev", 1,
                    parse_methods("plain,attnts:factor=0.5"), Path("unused.jsonl"), n_threads=2)
    with model_runner(plan) as runner:
        assert isinstance(runner, CaseRunner)
        c = runner.case(pending_work(plan, set(), "")[0])
        plain, scaled = runner.run(c, plan.methods)
        assert runner.model._cache.reusable(runner.renderer.render(c.draft.prompt).ids, 10**6) == 0
        again = next(runner.run(c, plan.methods[:1]))
    assert scaled["settings"] == {"attn_scale": 0.5} and scaled["prediction"] != plain["prediction"]
    assert again["prediction"] == plain["prediction"]


def test_sweep_picks_the_best_dev_variants():
    import importlib.util
    spec = importlib.util.spec_from_file_location("eval_sweep", REPO / "bench" / "research" / "eval_sweep.py")
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    means = {"plain": 0.3, "dysco": 0.4, "dysco:strength=3": 0.5, "dysco:decay=0.5": 0.35,
             "attnts:factor=1.1": 0.45, "attnts:factor=1.2": 0.2}
    records = [{"method": label, "task": task, "length": 1024, "seed": i, "score": float(i < 10 * mean)}
               for label, mean in means.items() for task in ("kv", "vt") for i in range(10)]
    assert sweep.pick(records) == {"attnts": {"factor": 1.1}, "dysco": {"strength": 3}}
    assert sweep.best_knobs(records) == {"strength": 3.0}
    assert [m.label for m in sweep.stage_methods("combine", records)] == [
        "plain", "dysco", "dysco:strength=3", "static:strength=3", "random:strength=3"]
