// Host-side DySCO bookkeeping in C++ (see dysco-select.h). Compiled with -ffp-contract=off: a
// fused multiply-add would round the update differently from numpy.
#include "dysco-select.h"

#include <algorithm>
#include <cmath>
#include <cstring>
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

// Every value of x (all = true) or those at or above `floor`, with their positions, in position
// order. Branch-free: a data-dependent branch per value mispredicts on ~1 in 5 values here.
static void candidates_collect(const std::vector<double> & x, double floor, bool all, dysco_select_scratch & c) {
    const size_t n = x.size();
    c.values.resize(n);
    c.positions.resize(n);
    size_t kept = 0;
    for (size_t i = 0; i < n; ++i) {
        c.values[kept]    = x[i];
        c.positions[kept] = (int32_t) i;
        kept += (size_t) (all || x[i] >= floor);
    }
    c.values.resize(kept);
    c.positions.resize(kept);
}

// The bit patterns of `values` into `keys`; returns the bits on which they differ (a digit with
// none needs no counting: every key falls in one bucket).
static uint64_t keys_from_values(const std::vector<double> & values, std::vector<uint64_t> & keys) {
    keys.resize(values.size());
    std::memcpy(keys.data(), values.data(), values.size() * sizeof(double));
    uint64_t all_and = ~(uint64_t) 0, all_or = 0;
    for (uint64_t k : keys) {
        all_and &= k;
        all_or |= k;
    }
    return all_and ^ all_or;
}

// Keeps the keys whose 8-bit digit at `shift` is `digit` (branch-free, in place).
static void keys_keep_digit(std::vector<uint64_t> & keys, int shift, uint64_t digit) {
    size_t kept = 0;
    for (uint64_t k : keys) {
        keys[kept] = k;
        kept += (size_t) (((k >> shift) & 255) == digit);
    }
    keys.resize(kept);
}

// The rank-th largest (1 <= rank <= size) of non-negative doubles, whose bit patterns order them
// as integers: a radix select, 8 bits a round, from the highest bit where the values differ. No
// data-dependent branches: std::nth_element mispredicted its way to 125 us on 6400 values.
static double kth_largest(const std::vector<double> & values, size_t rank, dysco_select_scratch & c) {
    std::vector<uint64_t> & keys = c.keys;
    const uint64_t differ = keys_from_values(values, keys);
    uint64_t kth = keys.empty() ? 0 : keys[0] & ~differ; // the bits every value shares
    for (int shift = 56; shift >= 0; shift -= 8) {
        if (((differ >> shift) & 255) == 0) {
            continue;
        }
        size_t hist[4][256] = {}; // four histograms: one would stall on repeated increments of a bucket
        size_t i = 0;
        for (; i + 4 <= keys.size(); i += 4) {
            for (int j = 0; j < 4; ++j) {
                hist[j][(keys[i + j] >> shift) & 255]++;
            }
        }
        for (; i < keys.size(); ++i) {
            hist[0][(keys[i] >> shift) & 255]++;
        }
        uint64_t digit = 255;
        for (;; --digit) {
            const size_t in_digit = hist[0][digit] + hist[1][digit] + hist[2][digit] + hist[3][digit];
            if (in_digit >= rank) {
                break;
            }
            rank -= in_digit;
        }
        kth = (kth & ~((uint64_t) 255 << shift)) | (digit << shift);
        keys_keep_digit(keys, shift, digit);
    }
    double value;
    std::memcpy(&value, &kth, sizeof value);
    return value;
}

// Candidates that hold the m largest values of x, and the m-th largest.
static double candidates_largest(const std::vector<double> & x, size_t m, dysco_select_scratch & c) {
    const double floor = candidate_floor(x, m, c.top);
    candidates_collect(x, floor, floor <= 0.0, c);
    if (c.values.size() < m) { // the floor was too high: every value is a candidate
        candidates_collect(x, 0.0, true, c);
    }
    return kth_largest(c.values, m, c);
}

// The candidates at or above `least` (which holds the m largest), sorted descending.
static void candidates_descending(const dysco_select_scratch & c, double least, std::vector<double> & desc) {
    desc.clear();
    for (double v : c.values) {
        if (v >= least) {
            desc.push_back(v);
        }
    }
    std::sort(desc.begin(), desc.end(), std::greater<double>());
}

// Whether the k largest hold at most top_p of the mass, given the k-th largest, so that the
// hybrid S is the top k. Decided on their sum in any order, so no sort, with a margin far above
// the rounding by which it differs from selection.py's sorted running sum (k * 2^-52).
static bool top_k_fits_nucleus(const dysco_select_scratch & c, size_t k, double kth, double top_p) {
    double sum = 0.0;
    size_t above = 0;
    for (double v : c.values) {
        const bool over = v > kth;
        sum += over ? v : 0.0;
        above += over;
    }
    sum += (double) (k - above) * kth;
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

// Positions of the `count` largest values given the count-th largest, from candidates that hold
// every value at or above it: all above it, then equal ones from the lowest position up.
static void positions_of_largest(const dysco_select_scratch & c, size_t count, double threshold, std::vector<int32_t> & out) {
    size_t above = 0;
    for (double v : c.values) {
        above += v > threshold;
    }
    size_t ties = count - std::min(count, above);
    out.resize(c.values.size());
    size_t kept = 0;
    for (size_t i = 0; i < c.values.size(); ++i) {
        const double v   = c.values[i];
        const bool   tie = v == threshold && ties > 0;
        ties -= tie;
        out[kept] = c.positions[i];
        kept += (size_t) (v > threshold || tie);
    }
    out.resize(kept);
}

// selection.py looks at the 4096 largest first when only top_p is set
static const size_t NUCLEUS_PROBE = 4096;

// The nucleus from mass per value range, no sort: a radix descent on the candidates' bits (as in
// kth_largest) into the range where the running mass crosses top_p, down to one value t. count =
// the positions above t plus the copies of t that still fit; positions_of_largest(count, t) is
// then S. False when the boundary lies within 1e-9 of top_p (or every candidate fits): the sums
// here run in another order than selection.py's sorted running sum (apart by < n * 2^-52), so
// only a sort decides those.
static bool nucleus_by_mass(dysco_select_scratch & c, double top_p, size_t & count, double & t) {
    std::vector<uint64_t> & keys = c.keys;
    double total = 0.0;
    for (double v : c.values) {
        total += v;
    }
    if (total <= top_p + 1e-9) {
        return false; // every candidate fits, or nearly
    }
    // a digit every key shares holds all the remaining mass, which crosses top_p: nothing to count
    const uint64_t differ = keys_from_values(c.values, keys);
    double mass_above = 0.0;
    size_t n_above = 0;
    for (int shift = 56; shift >= 0; shift -= 8) {
        if (((differ >> shift) & 255) == 0) {
            continue;
        }
        size_t n_in[256] = {};
        double mass_in[256] = {};
        for (uint64_t k : keys) {
            double v;
            std::memcpy(&v, &k, sizeof v);
            n_in[(k >> shift) & 255]++;
            mass_in[(k >> shift) & 255] += v;
        }
        int digit = 255;
        for (; digit >= 0 && mass_above + mass_in[digit] <= top_p; --digit) {
            mass_above += mass_in[digit];
            n_above += n_in[digit];
        }
        if (digit < 0) {
            return false; // every candidate fits
        }
        keys_keep_digit(keys, shift, (uint64_t) digit);
    }
    std::memcpy(&t, &keys[0], sizeof t);
    // copies of t that fit: fewer than all of them, or the descent would have passed them
    const size_t fit = std::min(keys.size() - 1, (size_t) std::max(0.0, std::floor((top_p - mass_above) / t)));
    const double mass = mass_above + (double) fit * t;
    if (!(mass <= top_p - 1e-9 && mass + t > top_p + 1e-9)) {
        return false;
    }
    count = std::max<size_t>(n_above + fit, 1);
    return true;
}

// The nucleus among the largest `probe` values, or among all when those hold less than top_p;
// c.top holds the values it counted, descending.
static size_t nucleus_sorted(const std::vector<double> & x, double top_p, size_t probe, dysco_select_scratch & c) {
    double cum = 0.0;
    candidates_descending(c, candidates_largest(x, probe, c), c.top);
    size_t count = nucleus_count(c.top, top_p, cum);
    if (probe < x.size() && cum <= top_p) {
        candidates_descending(c, candidates_largest(x, x.size(), c), c.top);
        count = nucleus_count(c.top, top_p, cum);
    }
    return count;
}

void dysco_select(const std::vector<double> & x, double top_p, int32_t top_k, dysco_select_scratch & c,
                  std::vector<int32_t> & out) {
    out.clear();
    if (x.empty()) {
        return;
    }
    const size_t n = x.size();
    if (top_p <= 0.0) {
        const size_t count = std::min<size_t>((size_t) top_k, n);
        positions_of_largest(c, count, candidates_largest(x, count, c), out);
        return;
    }
    size_t count = 0;
    double threshold = 0.0;
    if (top_k <= 0) {
        candidates_collect(x, 0.0, true, c);
        if (nucleus_by_mass(c, top_p, count, threshold)) {
            positions_of_largest(c, count, threshold, out);
            return;
        }
        count = nucleus_sorted(x, top_p, std::min(n, NUCLEUS_PROBE), c);
    } else {
        // the candidates hold the k largest, so the nucleus when it is smaller, and the value after it
        const size_t k = std::min(n, (size_t) top_k);
        const double kth = candidates_largest(x, k, c);
        if (k < n && top_k_fits_nucleus(c, k, kth, top_p)) {
            positions_of_largest(c, k, kth, out);
            return;
        }
        if (nucleus_by_mass(c, top_p, count, threshold) && count < k) {
            positions_of_largest(c, count, threshold, out);
            return;
        }
        double cum = 0.0;
        candidates_descending(c, kth, c.top);
        count = std::min(nucleus_count(c.top, top_p, cum), k);
    }
    // the count-th largest is among the candidates, so every value at or above it is one
    positions_of_largest(c, count, c.top[count - 1], out);
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
