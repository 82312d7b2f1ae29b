#!/usr/bin/env python3
"""Build a weightless Llama-3-8B-shaped model directory for `vllm --load-format dummy`.

Needs only the `tokenizers` package (transformers is used for config.json when present).
The tokenizer is a byte-level BPE trained on this Python's own stdlib sources
(deterministic), then padded with synthetic merges so that its vocabulary is exactly
Llama-3's 128000 regular + 256 special tokens = 128256 = config.vocab_size.

Usage: python3 make_dummy_model.py OUTDIR [--size 8b|1b]
"""

import argparse
import glob
import json
import os
import time

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SIZES = {
    # Llama-3-8B geometry
    "8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
    ),
    # Llama-3.2-1B geometry
    "1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
    ),
}
N_REGULAR, N_SPECIAL = 128000, 256
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def corpus(limit_files=300):
    stdlib = os.path.dirname(os.__file__)
    files = sorted(glob.glob(os.path.join(stdlib, "*.py")))[:limit_files]
    for f in files:
        with open(f, encoding="utf-8", errors="ignore") as fh:
            yield fh.read()


def build_tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=4096, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    d = json.loads(tok.to_str())
    vocab, merges = d["model"]["vocab"], d["model"]["merges"]
    pair_as_list = bool(merges) and isinstance(merges[0], list)
    base = sorted(vocab, key=vocab.get)
    # Pad with synthetic merges (a+b of existing tokens) up to N_REGULAR tokens.
    i = 0
    while len(vocab) < N_REGULAR:
        a = base[i // len(base)]
        b = base[i % len(base)]
        i += 1
        if a + b in vocab:
            continue
        vocab[a + b] = len(vocab)
        merges.append([a, b] if pair_as_list else f"{a} {b}")
    tok = Tokenizer.from_str(json.dumps(d))
    specials = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>",
        "<|finetune_right_pad_id|>",
        "<|reserved_special_token_2|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eom_id|>",
        "<|eot_id|>",
        "<|python_tag|>",
    ]
    specials += [f"<|reserved_special_token_{k}|>" for k in range(3, 3 + N_SPECIAL - len(specials))]
    tok.add_special_tokens(specials)
    assert tok.get_vocab_size(with_added_tokens=True) == N_REGULAR + N_SPECIAL, tok.get_vocab_size()
    assert (
        tok.token_to_id("<|begin_of_text|>") == 128000 and tok.token_to_id("<|eot_id|>") == 128009
    )
    return tok


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--size", default="8b", choices=sorted(SIZES))
    a = ap.parse_args()
    t0 = time.time()
    os.makedirs(a.out, exist_ok=True)
    tok = build_tokenizer()
    tok.save(os.path.join(a.out, "tokenizer.json"))
    with open(os.path.join(a.out, "tokenizer_config.json"), "w") as f:
        json.dump(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<|begin_of_text|>",
                "eos_token": "<|eot_id|>",
                "model_max_length": 8192,
                "clean_up_tokenization_spaces": False,
                "chat_template": CHAT_TEMPLATE,
            },
            f,
            indent=1,
        )
    with open(os.path.join(a.out, "chat_template.jinja"), "w") as f:
        f.write(CHAT_TEMPLATE)
    cfg = dict(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        vocab_size=N_REGULAR + N_SPECIAL,
        hidden_act="silu",
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        bos_token_id=128000,
        eos_token_id=128009,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        initializer_range=0.02,
        use_cache=True,
        torch_dtype="bfloat16",
        **SIZES[a.size],
    )
    try:
        from transformers import LlamaConfig

        c = {
            k: v for k, v in cfg.items() if k not in ("architectures", "model_type", "torch_dtype")
        }
        lc = LlamaConfig(**c, architectures=["LlamaForCausalLM"])
        lc.dtype = "bfloat16"
        lc.save_pretrained(a.out)
    except Exception as e:  # no transformers here (or it refused): write the JSON by hand
        print("config.json written by hand:", repr(e)[:200])
        with open(os.path.join(a.out, "config.json"), "w") as f:
            json.dump(cfg, f, indent=1)
    with open(os.path.join(a.out, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 128000, "eos_token_id": [128001, 128009]}, f)
    try:  # check that transformers (what vLLM uses) loads it and applies the chat template
        from transformers import AutoTokenizer

        ht = AutoTokenizer.from_pretrained(a.out)
        chat = ht.apply_chat_template(
            [{"role": "user", "content": "hello world"}], add_generation_prompt=True, tokenize=False
        )
        print(f"transformers: {type(ht).__name__} len={len(ht)} chat={chat!r}")
    except ImportError:
        pass
    sample = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhello world<|eot_id|>"
    ids = tok.encode(sample).ids
    print(
        f"model dir {a.out} ({a.size}) built in {time.time() - t0:.1f}s; "
        f"vocab={tok.get_vocab_size()} "
        f"sample ids={ids[:12]} roundtrip={tok.decode(ids, skip_special_tokens=False)[:80]!r}"
    )


if __name__ == "__main__":
    main()
