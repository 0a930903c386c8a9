#include "common.cuh"
#include "dysco-side.cuh"

#include "ggml-backend-impl.h"

#include <cstring>

ggml_cuda_dysco_side::~ggml_cuda_dysco_side() {
    if (fork != nullptr) {
        CUDA_CHECK(cudaEventDestroy(fork));
    }
    if (join != nullptr) {
        CUDA_CHECK(cudaEventDestroy(join));
    }
}

// GGML_CUDA_DYSCO_SIDE=0 runs them on the main stream, in graph order, as every other node
static bool dysco_side_enabled() {
    static const bool on = [] {
        const char * env = getenv("GGML_CUDA_DYSCO_SIDE");
        return env == nullptr || atoi(env) != 0;
    }();
    return on;
}

bool ggml_cuda_dysco_side_node(const ggml_tensor * node) {
    // the names dysco-edge gives them (dysco-graph.cpp, dysco-track.cpp): the selection and the bias
    // stay on the main stream, as the attention reads them at once
    static const char * const prefixes[] = { "dysco_score", "dysco_kq_range", "dysco_probs_range", "dysco_fold",
                                             "dysco_importance_fold" };
    if (!dysco_side_enabled() || strncmp(node->name, "dysco_", 6) != 0) {
        return false;
    }
    for (const char * p : prefixes) {
        if (strncmp(node->name, p, strlen(p)) == 0) {
            return true;
        }
    }
    return false;
}

void ggml_cuda_dysco_side_keep(ggml_cgraph * cgraph, ggml_backend_graph_optimize_params * params) {
    if (cgraph->n_nodes == 0) {
        return;
    }
    ggml_tensor * last = cgraph->nodes[cgraph->n_nodes - 1];
    for (int i = 0; i < cgraph->n_nodes; ++i) {
        ggml_tensor * node = cgraph->nodes[i];
        if (!ggml_cuda_dysco_side_node(node)) {
            continue;
        }
        if (node != last) {
            params->add_alloc_dep(params->user_data, node, last);
        }
        for (ggml_tensor * src : node->src) {
            if (src != nullptr) {
                params->add_alloc_dep(params->user_data, src, last);
            }
        }
    }
}

// as ggml_cuda_graph_evaluate_and_capture decides which nodes it computes
static bool dysco_side_computes(const ggml_tensor * t) {
    return !ggml_is_empty(t) && t->op != GGML_OP_NONE && t->op != GGML_OP_VIEW && t->op != GGML_OP_RESHAPE &&
           t->op != GGML_OP_PERMUTE && t->op != GGML_OP_TRANSPOSE && (t->flags & GGML_TENSOR_FLAG_COMPUTE);
}

static const ggml_tensor * dysco_side_base(const ggml_tensor * t) {
    return t->view_src ? t->view_src : t;
}

static bool dysco_side_reads_written(const ggml_cuda_dysco_side & side, const ggml_tensor * node) {
    for (const ggml_tensor * src : node->src) {
        if (src != nullptr && (side.written.count(src) || side.written.count(dysco_side_base(src)))) {
            return true;
        }
    }
    return false;
}

static void dysco_side_wait(ggml_backend_cuda_context & ctx, cudaEvent_t & event, int from, int to) {
    if (event == nullptr) {
        CUDA_CHECK(cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
    }
    CUDA_CHECK(cudaEventRecord(event, ctx.stream(ctx.device, from)));
    CUDA_CHECK(cudaStreamWaitEvent(ctx.stream(ctx.device, to), event, 0));
}

static void dysco_side_join_main(ggml_backend_cuda_context & ctx) {
    auto & side = ctx.dysco_side;
    dysco_side_wait(ctx, side.join, GGML_CUDA_DYSCO_SIDE_STREAM, 0);
    side.written.clear();
}

void ggml_cuda_dysco_side_route(ggml_backend_cuda_context & ctx, const ggml_cgraph * cgraph, int i) {
    auto & side = ctx.dysco_side;
    if (!ggml_cuda_dysco_side_node(cgraph->nodes[i])) {
        if (ctx.curr_stream_no == GGML_CUDA_DYSCO_SIDE_STREAM) {
            ctx.curr_stream_no = 0;
        }
        if (!side.written.empty() && dysco_side_reads_written(side, cgraph->nodes[i])) {
            dysco_side_join_main(ctx);
        }
        return;
    }
    if (ctx.curr_stream_no == GGML_CUDA_DYSCO_SIDE_STREAM) {
        return;
    }
    // a run starts: it waits for what the main stream has issued so far (its inputs among it)
    dysco_side_wait(ctx, side.fork, 0, GGML_CUDA_DYSCO_SIDE_STREAM);
    ctx.curr_stream_no = GGML_CUDA_DYSCO_SIDE_STREAM;
    // what the run writes, up to the next node the main stream computes: the nodes fused into others (the
    // chain of adds) included; a view writes nothing (the views of q and K would make the attention wait)
    for (int j = i; j < cgraph->n_nodes; ++j) {
        const ggml_tensor * node = cgraph->nodes[j];
        if (!dysco_side_computes(node)) {
            continue;
        }
        if (!ggml_cuda_dysco_side_node(node)) {
            break;
        }
        side.written.insert(dysco_side_base(node));
    }
}

void ggml_cuda_dysco_side_join(ggml_backend_cuda_context & ctx) {
    if (ctx.curr_stream_no == GGML_CUDA_DYSCO_SIDE_STREAM) {
        ctx.curr_stream_no = 0;
    }
    if (!ctx.dysco_side.written.empty()) {
        dysco_side_join_main(ctx);
    }
}
