"""What the memory report knows by name: optimizers, breakdown columns, model shapes. No torch import, so
that the command line can list them (``--help``) at once."""
from __future__ import annotations

# Breakdown keys, in the order tables and charts show them.
STATE_KINDS = ("codes", "scales", "full", "other", "ema")
COLUMNS = ("weights", "grads", "state_codes", "state_scales", "state_full", "state_other", "state_ema", "activations", "offloaded")

# Optimizers the report knows: name -> label. Variants of ours are ordinary AdamW8bit options.
OPTIMIZERS = {
    "adamw": "torch AdamW (foreach)",
    "adamw_fused": "torch AdamW (fused)",
    "bnb_8bit": "bitsandbytes AdamW8bit",
    "torchao_8bit": "torchao AdamW8bit",
    "torchao_4bit": "torchao AdamW4bit",
    "lowbit_8bit": "lowbit AdamW8bit",
    "lowbit_4bit": "lowbit AdamW8bit, bits=4",
    "lowbit_8bit_emb32": "lowbit AdamW8bit, fp32 state for embeddings",
    "lowbit_8bit_amsgrad": "lowbit AdamW8bit, amsgrad",
}
DEFAULT_OPTIMIZERS = ("adamw", "bnb_8bit", "torchao_8bit", "lowbit_8bit", "torchao_4bit", "lowbit_4bit")

# Common shapes, as HF config fields (public architecture facts). Any other model: a config.json path.
MODEL_CONFIGS = {
    "gpt2": dict(model_type="gpt2", n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024),
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "llama-3.2-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "llama-2-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False),
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False),
    "llama-3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    "llama-2-13b": dict(model_type="llama", hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                        num_key_value_heads=40, vocab_size=32000, tie_word_embeddings=False),
    "llama-3-70b": dict(model_type="llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}

# Hub ids with the shapes above (base and chat/instruct variants share them). Any name is matched case-insensitively,
# with or without its organisation.
HUB_IDS = {
    "openai-community/gpt2": "gpt2",
    "qwen/qwen2.5-0.5b": "qwen2.5-0.5b", "qwen/qwen2.5-0.5b-instruct": "qwen2.5-0.5b",
    "meta-llama/llama-3.2-1b": "llama-3.2-1b", "meta-llama/llama-3.2-1b-instruct": "llama-3.2-1b",
    "meta-llama/llama-2-7b-hf": "llama-2-7b", "meta-llama/llama-2-7b-chat-hf": "llama-2-7b", "meta-llama/llama-2-7b": "llama-2-7b",
    "mistralai/mistral-7b-v0.1": "mistral-7b", "mistralai/mistral-7b-instruct-v0.1": "mistral-7b",
    "mistralai/mistral-7b-instruct-v0.2": "mistral-7b",
    "meta-llama/meta-llama-3-8b": "llama-3-8b", "meta-llama/meta-llama-3-8b-instruct": "llama-3-8b",
    "meta-llama/llama-3.1-8b": "llama-3-8b", "meta-llama/llama-3.1-8b-instruct": "llama-3-8b",
    "meta-llama/meta-llama-3.1-8b": "llama-3-8b", "meta-llama/meta-llama-3.1-8b-instruct": "llama-3-8b",
    "meta-llama/llama-2-13b-hf": "llama-2-13b", "meta-llama/llama-2-13b-chat-hf": "llama-2-13b",
    "meta-llama/meta-llama-3-70b": "llama-3-70b", "meta-llama/meta-llama-3-70b-instruct": "llama-3-70b",
    "meta-llama/llama-3.1-70b": "llama-3-70b", "meta-llama/llama-3.1-70b-instruct": "llama-3-70b",
    "meta-llama/llama-3.3-70b-instruct": "llama-3-70b",
}


def builtin_name(spec: str) -> str | None:
    """The built-in shape a model name or Hub id stands for ("tinylm" included), or None."""
    key = spec.strip().lower()
    if key == "tinylm" or key in MODEL_CONFIGS:
        return key
    if key in HUB_IDS:
        return HUB_IDS[key]
    bare = key.rsplit("/", 1)[-1]
    if bare in MODEL_CONFIGS:
        return bare
    return next((v for k, v in HUB_IDS.items() if k.rsplit("/", 1)[-1] == bare), None)
