// Host-side DySCO bookkeeping: the importance update and the selection S (DYSCO_SPEC.md "State",
// "Procedure" 3.2-3.3), the C twin of python/dysco_edge/selection.py with the same bits.
#pragma once

#include <cstdint>
#include <vector>

// importance := (attn[0..q-1] + decay * importance, attn[q]) / their sum, for q = importance.size()
// and attn of q + 1 entries, computed in `next` and swapped in. False (importance untouched) when
// the sum is not finite and > 0.
bool dysco_importance_step(std::vector<double> & importance, std::vector<double> & next, const std::vector<float> & attn,
                           double decay);

// Reused between selections (no allocation per step).
struct dysco_select_scratch {
    std::vector<double>   values;    // [n_cand] candidate values, in position order
    std::vector<int32_t>  positions; // [n_cand] their positions
    std::vector<double>   top;       // [n_top] the largest candidate values, descending; the floor's sample before that
    std::vector<uint64_t> keys;      // [n_cand] their bits, in the radix select (fewer as it narrows)
};

// S in ascending positions: the nucleus of mass top_p (top_p > 0), the top_k largest (top_k > 0),
// or, with both, the nucleus unless it holds more than top_k positions. Ties at the boundary keep
// the lower positions.
void dysco_select(const std::vector<double> & importance, double top_p, int32_t top_k,
                  dysco_select_scratch & scratch, std::vector<int32_t> & out);

// The bias over positions 0..pos: soft (strength < hard_strength) log(strength) on S minus the
// template positions and on pos, 0 elsewhere; hard 0 on S and pos, -inf elsewhere.
void dysco_bias_fill(const std::vector<int32_t> & selected, int32_t pos, double strength, double hard_strength,
                     const uint8_t * template_mask, int32_t n_template, std::vector<float> & bias);
