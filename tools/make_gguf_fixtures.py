#!/usr/bin/env python3
"""Make the GGUF reader's fixture: tests/fixtures/gguf/blocks.gguf.

The gguf package (gguf-py, from the llama.cpp source that llama-cpp-python's pinned source
distribution vendors: see tools/llama_cpp_peer.py) writes and dequantizes; tpengine's reader is
compared with it, so nothing here is computed by tpengine. The file holds:
- metadata of every GGUF value type (scalars, and arrays of integers, floats and strings);
- for each element type tpengine reads, a tensor `<TYPE>` of 3 rows x 2 blocks of random bytes
  (the blocks' f16 scales made finite, float elements made finite) and `<TYPE>.expected`, the F32
  values gguf.quants.dequantize gives for those bytes.

Usage:
    python3 tools/make_gguf_fixtures.py --llama-cpp SRC --out tests/fixtures/gguf
SRC: a llama.cpp source folder, or the archive `tools/llama_cpp_peer.py pack` writes.
"""
import argparse
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import llama_cpp_peer  # noqa: E402

ROWS = 3
BLOCKS_PER_ROW = 2
# Byte offsets of each block's f16 scales (made finite below).
SCALES = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0],
          "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}


def finite_halves(rng, n):
    """n random finite f16 values of both signs, subnormals included, as uint16 bits."""
    bits = rng.integers(0, 1 << 16, n, dtype=np.uint32).astype(np.uint16)
    exponent = (bits >> 10) & 0x1F
    return np.where(exponent == 0x1F, bits & np.uint16(0x83FF), bits).astype(np.uint16)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--llama-cpp", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        src = llama_cpp_peer.source_tree(args.llama_cpp, work)
        sys.path.insert(0, os.path.join(src, "gguf-py"))
        import gguf
        from gguf.quants import dequantize

        rng = np.random.default_rng(20261202)
        path = os.path.join(args.out, "blocks.gguf")
        w = gguf.GGUFWriter(path, "tpengine-test")
        w.add_uint8("test.u8", 200)
        w.add_int8("test.i8", -100)
        w.add_uint16("test.u16", 60000)
        w.add_int16("test.i16", -30000)
        w.add_uint32("test.u32", 4000000000)
        w.add_int32("test.i32", -2000000000)
        w.add_float32("test.f32", 0.25)
        w.add_bool("test.bool", True)
        w.add_string("test.string", "caf\u00e9 \U0001F600")
        w.add_uint64("test.u64", 1 << 40)
        w.add_int64("test.i64", -(1 << 40))
        w.add_float64("test.f64", -1.5e300)
        w.add_array("test.ints", [1, -2, 3])
        w.add_array("test.floats", [0.5, -2.0])
        w.add_array("test.strings", ["a", "", "\u2581b"])
        Q = gguf.GGMLQuantizationType
        for name in ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K",
                     "Q6_K"]:
            qtype = Q[name]
            block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
            per_row = BLOCKS_PER_ROW * (block if block > 1 else 32)
            if name == "F32":
                raw = rng.standard_normal((ROWS, per_row)).astype(np.float32).view(np.uint8)
            elif name == "F16":
                raw = finite_halves(rng, ROWS * per_row).reshape(ROWS, per_row).view(np.uint8)
            elif name == "BF16":
                bits = finite_halves(rng, ROWS * per_row)  # any finite pattern will do as bf16
                bits = np.where(((bits >> 7) & 0xFF) == 0xFF, bits & np.uint16(0x807F), bits)
                raw = bits.astype(np.uint16).reshape(ROWS, per_row).view(np.uint8)
            else:
                n_blocks = ROWS * BLOCKS_PER_ROW
                raw = rng.integers(0, 256, (n_blocks, block_bytes), dtype=np.uint16).astype(np.uint8)
                for at in SCALES[name]:
                    raw[:, at:at + 2] = finite_halves(rng, n_blocks).view(np.uint8).reshape(n_blocks, 2)
                raw = raw.reshape(ROWS, BLOCKS_PER_ROW * block_bytes)
            expected = dequantize(raw, qtype).astype(np.float32).reshape(ROWS, per_row)
            assert np.isfinite(expected).all(), name
            w.add_tensor(name, raw, raw_dtype=qtype)
            w.add_tensor(name + ".expected", expected)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        print(f"{path}: {os.path.getsize(path)} bytes, gguf-py from {src}")


if __name__ == "__main__":
    sys.exit(main())
