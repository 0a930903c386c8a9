// The C API of dysco.h: state lifetime, QR heads, capture, probe, bias, score readout.
#include "dysco.h"
#include "dysco-hooks.h"
#include "dysco-state.h"

#include "llama-context.h"
#include "llama-kv-cache.h"
#include "llama-model.h"

#include "ggml.h"

#include <algorithm>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

static thread_local std::string g_last_error;

static int32_t dysco_fail(int32_t code, const char * fmt, ...) {
    char buf[512];
    va_list args;
    va_start(args, fmt);
    vsnprintf(buf, sizeof(buf), fmt, args);
    va_end(args);
    g_last_error = buf;
    return code;
}

static int32_t dysco_ok() {
    g_last_error.clear();
    return DYSCO_OK;
}

dysco_state::dysco_state(const llama_model * model) : model(model) {
    heads.by_layer.resize(llama_model_n_layer(model));
    probe.batch    = llama_batch_init(1, 0, 1);
    probe.capacity = 1;
    timeline.on = getenv("DYSCO_HOST_TIMELINE") != nullptr;
}

dysco_state::~dysco_state() {
    timeline.print();
    llama_batch_free(probe.batch);
}

void dysco_timeline::mark(int point, bool count_it) {
    if (!on) {
        return;
    }
    const int64_t now = ggml_time_us();
    if (last > 0 && count_it) {
        us[point].push_back((float) (now - last));
    }
    last = now;
}

void dysco_timeline::print() const {
    static const char * names[DYSCO_MARKS] = {
        "probe start (since the pass launched)", "probe: to its mask", "probe: mask hook", "probe: to its launch",
        "probe: after launch", "pass: to its mask", "pass: mask hook", "pass: to its launch"};
    for (int i = 0; on && i < DYSCO_MARKS; ++i) {
        std::vector<float> v = us[i];
        std::sort(v.begin(), v.end());
        fprintf(stderr, "dysco timeline | %s | median %.1f us | p90 %.1f us | %zu |\n", names[i],
                v.empty() ? 0.0 : v[v.size() / 2], v.empty() ? 0.0 : v[v.size() * 9 / 10], v.size());
    }
}

static uint64_t key_mix(uint64_t key, uint64_t value) {
    return (key ^ value) * 0x100000001b3ull; // FNV-style: equal keys mean equal DySCO topology
}

bool dysco_state::scores_read_kq_mask(const ggml_tensor * kq_mask) const {
    // unbiased unless the host biases it (dysco_set_bias): the graph adds its own bias to a copy
    return (probe.layers > 0 || bias.by_seq.empty()) && kq_mask && kq_mask->ne[2] == 1 && kq_mask->ne[3] == 1;
}

uint64_t dysco_state::graph_key() const {
    // 0 keeps the plain graph; scoring, probe, head capture and logit scale each change the graph
    uint64_t key = 0;
    if (scoring()) {
        key = key_mix(key_mix(key_mix(1, heads.version), (uint64_t) probe.layers), scores.capture);
        key = key_mix(key_mix(key, bias.by_seq.empty()), track.any_on());
    }
    // which sequences fold and select; the fold's decay and the selection's parameters are constants of their ops
    for (const auto & [seq, t] : track.seqs) {
        const bool folds = dysco_seq_folds(*this, t), selects = t.on && t.armed && probe.layers == 0;
        if (!folds && !selects) {
            continue;
        }
        const double params[] = { t.decay, t.top_p, t.strength, t.hard_strength, (double) t.top_k };
        key = key_mix(key_mix(key_mix(key_mix(key, 4), (uint64_t) seq), selects * 2 + folds), heads.version);
        for (double v : params) {
            uint64_t bits;
            memcpy(&bits, &v, sizeof(bits));
            key = key_mix(key, bits);
        }
    }
    if (heads_cap.on) {
        key = key_mix(key_mix(key, 2), (uint64_t) heads_cap.layer_end);
    }
    if (attn_scale != 1.0f) {
        uint32_t bits;
        memcpy(&bits, &attn_scale, sizeof(bits));
        key = key_mix(key_mix(key, 3), bits);
    }
    return key;
}

// llama_context befriends this struct (patch 0006): through it DySCO reaches the context's private
// cparams (state pointer, graph key) and swaps the probe's scheduler and graph arena with its own.
struct dysco_graph_swap {
    static llama_cparams & cparams(llama_context & ctx) {
        return ctx.cparams;
    }

    static bool swap(llama_context & ctx, dysco_state & st) {
        // before the context's first reserve there is nothing to mirror: probe on the shared scheduler
        if (ctx.sched_need_reserve || !ctx.gf_res_reserve) {
            return false;
        }
        const bool fresh = !st.probe.sched;
        if (fresh) {
            st.probe.sched.reset(ggml_backend_sched_new(ctx.backend_ptrs.data(), ctx.backend_buft.data(),
                                                        (int) ctx.backend_ptrs.size(), ctx.gf_res_reserve->get_max_nodes(),
                                                        false, ctx.cparams.op_offload));
        }
        std::swap(ctx.sched, st.probe.sched);
        std::swap(ctx.gf_res_prev[0], st.probe.res);
        std::swap(ctx.gf_res_prev_active, st.probe.active);
        if (fresh) {
            reserve_every_device(ctx, st);
        }
        return true;
    }

    // A scheduler sizes each device's compute buffer by the graphs it has seen. A probe stops after
    // L_max and asks for no logits, so a device holding only later layers got a buffer of size 0,
    // whose base is null, yet the probe's output part (zero rows) may still land there: the tensor
    // got a null address and the allocator aborted (partial offload, or a split whose last device
    // holds no layer up to L_max). Reserving one token through every layer first gives every device
    // a buffer of one token's size; buffers only grow afterwards.
    static void reserve_every_device(llama_context & ctx, dysco_state & st) {
        const int32_t layers = st.probe.layers;
        st.probe.layers = 0;
        const auto mctx = ctx.memory->init_full();
        // a full memory context spans every KV stream: one token per stream (as the context's own reserve)
        const uint32_t n_seqs = ctx.cparams.kv_unified ? 1 : ctx.cparams.n_seq_max;
        if (mctx) {
            ctx.graph_reserve(n_seqs, n_seqs, n_seqs, mctx.get());
        }
        st.probe.layers = layers;
    }
};

// The state pointer and the graph key in cparams are ours to set.
static llama_cparams & dysco_cparams(llama_context * ctx) {
    return dysco_graph_swap::cparams(*ctx);
}

static dysco_state & dysco_state_of(llama_context * ctx) {
    auto & cparams = dysco_cparams(ctx);
    if (!cparams.dysco) {
        cparams.dysco = new dysco_state(llama_get_model(ctx));
    }
    return *cparams.dysco;
}

static void dysco_key_refresh(llama_context * ctx) {
    auto & cparams = dysco_cparams(ctx);
    cparams.dysco_graph_key = cparams.dysco ? cparams.dysco->graph_key() : 0;
}

void dysco_context_free(llama_cparams & cparams) {
    delete cparams.dysco;
    cparams.dysco = nullptr;
}

// ---- importance, selection and bias in the graph (dysco-track.cpp) ----

static llama_kv_cache * dysco_plain_cache(llama_context * ctx) {
    return dynamic_cast<llama_kv_cache *>(llama_get_memory(ctx));
}

// The host reads or writes the tracked tensors only once the context's graphs are done with them: a
// backend buffer's get/set (CUDA: its own stream) does not wait for a graph still running.
static void track_sync(llama_context * ctx) {
    llama_synchronize(ctx);
}

// The state of seq_id as the calls with a seq_id see it: on a cache of one stream only the last reset's
// sequence is tracked (null for another), on a parallel cache each sequence's own.
static dysco_seq_track * track_of(dysco_track & tr, int32_t seq_id) {
    const bool streams = tr.kv && tr.kv->get_n_stream() > 1;
    return !streams && seq_id != tr.seq_id ? nullptr : tr.find(seq_id);
}

// Zeros the importance and S of the sequence's stream; keep = 0 on its cells holding template positions.
static void track_upload_reset(dysco_track & tr, int32_t seq_id, const dysco_seq_track & t) {
    const int64_t n_cells = tr.keep->ne[0];
    const size_t  offs    = tr.kv->get_stream(seq_id) * tr.keep->nb[1];
    const llama_kv_cells & cells = tr.kv->get_cells(seq_id);
    tr.scratch.assign(n_cells, 0.0f);
    ggml_backend_tensor_set(tr.imp, tr.scratch.data(), offs, n_cells * sizeof(float));
    ggml_backend_tensor_set(tr.sel, tr.scratch.data(), offs, n_cells * sizeof(float));
    tr.scratch.assign(n_cells, 1.0f);
    for (int64_t j = 0; j < n_cells; ++j) {
        if (cells.is_empty(j) || !cells.seq_has(j, seq_id)) {
            continue;
        }
        const llama_pos p = cells.pos_get(j);
        if (p < (llama_pos) t.template_mask.size() && t.template_mask[p]) {
            tr.scratch[j] = 0.0f;
        }
    }
    ggml_backend_tensor_set(tr.keep, tr.scratch.data(), offs, n_cells * sizeof(float));
}

// One stream's row of a per-cell tensor, to the host (tr.scratch).
static void track_read_row(dysco_track & tr, ggml_tensor * t, int32_t seq_id) {
    tr.scratch.resize(t->ne[0]);
    ggml_backend_tensor_get(t, tr.scratch.data(), tr.kv->get_stream(seq_id) * t->nb[1], t->ne[0] * sizeof(float));
}

// position -> cell of every cell of sequence seq_id holding a position below n_pos
template <typename F>
static void track_by_position(const dysco_track & tr, int32_t seq_id, int32_t n_pos, F && f) {
    const llama_kv_cells & cells = tr.kv->get_cells(seq_id);
    for (int64_t j = 0; j < tr.imp->ne[0]; ++j) {
        if (!cells.is_empty(j) && cells.seq_has(j, seq_id) && cells.pos_get(j) < n_pos) {
            f(cells.pos_get(j), j);
        }
    }
}

extern "C" {

const char * dysco_last_error(void) {
    return g_last_error.c_str();
}

int32_t dysco_set_heads(llama_context * ctx, const int32_t * layers, const int32_t * heads, int32_t n_heads) {
    if (!ctx || n_heads < 0 || (n_heads > 0 && (!layers || !heads))) {
        return dysco_fail(DYSCO_ERR_ARGUMENT, "dysco_set_heads: null context or head arrays, or n_heads = %d", n_heads);
    }
    const llama_model * model   = llama_get_model(ctx);
    const int32_t       n_layer = llama_model_n_layer(model);
    std::vector<std::vector<int32_t>> by_layer(n_layer);
    int32_t l_max = -1;
    for (int32_t i = 0; i < n_heads; ++i) {
        const int32_t il = layers[i];
        const int32_t ih = heads[i];
        if (il < 0 || il >= n_layer) {
            return dysco_fail(DYSCO_ERR_HEAD, "QR head (%d, %d): layer %d does not exist; the model has %d layers (0-%d)",
                              il, ih, il, n_layer, n_layer - 1);
        }
        const int32_t n_head = (int32_t) model->hparams.n_head(il);
        if (ih < 0 || ih >= n_head) {
            return dysco_fail(DYSCO_ERR_HEAD, "QR head (%d, %d): head %d does not exist; layer %d has %d query heads (0-%d)",
                              il, ih, ih, il, n_head, n_head - 1);
        }
        for (int32_t seen : by_layer[il]) {
            if (seen == ih) {
                return dysco_fail(DYSCO_ERR_HEAD, "QR head (%d, %d) is listed twice", il, ih);
            }
        }
        by_layer[il].push_back(ih);
        l_max = std::max(l_max, il);
    }
    auto & st = dysco_state_of(ctx);
    st.heads.by_layer = std::move(by_layer);
    st.heads.n        = n_heads;
    st.heads.l_max    = l_max;
    st.heads.version += 1;
    st.scores.valid   = false;
    for (auto & [seq, t] : st.track.seqs) {
        t.on = false; // an importance follows one set of heads
    }
    dysco_key_refresh(ctx);
    return dysco_ok();
}

int32_t dysco_clear_heads(llama_context * ctx) {
    if (!ctx) {
        return dysco_fail(DYSCO_ERR_ARGUMENT, "dysco_clear_heads: null context");
    }
    return dysco_set_heads(ctx, nullptr, nullptr, 0);
}

int32_t dysco_l_max(llama_context * ctx) {
    if (!ctx) {
        return dysco_fail(DYSCO_ERR_ARGUMENT, "dysco_l_max: null context");
    }
    const auto & st = dysco_state_of(ctx);
    if (st.heads.n == 0) {
        return dysco_fail(DYSCO_ERR_NO_HEADS, "no QR heads are set on this context (dysco_set_heads)");
    }
    g_last_error.clear();
    return st.heads.l_max;
}

int32_t dysco_set_capture(llama_context * ctx, bool on) {
    if (!ctx) {
        return dysco_fail(DYSCO_ERR_ARGUMENT, "dysco_set_capture: null context");
    }
    auto & st = dysco_state_of(ctx);
    if (on && st.heads.n == 0) {
        return dysco_fail(DYSCO_ERR_NO_HEADS, "score capture needs QR heads: set them first (dysco_set_heads)");
    }
    st.scores.capture = on;
    dysco_key_refresh(ctx);
    return dysco_ok();
}

// Tokens probed in one decode: one per sequence (several only on a context with a KV stream per sequence).
struct dysco_probe_item {
    int32_t token, pos, seq_id;
};

static int32_t dysco_probe_decode(llama_context * ctx, dysco_state & st, const dysco_probe_item * items, int32_t n) {
    if (n > st.probe.capacity) {
        llama_batch_free(st.probe.batch);
        st.probe.batch    = llama_batch_init(n, 0, 1);
        st.probe.capacity = n;
    }
    llama_batch & b = st.probe.batch;
    b.n_tokens = n;
    for (int32_t i = 0; i < n; ++i) {
        b.token[i]     = items[i].token;
        b.pos[i]       = items[i].pos;
        b.n_seq_id[i]  = 1;
        b.seq_id[i][0] = items[i].seq_id;
        b.logits[i]    = 0; // the probe's logits are never used: skip the output head
    }
    return llama_decode(ctx, b);
}

// The probe itself: its scores stay in its graph until read (dysco_scores_sync); a tracked
// importance folds them in the graph (each sequence's into its own on a context of several streams).
static int32_t dysco_probe_run(llama_context * ctx, dysco_state & st, const dysco_probe_item * items, int32_t n) {
    st.timeline.mark(DYSCO_MARK_PROBE_START);
    st.probe.layers = st.heads.l_max + 1;
    dysco_key_refresh(ctx);
    const bool own_graph = dysco_graph_swap::swap(*ctx, st);
    const int32_t rc = dysco_probe_decode(ctx, st, items, n);
    if (own_graph) {
        dysco_graph_swap::swap(*ctx, st);
    }
    st.probe.layers = 0;
    dysco_key_refresh(ctx);
    // the probe must leave no trace: the full pass writes this position's KV cell for real
    for (int32_t i = 0; i < n; ++i) {
        llama_memory_seq_rm(llama_get_memory(ctx), items[i].seq_id, items[i].pos, -1);
    }
    st.timeline.mark(DYSCO_MARK_PROBE_END);
    if (rc != 0) {
        st.scores.valid   = false;
        st.scores.pending = {};
        for (auto & row : st.scores.row) { // a row kept before the failure points into a buffer no longer ours
            row.src.data        = nullptr;
            row.positions_ready = false;
        }
        return dysco_fail(DYSCO_ERR_DECODE, "probe decode of token %d at position %d (and %d more) failed "
                          "(llama_decode returned %d)", items[0].token, items[0].pos, n - 1, rc);
    }
    return dysco_ok();
}

int32_t dysco_probe(llama_context * ctx, int32_t token, int32_t pos, int32_t seq_id) {
    if (!ctx || pos < 0 || seq_id < 0) {
        return dysco_fail(DYSCO_ERR_ARGUMENT, "dysco_probe: null context or negative pos (%d) / seq_id (%d)", pos, seq_id);
    }
    auto & st = dysco_state_of(ctx);
    if (st.heads.n == 0) {
        return dysco_fail(DYSCO_ERR_NO_HEADS, "a probe needs QR heads: set them first (dysco_set_heads)");
    }
    if (dysco_seq_track * t = track_of(st.track, seq_id)) {
        t->armed = false;
    }
    const dysco_probe_item item = { token, pos, seq_id };
    return dysco_probe_run(ctx, st, &item, 1);
}

// Whether a bias of n_bias entries fits sequence seq_id: at most the next token's positions (or
// the context's slots under a slot layout).
static int32_t dysco_bias_check(llama_context * ctx, int32_t seq_id, int32_t n_bias) {
    const auto & st = dysco_state_of(ctx);
    if (st.slots.on && n_bias > (int32_t) llama_n_ctx(ctx)) {
        return dysco_fail(DYSCO_ERR_RANGE, "bias covers %d slots but the context has %u", n_bias, llama_n_ctx(ctx));
    }
    const llama_pos pos_max = llama_memory_seq_pos_max(llama_get_memory(ctx), seq_id);
    if (!st.slots.on && n_bias > pos_max + 2) {
        return dysco_fail(DYSCO_ERR_RANGE, "bias covers %d positions but sequence %d holds positions 0-%d; "
                          "a bias may cover at most the next token (%d positions)", n_bias, seq_id, pos_max, pos_max + 2);
    }
    return dysco_ok();
}

int32_t dysco_set_bias(llama_context * ctx, int32_t seq_id, const float * bias, int32_t n_bias) {
    if (!ctx || seq_id < 0 || n_bias < 0 || (n_bias > 0 && !bias)) {
        return dysco_fail(DYSCO_ERR_ARGUMENT, "dysco_set_bias: null context or bias, seq_id = %d, n_bias = %d", seq_id, n_bias);
    }
    const int32_t rc = dysco_bias_check(ctx, seq_id, n_bias);
    if (rc != DYSCO_OK) {
        return rc;
    }
    dysco_state_of(ctx).bias.by_seq[seq_id].assign(bias, bias + n_bias);
    dysco_key_refresh(ctx);
    return dysco_ok();
}

int32_t dysco_clear_bias(llama_context * ctx, int32_t seq_id) {
    if (!ctx) {
        return dysco_fail(DYSCO_ERR_ARGUMENT, "dysco_clear_bias: null context");
    }
    auto & st = dysco_state_of(ctx);
    if (seq_id < 0) {
        st.bias.by_seq.clear();
    } else {
        st.bias.by_seq.erase(seq_id);
    }
    for (auto & [seq, t] : st.track.seqs) {
        t.armed = t.armed && seq_id >= 0 && seq != seq_id;
    }
    dysco_key_refresh(ctx);
    return dysco_ok();
}

int32_t dysco_get_scores(llama_context * ctx, float * out, int32_t n_max) {
    if (!ctx || (out && n_max < 0)) {
        return dysco_fail(DYSCO_ERR_ARGUMENT, "dysco_get_scores: null context or n_max = %d", n_max);
    }
    auto & st = dysco_state_of(ctx);
    dysco_scores_sync(st);
    if (!st.scores.valid) {
        return dysco_fail(DYSCO_ERR_NO_SCORES, "the last decode captured no scores: run a probe, or turn capture on "
                          "(dysco_set_capture) before a full pass");
    }
    const int32_t n = (int32_t) st.scores.values.size();
    if (out) {
        std::copy(st.scores.values.begin(), st.scores.values.begin() + std::min(n, n_max), out);
    }
    g_last_error.clear();
    return n;
}

int32_t dysco_scores_pos(llama_context * ctx) {
    if (!ctx) {
        return dysco_fail(DYSCO_ERR_ARGUMENT, "dysco_scores_pos: null context");
    }
    auto & st = dysco_state_of(ctx);
    dysco_scores_sync(st);
    if (!st.scores.valid) {
        return dysco_fail(DYSCO_ERR_NO_SCORES, "the last decode captured no scores");
    }
    g_last_error.clear();
    return st.scores.pos;
}

int32_t dysco_set_head_capture(llama_context * ctx, int32_t pos_begin, int32_t pos_end, int32_t layer_end) {
    if (!ctx) {
        return dysco_fail(DYSCO_ERR_ARGUMENT, "dysco_set_head_capture: null context");
    }
    const int32_t n_ctx   = (int32_t) llama_n_ctx(ctx);
    const int32_t n_layer = llama_model_n_layer(llama_get_model(ctx));
    if (pos_begin < 0 || pos_end <= pos_begin || pos_end > n_ctx) {
        return dysco_fail(DYSCO_ERR_ARGUMENT, "head capture range [%d, %d) is empty or outside the context of %d positions",
                          pos_begin, pos_end, n_ctx);
    }
    if (layer_end < 0 || layer_end > n_layer) {
        return dysco_fail(DYSCO_ERR_ARGUMENT, "head capture layer_end = %d: the model has %d layers (0 = all)", layer_end, n_layer);
    }
    auto & st  = dysco_state_of(ctx);
    auto & cap = st.heads_cap;
    cap = dysco_head_capture();
    cap.on        = true;
    cap.pos_begin = pos_begin;
    cap.pos_end   = pos_end;
    cap.layer_end = layer_end == 0 ? n_layer : layer_end;
    for (int32_t il = 0; il < cap.layer_end; ++il) {
        cap.n_head = std::max(cap.n_head, (int32_t) st.model->hparams.n_head(il));
    }
    cap.sum.assign((size_t) cap.layer_end * cap.n_head * cap.pos_end, 0.0f);
    dysco_key_refresh(ctx);
    return dysco_ok();
}

int32_t dysco_clear_head_capture(llama_context * ctx) {
    if (!ctx) {
        return dysco_fail(DYSCO_ERR_ARGUMENT, "dysco_clear_head_capture: null context");
    }
    auto & st = dysco_state_of(ctx);
    st.heads_cap = dysco_head_capture();
    dysco_key_refresh(ctx);
    return dysco_ok();
}

int32_t dysco_head_scores_shape(llama_context * ctx, int32_t * n_layer, int32_t * n_head, int32_t * n_pos) {
    if (!ctx || !n_layer || !n_head || !n_pos) {
        return dysco_fail(DYSCO_ERR_ARGUMENT, "dysco_head_scores_shape: null context or output pointer");
    }
    const auto & cap = dysco_state_of(ctx).heads_cap;
    if (!cap.on || cap.n_rows == 0) {
        return dysco_fail(DYSCO_ERR_NO_SCORES, "no head attention was captured: set a capture range (dysco_set_head_capture) "
                          "and decode tokens at those positions");
    }
    *n_layer = cap.layer_end;
    *n_head  = cap.n_head;
    *n_pos   = cap.pos_last + 1;
    g_last_error.clear();
    return cap.n_rows;
}

int32_t dysco_get_head_scores(llama_context * ctx, float * out, int64_t n_max) {
    int32_t n_layer = 0, n_head = 0, n_pos = 0;
    const int32_t n_rows = dysco_head_scores_shape(ctx, &n_layer, &n_head, &n_pos);
    if (n_rows < 0) {
        return n_rows;
    }
    if (!out || n_max < (int64_t) n_layer * n_head * n_pos) {
        return dysco_fail(DYSCO_ERR_ARGUMENT, "dysco_get_head_scores: the output holds %lld floats, %lld are needed",
                          (long long) n_max, (long long) n_layer * n_head * n_pos);
    }
    const auto &  cap = dysco_state_of(ctx).heads_cap;
    const float   inv = 1.0f / (float) n_rows;
    for (int64_t lh = 0; lh < (int64_t) n_layer * n_head; ++lh) {
        const float * src = cap.sum.data() + lh * cap.pos_end;
        for (int32_t p = 0; p < n_pos; ++p) {
            out[lh * n_pos + p] = src[p] * inv;
        }
    }
    return n_rows;
}

int32_t dysco_set_attn_scale(llama_context * ctx, float scale) {
    if (!ctx || !std::isfinite(scale) || scale <= 0.0f) {
        return dysco_fail(DYSCO_ERR_ARGUMENT, "attention logit scale must be a finite number > 0, got %g", (double) scale);
    }
    dysco_state_of(ctx).attn_scale = scale;
    dysco_key_refresh(ctx);
    return dysco_ok();
}

int32_t dysco_set_placement_log(llama_context * ctx, bool on) {
    if (!ctx) {
        return dysco_fail(DYSCO_ERR_ARGUMENT, "dysco_set_placement_log: null context");
    }
    auto & pl = dysco_state_of(ctx).placement;
    pl.on = on;
    if (on) {
        pl.seen.clear();
    }
    return dysco_ok();
}

int32_t dysco_get_placement(llama_context * ctx, char * out, int32_t n_max) {
    if (!ctx || n_max < 0) {
        return dysco_fail(DYSCO_ERR_ARGUMENT, "dysco_get_placement: null context or n_max = %d", n_max);
    }
    const std::string text = dysco_placement_text(dysco_state_of(ctx));
    if (out && n_max > 0) {
        const size_t n = std::min(text.size(), (size_t) n_max - 1);
        memcpy(out, text.data(), n);
        out[n] = '\0';
    }
    g_last_error.clear();
    return (int32_t) text.size();
}

int32_t dysco_set_slot_layout(llama_context * ctx, bool on, const int32_t * hidden, int32_t n_hidden, int32_t view_seq) {
    if (!ctx || n_hidden < 0 || (n_hidden > 0 && !hidden)) {
        return dysco_fail(DYSCO_ERR_ARGUMENT, "dysco_set_slot_layout: null context or hidden slots, n_hidden = %d", n_hidden);
    }
    const int32_t n_ctx = (int32_t) llama_n_ctx(ctx);
    auto & lay = dysco_state_of(ctx).slots;
    std::vector<uint8_t> mask(on ? n_ctx : 0, 0);
    for (int32_t i = 0; on && i < n_hidden; ++i) {
        if (hidden[i] < 0 || hidden[i] >= n_ctx) {
            return dysco_fail(DYSCO_ERR_ARGUMENT, "hidden slot %d is outside the context of %d cells", hidden[i], n_ctx);
        }
        mask[hidden[i]] = 1;
    }
    lay.on       = on;
    lay.hidden   = std::move(mask);
    lay.view_seq = on ? view_seq : -1;
    return dysco_ok();
}


int32_t dysco_track_supported(llama_context * ctx) {
    if (!ctx) {
        return dysco_fail(DYSCO_ERR_ARGUMENT, "dysco_track_supported: null context");
    }
    g_last_error.clear();
    return dysco_plain_cache(ctx) ? 1 : 0;
}

int32_t dysco_importance_reset(llama_context * ctx, int32_t seq_id, int32_t n_positions, double decay, double top_p,
                               int32_t top_k, double strength, double hard_strength, const uint8_t * template_mask,
                               int32_t n_template) {
    if (!ctx || seq_id < 0 || n_positions < 0 || !std::isfinite(decay) || decay < 0.0 || (top_p <= 0.0 && top_k <= 0) ||
        top_p > 1.0 || !(strength > 0.0) || n_template < 0 || (n_template > 0 && !template_mask)) {
        return dysco_fail(DYSCO_ERR_ARGUMENT, "dysco_importance_reset: null context, seq_id = %d, n_positions = %d, "
                          "decay = %g, top_p = %g, top_k = %d, strength = %g or n_template = %d out of range",
                          seq_id, n_positions, decay, top_p, top_k, strength, n_template);
    }
    auto & st = dysco_state_of(ctx);
    if (st.heads.n == 0) {
        return dysco_fail(DYSCO_ERR_NO_HEADS, "dysco_importance_reset needs QR heads: set them first (dysco_set_heads)");
    }
    llama_kv_cache * kv = dysco_plain_cache(ctx);
    if (!kv) {
        return dysco_fail(DYSCO_ERR_UNSUPPORTED, "the importance is kept in the graph for a plain KV cache only; "
                          "this model's memory is another kind (track it on the host: selection.py)");
    }
    if (seq_id >= (int32_t) llama_n_seq_max(ctx)) {
        return dysco_fail(DYSCO_ERR_ARGUMENT, "dysco_importance_reset: seq_id = %d but the context has %u sequences",
                          seq_id, llama_n_seq_max(ctx));
    }
    if (!dysco_track_alloc(st, *kv)) {
        return dysco_fail(DYSCO_ERR_UNSUPPORTED, "could not allocate the importance beside the KV cache");
    }
    auto & tr = st.track;
    tr.seq_id = seq_id;
    auto & t  = tr.seqs[seq_id];
    t = dysco_seq_track();
    t.on    = true;
    t.n_pos = n_positions;
    t.decay = decay, t.top_p = top_p, t.top_k = top_k, t.strength = strength, t.hard_strength = hard_strength;
    t.template_mask.assign(template_mask, template_mask + n_template);
    track_sync(ctx);
    track_upload_reset(tr, seq_id, t);
    dysco_key_refresh(ctx);
    return dysco_ok();
}

// The tracked state of seq_id for `fn`, or null with the error set.
static dysco_seq_track * track_check(llama_context * ctx, const char * fn, int32_t seq_id) {
    if (!ctx) {
        dysco_fail(DYSCO_ERR_ARGUMENT, "%s: null context", fn);
        return nullptr;
    }
    dysco_seq_track * t = track_of(dysco_state_of(ctx).track, seq_id);
    if (!t || !t->on) {
        dysco_fail(DYSCO_ERR_ARGUMENT, "%s: no importance is tracked for sequence %d: call dysco_importance_reset first",
                   fn, seq_id);
        return nullptr;
    }
    return t;
}

static int32_t current_seq(llama_context * ctx) {
    return ctx ? dysco_state_of(ctx).track.seq_id : 0;
}

int32_t dysco_track_end(llama_context * ctx, int32_t seq_id) {
    if (!ctx || seq_id < 0) {
        return dysco_fail(DYSCO_ERR_ARGUMENT, "dysco_track_end: null context or seq_id = %d", seq_id);
    }
    auto & st = dysco_state_of(ctx);
    st.track.seqs.erase(seq_id);
    dysco_key_refresh(ctx);
    return dysco_ok();
}

int32_t dysco_set_seq_capture(llama_context * ctx, int32_t seq_id, bool on) {
    dysco_seq_track * t = track_check(ctx, "dysco_set_seq_capture", seq_id);
    if (!t) {
        return DYSCO_ERR_ARGUMENT;
    }
    t->capture = on;
    dysco_key_refresh(ctx);
    return dysco_ok();
}

int32_t dysco_importance_get_seq(llama_context * ctx, int32_t seq_id, double * out, int32_t n_max) {
    seq_id = seq_id < 0 ? current_seq(ctx) : seq_id;
    dysco_seq_track * t = track_check(ctx, "dysco_importance_get", seq_id);
    if (!t || (out && n_max < 0)) {
        return t ? dysco_fail(DYSCO_ERR_ARGUMENT, "dysco_importance_get: n_max = %d", n_max) : DYSCO_ERR_ARGUMENT;
    }
    auto & tr = dysco_state_of(ctx).track;
    if (out) {
        track_sync(ctx);
        track_read_row(tr, tr.imp, seq_id);
        std::fill(out, out + std::min(n_max, t->n_pos), 0.0);
        track_by_position(tr, seq_id, std::min(n_max, t->n_pos), [&](llama_pos p, int64_t j) { out[p] = tr.scratch[j]; });
    }
    return t->n_pos;
}

int32_t dysco_importance_get(llama_context * ctx, double * out, int32_t n_max) {
    return dysco_importance_get_seq(ctx, current_seq(ctx), out, n_max);
}

int32_t dysco_importance_set(llama_context * ctx, const double * values, int32_t n) {
    const int32_t seq_id = current_seq(ctx);
    dysco_seq_track * t = track_check(ctx, "dysco_importance_set", seq_id);
    if (!t || n < 0 || (n > 0 && !values)) {
        return t ? dysco_fail(DYSCO_ERR_ARGUMENT, "dysco_importance_set: null values, n = %d", n) : DYSCO_ERR_ARGUMENT;
    }
    for (int32_t i = 0; i < n; ++i) {
        if (!(std::isfinite(values[i]) && values[i] >= 0.0)) {
            return dysco_fail(DYSCO_ERR_ARGUMENT, "dysco_importance_set: value %d is %g; expected finite values >= 0",
                              i, values[i]);
        }
    }
    auto & tr = dysco_state_of(ctx).track;
    track_sync(ctx);
    tr.scratch.assign(tr.imp->ne[0], 0.0f);
    track_by_position(tr, seq_id, n, [&](llama_pos p, int64_t j) { tr.scratch[j] = (float) values[p]; });
    ggml_backend_tensor_set(tr.imp, tr.scratch.data(), tr.kv->get_stream(seq_id) * tr.imp->nb[1], ggml_nbytes(tr.imp) / tr.imp->ne[1]);
    t->n_pos  = n;
    t->scored = true;
    return dysco_ok();
}

// Arms the next full pass of `seq_id` to select S from the importance and bias itself in its graph.
static dysco_seq_track * track_arm(llama_context * ctx, const char * fn, int32_t pos, int32_t seq_id) {
    dysco_seq_track * t = track_check(ctx, fn, seq_id);
    if (!t) {
        return nullptr;
    }
    if (pos != t->n_pos) {
        dysco_fail(DYSCO_ERR_RANGE, "%s: pos = %d of sequence %d but the importance covers %d positions of it; "
                   "the token must be the one after them", fn, pos, seq_id, t->n_pos);
        return nullptr;
    }
    t->armed     = true;
    t->armed_pos = pos;
    t->selected  = false;
    return t;
}

static int32_t track_error(llama_context * ctx, int32_t seq_id) {
    // the reason is set; the code follows it (an untracked sequence is an argument error)
    auto * t = ctx ? track_of(dysco_state_of(ctx).track, seq_id) : nullptr;
    return t && t->on ? DYSCO_ERR_RANGE : DYSCO_ERR_ARGUMENT;
}

int32_t dysco_probe_select_batch(llama_context * ctx, const int32_t * tokens, const int32_t * pos, const int32_t * seq_ids,
                                 int32_t n) {
    if (!ctx || n < 1 || !tokens || !pos || !seq_ids || n > (int32_t) llama_n_seq_max(ctx)) {
        return dysco_fail(DYSCO_ERR_ARGUMENT, "dysco_probe_select: null context or arrays, or n = %d (1..sequences)", n);
    }
    std::vector<dysco_probe_item> items(n);
    std::vector<dysco_seq_track *> armed;
    for (int32_t i = 0; i < n; ++i) {
        dysco_seq_track * t = track_arm(ctx, "dysco_probe_select", pos[i], seq_ids[i]);
        if (!t || (i > 0 && dysco_state_of(ctx).track.kv->get_n_stream() == 1)) {
            const int32_t rc = t ? dysco_fail(DYSCO_ERR_ARGUMENT, "dysco_probe_select: several sequences probe "
                                              "together only when each has a KV stream of its own") : track_error(ctx, seq_ids[i]);
            for (dysco_seq_track * a : armed) {
                a->armed = false;
            }
            return rc;
        }
        armed.push_back(t);
        items[i] = { tokens[i], pos[i], seq_ids[i] };
    }
    auto & st = dysco_state_of(ctx);
    const int32_t probe_rc = dysco_probe_run(ctx, st, items.data(), n);
    for (dysco_seq_track * t : armed) {
        t->armed = probe_rc == DYSCO_OK;
    }
    dysco_key_refresh(ctx);
    return probe_rc;
}

int32_t dysco_probe_select(llama_context * ctx, int32_t token, int32_t pos, int32_t seq_id) {
    return dysco_probe_select_batch(ctx, &token, &pos, &seq_id, 1);
}

int32_t dysco_fast_select(llama_context * ctx, int32_t pos, int32_t seq_id) {
    dysco_seq_track * t = track_check(ctx, "dysco_fast_select", seq_id);
    if (!t) {
        return DYSCO_ERR_ARGUMENT;
    }
    auto & st = dysco_state_of(ctx);
    if (!t->scored) {
        return dysco_ok(); // 0: nothing has scored the positions before pos yet; the caller probes this step
    }
    if (!track_arm(ctx, "dysco_fast_select", pos, seq_id)) {
        return DYSCO_ERR_RANGE;
    }
    // the pass scores its token for the next selection: this sequence's passes alone on a parallel
    // cache, every full pass (and the host's score readout) on a cache of one stream, as before streams
    const bool streams = st.track.kv->get_n_stream() > 1;
    t->capture = t->capture || streams;
    st.scores.capture = st.scores.capture || !streams;
    dysco_key_refresh(ctx);
    return 1;
}

int32_t dysco_pass_selection_seq(llama_context * ctx, int32_t seq_id, int32_t * selected, int32_t n_max) {
    if (!ctx || (selected && n_max < 0)) {
        return dysco_fail(DYSCO_ERR_ARGUMENT, "dysco_pass_selection: null context or n_max = %d", n_max);
    }
    auto & tr = dysco_state_of(ctx).track;
    seq_id = seq_id < 0 ? current_seq(ctx) : seq_id;
    dysco_seq_track * t = track_of(tr, seq_id);
    if (!t || !t->armed) {
        return dysco_fail(DYSCO_ERR_NO_SCORES, "no pass selection is pending for sequence %d: call dysco_probe_select "
                          "or dysco_fast_select, then decode the token", seq_id);
    }
    t->armed = false;
    dysco_key_refresh(ctx);
    if (!t->selected || t->selected_pos != t->armed_pos) {
        return dysco_fail(DYSCO_ERR_NO_SCORES, "the full pass at position %d of sequence %d did not select (it has not "
                          "run, or ran with several tokens)", t->armed_pos, seq_id);
    }
    if (!selected) {
        return dysco_ok(); // S stays on the device: reading it back would wait for the pass
    }
    track_sync(ctx);
    track_read_row(tr, tr.sel, seq_id);
    std::vector<int32_t> s;
    track_by_position(tr, seq_id, t->selected_n, [&](llama_pos p, int64_t j) {
        if (tr.scratch[j] > 0.5f) {
            s.push_back(p);
        }
    });
    std::sort(s.begin(), s.end());
    std::copy(s.begin(), s.begin() + std::min<size_t>(s.size(), (size_t) n_max), selected);
    g_last_error.clear();
    return (int32_t) s.size();
}

int32_t dysco_pass_selection(llama_context * ctx, int32_t * selected, int32_t n_max) {
    return dysco_pass_selection_seq(ctx, current_seq(ctx), selected, n_max);
}

} // extern "C"

void dysco_track_done(dysco_state & st, const llama_ubatch & ub) {
    if (!st.track.kv || st.track.seqs.empty()) {
        return;
    }
    const uint32_t ns = st.track.kv->get_n_stream() > 1 ? std::max<uint32_t>(1, ub.n_seqs_unq) : 1;
    const uint32_t nt = ub.n_tokens / ns;
    for (uint32_t c = 0; c < ns; ++c) {
        dysco_seq_track * t = dysco_track_chunk(st, ub, ns, c);
        if (!t) {
            continue;
        }
        const llama_pos pos = ub.pos[c * nt + nt - 1];
        if (t->on && t->armed && st.probe.layers == 0 && nt == 1) {
            t->selected     = true;
            t->selected_pos = pos;
            t->selected_n   = t->n_pos; // before this pass's own fold (fast mode)
        }
        // the graph folded (dysco-graph.cpp): a host-biased pass scores only when the host reads scores
        if (dysco_seq_folds(st, *t) && (st.scoring() || st.bias.by_seq.empty())) {
            t->n_pos  = pos + 1;
            t->scored = true;
        }
    }
}
