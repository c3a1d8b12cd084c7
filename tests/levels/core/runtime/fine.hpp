// Allowed: runtime/ including graph/, a lower level.
#pragma once
#include "core/graph/graph.hpp"
