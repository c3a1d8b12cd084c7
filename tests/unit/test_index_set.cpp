// A piece of a shard (index_slice) is what the loader reads at a time; cutting a shard into
// pieces and putting them back must give the shard.
#include <gtest/gtest.h>

#include "core/common/index_set.hpp"

namespace tpe {
namespace {

TEST(IndexSlice, PiecesCrossRangeBoundaries) {
  const IndexSet shard = {{2, 5}, {10, 12}, {20, 21}};  // 2 3 4 10 11 20
  EXPECT_EQ(index_slice(shard, 0, 6), shard);
  EXPECT_EQ(index_slice(shard, 1, 3), (IndexSet{{3, 5}, {10, 11}}));
  EXPECT_EQ(index_slice(shard, 3, 1), (IndexSet{{10, 11}}));
  EXPECT_EQ(index_slice(shard, 4, 10), (IndexSet{{11, 12}, {20, 21}}));
  EXPECT_TRUE(index_slice(shard, 6, 2).empty());
  EXPECT_TRUE(index_slice(shard, 2, 0).empty());
}

TEST(IndexSlice, EveryCutReassemblesTheShard) {
  const IndexSet shard = {{0, 3}, {7, 9}, {15, 20}};
  const int64_t n = index_count(shard);
  for (int64_t piece = 1; piece <= n; ++piece) {
    IndexSet joined;
    for (int64_t first = 0; first < n; first += piece) {
      for (const Range& r : index_slice(shard, first, piece)) index_append(joined, r.begin, r.end);
    }
    EXPECT_EQ(joined, shard) << "pieces of " << piece;
  }
}

}  // namespace
}  // namespace tpe
