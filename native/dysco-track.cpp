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

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <utility>
#include <vector>

// A soft bias's "minus infinity" for the hard mask: 0 + it stays finite in F16 and F32 masks, and its
// softmax weight underflows to exactly 0 as -inf's does.
static const float DYSCO_HARD_OFF = -65504.0f;

// The plain KV cache of the graph being built, or null (iSWA and other memories track on the host).
static const llama_kv_cache_context * track_mctx(const llm_graph_context & g) {
    return dynamic_cast<const llama_kv_cache_context *>(g.mctx);
}

dysco_seq_track * dysco_track::find(int32_t seq) {
    const auto it = seqs.find(seq);
    return it == seqs.end() ? nullptr : &it->second;
}

const dysco_seq_track * dysco_track::find(int32_t seq) const {
    const auto it = seqs.find(seq);
    return it == seqs.end() ? nullptr : &it->second;
}

bool dysco_track::any_on() const {
    for (const auto & [seq, t] : seqs) {
        if (t.on) {
            return true;
        }
    }
    return false;
}

bool dysco_seq_folds(const dysco_state & st, const dysco_seq_track & t) {
    return t.on && st.heads.n > 0 && (st.scoring() || t.capture);
}

// The sequence whose tokens fill chunk c of the ubatch: on a cache of one stream, the last reset's
// (several sequences there share the stream: the tracked one is the only one scored, as before streams)
static int32_t chunk_seq(const dysco_state & st, const llama_ubatch & ub, uint32_t ns, uint32_t c) {
    if (!st.track.kv || st.track.kv->get_n_stream() == 1) {
        return st.track.seq_id;
    }
    const uint32_t i = c * (ub.n_tokens / ns);
    // a reserve's ubatch (graph_reserve) names no sequences: nothing is tracked there
    return ub.seq_id && ub.seq_id[i] ? ub.seq_id[i][0] : -1;
}

dysco_seq_track * dysco_track_chunk(dysco_state & st, const llama_ubatch & ub, uint32_t ns, uint32_t c) {
    return st.track.find(chunk_seq(st, ub, ns, c));
}

// Row (KV stream) of the per-cell tensors that chunk c's sequence owns.
static int64_t chunk_row(const dysco_state & st, const llama_ubatch & ub, uint32_t ns, uint32_t c) {
    return st.track.kv->get_stream(chunk_seq(st, ub, ns, c)); // a tracked chunk's: never -1
}

static bool seq_selects(const dysco_state & st, const dysco_seq_track * t, uint32_t n_seq_tokens) {
    return t && t->on && t->armed && st.probe.layers == 0 && n_seq_tokens == 1;
}

// Graph input: the cell each ubatch token is written to ([n_tokens] I64, within its stream), and the
// template flag of the cells of template positions fed after the reset (a 4-byte upload each).
class dysco_input_track : public llm_graph_input_i {
public:
    dysco_input_track(dysco_state & st, const llama_kv_cache_context * mctx, ggml_tensor * cells) :
        st(st), mctx(mctx), cells(cells) {}

    void set_input(const llama_ubatch * ub) override {
        if (!cells->buffer) {
            return;
        }
        mctx->set_input_k_idxs(cells, ub); // stream * kv_size + cell
        const auto & tr = st.track;
        const int64_t kv_size = tr.imp ? tr.imp->ne[0] : 1;
        int64_t * idx = (int64_t *) cells->data;
        for (uint32_t i = 0; tr.keep && i < ub->n_tokens; ++i) {
            const dysco_seq_track * t = tr.kv->get_n_stream() == 1 ? tr.find(tr.seq_id) : tr.find(ub->seq_id[i][0]);
            const llama_pos p = ub->pos[i];
            if (t && p < (llama_pos) t->template_mask.size() && t->template_mask[p] && idx[i] < ggml_nelements(tr.keep)) {
                const float zero = 0.0f;
                ggml_backend_tensor_set(tr.keep, &zero, idx[i] * sizeof(float), sizeof(float));
            }
            idx[i] %= kv_size;
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

// The per-cell tensors, [kv_size, n_stream], in the buffer type holding most of the KV cache (the
// device of its layers).
bool dysco_track_alloc(dysco_state & st, const llama_kv_cache & kv) {
    auto & tr = st.track;
    const int64_t n_cells = kv.get_size(), n_stream = kv.get_n_stream();
    if (tr.imp && tr.kv == &kv && tr.imp->ne[0] == n_cells && tr.imp->ne[1] == n_stream) {
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
    tr.imp  = ggml_new_tensor_2d(tr.ctx.get(), GGML_TYPE_F32, n_cells, n_stream);
    tr.sel  = ggml_new_tensor_2d(tr.ctx.get(), GGML_TYPE_F32, n_cells, n_stream);
    tr.keep = ggml_new_tensor_2d(tr.ctx.get(), GGML_TYPE_F32, n_cells, n_stream);
    ggml_set_name(tr.imp, "dysco_importance");
    ggml_set_name(tr.sel, "dysco_selected");
    ggml_set_name(tr.keep, "dysco_not_template");
    tr.buf.reset(buft ? ggml_backend_alloc_ctx_tensors_from_buft(tr.ctx.get(), buft) : nullptr);
    if (!tr.buf) {
        tr.imp = tr.sel = tr.keep = nullptr;
        tr.kv  = nullptr;
        return false;
    }
    ggml_backend_buffer_clear(tr.buf.get(), 0);
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

// [n_kv, n] view of rows row0 .. row0+n-1 (KV streams) of a per-cell tensor.
static ggml_tensor * track_rows(ggml_context * ctx, ggml_tensor * t, int64_t n_kv, int64_t row0, int64_t n) {
    return ggml_view_2d(ctx, t, n_kv, n, t->nb[1], row0 * t->nb[1]);
}

// [n_kv, n] 1 on the cells of S of each of the rows row0.. (streams) of one selection config (by their
// importance: the nucleus of mass top_p and/or the top_k largest; always the largest one), 0 elsewhere;
// also written to track.sel for the readback. Every op works row by row: n rows cost about what one does.
static ggml_tensor * track_select(const llm_graph_context & g, dysco_track & tr, const dysco_seq_track & t,
                                  int64_t n_kv, int64_t row0, int64_t n) {
    ggml_context * ctx = g.ctx0;
    ggml_tensor * imp = track_rows(ctx, tr.imp, n_kv, row0, n);                              // [n_kv, n]
    if (!ggml_is_contiguous(imp)) {
        imp = ggml_cont(ctx, imp); // argsort and reshape read contiguous rows
    }
    ggml_tensor * order = ggml_argsort(ctx, imp, GGML_SORT_ORDER_DESC);                       // [n_kv, n] I32
    // ranks past top_k are never kept: only the first n_rank are computed and written, the others are 0
    const int64_t n_rank = t.top_k > 0 ? std::min<int64_t>(t.top_k, n_kv) : n_kv;
    ggml_tensor * ranked = ggml_view_2d(ctx, order, n_rank, n, order->nb[1], 0);              // [n_rank, n] I32
    ggml_tensor * keep;                                                                       // [n_rank, n] 1: kept
    if (t.top_p > 0.0) {
        ggml_tensor * sorted = ggml_get_rows(ctx, ggml_reshape_3d(ctx, imp, 1, n_kv, n), ranked); // [1, n_rank, n]
        sorted = ggml_reshape_2d(ctx, sorted, n_rank, n);                                     // [n_rank, n]
        ggml_tensor * cum = ggml_cumsum(ctx, sorted);                                         // [n_rank, n]
        // kept: a running sum <= top_p (a sum equal to it fits), or the largest whatever its mass (the one
        // rank whose running sum is its own value): cum <= max(top_p, sorted); step is x > 0
        ggml_tensor * over = ggml_sub(ctx, cum, ggml_clamp(ctx, sorted, (float) t.top_p, FLT_MAX));
        keep = ggml_scale_bias(ctx, ggml_step(ctx, over), -1.0f, 1.0f);
    } else {
        // shaped on the ranks, whose values the fill does not read
        keep = ggml_fill(ctx, ggml_view_2d(ctx, imp, n_rank, n, imp->nb[1], 0), 1.0f);
    }
    // back from rank order to cells, each written once (order is a permutation); the cells of the ranks
    // past n_rank get zeros first (the whole rows: a fill writes contiguous memory only)
    ggml_tensor * sel = ggml_view_3d(ctx, tr.sel, 1, n_kv, n, sizeof(float), tr.sel->nb[1], row0 * tr.sel->nb[1]);
    if (n_rank < n_kv) {
        ggml_tensor * rows = ggml_fill_inplace(ctx, track_rows(ctx, tr.sel, tr.sel->ne[0], row0, n), 0.0f); // [kv_size, n]
        ggml_set_name(rows, ""); // not "dysco_selected (view)": dysco_name_nodes names it with the selection's layer
        sel = ggml_view_3d(ctx, rows, 1, n_kv, n, sizeof(float), rows->nb[1], 0);             // [1, n_kv, n]
    }
    sel = ggml_set_rows(ctx, sel, ggml_reshape_3d(ctx, keep, 1, n_rank, n), ranked);         // [1, n_kv, n]
    ggml_set_name(sel, "dysco_sel");
    return ggml_view_2d(ctx, sel, n_kv, n, sel->nb[2], 0);                                    // [n_kv, n]
}

// [n_kv, n] F32: the bias of the armed sequences of rows row0.. (streams), of one selection config;
// `cur` [1, n] I64 each one's token's cell.
static ggml_tensor * track_bias_rows(const llm_graph_context & g, dysco_track & tr, const dysco_seq_track & t,
                                     int64_t n_kv, int64_t row0, int64_t n, ggml_tensor * cur) {
    ggml_context * ctx = g.ctx0;
    ggml_tensor * sel = track_select(g, tr, t, n_kv, row0, n);                                // [n_kv, n]
    // shaped on n contiguous floats of sel, whose values the fill does not read
    ggml_tensor * one = ggml_fill(ctx, ggml_view_3d(ctx, sel, 1, 1, n, sizeof(float), sizeof(float), 0), 1.0f); // [1, 1, n]
    const bool hard = t.strength >= t.hard_strength;
    // the soft bias leaves template positions alone (the hard mask keeps them); a copy either way, as
    // track.sel keeps S itself for the readback
    sel = hard ? ggml_cont(ctx, sel) : ggml_mul(ctx, sel, track_rows(ctx, tr.keep, n_kv, row0, n));
    // the current token always gets the bias of S
    sel = ggml_set_rows(ctx, ggml_reshape_3d(ctx, sel, 1, n_kv, n), one, cur);               // [1, n_kv, n]
    sel = ggml_reshape_2d(ctx, sel, n_kv, n);                                                 // [n_kv, n]
    return hard ? ggml_scale_bias(ctx, sel, -DYSCO_HARD_OFF, DYSCO_HARD_OFF)
                : ggml_scale(ctx, sel, (float) std::log(t.strength));
}

// Chunks [c, c + n) of the ubatch run together when their sequences are tracked, on consecutive KV
// streams (rows of the per-cell tensors), and `same` as chunk c's; their ops then run once over n rows.
template <typename Same>
static uint32_t track_run(dysco_state & st, const llama_ubatch & ub, uint32_t ns, uint32_t c, Same same) {
    const dysco_seq_track * first = dysco_track_chunk(st, ub, ns, c);
    if (!first || !same(*first, *first)) {
        return 0;
    }
    const int64_t row0 = chunk_row(st, ub, ns, c);
    uint32_t n = 1;
    for (; c + n < ns; ++n) {
        const dysco_seq_track * t = dysco_track_chunk(st, ub, ns, c + n);
        if (!t || !same(*first, *t) || chunk_row(st, ub, ns, c + n) != row0 + n) {
            break;
        }
    }
    return n;
}

uint32_t dysco_track_fold_run(dysco_state & st, const llama_ubatch & ub, uint32_t ns, uint32_t c) {
    return track_run(st, ub, ns, c, [&](const dysco_seq_track & a, const dysco_seq_track & b) {
        return dysco_seq_folds(st, b) && a.decay == b.decay;
    });
}

static uint32_t track_select_run(dysco_state & st, const llama_ubatch & ub, uint32_t ns, uint32_t c) {
    const uint32_t nt = ub.n_tokens / ns;
    return track_run(st, ub, ns, c, [&](const dysco_seq_track & a, const dysco_seq_track & b) {
        return seq_selects(st, &b, nt) && a.top_p == b.top_p && a.top_k == b.top_k && a.strength == b.strength &&
               a.hard_strength == b.hard_strength;
    });
}

// The bias of every stream of the ubatch, [n_kv, 1, 1, ns]: the armed sequences' rows (a run of them
// with one selection config at a time), zeros elsewhere; null when no sequence of the ubatch selects.
static ggml_tensor * track_bias_streams(const llm_graph_context & g, dysco_state & st, const llama_kv_cache_context * mctx,
                                        int64_t n_kv, uint32_t ns) {
    std::vector<std::pair<uint32_t, uint32_t>> runs; // (first chunk, chunks) of each run that selects
    for (uint32_t c = 0; c < ns; ) {
        const uint32_t n = track_select_run(st, g.ubatch, ns, c);
        if (n > 0) {
            runs.emplace_back(c, n);
        }
        c += std::max(n, 1u);
    }
    if (runs.empty()) {
        return nullptr;
    }
    ggml_context * ctx = g.ctx0;
    ggml_tensor * bias = nullptr;                                                             // [n_kv, rows so far]
    const auto append = [&](ggml_tensor * rows) { bias = bias ? ggml_concat(ctx, bias, rows, 1) : rows; };
    // a plain chunk's row: zeros (the fill reads nothing of the rows it is shaped on)
    const auto zeros = [&](uint32_t n) {
        return ggml_fill(ctx, ggml_view_2d(ctx, st.track.sel, n_kv, n, n_kv * sizeof(float), 0), 0.0f); // [n_kv, n]
    };
    ggml_tensor * cells = track_cells(g, st, mctx);                                           // [n_tokens] I64 (one a chunk)
    uint32_t next = 0; // the first chunk not yet in `bias`
    for (const auto & [c, n] : runs) {
        if (c > next) {
            append(zeros(c - next));
        }
        ggml_tensor * cur = ggml_view_2d(ctx, cells, 1, n, cells->nb[0], c * cells->nb[0]);   // [1, n]
        append(track_bias_rows(g, st.track, *dysco_track_chunk(st, g.ubatch, ns, c), n_kv,
                               chunk_row(st, g.ubatch, ns, c), n, cur));                      // [n_kv, n]
        next = c + n;
    }
    if (next < ns) {
        append(zeros(ns - next));
    }
    return ggml_reshape_4d(ctx, bias, n_kv, 1, 1, ns);                                        // [n_kv, 1, 1, ns]
}

ggml_tensor * dysco_track_bias(const llm_graph_context & g, dysco_state & st, ggml_tensor * kq_mask) {
    const llama_kv_cache_context * mctx = track_mctx(g);
    if (!track_ready(st, mctx)) {
        return kq_mask;
    }
    ggml_tensor *& biased = st.build[DYSCO_CACHE_BASE].biased;
    if (biased) {
        return biased;
    }
    ggml_tensor * bias = track_bias_streams(g, st, mctx, kq_mask->ne[0], (uint32_t) kq_mask->ne[3]);
    if (!bias) {
        return kq_mask;
    }
    if (kq_mask->type != GGML_TYPE_F32) {
        bias = ggml_cast(g.ctx0, bias, kq_mask->type);
    }
    biased = ggml_add(g.ctx0, kq_mask, bias);                                                 // [n_kv, n_tokens/ns, 1, ns]
    ggml_set_name(biased, "dysco_kq_mask_biased");
    // before any fold of this graph: the selection reads the importance the fold then overwrites
    ggml_build_forward_expand(g.gf, biased);
    return biased;
}

// t itself when its rows lie one after another (what ggml_scale accepts), else a packed copy.
static ggml_tensor * track_packed(ggml_context * ctx, ggml_tensor * t) {
    const bool packed = t->nb[0] == ggml_type_size(t->type) && t->nb[2] == t->nb[1] * t->ne[1] &&
                        t->nb[3] == t->nb[2] * t->ne[2];
    return packed ? t : ggml_cont(ctx, t);
}

ggml_tensor * dysco_track_fold(const llm_graph_context & g, dysco_state & st, uint32_t ns, uint32_t c, uint32_t n,
                               ggml_tensor * acc, ggml_tensor * mask) {
    const llama_kv_cache_context * mctx = track_mctx(g);
    const dysco_seq_track * t = track_ready(st, mctx) ? dysco_track_chunk(st, g.ubatch, ns, c) : nullptr;
    if (!t || !dysco_seq_folds(st, *t)) {
        return nullptr;
    }
    ggml_context * ctx  = g.ctx0;
    const int64_t  n_kv = acc->ne[0];
    const int64_t  row0 = chunk_row(st, g.ubatch, ns, c);
    track_cells(g, st, mctx); // template cells fed now are flagged
    ggml_tensor * imp  = ggml_view_4d(ctx, st.track.imp, n_kv, 1, 1, n, st.track.imp->nb[1], st.track.imp->nb[1],
                                      st.track.imp->nb[1], row0 * st.track.imp->nb[1]);       // [n_kv, 1, 1, n]
    ggml_tensor * m    = mask->type == GGML_TYPE_F32 ? mask : ggml_cast(ctx, mask, GGML_TYPE_F32);
    // rows of a ubatch of several tokens a stream, or one head's view: ggml_scale takes rows packed
    m   = track_packed(ctx, m);
    acc = track_packed(ctx, acc);
    ggml_tensor * seen = ggml_step(ctx, ggml_scale_bias(ctx, m, 1.0f, 1.0f));                // [n_kv, 1, 1, n] 1: attended
    ggml_tensor * a    = ggml_scale(ctx, acc, 1.0f / (float) st.heads.n);                     // [n_kv, 1, 1, n] mean over heads
    ggml_tensor * next = ggml_add(ctx, ggml_scale(ctx, ggml_mul(ctx, imp, seen), (float) t->decay), a);
    // sum_rows, not sum: one reduction per row, the same whether one row or several run
    next = ggml_div(ctx, next, ggml_sum_rows(ctx, next));                                     // [n_kv, 1, 1, n]
    ggml_tensor * store = ggml_cpy(ctx, next, imp);
    ggml_set_name(store, "dysco_importance_fold");
    ggml_build_forward_expand(g.gf, store);
    return store;
}
