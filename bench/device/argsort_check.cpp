// Checks ggml_argsort on the GPU backend against a stable sort on the host, for rows with many equal
// values and rows without, and times a graph of that one op. DySCO's selection relies on CUDA keeping
// equal values in column order (CUB's radix sort is stable), and a faster sort must match it: patch 0008
// sorts rows of 1025-16384 columns with a block of CUB's block radix sort each (a shared-memory bitonic
// sort tried before it matched too and was slower). The shapes straddle that patch's widths.
// Prints one markdown row per shape and order.
//
//   g++ -O2 -std=c++17 bench/device/argsort_check.cpp -I GGML/include -L LIBDIR -lggml -lggml-base \
//       -Wl,-rpath,LIBDIR -o /tmp/argsort_check && /tmp/argsort_check
#include "ggml.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <numeric>
#include <random>
#include <string>
#include <vector>

// The host's answer: columns by value, equal values in column order.
static std::vector<int32_t> stable_argsort(const float * row, int ncols, bool desc) {
    std::vector<int32_t> idx(ncols);
    std::iota(idx.begin(), idx.end(), 0);
    std::stable_sort(idx.begin(), idx.end(), [&](int32_t a, int32_t b) { return desc ? row[a] > row[b] : row[a] < row[b]; });
    return idx;
}

// Rows of few distinct values (ties everywhere) and rows of distinct ones, alternating.
static std::vector<float> make_rows(int ncols, int nrows, std::mt19937 & rng) {
    std::vector<float> x((size_t) ncols * nrows);
    std::uniform_int_distribution<int> level(0, 40);
    std::uniform_real_distribution<float> real(0.0f, 1.0f);
    for (int r = 0; r < nrows; ++r) {
        for (int c = 0; c < ncols; ++c) {
            x[(size_t) r * ncols + c] = r % 2 == 0 ? level(rng) * 0.025f : real(rng);
        }
    }
    return x;
}

// Columns out of the stable order of one shape and order on `backend` (`unsorted`: of them, those whose
// value is out of place too); the mean ms of a compute over `reps`.
static int check(ggml_backend_t backend, int ncols, int nrows, bool desc, std::mt19937 & rng, double & ms, int & unsorted) {
    ggml_init_params params = { 4 * ggml_tensor_overhead() + ggml_graph_overhead(), nullptr, true };
    ggml_context * ctx = ggml_init(params);
    ggml_tensor * x = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, ncols, nrows);           // [ncols, nrows]
    ggml_tensor * order = ggml_argsort(ctx, x, desc ? GGML_SORT_ORDER_DESC : GGML_SORT_ORDER_ASC); // [ncols, nrows] I32
    ggml_cgraph * gf = ggml_new_graph(ctx);
    ggml_build_forward_expand(gf, order);
    ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors(ctx, backend);
    const std::vector<float> host = make_rows(ncols, nrows, rng);
    ggml_backend_tensor_set(x, host.data(), 0, ggml_nbytes(x));
    ggml_backend_graph_compute(backend, gf);
    std::vector<int32_t> got((size_t) ncols * nrows);
    ggml_backend_tensor_get(order, got.data(), 0, ggml_nbytes(order));
    int bad = 0;
    unsorted = 0;
    for (int r = 0; r < nrows; ++r) {
        const float * row = host.data() + (size_t) r * ncols;
        const std::vector<int32_t> want = stable_argsort(row, ncols, desc);
        for (int c = 0; c < ncols; ++c) {
            const int32_t g = got[(size_t) r * ncols + c];
            bad += g != want[c];
            unsorted += g < 0 || g >= ncols || row[g] != row[want[c]];
        }
    }
    const int reps = 50;
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < reps; ++i) {
        ggml_backend_graph_compute(backend, gf);
    }
    ggml_backend_synchronize(backend);
    ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() / reps;
    ggml_backend_buffer_free(buf);
    ggml_free(ctx);
    return bad;
}

int main(int argc, char ** argv) {
    ggml_backend_load_all();
    // "cpu": the program itself on a machine without a GPU (the CPU's sort need not keep ties in order)
    const bool cpu = argc > 1 && std::string(argv[1]) == "cpu";
    ggml_backend_t backend = ggml_backend_init_by_type(cpu ? GGML_BACKEND_DEVICE_TYPE_CPU : GGML_BACKEND_DEVICE_TYPE_GPU, nullptr);
    if (!backend) {
        std::fprintf(stderr, "argsort_check: no GPU backend\n");
        return 2;
    }
    std::printf("| backend | columns | rows | order | out of stable order | values out of place | ms per graph |\n"
                "|---|---|---|---|---|---|---|\n");
    std::mt19937 rng(7);
    int failed = 0;
    for (int ncols : { 1025, 4096, 4097, 8192, 8448, 8960, 12288, 12289, 16384, 16385, 40000 }) {
        for (int nrows : { 1, 2, 8 }) {
            for (bool desc : { true, false }) {
                double ms = 0.0;
                int unsorted = 0;
                const int bad = check(backend, ncols, nrows, desc, rng, ms, unsorted);
                failed += bad != 0;
                std::printf("| %s | %d | %d | %s | %d | %d | %.4f |\n", ggml_backend_name(backend), ncols, nrows,
                            desc ? "desc" : "asc", bad, unsorted, ms);
            }
        }
    }
    ggml_backend_free(backend);
    return failed ? 1 : 0;
}
