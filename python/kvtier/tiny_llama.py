"""A small Llama with random weights and a locally trained tokenizer, for the vLLM tests,
the demo and the benches.

No model hub: the weights are drawn from N(0, 0.1) with a fixed seed (so logits are not
flat and runs are repeatable) and the byte-level BPE tokenizer is trained on generated
text. `python -m kvtier.tiny_llama DIR [LAYERS KV_HEADS HEAD_DIM HEADS]` writes the model
folder.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

# Bytes of KV per token = 2 x layers x kv_heads x head_dim x 4 (fp32) = 8 KiB.
LAYERS = 4
KV_HEADS = 2
HEAD_DIM = 64
HEADS = 4
VOCAB = 2048

WORDS = (
    "cache prefill decode token chunk layer block tensor memory disk store load "
    "transfer engine request prompt proxy server model attention key value head "
    "tier remote local hash prefix sequence batch stream latency throughput"
).split()


def corpus(n_lines: int = 4000, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) + str(rng.randrange(100)) for _ in range(12)) for _ in range(n_lines)]


def kv_bytes_per_token(layers: int = LAYERS, kv_heads: int = KV_HEADS, head_dim: int = HEAD_DIM) -> int:
    """KV bytes per token of such a model in fp32."""
    return 2 * layers * kv_heads * head_dim * 4


def make(folder: Path, layers: int = LAYERS, kv_heads: int = KV_HEADS, head_dim: int = HEAD_DIM,
         heads: int = HEADS) -> Path:
    """Writes the model (safetensors + config + tokenizer) into `folder`; idempotent.
    `head_dim` must be one vLLM's CPU attention supports (32, 64, 80, 96, 112, 128, ...)."""
    folder = Path(folder)
    if (folder / "config.json").exists() and (folder / "tokenizer.json").exists():
        return folder
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(folder)

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=heads * head_dim,
        intermediate_size=2 * heads * head_dim,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=8192,
        bos_token_id=0,
        eos_token_id=1,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


if __name__ == "__main__":
    sizes = [int(a) for a in sys.argv[2:6]]
    print(make(Path(sys.argv[1]), *sizes))
