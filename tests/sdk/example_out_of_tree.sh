#!/usr/bin/env bash
# Installs the SDK component into a fresh prefix, copies the example from the *installed* docs,
# builds it against that prefix only, drops the plugin into a new folder named by a TOML config,
# and checks: the plugin exports only its entry point; tpengine picks it; the legacy injection
# policy gives the automatic plan; TP 2, 3, 4 generate what TP 1 does.
# usage: example_out_of_tree.sh TPENGINE_BUILD_DIR TPENGINE
set -euo pipefail
build=$1 tpengine=$2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fail() { echo "FAIL: $*"; exit 1; }

cmake --install "$build" --prefix "$work/sdk" --component sdk >/dev/null
example=$(find "$work/sdk" -type d -path '*sdk/example' | head -n 1)
[ -n "$example" ] || fail "the installed SDK has no example"
cp -r "$example" "$work/src"
cmake -S "$work/src" -B "$work/build" -DCMAKE_PREFIX_PATH="$work/sdk" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$work/build" >/dev/null
mkdir "$work/policies"
cp "$work/build/libtoy_lm.so" "$work/policies/"

exported=$(nm -D --defined-only "$work/policies/libtoy_lm.so" | awk '$2 ~ /^[TDBRW]$/ {print $3}' | sort -u)
[ "$exported" = "tpe_policy_entry" ] || fail "plugin exports more than its entry: $exported"

python3 "$work/src/make_checkpoint.py" "$work/model" >/dev/null
cat >"$work/auto.toml" <<TOML
[model]
path = "model"
[generation]
max_new_tokens = 12
ignore_eos = true
[policy]
search_paths = ["policies"]
TOML
# The legacy form, as DeepSpeed users write it: {block class = [row-parallel linears]}.
sed 's|^search_paths = .*|&\ninjection_policy = {"ToyBlock" = ["attn.out", "mlp.down"]}|' \
  "$work/auto.toml" >"$work/injected.toml"
grep -q 'injection_policy = {"ToyBlock"' "$work/injected.toml" || fail "could not write the TOML"

"$tpengine" policies --config "$work/auto.toml" | tee "$work/policies.txt"
grep -q "toy_lm from $work/policies/libtoy_lm.so" "$work/policies.txt" || fail "tpengine did not pick the plugin"

for tp in 1 2 3 4; do
  "$tpengine" plan --config "$work/auto.toml" --tp $tp | grep -v '^split:' >"$work/auto.plan"
  "$tpengine" plan --config "$work/injected.toml" --tp $tp >"$work/injected.full"
  grep -q '^split:  injection policy {ToyBlock = \[attn.out, mlp.down\]}' "$work/injected.full" ||
    fail "the injection policy was not used"
  grep -v '^split:' "$work/injected.full" >"$work/injected.plan"
  diff "$work/auto.plan" "$work/injected.plan" || fail "injection policy plan differs at TP $tp"
done
grep -Eq "blocks.0.attn.wqkv +column" "$work/auto.plan" || fail "wqkv is not column-parallel"
grep -Eq "ToyBlock blocks.1 +1 all-reduce" "$work/auto.plan" || fail "parallel block needs one all-reduce"
cat "$work/auto.plan"

prompts=(--prompt-ids 5,17,33,2,90,11,7 --prompt-ids 64,3,19)
"$tpengine" generate --config "$work/injected.toml" --tp 1 --quiet "${prompts[@]}" >"$work/tp1.txt"
cat "$work/tp1.txt"
[ "$(wc -l <"$work/tp1.txt")" -eq 2 ] || fail "expected two sequences"
for tp in 2 3 4; do
  "$tpengine" generate --config "$work/auto.toml" --tp $tp --quiet "${prompts[@]}" >"$work/tp$tp.txt"
  diff "$work/tp1.txt" "$work/tp$tp.txt" || fail "TP $tp generates differently from TP 1"
done
echo PASS
