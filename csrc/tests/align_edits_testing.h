// Helpers shared by the align_edits C++ tests (the core and the CUDA kernel's warp emulation).
#pragma once

#include <cstdint>
#include <random>
#include <vector>

namespace credit::testing {

// b with about rate * len(b) random deletions, insertions and substitutions of ids below vocab.
inline std::vector<int64_t> mutate(std::mt19937_64& g, std::vector<int64_t> b, double rate, int64_t vocab) {
  const int64_t edits = static_cast<int64_t>(rate * b.size() + 0.5);
  for (int64_t e = 0; e < edits; ++e) {
    const int op = g() % 3;
    const size_t pos = g() % (b.size() + 1);
    if (op == 0 && pos < b.size()) b.erase(b.begin() + pos);
    else if (op == 1) b.insert(b.begin() + pos, static_cast<int64_t>(g() % vocab));
    else if (pos < b.size()) b[pos] = static_cast<int64_t>(g() % vocab);
  }
  return b;
}

}  // namespace credit::testing
