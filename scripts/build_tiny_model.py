#!/usr/bin/env python3
"""Build a tiny random Llama plus a byte-level BPE tokenizer, offline, deterministically.

The output is gibberish but greedy decoding is deterministic, which is all the
end-to-end equality checks need (PD output == colocated output). ~13 MB, ~7 s.

Usage: build_tiny_model.py OUT_DIR
"""
import glob
import os
import sys
import sysconfig

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

out = sys.argv[1]
os.makedirs(out, exist_ok=True)

# Tokenizer: 4096-token byte-level BPE trained on the stdlib's own sources (always present).
stdlib = sysconfig.get_paths()["stdlib"]
files = sorted(glob.glob(os.path.join(stdlib, "*.py")))[:200]
tok = Tokenizer(models.BPE(unk_token=None))
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
specials = ["<s>", "</s>", "<pad>"]
trainer = trainers.BpeTrainer(
    vocab_size=4096,
    special_tokens=specials,
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
)
tok.train(files, trainer)
chat_template = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
fast = PreTrainedTokenizerFast(
    tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
)
fast.chat_template = chat_template
fast.save_pretrained(out)

torch.manual_seed(1234)
config = LlamaConfig(
    vocab_size=tok.get_vocab_size(),
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    bos_token_id=tok.token_to_id("<s>"),
    eos_token_id=tok.token_to_id("</s>"),
    pad_token_id=tok.token_to_id("<pad>"),
    torch_dtype="float32",
)
model = LlamaForCausalLM(config)
model.save_pretrained(out, safe_serialization=True)
print(f"tiny model written to {out}")
