// Importance, selection and bias as ggml ops in the decode graph (DYSCO_SPEC.md "State", "Procedure"
// 3.2-3.3), so that a step has no host round trip. Every op here runs on CPU, CUDA, Metal and Vulkan
// (docs/backends.md "DySCO graph ops"). State is per KV cell: the importance of the position a cell
// holds; cells no row attends fold to 0, so a cell reused after truncation starts from nothing.
#include "dysco-hooks.h"
#include "dysco-state.h"

#include "llama-graph.h"
#include "llama-kv-cache.h"

#include "ggml.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"

#include <cmath>

// A soft bias's "minus infinity" for the hard mask: 0 + it stays finite in F16 and F32 masks, and its
// softmax weight underflows to exactly 0 as -inf's does.
static const float DYSCO_HARD_OFF = -65504.0f;

// The plain KV cache of the graph being built, or null (iSWA and other memories track on the host).
static const llama_kv_cache_context * track_mctx(const llm_graph_context & g) {
    return dynamic_cast<const llama_kv_cache_context *>(g.mctx);
}

bool dysco_track_folds(const dysco_state & st) {
    return st.track.on && st.scoring();
}

bool dysco_track_selects(const dysco_state & st, const llm_graph_context & g) {
    const auto & tr = st.track;
    return tr.on && tr.armed && st.probe.layers == 0 && g.ubatch.n_tokens == 1 && track_mctx(g) != nullptr;
}

// Graph input: the cell each ubatch token is written to ([n_tokens] I64, as llama.cpp's k_idxs), and
// the template flag of the cells of template positions fed after the reset (a 4-byte upload each).
class dysco_input_track : public llm_graph_input_i {
public:
    dysco_input_track(dysco_state & st, const llama_kv_cache_context * mctx, ggml_tensor * cells) :
        st(st), mctx(mctx), cells(cells) {}

    void set_input(const llama_ubatch * ub) override {
        if (!cells->buffer) {
            return;
        }
        mctx->set_input_k_idxs(cells, ub);
        const auto & tr = st.track;
        const int64_t * idx = (const int64_t *) cells->data;
        for (uint32_t i = 0; tr.keep && i < ub->n_tokens; ++i) {
            const llama_pos p = ub->pos[i];
            if (p < (llama_pos) tr.template_mask.size() && tr.template_mask[p] && idx[i] < tr.keep->ne[0]) {
                const float zero = 0.0f;
                ggml_backend_tensor_set(tr.keep, &zero, idx[i] * sizeof(float), sizeof(float));
            }
        }
    }

    bool can_reuse(const llm_graph_params & params) override {
        mctx = static_cast<const llama_kv_cache_context *>(params.mctx);
        return cells->ne[0] == params.ubatch.n_tokens;
    }

private:
    dysco_state & st;
    const llama_kv_cache_context * mctx;
    ggml_tensor * cells; // [n_tokens] I64
};

// The per-cell tensors, in the buffer type holding most of the KV cache (the device of its layers).
bool dysco_track_alloc(dysco_state & st, const llama_kv_cache & kv) {
    auto & tr = st.track;
    const int64_t n_cells = kv.get_size();
    if (tr.imp && tr.kv == &kv && tr.imp->ne[0] == n_cells) {
        return true;
    }
    ggml_backend_buffer_type_t buft = nullptr;
    size_t most = 0;
    for (const auto & [type, size] : kv.memory_breakdown()) {
        if (!buft || size > most) {
            buft = type;
            most = size;
        }
    }
    tr.imp = tr.sel = tr.keep = nullptr;
    tr.buf.reset();
    ggml_init_params params = { 3 * ggml_tensor_overhead(), nullptr, true };
    tr.ctx.reset(ggml_init(params));
    tr.imp  = ggml_new_tensor_1d(tr.ctx.get(), GGML_TYPE_F32, n_cells); // [n_cells]
    tr.sel  = ggml_new_tensor_1d(tr.ctx.get(), GGML_TYPE_F32, n_cells); // [n_cells]
    tr.keep = ggml_new_tensor_1d(tr.ctx.get(), GGML_TYPE_F32, n_cells); // [n_cells]
    ggml_set_name(tr.imp, "dysco_importance");
    ggml_set_name(tr.sel, "dysco_selected");
    ggml_set_name(tr.keep, "dysco_not_template");
    tr.buf.reset(buft ? ggml_backend_alloc_ctx_tensors_from_buft(tr.ctx.get(), buft) : nullptr);
    if (!tr.buf) {
        tr.imp = tr.sel = tr.keep = nullptr;
        tr.kv  = nullptr;
        return false;
    }
    tr.kv = &kv;
    return true;
}

// Whether the graph being built indexes the cells the tensors were made for.
static bool track_ready(const dysco_state & st, const llama_kv_cache_context * mctx) {
    return mctx && st.track.imp && st.track.kv == mctx->get_kv_cache();
}

// The cells of the ubatch tokens, one input per graph build.
static ggml_tensor * track_cells(const llm_graph_context & g, dysco_state & st, const llama_kv_cache_context * mctx) {
    ggml_tensor *& cells = st.build[DYSCO_CACHE_BASE].cells;
    if (!cells) {
        cells = ggml_new_tensor_1d(g.ctx0, GGML_TYPE_I64, g.ubatch.n_tokens); // [n_tokens]
        ggml_set_input(cells);
        ggml_set_name(cells, "dysco_track_cells");
        ggml_build_forward_expand(g.gf, cells); // a fold-only graph uses it for the template flags alone
        g.res->add_input(std::make_unique<dysco_input_track>(st, mctx, cells));
    }
    return cells;
}

// [n_kv, 1] 1 on the cells of S (by the importance: the nucleus of mass top_p and/or the top_k
// largest; always the largest one), 0 elsewhere; also written to track.sel for the readback.
static ggml_tensor * track_select(const llm_graph_context & g, dysco_track & tr, int64_t n_kv) {
    ggml_context * ctx = g.ctx0;
    ggml_tensor * imp    = ggml_view_2d(ctx, tr.imp, n_kv, 1, n_kv * sizeof(float), 0);      // [n_kv, 1]
    ggml_tensor * order  = ggml_argsort(ctx, imp, GGML_SORT_ORDER_DESC);                      // [n_kv, 1] I32
    ggml_tensor * sorted = ggml_get_rows(ctx, ggml_reshape_2d(ctx, imp, 1, n_kv), order);     // [1, n_kv]
    sorted = ggml_reshape_2d(ctx, sorted, n_kv, 1);                                           // [n_kv, 1]
    ggml_tensor * keep = nullptr;                                                             // [n_kv, 1]
    if (tr.top_p > 0.0) {
        ggml_tensor * cum   = ggml_cumsum(ctx, sorted);                                       // [n_kv, 1]
        // cum <= top_p: 1 - step(cum - top_p) (step is x > 0, so a running sum equal to top_p fits)
        ggml_tensor * fits  = ggml_scale_bias(ctx, ggml_step(ctx, ggml_scale_bias(ctx, cum, 1.0f, -(float) tr.top_p)), -1.0f, 1.0f);
        // the largest is kept whatever its mass: the only rank whose running sum before it is 0
        ggml_tensor * first = ggml_scale_bias(ctx, ggml_step(ctx, ggml_sub(ctx, cum, sorted)), -1.0f, 1.0f);
        keep = ggml_step(ctx, ggml_add(ctx, fits, first));
    }
    if (tr.top_k > 0) {
        ggml_tensor * rank = ggml_arange(ctx, 0.0f, (float) n_kv, 1.0f);                     // [n_kv]
        ggml_tensor * in_k = ggml_step(ctx, ggml_scale_bias(ctx, rank, -1.0f, (float) tr.top_k - 0.5f));
        in_k = ggml_reshape_2d(ctx, in_k, n_kv, 1);
        keep = keep ? ggml_mul(ctx, keep, in_k) : in_k;
    }
    // back from rank order to cells: every cell is written once (order is a permutation)
    ggml_tensor * sel = ggml_view_2d(ctx, tr.sel, 1, n_kv, sizeof(float), 0);                // [1, n_kv]
    sel = ggml_set_rows(ctx, sel, ggml_reshape_2d(ctx, keep, 1, n_kv), order);               // [1, n_kv]
    ggml_set_name(sel, "dysco_sel");
    return ggml_reshape_2d(ctx, sel, n_kv, 1);                                                // [n_kv, 1]
}

ggml_tensor * dysco_track_bias(const llm_graph_context & g, dysco_state & st, ggml_tensor * kq_mask) {
    const llama_kv_cache_context * mctx = track_mctx(g);
    if (!dysco_track_selects(st, g) || kq_mask->ne[3] != 1 || !track_ready(st, mctx)) {
        return kq_mask;
    }
    ggml_tensor *& biased = st.build[DYSCO_CACHE_BASE].biased;
    if (biased) {
        return biased;
    }
    auto & tr = st.track;
    ggml_context * ctx  = g.ctx0;
    const int64_t  n_kv = kq_mask->ne[0];
    ggml_tensor * sel  = track_select(g, tr, n_kv);                                           // [n_kv, 1]
    ggml_tensor * cur  = track_cells(g, st, mctx);                                            // [1] I64
    ggml_tensor * one  = ggml_fill(ctx, ggml_view_2d(ctx, sel, 1, 1, sizeof(float), 0), 1.0f); // [1, 1]
    const bool hard = tr.strength >= tr.hard_strength;
    // the soft bias leaves template positions alone (the hard mask keeps them); a copy either way, as
    // track.sel keeps S itself for the readback
    sel = hard ? ggml_cont(ctx, sel) : ggml_mul(ctx, sel, ggml_view_2d(ctx, tr.keep, n_kv, 1, n_kv * sizeof(float), 0));
    // the current token always gets the bias of S
    sel = ggml_set_rows(ctx, ggml_reshape_2d(ctx, sel, 1, n_kv), one, cur);                   // [1, n_kv]
    sel = ggml_reshape_2d(ctx, sel, n_kv, 1);                                                 // [n_kv, 1]
    ggml_tensor * bias = hard ? ggml_scale_bias(ctx, sel, -DYSCO_HARD_OFF, DYSCO_HARD_OFF)
                              : ggml_scale(ctx, sel, (float) std::log(tr.strength));          // [n_kv, 1]
    if (kq_mask->type != GGML_TYPE_F32) {
        bias = ggml_cast(ctx, bias, kq_mask->type);
    }
    biased = ggml_add(ctx, kq_mask, bias);                                                    // [n_kv, 1, 1, 1]
    ggml_set_name(biased, "dysco_kq_mask_biased");
    // before any fold of this graph: the selection reads the importance the fold then overwrites
    ggml_build_forward_expand(g.gf, biased);
    return biased;
}

void dysco_track_fold(const llm_graph_context & g, dysco_state & st, ggml_tensor * acc, ggml_tensor * mask_row) {
    const llama_kv_cache_context * mctx = track_mctx(g);
    if (!dysco_track_folds(st) || !track_ready(st, mctx)) {
        return;
    }
    auto & tr = st.track;
    ggml_context * ctx  = g.ctx0;
    const int64_t  n_kv = acc->ne[0];
    track_cells(g, st, mctx); // template cells fed now are flagged
    ggml_tensor * imp   = ggml_view_2d(ctx, tr.imp, n_kv, 1, n_kv * sizeof(float), 0);      // [n_kv, 1]
    ggml_tensor * m     = mask_row->type == GGML_TYPE_F32 ? mask_row : ggml_cast(ctx, mask_row, GGML_TYPE_F32);
    ggml_tensor * seen  = ggml_step(ctx, ggml_scale_bias(ctx, m, 1.0f, 1.0f));               // [n_kv, 1] 1: attended
    ggml_tensor * a     = ggml_scale(ctx, acc, 1.0f / (float) st.heads.n);                    // [n_kv, 1] mean over heads
    ggml_tensor * next  = ggml_add(ctx, ggml_scale(ctx, ggml_mul(ctx, imp, seen), (float) tr.decay), a);
    next = ggml_div(ctx, next, ggml_sum(ctx, next));                                          // [n_kv, 1]
    ggml_tensor * store = ggml_cpy(ctx, next, imp);
    ggml_set_name(store, "dysco_importance_fold");
    ggml_build_forward_expand(g.gf, store);
}
