// dysco.h: C API of the DySCO extension compiled into libllama.
//
// Every function returns DYSCO_OK (0) or a negative dysco_status; the reason is then
// available from dysco_last_error() on the same thread.
#pragma once

#include <stdbool.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

struct llama_context;
struct llama_sampler;

enum dysco_status {
    DYSCO_OK              =  0,
    DYSCO_ERR_ARGUMENT    = -1, // a null pointer, a negative count, an unknown sequence
    DYSCO_ERR_HEAD        = -2, // a QR head outside the model
    DYSCO_ERR_NO_HEADS    = -3, // a probe or score capture with no QR heads set
    DYSCO_ERR_RANGE       = -4, // a bias longer than the sequence
    DYSCO_ERR_DECODE      = -5, // llama_decode failed during a probe
    DYSCO_ERR_NO_SCORES   = -6, // no scores were captured by the last decode
    DYSCO_ERR_UNSUPPORTED = -7, // the model's memory is not a plain or iSWA KV cache
};

// Message of the last failing call on this thread ("" when none failed).
const char * dysco_last_error(void);

// QR heads as (layer, query head) pairs, 0-based, query heads in Hugging Face order.
// Validated against the model; on error the previous heads stay in place.
int32_t dysco_set_heads(struct llama_context * ctx, const int32_t * layers, const int32_t * heads, int32_t n_heads);
int32_t dysco_clear_heads(struct llama_context * ctx);

// Largest layer among the QR heads, or DYSCO_ERR_NO_HEADS.
int32_t dysco_l_max(struct llama_context * ctx);

// Score capture in full passes: when on, every llama_decode also records the QR-head scores
// of its last token (unbiased attention), readable with dysco_get_scores.
int32_t dysco_set_capture(struct llama_context * ctx, bool on);

// Probe: runs layers 0..L_max for one token at `pos` of sequence `seq_id`, without bias and
// without logits, records its scores, then removes the token's KV cell again. Disarms a
// selection armed by dysco_probe_select.
int32_t dysco_probe(struct llama_context * ctx, int32_t token, int32_t pos, int32_t seq_id);

// Additive bias over positions 0..n_bias-1 of `seq_id`, applied to every layer's and head's
// attention logits in later full passes (-INFINITY allowed). Positions >= n_bias get 0.
// n_bias may be at most (largest position of the sequence) + 2, i.e. cover the next token.
int32_t dysco_set_bias(struct llama_context * ctx, int32_t seq_id, const float * bias, int32_t n_bias);
int32_t dysco_clear_bias(struct llama_context * ctx, int32_t seq_id);

// Scores of the last scored token: mean over the QR heads of its attention probability to
// every position 0..p of its sequence. With out == NULL returns the count p+1; otherwise
// writes min(n_max, p+1) floats and returns p+1.
int32_t dysco_get_scores(struct llama_context * ctx, float * out, int32_t n_max);

// Position of the token the last scores belong to, or a negative dysco_status.
int32_t dysco_scores_pos(struct llama_context * ctx);

// All-heads capture, for QR-head detection: in later decodes, the attention probabilities
// (unbiased) of every query head of layers 0..layer_end-1 (0 = all layers) from the tokens at
// positions [pos_begin, pos_end) to every position are summed over those tokens. Setting a
// range starts a new sum. The tokens of one capture must belong to one sequence.
int32_t dysco_set_head_capture(struct llama_context * ctx, int32_t pos_begin, int32_t pos_end, int32_t layer_end);
int32_t dysco_clear_head_capture(struct llama_context * ctx);

// Shape of the captured attention: layers, query heads (the largest count of a layer) and
// positions (largest captured position + 1). Returns the number of tokens summed.
int32_t dysco_head_scores_shape(struct llama_context * ctx, int32_t * n_layer, int32_t * n_head, int32_t * n_pos);

// The captured attention averaged over the captured tokens, [n_layer][n_head][n_pos] floats
// (n_max must hold them all). Returns the number of tokens averaged.
int32_t dysco_get_head_scores(struct llama_context * ctx, float * out, int64_t n_max);

// Multiplies every attention logit (after the 1/sqrt(d) scale) of every layer and head by
// `scale` in later decodes, prefill included: the uniform attention-temperature baseline.
// 1 turns it off.
int32_t dysco_set_attn_scale(struct llama_context * ctx, float scale);

// Placement of the nodes DySCO adds to a graph (every one is named dysco*): with `on`, every later
// decode records, for each such node that computes, the backend ggml's scheduler runs it on and the
// backend running its layer's attention. Turning it on starts a new record.
int32_t dysco_set_placement_log(struct llama_context * ctx, bool on);
// The record, one line per distinct node and placement:
// "name\top\tlayer\tbackend\tattention backend\tcount\n" (layer -1 and attention backend "" when not
// known; count: times a node of that name was computed so placed). Writes at most n_max bytes,
// NUL-terminated, to out (NULL: none) and returns the text's length.
int32_t dysco_get_placement(struct llama_context * ctx, char * out, int32_t n_max);

// Importance, selection and bias inside the decode graph (native/dysco-track.cpp), for a plain KV
// cache: the importance lives on the backend, one value per KV cell. Scoring passes (probes, and full
// passes with capture on) fold their scores into it (DYSCO_SPEC.md "update"); an armed full pass
// selects S from it and adds the bias to its own KQ mask, with no host round trip.
// python/dysco_edge/runtime/selection.py is the reference it is tested against.

// 1 when this context's memory is a plain KV cache (the graph bookkeeping works), 0 otherwise.
int32_t dysco_track_supported(struct llama_context * ctx);
// Starts tracking sequence `seq_id` with n_positions positions fed and zero importance, for the
// selection parameters given: top_p <= 0: no nucleus, top_k <= 0: no top-k (not both); with
// strength >= hard_strength the bias is the hard mask (0 on S and the current token, a large negative
// elsewhere), else log(strength) on S minus the template positions (template_mask[p] != 0) and on
// the current token.
int32_t dysco_importance_reset(struct llama_context * ctx, int32_t seq_id, int32_t n_positions, double decay,
                               double top_p, int32_t top_k, double strength, double hard_strength,
                               const uint8_t * template_mask, int32_t n_template);
// The importance by position (waits for the device): copies min(n_max, length) values to out (out
// may be NULL); returns the length.
int32_t dysco_importance_get(struct llama_context * ctx, double * out, int32_t n_max);
// Replaces the importance of positions 0..n-1 (finite, >= 0), e.g. to restore a saved one.
int32_t dysco_importance_set(struct llama_context * ctx, const double * values, int32_t n);
// Exact DySCO: probes `token` at `pos` (as dysco_probe; the probe folds its scores into the
// importance, which must cover 0..pos-1) and arms the next full pass of `seq_id` to select S from
// the importance over 0..pos and bias itself.
int32_t dysco_probe_select(struct llama_context * ctx, int32_t token, int32_t pos, int32_t seq_id);
// Fast mode (not the spec; no probe): arms the next full pass of the token at `pos` to select S from
// the importance over 0..pos-1 and bias itself, and turns score capture on so that the pass folds its
// own scores for the next step. Returns 1 when armed, 0 when nothing has scored yet (the importance is
// a reset's zeros): probe that step instead (dysco_probe_select).
int32_t dysco_fast_select(struct llama_context * ctx, int32_t pos, int32_t seq_id);
// After that full pass: disarms; writes S (ascending positions, n_max at most; before template removal)
// when `selected` is not NULL and returns |S| (this waits for the pass), else returns 0.
// DYSCO_ERR_NO_SCORES when the pass did not select.
int32_t dysco_pass_selection(struct llama_context * ctx, int32_t * selected, int32_t n_max);

// Several sequences (a context whose sequences have a KV stream each, kv_unified false): each
// sequence reset with dysco_importance_reset is tracked on its own, so that fast-mode sequences and
// plain ones share a decode batch (a sequence's selection, bias, scores and fold read its own stream
// only). On a context of one stream only the last reset sequence is tracked, as the calls above say.
// The calls above without a seq_id act on the last reset sequence.
//
// The importance of seq_id (as dysco_importance_get; seq_id -1: the last reset sequence).
int32_t dysco_importance_get_seq(struct llama_context * ctx, int32_t seq_id, double * out, int32_t n_max);
// As dysco_pass_selection, for the armed pass of seq_id (-1: the last reset sequence).
int32_t dysco_pass_selection_seq(struct llama_context * ctx, int32_t seq_id, int32_t * selected, int32_t n_max);
// Whether seq_id's full passes score and fold their last token (its context warmup), whatever the
// context-wide capture says; dysco_fast_select turns it on for its sequence on a parallel context.
int32_t dysco_set_seq_capture(struct llama_context * ctx, int32_t seq_id, bool on);
// Exact DySCO for several sequences at once: dysco_probe_select of tokens[i] at pos[i] of seq_ids[i]
// (distinct sequences, each with a KV stream of its own) in one probe decode, each probe folding into
// its own sequence's importance; the next full pass of each then selects and biases itself.
int32_t dysco_probe_select_batch(struct llama_context * ctx, const int32_t * tokens, const int32_t * pos,
                                 const int32_t * seq_ids, int32_t n);
// Stops tracking seq_id (its generation ended): its passes neither fold nor select afterwards.
int32_t dysco_track_end(struct llama_context * ctx, int32_t seq_id);

// A greedy sampler for a chain given to llama_set_sampler (llama.cpp's backend sampling): the largest
// logit, as llama_sampler_init_greedy's graph picks it (ggml_argmax), taken in two stages (the argmax of
// chunks of the vocabulary, then of their maxima) where the device runs them, which a GPU does in
// parallel blocks. The chain that it is added to owns it. NULL when ctx is NULL.
struct llama_sampler * dysco_sampler_init_greedy(const struct llama_context * ctx);

// Slot layout, for replaying a reference harness (conformance tests), not for decoding:
// cells are addressed by slot instead of position (on a fresh unified KV cache the i-th token
// fed sits in slot i), so scores and bias are indexed by slot; the `hidden` slots are masked
// from every query of every pass (prefill and probes included); the rows of sequence
// `view_seq` (-1: none) attend every occupied cell whatever its position. This replays
// position ids that are not monotonic, which llama_decode refuses within one sequence.
int32_t dysco_set_slot_layout(struct llama_context * ctx, bool on, const int32_t * hidden, int32_t n_hidden,
                              int32_t view_seq);

#ifdef __cplusplus
}
#endif
