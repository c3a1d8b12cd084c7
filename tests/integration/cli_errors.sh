#!/usr/bin/env bash
# Bad input through the CLI: each case must end with a non-zero exit (not a crash: no signal),
# exactly one line on stderr, and that line must name what is wrong.
# usage: cli_errors.sh TPENGINE FIXTURES_DIR TOY_PLUGIN_DIR CASE
set -u
tpengine=$1 fixtures=$2 toys=$3 case=$4
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
model=$work/model
cp -r "$fixtures/llama_mha" "$model"
st=$model/model.safetensors

# Rewrites model.safetensors' header with a python expression over `h` (the header dict) and
# `data` (the data section), using the standard library only.
edit_header() {
  python3 - "$st" "$1" <<'PY'
import json, struct, sys
path, code = sys.argv[1], sys.argv[2]
raw = open(path, "rb").read()
n = struct.unpack("<Q", raw[:8])[0]
h = json.loads(raw[8:8 + n])
data = raw[8 + n:]
header_len = None
exec(code)
blob = json.dumps(h).encode()
open(path, "wb").write(struct.pack("<Q", header_len if header_len else len(blob)) + blob + data)
PY
}

run=(generate --model "$model" --prompt-ids 1,2,3 -n 2 --quiet)
expect=""
memory_kb=8000000
stdout="$work/out"
case $case in
  truncated)
    truncate -s $(( $(stat -c %s "$st") / 2 )) "$st"
    expect="model.safetensors.*(past|beyond|end|truncated)";;
  overlapping_offsets)
    edit_header 'k = sorted(x for x in h if x != "__metadata__"); a, b = h[k[0]], h[k[1]]; b["data_offsets"] = [a["data_offsets"][0], a["data_offsets"][0] + b["data_offsets"][1] - b["data_offsets"][0]]'
    expect="model.safetensors.*overlap";;
  bytes_after_tensors)
    # The reference loader refuses data no tensor accounts for; so do we.
    printf 'trailing' >>"$st"
    expect="model.safetensors: bytes \\[[0-9]+, [0-9]+\\) of the data section follow the last tensor's data";;
  offsets_past_end)
    edit_header 'k = sorted(x for x in h if x != "__metadata__")[0]; e = h[k]["data_offsets"]; h[k]["data_offsets"] = [len(data), len(data) + e[1] - e[0]]'
    expect="model.safetensors: tensor '[^']*': data_offsets .* past the data section";;
  header_length_too_large)
    edit_header 'header_len = 10**9'
    expect="model.safetensors.*header length";;
  missing_tensor)
    # The tensor and its bytes go (later tensors move up), so the file itself stays well formed.
    edit_header 'k = "model.layers.1.mlp.up_proj.weight"; b, e = h[k]["data_offsets"]; del h[k]; data = data[:b] + data[e:]; [t.__setitem__("data_offsets", [o - (e - b) for o in t["data_offsets"]]) for n, t in h.items() if n != "__metadata__" and t["data_offsets"][0] >= e]'
    expect="policy 'llama' .* reads tensor 'model.layers.1.mlp.up_proj.weight', which checkpoint .* does not have";;
  wrong_shape)
    edit_header 's = h["model.layers.0.mlp.down_proj.weight"]["shape"]; h["model.layers.0.mlp.down_proj.weight"]["shape"] = s[::-1]'
    expect="model.layers.0.mlp.down_proj.weight.*shape";;
  config_missing_field)
    python3 -c "import json,sys; p='$model/config.json'; c=json.load(open(p)); del c['num_attention_heads']; json.dump(c, open(p,'w'))"
    expect="policy 'llama'.*config.json.*num_attention_heads";;
  config_zero_heads)
    # Checked on read, before the policy divides by it (it was a SIGFPE).
    python3 -c "import json,sys; p='$model/config.json'; c=json.load(open(p)); c['num_attention_heads']=0; json.dump(c, open(p,'w'))"
    expect="policy 'llama'.*config.json: key 'num_attention_heads' must be in \[1, 16777216\], got 0";;
  config_unknown_activation)
    # quick_gelu (x * sigmoid(1.702 x)) is no tanh GELU: refused by name, with the ones taken.
    python3 -c "import json,sys; p='$model/config.json'; c=json.load(open(p)); c['hidden_act']='quick_gelu'; json.dump(c, open(p,'w'))"
    expect="policy 'llama'.*config.json: hidden_act 'quick_gelu' is not supported \\(silu, gelu, gelu_new, gelu_pytorch_tanh, gelu_fast, relu\\)";;
  config_huge_layers)
    python3 -c "import json,sys; p='$model/config.json'; c=json.load(open(p)); c['num_hidden_layers']=10**9; json.dump(c, open(p,'w'))"
    expect="policy 'llama'.*config.json: key 'num_hidden_layers' must be in \[1, 4096\], got 1000000000";;
  unknown_model_type)
    python3 -c "import json,sys; p='$model/config.json'; c=json.load(open(p)); c['model_type']='martian'; c['architectures']=['MartianForCausalLM']; json.dump(c, open(p,'w'))"
    expect="config.json.*'martian'.*policies found: .*llama.*gpt_neox|config.json.*'martian'.*policies found: .*gpt_neox.*llama";;
  fused_pass_unknown)
    run+=(--kernel-inject true --fused-passes merge_linears,fuse_everything)
    expect="inference.fused_passes: no pass named 'fuse_everything' \\(the passes: merge_linears, linear_activation, gated_activation, add_norm, rotary_attention, all_reduce_norm\\)";;
  fused_passes_without_fused_path)
    printf '[model]\npath = "model"\n[inference]\nfused_passes = ["add_norm"]\n' > "$work/run.toml"
    run=(generate --config "$work/run.toml" --prompt-ids 1,2 -n 2 --quiet)
    expect="inference.fused_passes chooses passes of the fused path, which kernel_inject = \"auto\" \\(on the cpu\\) turns off";;
  bench_sampling_without_do_sample)
    run=(bench --model "$model" --random-weights --top-p 0.9 --quiet)
    expect="bench: --temperature, --top-k and --top-p apply with --do-sample true";;
  unknown_toml_key)
    printf '[model]\npath = "model"\n[parallel]\ntp = 2\n' > "$work/run.toml"
    run=(generate --config "$work/run.toml" --prompt-ids 1,2 -n 2 --quiet)
    expect="run.toml:4: unknown key 'parallel.tp'";;
  plugin_not_a_library)
    mkdir "$work/plugins" && echo "not a plugin" > "$work/plugins/libbroken.so"
    run+=(--policy-path "$work/plugins")
    expect="libbroken.so: not a shared library";;
  plugin_other_abi_major)
    run+=(--policy-path "$toys/next_major")
    expect="libtoy.so: built for policy ABI 2\.[0-9]+, this tpengine speaks 1\.[0-9]+; rebuild";;
  # Plugins whose code crashes or hangs: loaded and built in a child process, so each is one
  # line naming the plugin (--policy toy: no other plugin may stand in for it). Under the sanitizer build
  # the signals must reach the child as signals, not as sanitizer reports (plugin_* cases).
  plugin_segv_build)
    run+=(--policy-path "$toys/segv_build" --policy toy)
    expect="policy 'toy' \(.*segv_build/libtoy.so\) building .*config.json crashed while building its graph: SIGSEGV \(Segmentation fault\)";;
  plugin_short_split)
    run+=(--policy-path "$toys/short_split" --policy toy)
    expect="policy 'toy' \(.*short_split/libtoy.so\) building .* crashed while building its graph: SIGSEGV";;
  plugin_hang_build)
    export TPENGINE_POLICY_TIMEOUT=2
    run+=(--policy-path "$toys/hang_build" --policy toy)
    expect="policy 'toy' \(.*hang_build/libtoy.so\) building .* did not finish building its graph within 2 s \(TPENGINE_POLICY_TIMEOUT\)";;
  plugin_data_entry)
    run+=(--policy-path "$toys/data_entry")
    expect="plugin .*data_entry/libtoy.so crashed while loading: SIGSEGV \(Segmentation fault\)$";;
  plugin_abort_ctor)
    run+=(--policy-path "$toys/abort_ctor")
    expect="plugin .*abort_ctor/libtoy.so crashed while loading: SIGABRT \(Aborted\)$";;
  bad_flag_value)
    run+=(--top-p abc)
    expect="--top-p: top_p must be a number in \\(0, 1\\], got 'abc'";;
  empty_prompt_id)
    run=(generate --model "$model" --prompt-ids "1,,2" --quiet)
    expect="--prompt-ids \"1,,2\": an empty id between commas";;
  negative_seed)
    run+=(--seed -1)
    expect="--seed: seed must be a non-negative integer, got '-1'";;
  negative_stop_id)
    run+=(--stop-ids 2,-3)
    expect="--stop-ids: a stop token id must be a non-negative integer, got '-3'";;
  output_to_full_disk)
    stdout=/dev/full
    expect="writing the output failed: No space left on device";;
  bad_prompt_ids)
    run=(generate --model "$model" --prompt-ids 1,x,3 --quiet)
    expect="--prompt-ids \"1,x,3\": 'x' is not a token id";;
  token_out_of_range)
    run=(generate --model "$model" --prompt-ids 1,999 --quiet --tp 2)
    expect="token id 999 is out of range for the vocabulary of 128 tokens";;
  tp_beyond_heads)
    # 4 heads over 5 ranks: one would hold no head (it was loaded as if it held them all).
    run=(generate --model "$model" --prompt-ids 1,2 -n 2 --quiet --tp 5)
    expect="tp_size 5 is more ranks than .* can be split over: rank 4 would hold none";;
  tp_beyond_vocab)
    run=(generate --model "$model" --prompt-ids 1,2 -n 2 --quiet --tp 200)
    expect="tp_size 200 is more ranks than the vocabulary's 128 rows";;
  kv_cache_too_large)
    run=(generate --model "$model" --prompt-ids 1,2 -n 100000000000 --quiet --allow-long-context)
    expect="KV cache for 1 sequence\\(s\\) of up to 100000000002 tokens needs .* GiB, more than";;
  config_fifo)
    # A FIFO would block the reader for ever.
    rm "$model/config.json" && mkfifo "$model/config.json"
    expect="config.json: not a regular file \\(a FIFO, socket or device\\)";;
  config_endless)
    # /dev/zero never ends.
    rm "$model/config.json" && ln -s /dev/zero "$model/config.json"
    expect="config.json: not a regular file";;
  toml_fifo)
    mkfifo "$work/run.toml"
    run=(generate --config "$work/run.toml" --model "$model" --prompt-ids 1,2 -n 2 --quiet)
    expect="run.toml";;
  prompt_past_positions)
    # llama_mha has max_position_embeddings 64: a 60-token prompt and 8 new tokens need 68.
    run=(generate --model "$model" --prompt-ids "$(seq -s, 1 60)" -n 8 --quiet)
    expect="prompt 0 of 60 tokens and 8 new tokens need 68 positions, more than the model's max_position_embeddings = 64 \\(.*config.json\\).*--allow-long-context";;
  nan_weight_generate)
    # One NaN in the LM head: its logit is NaN, and no token can be chosen.
    edit_header 'o = h["lm_head.weight"]["data_offsets"][0]; data = data[:o] + struct.pack("<f", float("nan")) + data[o + 4:]'
    expect="generated token 0 of sequence 0: its logits are not finite \\(NaN or Inf\\)";;
  inf_weight_inspect)
    edit_header 'o = h["model.layers.1.mlp.up_proj.weight"]["data_offsets"][0] + 40; data = data[:o] + struct.pack("<f", float("inf")) + data[o + 4:]'
    run=(inspect --check "$model")
    expect="model: 1 of [0-9]+ tensors hold NaN or Inf: model.layers.1.mlp.up_proj.weight \\(1\\)";;
  model_type_control_chars)
    # A newline and an escape sequence in config.json's model_type stay on the one line, escaped
    # (the fuzz target fuzz_model_plan found the raw newline).
    python3 -c "import json,sys; p=sys.argv[1]; c=json.load(open(p)); c['model_type']='lla\nma\x1b[2J'; c.pop('architectures', None); json.dump(c,open(p,'w'))" "$model/config.json"
    expect="no policy serves model_type 'lla\\\\x0ama\\\\x1b\\[2J'";;
  weights_fifo)
    rm "$st" && mkfifo "$st"
    expect="model/model.safetensors: not a regular file \\(a directory, FIFO, socket or device\\)";;
  weights_directory)
    rm "$st" && mkdir "$st"
    expect="model/model.safetensors: not a regular file";;
  config_huge_width)
    # 16 M intermediate features would be 4 GiB for one MLP weight, over this case's 3 GB cap:
    # the checkpoint's shapes are compared before anything is allocated.
    memory_kb=3000000
    python3 -c "import json,sys; p=sys.argv[1]; c=json.load(open(p)); c['intermediate_size']=16000000; json.dump(c,open(p,'w'))" "$model/config.json"
    expect="tensor 'model.layers.0.mlp.gate_proj.weight' in .*model.safetensors has shape \\[[0-9]+, [0-9]+\\], expected \\[16000000, [0-9]+\\]";;
  *) echo "unknown case $case" >&2; exit 2;;
esac

case $case in
  plugin_*) export ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}handle_segv=0:handle_abort=0:replace_intrin=0";;
esac

# Each case under a time limit (a hang fails: no line on stderr) and, where no sanitizer reserves
# address space, a memory cap.
if ! ldd "$tpengine" | grep -q libasan; then ulimit -v "$memory_kb"; fi
timeout 60 "$tpengine" "${run[@]}" >"$stdout" 2>"$work/err"
status=$?
lines=$(wc -l <"$work/err")
echo "exit $status; stderr:"; cat "$work/err"
if [ $status -eq 0 ] || [ $status -ge 128 ]; then echo "FAIL: expected a non-zero exit without a signal"; exit 1; fi
if [ "$lines" -ne 1 ]; then echo "FAIL: expected exactly one line on stderr, got $lines"; exit 1; fi
if ! grep -Eq -e "$expect" "$work/err"; then echo "FAIL: stderr does not match /$expect/"; exit 1; fi
echo PASS
