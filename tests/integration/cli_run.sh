#!/usr/bin/env bash
# The CLI's happy paths: generate from a TOML file with a flag overriding it (the output must be
# transformers' greedy continuation), plan, policies and inspect.
# usage: cli_run.sh TPENGINE FIXTURES_DIR TOY_PLUGIN_DIR CASE
set -euo pipefail
tpengine=$1 fixtures=$2 toys=$3 case=$4
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
expected() {  # the reference greedy tokens of prompt $2 of fixture $1, space-separated
  python3 -c "import json,sys; r=json.load(open('$fixtures/$1/reference.json')); print(' '.join(map(str, r['greedy'][$2])))"
}
prompt() {
  python3 -c "import json,sys; r=json.load(open('$fixtures/$1/reference.json')); print(','.join(map(str, r['prompts'][$2])))"
}
check() {  # check NAME ACTUAL EXPECTED
  if [ "$2" != "$3" ]; then printf 'FAIL %s\n  got:      %s\n  expected: %s\n' "$1" "$2" "$3"; exit 1; fi
}
# Toy plugins that crash must die by their signals in a sanitizer build too.
export ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}handle_segv=0:handle_abort=0"
case $case in
  generate_toml)
    cat >"$work/run.toml" <<TOML
[model]
path = "$fixtures/neox_sequential"
[parallel]
tp_size = 2
[generation]
max_new_tokens = 16
ignore_eos = true
[policy.injection_policy]
GPTNeoXLayer = ["attention.dense", "mlp.dense_4h_to_h"]
TOML
    out=$("$tpengine" generate --config "$work/run.toml" --tp 3 --quiet \
          --prompt-ids "$(prompt neox_sequential 0)" --prompt-ids "$(prompt neox_sequential 1)")
    check "batch of two at TP 3" "$out" "$(expected neox_sequential 0; expected neox_sequential 1)";;
  plan)
    out=$("$tpengine" plan --model "$fixtures/llama_6h2kv" --tp 4)
    echo "$out"
    grep -Eq "model.layers.0.self_attn.q_proj +column +\[32, 96\] \[32, 96\] \[16, 96\] \[16, 96\]" <<<"$out"
    grep -Eq "model.layers.0.self_attn.k_proj +column +\[16, 96\] \[32, 96\] \[16, 96\] \[16, 96\]" <<<"$out"
    grep -Eq "model.layers.1.mlp.down_proj +row +\[96, 64\] \[96, 32\] \[96, 32\] \[96, 32\]" <<<"$out"
    grep -Eq "LlamaDecoderLayer model.layers.1 +2 all-reduce" <<<"$out"
    grep -Eq "rank 1: weights .*, KV cache 1.00 MiB \(512 B per token\), activation arena [0-9.]+ (KiB|MiB)" <<<"$out"
    # Planning for GPUs needs no GPU (nor a CUDA build): bf16 halves every figure.
    out=$("$tpengine" plan --model "$fixtures/llama_6h2kv" --tp 4 --device cuda --dtype bfloat16)
    grep -Eq "rank 1: weights .*, KV cache 512.0 KiB \(256 B per token\)" <<<"$out";;
  plan_arena)
    # The activation arena `plan` predicts per rank, before any weight is read, against the
    # workspace a CPU run measured (the backend's peak beside weights and KV cache), within 10%,
    # with a prompt longer than one pass.
    flags=(--model "$fixtures/neox_parallel" --tp 2 --prefill-chunk 8 --max-batch 3)
    "$tpengine" plan "${flags[@]}" >"$work/plan.txt"
    "$tpengine" bench "${flags[@]}" --random-weights --batch 3 --prompt-len 20 --new-tokens 4 \
      --repeat 1 --json >"$work/bench.json"
    python3 - "$work/plan.txt" "$work/bench.json" <<'PY'
import json, re, sys
units = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
planned = [float(n) * units[u] for n, u in
           re.findall(r"rank \d+: .*activation arena ([0-9.]+) (B|KiB|MiB|GiB)", open(sys.argv[1]).read())]
memory = json.load(open(sys.argv[2]))["runs"][0]["memory_bytes_per_rank"]
assert len(planned) == 2 == len(memory), (planned, memory)
for p, m in zip(planned, memory):
    assert abs(m["workspace"] - p) <= 0.1 * p, (planned, memory)
    assert m["planned_arena"] > 0 and abs(m["planned_arena"] - p) <= 0.01 * p, (planned, memory)
print("planned", planned, "measured", [m["workspace"] for m in memory])
PY
    ;;
  policies)
    out=$("$tpengine" policies --model "$fixtures/qwen2_bias")
    echo "$out"
    grep -Eq "^  llama .* ABI 1\.[0-9]+ .*model_types \[llama, mistral, qwen2\]" <<<"$out"
    grep -Eq "^  gpt_neox .* model_types \[gpt_neox\]" <<<"$out"
    grep -Eq "^  bloom .* model_types \[bloom\]" <<<"$out"
    grep -Eq "^  falcon .* model_types \[falcon\]" <<<"$out"
    grep -Eq "^  gpt2 .* model_types \[gpt2, gpt_bigcode\]" <<<"$out"
    grep -Eq "^  opt .* model_types \[opt\]" <<<"$out"
    grep -Eq "model_type 'qwen2'\): llama from .*libtpengine_policy_llama.so: serves model_type 'qwen2'" <<<"$out";;
  base_model_checkpoint)
    # GPT-2, BLOOM and OPT as the hub has them: saved from the base model, so every tensor's name
    # lacks the LM's prefix (h.0.attn.c_attn.weight, word_embeddings.weight, decoder.layers.0...).
    for fixture in gpt2 bloom opt; do
      cp -r "$fixtures/$fixture" "$work/$fixture"
      python3 - "$work/$fixture/model.safetensors" <<'PY'
import json, struct, sys
path = sys.argv[1]
raw = open(path, "rb").read()
n = struct.unpack("<Q", raw[:8])[0]
header = json.loads(raw[8:8 + n])
renamed = {(k.split(".", 1)[1] if k != "__metadata__" and not k.startswith("lm_head.") else k): v
           for k, v in header.items()}
assert len(renamed) == len(header) and not any(k.startswith(("transformer.", "model.")) for k in renamed)
blob = json.dumps(renamed).encode()
open(path, "wb").write(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])
PY
      out=$("$tpengine" generate --model "$work/$fixture" --tp 2 --quiet --ignore-eos -n 16 \
            --prompt-ids "$(prompt $fixture 0)")
      check "$fixture saved from the base model" "$out" "$(expected $fixture 0)"
    done;;
  plugin_fallback)
    # A user plugin claiming llama crashes in its build (in a child process): the built-in llama
    # policy stands in, the output is transformers', and the crash is one warning naming it.
    out=$("$tpengine" generate --model "$fixtures/llama_mha" --policy-path "$toys/segv_build" \
          --prompt-ids "$(prompt llama_mha 0)" -n 16 --ignore-eos 2>"$work/err")
    cat "$work/err"
    check "tokens" "$out" "$(expected llama_mha 0)"
    check "one warning" "$(grep -c "warning" "$work/err")" 1
    grep -Eq "policy 'toy' \(.*segv_build/libtoy.so\) building .* crashed while building its graph: SIGSEGV \(Segmentation fault\); using policy 'llama' \(.*libtpengine_policy_llama.so\) instead" "$work/err";;
  policies_broken)
    # Plugins that crash as they load are listed as broken, each with its one line; the rest are
    # listed as usual.
    out=$("$tpengine" policies --policy-path "$toys/abort_ctor" --policy-path "$toys/data_entry")
    echo "$out"
    grep -Eq "^broken \(not used\):$" <<<"$out"
    grep -Eq "^    plugin .*abort_ctor/libtoy.so crashed while loading: SIGABRT \(Aborted\)$" <<<"$out"
    grep -Eq "^    plugin .*data_entry/libtoy.so crashed while loading: SIGSEGV" <<<"$out"
    grep -Eq "^  llama .* model_types \[llama, mistral, qwen2\]" <<<"$out";;
  policies_contested)
    # A user folder's plugin claiming llama wins over the built-in one, and the listing says so.
    out=$("$tpengine" policies --policy-path "$toys/failing_build" --model "$fixtures/llama_mha")
    echo "$out"
    grep -Eq "^model_type 'llama': toy \(.*failing_build/libtoy.so, config policy.search_paths\) wins over llama \(.*libtpengine_policy_llama.so, built-in\)" <<<"$out"
    grep -Eq "\(model_type 'llama'\): toy from .*failing_build/libtoy.so" <<<"$out";;
  bench_sampled)
    # Sampled decoding: the settings are the run's (echoed, and in the header line), and a step
    # with every row through the host sampler is timed like a greedy one.
    out=$("$tpengine" bench --model "$fixtures/llama_mha" --random-weights --batch 3 \
          --prompt-len 8 --new-tokens 6 --repeat 1 --do-sample true --temperature 0.7 --top-k 40 \
          --top-p 0.9 --json)
    python3 - "$out" <<'PY'
import json, sys
r = json.loads(sys.argv[1])
assert r["sampling"] == {"do_sample": True, "temperature": 0.7, "top_k": 40, "top_p": 0.9}, r
assert r["runs"][0]["decode_tokens_per_s"] > 0 and r["runs"][0]["tpot_ms"]["mean"] > 0, r
PY
    out=$("$tpengine" bench --model "$fixtures/llama_mha" --random-weights --prompt-len 4 \
          --new-tokens 3 --repeat 1 --do-sample true --top-p 0.5 --quiet)
    grep -q "3 new tokens sampled (temperature 1, top-k 50, top-p 0.5)" <<<"$out"
    out=$("$tpengine" bench --model "$fixtures/llama_mha" --random-weights --prompt-len 4 \
          --new-tokens 3 --repeat 1 --quiet)
    grep -q "3 new tokens greedy" <<<"$out";;
  bench_json)
    out=$("$tpengine" bench --model "$fixtures/neox_parallel" --random-weights --tp 2 --batch 2,3 \
          --prompt-len 16 --new-tokens 8 --repeat 2 --profile --json)
    echo "$out"
    python3 - "$out" "$fixtures/neox_parallel/model.safetensors" <<'PY'
import json, math, struct, sys
r = json.loads(sys.argv[1])
assert r["tp"] == 2 and r["random_weights"] is True and r["dtype"] == "float32", r
for key in ("memory_bandwidth_gbs", "load_gbs", "load_s"):
    assert r[key] > 0, key
weights = r["weight_bytes_per_rank"]
assert len(weights) == 2 and min(weights) > 0
# Counted from the checkpoint's header, not by the engine: the two ranks hold every tensor once
# (4 heads over 2 ranks: nothing replicated), plus a second copy of the layer norms, in fp32.
with open(sys.argv[2], "rb") as f:
    header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
header.pop("__metadata__", None)
total = sum(math.prod(t["shape"]) for t in header.values())
norms = sum(math.prod(t["shape"]) for name, t in header.items()
            if "layernorm" in name or "layer_norm" in name)
assert sum(weights) == 4 * (total + norms), (weights, total, norms)
assert [run["batch"] for run in r["runs"]] == [2, 3]
for run in r["runs"]:
    for key in ("ttft_ms", "decode_tokens_per_s", "prefill_tokens_per_s", "achieved_bandwidth_gbs"):
        assert run[key] > 0, key
    t = run["tpot_ms"]
    assert 0 < t["p50"] <= t["p90"], t
    # The KV cache is batch x (prompt + new) tokens x 2 (k, v) x hidden 64 / 2 ranks x 2 layers x 4 B.
    memory = run["memory_bytes_per_rank"]
    assert [m["weights"] for m in memory] == weights, memory
    assert all(m["kv_cache"] == run["batch"] * 24 * 2 * 32 * 2 * 4 for m in memory), memory
    assert all(m["workspace"] > 0 for m in memory), memory
    # Every step of the prompt's pass (all its tokens: 16 fit one pass) and of a decode step (a
    # token per sequence) is timed: 2 layers' ops and all-reduces, summed by label.
    for kind, tokens in (("prompt", run["batch"] * 16), ("decode", run["batch"])):
        assert run[f"{kind}_profile_tokens"] == tokens, (kind, run)
        ops = {p["op"]: p for p in run[f"{kind}_profile"]}
        assert ops["all_reduce"]["calls"] == 2 + 1, ops  # a layer's (parallel residual) + embedding
        assert ops["attention"]["calls"] == 2, ops
        total = sum(p["ms"] for p in run[f"{kind}_profile"])
        assert abs(total - run[f"{kind}_profile_total_ms"]) < 1e-6
PY
    ;;
  generate_text)
    # Text in, text out, one prompt streamed and two batched: transformers' decoded greedy text.
    m="$fixtures/llama_text"
    "$tpengine" generate --model "$m" --tp 2 --quiet -n 16 --ignore-eos \
      --prompt "Call me Ishmael. Some years ago" >"$work/one.txt"
    "$tpengine" generate --model "$m" --tp 3 --quiet -n 16 --ignore-eos \
      --prompt "Call me Ishmael. Some years ago" --prompt "The quick brown fox" >"$work/two.txt"
    python3 - "$m/reference.json" "$work/one.txt" "$work/two.txt" <<'PY'
import json, sys
ref = json.load(open(sys.argv[1]))
one = open(sys.argv[2], encoding="utf-8").read()
two = open(sys.argv[3], encoding="utf-8").read()
texts = ref["greedy_texts"]
assert one == texts[0] + "\n", (one, texts[0])
assert two == "".join(f"[{i}] {t}\n" for i, t in enumerate(texts)), (two, texts)
PY
    ;;
  generate_json)
    # One JSON object a line per sequence: transformers' greedy ids and text; a stop id ends one.
    m="$fixtures/llama_text"
    "$tpengine" generate --model "$m" --tp 2 --quiet -n 16 --ignore-eos --json \
      --prompt "Call me Ishmael. Some years ago" --prompt "The quick brown fox" >"$work/all.jsonl"
    stop=$(python3 -c "import json; print(json.load(open('$m/reference.json'))['greedy'][0][2])")
    "$tpengine" generate --model "$m" --quiet -n 16 --json --stop-ids "$stop" \
      --prompt "Call me Ishmael. Some years ago" >"$work/stop.jsonl"
    python3 - "$m/reference.json" "$work/all.jsonl" "$work/stop.jsonl" <<'PY'
import json, sys
ref = json.load(open(sys.argv[1]))
rows = [json.loads(line) for line in open(sys.argv[2], encoding="utf-8")]
assert [r["index"] for r in rows] == [0, 1], rows
for r, ids, text, prompt in zip(rows, ref["greedy"], ref["greedy_texts"], ref["prompts"]):
    assert r["ids"] == ids and r["text"] == text, (r, ids, text)
    assert r["finish_reason"] == "length" and r["completion_tokens"] == 16, r
    assert r["prompt_tokens"] == len(prompt) and r["batch_seconds"] > 0, r
(stop,) = [json.loads(line) for line in open(sys.argv[3], encoding="utf-8")]
assert stop["ids"] == ref["greedy"][0][:3] and stop["finish_reason"] == "stop", stop
assert stop["completion_tokens"] == 3, stop
PY
    # --logprobs K: per token its log-probability, text and K alternatives (greedy: itself first).
    "$tpengine" generate --model "$m" --quiet -n 4 --json --logprobs 2 \
      --prompt "Call me Ishmael. Some years ago" >"$work/lp.jsonl"
    python3 - "$work/lp.jsonl" <<'PY'
import json, sys
(row,) = [json.loads(line) for line in open(sys.argv[1], encoding="utf-8")]
steps = row["logprobs"]
assert [s["id"] for s in steps] == row["ids"], row
for s in steps:
    assert len(s["top"]) == 2 and s["top"][0]["id"] == s["id"], s
    assert s["logprob"] <= 0 and s["top"][0]["logprob"] >= s["top"][1]["logprob"], s
    assert isinstance(s["token"], str), s
PY
    if "$tpengine" generate --model "$m" --quiet -n 2 --logprobs 2 --prompt-ids 1,2 2>"$work/err.txt"; then
      exit 1
    fi
    grep -q "^tpengine: error: --logprobs prints with --json: add --json$" "$work/err.txt"
    ;;
  tokenize)
    ids=$("$tpengine" tokenize --model "$fixtures/llama_text" "Call me Ishmael. Some years ago")
    expected=$(python3 -c "import json; print(' '.join(map(str, json.load(open('$fixtures/llama_text/reference.json'))['prompts'][0])))")
    check "tokenize" "$ids" "$expected"
    text=$("$tpengine" detokenize --model "$fixtures/llama_text" $ids)
    check "detokenize" "$text" "Call me Ishmael. Some years ago";;
  inspect)
    out=$("$tpengine" inspect "$fixtures/llama_sharded")
    echo "$out"
    grep -Eq "^model.layers.1.mlp.down_proj.weight +F32 +\[64, 96\] +24576  model-0000[1-4]-of-00004.safetensors" <<<"$out"
    grep -Eq "^2[0-9] tensors" <<<"$out"
    # --check reads every value: a clean checkpoint (sharded, and a quantized GGUF) passes.
    "$tpengine" inspect --check "$fixtures/llama_sharded" | grep -Eq "^checked 2[0-9] tensors: every value finite$"
    "$tpengine" inspect --check "$fixtures/llama_gqa/model-f32.gguf" | grep -Eq "^checked [0-9]+ tensors: every value finite$";;
  inspect_gguf)
    out=$("$tpengine" inspect "$fixtures/gguf/blocks.gguf")
    echo "$out"
    grep -Eq "^GGUF version 3, 16 metadata keys, 22 tensors$" <<<"$out"
    grep -Eq "^test.strings +ARRAY +\['a', '', '▁b'\] \(3 STRING\)$" <<<"$out"
    grep -Eq "^Q4_K +Q4_K +\[3, 512\] +864$" <<<"$out"
    cp "$fixtures/llama_mha/config.json" "$work/config.gguf"
    if "$tpengine" inspect "$work/config.gguf" 2>"$work/err.txt"; then exit 1; fi
    cat "$work/err.txt"
    grep -q "config.gguf: not a GGUF file: it does not start with the magic 'GGUF'" "$work/err.txt";;
  bundle)
    # tools/bundle.sh on this build, unpacked elsewhere: the libraries the loader finds outside
    # the base system and CUDA all come from the folder, its plugins too (and only those), and
    # it gives transformers' greedy tokens.
    build=$(cd "$(dirname "$tpengine")/.." && pwd)
    "$(dirname "$0")/../../tools/bundle.sh" --build "$build" "$work/made/tpe"
    mkdir "$work/elsewhere"
    tar -xJf "$work/made/tpe.tar.xz" -C "$work/elsewhere"
    rm -rf "$work/made"
    moved=$work/elsewhere/tpe
    base='/(ld-linux[^/]*|lib(c|m|dl|pthread|rt|gcc_s|stdc\+\+|cudart|cublasLt|nccl))\.so[^/]*$'
    outside=$(ldd "$moved/bin/tpengine" | awk '$2 == "=>" {print $3}' | grep -vE "^$moved/" |
              grep -vE "$base" || true)
    check "libraries from outside the bundle" "$outside" ""
    out=$("$moved/bin/tpengine" policies)
    echo "$out"
    check "plugin folders" "$(sed -n '/^search path/,/^policies:/p' <<<"$out" | grep -c "^  ")" 1
    grep -q "^  $moved/lib/tpengine/policies (built-in)$" <<<"$out"
    out=$("$moved/bin/tpengine" generate --model "$fixtures/llama_gqa" --tp 2 --quiet -n 16 \
          --ignore-eos --prompt-ids "$(prompt llama_gqa 0)")
    check "the bundle's greedy tokens" "$out" "$(expected llama_gqa 0)";;
  interrupt)
    # SIGINT, then SIGTERM, in the middle of a long batch: each sequence's ids so far are
    # printed, one line each, with the conventional status (128 + signal) and one line saying so.
    for signal in INT TERM; do
      "$tpengine" generate --model "$fixtures/llama_mha" --prompt-ids 1,2,3 --prompt-ids 4,5 \
        -n 100000 --ignore-eos --allow-long-context --quiet >"$work/out" 2>"$work/err" &
      pid=$!
      sleep 3
      kill -"$signal" "$pid"
      status=0
      wait "$pid" || status=$?
      cat "$work/err"
      check "status after SIG$signal" "$status" "$([ "$signal" = INT ] && echo 130 || echo 143)"
      check "lines" "$(wc -l <"$work/out")" 2
      grep -Eq "^[0-9]+( [0-9]+){9,}$" "$work/out"  # at least ten tokens each
      grep -q "interrupted (SIG$signal): printed what was generated" "$work/err"
    done;;
  *) echo "unknown case $case" >&2; exit 2;;
esac
echo PASS
