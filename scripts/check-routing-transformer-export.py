#!/usr/bin/env python3
"""Scores text with weights that `sparse-attn export --format routing-transformer-pytorch` wrote, in the PyTorch
routing-transformer library itself, the way `sparse-attn eval` does (windows of max_seq_len bytes overlapping by one
byte; every byte but the first predicted once), and prints {"bpc": ..., "tokens": ...} to compare with
`sparse-attn eval --json`. Not used by the tests; needs torch and routing_transformer (1.6.1) importable.

usage: check-routing-transformer-export.py WEIGHTS.pt ARGS.json DATA [--lib DIR]
"""
import argparse, json, math, sys

parser = argparse.ArgumentParser()
parser.add_argument("weights")
parser.add_argument("args")
parser.add_argument("data")
parser.add_argument("--lib", help="folder to put first on sys.path (holding routing_transformer and its dependencies)")
opts = parser.parse_args()
if opts.lib:
    sys.path.insert(0, opts.lib)

import torch
import torch.nn.functional as F
from routing_transformer import RoutingTransformerLM

args = json.load(open(opts.args))
if isinstance(args.get("n_local_attn_heads"), list):
    args["n_local_attn_heads"] = tuple(args["n_local_attn_heads"])   # the library wants a tuple per layer
model = RoutingTransformerLM(**args)
model.load_state_dict(torch.load(opts.weights), strict=True)
model.eval()

data = open(opts.data, "rb").read()
T = args["max_seq_len"]
pad_to = args.get("local_attn_window_size") or args.get("window_size", 64)   # the library's local windows need whole windows
nats, tokens, start = 0.0, 0, 0
with torch.no_grad():
    while len(data) - start >= 2:
        window = list(data[start:start + T])
        n = len(window)
        if n % pad_to and not args.get("causal"):
            sys.exit(f"a window of {n} bytes is not a whole number of local windows ({pad_to}); pick DATA so every window is")
        padded = window + [0] * ((-n) % pad_to)                      # causal: padding after the window changes nothing before it
        logits, _ = model(torch.tensor([padded]))
        nats += F.cross_entropy(logits[0, :n - 1], torch.tensor(window[1:]), reduction="sum").item()
        tokens += n - 1
        start += T - 1
print(json.dumps({"bpc": nats / tokens / math.log(2), "tokens": tokens}))
