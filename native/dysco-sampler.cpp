// A greedy sampler for llama.cpp's backend sampling (llama_set_sampler): the token is picked in the
// decode graph, as llama.cpp's own greedy does, but in two stages. ggml_argmax gives a whole row to one
// GPU block, which walks a large vocabulary (Qwen2.5's 151936 logits) alone; here each chunk of the row
// has a block, then one block compares the chunks' maxima (measured in bench/RESULTS.md, issue 26).
#include "dysco.h"

#include "llama.h"

#include "ggml.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpp.h"

#include <algorithm>
#include <numeric>
#include <vector>

// the logits llama.cpp's chain probes a sampler's graph with (llama_sampler_backend_probe_graph)
static const int64_t DYSCO_PROBE_LOGITS = 128 * 1024;

struct dysco_greedy {
    int64_t          n_vocab;
    bool             chunked = false; // ids is allocated and the two-stage ops run on the output device
    ggml_context_ptr ctx;
    ggml_backend_buffer_ptr buf;
    ggml_tensor *    ids = nullptr;   // [n] I32 0, 1, ..: a logit's token, on the output device
};

// The chunk width: the largest power of two up to 1024 dividing n, so that a chunk fills a block; 0
// (a single-stage argmax) when it would be under a warp.
static int64_t greedy_chunk(int64_t n) {
    int64_t w = 1024;
    while (w >= 32 && n % w != 0) {
        w /= 2;
    }
    return w >= 32 ? w : 0;
}

// The largest of `logits` [n] as [1] I32, as ggml_argmax over the whole row picks it: each stage is a
// ggml_argmax, whose pick among equal maxima (on the CPU the last) then holds across chunks as within one.
static ggml_tensor * greedy_argmax(ggml_context * ctx, const dysco_greedy & g, ggml_tensor * logits) {
    const int64_t n = ggml_nelements(logits);
    const int64_t w = g.chunked && n <= ggml_nelements(g.ids) ? greedy_chunk(n) : 0;
    logits = ggml_reshape_1d(ctx, logits, n);                                                 // [n]
    if (w == 0) {
        return ggml_argmax(ctx, logits);                                                      // [1] I32
    }
    const int64_t n_chunk = n / w;
    ggml_tensor * at    = ggml_argmax(ctx, ggml_reshape_2d(ctx, logits, w, n_chunk));       // [n_chunk] I32 within each
    ggml_tensor * at_2d = ggml_reshape_2d(ctx, at, 1, n_chunk);                              // [1, n_chunk]
    ggml_tensor * best  = ggml_get_rows(ctx, ggml_reshape_3d(ctx, logits, 1, w, n_chunk), at_2d); // [1, 1, n_chunk]
    ggml_tensor * which = ggml_argmax(ctx, ggml_reshape_2d(ctx, best, n_chunk, 1));          // [1] I32 the chunk
    ggml_tensor * ids   = ggml_view_3d(ctx, g.ids, 1, w, n_chunk, ggml_element_size(g.ids), w * ggml_element_size(g.ids), 0);
    ggml_tensor * token = ggml_get_rows(ctx, ids, at_2d);                                    // [1, 1, n_chunk] I32
    token = ggml_get_rows(ctx, ggml_reshape_2d(ctx, token, 1, n_chunk), which);             // [1, 1] I32
    return ggml_reshape_1d(ctx, token, 1);                                                    // [1] I32
}

// Whether the device runs every op of the graph greedy_argmax builds over n logits.
static bool greedy_supported(const dysco_greedy & g, ggml_backend_dev_t dev, int64_t n) {
    ggml_init_params params = { 64 * ggml_tensor_overhead() + ggml_graph_overhead(), nullptr, true };
    ggml_context_ptr ctx(ggml_init(params));
    ggml_cgraph * gf = ggml_new_graph(ctx.get());
    ggml_build_forward_expand(gf, greedy_argmax(ctx.get(), g, ggml_new_tensor_1d(ctx.get(), GGML_TYPE_F32, n)));
    for (int i = 0; i < ggml_graph_n_nodes(gf); ++i) {
        if (!ggml_backend_dev_supports_op(dev, ggml_graph_node(gf, i))) {
            return false;
        }
    }
    return true;
}

// The token table on the output device: large enough for the vocabulary and for the chain's probe.
static bool greedy_alloc_ids(dysco_greedy & g, ggml_backend_buffer_type_t buft) {
    const int64_t n = std::max(g.n_vocab, DYSCO_PROBE_LOGITS);
    ggml_init_params params = { ggml_tensor_overhead(), nullptr, true };
    g.ctx.reset(ggml_init(params));
    g.ids = ggml_new_tensor_1d(g.ctx.get(), GGML_TYPE_I32, n);
    ggml_set_name(g.ids, "dysco_greedy_ids");
    g.buf.reset(ggml_backend_alloc_ctx_tensors_from_buft(g.ctx.get(), buft));
    if (!g.buf) {
        g.ids = nullptr;
        return false;
    }
    std::vector<int32_t> ids(n);
    std::iota(ids.begin(), ids.end(), 0);
    ggml_backend_tensor_set(g.ids, ids.data(), 0, ggml_nbytes(g.ids));
    return true;
}

static const char * greedy_name(const llama_sampler *) {
    return "dysco-greedy";
}

// On the host (a chain not offloaded): the first largest, as llama.cpp's greedy on the host.
static void greedy_apply(llama_sampler *, llama_token_data_array * cur_p) {
    cur_p->selected = 0;
    for (size_t i = 1; i < cur_p->size; ++i) {
        if (cur_p->data[i].logit > cur_p->data[cur_p->selected].logit) {
            cur_p->selected = (int64_t) i;
        }
    }
}

static llama_sampler * greedy_clone(const llama_sampler * smpl);

static void greedy_free(llama_sampler * smpl) {
    delete (dysco_greedy *) smpl->ctx;
}

static bool greedy_backend_init(llama_sampler * smpl, ggml_backend_buffer_type_t buft, uint32_t) {
    auto & g = *(dysco_greedy *) smpl->ctx;
    ggml_backend_dev_t dev = ggml_backend_buft_get_device(buft);
    g.chunked = greedy_alloc_ids(g, buft);
    if (g.chunked && dev) {
        g.chunked = greedy_supported(g, dev, g.n_vocab) && greedy_supported(g, dev, DYSCO_PROBE_LOGITS);
    }
    if (!g.chunked) { // a single-stage argmax reads no token table
        g.ids = nullptr;
        g.buf.reset();
        g.ctx.reset();
    }
    return !dev || g.chunked || greedy_supported(g, dev, g.n_vocab);
}

static void greedy_backend_apply(llama_sampler * smpl, ggml_context * ctx, ggml_cgraph *, llama_sampler_data * data) {
    data->sampled = greedy_argmax(ctx, *(const dysco_greedy *) smpl->ctx, data->logits);
    ggml_set_name(data->sampled, "dysco_greedy_token");
}

// Nothing changes from token to token: a copy has nothing to take over.
static void greedy_copy_state(const llama_sampler *, llama_sampler *) {}

static llama_sampler_i greedy_iface = {
    /* .name              = */ greedy_name,
    /* .accept            = */ nullptr,
    /* .apply             = */ greedy_apply,
    /* .reset             = */ nullptr,
    /* .clone             = */ greedy_clone,
    /* .free              = */ greedy_free,
    /* .backend_init      = */ greedy_backend_init,
    /* .backend_accept    = */ nullptr,
    /* .backend_apply     = */ greedy_backend_apply,
    /* .backend_set_input = */ nullptr,
    /* .backend_reset     = */ nullptr,
    /* .copy_state        = */ greedy_copy_state,
};

static llama_sampler * greedy_clone(const llama_sampler * smpl) {
    return llama_sampler_init(&greedy_iface, new dysco_greedy { ((const dysco_greedy *) smpl->ctx)->n_vocab });
}

struct llama_sampler * dysco_sampler_init_greedy(const struct llama_context * ctx) {
    if (!ctx) {
        return nullptr;
    }
    const llama_vocab * vocab = llama_model_get_vocab(llama_get_model(ctx));
    return llama_sampler_init(&greedy_iface, new dysco_greedy { llama_vocab_n_tokens(vocab) });
}
