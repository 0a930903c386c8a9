"""Decode speed through the public API (Model.generate, defaults), plain vs fast vs exact DySCO.

decode tok/s = (tokens generated - 1) / (t(up to 129 new tokens) - t(1 new token)), warm calls of one
prompt (the prefix cache keeps its cells, so both calls prefill the same few tokens), methods
alternating within each round, medians over the rounds. Prints a Markdown table.

    python bench/speed/api_decode.py --ctx 1024 4096 --flash off on --rounds 3
"""
from __future__ import annotations

import argparse
import statistics
import time

from dysco_edge import Model

FACT = ("Record {i}: the courier from {city} delivered parcel {code} on day {day}, and the receipt was "
        "filed under shelf {shelf}. ")
CITIES = ("Lisbon", "Osaka", "Quito", "Tartu", "Perth", "Dakar", "Bergen", "Cusco")


def prompt_of(model: Model, n_tokens: int) -> str:
    """A document of about n_tokens tokens (chat-formatted) and a question about it."""
    facts, i = [], 0
    while True:
        facts.append(FACT.format(i=i, city=CITIES[i % len(CITIES)], code=1000 + 37 * i, day=i % 28 + 1,
                                 shelf=i % 11))
        i += 1
        # a copy task: the answer runs to max_new_tokens (SmolLM2 ends a listing early)
        text = "".join(facts) + "\nCopy the first 40 records exactly, one per line."
        if i % 2 == 0 and len(model.prompt_ids(text)[0]) >= n_tokens - 64:
            return text


def timed(model: Model, prompt: str, dysco, max_new: int) -> tuple[float, int]:
    start = time.perf_counter()
    out = model.generate(prompt, dysco=dysco, max_new_tokens=max_new)
    return time.perf_counter() - start, len(out.token_ids)


def decode_rate(model: Model, prompt: str, dysco) -> float:
    # the other method left another cached prefix (plain keeps n - 1 cells, DySCO n - Wc - Wi): a
    # call of this method first, so that both timed calls prefill the same tokens
    timed(model, prompt, dysco, 1)
    t1, _ = timed(model, prompt, dysco, 1)
    t129, n = timed(model, prompt, dysco, 129)
    # an answer that ends early still gives the rate of the tokens it decoded
    if n < 17:
        raise RuntimeError(f"the answer ended after {n} tokens: too few for a rate")
    return (n - 1) / (t129 - t1)


def run(ctx: int, flash: str, rounds: int, threads: int | None) -> dict[str, float]:
    with Model(n_ctx=ctx + 512, flash_attn=flash, n_threads=threads) as model:
        prompt = prompt_of(model, ctx)
        base = model.resolve_dysco("auto")
        methods = {"plain": None, "fast": base.replace(mode="fast"), "exact": base.replace(mode="exact")}
        for dysco in methods.values():  # warm: graphs, prefix cache
            timed(model, prompt, dysco, 2)
        rates: dict[str, list[float]] = {name: [] for name in methods}
        for _ in range(rounds):
            for name, dysco in methods.items():
                rates[name].append(decode_rate(model, prompt, dysco))
        return {name: statistics.median(v) for name, v in rates.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ctx", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--flash", nargs="+", default=["off", "on"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    print("| context | FA | plain tok/s | fast tok/s | fast / plain | exact tok/s | exact / plain |")
    print("|---|---|---|---|---|---|---|")
    for ctx in args.ctx:
        for flash in args.flash:
            r = run(ctx, flash, args.rounds, args.threads)
            print(f"| {ctx} | {flash} | {r['plain']:.1f} | {r['fast']:.1f} | {r['fast'] / r['plain']:.3f}x | "
                  f"{r['exact']:.1f} | {r['exact'] / r['plain']:.3f}x |", flush=True)


if __name__ == "__main__":
    main()
