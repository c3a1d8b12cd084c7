// read_text_file, the one reader of configs, tokenizers and indexes: what would block (a FIFO),
// never end (/dev/zero) or read as nothing (a directory) is refused by name before it is read,
// and so is a file past its size limit.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "core/common/text_file.hpp"
#include "tests/unit/expect_error.hpp"

namespace tpe {
namespace {

namespace fs = std::filesystem;
using testing::expect_error;

class TextFile : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("tpe_text_file_" + std::to_string(::testing::UnitTest::GetInstance()->random_seed()) +
            "_" + std::to_string(::getpid()));
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  fs::path dir_;
};

TEST_F(TextFile, ReadsARegularFileWhole) {
  std::ofstream(dir_ / "a.json") << "{\"k\": 1}";
  EXPECT_EQ(read_text_file(dir_ / "a.json", kConfigFileLimit), "{\"k\": 1}");
  // A link to a regular file is read through.
  fs::create_symlink(dir_ / "a.json", dir_ / "link.json");
  EXPECT_EQ(read_text_file(dir_ / "link.json", kConfigFileLimit), "{\"k\": 1}");
}

TEST_F(TextFile, RefusesWhatIsNoRegularFile) {
  const std::string d = dir_.string();
  expect_error([&] { read_text_file(dir_ / "absent.json", kConfigFileLimit); },
               {d + "/absent.json: not found"});
  expect_error([&] { read_text_file(dir_, kConfigFileLimit); },
               {d + ": is a directory, not a file"});
  ASSERT_EQ(::mkfifo((dir_ / "fifo.json").c_str(), 0600), 0);
  expect_error([&] { read_text_file(dir_ / "fifo.json", kConfigFileLimit); },
               {d + "/fifo.json: not a regular file (a FIFO, socket or device)"});
  fs::create_symlink("/dev/zero", dir_ / "zero.json");
  expect_error([&] { read_text_file(dir_ / "zero.json", kConfigFileLimit); },
               {d + "/zero.json: not a regular file"});
}

TEST_F(TextFile, RefusesAFileOverItsLimit) {
  std::ofstream(dir_ / "big.json").put('x');
  fs::resize_file(dir_ / "big.json", kConfigFileLimit + 1);  // sparse: no disk used
  expect_error([&] { read_text_file(dir_ / "big.json", kConfigFileLimit); },
               {"big.json: 16777217 bytes, more than the 16 MiB such a file may have"});
  EXPECT_EQ(read_text_file(dir_ / "big.json", kConfigFileLimit + 1).size(), kConfigFileLimit + 1);
}

}  // namespace
}  // namespace tpe
