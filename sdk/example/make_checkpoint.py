#!/usr/bin/env python3
"""Writes a tiny random ToyLM checkpoint (config.json + model.safetensors) with nothing but the
Python standard library, so the example runs wherever python3 does.

usage: make_checkpoint.py OUT_DIR
"""
import array
import json
import os
import random
import struct
import sys

CONFIG = {
    "model_type": "toy_lm",
    "d_model": 64,
    "n_layers": 2,
    "n_heads": 4,
    "n_kv_heads": 2,
    "d_ff": 160,
    "vocab": 96,
    "norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 256,
}


def tensors(c):
    d, hd = c["d_model"], c["d_model"] // c["n_heads"]
    fused = (c["n_heads"] + 2 * c["n_kv_heads"]) * hd
    yield "tok.table", [c["vocab"], d]
    for i in range(c["n_layers"]):
        p = f"blocks.{i}"
        yield f"{p}.norm.weight", [d]
        yield f"{p}.attn.wqkv.weight", [fused, d]
        yield f"{p}.attn.out.weight", [d, c["n_heads"] * hd]
        yield f"{p}.mlp.up.weight", [c["d_ff"], d]
        yield f"{p}.mlp.down.weight", [d, c["d_ff"]]
    yield "final_norm.weight", [d]
    yield "readout.matrix", [c["vocab"], d]


def main(out):
    os.makedirs(out, exist_ok=True)
    rng = random.Random(20261122)
    header, blobs, offset = {}, [], 0
    for name, shape in tensors(CONFIG):
        count = 1
        for dim in shape:
            count *= dim
        if name.endswith("norm.weight"):
            values = [1.0 + rng.gauss(0.0, 0.1) for _ in range(count)]
        else:
            values = [rng.gauss(0.0, 0.15) for _ in range(count)]
        blob = array.array("f", values).tobytes()  # little-endian on every supported host
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header).encode()
    with open(os.path.join(out, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(CONFIG, f, indent=2)
    print(f"wrote {out}/config.json and {out}/model.safetensors ({offset} bytes of weights)")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
