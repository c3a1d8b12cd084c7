#!/usr/bin/env python3
"""Measures tpengine beside its peers on one machine, in one run, and prints Markdown rows for
docs/benchmarks.md.

For a model shape (a config.json written here; random weights, which decode speed does not
depend on), it runs `tpengine bench --random-weights --json` and Hugging Face transformers'
eager `generate` on the same batch, prompt length and number of new tokens, greedy, never
stopping early. transformers' TTFT is the time of a one-token generate; its TPOT is
(time of an N-token generate - TTFT) / (N - 1). Needs torch and transformers (not needed by
tpengine itself).

usage: tools/bench_peers.py --shape smollm2-135m --tpengine build/tools/tpengine [--tp 1 2]
                            [--batch 1] [--prompt-len 128] [--new-tokens 128] [--device cpu]
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

SHAPES = {
    # SmolLM2-135M: small enough for a CPU.
    "smollm2-135m": dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=576,
                         intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
                         rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=8192),
    "llama-2-7b": dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=4096,
                       intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, rms_norm_eps=1e-5,
                       rope_theta=10000.0, max_position_embeddings=4096),
    "llama-2-13b": dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=5120,
                        intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                        num_key_value_heads=40, vocab_size=32000, rms_norm_eps=1e-5,
                        rope_theta=10000.0, max_position_embeddings=4096),
}


def run_tpengine(exe, model_dir, tp, args):
    cmd = [exe, "bench", "--model", model_dir, "--random-weights", "--json", "--tp", str(tp),
           "--batch", str(args.batch), "--prompt-len", str(args.prompt_len),
           "--new-tokens", str(args.new_tokens), "--repeat", str(args.repeat),
           "--device", "cuda" if args.device.startswith("cuda") else "cpu", "--dtype", args.dtype]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def run_transformers(model_dir, args):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(model_dir)
    with torch.device(args.device):  # initialise on the device: a 7B model on the CPU takes minutes
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype),
                                                 attn_implementation="eager")
    model.eval()
    ids = torch.randint(0, config.vocab_size, (args.batch, args.prompt_len), device=args.device)
    mask = torch.ones_like(ids)

    def timed(n):
        sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
        best = []
        for _ in range(args.repeat):
            sync()
            start = time.perf_counter()
            with torch.no_grad():
                out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                                     min_new_tokens=n, eos_token_id=None, pad_token_id=0)
            sync()
            best.append(time.perf_counter() - start)
            assert out.shape[1] == args.prompt_len + n
        return sorted(best)[len(best) // 2]

    timed(args.new_tokens)  # warm-up: the first generate calls are much slower
    ttft = timed(1)
    total = timed(args.new_tokens)
    tpot = (total - ttft) / (args.new_tokens - 1)
    return {"ttft_ms": ttft * 1e3, "tpot_ms": tpot * 1e3,
            "decode_tokens_per_s": args.batch / tpot}


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), required=True)
    parser.add_argument("--tpengine", required=True)
    parser.add_argument("--tp", type=int, nargs="+", default=[1])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as model_dir:
        with open(os.path.join(model_dir, "config.json"), "w") as f:
            json.dump(SHAPES[args.shape], f)
        rows = []
        for tp in args.tp:
            r = run_tpengine(args.tpengine, model_dir, tp, args)
            gb = max(r["weight_bytes_per_rank"]) / 1e9
            rows.append((f"tpengine TP {tp}", r["ttft_ms"], r["tpot_ms"]["mean"],
                         r["tpot_ms"]["p90"], r["decode_tokens_per_s"],
                         f'{r["achieved_bandwidth_gbs"]:.1f} GB/s = '
                         f'{100 * r["achieved_bandwidth_fraction"]:.0f}% of '
                         f'{r["memory_bandwidth_gbs"]:.1f}', gb))
        hf = run_transformers(model_dir, args)
        rows.append(("transformers eager, TP 1", hf["ttft_ms"], hf["tpot_ms"], float("nan"),
                     hf["decode_tokens_per_s"], "", float("nan")))

    import torch
    import transformers
    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else ""
    print(f"### {args.shape}, {args.dtype}, batch {args.batch}, prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, {args.device} {gpu}")
    print()
    print(f"{datetime.date.today()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores; tpengine commit {commit()}; torch {torch.__version__}, "
          f"transformers {transformers.__version__}.")
    print()
    print("| engine | TTFT ms | TPOT mean ms | TPOT p90 ms | decode tok/s | bandwidth "
          "(weights/TPOT vs copy) | weight GB/rank |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, ttft, tpot, p90, tps, bw, gb in rows:
        p90_text = "" if p90 != p90 else f"{p90:.2f}"
        gb_text = "" if gb != gb else f"{gb:.2f}"
        print(f"| {name} | {ttft:.1f} | {tpot:.2f} | {p90_text} | {tps:.1f} | {bw} | {gb_text} |")


def commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
