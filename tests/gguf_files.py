"""Write a Hugging Face Llama (or Qwen-MoE) folder as a GGUF file, the way llama.cpp's converter lays one out.

Tests need GGUF files and nothing may be downloaded, so they write their own
from the tiny local models: tensors named by gguf's own name map, q/k rows
permuted as llama.cpp does (transformers' reader undoes it), and the
byte-level BPE vocabulary, merges and special tokens as `tokenizer.ggml.*`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's rotary layout for q and k rows (the inverse of transformers' reverse permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _add_tokenizer(w, tok) -> None:
    """The byte-level BPE vocabulary, merges and special tokens as llama.cpp's `tokenizer.ggml.*` fields."""
    import gguf

    backend = json.loads(tok.backend_tokenizer.to_str())
    vocab = tok.get_vocab()
    tokens = [None] * len(vocab)
    for token, index in vocab.items():
        tokens[index] = token
    special = set(tok.all_special_tokens)
    added = {t["content"] for t in backend["added_tokens"]}
    types = [gguf.TokenType.CONTROL if t in special else gguf.TokenType.USER_DEFINED if t in added
             else gguf.TokenType.NORMAL for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in backend["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_add_bos_token(False)


def write_llama_gguf(hf_folder: Path, out: Path, quantization: str = "F32", architecture: str = "llama") -> Path:
    """`out`, a GGUF file holding the Llama in `hf_folder` (weights as F32, or quantized to Q8_0)."""
    import gguf
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(hf_folder, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(hf_folder)
    cfg = model.config
    assert cfg.model_type == "llama", cfg.model_type
    qtype = {"F32": gguf.GGMLQuantizationType.F32, "Q8_0": gguf.GGMLQuantizationType.Q8_0}[quantization]
    file_type = {"F32": gguf.LlamaFileType.ALL_F32, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quantization]

    w = gguf.GGUFWriter(str(out), architecture)
    w.add_name("tiny test llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(file_type)

    _add_tokenizer(w, tok)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        base, suffix = hf_name.rsplit(".", 1)
        array = tensor.numpy().astype(np.float32)
        if ".self_attn.q_proj" in hf_name:
            array = _permute(array, cfg.num_attention_heads)
        elif ".self_attn.k_proj" in hf_name:
            array = _permute(array, cfg.num_key_value_heads)
        name = f"{names.get_name(base)}.{suffix}"
        # Norm weights stay F32, as in llama.cpp's files; the matrices take the file's type.
        if qtype != gguf.GGMLQuantizationType.F32 and array.ndim == 2 and array.shape[1] % 32 == 0:
            w.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


MOE_ARCHITECTURES = {"qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}


def write_moe_gguf(hf_folder: Path, out: Path) -> Path:
    """`out`, a float32 GGUF file of the Qwen2-MoE or Qwen3-MoE in `hf_folder`, laid out as llama.cpp's converter
    lays one out: each layer's experts as three stacked tensors (ffn_gate_exps, ffn_up_exps [experts, d, d_model],
    ffn_down_exps [experts, d_model, d]), the experts' sizes in the header, q and k as they are (llama.cpp
    permutes only Llama's), a shared expert's gate as one row."""
    import gguf
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(hf_folder, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(hf_folder)
    cfg = model.config
    arch = MOE_ARCHITECTURES[cfg.model_type]
    w = gguf.GGUFWriter(str(out), arch)
    w.add_name(f"tiny test {cfg.model_type}")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    if cfg.model_type == "qwen2_moe":
        w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    w.add_expert_count(cfg.num_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    if getattr(cfg, "head_dim", None):
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    _add_tokenizer(w, tok)

    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), cfg.num_hidden_layers)
    d = cfg.moe_intermediate_size
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        array = tensor.numpy().astype(np.float32)
        block = hf_name.split(".")[2] if hf_name.startswith("model.layers.") else None
        if hf_name.endswith("mlp.experts.gate_up_proj"):
            w.add_tensor(f"blk.{block}.ffn_gate_exps.weight", np.ascontiguousarray(array[:, :d]))
            w.add_tensor(f"blk.{block}.ffn_up_exps.weight", np.ascontiguousarray(array[:, d:]))
        elif hf_name.endswith("mlp.experts.down_proj"):
            w.add_tensor(f"blk.{block}.ffn_down_exps.weight", array)
        elif hf_name.endswith("mlp.shared_expert_gate.weight"):
            w.add_tensor(f"blk.{block}.ffn_gate_inp_shexp.weight", array.reshape(-1))
        else:
            base, suffix = hf_name.rsplit(".", 1)
            w.add_tensor(f"{names.get_name(base)}.{suffix}", array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
