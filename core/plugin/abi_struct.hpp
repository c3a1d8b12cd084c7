// The ABI's versioned structs, read and written by the size the plugin declares. A plugin built
// against an older minor passes shorter structs, one built against a newer minor longer ones;
// struct_size says which. The host never copies a plugin's struct whole:
//  - a struct the plugin passes in is read up to min(struct_size, sizeof) into a host copy that
//    holds the host's defaults for the members the plugin's struct does not reach;
//  - a struct the host fills for the plugin is written up to min(struct_size, sizeof), and its
//    struct_size (the plugin's) is left as it was;
//  - a struct_size below the struct's size in ABI 1.0 is no struct of this major at all (an
//    unset or garbage struct_size) and is an error naming the struct.
// The defaults are documented beside each member in policy.h and in sdk/docs/abi-versioning.md.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string_view>
#include <type_traits>

#include <tpengine/policy.h>

#include "core/common/error.hpp"

namespace tpe::plugin {

// What the host knows of one versioned struct: its name, its size in ABI 1.0 (the end of its
// last 1.0 member: fixed forever, unlike sizeof, which grows with every appended member), and the
// host copy a plugin's struct is read over.
template <typename T>
struct AbiStruct;

template <>
struct AbiStruct<tpe_attention_desc> {
  static constexpr std::string_view kName = "tpe_attention_desc";
  static constexpr size_t kSize_1_0 =
      offsetof(tpe_attention_desc, sliding_window) + sizeof(int64_t);
  // Every member is a 1.0 member, so no valid plugin lacks one; members appended later get
  // their documented defaults here.
  static tpe_attention_desc defaults() {
    tpe_attention_desc d{};
    d.struct_size = sizeof(d);
    return d;
  }
};

template <>
struct AbiStruct<tpe_rope_desc> {
  static constexpr std::string_view kName = "tpe_rope_desc";
  static constexpr size_t kSize_1_0 =
      offsetof(tpe_rope_desc, original_max_position_embeddings) + sizeof(int64_t);
  static tpe_rope_desc defaults() {  // as tpe_attention_desc: every member is 1.0
    tpe_rope_desc d{};
    d.struct_size = sizeof(d);
    return d;
  }
};

template <>
struct AbiStruct<tpe_policy_desc> {
  static constexpr std::string_view kName = "tpe_policy_desc";
  static constexpr size_t kSize_1_0 = TPE_POLICY_DESC_SIZE_1_0;
  static tpe_policy_desc defaults() {
    tpe_policy_desc d{};
    d.struct_size = sizeof(d);
    d.description = nullptr;  // 1.1: none
    return d;
  }
};

// The struct_size a plugin's struct declares (the first member of every versioned struct).
inline uint32_t declared_size(const void* from_plugin) {
  uint32_t size = 0;
  std::memcpy(&size, from_plugin, sizeof(size));
  return size;
}

// tpe::Error unless `size` is at least the struct's 1.0 size.
inline void check_size(uint32_t size, std::string_view name, size_t size_1_0) {
  if (size < size_1_0) {
    fail(
        "{}.struct_size is {}, less than the {} bytes the struct has had since ABI {}.0; set it "
        "to sizeof({})",
        name, size, size_1_0, TPE_ABI_MAJOR, name);
  }
}

// The host's copy of a struct the plugin passed: the bytes its struct_size covers over
// `defaults`, the host-side struct_size. from_plugin must not be null.
template <typename T>
T read_struct(const void* from_plugin, const T& defaults, std::string_view name, size_t size_1_0) {
  static_assert(std::is_trivially_copyable_v<T> && std::is_standard_layout_v<T>);
  static_assert(offsetof(T, struct_size) == 0 && sizeof(T::struct_size) == sizeof(uint32_t));
  const uint32_t size = declared_size(from_plugin);
  check_size(size, name, size_1_0);
  T out = defaults;
  std::memcpy(&out, from_plugin, std::min<size_t>(size, sizeof(T)));
  out.struct_size = sizeof(T);
  return out;
}

template <typename T>
T read_struct(const T* from_plugin) {
  return read_struct(from_plugin, AbiStruct<T>::defaults(), AbiStruct<T>::kName,
                     AbiStruct<T>::kSize_1_0);
}

// Fills the plugin's struct from `value` up to the plugin's struct_size, leaving its struct_size
// and everything past it untouched. to_plugin must not be null.
template <typename T>
void write_struct(void* to_plugin, const T& value, std::string_view name, size_t size_1_0) {
  static_assert(std::is_trivially_copyable_v<T> && std::is_standard_layout_v<T>);
  static_assert(offsetof(T, struct_size) == 0 && sizeof(T::struct_size) == sizeof(uint32_t));
  constexpr size_t kHead = sizeof(uint32_t);
  TPE_CHECK(size_1_0 >= kHead, "{}: a 1.0 size of {} cannot hold struct_size", name, size_1_0);
  const uint32_t size = declared_size(to_plugin);
  check_size(size, name, size_1_0);
  std::memcpy(static_cast<char*>(to_plugin) + kHead, reinterpret_cast<const char*>(&value) + kHead,
              std::min<size_t>(size, sizeof(T)) - kHead);
}

template <typename T>
void write_struct(T* to_plugin, const T& value) {
  write_struct(to_plugin, value, AbiStruct<T>::kName, AbiStruct<T>::kSize_1_0);
}

}  // namespace tpe::plugin
