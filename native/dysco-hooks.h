// Hook points called from the patched llama.cpp sources (native/ggml-dysco/*.patch).
// Each hook is a no-op unless DySCO was enabled on the context through dysco.h.
#pragma once

#include <cstdint>

struct ggml_tensor;
struct llama_cparams;
struct llama_ubatch;
struct llm_graph_context;
struct llm_graph_result;
class  llama_kv_cache_context;
typedef struct ggml_backend_sched * ggml_backend_sched_t;

// Number of layers the graph being built runs: L_max+1 during a probe, else n_layer.
// Also marks the start of a graph build (resets the per-build score nodes).
int64_t dysco_graph_n_layer(const llama_cparams & cparams, int64_t n_layer);

// Called by the KV attention builders before the attention of layer il: adds the QR-head
// probabilities of the ubatch's last token to the score accumulator, and the all-heads
// capture nodes when heads are captured. Returns the KQ scale the attention should use
// (kq_scale times the context's logit scale). q: [n_embd_head, n_head, n_tokens]; k: cache view;
// kq_mask: the attention's mask input [n_kv, n_tokens, 1, n_stream].
// An armed full pass also gets its selection's bias added to kq_mask in the graph: kq_mask is then
// replaced by the biased mask for the attention that follows.
float dysco_graph_attn(const llm_graph_context & gctx, ggml_tensor * q, ggml_tensor * k, ggml_tensor *& kq_mask,
                       float kq_scale, int il, bool is_swa);

// Called right after llama.cpp filled a KV mask on the host: keeps the unbiased row of the
// scored token, then adds the per-position bias to the rows of the biased sequence.
void dysco_mask_apply(const llama_cparams & cparams, const llama_kv_cache_context * mctx,
                      ggml_tensor * kq_mask, const llama_ubatch * ubatch, bool is_swa);

// Called after each ubatch is computed: copies the score vector(s) and captured heads to the host.
void dysco_ubatch_done(const llama_cparams & cparams, const llm_graph_result * res, const llama_ubatch & ubatch,
                       ggml_backend_sched_t sched);

// Called from ~llama_context.
void dysco_context_free(llama_cparams & cparams);
