// Host side of DySCO: the bias added to llama.cpp's KQ mask, and the score readout.
#include "dysco-hooks.h"
#include "dysco-state.h"

#include "llama-batch.h"
#include "llama-cparams.h"
#include "llama-graph.h"
#include "llama-kv-cache.h"
#include "llama-model.h"

#include "ggml.h"
#include "ggml-backend.h"

#include <cfloat>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <string>
#include <type_traits>


template <typename T> static float mask_get(const T * row, int64_t j);
template <> float mask_get(const float * row, int64_t j)       { return row[j]; }
template <> float mask_get(const ggml_fp16_t * row, int64_t j) { return ggml_fp16_to_fp32(row[j]); }

template <typename T> static void mask_set(T * row, int64_t j, float v);
template <> void mask_set(float * row, int64_t j, float v)       { row[j] = v; }
template <> void mask_set(ggml_fp16_t * row, int64_t j, float v) { row[j] = ggml_fp32_to_fp16(v); }

// A hidden cell's mask value: the type's lowest finite number, as transformers masks padding, so
// that a row hiding every cell it could attend gets uniform weights instead of NaN.
template <typename T> static float mask_hidden();
template <> float mask_hidden<float>()       { return -FLT_MAX; }
template <> float mask_hidden<ggml_fp16_t>() { return -65504.0f; }

// Adds a bias to attended mask values. Those are almost always 0, where 0 + b is b: an F16 row then
// converts each distinct b once instead of converting every value both ways (same bits).
template <typename T> struct mask_adder;
template <> struct mask_adder<float> {
    void add(float * row, int64_t j, float b) { row[j] += b; }
};
template <> struct mask_adder<ggml_fp16_t> {
    float       b_last = NAN;
    ggml_fp16_t h_last = 0;
    void add(ggml_fp16_t * row, int64_t j, float b) {
        if ((row[j] & 0x7FFF) != 0) {
            row[j] = ggml_fp32_to_fp16(ggml_fp16_to_fp32(row[j]) + b);
            return;
        }
        if (!(b == b_last)) {
            b_last = b;
            h_last = ggml_fp32_to_fp16(b);
        }
        row[j] = h_last;
    }
};

static void mask_row_to_f32(const float * row, float * out, int64_t n)       { std::copy(row, row + n, out); }
static void mask_row_to_f32(const ggml_fp16_t * row, float * out, int64_t n) { ggml_fp16_to_fp32_row(row, out, n); }

// -inf or +inf, read from the bits (no conversion of an F16 row)
static bool mask_is_inf(float v)       { return std::isinf(v); }
static bool mask_is_inf(ggml_fp16_t h) { return (h & 0x7FFF) == 0x7C00; }

// Where cell j's score and bias go: its position, or its slot under a slot layout.
static int32_t cell_index(bool by_slot, const llama_kv_cells & cells, int64_t j) {
    return by_slot ? (int32_t) j : (int32_t) cells.pos_get(j);
}

// cell -> position of every attended cell of the row, and position -> cell back.
template <typename T>
static void row_positions_fill(dysco_mask_row & out, const T * row) {
    const auto &  src   = out.src;
    const int64_t n_kv  = src.n_kv;
    out.cell_pos.resize(n_kv);
    out.pos_cell.assign(std::max<int32_t>(out.pos, (int32_t) n_kv - 1) + 1, -1);
    out.pos_unique = true;
    for (int64_t j = 0; j < n_kv; ++j) {
        // an attended cell emptied since is the probe's own, removed once it ran (rows are mapped when read)
        const bool removed = !src.by_slot && src.cells->is_empty(j);
        const int32_t p = mask_is_inf(row[j]) ? -1 : removed ? out.pos : cell_index(src.by_slot, *src.cells, j);
        out.cell_pos[j] = p;
        if (p < 0) {
            continue;
        }
        if (p >= (int32_t) out.pos_cell.size()) {
            out.pos_unique = false; // a row attending past its own position (not causal): no map
        } else {
            out.pos_unique &= out.pos_cell[p] < 0;
            out.pos_cell[p] = (int32_t) j;
        }
    }
    out.src.data        = nullptr;
    out.positions_ready = true;
}

static void row_positions_fill(dysco_mask_row & out) {
    if (!out.src.data) {
        return;
    }
    if (out.src.f16) {
        row_positions_fill(out, (const ggml_fp16_t *) out.src.data);
    } else {
        row_positions_fill(out, (const float *) out.src.data);
    }
}

// Keeps the scored row of the ubatch's last token: for a capture pass (its score mask is a copy: a
// bias may share the pass) the unbiased values and the positions now; for a probe, whose scores read
// the KQ mask in the graph, where the row is, for dysco_ubatch_done to map once the graph is launched.
template <typename T>
static void mask_row_keep(dysco_mask_row & out, const T * row, int64_t n_kv, const llama_kv_cells & cells, llama_pos pos,
                          llama_seq_id seq, bool by_slot, bool keep_values) {
    out.pos = by_slot ? (int32_t) n_kv - 1 : pos;
    out.seq = seq;
    out.src = {row, std::is_same<T, ggml_fp16_t>::value, n_kv, &cells, by_slot};
    out.positions_ready = false;
    if (keep_values) {
        out.mask.resize(n_kv);
        mask_row_to_f32(row, out.mask.data(), n_kv);
        row_positions_fill(out, row);
    }
}

// Slot layout: hidden slots leave every row; rows of the view sequence see every occupied cell.
template <typename T>
static void slot_layout_apply(const dysco_slot_layout & lay, T * data, int64_t n_kv, const llama_kv_cache & kv,
                              const llama_ubatch & ub) {
    for (uint32_t i = 0; i < ub.n_tokens; ++i) {
        const llama_kv_cells & cells = kv.get_cells(ub.seq_id[i][0]);
        const bool view = ub.seq_id[i][0] == lay.view_seq;
        T * row = data + n_kv * i;
        for (int64_t j = 0; j < n_kv; ++j) {
            if (j < (int64_t) lay.hidden.size() && lay.hidden[j]) {
                mask_set(row, j, mask_hidden<T>());
            } else if (view && !cells.is_empty(j)) {
                mask_set(row, j, 0.0f);
            }
        }
    }
}

// b[pos(cell)] on every attended cell of the row.
template <typename T>
static void row_add_bias_dense(const std::vector<float> & bias, T * row, int64_t n_kv, const llama_kv_cells & cells,
                               bool by_slot) {
    mask_adder<T> adder;
    for (int64_t j = 0; j < n_kv; ++j) {
        // the bias is zero but on the selected positions: test it before touching the mask
        const int32_t p = cells.is_empty(j) ? -1 : cell_index(by_slot, cells, j);
        if (p < 0 || p >= (int32_t) bias.size() || bias[p] == 0.0f || mask_is_inf(row[j])) {
            continue;
        }
        adder.add(row, j, bias[p]);
    }
}

// The same through the scored row's position -> cell map, over the bias's few non-zero positions: the
// row of the token just probed attends the cells its probe attended. False (row untouched) when a cell
// no longer holds the position the map says.
template <typename T>
static bool row_add_bias_sparse(const std::vector<float> & bias, const std::vector<int32_t> & nonzero,
                                const dysco_mask_row & ref, T * row, int64_t n_kv, const llama_kv_cells & cells) {
    for (int32_t p : nonzero) {
        const int32_t j = p < (int32_t) ref.pos_cell.size() ? ref.pos_cell[p] : -1;
        if (j >= 0 && (j >= n_kv || cells.is_empty(j) || cells.pos_get(j) != p)) {
            return false;
        }
    }
    mask_adder<T> adder;
    for (int32_t p : nonzero) {
        const int32_t j = p < (int32_t) ref.pos_cell.size() ? ref.pos_cell[p] : -1;
        if (j >= 0 && !mask_is_inf(row[j])) {
            adder.add(row, j, bias[p]);
        }
    }
    return true;
}

// Non-zero positions of the bias, or false when there are too many for the sparse path to pay.
static bool bias_nonzero_collect(const std::vector<float> & bias, int64_t n_kv, std::vector<int32_t> & out) {
    out.clear();
    for (int32_t p = 0; p < (int32_t) bias.size(); ++p) {
        if (bias[p] != 0.0f) {
            out.push_back(p);
        }
    }
    return (int64_t) out.size() * 2 <= n_kv;
}

// Adds the bias of each row's sequence; a row whose token was the one scored last (its probe) goes
// through that row's position map when it is exact.
template <typename T>
static void mask_add_bias(dysco_state & st, T * data, int64_t n_kv, const llama_kv_cache & kv, const llama_ubatch & ub, int kind) {
    const dysco_mask_row & ref = st.scores.row[kind];
    for (uint32_t i = 0; i < ub.n_tokens; ++i) {
        const llama_seq_id seq = ub.seq_id[i][0];
        const auto it = st.bias.by_seq.find(seq);
        if (it == st.bias.by_seq.end() || it->second.empty()) {
            continue;
        }
        const std::vector<float> & bias  = it->second;
        const llama_kv_cells     & cells = kv.get_cells(seq);
        T * row = data + n_kv * i;
        const bool by_ref = !st.slots.on && ref.positions_ready && ref.pos_unique && ref.seq == seq &&
                            ref.pos == ub.pos[i] && bias_nonzero_collect(bias, n_kv, st.bias.nonzero);
        if (!by_ref || !row_add_bias_sparse(bias, st.bias.nonzero, ref, row, n_kv, cells)) {
            row_add_bias_dense(bias, row, n_kv, cells, st.slots.on);
        }
    }
}

// Keeps the unbiased rows of the head-captured tokens, and the position of every cell one of them attends.
template <typename T>
static void head_rows_keep(const dysco_head_capture & cap, dysco_head_rows & out, const T * data, int64_t n_kv,
                           const llama_kv_cache & kv, const llama_ubatch & ub) {
    uint32_t i0 = 0, n_sel = 0;
    cap.select(ub, i0, n_sel);
    out.n_sel = (int32_t) n_sel;
    out.mask.resize(n_sel * n_kv);
    out.cell_pos.assign(n_kv, -1);
    if (n_sel == 0) {
        return;
    }
    const llama_kv_cells & cells = kv.get_cells(ub.seq_id[i0][0]);
    for (uint32_t r = 0; r < n_sel; ++r) {
        const T * row = data + n_kv * (i0 + r);
        for (int64_t j = 0; j < n_kv; ++j) {
            const float m = mask_get(row, j);
            out.mask[r * n_kv + j] = m;
            if (!std::isinf(m)) {
                out.cell_pos[j] = cells.pos_get(j);
            }
        }
    }
}

// One token of each sequence: a decode step, of one sequence or of a batch of them.
static bool dysco_decode_step(const llama_ubatch & ub) {
    return ub.n_tokens == std::max<uint32_t>(1, ub.n_seqs_unq);
}

template <typename T>
static void mask_apply(dysco_state & st, T * data, int64_t n_kv, const llama_kv_cache & kv, const llama_ubatch & ub, int kind,
                       bool keep_row) {
    const uint32_t last = ub.n_tokens - 1;
    if (st.slots.on) {
        slot_layout_apply(st.slots, data, n_kv, kv, ub);
    }
    if (st.heads_cap.on) {
        head_rows_keep(st.heads_cap, st.heads_cap.rows[kind], data, n_kv, kv, ub);
    }
    if (st.scoring()) {
        mask_row_keep(st.scores.row[kind], data + n_kv * last, n_kv, kv.get_cells(ub.seq_id[last][0]), ub.pos[last],
                      ub.seq_id[last][0], st.slots.on, keep_row);
    }
    // a probe reads the unbiased model: the bias only enters full passes
    if (st.probe.layers == 0 && !st.bias.by_seq.empty()) {
        mask_add_bias(st, data, n_kv, kv, ub, kind);
    }
}

void dysco_mask_apply(const llama_cparams & cparams, const llama_kv_cache_context * mctx,
                      ggml_tensor * kq_mask, const llama_ubatch * ubatch, bool is_swa) {
    dysco_state * st = cparams.dysco;
    if (!st || !kq_mask || !kq_mask->buffer || ubatch->n_tokens == 0) {
        return;
    }
    const int     kind = is_swa ? DYSCO_CACHE_SWA : DYSCO_CACHE_BASE;
    const int64_t n_kv = kq_mask->ne[0];
    const llama_kv_cache & kv = *mctx->get_kv_cache();
    const bool keep_row = !st->scores_read_kq_mask(kq_mask);
    const bool probe    = st->probe.layers > 0;
    const bool one_token = dysco_decode_step(*ubatch); // prefill ubatches are not timed
    st->timeline.mark(probe ? DYSCO_MARK_PROBE_MASK_IN : DYSCO_MARK_PASS_MASK_IN, one_token);
    if (kq_mask->type == GGML_TYPE_F16) {
        mask_apply(*st, (ggml_fp16_t *) kq_mask->data, n_kv, kv, *ubatch, kind, keep_row);
    } else {
        mask_apply(*st, (float *) kq_mask->data, n_kv, kv, *ubatch, kind, keep_row);
    }
    st->timeline.mark(probe ? DYSCO_MARK_PROBE_MASK_OUT : DYSCO_MARK_PASS_MASK_OUT, one_token);
}

// Adds one cache kind's [n_kv] probability sums into the per-position score vector.
static bool scores_gather(dysco_scores & sc, ggml_tensor * t, ggml_backend_sched_t sched, int kind) {
    const auto & row = sc.row[kind];
    if (!t || !row.positions_ready || (int64_t) row.cell_pos.size() != t->ne[0]) {
        return false;
    }
    sc.readback.resize(t->ne[0]);
    ggml_backend_t backend = ggml_backend_sched_get_tensor_backend(sched, t);
    ggml_backend_tensor_get_async(backend, t, sc.readback.data(), 0, ggml_nbytes(t));
    ggml_backend_synchronize(backend);
    for (size_t j = 0; j < row.cell_pos.size(); ++j) {
        const int32_t p = row.cell_pos[j];
        if (p >= 0 && p < (int32_t) sc.values.size()) {
            sc.values[p] += sc.readback[j];
        }
    }
    return true;
}

// Adds one layer's [1, n_kv, n_head] row sums into the all-heads capture, cells mapped to positions.
static void head_layer_gather(dysco_head_capture & cap, ggml_tensor * t, ggml_backend_sched_t sched, int il, int kind) {
    const auto & rows = cap.rows[kind];
    if (!t || rows.n_sel == 0 || (int64_t) rows.cell_pos.size() != t->ne[1]) {
        return;
    }
    const int64_t n_kv = t->ne[1];
    cap.readback.resize(ggml_nelements(t));
    ggml_backend_t backend = ggml_backend_sched_get_tensor_backend(sched, t);
    ggml_backend_tensor_get_async(backend, t, cap.readback.data(), 0, ggml_nbytes(t));
    ggml_backend_synchronize(backend);
    for (int64_t h = 0; h < t->ne[2]; ++h) {
        float * dst = cap.sum.data() + ((size_t) il * cap.n_head + h) * cap.pos_end;
        for (int64_t j = 0; j < n_kv; ++j) {
            const int32_t p = rows.cell_pos[j];
            if (p >= 0 && p < cap.pos_end) {
                dst[p] += cap.readback[h * n_kv + j];
            }
        }
    }
}

static void heads_capture_done(dysco_state & st, const llama_ubatch & ub, ggml_cgraph * gf, ggml_backend_sched_t sched) {
    auto & cap = st.heads_cap;
    uint32_t i0 = 0, n_sel = 0;
    cap.select(ub, i0, n_sel);
    if (n_sel == 0) {
        return;
    }
    const auto & hparams = st.model->hparams;
    char name[64];
    for (int il = 0; il < cap.layer_end; ++il) {
        snprintf(name, sizeof(name), "dysco_heads_l%d", il);
        head_layer_gather(cap, ggml_graph_get_tensor(gf, name), sched, il, hparams.is_swa(il) ? DYSCO_CACHE_SWA : DYSCO_CACHE_BASE);
    }
    cap.n_rows  += (int32_t) n_sel;
    cap.pos_last = std::max(cap.pos_last, (int32_t) ub.pos[i0 + n_sel - 1]);
}

void dysco_ubatch_done(const llama_cparams & cparams, const llm_graph_result * res, const llama_ubatch & ubatch,
                       ggml_backend_sched_t sched) {
    dysco_state * st = cparams.dysco;
    if (!st) {
        return;
    }
    st->timeline.mark(st->probe.layers > 0 ? DYSCO_MARK_PROBE_LAUNCHED : DYSCO_MARK_PASS_LAUNCHED, dysco_decode_step(ubatch));
    ggml_cgraph * gf = res->get_gf();
    dysco_placement_record(*st, gf, sched);
    if (st->heads_cap.on) {
        heads_capture_done(*st, ubatch, gf, sched);
    }
    dysco_track_done(*st, ubatch);
    st->scores.valid   = false;
    st->scores.pending = {};
    if (!st->scoring()) {
        return;
    }
    // read when asked (dysco_scores_sync): the importance folds them in the graph, so a decode step
    // waits for nothing here
    st->scores.pending = {gf, sched};
}

// Reads the score vector of the scored token from a finished (or in-flight) graph.
static bool scores_read(dysco_state & st, ggml_cgraph * gf, ggml_backend_sched_t sched) {
    for (auto & row : st.scores.row) { // the kept rows are still in the graph's input buffer
        row_positions_fill(row);
    }
    auto & sc = st.scores;
    const int32_t pos = sc.row[DYSCO_CACHE_BASE].pos >= 0 ? sc.row[DYSCO_CACHE_BASE].pos : sc.row[DYSCO_CACHE_SWA].pos;
    sc.values.assign(pos + 1, 0.0f);
    bool found = false;
    for (int kind = 0; kind < DYSCO_CACHE_KINDS; ++kind) {
        found |= scores_gather(sc, ggml_graph_get_tensor(gf, dysco_score_name(kind)), sched, kind);
    }
    if (!found) {
        return false;
    }
    const float inv = 1.0f / (float) st.heads.n;
    for (float & s : sc.values) {
        s *= inv;
    }
    sc.pos   = pos;
    sc.valid = true;
    return true;
}

void dysco_scores_sync(dysco_state & st) {
    auto & p = st.scores.pending;
    if (p.gf) {
        scores_read(st, p.gf, p.sched);
        p = {};
    }
}
