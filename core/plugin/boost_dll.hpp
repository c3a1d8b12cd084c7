// Boost.DLL, the one Boost library tpengine uses, included here alone so that the build can
// check that everything it pulls in comes from the one Boost CMake found (CMakeLists.txt: "one
// Boost").
#pragma once

#include <boost/dll/shared_library.hpp>
