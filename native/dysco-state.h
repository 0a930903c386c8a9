// Per-context DySCO state, owned through llama_cparams::dysco (see the cparams patch).
#pragma once

#include "llama.h"
#include "llama-batch.h"
#include "llama-graph.h"

#include "ggml-cpp.h"
#include "dysco-select.h"

#include <cstdint>
#include <map>
#include <vector>

struct ggml_tensor;

enum dysco_cache_kind { DYSCO_CACHE_BASE = 0, DYSCO_CACHE_SWA = 1, DYSCO_CACHE_KINDS = 2 };

// Graph name of the score accumulator of one cache kind.
const char * dysco_score_name(int kind);

// What the host kept of one KV mask when it was filled: the scored token's unbiased row
// and which position each of its cells holds (-1: not attended).
struct dysco_mask_row {
    std::vector<float>   mask;      // [n_kv]
    std::vector<int32_t> cell_pos;  // [n_kv]
    int32_t              pos = -1;  // position of the scored token
};

// Graph nodes of the build in progress (reset at every graph build).
struct dysco_build_nodes {
    ggml_tensor * mask      = nullptr; // [n_kv, 1]      unbiased mask row of the scored token
    ggml_tensor * acc       = nullptr; // [n_kv, 1]      sum of QR-head probabilities over layers
    ggml_tensor * head_mask = nullptr; // [n_kv, n_sel]  unbiased mask rows of the head-captured tokens
};

// The mask rows of the ubatch tokens whose heads are captured (positions in the capture range).
struct dysco_head_rows {
    std::vector<float>   mask;      // [n_sel, n_kv]
    std::vector<int32_t> cell_pos;  // [n_kv] position of each cell (-1: not attended by the last row)
    int32_t              n_sel = 0;
};

// All-heads capture for QR-head detection: every layer's every query head, attention of the
// rows at positions [pos_begin, pos_end) summed over those rows.
struct dysco_head_capture {
    bool    on        = false;
    int32_t pos_begin = 0;
    int32_t pos_end   = 0;
    int32_t layer_end = 0;             // layers [0, layer_end) are captured
    int32_t n_head    = 0;             // largest query-head count of a layer
    int32_t n_rows    = 0;             // rows summed so far
    int32_t pos_last  = -1;            // largest position of a summed row
    std::vector<float> sum;            // [layer_end, n_head, pos_end]
    dysco_head_rows    rows[2];        // per cache kind, for the ubatch being computed
    std::vector<float> readback;       // [n_head, n_kv]

    // rows [i0, i0+n) of the ubatch that fall in the range (contiguous by position); n = 0 when none
    void select(const llama_ubatch & ub, uint32_t & i0, uint32_t & n) const;
};

// Slot layout, for replaying a reference harness whose position ids are not monotonic: cells
// are addressed by slot (on a fresh unified cache the i-th token fed sits in slot i) instead
// of by position, for scores and bias alike.
struct dysco_slot_layout {
    bool                 on       = false;
    std::vector<uint8_t> hidden;          // [slot] 1: masked from every query of every pass
    int32_t              view_seq = -1;   // rows of this sequence attend every occupied cell
};

struct dysco_state {
    explicit dysco_state(const llama_model * model);
    ~dysco_state();

    const llama_model * model;

    std::vector<std::vector<int32_t>> heads_by_layer; // [n_layer] -> query heads
    int32_t  n_heads       = 0;
    int32_t  l_max         = -1;
    uint64_t heads_version = 0;

    bool    capture      = false;
    int32_t probe_layers = 0; // > 0 while a probe pass is being decoded

    std::map<int32_t, std::vector<float>> bias_by_seq; // seq_id -> bias over positions

    dysco_build_nodes build[DYSCO_CACHE_KINDS];
    dysco_mask_row    row[DYSCO_CACHE_KINDS];

    std::vector<float> scores;         // [p+1] mean QR-head probability per position
    int32_t            scores_pos = -1;
    bool               scores_valid = false;
    std::vector<float> readback;       // [n_kv] scratch for the device->host copy

    llama_batch probe_batch;

    // the probe's own scheduler and graph (swapped into the context while a probe decodes), so that
    // alternating probe and full passes rebuilds neither graph
    ggml_backend_sched_ptr probe_sched;
    llm_graph_result_ptr   probe_res;
    llm_graph_result *     probe_active = nullptr;

    std::vector<double>  importance;       // [positions seen] host-side bookkeeping (dysco_importance_*)
    std::vector<double>  importance_next;  // the update's output, swapped in (no allocation per step)
    dysco_select_scratch select_scratch;   // candidates of a selection
    std::vector<int32_t> selected;         // S of the last dysco_select_bias

    dysco_head_capture heads_cap;
    float              attn_scale = 1.0f; // multiplies every attention logit (AttnTS baseline); 1 = off
    dysco_slot_layout  slots;

    bool scoring() const { return n_heads > 0 && (capture || probe_layers > 0); }
    // a probe's scores read the last row of the attention's KQ mask [n_kv, n_tokens, 1, 1] in the
    // graph; other scoring passes read a copy of that row taken before any bias
    bool scores_read_kq_mask(const ggml_tensor * kq_mask) const;
    uint64_t graph_key() const;
};
