// A planted violation for the levels check: graph/ (level 2) including runtime/ (level 7).
#pragma once
#include "core/runtime/engine.hpp"
