#include "core/plugin/isolate.hpp"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include "core/common/json_error.hpp"

namespace tpe::plugin {
namespace {

constexpr size_t kMaxResult = size_t{256} << 20;  // a graph of any sane model is far below

void write_all(int fd, const char* data, size_t size) {
  while (size > 0) {
    const ssize_t n = ::write(fd, data, size);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) _exit(3);
    data += n;
    size -= static_cast<size_t>(n);
  }
}

// The child: 'O' and the result, or 'E' and an error message, then _exit.
[[noreturn]] void child(int fd, const std::function<std::string()>& work) {
  std::string out;
  try {
    out = "O" + work();
  } catch (const std::exception& e) {
    out = std::string("E") + e.what();
  } catch (...) {
    out = "Eunknown exception";
  }
  write_all(fd, out.data(), out.size());
  ::close(fd);
  std::fflush(nullptr);  // what the plugin printed
  _exit(0);
}

std::string signal_text(int sig) {
  const char* abbrev = sigabbrev_np(sig);
  const char* description = sigdescr_np(sig);
  return fmt::format("SIG{} ({})", abbrev != nullptr ? abbrev : std::to_string(sig).c_str(),
                     description != nullptr ? description : "unknown signal");
}

}  // namespace

int policy_timeout_seconds() {
  const char* env = std::getenv("TPENGINE_POLICY_TIMEOUT");
  if (env == nullptr || *env == '\0') return 60;
  char* end = nullptr;
  const long v = std::strtol(env, &end, 10);
  if (*end != '\0' || v < 1 || v > 86400) {
    fail("TPENGINE_POLICY_TIMEOUT='{}' must be a number of seconds in [1, 86400]", printable(env));
  }
  return static_cast<int>(v);
}

std::string run_in_child(const std::string& who, const std::string& doing,
                         const std::function<std::string()>& work, int timeout_seconds) {
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) != 0) {
    fail("{}: cannot make a pipe to a child process: {}", who, std::strerror(errno));
  }
  std::fflush(nullptr);  // nothing buffered is written twice
  const pid_t pid = ::fork();
  if (pid < 0) {
    ::close(fds[0]);
    ::close(fds[1]);
    fail("{}: cannot start a child process: {}", who, std::strerror(errno));
  }
  if (pid == 0) {
    ::close(fds[0]);
    child(fds[1], work);
  }
  ::close(fds[1]);
  std::string result;
  bool timed_out = false, too_long = false;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(timeout_seconds);
  char buffer[65536];
  for (;;) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
                          deadline - std::chrono::steady_clock::now())
                          .count();
    if (left <= 0) {
      timed_out = true;
      break;
    }
    pollfd p{fds[0], POLLIN, 0};
    const int ready = ::poll(&p, 1, static_cast<int>(std::min<int64_t>(left, 1000)));
    if (ready < 0 && errno == EINTR) continue;
    if (ready <= 0) continue;
    const ssize_t n = ::read(fds[0], buffer, sizeof(buffer));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;  // the child closed its end: done, or dead
    result.append(buffer, static_cast<size_t>(n));
    if (result.size() > kMaxResult) {
      too_long = true;
      break;
    }
  }
  ::close(fds[0]);
  if (timed_out || too_long) ::kill(pid, SIGKILL);
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  if (timed_out) {
    throw ChildFailure(fmt::format("{} did not finish {} within {} s (TPENGINE_POLICY_TIMEOUT)",
                                   who, doing, timeout_seconds));
  }
  if (too_long) {
    throw ChildFailure(
        fmt::format("{}: {} returned more than {} MiB", who, doing, kMaxResult >> 20));
  }
  if (WIFSIGNALED(status)) {
    throw ChildFailure(
        fmt::format("{} crashed while {}: {}", who, doing, signal_text(WTERMSIG(status))));
  }
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0 || result.empty()) {
    throw ChildFailure(fmt::format("{} ended the process while {} (exit status {})", who, doing,
                                   WIFEXITED(status) ? WEXITSTATUS(status) : -1));
  }
  if (result[0] == 'E') throw Error(result.substr(1));
  if (result[0] != 'O') throw ChildFailure(fmt::format("{}: {} gave no result", who, doing));
  return result.substr(1);
}

}  // namespace tpe::plugin

// ---- a graph across the pipe ---------------------------------------------------------------

namespace tpe::plugin {
namespace {

using nlohmann::json;

json rope_json(const tpe_rope_desc& r) {
  return {static_cast<int>(r.type),
          r.theta,
          r.partial_rotary_factor,
          r.factor,
          r.low_freq_factor,
          r.high_freq_factor,
          r.original_max_position_embeddings};
}

tpe_rope_desc rope_of(const json& j) {
  tpe_rope_desc r{};
  r.struct_size = sizeof(r);
  r.type = static_cast<tpe_rope_type>(j.at(0).get<int>());
  r.theta = j.at(1).get<double>();
  r.partial_rotary_factor = j.at(2).get<double>();
  r.factor = j.at(3).get<double>();
  r.low_freq_factor = j.at(4).get<double>();
  r.high_freq_factor = j.at(5).get<double>();
  r.original_max_position_embeddings = j.at(6).get<int64_t>();
  return r;
}

json attention_json(const tpe_attention_desc& a) {
  return {a.n_heads,        a.n_kv_heads,     a.head_dim,         a.scale,
          a.sliding_window, a.alibi_max_bias, a.alibi_slope_scale};
}

tpe_attention_desc attention_of(const json& j) {
  tpe_attention_desc a{};
  a.struct_size = sizeof(a);
  a.n_heads = j.at(0).get<int64_t>();
  a.n_kv_heads = j.at(1).get<int64_t>();
  a.head_dim = j.at(2).get<int64_t>();
  a.scale = j.at(3).get<double>();
  a.sliding_window = j.at(4).get<int64_t>();
  a.alibi_max_bias = j.at(5).get<double>();
  a.alibi_slope_scale = j.at(6).get<double>();
  return a;
}

}  // namespace

std::string graph_to_json(const graph::Graph& g) {
  json blocks = json::array(), ops = json::array();
  for (const graph::Block& b : g.blocks) blocks.push_back({b.cls, b.prefix});
  for (const graph::Op& op : g.ops) {
    const int stream = op.outputs.empty() ? 0 : g.values[op.outputs[0]].stream;
    ops.push_back({{"k", static_cast<int>(op.kind)},
                   {"in", op.inputs},
                   {"out", op.outputs},
                   {"block", op.block},
                   {"name", op.name},
                   {"f", {op.in_features, op.out_features}},
                   {"bias", op.has_bias},
                   {"t", op.transposed},
                   {"norm", static_cast<int>(op.norm_kind)},
                   {"eps", op.eps},
                   {"act", static_cast<int>(op.activation)},
                   {"layout", static_cast<int>(op.layout)},
                   {"parts", op.part_widths},
                   {"heads", {op.n_heads, op.head_dim}},
                   {"rope", rope_json(op.rope)},
                   {"attn", attention_json(op.attention)},
                   {"input", static_cast<int>(op.input)},
                   {"stream", stream},
                   {"offset", op.offset}});
  }
  return json{{"blocks", blocks}, {"ops", ops}, {"logits", g.logits}}.dump();
}

graph::Graph graph_from_json(const std::string& text, const std::string& who) {
  using graph::OpKind;
  try {
    const json j = json::parse(text);
    const json& blocks = j.at("blocks");
    graph::GraphBuilder b;
    int open = -1;
    for (const json& o : j.at("ops")) {
      const int block = o.at("block").get<int>();
      if (block != open) {
        if (open >= 0) b.end_block();
        if (block >= 0) {
          const json& bl = blocks.at(static_cast<size_t>(block));
          b.begin_block(bl.at(0).get<std::string>(), bl.at(1).get<std::string>());
        }
        open = block;
      }
      const auto in = o.at("in").get<std::vector<int>>();
      const auto out = o.at("out").get<std::vector<int>>();
      const auto arg = [&](size_t i) {
        if (i >= in.size()) fail("an op lacks input {}", i);
        return in[i];
      };
      const std::string name = o.at("name").get<std::string>();
      const int64_t in_f = o.at("f").at(0).get<int64_t>(), out_f = o.at("f").at(1).get<int64_t>();
      const int64_t n_heads = o.at("heads").at(0).get<int64_t>();
      const int64_t head_dim = o.at("heads").at(1).get<int64_t>();
      int made = -1;
      std::vector<int> parts;
      switch (static_cast<OpKind>(o.at("k").get<int>())) {
        case OpKind::kInputIds: {
          const auto kind = static_cast<graph::InputKind>(o.at("input").get<int>());
          made = kind == graph::InputKind::kPositions
                     ? b.position_ids(o.at("offset").get<int64_t>())
                     : b.input(kind == graph::InputKind::kTokenTypes ? kind
                                                                     : graph::InputKind::kTokenIds,
                               o.at("stream").get<int>());
          break;
        }
        case OpKind::kEmbedding:
          made = b.embedding(arg(0), name, out_f, in_f);
          break;
        case OpKind::kNorm:
          made = b.norm(arg(0), static_cast<tpe_norm_kind>(o.at("norm").get<int>()), name,
                        o.at("bias").get<bool>(), o.at("eps").get<double>());
          break;
        case OpKind::kLinear:
          made =
              b.linear(arg(0), name, in_f, out_f, o.at("bias").get<bool>(), o.at("t").get<bool>());
          break;
        case OpKind::kSplit:
          b.split(arg(0), static_cast<tpe_split_layout>(o.at("layout").get<int>()),
                  o.at("parts").get<std::vector<int64_t>>(), n_heads, head_dim, parts);
          made = parts.empty() ? -1 : parts[0];
          break;
        case OpKind::kRotary:
          made = b.rotary(arg(0), n_heads, head_dim, rope_of(o.at("rope")));
          break;
        case OpKind::kAttention:
          made = b.attention(arg(0), arg(1), arg(2), attention_of(o.at("attn")));
          break;
        case OpKind::kActivation:
          made = b.activation(arg(0), static_cast<tpe_activation>(o.at("act").get<int>()));
          break;
        case OpKind::kMul:
          made = b.mul(arg(0), arg(1));
          break;
        case OpKind::kAdd:
          made = b.add(arg(0), arg(1));
          break;
        case OpKind::kLmHead:
          made = b.lm_head(arg(0), name, out_f, in_f);
          break;
        default:
          fail("unknown op kind {}", o.at("k").get<int>());
      }
      if (b.error()) break;
      // Values are numbered as they are made: the replay must number them as the child did.
      if (out.empty() || made != out[0] || (!parts.empty() && parts != out)) {
        fail("op outputs {} are not the values the replay made", fmt::join(out, ", "));
      }
    }
    if (open >= 0 && !b.error()) b.end_block();
    return b.finish();
  } catch (const json::exception& e) {
    fail("{}: its build sent back a graph that does not read: {}", who, json_error_message(e));
  } catch (const Error& e) {
    fail("{}: its build sent back a graph that does not replay: {}", who, e.what());
  }
}

}  // namespace tpe::plugin
