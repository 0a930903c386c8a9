// Graph side of DySCO: the probe's layer cap and the QR-head score nodes.
#include "dysco-hooks.h"
#include "dysco-state.h"

#include "llama-graph.h"

#include "ggml.h"
#include "ggml-backend.h"

#include <algorithm>
#include <vector>

static const char * const DYSCO_SCORE_NAME[DYSCO_CACHE_KINDS] = { "dysco_scores_base", "dysco_scores_swa" };
static const char * const DYSCO_MASK_NAME[DYSCO_CACHE_KINDS]  = { "dysco_score_mask_base", "dysco_score_mask_swa" };
static const char * const DYSCO_HEAD_MASK_NAME[DYSCO_CACHE_KINDS] = { "dysco_head_mask_base", "dysco_head_mask_swa" };

const char * dysco_score_name(int kind) {
    return DYSCO_SCORE_NAME[kind];
}

// Graph input: unbiased KQ-mask rows kept on the host by dysco_mask_apply (the scored token's
// row, or the head-captured tokens' rows).
class dysco_input_mask_rows : public llm_graph_input_i {
public:
    dysco_input_mask_rows(const std::vector<float> & rows, ggml_tensor * mask, bool reusable) :
        rows(rows), mask(mask), reusable(reusable) {}

    void set_input(const llama_ubatch * ubatch) override {
        GGML_UNUSED(ubatch);
        GGML_ASSERT((int64_t) rows.size() == ggml_nelements(mask));
        ggml_backend_tensor_set(mask, rows.data(), 0, ggml_nbytes(mask));
    }

    bool can_reuse(const llm_graph_params & params) override {
        GGML_UNUSED(params);
        return reusable;
    }

private:
    const std::vector<float> & rows;
    ggml_tensor * mask;     // [n_kv, n_rows]
    const bool    reusable;
};

// Creates the mask input once per graph build; later layers share it.
static ggml_tensor * dysco_mask_input(const llm_graph_context & g, ggml_tensor * & slot, const std::vector<float> & rows,
                                      int64_t n_kv, int64_t n_rows, const char * name, bool reusable) {
    if (!slot) {
        slot = ggml_new_tensor_2d(g.ctx0, GGML_TYPE_F32, n_kv, n_rows);
        ggml_set_input(slot);
        ggml_set_name(slot, name);
        g.res->add_input(std::make_unique<dysco_input_mask_rows>(rows, slot, reusable));
    }
    return slot;
}

int64_t dysco_graph_n_layer(const llama_cparams & cparams, int64_t n_layer) {
    dysco_state * st = cparams.dysco;
    if (!st) {
        return n_layer;
    }
    for (auto & nodes : st->build) {
        nodes = dysco_build_nodes();
    }
    return st->probe.layers > 0 ? std::min<int64_t>(n_layer, st->probe.layers) : n_layer;
}

// The model's attention logit soft-cap, cap * tanh(scale * kq / cap), as flash attention applies it. The
// scale is folded in, so kq_scale becomes 1 for the softmax that follows.
static ggml_tensor * dysco_kq_softcap(const llm_graph_context & g, ggml_tensor * kq, float & kq_scale) {
    if (!g.hparams.attn_soft_cap) {
        return kq;
    }
    const float cap = g.hparams.f_attn_logit_softcapping;
    kq = ggml_scale(g.ctx0, ggml_tanh(g.ctx0, ggml_scale(g.ctx0, kq, kq_scale / cap)), cap);
    kq_scale = 1.0f;
    return kq;
}

// A quantized K cache view [d, n_head_kv, n_kv] (contiguous) as F32, for the score mat-muls that read it
// permuted: Vulkan multiplies a quantized src0 only when contiguous (the view would run on the CPU, K
// copied to the host every step). Dequantize the whole view, never a strided part of it: Vulkan's copy
// from a quantized type reads its source as contiguous (docs/backends.md). F16/F32 K is read as it is.
static ggml_tensor * dysco_k_dequant(const llm_graph_context & g, ggml_tensor * k) {
    return ggml_is_quantized(k->type) ? ggml_cast(g.ctx0, k, GGML_TYPE_F32) : k;
}

// softmax(scale * k.q + mask) of one token per KV stream for the query heads of KV heads
// [kv_first, kv_first + n_groups): q_tok [d, n_head, ns], k [d, n_head_kv, n_kv, ns], mask [n_kv, 1, 1, ns];
// [n_kv, 1, n_groups * n_gqa, ns], query heads in order. One mat-mul and one softmax per layer for all
// its QR heads and streams: a batch of rows costs hardly more than one row.
static ggml_tensor * dysco_range_probs(const llm_graph_context & g, ggml_tensor * q_tok, ggml_tensor * k,
                                       ggml_tensor * mask, int64_t kv_first, int64_t n_groups, float kq_scale) {
    const int64_t n_gqa = q_tok->ne[1] / k->ne[1];
    const int64_t ns    = q_tok->ne[2];
    ggml_tensor * q_r = ggml_view_4d(g.ctx0, q_tok, q_tok->ne[0], n_gqa, n_groups, ns, q_tok->nb[1], n_gqa * q_tok->nb[1],
                                     q_tok->nb[2], kv_first * n_gqa * q_tok->nb[1]);          // [d, n_gqa, n_groups, ns]
    k = dysco_k_dequant(g, k);
    ggml_tensor * k_r = ggml_view_4d(g.ctx0, k, k->ne[0], n_groups, k->ne[2], ns, k->nb[1], k->nb[2], k->nb[3],
                                     kv_first * k->nb[1]);                                    // [d, n_groups, n_kv, ns]
    ggml_tensor * kq  = ggml_mul_mat(g.ctx0, ggml_permute(g.ctx0, k_r, 0, 2, 1, 3), q_r);   // [n_kv, n_gqa, n_groups, ns]
    ggml_prec_set_acc(kq, GGML_PREC_F32);
    ggml_set_name(kq, "dysco_kq_range");
    kq = dysco_kq_softcap(g, kq, kq_scale);
    // one row per query head, so that each stream's single mask row broadcasts over them
    kq = ggml_reshape_4d(g.ctx0, kq, kq->ne[0], 1, n_gqa * n_groups, ns);                    // [n_kv, 1, n_gqa * n_groups, ns]
    ggml_tensor * probs = ggml_soft_max_ext(g.ctx0, kq, mask, kq_scale, 0.0f);               // [n_kv, 1, n_gqa * n_groups, ns]
    ggml_set_name(probs, "dysco_probs_range");
    return probs;
}

static ggml_tensor * dysco_acc_add(const llm_graph_context & g, ggml_tensor * acc, ggml_tensor * probs) {
    if (!acc) {
        return probs;
    }
    ggml_set_name(acc, "dysco_scores_partial");
    acc->flags &= ~GGML_TENSOR_FLAG_OUTPUT;
    return ggml_add(g.ctx0, acc, probs);
}

// The unbiased mask row of the scored token. A probe (never biased) reads the attention's own KQ
// mask; a capture pass, which a bias may share, gets a copy taken before the bias: [n_kv, 1]
static ggml_tensor * dysco_score_mask(const llm_graph_context & g, dysco_state * st, ggml_tensor * kq_mask,
                                      int64_t n_kv, int kind) {
    if (st->scores_read_kq_mask(kq_mask)) {
        // the host keeps no row copy then (dysco_mask_apply asks the same question): no fallback here
        GGML_ASSERT(kq_mask->ne[0] == n_kv);
        // the host maps the row's cells to positions after the graph ran (dysco_ubatch_done): on a CPU
        // the allocator would otherwise give the mask's memory to later nodes of the same graph
        ggml_set_output(kq_mask);
        // a view of a host input is one more upload per view: the one-token mask itself is the row, and
        // a longer ubatch shares one view between the layers
        if (kq_mask->ne[1] == 1) {
            return kq_mask;
        }
        ggml_tensor *& row = st->build[kind].mask;
        if (!row) {
            row = ggml_view_2d(g.ctx0, kq_mask, n_kv, 1, kq_mask->nb[1], (kq_mask->ne[1] - 1) * kq_mask->nb[1]); // [n_kv, 1]
        }
        return row;
    }
    // the attention input beside it already refuses reuse when n_kv changes
    return dysco_mask_input(g, st->build[kind].mask, st->scores.row[kind].mask, n_kv, 1, DYSCO_MASK_NAME[kind], true);
}

// Adds layer il's QR-head probabilities of one token per KV stream (q_tok [d, n_head, ns]) over
// k [d, n_head_kv, n_kv, ns] under `mask` [n_kv, 1, 1, ns] to `acc` [n_kv, 1, 1, ns].
static void dysco_qr_layer_acc(const llm_graph_context & g, const dysco_state * st, ggml_tensor * q_tok, ggml_tensor * k,
                               ggml_tensor * mask, float kq_scale, int il, ggml_tensor *& acc) {
    const auto & heads = st->heads.by_layer[il];
    const int64_t n_kv  = k->ne[2];
    const int64_t n_gqa = q_tok->ne[1] / k->ne[1];
    // the KV heads from the first to the last one a QR head of this layer reads
    const auto [lo, hi] = std::minmax_element(heads.begin(), heads.end());
    const int64_t kv_first = *lo / n_gqa;
    const int64_t n_groups = *hi / n_gqa - kv_first + 1;
    ggml_tensor * probs = dysco_range_probs(g, q_tok, k, mask, kv_first, n_groups, kq_scale); // [n_kv, 1, n_groups * n_gqa, ns]
    std::vector<ggml_tensor *> rows;
    for (int head : heads) {
        const size_t offs = (head - kv_first * n_gqa) * probs->nb[2];
        rows.push_back(ggml_view_4d(g.ctx0, probs, n_kv, 1, 1, probs->ne[3], probs->nb[1], probs->nb[2], probs->nb[3],
                                    offs));                                                   // [n_kv, 1, 1, ns]
        // the views go in the graph before the adds, which then follow one another: CUDA runs such a
        // chain as one kernel, adding in the same order
        ggml_build_forward_expand(g.gf, rows.back());
    }
    for (ggml_tensor * row : rows) { // in the map's order: the sum's rounding depends on it
        acc = dysco_acc_add(g, acc, row);
    }
}

// The fold of stream chunks c .. c+n-1 (dysco_track_fold), its nodes named after layer il, so that the
// placement log and `devices --check` see them, one stream or several.
static void dysco_graph_fold(const llm_graph_context & g, dysco_state * st, uint32_t ns, uint32_t c, uint32_t n,
                             ggml_tensor * acc, ggml_tensor * mask, int il) {
    if (ggml_tensor * fold = dysco_track_fold(g, *st, ns, c, n, acc, mask)) {
        dysco_name_nodes(fold, "fold", il, st->build[DYSCO_CACHE_BASE].inputs);
    }
}

static bool dysco_layer_scored(const dysco_state * st, int il) {
    return il < (int) st->heads.by_layer.size() && !st->heads.by_layer[il].empty();
}

// Scores of a ubatch on one KV stream: its last token's, read back by the host when it scores
// (dysco_get_scores), folded into the importance of the tracked sequence when that one folds.
static void dysco_graph_qr_scores(const llm_graph_context & g, dysco_state * st, ggml_tensor * q, ggml_tensor * k,
                                  ggml_tensor * kq_mask, float kq_scale, int il, int kind) {
    const dysco_seq_track * t = kind == DYSCO_CACHE_BASE ? dysco_track_chunk(*st, g.ubatch, 1, 0) : nullptr;
    const bool folds = t && dysco_seq_folds(*st, *t) && st->bias.by_seq.empty();
    if (!(st->scoring() || folds) || !dysco_layer_scored(st, il)) {
        return;
    }
    const int64_t n_kv = k->ne[2];
    ggml_tensor * mask = dysco_score_mask(g, st, kq_mask, n_kv, kind);
    // the last token of the ubatch, the one scored: [d, n_head]
    ggml_tensor * q_tok = ggml_view_2d(g.ctx0, q, q->ne[0], q->ne[1], q->nb[1], (q->ne[2] - 1) * q->nb[2]);
    auto & acc = st->build[kind].acc;
    dysco_qr_layer_acc(g, st, q_tok, k, mask, kq_scale, il, acc);
    ggml_set_name(acc, DYSCO_SCORE_NAME[kind]);
    ggml_set_output(acc);
    ggml_build_forward_expand(g.gf, acc);
    dysco_name_nodes(acc, "score", il, st->build[DYSCO_CACHE_BASE].inputs);
    if (il == st->heads.l_max && kind == DYSCO_CACHE_BASE) {
        dysco_graph_fold(g, st, 1, 0, 1, acc, mask, il);
    }
}

// A ubatch over several KV streams (a sequence each): every folding sequence's last token is scored
// on its own stream and folded into its own importance row, a run of sequences folding together
// (dysco_track_fold_run) in one set of ops. The host reads none of these scores. The bias is added to
// a copy of the mask, so kq_mask is unbiased.
static void dysco_graph_stream_scores(const llm_graph_context & g, dysco_state * st, ggml_tensor * q, ggml_tensor * k,
                                      ggml_tensor * kq_mask, float kq_scale, int il) {
    if (!dysco_layer_scored(st, il) || il > st->heads.l_max || !st->bias.by_seq.empty()) {
        return;
    }
    const uint32_t ns = (uint32_t) k->ne[3], nt = g.ubatch.n_tokens / ns;
    auto & accs  = st->build[DYSCO_CACHE_BASE].stream_acc;
    auto & masks = st->build[DYSCO_CACHE_BASE].stream_mask;
    accs.resize(ns, nullptr);
    masks.resize(ns, nullptr);
    for (uint32_t c = 0; c < ns; ) {
        // several tokens a stream: the scored rows of the mask are not packed (softmax wants them so): one at a time
        const uint32_t n = std::min(dysco_track_fold_run(*st, g.ubatch, ns, c), nt == 1 ? ns : 1u);
        if (n == 0) {
            ++c;
            continue;
        }
        const uint32_t last = c * nt + nt - 1; // of chunk c; then every nt-th token
        ggml_tensor * q_tok = ggml_view_3d(g.ctx0, q, q->ne[0], q->ne[1], n, q->nb[1], nt * q->nb[2],
                                           last * q->nb[2]);                                  // [d, n_head, n]
        ggml_tensor * k_c   = ggml_view_4d(g.ctx0, k, k->ne[0], k->ne[1], k->ne[2], n, k->nb[1], k->nb[2], k->nb[3],
                                           c * k->nb[3]);                                     // [d, n_head_kv, n_kv, n]
        // a view of the host's mask is one more upload: the layers share one (the runs are the same in every layer)
        ggml_tensor *& mask = masks[c];
        if (!mask) {
            mask = ggml_view_4d(g.ctx0, kq_mask, kq_mask->ne[0], 1, 1, n, kq_mask->nb[1], kq_mask->nb[2],
                                kq_mask->nb[3], c * kq_mask->nb[3] + (nt - 1) * kq_mask->nb[1]);   // [n_kv, 1, 1, n]
        }
        dysco_qr_layer_acc(g, st, q_tok, k_c, mask, kq_scale, il, accs[c]);
        dysco_name_nodes(accs[c], "score", il, st->build[DYSCO_CACHE_BASE].inputs);
        if (il == st->heads.l_max) {
            dysco_graph_fold(g, st, ns, c, n, accs[c], mask, il);
        }
        c += n;
    }
}

// Every query head's attention of the captured rows, summed over the rows: [1, n_kv, n_head].
static void dysco_graph_capture_heads(const llm_graph_context & g, dysco_state * st, ggml_tensor * q, ggml_tensor * k,
                                      float kq_scale, int il, int kind) {
    const auto & cap = st->heads_cap;
    uint32_t i0 = 0, n_sel = 0;
    if (!cap.on || il >= cap.layer_end) {
        return;
    }
    cap.select(g.ubatch, i0, n_sel);
    if (n_sel == 0) {
        return;
    }
    // which rows are captured depends on the ubatch's positions: rebuilt every time (detection only)
    ggml_tensor * mask  = dysco_mask_input(g, st->build[kind].head_mask, cap.rows[kind].mask, k->ne[2], n_sel,
                                           DYSCO_HEAD_MASK_NAME[kind], false);
    ggml_tensor * q_sel = ggml_view_3d(g.ctx0, q, q->ne[0], q->ne[1], n_sel, q->nb[1], q->nb[2], i0 * q->nb[2]); // [d, n_head, n_sel]
    ggml_tensor * kq    = ggml_mul_mat(g.ctx0, ggml_permute(g.ctx0, dysco_k_dequant(g, k), 0, 2, 1, 3),
                                       ggml_permute(g.ctx0, q_sel, 0, 2, 1, 3)); // [n_kv, n_sel, n_head]
    ggml_prec_set_acc(kq, GGML_PREC_F32);
    kq = dysco_kq_softcap(g, kq, kq_scale);
    ggml_tensor * probs  = ggml_soft_max_ext(g.ctx0, kq, mask, kq_scale, 0.0f);               // [n_kv, n_sel, n_head]
    ggml_tensor * by_row = ggml_cont(g.ctx0, ggml_permute(g.ctx0, probs, 1, 0, 2, 3));       // [n_sel, n_kv, n_head]
    ggml_tensor * sum    = ggml_sum_rows(g.ctx0, by_row);                                     // [1, n_kv, n_head]
    ggml_format_name(sum, "dysco_heads_l%d", il);
    ggml_set_output(sum);
    ggml_build_forward_expand(g.gf, sum);
    dysco_name_nodes(sum, "capture", il, st->build[DYSCO_CACHE_BASE].inputs);
}

float dysco_graph_attn(const llm_graph_context & g, ggml_tensor * q, ggml_tensor * k, ggml_tensor *& kq_mask, float kq_scale,
                       int il, bool is_swa) {
    dysco_state * st = g.cparams.dysco;
    if (!st) {
        return kq_scale;
    }
    kq_scale *= st->attn_scale;
    // the names of the nodes DySCO adds stop at these (dysco_name_nodes)
    st->build[DYSCO_CACHE_BASE].inputs.insert(st->build[DYSCO_CACHE_BASE].inputs.end(), { q, k, kq_mask });
    // the bias first: its selection must read the importance before this graph's fold writes it
    ggml_tensor * biased = is_swa ? kq_mask : dysco_track_bias(g, *st, kq_mask);
    if (biased != kq_mask) {
        dysco_name_nodes(biased, "select", il, st->build[DYSCO_CACHE_BASE].inputs);
    }
    // one KV stream: the host may read the scores; several (a parallel context's sequences, each with
    // a stream of its own): each folding sequence is scored on its stream, for its importance only
    if (k->ne[3] == 1) {
        const int kind = is_swa ? DYSCO_CACHE_SWA : DYSCO_CACHE_BASE;
        dysco_graph_qr_scores(g, st, q, k, kq_mask, kq_scale, il, kind);
        dysco_graph_capture_heads(g, st, q, k, kq_scale, il, kind);
    } else if (!is_swa) {
        dysco_graph_stream_scores(g, st, q, k, kq_mask, kq_scale, il);
    }
    kq_mask = biased;
    return kq_scale;
}

void dysco_head_capture::select(const llama_ubatch & ub, uint32_t & i0, uint32_t & n) const {
    i0 = 0;
    n  = 0;
    for (uint32_t i = 0; i < ub.n_tokens; ++i) {
        if (ub.pos[i] < pos_begin || ub.pos[i] >= pos_end) {
            continue;
        }
        if (n > 0 && i != i0 + n) {
            n = 0; // not contiguous in the ubatch (several sequences): capture nothing
            return;
        }
        i0 = n == 0 ? i : i0;
        ++n;
    }
}
