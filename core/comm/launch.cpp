#include "core/comm/launch.hpp"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <thread>

#include "core/common/error.hpp"

namespace tpe::comm {
namespace {

std::optional<std::string> env(const char* name) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') return std::nullopt;
  return std::string(value);
}

int env_int(const char* name, int low, int high) {
  const auto text = env(name);
  if (!text) fail("multi-process launch: environment variable {} is not set", name);
  char* end = nullptr;
  const long value = std::strtol(text->c_str(), &end, 10);
  if (*end != '\0' || value < low || value > high) {
    fail("multi-process launch: {}={} is not an integer in [{}, {}]", name, *text, low, high);
  }
  return static_cast<int>(value);
}

// A connected or listening socket, closed on scope exit.
struct Socket {
  int fd = -1;
  explicit Socket(int f) : fd(f) {}
  Socket(const Socket&) = delete;
  Socket& operator=(const Socket&) = delete;
  ~Socket() {
    if (fd >= 0) close(fd);
  }
};

void send_all(int fd, const char* data, size_t size) {
  while (size > 0) {
    const ssize_t n = send(fd, data, size, MSG_NOSIGNAL);
    if (n <= 0) fail("multi-process launch: sending the NCCL id failed");
    data += n;
    size -= static_cast<size_t>(n);
  }
}

bool recv_all(int fd, char* data, size_t size) {
  while (size > 0) {
    const ssize_t n = recv(fd, data, size, 0);
    if (n <= 0) return false;
    data += n;
    size -= static_cast<size_t>(n);
  }
  return true;
}

void serve(const LaunchEnv& e, const std::array<char, 128>& id, double timeout_s) {
  Socket listener(socket(AF_INET, SOCK_STREAM, 0));
  const int one = 1;
  setsockopt(listener.fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_ANY);
  addr.sin_port = htons(static_cast<uint16_t>(e.rendezvous_port));
  if (bind(listener.fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
      listen(listener.fd, e.world) != 0) {
    fail("multi-process launch: rank 0 cannot listen on port {} (MASTER_PORT + 1): {}",
         e.rendezvous_port, std::strerror(errno));
  }
  timeval tv{static_cast<time_t>(timeout_s), 0};
  setsockopt(listener.fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  for (int served = 1; served < e.world; ++served) {
    Socket peer(accept(listener.fd, nullptr, nullptr));
    if (peer.fd < 0) {
      fail("multi-process launch: rank 0 waited {:.0f} s on port {} for {} more rank(s)", timeout_s,
           e.rendezvous_port, e.world - served);
    }
    send_all(peer.fd, id.data(), id.size());
  }
}

void fetch(const LaunchEnv& e, std::array<char, 128>& id, double timeout_s) {
  addrinfo hints{};
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* found = nullptr;
  const std::string port = std::to_string(e.rendezvous_port);
  if (getaddrinfo(e.master_addr.c_str(), port.c_str(), &hints, &found) != 0 || found == nullptr) {
    fail("multi-process launch: cannot resolve MASTER_ADDR '{}'", e.master_addr);
  }
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
  for (;;) {  // rank 0 may not be listening yet
    Socket s(socket(AF_INET, SOCK_STREAM, 0));
    if (connect(s.fd, found->ai_addr, found->ai_addrlen) == 0 &&
        recv_all(s.fd, id.data(), id.size())) {
      freeaddrinfo(found);
      return;
    }
    if (std::chrono::steady_clock::now() > deadline) {
      freeaddrinfo(found);
      fail("multi-process launch: rank {} could not reach rank 0 at {}:{} within {:.0f} s", e.rank,
           e.master_addr, e.rendezvous_port, timeout_s);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
}

}  // namespace

std::optional<LaunchEnv> launch_env_from_environment() {
  LaunchEnv e;
  // Half a launcher's environment is a mistake to name, not a hint to run one process.
  if (env("RANK").has_value() != env("WORLD_SIZE").has_value()) {
    fail("multi-process launch: {} is set but {} is not; a launcher (torchrun) sets both",
         env("RANK") ? "RANK" : "WORLD_SIZE", env("RANK") ? "WORLD_SIZE" : "RANK");
  }
  if (env("RANK") && env("WORLD_SIZE")) {
    e.launcher = "torchrun";
    e.rank = env_int("RANK", 0, 1 << 20);
    e.world = env_int("WORLD_SIZE", 1, 1 << 20);
    e.local_rank = env("LOCAL_RANK") ? env_int("LOCAL_RANK", 0, 1024) : e.rank;
  } else if (env("OMPI_COMM_WORLD_RANK")) {
    e.launcher = "Open MPI";
    e.rank = env_int("OMPI_COMM_WORLD_RANK", 0, 1 << 20);
    e.world = env_int("OMPI_COMM_WORLD_SIZE", 1, 1 << 20);
    e.local_rank = env_int("OMPI_COMM_WORLD_LOCAL_RANK", 0, 1024);
  } else if (env("SLURM_PROCID") && env("SLURM_NTASKS")) {
    e.launcher = "Slurm";
    e.rank = env_int("SLURM_PROCID", 0, 1 << 20);
    e.world = env_int("SLURM_NTASKS", 1, 1 << 20);
    e.local_rank = env_int("SLURM_LOCALID", 0, 1024);
  } else {
    return std::nullopt;
  }
  if (e.world == 1) return std::nullopt;
  if (e.rank >= e.world) fail("multi-process launch: rank {} >= world size {}", e.rank, e.world);
  const auto addr = env("MASTER_ADDR");
  if (!addr) {
    fail("multi-process launch ({}): MASTER_ADDR is not set; export rank 0's host name",
         e.launcher);
  }
  e.master_addr = *addr;
  e.rendezvous_port = env_int("MASTER_PORT", 1, 65534) + 1;
  return e;
}

void exchange_id(const LaunchEnv& env, std::array<char, 128>& id, double timeout_s) {
  if (env.rank == 0) {
    serve(env, id, timeout_s);
  } else {
    fetch(env, id, timeout_s);
  }
}

}  // namespace tpe::comm
