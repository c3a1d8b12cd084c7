#include "core/backend/backend.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "core/common/error.hpp"

namespace tpe::backend {

bool Batch::is_decode() const {
  if (logit_rows.size() != tokens.size() || segments.size() != tokens.size()) return false;
  if (!second.tokens.empty()) return false;
  for (size_t i = 0; i < segments.size(); ++i) {
    if (segments[i].count != 1 || logit_rows[i] != static_cast<int64_t>(i)) return false;
  }
  return true;
}

std::vector<int64_t> Batch::ids(Ids which) const {
  switch (which) {
    case Ids::kPositions: {
      std::vector<int64_t> positions;
      positions.reserve(tokens.size());
      for (const Segment& s : segments) {
        for (int64_t i = 0; i < s.count; ++i) positions.push_back(s.start_pos + i);
      }
      return positions;
    }
    case Ids::kTokens:
      return tokens;
    case Ids::kTokenTypes:
      return token_types;
    case Ids::kSecondTokens:
      return second.tokens;
    case Ids::kSecondTokenTypes:
      return second.token_types;
  }
  return tokens;
}

std::vector<int64_t> Backend::argmax_rows(const Buffer& x) {
  const Tensor host = to_host(x);
  std::vector<int64_t> best(static_cast<size_t>(host.rows()), -1);
  for (int64_t r = 0; r < host.rows(); ++r) {
    const float* row = host.row(r);
    int64_t arg = 0;
    bool finite = true;
    for (int64_t c = 0; c < host.cols(); ++c) {
      finite = finite && std::isfinite(row[c]);
      if (row[c] > row[arg]) arg = c;
    }
    if (finite) best[static_cast<size_t>(r)] = arg;
  }
  return best;
}

void Backend::all_reduce_norm(tpe_norm_kind kind, Buffer& x, const Buffer& w, const Buffer* b,
                              float eps, Buffer& y) {
  all_reduce(x);
  norm(kind, x, w, b, eps, y);
}

TopRows Backend::top_rows(const Buffer& x, int64_t k) {
  TPE_CHECK(k > 0 && x.cols > 0, "top_rows: no candidates asked for, or no columns");
  const Tensor host = to_host(x);
  TopRows top;
  top.k = std::min(k, host.cols());
  const auto rows = static_cast<size_t>(host.rows()), width = static_cast<size_t>(top.k);
  top.values.resize(rows * width);
  top.ids.resize(rows * width);
  top.finite.resize(rows);
  std::vector<int32_t> order(static_cast<size_t>(host.cols()));
  for (size_t r = 0; r < rows; ++r) {
    const float* row = host.row(static_cast<int64_t>(r));
    top.finite[r] = std::all_of(row, row + host.cols(), [](float v) { return std::isfinite(v); });
    std::iota(order.begin(), order.end(), 0);
    if (top.finite[r] == 0) continue;  // NaN orders nothing; the row is refused anyway
    std::nth_element(order.begin(), order.begin() + (top.k - 1), order.end(),
                     [&](int32_t a, int32_t b) { return row[a] > row[b]; });
    for (size_t i = 0; i < width; ++i) {
      top.ids[r * width + i] = order[i];
      top.values[r * width + i] = row[order[i]];
    }
  }
  return top;
}

}  // namespace tpe::backend
