#!/usr/bin/env python3
"""Measures tpengine beside its peers on one machine, in one run, and prints Markdown tables for
docs/benchmarks.md (shared/design/BENCHMARKS.md says what and how).

For a model shape (a config.json written here), on the same GPUs and the same batch sizes, prompt
length and number of new tokens, greedy (or, with --do-sample, sampled with transformers'
defaults: temperature 1, top-k 50), never stopping early:
  - Hugging Face transformers eager `generate` on one GPU (--peers eager), and the same model with
    attn_implementation="sdpa" (--peers sdpa);
  - transformers with its own tensor parallelism, `from_pretrained(tp_plan="auto")` under
    torchrun, for every TP size above 1 (--peers tp). It needs a checkpoint, so the eager model
    (random init) is saved into --workdir first; tpengine then loads that checkpoint too, for a
    real load time (from the page cache: the file was just written);
  - `tpengine bench --random-weights --json` at every TP size, first (and, with --no-graph-too,
    again with --no-cuda-graph: every decode step op by op, to show what the CUDA graph buys;
    with --plain-too, again with --kernel-inject false: the plain kernels beside the fused; with
    --peer-all-reduce-too, at TP > 1 again with --all-reduce auto: the one-shot all-reduce over
    peer memory beside NCCL);
  - llama.cpp's llama-bench (--peers llamacpp --llama-cpp SRC), built from SRC (a llama.cpp
    source folder, or the archive `tools/llama_cpp_peer.py pack` makes) with CUDA, or an existing
    build given by --llama-bench (SRC still gives gguf-py, which writes the model), on an F16 GGUF
    of the shape with random weights, flash attention on: pp P (a P-token prompt) and tg N after
    P tokens of context, at batch 1, as TTFT and TPOT (tools/llama_cpp_peer.py);
  - the bandwidth roofline: weight bytes per GPU / the copy bandwidth tpengine measured.
transformers' TTFT is the time of a one-token generate; its TPOT is (time of an N-token generate -
TTFT) / (N - 1). Needs torch and transformers (tpengine itself does not).

usage: tools/bench_peers.py --shape llama-2-7b --tpengine build/tools/tpengine --device cuda
                            --dtype bfloat16 [--tp 1 2 4] [--batch 1 8] [--peers eager tp llamacpp]
                            [--profile] [--no-graph-too] [--plain-too] [--peer-all-reduce-too]
                            [--do-sample] [--workdir DIR] [--json-out FILE]
"""
import argparse
import datetime
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time

SHAPES = {
    # For trying this script out on a CPU in seconds.
    "llama-tiny": dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=256,
                       intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                       num_key_value_heads=8, vocab_size=4096, rms_norm_eps=1e-5,
                       rope_theta=10000.0, max_position_embeddings=1024),
    # SmolLM2-135M: small enough for a CPU.
    "smollm2-135m": dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=576,
                         intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
                         rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=8192),
    "llama-2-7b": dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=4096,
                       intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, rms_norm_eps=1e-5,
                       rope_theta=10000.0, max_position_embeddings=4096),
    # BLOOM-7B1 (the seeds' BELLE-7B): ALiBi, a 250880-row vocabulary.
    "bloom-7b1": dict(model_type="bloom", architectures=["BloomForCausalLM"], hidden_size=4096,
                      n_head=32, n_layer=30, vocab_size=250880, layer_norm_epsilon=1e-5),
    # Falcon-7B: multi-query (71 q heads of 64, one kv head), parallel attention, no biases.
    "falcon-7b": dict(model_type="falcon", architectures=["FalconForCausalLM"], hidden_size=4544,
                      num_attention_heads=71, num_hidden_layers=32, vocab_size=65024,
                      multi_query=True, parallel_attn=True, new_decoder_architecture=False,
                      alibi=False, bias=False, layer_norm_epsilon=1e-5, rope_theta=10000.0,
                      max_position_embeddings=2048),
    # GPT-NeoX-20B: parallel residual, rotary over a quarter of each head, gelu_fast.
    "neox-20b": dict(model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"],
                     hidden_size=6144, intermediate_size=24576, num_hidden_layers=44,
                     num_attention_heads=64, vocab_size=50432, rotary_pct=0.25,
                     rotary_emb_base=10000, max_position_embeddings=2048, layer_norm_eps=1e-5,
                     use_parallel_residual=True, hidden_act="gelu_fast",
                     tie_word_embeddings=False),
    "llama-2-13b": dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=5120,
                        intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                        num_key_value_heads=40, vocab_size=32000, rms_norm_eps=1e-5,
                        rope_theta=10000.0, max_position_embeddings=4096),
}


def log(text):
    print(f"[bench_peers {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def run_logged(cmd, what, timeout):
    """The finished process, or None (logged) when it failed or ran past timeout seconds."""
    log(" ".join(cmd))
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        log(f"{what} took longer than {timeout} s; left out")
        return None
    except OSError as e:
        log(f"{what} could not start: {e}")
        return None
    if done.returncode != 0:
        log(f"{what} failed ({done.returncode}):\n{done.stderr[-3000:]}")
        return None
    return done


def run_tpengine(args, model_dir, tp, checkpoint, load_only=False, graph=True, fused=None,
                 all_reduce=None):
    """tpengine bench's JSON; load_only: the shortest run, for its load figures; fused: the
    kernel_inject setting (None: tpengine's default, fused on GPUs); all_reduce: the
    inference.all_reduce setting (None: the default)."""
    cmd = [args.tpengine, "bench", "--model", model_dir, "--json", "--tp", str(tp),
           "--device", "cuda" if args.device.startswith("cuda") else "cpu", "--dtype", args.dtype]
    if not graph:
        cmd.append("--no-cuda-graph")
    if fused is not None:
        cmd += ["--kernel-inject", "true" if fused else "false"]
    if all_reduce is not None:
        cmd += ["--all-reduce", all_reduce]
    if args.do_sample and not load_only:
        cmd += ["--do-sample", "true"]
    if load_only:
        cmd += ["--batch", "1", "--prompt-len", "1", "--new-tokens", "2", "--repeat", "1",
                "--warmup", "0"]
    else:
        cmd += ["--batch", ",".join(map(str, args.batch)), "--prompt-len", str(args.prompt_len),
                "--new-tokens", str(args.new_tokens), "--repeat", str(args.repeat)]
        if args.profile:
            cmd.append("--profile")
    if not checkpoint:
        cmd.append("--random-weights")
    done = run_logged(cmd, f"tpengine TP {tp}", args.timeout)
    return json.loads(done.stdout) if done else None


def time_generate(model, args, batch, device, repeat):
    """{ttft_ms, tpot_ms, decode_tokens_per_s} of transformers' generate on random prompts."""
    import torch

    torch.manual_seed(batch)  # the same prompts on every rank
    ids = torch.randint(0, model.config.vocab_size, (batch, args.prompt_len), device=device)
    mask = torch.ones_like(ids)
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)

    def timed(n, times):
        runs = []
        for _ in range(times):
            sync()
            start = time.perf_counter()
            with torch.no_grad():
                out = model.generate(ids, attention_mask=mask, do_sample=args.do_sample,
                                     top_k=50, temperature=1.0, top_p=1.0, max_new_tokens=n,
                                     min_new_tokens=n, eos_token_id=None, pad_token_id=0)
            sync()
            runs.append(time.perf_counter() - start)
            assert out.shape[1] == args.prompt_len + n
        return sorted(runs)[len(runs) // 2]

    timed(min(args.new_tokens, 16), 1)  # warm-up: the first generate calls are much slower
    ttft = timed(1, repeat)
    total = timed(args.new_tokens, repeat)
    tpot = (total - ttft) / (args.new_tokens - 1)
    return {"batch": batch, "ttft_ms": ttft * 1e3, "tpot_ms": tpot * 1e3,
            "decode_tokens_per_s": batch / tpot}


def run_single(args, model_dir, save):
    """transformers on one device, eager then sdpa attention, as --peers asks: {impl: results};
    saves the model into model_dir when asked."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(model_dir)
    log("transformers eager: building the model")
    with torch.device(args.device):  # initialise on the device: a 7B model on the CPU takes minutes
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype),
                                                 attn_implementation="eager")
    model.eval()
    results = {}
    for impl in ("eager", "sdpa"):
        if impl not in args.peers:
            continue
        model.set_attn_implementation(impl)
        results[impl] = []
        for batch in args.batch:
            log(f"transformers {impl}: batch {batch}")
            results[impl].append(time_generate(model, args, batch, args.device, args.peer_repeat))
    if save:
        log(f"saving the checkpoint into {model_dir}")
        model.save_pretrained(model_dir)
    del model
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return results


def run_hf_tp(args, model_dir, tp):
    """transformers' own tensor parallelism: this script again, under torchrun."""
    out = os.path.join(model_dir, f"hf_tp{tp}.json")
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = ["torchrun", "--nproc-per-node", str(tp), "--master-port", str(port), __file__,
           "--hf-tp-worker", model_dir, "--hf-tp-out", out, "--dtype", args.dtype,
           "--batch", *map(str, args.batch), "--prompt-len", str(args.prompt_len),
           "--new-tokens", str(args.new_tokens), "--peer-repeat", str(args.peer_repeat),
           "--shape", args.shape, "--tpengine", args.tpengine, "--device", args.device]
    if args.do_sample:
        cmd.append("--do-sample")
    if not run_logged(cmd, f"transformers TP {tp}", args.timeout):
        return None
    with open(out) as f:
        return json.load(f)


def hf_tp_worker(args):
    import torch
    from transformers import AutoModelForCausalLM

    local = int(os.environ["LOCAL_RANK"])
    device = "cpu"
    if args.device.startswith("cuda"):
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.hf_tp_worker, dtype=getattr(torch, args.dtype),
                                                 tp_plan="auto", attn_implementation="eager")
    model.eval()
    load_s = time.perf_counter() - start
    results = [time_generate(model, args, batch, device, args.peer_repeat)
               for batch in args.batch]
    if int(os.environ["RANK"]) == 0:
        with open(args.hf_tp_out, "w") as f:
            json.dump({"load_s": load_s, "runs": results}, f)
    torch.distributed.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), required=True)
    parser.add_argument("--tpengine", required=True)
    parser.add_argument("--tp", type=int, nargs="+", default=[1])
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3, help="tpengine's timed runs")
    parser.add_argument("--peer-repeat", type=int, default=1, help="transformers' timed runs")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--peers", nargs="*", default=["eager", "tp"],
                        choices=["eager", "sdpa", "tp", "llamacpp"])
    parser.add_argument("--llama-cpp", help="llama.cpp source folder, or the archive "
                        "`tools/llama_cpp_peer.py pack` writes (--peers llamacpp)")
    parser.add_argument("--llama-bench", help="a llama-bench built before (from the same "
                        "source, with CUDA): used instead of building one from --llama-cpp")
    parser.add_argument("--profile", action="store_true",
                        help="tpengine's prompt pass and a decode step, op by op")
    parser.add_argument("--no-graph-too", action="store_true",
                        help="also run tpengine with every decode step op by op (no CUDA graph)")
    parser.add_argument("--plain-too", action="store_true",
                        help="also run tpengine with kernel_inject = false (the plain kernels)")
    parser.add_argument("--peer-all-reduce-too", action="store_true",
                        help="at TP > 1, tpengine again with --all-reduce auto")
    parser.add_argument("--do-sample", action="store_true",
                        help="sampled decoding with transformers' defaults (top-k 50), all engines")
    parser.add_argument("--workdir", help="where config.json and the checkpoint go (default: a "
                        "temporary directory, removed afterwards)")
    parser.add_argument("--json-out", help="also write every figure here, as it is measured")
    parser.add_argument("--timeout", type=float, default=600,
                        help="seconds one engine's run may take before it is left out")
    parser.add_argument("--hf-tp-worker", help=argparse.SUPPRESS)
    parser.add_argument("--hf-tp-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hf_tp_worker:
        return hf_tp_worker(args)

    model_dir = args.workdir or tempfile.mkdtemp(prefix="tpe_bench_")
    os.makedirs(model_dir, exist_ok=True)
    try:
        with open(os.path.join(model_dir, "config.json"), "w") as f:
            json.dump(SHAPES[args.shape], f)
        hf_tp_sizes = [tp for tp in args.tp if tp > 1] if "tp" in args.peers else []
        save = bool(hf_tp_sizes)
        ours, no_graph, plain, peer, single, hf_tp, llama = {}, {}, {}, {}, {}, {}, {}

        def record():
            if args.json_out:
                with open(args.json_out, "w") as f:
                    json.dump({"shape": args.shape, "tpengine": ours,
                               "tpengine_no_cuda_graph": no_graph, "tpengine_plain": plain,
                               "tpengine_all_reduce_auto": peer,
                               "transformers": single, "hf_tp": hf_tp, "llama_cpp": llama},
                              f, indent=1)

        # tpengine first: its figures matter most when a run is cut short.
        for tp in args.tp:
            ours[tp] = run_tpengine(args, model_dir, tp, checkpoint=False)
            record()
            if args.no_graph_too:
                no_graph[tp] = run_tpengine(args, model_dir, tp, checkpoint=False, graph=False)
                record()
            if args.plain_too:
                plain[tp] = run_tpengine(args, model_dir, tp, checkpoint=False, fused=False)
                record()
            if args.peer_all_reduce_too and tp > 1:
                peer[tp] = run_tpengine(args, model_dir, tp, checkpoint=False, all_reduce="auto")
                record()
        if "eager" in args.peers or "sdpa" in args.peers or save:
            single = run_single(args, model_dir, save)
            record()
        for tp in hf_tp_sizes:
            hf_tp[tp] = run_hf_tp(args, model_dir, tp)
            record()
        if "llamacpp" in args.peers:
            llama.update(run_llama_cpp(args, model_dir) or {})
            record()
        if save:  # the load from a real checkpoint
            loads = {tp: run_tpengine(args, model_dir, tp, checkpoint=True, load_only=True)
                     for tp in args.tp}
            for tp, r in loads.items():
                if r and ours[tp]:
                    ours[tp]["checkpoint_load_s"] = r["load_s"]
                    ours[tp]["checkpoint_load_gbs"] = r["load_gbs"]
            record()
    finally:
        if not args.workdir:
            shutil.rmtree(model_dir, ignore_errors=True)
    print_tables(args, ours, no_graph, plain, peer, single, hf_tp, llama)


def run_llama_cpp(args, model_dir):
    """llama-bench's figures (tools/llama_cpp_peer.py) at batch 1, or None (logged)."""
    import llama_cpp_peer

    if not args.llama_cpp:
        log("--peers llamacpp needs --llama-cpp (a llama.cpp source folder or archive)")
        return None
    if args.batch != [1]:
        log("llama.cpp: llama-bench is measured at batch 1 only")
    try:
        src = llama_cpp_peer.source_tree(args.llama_cpp, model_dir)
        if args.llama_bench:
            if not os.access(args.llama_bench, os.X_OK):
                log(f"llama.cpp: --llama-bench {args.llama_bench}: not an executable file")
                return None
            binary = args.llama_bench
        else:
            binary = llama_cpp_peer.build_llama_bench(
                src, os.path.join(model_dir, "llama-build"), args.device.startswith("cuda"),
                args.timeout)
        gguf_path = os.path.join(model_dir, "model-f16.gguf")
        llama_cpp_peer.write_gguf(src, SHAPES[args.shape], gguf_path)
    except (OSError, subprocess.SubprocessError, ImportError) as e:
        detail = getattr(e, "stderr", None) or b""
        log(f"llama.cpp: {e}\n{detail[-3000:].decode(errors='replace')}")
        return None
    return llama_cpp_peer.run_llama_bench(
        binary, gguf_path, args.prompt_len, args.new_tokens, args.repeat,
        lambda cmd, what: run_logged(cmd, what, args.timeout))


def print_tables(args, ours, no_graph, plain, peer, single, hf_tp, llama):
    try:  # only the transformers peers need them
        import torch
        import transformers
        versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
        gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else ""
    except ImportError:
        versions, gpu = "no torch", ""
    decoding = "sampled (top-k 50)" if args.do_sample else "greedy"
    print(f"### {args.shape}, {args.dtype}, prompt {args.prompt_len}, {args.new_tokens} new "
          f"tokens {decoding}, {args.device} {gpu}")
    print()
    print(f"{datetime.date.today()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores; tpengine commit {commit()}; {versions}. tpengine: random "
          f"weights, {args.repeat} "
          f"timed runs after 1 warm-up; transformers: {args.peer_repeat} timed run(s) after a "
          f"warm-up.")
    print()
    print("| engine | TP | batch | TTFT ms | TPOT mean ms | TPOT p90 ms | decode tok/s | "
          "achieved bandwidth | weights/GPU GB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for i, batch in enumerate(args.batch):
        for tp in args.tp:
            r = ours.get(tp)
            if not r:
                print(f"| tpengine | {tp} | {batch} | failed (see the log) | | | | | |")
            else:
                run = r["runs"][i]
                gb = max(r["weight_bytes_per_rank"]) / 1e9
                roofline_ms = gb / r["memory_bandwidth_gbs"] * 1e3
                print(f"| roofline (weights / {r['memory_bandwidth_gbs']:.0f} GB/s copy) | {tp} | "
                      f"{batch} | | {roofline_ms:.2f} | | {batch / roofline_ms * 1e3:.1f} | | "
                      f"{gb:.2f} |")
                variants = [("tpengine", r)]
                if no_graph.get(tp):
                    variants.append(("tpengine, no CUDA graph", no_graph[tp]))
                if plain.get(tp):
                    variants.append(("tpengine, kernel_inject = false", plain[tp]))
                if peer.get(tp):
                    variants.append(("tpengine, all_reduce = auto", peer[tp]))
                for name, v in variants:
                    run = v["runs"][i]
                    print(f"| {name} | {tp} | {batch} | {run['ttft_ms']:.1f} | "
                          f"{run['tpot_ms']['mean']:.2f} | {run['tpot_ms']['p90']:.2f} | "
                          f"{run['decode_tokens_per_s']:.1f} | "
                          f"{run['achieved_bandwidth_gbs']:.0f} GB/s = "
                          f"{100 * run['achieved_bandwidth_fraction']:.0f} % | {gb:.2f} |")
            if tp == 1 and batch == 1 and llama:
                print(f"| llama.cpp llama-bench -fa 1, F16 GGUF ({llama['backends']}) | 1 | 1 | "
                      f"{llama['ttft_ms']:.1f} | {llama['tpot_ms']:.2f} | | "
                      f"{llama['tg_tokens_per_s']:.1f} | | |")
            for impl, runs in single.items() if tp == 1 else []:
                h = runs[i]
                print(f"| transformers {impl} | 1 | {batch} | {h['ttft_ms']:.1f} | "
                      f"{h['tpot_ms']:.2f} | | {h['decode_tokens_per_s']:.1f} | | |")
            if tp > 1 and tp in hf_tp:
                h = hf_tp[tp]["runs"][i] if hf_tp[tp] else None
                if h:
                    print(f"| transformers tp_plan=auto | {tp} | {batch} | {h['ttft_ms']:.1f} | "
                          f"{h['tpot_ms']:.2f} | | {h['decode_tokens_per_s']:.1f} | | |")
                else:
                    print(f"| transformers tp_plan=auto | {tp} | {batch} | failed (see the log) "
                          "| | | | | |")
    print()
    print("tpengine load (random weights made on the host, and the checkpoint transformers "
          "saved, read from the page cache) and device memory of rank 0, GiB:")
    print()
    print("| TP | load s (GB/s), random | load s (GB/s), checkpoint | batch | weights | KV cache "
          "| workspace | arena planned | device in use |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for tp in args.tp:
        r = ours.get(tp)
        if not r:
            continue
        ckpt = (f"{r['checkpoint_load_s']:.2f} ({r['checkpoint_load_gbs']:.1f})"
                if "checkpoint_load_s" in r else "")
        for run in r["runs"]:
            m = run["memory_bytes_per_rank"][0]
            gib = [m.get(k, 0) / 2**30
                   for k in ("weights", "kv_cache", "workspace", "planned_arena", "device_in_use")]
            print(f"| {tp} | {r['load_s']:.2f} ({r['load_gbs']:.1f}) | {ckpt} | {run['batch']} | "
                  + " | ".join(f"{g:.2f}" for g in gib) + " |")
    if plain:
        print()
        print("fused (tpengine's default on GPUs) / plain (kernel_inject = false), TPOT and TTFT:")
        print()
        print("| TP | batch | TPOT fused / plain | TTFT fused / plain |")
        print("| --- | --- | --- | --- |")
        for tp in args.tp:
            f, p = ours.get(tp), plain.get(tp)
            if not (f and p):
                continue
            for a, b in zip(f["runs"], p["runs"]):
                print(f"| {tp} | {a['batch']} | {a['tpot_ms']['mean'] / b['tpot_ms']['mean']:.3f} "
                      f"| {a['ttft_ms'] / b['ttft_ms']:.3f} |")
    if args.profile:
        for name, results in (("tpengine", ours), ("tpengine plain", plain)):
            for tp in args.tp:
                for run in (results.get(tp) or {}).get("runs", []):
                    for kind, what, whole in (
                            ("prompt", f"the prompt's first pass ({run['prompt_profile_tokens']} "
                                       "tokens)", f"TTFT {run['ttft_ms']:.2f} ms"),
                            ("decode", "one decode step",
                             f"TPOT {run['tpot_ms']['mean']:.3f} ms")):
                        total = run[f"{kind}_profile_total_ms"]
                        print()
                        print(f"{name} TP {tp}, batch {run['batch']}: {what} op by op (rank 0, "
                              f"ops queued ahead of the device): {total:.3f} ms of device work, "
                              f"{whole}")
                        print()
                        print("| op | calls | ms | share |")
                        print("| --- | --- | --- | --- |")
                        for op in run[f"{kind}_profile"][:12]:
                            print(f"| {op['op']} | {op['calls']} | {op['ms']:.3f} | "
                                  f"{100 * op['ms'] / total:.1f} % |")


def commit():
    try:
        # "-dirty" when the tree measured is not the commit (a copy of a working tree).
        return subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
