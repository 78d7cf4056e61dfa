"""Tiny gated-MLP models built locally from a config, with a BPE tokenizer trained on the spot.

Nothing here downloads anything: the tests and benchmarks/bench_recorder.py use these to
exercise the exact code path a hub model takes (a folder with config,
weights and tokenizer, loaded through TransformerLens).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|pad|>"]

# Per architecture: config class and the keyword arguments that make it tiny
# but keep every structural feature (GQA, GEGLU, fused gate/up, ...).
ARCHITECTURES: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", {"num_key_value_heads": 2}),
    "olmo": ("OlmoConfig", {}),
    "olmo2": ("Olmo2Config", {}),
    "mistral": ("MistralConfig", {"num_key_value_heads": 2, "sliding_window": None}),
    "qwen2": ("Qwen2Config", {"num_key_value_heads": 2}),
    "gemma": ("GemmaConfig", {"head_dim": 16, "num_key_value_heads": 1, "hidden_activation": "gelu_pytorch_tanh"}),
    "gemma2": ("Gemma2Config", {"head_dim": 16, "num_key_value_heads": 2, "hidden_activation": "gelu_pytorch_tanh"}),
    "phi3": ("Phi3Config", {"num_key_value_heads": 4, "pad_token_id": 2}),
    "gpt2": ("GPT2Config", {}),  # not gated: for the error path
    # Mixture-of-experts: every expert a gated MLP of d_mlp neurons (experts' intermediate size).
    "olmoe": ("OlmoeConfig", {"num_experts": 6, "num_experts_per_tok": 2}),
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2, "num_key_value_heads": 2}),
    # A gated shared expert beside the routed ones, of another width.
    "qwen2_moe": ("Qwen2MoeConfig", {"num_experts": 6, "num_experts_per_tok": 2, "num_key_value_heads": 2,
                                     "shared_expert_intermediate_size": 40, "norm_topk_prob": False}),
    "qwen3_moe": ("Qwen3MoeConfig", {"num_experts": 6, "num_experts_per_tok": 2, "num_key_value_heads": 2,
                                     "head_dim": 16, "norm_topk_prob": True}),
    # DeepSeek-V3's layout: a dense first layer, sigmoid routing within groups, a scaling factor, shared experts.
    "deepseek_v3": ("DeepseekV3Config", {"n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 2,
                                         "topk_group": 1, "n_shared_experts": 1, "first_k_dense_replace": 1,
                                         "routed_scaling_factor": 2.5, "num_key_value_heads": 4,
                                         "q_lora_rank": 32, "kv_lora_rank": 16, "qk_rope_head_dim": 8,
                                         "qk_nope_head_dim": 8, "v_head_dim": 16, "rope_scaling": None}),
    # gpt-oss: its experts' clamped SwiGLU with biases, gate and up interleaved; a low clamp so that it bites.
    "gpt_oss": ("GptOssConfig", {"num_local_experts": 4, "num_experts_per_tok": 2, "num_key_value_heads": 2,
                                 "head_dim": 16, "swiglu_limit": 1.2}),
    # GraniteMoe: experts in block_sparse_moe, in tensors of another layout; refused.
    "granitemoe": ("GraniteMoeConfig", {"num_local_experts": 4, "num_experts_per_tok": 2, "num_key_value_heads": 2}),
}
MOE_ARCHITECTURES = ("olmoe", "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "gpt_oss")


def train_tokenizer(texts: Iterable[str], vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts`, with BOS/EOS/PAD tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>"
    )


def make_config(arch: str, vocab_size: int, d_model: int = 64, d_mlp: int = 96, n_layers: int = 2,
                n_heads: int = 4, max_positions: int = 1024) -> transformers.PretrainedConfig:
    """A small config of the named architecture (see ARCHITECTURES)."""
    class_name, extra = ARCHITECTURES[arch]
    cls = getattr(transformers, class_name)
    if arch == "gpt2":
        config = cls(vocab_size=vocab_size, n_embd=d_model, n_inner=d_mlp, n_layer=n_layers, n_head=n_heads,
                     n_positions=max_positions, bos_token_id=0, eos_token_id=1)
    else:
        sizes = {"intermediate_size": d_mlp}
        if arch in ("qwen2_moe", "qwen3_moe", "deepseek_v3"):  # the experts' size; the dense layers' differs
            sizes = {"intermediate_size": d_mlp + 16, "moe_intermediate_size": d_mlp}
        config = cls(
            vocab_size=vocab_size,
            hidden_size=d_model,
            **sizes,
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            max_position_embeddings=max_positions,
            bos_token_id=0,
            eos_token_id=1,
            **{"pad_token_id": 2, **extra},
        )
    # save_pretrained of a model writes this; a config saved alone needs it to be recognised.
    config.architectures = [transformers.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
    return config


def save_tiny_model(out_dir: Path, arch: str, texts: list[str], *, vocab_size: int = 384, seed: int = 0,
                    init_std: float | None = None, extra_tokens: tuple[str, ...] = (), **config_kwargs) -> Path:
    """Write config, random weights and a freshly trained tokenizer to `out_dir`; return it.

    `init_std` widens the initialisation so that activations of a random model
    spread over all four quadrants instead of hugging zero. `extra_tokens`
    become whole tokens (tests plant `<script>` this way).
    """
    out_dir = Path(out_dir)
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    if extra_tokens:
        tokenizer.add_tokens(list(extra_tokens))
    config = make_config(arch, len(tokenizer), **config_kwargs)
    if init_std is not None:
        config.initializer_range = init_std
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    if arch == "gpt_oss":  # its biases start at zero: random ones, so that a reading that forgets them is wrong
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("bias"):
                    param.normal_(0.0, config.initializer_range)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
