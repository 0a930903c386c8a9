// Where the nodes DySCO adds to a graph run (docs/backends.md). Every such node is named dysco*, so the
// placement log can record the backend ggml's scheduler gave each one beside the backend running the
// attention of its layer: a DySCO node falling back to the CPU while its layer runs on a GPU shows
// (`dysco-edge devices --check`, DYSCO_SCHED_REPORT=1).
#include "dysco-state.h"

#include "ggml.h"
#include "ggml-backend.h"

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

static bool dysco_named(const ggml_tensor * t) {
    return strncmp(t->name, "dysco", 5) == 0;
}

void dysco_name_nodes(ggml_tensor * out, const char * group, int il, const std::vector<const ggml_tensor *> & stop) {
    std::unordered_set<const ggml_tensor *> seen(stop.begin(), stop.end());
    std::vector<ggml_tensor *> todo = { out };
    while (!todo.empty()) {
        ggml_tensor * t = todo.back();
        todo.pop_back();
        // leaves are inputs, the KV cache and the tracked state: named where they are made
        if (!t || t->op == GGML_OP_NONE || !seen.insert(t).second) {
            continue;
        }
        if (!dysco_named(t)) {
            ggml_format_name(t, "dysco_%s_%s-%d", group, ggml_op_desc(t), il);
        }
        for (ggml_tensor * s : t->src) {
            todo.push_back(s);
        }
    }
}

// Views, reshapes and permutes compute nothing: only the other nodes are placed.
static bool node_computes(const ggml_tensor * t) {
    switch (t->op) {
        case GGML_OP_NONE: case GGML_OP_VIEW: case GGML_OP_RESHAPE: case GGML_OP_PERMUTE: case GGML_OP_TRANSPOSE:
            return false;
        default:
            return true;
    }
}

// The layer of llama.cpp's "name-il" convention, or -1.
static int name_layer(const char * name) {
    const char * dash = strrchr(name, '-');
    return dash && isdigit((unsigned char) dash[1]) ? atoi(dash + 1) : -1;
}

// A node named without a layer (the score sums, the biased mask) belongs to the last layer it reads.
static int node_layer(const ggml_tensor * t, std::unordered_map<const ggml_tensor *, int> & memo) {
    const auto it = memo.find(t);
    if (it != memo.end()) {
        return it->second;
    }
    const int own = dysco_named(t) ? name_layer(t->name) : -1;
    int il = own;
    for (const ggml_tensor * s : t->src) {
        if (own < 0 && s && dysco_named(s)) {
            il = std::max(il, node_layer(s, memo));
        }
    }
    return memo[t] = il;
}

static std::string backend_name(ggml_backend_sched_t sched, ggml_tensor * t) {
    ggml_backend_t backend = ggml_backend_sched_get_tensor_backend(sched, t);
    return backend ? ggml_backend_name(backend) : "none";
}

struct placement_row {
    std::string name, op, backend, attn; // attn: the backend of the layer's attention ("" when unknown)
    int         il;
};

// The computing DySCO nodes of the graph, with the backend of their layer's attention (llama.cpp's kqv_out-il).
static std::vector<placement_row> placement_rows(ggml_cgraph * gf, ggml_backend_sched_t sched) {
    std::map<int, std::string> attn;
    std::vector<ggml_tensor *> nodes;
    for (int i = 0; i < ggml_graph_n_nodes(gf); ++i) {
        ggml_tensor * t = ggml_graph_node(gf, i);
        if (strncmp(t->name, "kqv_out-", 8) == 0) {
            attn[name_layer(t->name)] = backend_name(sched, t);
        } else if (dysco_named(t) && node_computes(t)) {
            nodes.push_back(t);
        }
    }
    std::unordered_map<const ggml_tensor *, int> memo;
    std::vector<placement_row> rows;
    for (ggml_tensor * t : nodes) {
        const int il = node_layer(t, memo);
        const auto at = attn.find(il);
        rows.push_back({ t->name, ggml_op_desc(t), backend_name(sched, t), at == attn.end() ? "" : at->second, il });
    }
    return rows;
}

static bool placement_fallback(const placement_row & row) {
    return row.backend == "CPU" && !row.attn.empty() && row.attn != "CPU";
}

// DYSCO_SCHED_REPORT=1: the count per backend of every graph's DySCO nodes, and each one on the CPU while
// its layer's attention is not.
static void placement_print(const std::vector<placement_row> & rows) {
    std::map<std::string, int> count;
    for (const placement_row & row : rows) {
        count[row.backend]++;
        if (placement_fallback(row)) {
            fprintf(stderr, "dysco sched: CPU fallback: %s (%s) while layer %d's attention runs on %s\n",
                    row.name.c_str(), row.op.c_str(), row.il, row.attn.c_str());
        }
    }
    for (const auto & [name, n] : count) {
        fprintf(stderr, "dysco sched: %d DySCO nodes on %s\n", n, name.c_str());
    }
}

void dysco_placement_record(dysco_state & st, ggml_cgraph * gf, ggml_backend_sched_t sched) {
    static const bool print = getenv("DYSCO_SCHED_REPORT") != nullptr;
    if (!print && !st.placement.on) {
        return;
    }
    const std::vector<placement_row> rows = placement_rows(gf, sched);
    if (print) {
        placement_print(rows);
    }
    for (const placement_row & row : rows) {
        if (st.placement.on) {
            st.placement.seen[row.name + "\t" + row.op + "\t" + std::to_string(row.il) + "\t" + row.backend + "\t" + row.attn]++;
        }
    }
}

std::string dysco_placement_text(const dysco_state & st) {
    std::string out;
    for (const auto & [row, n] : st.placement.seen) {
        out += row + "\t" + std::to_string(n) + "\n";
    }
    return out;
}
