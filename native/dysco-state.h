// Per-context DySCO state, owned through llama_cparams::dysco (see the cparams patch).
#pragma once

#include "llama.h"
#include "llama-batch.h"
#include "llama-graph.h"

#include "ggml-cpp.h"
#include "dysco-select.h"

#include <cstdint>
#include <map>
#include <string>
#include <vector>

struct ggml_tensor;

enum dysco_cache_kind { DYSCO_CACHE_BASE = 0, DYSCO_CACHE_SWA = 1, DYSCO_CACHE_KINDS = 2 };

// Graph name of the score accumulator of one cache kind.
const char * dysco_score_name(int kind);

struct llama_kv_cells;

// What the host kept of one KV mask when it was filled: the scored token's unbiased row
// and which position each of its cells holds (-1: not attended), and back.
struct dysco_mask_row {
    std::vector<float>   mask;         // [n_kv]
    std::vector<int32_t> cell_pos;     // [n_kv]
    std::vector<int32_t> pos_cell;     // [pos + 1] the cell holding each position (-1: none attended)
    bool                 pos_unique = false; // no two attended cells hold one position (pos_cell is exact)
    int32_t              pos = -1;     // position of the scored token
    int32_t              seq = -1;     // its sequence

    // A probe's row is read once its graph is launched (off the device's idle time): where it is.
    struct source {
        const void *           data  = nullptr; // the mask row (F16 or F32), still in the input buffer
        bool                   f16   = false;
        int64_t                n_kv  = 0;
        const llama_kv_cells * cells = nullptr;
        bool                   by_slot = false;
    } src;
    bool positions_ready = false; // cell_pos and pos_cell describe this row
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
    dysco_head_rows    rows[DYSCO_CACHE_KINDS]; // for the ubatch being computed
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

// A selection made by the full pass of (seq_id, pos) right after its KV mask is filled
// (dysco_probe_select): the probe's scores are read there, so that the pass's host work before
// that point (batch, graph reuse, mask fill) runs while the probe is still on the device.
struct dysco_pass_select {
    bool    armed  = false; // waiting for its full pass, or for dysco_pass_selection
    bool    done   = false; // the pass selected S and set the bias
    bool    fast   = false; // no probe: S from the importance before pos (dysco_fast_select)
    int32_t seq_id = -1;
    int32_t pos    = -1;
    double  decay = 0.0, top_p = 0.0, strength = 0.0, hard_strength = 0.0;
    int32_t top_k = 0;
    std::vector<uint8_t> template_mask; // [n_template] 1: a template position
    std::string          error;  // why the pass could not select ("" when it did)
};

// DYSCO_HOST_TIMELINE=1: host time between the hook points of the decode steps, summarised and printed
// to stderr when the context is freed (where a step's host time goes, on machines without a profiler).
enum dysco_mark {
    DYSCO_MARK_PROBE_START, DYSCO_MARK_PROBE_MASK_IN, DYSCO_MARK_PROBE_MASK_OUT, DYSCO_MARK_PROBE_LAUNCHED,
    DYSCO_MARK_PROBE_END, DYSCO_MARK_PASS_MASK_IN, DYSCO_MARK_PASS_SCORES, DYSCO_MARK_PASS_SELECTED, DYSCO_MARK_PASS_MASK_OUT,
    DYSCO_MARK_PASS_LAUNCHED, DYSCO_MARKS
};

struct dysco_timeline {
    bool    on   = false;
    int64_t last = 0;                        // us of the previous mark
    std::vector<float> us[DYSCO_MARKS];      // [n_intervals] every interval (medians: a prefill's wait would swamp a mean)

    void mark(int point, bool count = true); // adds the time since the previous mark to `point` (when count)
    void print() const;
};

// The QR heads (dysco_set_heads).
struct dysco_qr_heads {
    std::vector<std::vector<int32_t>> by_layer; // [n_layer] -> query heads of the layer
    int32_t  n       = 0;                        // heads over all layers
    int32_t  l_max   = -1;                       // last layer holding one (-1: none)
    uint64_t version = 0;                        // bumped by every set: part of the graph key
};

// Scoring: which passes score, the mask rows the host kept for them, and the score vector read
// back from the last scoring pass.
struct dysco_scores {
    bool           capture = false; // full passes score too (dysco_set_capture), not only probes
    dysco_mask_row row[DYSCO_CACHE_KINDS];

    std::vector<float> values;      // [pos + 1] mean QR-head probability per position
    int32_t            pos   = -1;  // position of the scored token
    bool               valid = false;
    std::vector<float> readback;    // [n_kv] scratch for the device->host copy
};

// The per-sequence bias added to the KQ mask of full passes.
struct dysco_bias {
    std::map<int32_t, std::vector<float>> by_seq; // seq_id -> [n_pos] bias over positions
    std::vector<int32_t> nonzero;                 // [n_nonzero] positions of a sparse bias, scratch of the mask hook
};

// Host-side bookkeeping of the importance and the selection S (dysco_importance_*, dysco_select_bias,
// dysco_probe_select).
struct dysco_selection {
    std::vector<double>  importance;      // [n_pos] positions seen so far
    std::vector<double>  importance_next; // [n_pos + 1] the update's output, swapped in (no allocation per step)
    dysco_select_scratch scratch;         // candidates of a selection
    std::vector<int32_t> selected;        // [|S|] S of the last dysco_select_bias or pass selection
    bool                 scored = false;  // the importance holds scores, not only the zeros of a reset
    dysco_pass_select    pass;            // the selection armed for the next full pass
};

// The probe: its layer cap, its one-token batch, and its own scheduler and graph (swapped into the
// context while a probe decodes), so that alternating probe and full passes rebuilds neither graph.
struct dysco_probe_graph {
    int32_t                layers = 0;       // > 0 while a probe pass is being decoded: L_max + 1
    llama_batch            batch  = {};      // [1] token
    ggml_backend_sched_ptr sched;
    llm_graph_result_ptr   res;
    llm_graph_result *     active = nullptr;
    bool                   scores_deferred = false; // the last probe's scores are still in its graph
};

struct dysco_state {
    explicit dysco_state(const llama_model * model);
    ~dysco_state();

    const llama_model * model;

    dysco_qr_heads     heads;
    dysco_scores       scores;
    dysco_build_nodes  build[DYSCO_CACHE_KINDS];
    dysco_bias         bias;
    dysco_selection    selection;
    dysco_probe_graph  probe;
    dysco_head_capture heads_cap;
    dysco_slot_layout  slots;
    float              attn_scale = 1.0f; // multiplies every attention logit (AttnTS baseline); 1 = off
    dysco_timeline     timeline;

    bool scoring() const { return heads.n > 0 && (scores.capture || probe.layers > 0); }
    // a probe's scores read the last row of the attention's KQ mask [n_kv, n_tokens, 1, 1] in the
    // graph; other scoring passes read a copy of that row taken before any bias
    bool scores_read_kq_mask(const ggml_tensor * kq_mask) const;
    uint64_t graph_key() const;
};

// Runs an armed pass selection (dysco-mask.cpp): reads the probe's scores (fast: the previous full
// pass's, when not folded yet), updates the importance, selects S and sets the bias of the pass's
// sequence. Failures go to selection.pass.error.
void dysco_pass_select_run(dysco_state & st);
