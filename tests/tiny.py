"""A tiny, config-built causal LM (Llama, 2 layers, hidden 64) with a real BPE tokenizer.

Built in about a second, no downloads: the tokenizer is trained on the packaged drug reviews
(falling back to a built-in text) and carries a ChatML chat template like SmolLM2's. Other
decoder families (``FAMILIES``: Mistral, Qwen2, Phi-3, Gemma-2) come in the same shape with the
same tokenizer, each keeping what sets its architecture apart (see ``FAMILIES``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_FALLBACK = (
    "This drug worked well for my pain and I feel great. Terrible side effects, "
    "I felt sick and anxious. It was okay, nothing special. positive neutral negative "
    "user assistant system Review Is the sentiment of this drug review?"
)


def _corpus() -> list[str]:
    try:
        from fedlora.data.drugreview import load_split

        return [r.text for r in load_split("train")]
    except Exception:  # noqa: BLE001 -- the tokenizer only needs some text
        return [_FALLBACK] * 50


# family -> (transformers config class, what its tiny model keeps of the family's real shape)
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", {"tie_word_embeddings": True}),  # SmolLM2: tied head
    # Mistral: untied head; a sliding window (Mistral-7B-v0.1 has 4096) short enough to bind
    # on a chat prompt
    "mistral": ("MistralConfig", {"tie_word_embeddings": False, "sliding_window": 32}),
    # Qwen2: q/k/v biases (always on in Qwen2), tied head (as Qwen2.5-0.5B)
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": True}),
    # Phi-3: fused qkv_proj and gate_up_proj layers, untied head
    "phi3": ("Phi3Config", {"tie_word_embeddings": False}),
    # Gemma-2: head_dim (32) != hidden / heads (16), GELU-tanh MLP, attention and final logit
    # soft-capping, alternating sliding-window (32 tokens: it binds) / full layers, embeddings
    # scaled by sqrt(hidden)
    "gemma2": (
        "Gemma2Config",
        {
            "tie_word_embeddings": True,
            "head_dim": 32,
            "query_pre_attn_scalar": 32,
            "sliding_window": 32,
        },
    ),
}


def make_tiny_model(
    out: Path,
    vocab_size: int = 512,
    seed: int = 0,
    family: str = "llama",
    **overrides: Any,
) -> Path:
    """Write a tiny ``family`` model (see ``FAMILIES``; Llama by default) + tokenizer to ``out``
    and return it. ``overrides`` are extra config fields (e.g. ``sliding_window=16``)."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    if family not in FAMILIES:
        raise ValueError(f"family={family!r}: use one of {', '.join(FAMILIES)}")
    config_class, family_fields = FAMILIES[family]

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([*_corpus(), _FALLBACK], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        bos_token="<|im_start|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = getattr(transformers, config_class)(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|im_start|>"),
        eos_token_id=eos,
        pad_token_id=eos,
        **(family_fields | overrides),
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = eos
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
