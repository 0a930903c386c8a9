"""Replays the first intervention step of each golden case on transformers (F32, eager) under
several guesses of how the reference harness fed the model, and prints the Jaccard overlap of
the selected set with the reference's (the table in bench/RESULTS.md, "Golden conformance").

    DYSCO_EDGE_LIB_DIR=... PYTHONPATH=python:tests python bench/verify/golden_replay_hf.py [full]

`full` runs whole cases (slow: every step recomputes the prompt without a KV cache).
"""
import json, math, sys
from pathlib import Path
import numpy as np, torch
ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / 'python'), str(ROOT / 'tests')]
import oracle, models
G = json.load(open(ROOT.parent / 'shared' / 'golden' / 'smollm2_reference.json'))['cases']
model = oracle.load_hf(models.smollm2_f32())
NEG = torch.finfo(torch.float32).min

def fwd(x, keep, renumber, biases, heads):
    n = len(x)
    keep_t = torch.tensor(list(keep) + [True] * (n - len(keep)))
    m = torch.zeros((n, n))
    causal = torch.ones((n, n), dtype=torch.bool).tril()
    allowed = causal & keep_t.view(1, n)
    m.masked_fill_(~allowed, NEG)
    for r, b in biases.items():
        m[r, :r + 1] += torch.tensor(b, dtype=torch.float32)
    if renumber == 'hf':
        pos = torch.tensor(HFPOS[:n])
    elif renumber:
        pos = torch.cumsum(keep_t.long(), 0) - 1
        pos = pos.masked_fill(~keep_t, 1)
    else:
        pos = torch.arange(n)
    store = {}
    with torch.no_grad(), oracle._capture_last_row(model, {l for l, _ in heads}, store):
        out = model(input_ids=torch.tensor([x]), attention_mask=m.view(1, 1, n, n), position_ids=pos.view(1, n), use_cache=False,
                    logits_to_keep=1)
    a = np.mean([store[l][h].numpy() for l, h in heads], axis=0)
    return a, out.logits[0, -1].double().numpy()

def run(case, pad=None, renumber=True, full_mask=False, update='spec', tmpl_prefix=True, maxsteps=None):
    cfg = case['config']; heads = [tuple(h) for h in case['qr_heads']]
    x = list(case['prompt_ids']); n = len(x); wc, wi = cfg['context_warmup'], cfg['intervention_warmup']
    T = wc + wi; npre = n - T
    global HFPOS
    lim = n if full_mask else npre
    keep = [not (pad is not None and i < lim and x[i] == pad) for i in range(n)]
    M = np.array([0 if (pad is not None and t == pad) else 1 for t in x])
    c = np.cumsum(M) - 1; c[M == 0] = 1
    HFPOS = list(c[T:]) + [int(M.sum()) + t - 1 for t in range(1, 200)]
    scope = npre if tmpl_prefix else n
    template = set()
    for seq in cfg['template_sequences']:
        for i in range(scope - len(seq) + 1):
            if x[i:i + len(seq)] == seq: template.update(range(i, i + len(seq)))
    d = cfg['decay']
    def upd(I, a):
        a = a.copy()
        if update == 'spec':
            a[:len(I)] += d * I; return a / a.sum()
        a = a * (1 - d); a[:len(I)] += d * I; return a
    I = np.zeros(npre); biases = {}; steps = []; gen = []
    for q in range(npre, n - wi - 1):
        a, _ = fwd(x[:q + 1], keep[:q + 1], renumber, {}, heads); I = upd(I, a)
    q = n - wi - 1
    while True:
        a, _ = fwd(x[:q + 1], keep[:q + 1], renumber, {k: v for k, v in biases.items()}, heads)
        # probe row q unbiased
        I = upd(I, a)
        Inorm = I / I.sum()
        order = sorted(range(len(I)), key=lambda j: (-I[j], j))
        if cfg['top_p'] is None:
            S = order[:min(cfg['top_k'], len(order))]
        else:
            cs = np.cumsum(Inorm[order]); nuc = [j for j, c in zip(order, cs) if c <= cfg['top_p']] or [order[0]]
            if order[0] not in nuc: nuc = [order[0]] + nuc
            S = nuc
        if cfg['top_k'] is not None and len(S) > cfg['top_k']: S = order[:cfg['top_k']]
        steps.append((q, set(S)))
        b = np.zeros(q + 1)
        for j in set(S) - template: b[j] = math.log(cfg['strength'])
        b[q] = math.log(cfg['strength']); biases[q] = b
        if maxsteps and len(steps) >= maxsteps: return gen, steps
        if q >= n - 1:
            _, lg = fwd(x[:q + 1], keep + [True] * (q + 1 - len(keep)), renumber, biases, heads)
            gen.append(int(np.argmax(lg)))
            if len(gen) == case['max_new_tokens'] or gen[-1] == 2: return gen, steps
            x.append(gen[-1])
        q += 1

def score(case, gen, steps):
    ref = {s['pos']: set(s['selected']) for s in case['intervention_steps']}
    js = [len(S & ref[q]) / len(S | ref[q]) for q, S in steps if q in ref]
    return gen == case['generated'], (np.mean(js) if js else float('nan')), (min(js) if js else float('nan')), [(len(S), len(ref.get(q, ()))) for q, S in steps[:3]]

if __name__ == '__main__':
    full = len(sys.argv) > 1 and sys.argv[1] == 'full'
    variants = [dict(pad=1, renumber='hf', full_mask=True, update='spec'), dict(pad=1, renumber='hf', full_mask=True, update='mom')] + [dict(pad=None, update='spec'), dict(pad=1, renumber=True, update='spec'), dict(pad=1, renumber=False, update='spec'),
                dict(pad=None, update='mom'), dict(pad=1, renumber=True, update='mom'), dict(pad=1, renumber=False, update='mom')]
    for v in variants:
        res = []
        for c in G:
            gen, steps = run(c, maxsteps=None if full else 1, **v)
            res.append(score(c, gen, steps))
        print(v, [(r[0], round(r[1], 3), round(r[2], 3), r[3]) for r in res], flush=True)
