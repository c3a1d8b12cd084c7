#!/usr/bin/env python3
"""llama.cpp as a peer for tools/bench_peers.py: its source, its llama-bench, a GGUF of a shape.

llama.cpp is taken from llama-cpp-python's source distribution on PyPI (it vendors llama.cpp),
pinned by version and hash. `pack` makes a trimmed copy of that source (no models, docs or
other backends' assets: about 10 MB packed) for machines without a network; bench_peers.py then
builds llama-bench from it (CUDA when nvcc is there), writes an F16 GGUF of the benchmark's
shape with random weights (gguf-py from the same source; needs numpy) and runs
`llama-bench -fa 1`: a prompt of P tokens (pp P) and N tokens generated after P of context
(tg N @ d P), the same work as tpengine's TTFT and TPOT after a P-token prompt.

  tools/llama_cpp_peer.py pack OUT.tar.xz          # here: download, check, trim, pack
  tools/bench_peers.py ... --peers llamacpp --llama-cpp OUT.tar.xz   # there
  tools/llama_cpp_peer.py build OUT.tar.xz DIR     # there, ahead of time (ggml's CUDA kernels
                                                   # take minutes on many cores): prints the
                                                   # llama-bench path for --llama-bench
"""
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

VERSION = "0.3.36"  # llama-cpp-python
SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
# Parts of vendor/llama.cpp that building llama-bench and writing a GGUF do not need.
TRIM = ("models", "docs", "media", "examples", "tests", "benches", "scripts", "conversion",
        "ggml/src/ggml-sycl", "ggml/src/ggml-vulkan", "ggml/src/ggml-opencl",
        "ggml/src/ggml-cann", "ggml/src/ggml-hexagon", "ggml/src/ggml-metal",
        "ggml/src/ggml-musa", "ggml/src/ggml-webgpu", "ggml/src/ggml-openvino",
        "ggml/src/ggml-zdnn", "ggml/src/ggml-zendnn", "ggml/src/ggml-virtgpu", "ggml/src/ggml-et",
        "tools/server/public", "tools/server/webui")


def log(text):
    print(f"[llama_cpp_peer] {text}", file=sys.stderr, flush=True)


def pack(out):
    """Downloads the pinned sdist, checks its hash, writes vendor/llama.cpp trimmed to out."""
    import hashlib

    with tempfile.TemporaryDirectory() as work:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                        "--no-binary", ":all:", "-d", work, f"llama-cpp-python=={VERSION}"],
                       check=True)
        sdist = os.path.join(work, f"llama_cpp_python-{VERSION}.tar.gz")
        with open(sdist, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        if digest != SHA256:
            sys.exit(f"llama_cpp_peer: {sdist}: sha256 {digest}, not the pinned {SHA256}")
        with tarfile.open(sdist) as t:
            t.extractall(work, filter="data")
        src = os.path.join(work, f"llama_cpp_python-{VERSION}", "vendor", "llama.cpp")
        for part in TRIM:
            shutil.rmtree(os.path.join(src, part), ignore_errors=True)
        with tarfile.open(out, "w:xz") as t:
            t.add(src, arcname="llama.cpp")
    log(f"{out}: llama.cpp of llama-cpp-python {VERSION}, {os.path.getsize(out) / 1e6:.1f} MB")


def source_tree(path, work):
    """A llama.cpp source folder: path itself, or unpacked from a `pack` archive into work."""
    if os.path.isdir(path):
        return path
    with tarfile.open(path) as t:
        t.extractall(work, filter="data")
    return os.path.join(work, "llama.cpp")


def build_llama_bench(src, build_dir, cuda, timeout):
    """Builds llama-bench (CUDA for sm_90 when cuda) and returns its path."""
    flags = ["-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
             "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DGGML_NATIVE=ON"]
    if cuda:
        flags += ["-DGGML_CUDA=ON", "-DCMAKE_CUDA_ARCHITECTURES=90"]
    log(f"building llama-bench ({'CUDA' if cuda else 'CPU'}) in {build_dir}")
    subprocess.run(["cmake", "-S", src, "-B", build_dir, *flags], check=True,
                   capture_output=True, timeout=timeout)
    subprocess.run(["cmake", "--build", build_dir, "-j", str(os.cpu_count()), "--target",
                    "llama-bench"], check=True, capture_output=True, timeout=timeout)
    return os.path.join(build_dir, "bin", "llama-bench")


def write_gguf(src, shape, path):
    """An F16 GGUF of a Llama-architecture shape (bench_peers.SHAPES) with random weights (norms
    F32, as llama.cpp's converter writes them) and a placeholder vocabulary of the shape's size.
    A file that an earlier call finished for the same shape (path + ".shape.json" says which) is
    kept: a 7B one is 13.5 GB to write."""
    marker = path + ".shape.json"
    if os.path.exists(path) and os.path.exists(marker):
        with open(marker) as f:
            if json.load(f) == shape:
                log(f"{path}: kept (written before for this shape)")
                return
    if os.path.exists(marker):
        os.remove(marker)
    sys.path.insert(0, os.path.join(src, "gguf-py"))
    import gguf
    import numpy as np

    h, layers, ff = shape["hidden_size"], shape["num_hidden_layers"], shape["intermediate_size"]
    heads = shape["num_attention_heads"]
    kv_heads = shape.get("num_key_value_heads", heads)
    vocab = shape["vocab_size"]
    hd = h // heads
    w = gguf.GGUFWriter(path, "llama")
    w.add_context_length(shape["max_position_embeddings"])
    w.add_embedding_length(h)
    w.add_block_count(layers)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(shape["rms_norm_eps"])
    w.add_rope_freq_base(shape["rope_theta"])
    w.add_rope_dimension_count(hd)
    w.add_vocab_size(vocab)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    # SentencePiece-style: unk, bos, eos, the 256 byte tokens, then plain pieces.
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"\u2581t{i}" for i in range(vocab - len(tokens))]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    types += [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.NORMAL] * (vocab - 259)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * vocab)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    tensors = [("token_embd.weight", (vocab, h), np.float16)]
    for i in range(layers):
        b = f"blk.{i}."
        tensors += [(b + "attn_norm.weight", (h,), np.float32),
                    (b + "attn_q.weight", (heads * hd, h), np.float16),
                    (b + "attn_k.weight", (kv_heads * hd, h), np.float16),
                    (b + "attn_v.weight", (kv_heads * hd, h), np.float16),
                    (b + "attn_output.weight", (h, heads * hd), np.float16),
                    (b + "ffn_norm.weight", (h,), np.float32),
                    (b + "ffn_gate.weight", (ff, h), np.float16),
                    (b + "ffn_up.weight", (ff, h), np.float16),
                    (b + "ffn_down.weight", (h, ff), np.float16)]
    tensors += [("output_norm.weight", (h,), np.float32), ("output.weight", (vocab, h), np.float16)]
    for name, dims, dtype in tensors:
        w.add_tensor_info(name, dims, np.dtype(dtype), int(np.prod(dims)) * np.dtype(dtype).itemsize)
    w.write_header_to_file(path)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    # Decode time does not depend on the values: one random block, repeated.
    rng = np.random.default_rng(0)
    block = (rng.standard_normal(1 << 22) * 0.02).astype(np.float16)
    for name, dims, dtype in tensors:
        n = int(np.prod(dims))
        values = np.ones(n, np.float32) if dtype == np.float32 else np.resize(block, n)
        w.write_tensor_data(values.reshape(dims))
    w.close()
    with open(marker, "w") as f:
        json.dump(shape, f)
    log(f"{path}: {os.path.getsize(path) / 1e9:.2f} GB")


def run_llama_bench(binary, gguf_path, prompt_len, new_tokens, repeat, run):
    """{pp_tokens_per_s, tg_tokens_per_s, ttft_ms, tpot_ms} of llama-bench -fa 1, all layers on
    the GPU: a prompt of prompt_len tokens (pp, empty context), and new_tokens generated after
    prompt_len tokens of context (tg @ d), or None when it fails. run(cmd, what): the finished
    process or None, logged (bench_peers.run_logged)."""
    def bench(extra):
        cmd = [binary, "-m", gguf_path, "-fa", "1", "-ngl", "99", "-r", str(repeat), "-o", "json",
               *extra]
        done = run(cmd, "llama-bench")
        return json.loads(done.stdout)[0] if done else None

    pp = bench(["-p", str(prompt_len), "-n", "0"])
    tg = bench(["-p", "0", "-n", str(new_tokens), "-d", str(prompt_len)])
    if not pp or not tg:
        return None
    return {"pp_tokens_per_s": pp["avg_ts"], "tg_tokens_per_s": tg["avg_ts"],
            "ttft_ms": prompt_len / pp["avg_ts"] * 1e3, "tpot_ms": 1e3 / tg["avg_ts"],
            "build": pp.get("build_commit", ""), "backends": pp.get("backends", "")}


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "pack":
        return pack(sys.argv[2])
    if len(sys.argv) == 4 and sys.argv[1] == "build":
        if not os.path.exists(sys.argv[2]):
            sys.exit(f"llama_cpp_peer: {sys.argv[2]}: no such source folder or archive")
        os.makedirs(sys.argv[3], exist_ok=True)
        src = source_tree(sys.argv[2], sys.argv[3])
        cuda = shutil.which("nvcc") is not None
        try:
            print(build_llama_bench(src, os.path.join(sys.argv[3], "llama-build"), cuda, 3600))
        except subprocess.CalledProcessError as e:
            sys.exit(f"llama_cpp_peer: building llama-bench failed:\n"
                     f"{(e.stderr or e.stdout or b'')[-3000:].decode(errors='replace')}")
        return 0
    sys.exit(__doc__)


if __name__ == "__main__":
    sys.exit(main())
