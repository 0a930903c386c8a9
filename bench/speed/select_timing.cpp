// Per-stage host time of one DySCO step's bookkeeping (native/dysco-select.cpp) at a given
// context: importance update, selection, bias fill, the bias copy that dysco_set_bias makes.
// Separates the host CPU's speed from Python and from the GPU passes.
//
//   g++ -O2 -ffp-contract=off -ftree-vectorize -Inative bench/speed/select_timing.cpp native/dysco-select.cpp -o /tmp/select_timing
//   /tmp/select_timing 32768 4096 0.975
#include "dysco-select.h"

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

using steady = std::chrono::steady_clock;

static double us_since(steady::time_point t) {
    return std::chrono::duration<double, std::micro>(steady::now() - t).count();
}

// A probe's summed QR-head attention over q + 1 positions: `peak` sets how far from uniform.
static void fill_scores(std::mt19937_64 & rng, double peak, size_t n, std::vector<float> & attn) {
    std::normal_distribution<double> logit(0.0, peak);
    attn.resize(n);
    double total = 0.0;
    for (float & v : attn) {
        v = (float) std::exp(logit(rng));
        total += v;
    }
    for (float & v : attn) {
        v = (float) (v / total * 16.0); // 16 heads' distributions summed
    }
}

int main(int argc, char ** argv) {
    const size_t n_ctx = argc > 1 ? std::strtoul(argv[1], nullptr, 10) : 32768;
    const int32_t top_k = argc > 2 ? std::atoi(argv[2]) : 4096;
    const double top_p = argc > 3 ? std::atof(argv[3]) : 0.975;
    const int steps = 64;
    std::printf("| context | score spread | update us | select us | bias fill us | bias copy us | |S| |\n|---|---|---|---|---|---|---|\n");
    for (double peak : {0.1, 1.0, 3.0}) {
        std::mt19937_64 rng(7);
        std::vector<double> importance(n_ctx, 1.0 / (double) n_ctx), next;
        dysco_select_scratch scratch;
        std::vector<float> attn, bias, copy;
        std::vector<int32_t> selected;
        std::vector<uint8_t> tmpl(n_ctx, 0);
        double t_update = 0, t_select = 0, t_fill = 0, t_copy = 0;
        for (int s = 0; s < steps; ++s) {
            fill_scores(rng, peak, importance.size() + 1, attn);
            auto t = steady::now();
            dysco_importance_step(importance, next, attn, 0.75);
            t_update += us_since(t);
            t = steady::now();
            dysco_select(importance, top_p, top_k, scratch, selected);
            t_select += us_since(t);
            const int32_t pos = (int32_t) importance.size() - 1;
            t = steady::now();
            dysco_bias_fill(selected, pos, 2.0, 1e6, tmpl.data(), (int32_t) tmpl.size(), bias);
            t_fill += us_since(t);
            t = steady::now();
            copy.assign(bias.begin(), bias.end());
            t_copy += us_since(t);
        }
        std::printf("| %zu | %.1f | %.1f | %.1f | %.1f | %.1f | %zu |\n", n_ctx, peak, t_update / steps, t_select / steps,
                    t_fill / steps, t_copy / steps, selected.size());
    }
}
