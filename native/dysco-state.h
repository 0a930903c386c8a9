// Per-context DySCO state, owned through llama_cparams::dysco (see the cparams patch).
#pragma once

#include "llama.h"
#include "llama-batch.h"
#include "llama-graph.h"

#include "ggml-cpp.h"

#include <cstdint>
#include <map>
#include <string>
#include <vector>

struct ggml_tensor;

enum dysco_cache_kind { DYSCO_CACHE_BASE = 0, DYSCO_CACHE_SWA = 1, DYSCO_CACHE_KINDS = 2 };

// Graph name of the score accumulator of one cache kind.
const char * dysco_score_name(int kind);

struct llama_kv_cells;
class llama_kv_cache;

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
    ggml_tensor * biased    = nullptr; // [n_kv, n_tokens, 1, 1] the KQ mask plus the selection's bias
    ggml_tensor * cells     = nullptr; // [n_tokens] I64 the cell of each ubatch token (within its stream)
    std::vector<ggml_tensor *> stream_acc; // [ns] per run of stream chunks scored together (at its first chunk): QR-head score sums
    std::vector<ggml_tensor *> stream_mask; // [ns] likewise: the run's scored KQ-mask rows, one view for all layers
    std::vector<const ggml_tensor *> inputs; // what llama.cpp handed the DySCO hooks (q, k, kq_mask of each layer)
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

// DYSCO_HOST_TIMELINE=1: host time between the hook points of the decode steps, summarised and printed
// to stderr when the context is freed (where a step's host time goes, on machines without a profiler).
enum dysco_mark {
    DYSCO_MARK_PROBE_START, DYSCO_MARK_PROBE_MASK_IN, DYSCO_MARK_PROBE_MASK_OUT, DYSCO_MARK_PROBE_LAUNCHED,
    DYSCO_MARK_PROBE_END, DYSCO_MARK_PASS_MASK_IN, DYSCO_MARK_PASS_MASK_OUT,
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
    struct {                        // the last scoring pass, until its scores are read (dysco_scores_sync)
        ggml_cgraph *        gf    = nullptr;
        ggml_backend_sched_t sched = nullptr;
    } pending;
};

// The per-sequence bias added to the KQ mask of full passes.
struct dysco_bias {
    std::map<int32_t, std::vector<float>> by_seq; // seq_id -> [n_pos] bias over positions
    std::vector<int32_t> nonzero;                 // [n_nonzero] positions of a sparse bias, scratch of the mask hook
};

// One tracked sequence's DySCO state beside the per-cell tensors (dysco_track).
struct dysco_seq_track {
    bool    on      = false;  // since dysco_importance_reset: scoring passes fold their scores in
    bool    scored  = false;  // a fold ran since the reset
    bool    capture = false;  // this sequence's full passes score and fold (dysco_set_seq_capture; fast mode)
    int32_t n_pos   = 0;      // positions the importance covers: the reset's, then one per fold
    double  decay = 0.0, top_p = 0.0, strength = 0.0, hard_strength = 0.0;
    int32_t top_k = 0;

    // the full pass armed to select and bias itself
    bool    armed     = false;
    int32_t armed_pos = -1;
    bool    selected  = false;  // that pass ran with the selection in its graph
    int32_t selected_pos = -1;  // position of the last selecting pass
    int32_t selected_n   = 0;   // positions its importance covered (S is among them)

    std::vector<uint8_t> template_mask; // [n_template] 1: a template position (by position)
};

// Importance, selection and bias as graph ops (dysco-track.cpp): the importance lives on the
// backend, one value per KV cell (the position the cell holds), one row per KV stream; scoring
// passes fold their QR-head scores into it, and an armed full pass selects S from it and adds the
// bias to its KQ mask, all inside the graph. The host only arms passes and reads S back when asked.
// Several sequences are tracked when each has a KV stream of its own (a parallel context); on one
// shared stream only `seq_id` is.
struct dysco_track {
    std::map<int32_t, dysco_seq_track> seqs; // seq_id -> its state
    int32_t seq_id = 0;                      // the sequence of the last reset (the calls without a seq_id)

    ggml_context_ptr        ctx;
    ggml_backend_buffer_ptr buf;
    ggml_tensor * imp  = nullptr; // [kv_size, n_stream] importance of the position each cell holds (0: none)
    ggml_tensor * sel  = nullptr; // [kv_size, n_stream] 1: the cell is in S of the last selecting pass
    ggml_tensor * keep = nullptr; // [kv_size, n_stream] 0: the cell holds a template position, else 1
    const llama_kv_cache * kv = nullptr; // the cache whose cells the tensors index
    std::vector<float> scratch;   // [kv_size] readback and upload of one stream's row

    dysco_seq_track *       find(int32_t seq);
    const dysco_seq_track * find(int32_t seq) const;
    dysco_seq_track &       cur() { return seqs[seq_id]; }
    bool any_on() const;
};

// The probe: its layer cap, its one-token batch, and its own scheduler and graph (swapped into the
// context while a probe decodes), so that alternating probe and full passes rebuilds neither graph.
struct dysco_probe_graph {
    int32_t                layers = 0;       // > 0 while a probe pass is being decoded: L_max + 1
    llama_batch            batch  = {};      // [capacity] tokens: one per sequence probed together
    int32_t                capacity = 0;
    ggml_backend_sched_ptr sched;
    llm_graph_result_ptr   res;
    llm_graph_result *     active = nullptr;
};

// The placement log (dysco_set_placement_log; dysco-placement.cpp).
struct dysco_placement {
    bool on = false;
    std::map<std::string, int> seen; // "name\top\tlayer\tbackend\tattention backend" -> graphs computed
};

struct dysco_state {
    explicit dysco_state(const llama_model * model);
    ~dysco_state();

    const llama_model * model;

    dysco_qr_heads     heads;
    dysco_scores       scores;
    dysco_build_nodes  build[DYSCO_CACHE_KINDS];
    dysco_bias         bias;
    dysco_track        track;
    dysco_probe_graph  probe;
    dysco_head_capture heads_cap;
    dysco_slot_layout  slots;
    float              attn_scale = 1.0f; // multiplies every attention logit (AttnTS baseline); 1 = off
    dysco_timeline     timeline;
    dysco_placement    placement;

    bool scoring() const { return heads.n > 0 && (scores.capture || probe.layers > 0); }
    // a probe's scores read the last row of the attention's KQ mask [n_kv, n_tokens, 1, 1] in the
    // graph; other scoring passes read a copy of that row taken before any bias
    bool scores_read_kq_mask(const ggml_tensor * kq_mask) const;
    uint64_t graph_key() const;
};

// The tracked sequence of stream chunk c of the ubatch (its tokens c*nt .. c*nt+nt-1), or null; on a
// cache of one stream, the sequence of the last reset whatever the ubatch holds (dysco-track.cpp).
dysco_seq_track * dysco_track_chunk(dysco_state & st, const llama_ubatch & ub, uint32_t ns, uint32_t c);
// Whether a sequence's passes fold their scores now / an armed pass of it selects.
bool dysco_seq_folds(const dysco_state & st, const dysco_seq_track & t);

// After a pass (dysco-api.cpp): the importance now covers a folded position; an armed pass selected.
void dysco_track_done(dysco_state & st, const llama_ubatch & ub);

// Reads the scores of the last scoring pass if not done yet (dysco-mask.cpp).
void dysco_scores_sync(dysco_state & st);

// dysco-track.cpp: the graph side. The biased KQ mask of a pass with armed sequences (kq_mask unchanged
// when none is armed), and the fold of the scores `acc` [n_kv, 1, 1, n] (sums over the QR heads) of stream
// chunks c .. c+n-1 (of ns; a run of dysco_track_fold_run) into those sequences' importance; `mask`
// [n_kv, 1, 1, n] their scored rows of the unbiased KQ mask.
ggml_tensor * dysco_track_bias(const llm_graph_context & g, dysco_state & st, ggml_tensor * kq_mask);
// The fold returns its last node, for the caller to name its nodes after the layer (null: nothing folds).
ggml_tensor * dysco_track_fold(const llm_graph_context & g, dysco_state & st, uint32_t ns, uint32_t c, uint32_t n,
                               ggml_tensor * acc, ggml_tensor * mask);
// How many stream chunks from c on fold together (tracked, folding with one decay, on consecutive KV
// streams); 0 when chunk c's sequence does not fold.
uint32_t dysco_track_fold_run(dysco_state & st, const llama_ubatch & ub, uint32_t ns, uint32_t c);
// Allocates the per-cell tensors for the cells of `kv` (once per cache); false when it cannot.
bool dysco_track_alloc(dysco_state & st, const llama_kv_cache & kv);

// dysco-placement.cpp. Names dysco_<group>_<op>-<il> every node of the subgraph ending in `out` that DySCO
// added (down to the leaves and to `stop`, the tensors it reads from llama.cpp's graph; dysco* names stay).
void dysco_name_nodes(ggml_tensor * out, const char * group, int il, const std::vector<const ggml_tensor *> & stop);
// After a graph ran: its DySCO nodes' backends, printed (DYSCO_SCHED_REPORT) and/or logged (placement.on).
void dysco_placement_record(dysco_state & st, ggml_cgraph * gf, ggml_backend_sched_t sched);
// The log, one line per distinct row: "name\top\tlayer\tbackend\tattention backend\tgraphs\n".
std::string dysco_placement_text(const dysco_state & st);
