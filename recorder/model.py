"""Loading a gated-MLP model through TransformerLens and reading what the recorder needs from it."""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from gluscope.errors import UserError
from gluscope.schema import ACT_FNS, QUICK_GELU_ALPHA
from gluscope.recorder.gguf import GGUFSource, convert, is_gguf
from gluscope.recorder.experts import ClampedSwiGLU, LayerLayout, layer_layouts
from gluscope.recorder.model_source import model_folder

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _aten(op, **kwargs) -> Callable[..., torch.Tensor]:
    def act(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return op.default(x, **kwargs) if out is None else op.out(x, out=out, **kwargs)
    return act


def _quick_gelu(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    # The operations in the order gpt-oss's experts do them (GptOssExperts._apply_gate), so the values are its own.
    return torch.mul(x, torch.sigmoid(x * QUICK_GELU_ALPHA), out=out)


_FUNCTIONS = {  # gluscope.schema.ACT_FNS's functions, as the HF modules compute them
    "silu": _aten(torch.ops.aten.silu),
    "gelu": _aten(torch.ops.aten.gelu, approximate="none"),
    "gelu_tanh": _aten(torch.ops.aten.gelu, approximate="tanh"),
    "quick_gelu": _quick_gelu,
}


def activation_function(name: str) -> Callable[..., torch.Tensor]:
    """act(x, out=None): the callable a config's activation name stands for; `out` reuses a buffer."""
    if name not in ACT_FNS:
        raise UserError(f"activation {name!r} is not a GLU gate GLUScope knows ({', '.join(ACT_FNS)})")
    return _FUNCTIONS[ACT_FNS[name]]


def activation_name(config, layouts: list[LayerLayout] | None = None) -> str:
    """The activation of the model's gates: its config's, unless its experts compute their own (gpt-oss)."""
    clamped = {layout.clamped for layout in layouts or [] if layout.clamped is not None}
    if clamped:
        return ClampedSwiGLU.ACT_FN
    for attr in ("hidden_activation", "hidden_act", "activation_function"):
        name = getattr(config, attr, None)
        if name:
            return str(name)
    return "silu"


@dataclass
class GatedModel:
    bridge: object              # transformer_lens TransformerBridge
    tokenizer: object
    name: str                   # display name: --name, else the name as given
    revision: str | None
    architecture: str
    act_fn_name: str
    n_layers: int
    d_model: int
    d_mlp: int
    vocab_size: int
    dtype: torch.dtype
    device: torch.device
    source: str = ""            # the hub name, folder or GGUF file as given
    gguf: GGUFSource | None = None  # set when the weights came from a GGUF file
    # Mixture-of-experts models: every layer's experts (experts.py); None for a dense model. d_mlp is then the
    # largest layer's neuron count.
    layouts: list[LayerLayout] | None = None

    def layer_width(self, layer: int) -> int:
        """The layer's neurons: d_mlp, or its experts' neurons together."""
        return self.d_mlp if self.layouts is None else self.layouts[layer].n_neurons

    @property
    def weight_convention_applies(self) -> bool:
        """Whether negating a neuron's w_in and w_out leaves the model's function unchanged (the paper's
        refactor_glu): not where x_in is clamped and shifted (gpt-oss, experts.ClampedSwiGLU)."""
        return not any(layout.clamped is not None for layout in self.layouts or [])

    @property
    def act_fn(self) -> Callable[..., torch.Tensor]:
        return activation_function(self.act_fn_name)

    def embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_E [vocab, d_model], W_U [d_model, vocab]) in float32, cut to the tokenizer's vocabulary
        (models pad their embedding matrices; those rows are no tokens)."""
        vocab = self.token_count()
        W_E = self.bridge.embed.W_E.detach()[:vocab].float()
        W_U = self.bridge.unembed.W_U.detach()[:, :vocab].float()
        return W_E, W_U

    def token_count(self) -> int:
        """Tokens with an embedding row: the tokenizer's vocabulary, cut to the embedding matrix."""
        return min(len(self.tokenizer), self.bridge.embed.W_E.shape[0])

    def mlp_input_gain(self, layer: int) -> torch.Tensor:
        """[d_model] float32 on the CPU: the per-dimension gain g of the norm in front of the layer's MLP.

        The MLP reads g * (normalised residual), so a neuron's gate reads the
        residual direction g * w_gate. TransformerBridge names that norm `ln2`
        (Gemma-2's pre_feedforward_layernorm; OLMo-2 has none and OLMo's has
        no weights: a gain of ones) and keeps its weights unfolded. The gain
        is measured, not read off a weight: Gemma's norms multiply by
        1 + weight, Llama's by weight, and the module knows which. Two inputs
        x and -x of mean zero and RMS 1000 (eps negligible) normalise to +-s,
        s the signs of x; half their outputs' difference is g * s, a bias
        cancelling out.
        """
        norm = getattr(self.bridge.blocks[layer], "ln2", None)
        module = getattr(norm, "original_component", None)
        if module is None:
            return torch.ones(self.d_model)
        signs = torch.ones(self.d_model)
        signs[1::2] = -1.0
        probe = torch.stack([signs, -signs]) * 1000.0
        with torch.no_grad():
            out = module(probe.to(device=self.device, dtype=self.dtype)).float().cpu()
        return (out[0] - out[1]) / (2 * signs)

    @contextmanager
    def native_attention(self):
        """Run attention through the Hugging Face module itself while recording.

        The bridge reimplements attention eagerly so that its attention hooks
        can fire; the recorder reads only MLP hooks, and the HF module (sdpa)
        computes the same function. Measured: the bridge's attention was
        about a sixth of the recording time at 512 tokens on the CPU.

        This depends on TransformerBridge internals (transformer_lens 4.x):
        each block's `attn` wraps the HF module as `original_component`; the
        block calls `attn` with the HF module's own arguments and takes its
        return value; nn.Module.__call__ finds an instance attribute `forward`
        before the class's. tests/test_reducer_interface.py fails if any of
        that changes (the values differ, or the bridge's hook_pattern fires).
        """
        patched = []
        for block in self.bridge.blocks:
            attn = getattr(block, "attn", None)
            original = getattr(attn, "original_component", None)
            if original is None:
                continue
            # An instance attribute shadows the bridge's method; set through
            # __dict__ because bridge components forward attribute writes.
            attn.__dict__["forward"] = original.forward
            patched.append(attn)
        try:
            yield
        finally:
            for attn in patched:
                attn.__dict__.pop("forward", None)

    def mlp_weights(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(w_gate, w_in, w_out) of a layer, each [neurons, d_model], float32, one row per neuron."""
        if self.layouts is not None:
            return self.layouts[layer].weights()
        mlp = self.bridge.blocks[layer].mlp
        return mlp.W_gate.detach().T.float(), mlp.W_in.detach().T.float(), mlp.W_out.detach().float()


def _first_line(e: BaseException, limit: int = 200) -> str:
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return text if len(text) <= limit else text[:limit] + "…"


def weight_count(folder: Path) -> int:
    """The number of weights in a saved model's safetensors files, read from their headers alone."""
    total = 0
    for f in sorted(folder.glob("*.safetensors")):
        with f.open("rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(size))
        for key, tensor in header.items():
            if key != "__metadata__":
                n = 1
                for dim in tensor["shape"]:
                    n *= dim
                total += n
    return total


def refuse_if_too_large(name: str, folder: Path, dtype: torch.dtype, device_bytes: int) -> None:
    """Say so before loading when the weights alone cannot fit on the GPU: the recorder holds a whole
    model on one device (no device map), and an out-of-memory traceback halfway through helps nobody."""
    need = weight_count(folder) * torch.empty(0, dtype=dtype).element_size()
    if need > device_bytes:
        raise UserError(f"--model {name}: its weights need {need / 2**30:.1f} GiB in {str(dtype).removeprefix('torch.')}, "
                        f"more than the GPU's {device_bytes / 2**30:.1f} GiB; GLUScope records a model on one GPU "
                        "(several GPUs each hold a whole model and record a shard): use a GPU with more memory")


def resolve_model_source(name: str) -> tuple[str, GGUFSource | None]:
    """What `from_pretrained` should load for `name`: a hub name as given, a local folder as an
    absolute path (so transformers never mistakes it for a hub id), or a GGUF file's converted folder."""
    if is_gguf(name):
        folder = convert(Path(name))
        return str(folder), GGUFSource.read(folder)
    folder = model_folder(name)
    return (str(folder), None) if folder is not None else (name, None)


def load_model(name: str, device: str | None = None, dtype: str = "float32", revision: str | None = None,
               hf_model=None, display_name: str | None = None) -> GatedModel:
    """Boot `name` (hub name, local folder or GGUF file) through TransformerBridge and check it has gated MLPs.

    `hf_model` wraps a model already in memory (benchmarks build random ones from a config).
    `display_name` titles the pages (default: `name`).
    """
    from transformer_lens.model_bridge import TransformerBridge  # heavy: import on use

    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        torch_device = torch.device(device)
        if torch_device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device {device}: no CUDA device is available here (use --device cpu)")
    except RuntimeError as e:
        raise UserError(f"--device {device!r} is not a device torch knows ({e})") from None
    target, gguf = resolve_model_source(name)
    if torch_device.type == "cuda" and hf_model is None and Path(target).is_dir():
        index = torch_device.index if torch_device.index is not None else torch.cuda.current_device()
        refuse_if_too_large(name, Path(target), DTYPES[dtype], torch.cuda.get_device_properties(index).total_memory)

    for noisy in ("transformers", "huggingface_hub"):  # their retries print before our one-line error
        logging.getLogger(noisy).setLevel(logging.ERROR)
    kwargs = {"device": device, "dtype": DTYPES[dtype]}
    if revision:
        kwargs["revision"] = revision
    if hf_model is not None:
        kwargs["hf_model"] = hf_model
    try:
        bridge = TransformerBridge.boot_transformers(target, **kwargs)
    except UserError:
        raise
    except OSError as e:
        raise UserError(f"--model {name}: cannot load it ({_first_line(e)})") from None
    except (ValueError, KeyError, NotImplementedError) as e:
        raise UserError(f"--model {name}: TransformerLens cannot load this model ({_first_line(e)})") from None

    # The bridge's MoE hooks carry the block's input and output, not any expert's neurons: read the modules.
    layouts = layer_layouts(bridge.original_model, name)
    hooks = bridge.hook_dict
    if layouts is None and ("blocks.0.mlp.hook_pre_linear" not in hooks or "blocks.0.mlp.hook_pre" not in hooks):
        arch = type(bridge.original_model).__name__
        raise UserError(
            f"--model {name} ({arch}) has no gated MLP (no blocks.0.mlp.hook_pre_linear): "
            "GLUScope needs a SwiGLU/GEGLU model such as Llama, OLMo, Mistral, Qwen2, Gemma or Phi-3"
        )
    hf = bridge.original_model
    config = hf.config
    # The bridge forces eager attention; sdpa computes the same function faster
    # and the MLP hooks we record do not depend on it.
    try:
        hf.set_attn_implementation("sdpa")
    except Exception:  # noqa: BLE001 - an architecture without sdpa keeps eager
        pass
    bridge.eval()
    tokenizer = bridge.tokenizer
    return GatedModel(
        bridge=bridge,
        tokenizer=tokenizer,
        name=display_name or name,
        revision=revision or getattr(config, "_commit_hash", None),
        architecture=(config.architectures or [type(hf).__name__])[0],
        act_fn_name=activation_name(config, layouts),
        n_layers=int(bridge.cfg.n_layers),
        d_model=int(bridge.cfg.d_model),
        d_mlp=int(bridge.cfg.d_mlp) if layouts is None else max(layout.n_neurons for layout in layouts),
        vocab_size=int(bridge.cfg.d_vocab),
        dtype=DTYPES[dtype],
        device=torch_device,
        source=name,
        gguf=gguf,
        layouts=layouts,
    )
