// Plugin code runs in a child process (fork): loading a plugin (its constructors, its entry
// point) and its build(). A crash, an abort or a hang there is then an error naming the plugin,
// not the end of tpengine. What comes back is plain data (a policy's metadata, a built graph as
// JSON), which the parent checks again as it rebuilds it (the graph through a fresh
// GraphBuilder, so every op's argument checks run in the parent too).
#pragma once

#include <functional>
#include <string>

#include "core/common/error.hpp"

namespace tpe::plugin {

// The child died (a signal, an exit without a result) or ran past its time: the plugin is
// broken, as opposed to one that reported an error (a config it cannot build), which comes back
// as a plain tpe::Error with its message.
class ChildFailure : public Error {
 public:
  using Error::Error;
};

// Runs work() in a forked child and returns what it returned. An Error it throws comes back
// with its message; a crash or a timeout (seconds) is a ChildFailure "<who> crashed while
// <doing>: SIGSEGV (segmentation fault)". The child ends with _exit: no atexit handler or
// static destructor of the parent runs twice.
std::string run_in_child(const std::string& who, const std::string& doing,
                         const std::function<std::string()>& work, int timeout_seconds);

// Seconds a plugin may take to load or build: TPENGINE_POLICY_TIMEOUT, default 60.
int policy_timeout_seconds();

}  // namespace tpe::plugin

#include "core/graph/graph.hpp"

namespace tpe::plugin {

// A built graph as JSON, and back: the JSON is replayed op by op through a fresh GraphBuilder,
// so the parent trusts nothing the child sent (a malformed or inconsistent one is an Error
// naming `who`).
std::string graph_to_json(const graph::Graph& graph);
graph::Graph graph_from_json(const std::string& json, const std::string& who);

}  // namespace tpe::plugin
