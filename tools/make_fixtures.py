#!/usr/bin/env python3
"""Make tiny random-weight Hugging Face checkpoints plus reference outputs.

Hugging Face transformers is the reference implementation: each fixture is a
tiny model built from a config with a fixed seed, saved with save_pretrained
(safetensors), reloaded from disk and run in fp32 with eager attention to
produce reference logits and greedy continuations.

Usage:
    python3 tools/make_fixtures.py --out tests/fixtures [--only NAME ...]
    /opt/tf4/bin/python tools/make_fixtures.py --out tests/fixtures   # the *_v4 ones

transformers 5.x makes the fixtures whose config.json uses the 5.x keys
(`rope_parameters`, `dtype`); transformers 4.x makes the `*_v4` fixtures
whose config.json uses the 4.x keys (`rope_theta`, `rope_scaling`,
`torch_dtype`, GPT-NeoX `rotary_pct`/`rotary_emb_base`). The script refuses
to make a fixture under the wrong major version.

Each fixture folder gets: config.json, generation_config.json,
model.safetensors (or shards + model.safetensors.index.json),
reference.safetensors (F32 `logits.0` [len0, vocab], `logits.1` [len1, vocab])
and reference.json (prompts, 16 greedy tokens per prompt, min top-2 gap, ...).
See tests/fixtures/README.md.
"""

import argparse
import copy
import json
import os
import shutil
import sys
import tempfile
import zlib

import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

TF_VERSION = transformers.__version__
TF_MAJOR, TF_MINOR = (int(x) for x in TF_VERSION.split(".")[:2])
GEN_NAME = {4: "4.x", 5: "5.x"}
# Which interpreter has which transformers (see tests/fixtures/README.md).
PYTHON_FOR = {"5.": "python3", "4.57.": "/opt/tf4/bin/python", "4.55.": "/opt/tf455/bin/python"}

NEW_TOKENS = 16
# Relative top-2 gap every greedy step must exceed:
# (top1 - top2) / max_v |logit_v| at that step. The brief requires > 1e-3;
# we ask for 1e-2 so that greedy comparisons are robust, and try successive
# seeds (deterministically) until one satisfies it.
GAP_THRESHOLD = 1e-2
MAX_SEED_TRIES = 200
# Tied random embeddings make a tiny model tend to repeat one token forever, which
# leaves the KV-cache path barely tested; a fixture may ask (min_distinct) for at
# least that many distinct tokens among each prompt's greedy tokens, and the seed
# search then also requires that.
MIN_DISTINCT = 4

# Common tiny dimensions.
VOCAB = 128
TOKENIZERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "tokenizer",
                          "data")


def tokenizer_size(name):
    with open(os.path.join(TOKENIZERS, name, "tokenizer.json")) as f:
        t = json.load(f)
    return len(t["model"]["vocab"]) + sum(1 for a in t.get("added_tokens", [])
                                          if a["content"] not in t["model"]["vocab"])


TEXT_VOCAB = tokenizer_size("gpt2_bpe")
HIDDEN = 64
LAYERS = 2
INIT_RANGE = 0.15


def llama_base(**over):
    cfg = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=96,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=INIT_RANGE,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    cfg.update(over)
    return cfg


def neox_base(**over):
    cfg = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        max_position_embeddings=64,
        initializer_range=INIT_RANGE,
        layer_norm_eps=1e-5,
        attention_bias=True,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=2,
    )
    cfg.update(over)
    return cfg


def bloom_base(**over):
    # BLOOM has no intermediate-size key: its MLP is always 4 * hidden_size.
    cfg = dict(
        vocab_size=VOCAB,
        hidden_size=96,
        n_layer=LAYERS,
        n_head=6,
        layer_norm_epsilon=1e-5,
        initializer_range=INIT_RANGE,
        apply_residual_connection_post_layernorm=False,
    )
    cfg.update(over)
    return cfg


def gpt2_base(**over):
    # GPT-2 / GPT-BigCode defaults bos = eos = 50256, outside vocab 128: use 1 / 2 as the others do.
    cfg = dict(
        vocab_size=VOCAB,
        n_embd=HIDDEN,
        n_layer=LAYERS,
        n_head=4,
        n_positions=64,
        n_inner=128,
        layer_norm_epsilon=1e-5,
        initializer_range=INIT_RANGE,
        bos_token_id=1,
        eos_token_id=2,
    )
    cfg.update(over)
    return cfg


def opt_base(**over):
    # OPT's config calls its init std `init_std` (it has no initializer_range key);
    # its own defaults pad 1, bos 2, eos 2 are kept.
    cfg = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        ffn_dim=128,
        num_attention_heads=4,
        max_position_embeddings=64,
        word_embed_proj_dim=HIDDEN,
        do_layer_norm_before=True,
        activation_function="relu",
        enable_bias=True,
        init_std=INIT_RANGE,
    )
    cfg.update(over)
    return cfg


def falcon_base(**over):
    cfg = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        ffn_hidden_size=128,
        max_position_embeddings=64,
        layer_norm_epsilon=1e-5,
        initializer_range=INIT_RANGE,
        bos_token_id=1,
        eos_token_id=2,
    )
    cfg.update(over)
    return cfg


# Each fixture: model_type, generation (major version that must write it),
# seed (first seed tried), rope (generation-neutral description, turned into
# the right keys by rope_kwargs; absent for families without rotary
# embeddings), config (other config kwargs), prompt_lens, save (extra save
# options), attn_implementation (default "eager"), description.
FIXTURES = {
    "llama_mha": dict(
        model_type="llama", tf="5.", seed=1000,
        config=llama_base(num_attention_heads=4, num_key_value_heads=4, intermediate_size=128),
        rope=dict(theta=10000.0),
        description="Llama, multi-head attention: 4 heads, 4 kv heads, head_dim 16, untied lm_head.",
    ),
    "llama_gqa": dict(
        model_type="llama", tf="5.", seed=1100,
        config=llama_base(num_attention_heads=8, num_key_value_heads=2, intermediate_size=128),
        rope=dict(theta=10000.0),
        description="Llama, grouped-query attention: 8 heads, 2 kv heads (4 q heads per kv head), head_dim 8.",
    ),
    "llama_6h2kv": dict(
        model_type="llama", tf="5.", seed=1200,
        config=llama_base(hidden_size=96, num_attention_heads=6, num_key_value_heads=2, head_dim=16,
                          intermediate_size=160),
        rope=dict(theta=10000.0),
        description=(
            "Llama, hidden 96, 6 heads / 2 kv heads, head_dim 16 (head count not divisible by 4; "
            "3 q heads per kv head), intermediate 160 (not a multiple of 64)."
        ),
    ),
    "llama_tied": dict(
        model_type="llama", tf="5.", seed=1300,
        config=llama_base(tie_word_embeddings=True),
        rope=dict(theta=10000.0),
        description=(
            "Llama with tie_word_embeddings=true: the checkpoint has no lm_head.weight; "
            "the output projection is model.embed_tokens.weight."
        ),
    ),
    "qwen2_bias": dict(
        model_type="qwen2", tf="5.", seed=1400,
        config=llama_base(bos_token_id=1, eos_token_id=2),
        rope=dict(theta=1000000.0),
        description="Qwen2: q/k/v projections have biases (random, non-zero), o_proj has none; rope_theta 1e6.",
    ),
    "mistral_window": dict(
        model_type="mistral", tf="5.", seed=1500,
        config=llama_base(sliding_window=4),
        rope=dict(theta=10000.0),
        description=(
            "Mistral with sliding_window=4 on every layer: query i attends to keys j with "
            "i-4 < j <= i (itself and the 3 previous tokens). Prompts (7, 5) and generation are longer "
            "than the window."
        ),
    ),
    "llama3_rope": dict(
        model_type="llama", tf="5.", seed=1600,
        config=llama_base(head_dim=16, max_position_embeddings=16384),
        rope=dict(theta=500000.0, scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                               high_freq_factor=4.0, original_max_position_embeddings=8192)),
        description=(
            "Llama with rope_theta 500000 and llama3 rope scaling (factor 8, low_freq_factor 1, "
            "high_freq_factor 4, original_max_position_embeddings 8192), head_dim 16: of the 8 frequencies, "
            "4 are unscaled, 1 is in the smooth band, 3 are divided by 8. max_position_embeddings is 16384 "
            "because transformers warns when it is not above original_max_position_embeddings."
        ),
    ),
    "llama_linear_rope": dict(
        model_type="llama", tf="5.", seed=1700,
        config=llama_base(),
        rope=dict(theta=10000.0, scaling=dict(rope_type="linear", factor=2.0)),
        description="Llama with linear rope scaling, factor 2 (positions divided by 2).",
    ),
    "llama_dynamic_rope": dict(
        model_type="llama", tf="5.", seed=1800,
        config=llama_base(max_position_embeddings=16),
        rope=dict(theta=10000.0, scaling=dict(rope_type="dynamic", factor=2.0)),
        prompt_lens=(20, 7),
        description=(
            "Llama with dynamic NTK rope scaling, factor 2, max_position_embeddings 16. Prompt 0 (20 tokens) "
            "is already longer than 16, so its prompt logits use the rescaled base for seq_len 20 at every "
            "position; prompt 1 (7 tokens) crosses 16 during generation. transformers recomputes the base "
            "from the current length at each decode step but keeps the cached keys as rotated when written, "
            "so `greedy` (generate with KV cache) and `greedy_nocache` (full recompute each step) may differ."
        ),
    ),
    "neox_parallel": dict(
        model_type="gpt_neox", tf="5.", seed=1900,
        config=neox_base(use_parallel_residual=True),
        rope=dict(theta=10000.0, partial=0.25),
        description=(
            "GPT-NeoX, use_parallel_residual=true (x + attn(ln1(x)) + mlp(ln2(x))), partial rotary 0.25 "
            "(4 of 16 head dims rotated), attention bias, fused query_key_value, gelu MLP, LayerNorm."
        ),
    ),
    "neox_sequential": dict(
        model_type="gpt_neox", tf="5.", seed=2000,
        config=neox_base(use_parallel_residual=False, hidden_act="gelu_fast"),
        rope=dict(theta=10000.0, partial=0.5),
        description=(
            "GPT-NeoX, use_parallel_residual=false (h = x + attn(ln1(x)); out = h + mlp(ln2(h))), "
            "partial rotary 0.5 (8 of 16 head dims rotated), attention bias, gelu_fast MLP "
            "(GPT-NeoX-20B's activation)."
        ),
    ),
    "llama_sharded": dict(
        model_type="llama", tf="5.", seed=2100,
        config=llama_base(),
        rope=dict(theta=10000.0),
        save=dict(max_shard_size="100KB"),
        description=(
            "Llama saved with max_shard_size=100KB: several model-0000x-of-0000y.safetensors shards "
            "plus model.safetensors.index.json (weight_map tensor name -> shard file)."
        ),
    ),
    "llama_bf16": dict(
        model_type="llama", tf="5.", seed=2200,
        config=llama_base(),
        rope=dict(theta=10000.0),
        save=dict(dtype="bfloat16"),
        description=(
            "Llama stored in bf16 (config dtype bfloat16). The reference is computed in fp32 from the same "
            "bf16 weights upcast (the saved folder loaded with dtype=float32)."
        ),
    ),
    "llama_fp16": dict(
        model_type="llama", tf="5.", seed=2300,
        config=llama_base(),
        rope=dict(theta=10000.0),
        save=dict(dtype="float16"),
        description=(
            "Llama stored in fp16 (config dtype float16). The reference is computed in fp32 from the same "
            "fp16 weights upcast (the saved folder loaded with dtype=float32)."
        ),
    ),
    "llama_text": dict(
        model_type="llama", tf="5.", seed=2400,
        config=llama_base(vocab_size=TEXT_VOCAB, tie_word_embeddings=True),
        rope=dict(theta=10000.0),
        tokenizer="gpt2_bpe",
        # bf16 must reproduce the first 8 fp32 greedy choices (a 1e-2 gap is within its rounding).
        min_gap=0.02, gap_steps=8,
        prompt_texts=["Call me Ishmael. Some years ago", "The quick brown fox"],
        description=(
            "Llama with tied embeddings over the byte-level BPE tokenizer of "
            "tests/tokenizer/data/gpt2_bpe (tokenizer.json copied in): text in, text out. "
            "reference.json adds the prompt texts and transformers' decoded greedy texts."
        ),
    ),
    # ---- other families (no rope spec where the family has no rotary embeddings) ----
    "bloom": dict(
        model_type="bloom", tf="5.", seed=3000,
        # BLOOM's word_embeddings_layernorm scales the tied random embedding up to unit variance, so the
        # current token dominates its own logit: in 150 seeds none gave 3 distinct greedy tokens for both prompts.
        min_distinct=2,
        config=bloom_base(),
        description=(
            "BLOOM: hidden 96, 6 heads (head_dim 16; 6 is not a power of two, so both branches of the ALiBi "
            "slope formula are used), ALiBi (no position embeddings), fused query_key_value laid out per head "
            "[q k v], word_embeddings_layernorm, tanh gelu MLP of 4*hidden, "
            "apply_residual_connection_post_layernorm=false, tied embeddings."
        ),
    ),
    "bloom_post_ln_residual": dict(
        model_type="bloom", tf="5.", seed=3100,
        min_distinct=3,
        config=bloom_base(hidden_size=64, n_head=4, apply_residual_connection_post_layernorm=True),
        description=(
            "BLOOM with apply_residual_connection_post_layernorm=true: the residual added after attention "
            "(and after the MLP) is the layer norm's output, not its input. hidden 64, 4 heads."
        ),
    ),
    "gpt2": dict(
        model_type="gpt2", tf="5.", seed=3200,
        min_distinct=MIN_DISTINCT,
        config=gpt2_base(activation_function="gelu_new"),
        description=(
            "GPT-2: learned position embeddings wpe, Conv1D weights stored [in, out] (y = x W + b), fused "
            "c_attn [all q | all k | all v], gelu_new (tanh) MLP of 128, LayerNorm ln_1/ln_2/ln_f, tied."
        ),
    ),
    "gpt_bigcode_mqa": dict(
        model_type="gpt_bigcode", tf="5.", seed=3300,
        min_distinct=MIN_DISTINCT,
        config=gpt2_base(multi_query=True, activation_function="gelu_pytorch_tanh"),
        description=(
            "GPT-BigCode (SantaCoder/StarCoder style) multi_query=true: one kv head, nn.Linear weights "
            "[out, in], c_attn [all q (64) | k (16) | v (16)], learned positions, tanh gelu, tied."
        ),
    ),
    "gpt_bigcode_mha": dict(
        model_type="gpt_bigcode", tf="5.", seed=3400,
        min_distinct=MIN_DISTINCT,
        config=gpt2_base(multi_query=False, activation_function="gelu_pytorch_tanh"),
        description=(
            "GPT-BigCode multi_query=false: 4 kv heads and c_attn laid out per head [q k v] "
            "(not [all q | all k | all v] as in GPT-2), nn.Linear weights, tied."
        ),
    ),
    "opt": dict(
        model_type="opt", tf="5.", seed=3500,
        min_distinct=MIN_DISTINCT,
        config=opt_base(),
        description=(
            "OPT (125m style): do_layer_norm_before=true (pre-LN, with a final_layer_norm), learned positions "
            "with offset 2 (table of 64+2 rows), q scaled by head_dim^-0.5 after its bias, relu MLP of 128, "
            "biases everywhere, tied."
        ),
    ),
    "opt_post_ln_proj": dict(
        model_type="opt", tf="5.", seed=3600,
        min_distinct=MIN_DISTINCT,
        config=opt_base(do_layer_norm_before=False, word_embed_proj_dim=32),
        description=(
            "OPT (350m style): do_layer_norm_before=false (post-LN, no final_layer_norm), word_embed_proj_dim 32 "
            "< hidden 64: embeddings [128, 32] go through project_in to 64, the last hidden state through "
            "project_out to 32 before the tied head."
        ),
    ),
    "falcon_mqa": dict(
        model_type="falcon", tf="5.", seed=3700,
        min_distinct=MIN_DISTINCT,
        config=falcon_base(new_decoder_architecture=False, multi_query=True, parallel_attn=True, alibi=False,
                           bias=False),
        rope=dict(theta=10000.0),
        description=(
            "Falcon-7B style: multi_query=true (1 kv head; query_key_value [all q | k | v]), parallel_attn "
            "(x + attn(ln(x)) + mlp(ln(x)) with one input_layernorm), no biases, rotary (half-split, theta "
            "10000), exact gelu MLP of 128, tied."
        ),
    ),
    "falcon_grouped": dict(
        model_type="falcon", tf="5.", seed=3800,
        min_distinct=MIN_DISTINCT,
        config=falcon_base(new_decoder_architecture=True, num_attention_heads=8, num_kv_heads=2,
                           parallel_attn=True, num_ln_in_parallel_attn=2, alibi=False, bias=False),
        rope=dict(theta=10000.0),
        description=(
            "Falcon-40B style: new_decoder_architecture=true, 8 heads / 2 kv heads (head_dim 8), "
            "query_key_value grouped per kv head [4 q | k | v], ln_attn and ln_mlp "
            "(num_ln_in_parallel_attn 2), parallel residual, no biases, rotary, tied."
        ),
    ),
    "falcon_rw_alibi": dict(
        model_type="falcon", tf="5.", seed=3900,
        min_distinct=MIN_DISTINCT,
        config=falcon_base(new_decoder_architecture=False, multi_query=False, parallel_attn=False, alibi=True,
                           bias=True),
        # transformers' eager Falcon path adds the ALiBi bias twice (see tests/fixtures/README.md); its
        # sdpa path (Falcon's default) matches the original Falcon-RW code, so that is the reference here.
        attn_implementation="sdpa",
        description=(
            "falcon-rw-1b style: ALiBi (no rotary), multi_query=false (query_key_value per head [q k v]), "
            "sequential residual with input_layernorm and post_attention_layernorm, biases, tied. "
            "Reference computed with attn_implementation=\"sdpa\": score = (q.k + slope*j) / sqrt(head_dim)."
        ),
    ),
    # ---- written by transformers 4.x (old config keys) ----
    "llama3_rope_v4": dict(
        twin="llama3_rope",
        model_type="llama", tf="4.57.", seed=1600,
        config=llama_base(head_dim=16, max_position_embeddings=16384),
        rope=dict(theta=500000.0, scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                               high_freq_factor=4.0, original_max_position_embeddings=8192)),
        description="Same spec as llama3_rope, written by transformers 4.x (rope_theta + rope_scaling keys).",
    ),
    "neox_parallel_v4": dict(
        twin="neox_parallel",
        model_type="gpt_neox", tf="4.57.", seed=1900,
        config=neox_base(use_parallel_residual=True),
        rope=dict(theta=10000.0, partial=0.25),
        description="Same spec as neox_parallel, written by transformers 4.x (rotary_pct, rotary_emb_base keys).",
    ),
    "qwen2_bias_v4": dict(
        twin="qwen2_bias",
        model_type="qwen2", tf="4.57.", seed=1400,
        config=llama_base(bos_token_id=1, eos_token_id=2),
        rope=dict(theta=1000000.0),
        description="Same spec as qwen2_bias, written by transformers 4.x (rope_theta, torch_dtype keys).",
    ),
    "llama_linear_rope_v4": dict(
        twin="llama_linear_rope",
        model_type="llama", tf="4.57.", seed=1700,
        config=llama_base(),
        rope=dict(theta=10000.0, scaling=dict(type="linear", factor=2.0)),
        description=(
            "Same spec as llama_linear_rope, written by transformers 4.x, given the old "
            "rope_scaling {\"type\": \"linear\", \"factor\": 2.0} form."
        ),
    ),
    "falcon_mqa_v4": dict(
        twin="falcon_mqa",
        # 4.57 draws one normal per FalconLinear weight, 5.x two (its generic init, then Falcon's
        # own), so the same seed gives other weights: this twin copies falcon_mqa's tensors (and seed).
        weights="twin",
        model_type="falcon", tf="4.57.", seed=3700,
        min_distinct=MIN_DISTINCT,
        config=falcon_base(new_decoder_architecture=False, multi_query=True, parallel_attn=True, alibi=False,
                           bias=False),
        rope=dict(theta=10000.0),
        description="Same spec as falcon_mqa, written by transformers 4.x (rope_theta, rope_scaling keys).",
    ),
    # ---- written by transformers 4.55 (the last 4.x that writes `torch_dtype`) ----
    "llama_bf16_v455": dict(
        twin="llama_bf16",
        model_type="llama", tf="4.55.", seed=2200,
        config=llama_base(),
        rope=dict(theta=10000.0),
        save=dict(dtype="bfloat16"),
        description=(
            "Same spec as llama_bf16, written by transformers 4.55: config has \"torch_dtype\": \"bfloat16\", "
            "rope_theta and \"rope_scaling\": null, like most published Llama checkpoints. Reference in fp32 "
            "from the bf16 weights upcast."
        ),
    ),
}


def makes(spec):
    """Whether the running transformers is the one that must write this fixture."""
    return TF_VERSION.startswith(spec["tf"])


def rope_kwargs(model_type, rope, major):
    """Config kwargs for the rope settings, in the given generation's own form."""
    theta = rope["theta"]
    scaling = rope.get("scaling")
    partial = rope.get("partial")
    if major >= 5:
        params = {"rope_type": "default", "rope_theta": theta}
        if scaling:
            params.update(scaling)
            if "type" in params:
                params["rope_type"] = params.pop("type")
        if partial is not None:
            params["partial_rotary_factor"] = partial
        return {"rope_parameters": params}
    # transformers 4.x
    if model_type == "gpt_neox":
        kw = {"rotary_emb_base": theta}
        if partial is not None:
            kw["rotary_pct"] = partial
        assert not scaling
        return kw
    kw = {"rope_theta": theta}
    if scaling:
        kw["rope_scaling"] = dict(scaling)
    return kw


def is_dynamic_rope(spec):
    return (spec.get("rope", {}).get("scaling") or {}).get("rope_type") == "dynamic"


def fixture_prompts(name, vocab, lens):
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lens]


def is_norm(module):
    """LayerNorm / RMSNorm modules, told by type (as transformers' own _init_weights does),
    not by name: GPT-2's ln_1, BLOOM's word_embeddings_layernorm, Falcon's ln_attn, ..."""
    cls = type(module).__name__
    return isinstance(module, torch.nn.LayerNorm) or "LayerNorm" in cls or "RMSNorm" in cls


def norm_weight_names(model):
    return {f"{mn}.{pn}" if mn else pn
            for mn, mod in model.named_modules() if is_norm(mod)
            for pn, _ in mod.named_parameters(recurse=False) if pn == "weight"}


def perturb(model, seed, init_range):
    """transformers initialises norm weights to 1 and biases to 0; make them random
    so that a missing norm weight or bias shows up in the comparison."""
    norms = norm_weight_names(model)
    # The Llama / GPT-NeoX fixtures were made with the rule `"norm" in name`; for
    # them the module-type rule selects exactly the same parameters (checked), so
    # their weights are unchanged. Anything the old rule picks must still be picked.
    legacy = {n for n, _ in model.named_parameters() if "norm" in n and n.endswith(".weight")}
    assert legacy <= norms, f"name rule picks non-norm parameters {sorted(legacy - norms)}"
    g = torch.Generator().manual_seed(seed + 7919)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=g) * init_range)
            elif name in norms:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))


def load_fp32(path, attn="eager"):
    if (TF_MAJOR, TF_MINOR) >= (4, 56):
        kw = dict(dtype=torch.float32)
    else:
        kw = dict(torch_dtype=torch.float32)
    m = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn, **kw)
    m.eval()
    return m


def rel_gap(logits_row):
    top = torch.topk(logits_row, 2).values
    gap = float(top[0] - top[1])
    return gap / float(logits_row.abs().max()), gap


def greedy_generate(model, prompt):
    # Never stop early: no eos during generation (min_new_tokens would instead mask
    # eos logits and change the choices). generate() fills a passed config's None
    # fields from model.generation_config, so the model's own config is changed
    # (after save_pretrained wrote generation_config.json with the eos in it).
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    gc = copy.deepcopy(model.generation_config)
    gc.do_sample = False
    gc.num_beams = 1
    gc.max_new_tokens = NEW_TOKENS
    gc.return_dict_in_generate = True
    gc.output_logits = True
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gc)
    toks = out.sequences[0, len(prompt):].tolist()
    assert len(toks) == NEW_TOKENS, toks
    assert len(out.logits) == NEW_TOKENS
    step_logits = [l[0].float() for l in out.logits]
    assert [int(torch.argmax(l)) for l in step_logits] == toks
    return toks, step_logits


def greedy_nocache(model, prompt):
    ids = list(prompt)
    toks, step_logits = [], []
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            logits = model(torch.tensor([ids]), use_cache=False).logits[0, -1].float()
            t = int(torch.argmax(logits))
            toks.append(t)
            step_logits.append(logits)
            ids.append(t)
    return toks, step_logits


def load_weights(folder):
    w = {}
    for fn in sorted(os.listdir(folder)):
        if fn.endswith(".safetensors") and fn != "reference.safetensors":
            with safe_open(os.path.join(folder, fn), "pt") as f:
                for k in f.keys():
                    w[k] = f.get_tensor(k)
    return w


def build_and_save(name, spec, seed, path, copy_from=None):
    cfg_kwargs = dict(spec["config"])
    if "rope" in spec:
        cfg_kwargs.update(rope_kwargs(spec["model_type"], spec["rope"], TF_MAJOR))
    config = AutoConfig.for_model(spec["model_type"], **cfg_kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    # OPT calls it init_std.
    init_range = getattr(config, "initializer_range", None) or config.init_std
    perturb(model, seed, init_range)
    if copy_from is not None:
        # A twin whose transformers initialises this family differently: take the
        # twin's weights, so that both fixtures hold the same model.
        w = load_weights(copy_from)
        params = dict(model.named_parameters())  # tied weights appear once
        assert set(w) == set(params), f"{name}: twin tensors {sorted(set(w) ^ set(params))}"
        with torch.no_grad():
            for k, p in params.items():
                assert w[k].shape == p.shape and w[k].dtype == p.dtype, k
                p.copy_(w[k])
    model.eval()
    save = spec.get("save", {})
    if "dtype" in save:
        model = model.to(getattr(torch, save["dtype"]))
    kw = {}
    if "max_shard_size" in save:
        kw["max_shard_size"] = save["max_shard_size"]
    model.save_pretrained(path, safe_serialization=True, **kw)
    if "tokenizer" in spec:
        for fn in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(os.path.join(TOKENIZERS, spec["tokenizer"], fn), path)


def compute_reference(name, spec, path):
    # A freshly loaded model for every run: dynamic NTK rope keeps state between
    # calls (its inv_freq only grows, or resets below max_position_embeddings),
    # so each prompt / generate / argmax loop starts from the state on disk.
    attn = spec.get("attn_implementation", "eager")

    def load():
        return load_fp32(path, attn)

    vocab = load().config.vocab_size
    # A *_v4 / *_v455 fixture uses its twin's prompts (and, the init being the same
    # across versions, ends up with its twin's seed and weights).
    if "prompt_texts" in spec:
        tok = AutoTokenizer.from_pretrained(path)
        prompts = [tok(t)["input_ids"] for t in spec["prompt_texts"]]
    else:
        prompts = fixture_prompts(spec.get("twin", name), vocab, spec.get("prompt_lens", (7, 5)))
    logits = {}
    with torch.no_grad():
        for i, p in enumerate(prompts):
            out = load()(torch.tensor([p]), use_cache=False).logits[0].float().contiguous()
            assert out.shape == (len(p), vocab)
            logits[f"logits.{i}"] = out
    greedy, greedy_nc, gaps = [], [], []
    mismatch = False
    for i, p in enumerate(prompts):
        g_toks, g_logits = greedy_generate(load(), p)
        n_toks, n_logits = greedy_nocache(load(), p)
        for step0 in (g_logits[0], n_logits[0]):
            assert torch.allclose(step0, logits[f"logits.{i}"][-1], rtol=1e-4, atol=1e-5), name
        if g_toks != n_toks:
            if is_dynamic_rope(spec):
                mismatch = True
            else:
                raise AssertionError(f"{name}: generate {g_toks} != argmax loop {n_toks}")
        greedy.append(g_toks)
        greedy_nc.append(n_toks)
        steps = spec.get("gap_steps", len(g_logits))
        for l in g_logits[:steps] + n_logits[:steps]:
            gaps.append(rel_gap(l))
    return dict(
        prompts=prompts, logits=logits, greedy=greedy, greedy_nocache=greedy_nc,
        cache_mismatch=mismatch,
        min_rel=min(g[0] for g in gaps), min_abs=min(g[1] for g in gaps),
    )


def check_config_generation(name, spec, path):
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    problems = []
    rope = spec.get("rope")  # None: a family without rotary embeddings, nothing to check
    if TF_MAJOR >= 5:
        if rope is not None and "rope_parameters" not in cfg:
            problems.append("no rope_parameters")
        for k in ("rope_theta", "rope_scaling", "torch_dtype", "rotary_pct", "rotary_emb_base"):
            if k in cfg:
                problems.append(f"has 4.x key {k}")
        if "dtype" not in cfg:
            problems.append("no dtype")
    else:
        if "rope_parameters" in cfg:
            problems.append("has 5.x key rope_parameters")
        # 4.56 renamed torch_dtype to dtype, also in the config.json it writes.
        dtype_key = "torch_dtype" if TF_MINOR <= 55 else "dtype"
        other = "dtype" if dtype_key == "torch_dtype" else "torch_dtype"
        if dtype_key not in cfg or other in cfg:
            problems.append(f"transformers {TF_VERSION} should write {dtype_key} only")
        if rope is None:
            pass
        elif spec["model_type"] == "gpt_neox":
            for k in ("rotary_pct", "rotary_emb_base"):
                if k not in cfg:
                    problems.append(f"no {k}")
        else:
            if "rope_theta" not in cfg:
                problems.append("no rope_theta")
            if rope.get("scaling") and "rope_scaling" not in cfg:
                problems.append("no rope_scaling")
    want_dtype = spec.get("save", {}).get("dtype", "float32")
    got_dtype = cfg.get("dtype", cfg.get("torch_dtype"))
    if got_dtype != want_dtype:
        problems.append(f"dtype {got_dtype} != {want_dtype}")
    if problems:
        raise AssertionError(f"{name}: config.json is not {GEN_NAME[TF_MAJOR]}-style: {problems}")
    return cfg


def check_weights(name, spec, path, cfg):
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors") and f != "reference.safetensors")
    names = {}
    for fn in files:
        with safe_open(os.path.join(path, fn), "pt") as f:
            for k in f.keys():
                names[k] = (fn, f.get_slice(k).get_dtype())
    want = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}[spec.get("save", {}).get("dtype", "float32")]
    bad = {k: v[1] for k, v in names.items() if v[1] != want}
    assert not bad, f"{name}: unexpected tensor dtypes {bad}"
    head = OUTPUT_HEAD.get(spec["model_type"], "lm_head.weight")
    has_head = head in names
    # 4.x leaves tie_word_embeddings out of config.json when it is the default (true),
    # so ask the config class rather than the json.
    if AutoConfig.from_pretrained(path).tie_word_embeddings:
        assert not has_head, f"{name}: tied model saved {head}"
    else:
        assert has_head, f"{name}: untied model lacks {head}"
    # No tensor may be constant: a norm weight left at 1, a bias left at 0 or a
    # position table left at zeros would hide a missing tensor in the comparison.
    for fn in files:
        with safe_open(os.path.join(path, fn), "pt") as f:
            for k in f.keys():
                t = f.get_tensor(k)
                assert t.numel() > 1 and not bool((t == t.flatten()[0]).all()), f"{name}: {k} is constant"
    if "max_shard_size" in spec.get("save", {}):
        assert len(files) >= 3, f"{name}: only {len(files)} shards"
        assert os.path.exists(os.path.join(path, "model.safetensors.index.json")), name
        with open(os.path.join(path, "model.safetensors.index.json")) as f:
            index = json.load(f)
        assert set(index["weight_map"]) == set(names), name
        assert all(names[k][0] == v for k, v in index["weight_map"].items()), name
    else:
        assert files == ["model.safetensors"], f"{name}: {files}"
    return files


# The output projection's tensor name when it is not tied (GPT-NeoX is never tied).
OUTPUT_HEAD = {"gpt_neox": "embed_out.weight"}


def to_json(obj):
    """JSON with one key per line but each token-id list on a single line."""
    lines = ["{"]
    items = list(obj.items())
    for i, (k, v) in enumerate(items):
        if isinstance(v, list) and v and isinstance(v[0], list):
            body = "[\n" + ",\n".join("  " + json.dumps(x) for x in v) + "\n ]"
        else:
            body = json.dumps(v)
        lines.append(f" {json.dumps(k)}: {body}" + ("," if i + 1 < len(items) else ""))
    lines.append("}")
    return "\n".join(lines) + "\n"


def make_fixture(name, spec, out_dir):
    target = os.path.join(out_dir, name)
    copy_from, first_seed, tries = None, spec["seed"], MAX_SEED_TRIES
    if spec.get("weights") == "twin":
        copy_from = os.path.join(out_dir, spec["twin"])
        if not os.path.exists(os.path.join(copy_from, "reference.json")):
            sys.exit(f"make_fixtures: {name} copies the weights of {spec['twin']}: make that first")
        with open(os.path.join(copy_from, "reference.json")) as f:
            first_seed, tries = json.load(f)["seed"], 1
    for attempt in range(tries):
        seed = first_seed + attempt
        tmp = tempfile.mkdtemp(prefix=f"fx_{name}_")
        try:
            build_and_save(name, spec, seed, tmp, copy_from)
            res = compute_reference(name, spec, tmp)
        except Exception:
            shutil.rmtree(tmp)
            raise
        distinct = min(len(set(g)) for g in res["greedy"])
        if res["min_rel"] > spec.get("min_gap", GAP_THRESHOLD) and distinct >= spec.get("min_distinct", 1):
            break
        shutil.rmtree(tmp)
    else:
        raise RuntimeError(f"{name}: no seed in {tries} tries gives a top-2 gap > "
                           f"{spec.get('min_gap', GAP_THRESHOLD)} and >= {spec.get('min_distinct', 1)} "
                           f"distinct greedy tokens per prompt")

    greedy, greedy_nc, mismatch = res["greedy"], res["greedy_nocache"], res["cache_mismatch"]
    min_rel, min_abs = res["min_rel"], res["min_abs"]
    cfg = check_config_generation(name, spec, tmp)
    files = check_weights(name, spec, tmp, cfg)

    save_file(res["logits"], os.path.join(tmp, "reference.safetensors"))
    ref = {
        "fixture": name,
        "description": spec["description"],
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "config_generation": GEN_NAME[TF_MAJOR],
        "model_type": spec["model_type"],
        "seed": seed,
        **({"twin": spec["twin"]} if "twin" in spec else {}),
        **({"attn_implementation": spec["attn_implementation"]} if "attn_implementation" in spec else {}),
        **({"weights_from_twin": True} if spec.get("weights") == "twin" else {}),
        "prompts": res["prompts"],
        "greedy": greedy,
        "min_top2_gap": min_rel,
        "min_top2_gap_abs": min_abs,
        "weight_files": files,
    }
    if "prompt_texts" in spec:
        tok = AutoTokenizer.from_pretrained(tmp)
        ref["prompt_texts"] = spec["prompt_texts"]
        ref["greedy_texts"] = [tok.decode(g, skip_special_tokens=True) for g in greedy]
    if is_dynamic_rope(spec):
        ref["greedy_nocache"] = greedy_nc
        ref["greedy_matches_nocache"] = not mismatch
    with open(os.path.join(tmp, "reference.json"), "w") as f:
        f.write(to_json(ref))

    if os.path.exists(target):
        shutil.rmtree(target)
    shutil.move(tmp, target)
    os.chmod(target, 0o755)
    for fn in os.listdir(target):  # mkdtemp / safetensors leave 0700 / 0600
        os.chmod(os.path.join(target, fn), 0o644)
    total = sum(os.path.getsize(os.path.join(target, f)) for f in os.listdir(target))
    print(f"wrote {target}/ ({total / 1024:.0f} KiB; seed {seed}; min top-2 gap {min_rel:.4f} rel, "
          f"{min_abs:.4f} abs; {', '.join(sorted(os.listdir(target)))})")
    if mismatch:
        print(f"  note: {name}: generate (KV cache) {greedy} != no-cache argmax loop {greedy_nc}")
    if "twin" in spec:
        compare_twin(target, os.path.join(out_dir, spec["twin"]))


def compare_twin(a, b):
    """Informational: a *_v4 fixture vs its 5.x twin (same seed -> same weights)."""
    if not os.path.exists(os.path.join(b, "reference.json")):
        print(f"  twin {b} not made yet; no cross-version comparison")
        return
    wa, wb = {}, {}
    for d, w in ((a, wa), (b, wb)):
        for fn in os.listdir(d):
            if fn.endswith(".safetensors") and fn != "reference.safetensors":
                with safe_open(os.path.join(d, fn), "pt") as f:
                    for k in f.keys():
                        w[k] = f.get_tensor(k)
    same_w = sorted(wa) == sorted(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)
    with open(os.path.join(a, "reference.json")) as f:
        ra = json.load(f)
    with open(os.path.join(b, "reference.json")) as f:
        rb = json.load(f)
    diff = None
    if ra["prompts"] == rb["prompts"]:
        with safe_open(os.path.join(a, "reference.safetensors"), "pt") as fa, \
                safe_open(os.path.join(b, "reference.safetensors"), "pt") as fb:
            diff = max(float((fa.get_tensor(k) - fb.get_tensor(k)).abs().max()) for k in fa.keys())
    print(f"  vs twin {os.path.basename(b)}: identical weights {same_w}, same prompts "
          f"{ra['prompts'] == rb['prompts']}, same greedy {ra['greedy'] == rb['greedy']}, "
          f"max |logits diff| {diff}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="output folder, e.g. tests/fixtures")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="make only these fixtures")
    ap.add_argument("--list", action="store_true", help="list fixtures and exit")
    args = ap.parse_args()

    if args.list:
        for n, s in FIXTURES.items():
            print(f"{n:22s} transformers {s['tf']}x  {s['description']}")
        return 0
    if not args.out:
        ap.error("--out is required")
    if TF_MAJOR not in GEN_NAME:
        sys.exit(f"make_fixtures: transformers {TF_VERSION} is not supported (need 4.x or 5.x)")
    if args.only:
        unknown = [n for n in args.only if n not in FIXTURES]
        if unknown:
            sys.exit(f"make_fixtures: unknown fixture(s) {unknown}; known: {sorted(FIXTURES)}")
        wrong = [n for n in args.only if not makes(FIXTURES[n])]
        if wrong:
            sys.exit(
                "make_fixtures: refusing: "
                + "; ".join(f"{n} must be made by transformers {FIXTURES[n]['tf']}x "
                            f"({PYTHON_FOR[FIXTURES[n]['tf']]} tools/make_fixtures.py)" for n in wrong)
                + f"; this is transformers {TF_VERSION}"
            )
        names = args.only
    else:
        names = [n for n, s in FIXTURES.items() if makes(s)]
        if not names:
            sys.exit(f"make_fixtures: no fixture is made by transformers {TF_VERSION}; "
                     f"known: {sorted(set(s['tf'] + 'x' for s in FIXTURES.values()))}")
    transformers.utils.logging.disable_progress_bar()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    print(f"transformers {transformers.__version__}, torch {torch.__version__}: making {len(names)} fixture(s)")
    for n in names:
        make_fixture(n, FIXTURES[n], args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
