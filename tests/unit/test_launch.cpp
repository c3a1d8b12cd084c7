// Multi-process launch: reading torchrun / Open MPI / Slurm environments, and the NCCL id
// exchange over TCP (two ranks as threads on loopback).
#include <gtest/gtest.h>

#include <cstdlib>
#include <thread>

#include "core/comm/launch.hpp"
#include "core/common/error.hpp"

namespace tpe {
namespace {

using comm::launch_env_from_environment;

// Sets variables for one test and removes every launcher variable afterwards.
class LaunchEnvTest : public testing::Test {
 protected:
  void TearDown() override {
    for (const char* name :
         {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "OMPI_COMM_WORLD_RANK",
          "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS",
          "SLURM_LOCALID"}) {
      unsetenv(name);
    }
  }
  static void set(const char* name, const char* value) { setenv(name, value, 1); }
};

TEST_F(LaunchEnvTest, NoLauncherMeansOneProcess) {
  EXPECT_FALSE(launch_env_from_environment().has_value());
}

TEST_F(LaunchEnvTest, HalfATorchrunEnvironmentIsRefused) {
  set("RANK", "1");
  try {
    launch_env_from_environment();
    ADD_FAILURE() << "RANK without WORLD_SIZE ran as one process";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("RANK is set but WORLD_SIZE is not"), std::string::npos)
        << e.what();
  }
  TearDown();
  set("WORLD_SIZE", "2");
  EXPECT_THROW(launch_env_from_environment(), Error);
}

TEST_F(LaunchEnvTest, Torchrun) {
  set("RANK", "3");
  set("WORLD_SIZE", "4");
  set("LOCAL_RANK", "1");
  set("MASTER_ADDR", "node0");
  set("MASTER_PORT", "29500");
  const auto e = launch_env_from_environment();
  ASSERT_TRUE(e.has_value());
  EXPECT_EQ(e->launcher, "torchrun");
  EXPECT_EQ(e->rank, 3);
  EXPECT_EQ(e->world, 4);
  EXPECT_EQ(e->local_rank, 1);
  EXPECT_EQ(e->master_addr, "node0");
  EXPECT_EQ(e->rendezvous_port, 29501);
}

TEST_F(LaunchEnvTest, OpenMpiAndSlurm) {
  set("OMPI_COMM_WORLD_RANK", "1");
  set("OMPI_COMM_WORLD_SIZE", "2");
  set("OMPI_COMM_WORLD_LOCAL_RANK", "1");
  set("MASTER_ADDR", "10.1.2.3");
  set("MASTER_PORT", "6000");
  EXPECT_EQ(launch_env_from_environment()->launcher, "Open MPI");
  TearDown();
  set("SLURM_PROCID", "5");
  set("SLURM_NTASKS", "8");
  set("SLURM_LOCALID", "1");
  set("MASTER_ADDR", "n1");
  set("MASTER_PORT", "6000");
  const auto e = launch_env_from_environment();
  EXPECT_EQ(e->launcher, "Slurm");
  EXPECT_EQ(e->rank, 5);
  EXPECT_EQ(e->local_rank, 1);
}

TEST_F(LaunchEnvTest, ErrorsNameTheVariable) {
  set("RANK", "1");
  set("WORLD_SIZE", "2");
  set("MASTER_PORT", "29500");
  try {
    launch_env_from_environment();
    ADD_FAILURE() << "no MASTER_ADDR accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("MASTER_ADDR"), std::string::npos) << e.what();
  }
  set("MASTER_ADDR", "x");
  set("MASTER_PORT", "port");
  try {
    launch_env_from_environment();
    ADD_FAILURE() << "a non-numeric MASTER_PORT accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("MASTER_PORT=port"), std::string::npos) << e.what();
  }
}

TEST(Launch, IdExchangeOverLoopback) {
  comm::LaunchEnv root{0, 3, 0, "127.0.0.1", 0, "test"};
  root.rendezvous_port = 23000 + static_cast<int>(getpid() % 20000);
  std::array<char, 128> id{};
  for (size_t i = 0; i < id.size(); ++i) id[i] = static_cast<char>(i * 7 + 1);
  std::array<char, 128> got1{}, got2{};
  std::thread r1([&] {
    comm::LaunchEnv e = root;
    e.rank = 1;
    comm::exchange_id(e, got1, 20);
  });
  std::thread r2([&] {
    comm::LaunchEnv e = root;
    e.rank = 2;
    comm::exchange_id(e, got2, 20);
  });
  comm::exchange_id(root, id, 20);
  r1.join();
  r2.join();
  EXPECT_EQ(got1, id);
  EXPECT_EQ(got2, id);
}

TEST(Launch, UnreachableRankZeroTimesOutWithTheAddress) {
  comm::LaunchEnv e{1, 2, 0, "127.0.0.1", 1, "test"};  // nobody listens on port 1
  std::array<char, 128> id{};
  try {
    comm::exchange_id(e, id, 0.5);
    ADD_FAILURE() << "no error";
  } catch (const Error& err) {
    EXPECT_NE(std::string(err.what()).find("127.0.0.1:1"), std::string::npos) << err.what();
  }
}

}  // namespace
}  // namespace tpe
