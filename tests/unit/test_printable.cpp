// printable(), through which text from files and plugins reaches messages: control characters
// escaped (one line, no terminal sequences), long text cut at a character boundary with its
// length said.
#include <gtest/gtest.h>

#include <string>

#include "core/common/error.hpp"

namespace tpe {
namespace {

TEST(Printable, EscapesControlCharacters) {
  EXPECT_EQ(printable("llama\x1b[2J\a\nx\x7f"), "llama\\x1b[2J\\x07\\x0ax\\x7f");
  EXPECT_EQ(printable("caf\xc3\xa9 \xe2\x82\xac"), "caf\xc3\xa9 \xe2\x82\xac");  // UTF-8 kept
}

TEST(Printable, CutsLongTextAtACharacterBoundary) {
  EXPECT_EQ(printable(std::string(kPrintableLimit, 'a')), std::string(kPrintableLimit, 'a'));
  const std::string mib(1 << 20, 'e');
  EXPECT_EQ(printable(mib), std::string(kPrintableLimit, 'e') + "... (1048576 bytes)");
  // 400 euro signs are 1200 bytes; 1024 would split the 342nd, so 341 (1023 bytes) are kept.
  std::string euros;
  for (int i = 0; i < 400; ++i) euros += "\xe2\x82\xac";
  const std::string out = printable(euros);
  EXPECT_EQ(out.substr(0, 1023), euros.substr(0, 1023));
  EXPECT_EQ(out.substr(1023), "... (1200 bytes)");
}

}  // namespace
}  // namespace tpe
