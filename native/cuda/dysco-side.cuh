// DySCO's QR-head scores and importance fold on a side stream of their own (dysco-edge).
//
// No node of the model reads them within the step (the host and the next step's selection do), so
// they need not hold up the layers that follow: each run of them waits for the main stream's work
// before it and runs beside what comes after; the main stream waits for them only where it reads
// one of their results, and at the end of the graph. Their tensors stay allocated to the end of the
// graph (ggml_cuda_dysco_side_keep), so no later node reuses memory they may still read or write.
// Under a CUDA graph the waits become the captured graph's edges.
#pragma once

#include <unordered_set>

struct ggml_tensor;
struct ggml_cgraph;
struct ggml_backend_graph_optimize_params;
struct ggml_backend_cuda_context;

// the stream number the side nodes run on: the last, clear of the attention-norm fork's 1..3
#define GGML_CUDA_DYSCO_SIDE_STREAM (GGML_CUDA_MAX_STREAMS - 1)

struct ggml_cuda_dysco_side {
    cudaEvent_t fork = nullptr; // the main stream's work so far, which a run of side nodes waits for
    cudaEvent_t join = nullptr; // the side stream's work so far, which the main stream waits for
    // what the side work issued since the main stream last waited for it writes (tensors, their view_src);
    // empty: none is pending
    std::unordered_set<const ggml_tensor *> written;

    ~ggml_cuda_dysco_side();
};

// Whether node runs on the side stream: DySCO's score and fold nodes, named so by dysco-edge.
bool ggml_cuda_dysco_side_node(const ggml_tensor * node);

// graph_optimize: keeps every tensor a side node reads or writes allocated to the graph's last node.
void ggml_cuda_dysco_side_keep(ggml_cgraph * cgraph, ggml_backend_graph_optimize_params * params);

// Before node i computes (it and the nodes fused with it): picks its stream and adds the waits.
void ggml_cuda_dysco_side_route(ggml_backend_cuda_context & ctx, const ggml_cgraph * cgraph, int i);

// After the last node: the main stream waits for the side stream, and is current again.
void ggml_cuda_dysco_side_join(ggml_backend_cuda_context & ctx);
