#!/usr/bin/env python3
"""Hugging Face tokenizers' encode throughput on the same input as tpe_tokenizer_bench.

    RAYON_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false python3 tests/tokenizer/bench_hf.py DIR [REPEATS] [ROUNDS]

One thread (Rayon pinned to 1), the lines as one batch (encode_batch), best of ROUNDS; each round
loads the tokenizer afresh (untimed), so its word cache starts empty.
"""
import gzip
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
from tokenizers import Tokenizer  # noqa: E402

directory = Path(sys.argv[1])
repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 3
rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 5
with gzip.open(Path(__file__).parent / "data" / "corpus.jsonl.gz", "rt", encoding="utf-8") as f:
    corpus = [json.loads(line) for line in f]
lines = corpus * repeats
size = sum(len(line.encode()) for line in lines)
best = float("inf")
for _ in range(rounds):
    tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    start = time.perf_counter()
    encodings = tok.encode_batch(lines)
    best = min(best, time.perf_counter() - start)
tokens = sum(len(e.ids) for e in encodings)
print(f"{directory}: {len(lines)} lines, {size / 1e6:.2f} MB, {tokens} tokens; best of {rounds}: "
      f"{best:.3f} s = {size / 1e6 / best:.2f} MB/s, {tokens / best:.0f} tokens/s")
