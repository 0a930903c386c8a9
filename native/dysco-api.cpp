// The C API of dysco.h: state lifetime, QR heads, capture, probe, bias, score readout.
#include "dysco.h"
#include "dysco-hooks.h"
#include "dysco-state.h"

#include "llama-context.h"
#include "llama-model.h"

#include <cmath>
#include <cstdarg>
#include <cstdio>
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

dysco_state::dysco_state(const llama_model * model) :
    model(model),
    heads_by_layer(llama_model_n_layer(model)),
    probe_batch(llama_batch_init(1, 0, 1)) {}

dysco_state::~dysco_state() {
    llama_batch_free(probe_batch);
}

uint64_t dysco_state::graph_key() const {
    // 0 keeps the plain graph; any scoring or probe graph gets a key of its own
    if (!scoring()) {
        return 0;
    }
    return (heads_version << 20) ^ (uint64_t(probe_layers) << 1) ^ uint64_t(capture);
}

// llama_context keeps its cparams private; the state pointer and the graph key are ours to set.
static llama_cparams & dysco_cparams(llama_context * ctx) {
    return const_cast<llama_cparams &>(ctx->get_cparams());
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
    st.heads_by_layer = std::move(by_layer);
    st.n_heads        = n_heads;
    st.l_max          = l_max;
    st.heads_version += 1;
    st.scores_valid   = false;
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
    if (st.n_heads == 0) {
        return dysco_fail(DYSCO_ERR_NO_HEADS, "no QR heads are set on this context (dysco_set_heads)");
    }
    g_last_error.clear();
    return st.l_max;
}

int32_t dysco_set_capture(llama_context * ctx, bool on) {
    if (!ctx) {
        return dysco_fail(DYSCO_ERR_ARGUMENT, "dysco_set_capture: null context");
    }
    auto & st = dysco_state_of(ctx);
    if (on && st.n_heads == 0) {
        return dysco_fail(DYSCO_ERR_NO_HEADS, "score capture needs QR heads: set them first (dysco_set_heads)");
    }
    st.capture = on;
    dysco_key_refresh(ctx);
    return dysco_ok();
}

static int32_t dysco_probe_decode(llama_context * ctx, dysco_state & st, int32_t token, int32_t pos, int32_t seq_id) {
    llama_batch & b = st.probe_batch;
    b.n_tokens     = 1;
    b.token[0]     = token;
    b.pos[0]       = pos;
    b.n_seq_id[0]  = 1;
    b.seq_id[0][0] = seq_id;
    b.logits[0]    = 0; // the probe's logits are never used: skip the output head
    return llama_decode(ctx, b);
}

int32_t dysco_probe(llama_context * ctx, int32_t token, int32_t pos, int32_t seq_id) {
    if (!ctx || pos < 0 || seq_id < 0) {
        return dysco_fail(DYSCO_ERR_ARGUMENT, "dysco_probe: null context or negative pos (%d) / seq_id (%d)", pos, seq_id);
    }
    auto & st = dysco_state_of(ctx);
    if (st.n_heads == 0) {
        return dysco_fail(DYSCO_ERR_NO_HEADS, "a probe needs QR heads: set them first (dysco_set_heads)");
    }
    st.probe_layers = st.l_max + 1;
    dysco_key_refresh(ctx);
    const int32_t rc = dysco_probe_decode(ctx, st, token, pos, seq_id);
    st.probe_layers = 0;
    dysco_key_refresh(ctx);
    // the probe must leave no trace: the full pass writes this position's KV cell for real
    llama_memory_seq_rm(llama_get_memory(ctx), seq_id, pos, -1);
    if (rc != 0) {
        st.scores_valid = false;
        return dysco_fail(DYSCO_ERR_DECODE, "probe decode of token %d at position %d failed (llama_decode returned %d)", token, pos, rc);
    }
    return dysco_ok();
}

int32_t dysco_set_bias(llama_context * ctx, int32_t seq_id, const float * bias, int32_t n_bias) {
    if (!ctx || seq_id < 0 || n_bias < 0 || (n_bias > 0 && !bias)) {
        return dysco_fail(DYSCO_ERR_ARGUMENT, "dysco_set_bias: null context or bias, seq_id = %d, n_bias = %d", seq_id, n_bias);
    }
    const llama_pos pos_max = llama_memory_seq_pos_max(llama_get_memory(ctx), seq_id);
    if (n_bias > pos_max + 2) {
        return dysco_fail(DYSCO_ERR_RANGE, "bias covers %d positions but sequence %d holds positions 0-%d; "
                          "a bias may cover at most the next token (%d positions)", n_bias, seq_id, pos_max, pos_max + 2);
    }
    auto & st = dysco_state_of(ctx);
    st.bias_by_seq[seq_id].assign(bias, bias + n_bias);
    return dysco_ok();
}

int32_t dysco_clear_bias(llama_context * ctx, int32_t seq_id) {
    if (!ctx) {
        return dysco_fail(DYSCO_ERR_ARGUMENT, "dysco_clear_bias: null context");
    }
    auto & st = dysco_state_of(ctx);
    if (seq_id < 0) {
        st.bias_by_seq.clear();
    } else {
        st.bias_by_seq.erase(seq_id);
    }
    return dysco_ok();
}

int32_t dysco_get_scores(llama_context * ctx, float * out, int32_t n_max) {
    if (!ctx || (out && n_max < 0)) {
        return dysco_fail(DYSCO_ERR_ARGUMENT, "dysco_get_scores: null context or n_max = %d", n_max);
    }
    const auto & st = dysco_state_of(ctx);
    if (!st.scores_valid) {
        return dysco_fail(DYSCO_ERR_NO_SCORES, "the last decode captured no scores: run a probe, or turn capture on "
                          "(dysco_set_capture) before a full pass");
    }
    const int32_t n = (int32_t) st.scores.size();
    if (out) {
        std::copy(st.scores.begin(), st.scores.begin() + std::min(n, n_max), out);
    }
    g_last_error.clear();
    return n;
}

int32_t dysco_scores_pos(llama_context * ctx) {
    if (!ctx) {
        return dysco_fail(DYSCO_ERR_ARGUMENT, "dysco_scores_pos: null context");
    }
    const auto & st = dysco_state_of(ctx);
    if (!st.scores_valid) {
        return dysco_fail(DYSCO_ERR_NO_SCORES, "the last decode captured no scores");
    }
    g_last_error.clear();
    return st.scores_pos;
}

} // extern "C"
