# tpengine_add_policy(<name> SOURCES <file>... [OUTPUT_NAME <name>] [OUTPUT_DIRECTORY <dir>])
#
# Builds a tpengine policy plugin: a MODULE library compiled against the SDK headers only,
# exporting nothing but tpe_policy_entry (hidden visibility plus a linker version script), and
# refusing undefined symbols at link time (a plugin must not expect anything from the engine).
# The result is lib<OUTPUT_NAME>.so (default: lib<name>.so); drop it into a policies directory.
function(tpengine_add_policy name)
  cmake_parse_arguments(ARG "" "OUTPUT_NAME;OUTPUT_DIRECTORY" "SOURCES" ${ARGN})
  if(NOT ARG_SOURCES)
    message(FATAL_ERROR "tpengine_add_policy(${name}): SOURCES is required")
  endif()
  if(ARG_UNPARSED_ARGUMENTS)
    message(FATAL_ERROR "tpengine_add_policy(${name}): unknown arguments ${ARG_UNPARSED_ARGUMENTS}")
  endif()
  add_library(${name} MODULE ${ARG_SOURCES})
  target_link_libraries(${name} PRIVATE tpengine::sdk)
  target_compile_features(${name} PRIVATE cxx_std_17)
  set_target_properties(${name} PROPERTIES
    PREFIX "lib"
    C_VISIBILITY_PRESET hidden
    CXX_VISIBILITY_PRESET hidden
    VISIBILITY_INLINES_HIDDEN ON)
  if(ARG_OUTPUT_NAME)
    set_target_properties(${name} PROPERTIES OUTPUT_NAME ${ARG_OUTPUT_NAME})
  endif()
  if(ARG_OUTPUT_DIRECTORY)
    set_target_properties(${name} PROPERTIES LIBRARY_OUTPUT_DIRECTORY ${ARG_OUTPUT_DIRECTORY})
  endif()
  if(CMAKE_SYSTEM_NAME STREQUAL "Linux")
    target_link_options(${name} PRIVATE
      "LINKER:--version-script=${CMAKE_CURRENT_FUNCTION_LIST_DIR}/tpengine_policy.map"
      "LINKER:--no-undefined")
  endif()
endfunction()
