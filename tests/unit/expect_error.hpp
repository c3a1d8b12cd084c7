// The unit tests' check of a failure: the action throws tpe::Error, with a one-line message that
// contains every expected part.
#pragma once

#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "core/common/error.hpp"

namespace tpe::testing {

// The message of the tpe::Error `action` throws (a test failure when it throws none).
template <typename F>
std::string error_of(F&& action) {
  try {
    action();
  } catch (const tpe::Error& error) {
    return error.what();
  }
  ADD_FAILURE() << "expected a tpe::Error";
  return {};
}

template <typename F>
void expect_error(F&& action, const std::vector<std::string>& parts) {
  const std::string message = error_of(action);
  EXPECT_EQ(message.find('\n'), std::string::npos) << message;
  for (const std::string& part : parts) {
    EXPECT_NE(message.find(part), std::string::npos) << "'" << part << "' not in: " << message;
  }
}

}  // namespace tpe::testing
