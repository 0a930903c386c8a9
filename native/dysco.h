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

// Host-side bookkeeping in the context, for long contexts where numpy's per-step cost shows:
// the importance vector over positions, updated from the last scores, and the selection and
// bias of one step (python/dysco_edge/selection.py does the same with the same bits).
// Resets the importance to n_positions zeros.
int32_t dysco_importance_reset(struct llama_context * ctx, int32_t n_positions);
// importance := (scores[0..q-1] + decay * importance, scores[q]) / sum, from the last scores
// (which must cover one position more than the importance). Returns the new length.
int32_t dysco_importance_update(struct llama_context * ctx, double decay);
// Copies min(n_max, length) values to out (out may be NULL); returns the length.
int32_t dysco_importance_get(struct llama_context * ctx, double * out, int32_t n_max);
// Replaces the importance with n values (finite, >= 0), e.g. to restore a saved one.
int32_t dysco_importance_set(struct llama_context * ctx, const double * values, int32_t n);
// Selects S from the importance (top_p <= 0: no nucleus, top_k <= 0: no top-k, not both) and
// sets the bias of `seq_id` over positions 0..pos as dysco_set_bias would: log(strength) on S
// minus the template positions (template_mask[p] != 0, p < n_template) and on pos; with
// strength >= hard_strength, 0 on S and pos and -INFINITY elsewhere. pos is the last position
// the importance covers (the token just probed). Writes S (ascending) to `selected` when not NULL (n_max at most); returns |S|.
int32_t dysco_select_bias(struct llama_context * ctx, int32_t seq_id, int32_t pos, double top_p, int32_t top_k,
                          double strength, double hard_strength, const uint8_t * template_mask, int32_t n_template,
                          int32_t * selected, int32_t n_max);

// dysco_select_bias done by the full pass instead, for decoding: probes `token` at `pos` (as
// dysco_probe) and arms a selection that the next llama_decode of that token at `pos` in
// `seq_id` runs once its KV mask is filled: importance update with `decay` (as
// dysco_importance_update), then S and bias (as dysco_select_bias). The probe's scores are read
// there, so the pass's host work up to its mask overlaps the probe on a GPU. The importance must
// cover positions 0..pos-1. Same bits as the three calls it replaces.
int32_t dysco_probe_select(struct llama_context * ctx, int32_t token, int32_t pos, int32_t seq_id, double decay,
                           double top_p, int32_t top_k, double strength, double hard_strength,
                           const uint8_t * template_mask, int32_t n_template);
// Fast mode (not the spec; no probe): arms a selection that the next llama_decode of the token at
// `pos` in `seq_id` runs once its KV mask is filled, from the scores of the full pass before it:
// those scores (positions 0..pos-1) are folded into the importance unless they already are, then S
// is selected from it and the bias set over 0..pos as dysco_select_bias would (pos itself gets
// log(strength)). Turns score capture on, so that the pass scores its own token for the next step.
// Returns 1 when armed, 0 when nothing has scored the positions before pos yet (the importance is
// only a reset's zeros): probe that step instead (dysco_probe_select).
int32_t dysco_fast_select(struct llama_context * ctx, int32_t pos, int32_t seq_id, double decay, double top_p,
                          int32_t top_k, double strength, double hard_strength, const uint8_t * template_mask,
                          int32_t n_template);
// After that full pass: writes S (ascending, n_max at most) when `selected` is not NULL and returns
// |S|, or DYSCO_ERR_NO_SCORES with the reason when the pass did not select (it then ran unbiased).
// Disarms the selection; so does dysco_clear_bias of its sequence.
int32_t dysco_pass_selection(struct llama_context * ctx, int32_t * selected, int32_t n_max);

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
