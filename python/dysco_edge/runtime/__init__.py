"""The only code that touches llama.cpp: the engine (model, context, tokens, KV cache, sampler),
the DySCO C API (native.py), and the decode loop with its bookkeeping strategies."""
