// Host-side DySCO bookkeeping in C++ (see dysco-select.h). Compiled with -ffp-contract=off: a
// fused multiply-add would round the update differently from numpy.
#include "dysco-select.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>

// numpy's pairwise summation (blocks of 8 accumulators up to 128 values, halves above), so
// that the normalising sum has numpy's bits.
static double sum_pairwise(const double * a, size_t n) {
    if (n < 8) {
        double res = 0.0;
        for (size_t i = 0; i < n; ++i) {
            res += a[i];
        }
        return res;
    }
    if (n <= 128) {
        double r[8];
        std::copy(a, a + 8, r);
        size_t i = 8;
        for (; i < n - n % 8; i += 8) {
            for (int j = 0; j < 8; ++j) {
                r[j] += a[i + j];
            }
        }
        double res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for (; i < n; ++i) {
            res += a[i];
        }
        return res;
    }
    size_t half = n / 2;
    half -= half % 8;
    return sum_pairwise(a, half) + sum_pairwise(a + half, n - half);
}

bool dysco_importance_step(std::vector<double> & importance, std::vector<double> & next, const std::vector<float> & attn,
                           double decay) {
    const size_t q = importance.size();
    next.resize(q + 1);
    for (size_t i = 0; i < q; ++i) {
        next[i] = importance[i] * decay + (double) attn[i];
    }
    next[q] = (double) attn[q];
    const double total = sum_pairwise(next.data(), next.size());
    if (!(std::isfinite(total) && total > 0.0)) {
        return false;
    }
    for (double & v : next) {
        v /= total;
    }
    importance.swap(next);
    return true;
}

// A value that at least m of x reach, from a strided sample: a little under the m-th largest, so
// that filtering x by it leaves few more than m candidates. 0 when x is too small to bother.
static double candidate_floor(const std::vector<double> & x, size_t m, std::vector<double> & sample) {
    const size_t n = x.size(), n_sample = 1024;
    if (n < 8192 || m * 4 > n) {
        return 0.0;
    }
    sample.clear();
    for (size_t i = 0; i < n_sample; ++i) {
        sample.push_back(x[i * n / n_sample]);
    }
    // rank 1.5 m / n of the sample, with slack for sampling error
    const size_t rank = std::min(n_sample - 1, (size_t) (1.5 * (double) m * n_sample / (double) n) + 8);
    std::nth_element(sample.begin(), sample.begin() + (std::ptrdiff_t) rank, sample.end(), std::greater<double>());
    return sample[rank];
}

// The m largest values of x, in any order (out[m - 1] is the m-th largest). Selecting among the
// candidates above a sampled floor, not among all values: at 32K positions and m = 4096 the
// whole hybrid selection took 276 us before, 178 us after (2-core VM).
static void largest_unordered(const std::vector<double> & x, size_t m, std::vector<double> & out) {
    const double floor = candidate_floor(x, m, out);
    out.clear();
    if (floor > 0.0) {
        for (double v : x) {
            if (v >= floor) {
                out.push_back(v);
            }
        }
    }
    if (out.size() < m) { // the floor was too high (or not tried): every value is a candidate
        out.assign(x.begin(), x.end());
    }
    // also when m is every candidate: out[m - 1] must be the m-th largest
    if (m > 0 && m <= out.size()) {
        std::nth_element(out.begin(), out.begin() + (std::ptrdiff_t) m - 1, out.end(), std::greater<double>());
        out.resize(m);
    }
}

// The m largest values of x, in descending order.
static void largest_descending(const std::vector<double> & x, size_t m, std::vector<double> & out) {
    largest_unordered(x, m, out);
    std::sort(out.begin(), out.end(), std::greater<double>());
}

// Given the k + 1 largest values (any order, top[k] the smallest): whether the k largest hold at
// most top_p of the mass, so that the hybrid S is the top k, and the k-th largest value. Decided
// on their sum in any order, so no sort, with a margin far above the rounding by which it differs
// from selection.py's sorted running sum (k * 2^-52).
static bool top_k_fits_nucleus(const std::vector<double> & top, double top_p, double & kth) {
    const size_t k = top.size() - 1;
    double sum = 0.0;
    kth = top[0];
    for (size_t i = 0; i < k; ++i) {
        sum += top[i];
        kth = std::min(kth, top[i]);
    }
    return sum <= top_p - 1e-9;
}

// How many leading entries of `desc` have a running sum <= top_p; at least one.
static size_t nucleus_count(const std::vector<double> & desc, double top_p, double & last_cumulative) {
    size_t count = 0;
    double cum = 0.0;
    for (double v : desc) {
        cum += v;
        if (cum <= top_p) {
            count++;
        }
    }
    last_cumulative = cum;
    return std::max<size_t>(count, 1);
}

// Positions of the `count` largest values given the count-th largest: all above it, then equal
// ones from the lowest position up.
static void positions_of_largest(const std::vector<double> & x, size_t count, double threshold, std::vector<int32_t> & out) {
    size_t above = 0;
    for (double v : x) {
        above += v > threshold;
    }
    size_t ties = count - std::min(count, above);
    out.clear();
    for (size_t i = 0; i < x.size(); ++i) {
        if (x[i] > threshold || (x[i] == threshold && ties > 0 && ties--)) {
            out.push_back((int32_t) i);
        }
    }
}

// selection.py looks at the 4096 largest first when only top_p is set
static const size_t NUCLEUS_PROBE = 4096;

void dysco_select(const std::vector<double> & x, double top_p, int32_t top_k, std::vector<double> & desc,
                  std::vector<int32_t> & out) {
    out.clear();
    if (x.empty()) {
        return;
    }
    const size_t n = x.size();
    size_t count = 0;
    double cum = 0.0;
    if (top_p <= 0.0) {
        count = std::min<size_t>((size_t) top_k, n);
        largest_unordered(x, count, desc);
        positions_of_largest(x, count, desc[count - 1], out);
        return;
    }
    if (top_k <= 0) {
        largest_descending(x, std::min(n, NUCLEUS_PROBE), desc);
        count = nucleus_count(desc, top_p, cum);
        if (desc.size() < n && cum <= top_p) {
            largest_descending(x, n, desc);
            count = nucleus_count(desc, top_p, cum);
        }
    } else {
        const size_t m = std::min(n, (size_t) top_k + 1);
        largest_unordered(x, m, desc);
        double kth = 0.0;
        if (m == (size_t) top_k + 1 && top_k_fits_nucleus(desc, top_p, kth)) {
            positions_of_largest(x, (size_t) top_k, kth, out);
            return;
        }
        std::sort(desc.begin(), desc.end(), std::greater<double>());
        count = std::min(nucleus_count(desc, top_p, cum), (size_t) top_k);
    }
    positions_of_largest(x, count, desc[count - 1], out);
}

void dysco_bias_fill(const std::vector<int32_t> & selected, int32_t pos, double strength, double hard_strength,
                     const uint8_t * template_mask, int32_t n_template, std::vector<float> & bias) {
    const bool hard = strength >= hard_strength;
    const float on = hard ? 0.0f : (float) std::log(strength);
    bias.assign((size_t) pos + 1, hard ? -std::numeric_limits<float>::infinity() : 0.0f);
    for (int32_t p : selected) {
        // the soft bias leaves template positions alone (the hard mask keeps them)
        if (!hard && template_mask && p < n_template && template_mask[p]) {
            continue;
        }
        bias[p] = on;
    }
    bias[pos] = on;
}
