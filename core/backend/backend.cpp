#include "core/backend/backend.hpp"

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

}  // namespace tpe::backend
