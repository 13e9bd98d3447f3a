#!/usr/bin/env python3
"""Build a tiny random Mixtral (a mixture-of-experts model) with the tiny Llama's
tokenizer, offline, deterministically: vLLM runs external data-parallel load balancing
(one API server per rank) only for MoE models, so the launcher's external layout needs
one to run for real. Gibberish, greedy decoding deterministic. ~10 MB.

Usage: build_tiny_moe.py OUT_DIR TINY_LLAMA_DIR
"""
import os
import shutil
import sys

import torch
from transformers import MixtralConfig, MixtralForCausalLM

out, base = sys.argv[1], sys.argv[2]
os.makedirs(out, exist_ok=True)
for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
    if os.path.exists(os.path.join(base, f)):
        shutil.copy(os.path.join(base, f), out)
torch.manual_seed(4321)
config = MixtralConfig(
    vocab_size=4096,
    hidden_size=256,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_local_experts=4,
    num_experts_per_tok=2,
    max_position_embeddings=2048,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=2,
    torch_dtype="float32",
)
MixtralForCausalLM(config).save_pretrained(out, safe_serialization=True)
