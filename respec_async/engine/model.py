"""The target model: a Llama / Qwen2 decoder in plain PyTorch, and its static KV cache.

    x = embed(ids)
    for each layer:  x = x + attn(rms(x));  x = x + mlp(rms(x))       (SwiGLU mlp, RoPE, GQA)
    logits = lm_head(rms(x))                                          (float32)

One forward serves training (cache=None: causal attention over the given tokens, autograd
friendly) and inference (cache given: every layer writes K/V of token t of row b at index
cache_positions[b, t] of slot slots[b], then each query attends over that slot's indices
[0, S) under attn_mask [B, T, S]). Prefill, decode, chained-draft and tree verification differ
only in the positions, cache_positions and mask the caller passes. Module and parameter names
follow Hugging Face (without the `model.` prefix), so `checkpoint.py` maps names 1:1.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from respec_async.engine import fused

MODEL_TYPES = ("llama", "qwen2", "qwen3")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int | None = None  # None -> hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v bias (and o_proj bias for llama); qwen2 always has q/k/v bias
    model_type: str = "llama"  # "llama" | "qwen2" | "qwen3" (qwen3: RMSNorm of each head's q and k)
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    rope_scaling: dict | None = field(default=None)  # HF rope_scaling: None, "linear" or "llama3"

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type {self.model_type!r} is not supported (supported: {MODEL_TYPES})")
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.model_type == "qwen2":
            self.attention_bias = True
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        rope_type = rope_scaling_type(self.rope_scaling)
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_scaling type {rope_type!r} is not supported (supported: {ROPE_TYPES})")
        # A private copy without rope_theta (transformers 5 puts it in there, and mutates dicts it is given).
        self.rope_scaling = None if rope_type == "default" else {
            key: value for key, value in self.rope_scaling.items() if key != "rope_theta"}

    @classmethod
    def from_hf_dict(cls, d: dict) -> "ModelConfig":
        """A ModelConfig from a Hugging Face config.json dict (transformers 4.x or 5.x layout)."""
        model_type = d.get("model_type", "llama")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"model_type {model_type!r} is not supported (supported: {MODEL_TYPES})")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {d['hidden_act']!r} is not supported (only 'silu')")
        if d.get("mlp_bias"):
            raise ValueError("mlp_bias=true is not supported")
        if d.get("use_sliding_window"):
            raise ValueError("use_sliding_window=true is not supported (full attention only)")
        # transformers 5 folds rope_theta and the scaling into rope_parameters; __post_init__
        # drops the theta from the scaling dict and rejects scaling types we do not implement.
        rope = d.get("rope_scaling") or d.get("rope_parameters") or {}
        rope_theta = d.get("rope_theta") or rope.get("rope_theta") or 10000.0

        def first(token_id):  # Llama 3 lists several eos ids; the first is the canonical one
            return token_id[0] if isinstance(token_id, list) else token_id

        return cls(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"], num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
            head_dim=d.get("head_dim"), rms_norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=float(rope_theta),
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=model_type == "qwen2" or bool(d.get("attention_bias", False)),
            model_type=model_type, bos_token_id=first(d.get("bos_token_id")),
            eos_token_id=first(d.get("eos_token_id")), pad_token_id=first(d.get("pad_token_id")),
            rope_scaling=dict(rope) or None)

    def to_hf_dict(self) -> dict:
        """config.json contents that transformers' AutoConfig reads back as this model."""
        d = {
            "architectures": [ARCHITECTURES[self.model_type]],
            "model_type": self.model_type, "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim, "hidden_act": "silu", "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta, "rope_scaling": self.rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id, "pad_token_id": self.pad_token_id,
        }
        if self.model_type != "qwen2":  # qwen2's q/k/v bias is implied by its type
            d["attention_bias"] = self.attention_bias
        if self.model_type == "llama":
            d["mlp_bias"] = False
        else:
            d["use_sliding_window"] = False
        return d

    @property
    def qk_norm(self) -> bool:
        """Qwen3: each head's q and k go through an RMSNorm (over head_dim) before RoPE."""
        return self.model_type == "qwen3"


def rope_scaling_type(rope_scaling: dict | None) -> str:
    if not rope_scaling:
        return "default"
    return rope_scaling.get("rope_type", rope_scaling.get("type", "default"))


def eagle3_feature_layers(num_layers: int) -> tuple[int, int, int]:
    """Decoder layers whose outputs EAGLE-3 fuses (low, mid, high): 1, L//2-1, L-4, clamped into
    [0, L-1] for tiny models."""
    return tuple(min(max(i, 0), num_layers - 1) for i in (1, num_layers // 2 - 1, num_layers - 4))


class KVCache:
    """Static, preallocated. k, v: [num_layers, num_slots, num_kv_heads, max_seq_len, head_dim].

    Size: 2 * num_hidden_layers * num_slots * num_key_value_heads * max_seq_len * head_dim
    * dtype size bytes. Entries past what a slot has written hold stale values; masks keep them out.
    """

    def __init__(self, config: ModelConfig, num_slots: int, max_seq_len: int, dtype=torch.float32, device="cpu"):
        shape = (config.num_hidden_layers, num_slots, config.num_key_value_heads, max_seq_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def num_bytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    @staticmethod
    def bytes_for(config: ModelConfig, num_slots: int, max_seq_len: int, dtype=torch.float32) -> int:
        element_size = torch.empty((), dtype=dtype).element_size()
        return (2 * config.num_hidden_layers * num_slots * config.num_key_value_heads * max_seq_len
                * config.head_dim * element_size)


@dataclass
class ModelOutput:
    logits: Tensor  # [B, T, V] (or [B, K, V] at logits_positions), float32
    hidden: list[Tensor]  # outputs of the requested decoder layers, [B, T, H] each, in requested order


def rope_inv_freq(config: ModelConfig, device) -> Tensor:
    """Inverse frequencies [head_dim / 2], float32, with Hugging Face's rope_scaling variants."""
    dim = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.int64).float() / dim)
    scaling = config.rope_scaling or {}
    rope_type = rope_scaling_type(scaling)
    if rope_type == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif rope_type == "llama3":
        # Llama 3.1: long wavelengths slowed by `factor`, short ones kept, a smooth ramp between.
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        is_medium = (wavelen <= old_len / low) & (wavelen >= old_len / high)
        inv_freq = torch.where(is_medium, smoothed, inv_freq)
    return inv_freq


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


# The batch size oneDNN lays the packed weight out for; its output does not depend on it.
_PREPACK_BATCH_HINT = 16


@functools.cache
def _prepack_ops():
    """torch's oneDNN linear on a prepacked weight (the ops inductor's CPU fusion uses), or None
    where this torch build lacks them or this CPU cannot run them in bf16 (oneDNN's bf16 reorder
    needs AVX512 BW/VL/DQ or AVX-NE-CONVERT): tried once on a small weight."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        reorder, linear = torch.ops.mkldnn._reorder_linear_weight, torch.ops.mkldnn._linear_pointwise
        weight = torch.zeros(16, 16, dtype=torch.bfloat16)
        linear(torch.zeros(2, 16, dtype=torch.bfloat16), reorder(weight, _PREPACK_BATCH_HINT), None, "none", [], "")
    except (AttributeError, RuntimeError):
        return None
    return reorder, linear


def prepack_available() -> bool:
    """Whether this torch build and this CPU run the oneDNN ops Linear.prepack uses."""
    return _prepack_ops() is not None


def can_prepack(weight: Tensor) -> bool:
    """Whether Linear.prepack applies to a weight like this one (bfloat16, on a CPU that runs oneDNN's
    packed bf16 linear)."""
    return weight.dtype == torch.bfloat16 and weight.device.type == "cpu" and prepack_available()


class Linear(nn.Linear):
    """nn.Linear, with two bfloat16 CPU inference paths (under no-grad):
    - one row goes through torch.mv: torch's bf16 GEMM runs a single row at a fraction of
      memory bandwidth (a decode step at B = 1 is its weight reads), torch.mv ~1.4x faster with
      the same float32 accumulation;
    - with `prepack` (the Engine sets it), more rows go through a copy of the weight in oneDNN's
      blocked layout: F.linear hands oneDNN the weight as it is, and oneDNN reorders all of it
      on every call (a decode step's matmuls cost 1.3-1.6x more that way at 2-64 rows; the
      outputs are bit-identical). The copy is cached on the module and rebuilt when the weight changes
      (fused.cached), so it doubles the weight memory."""

    prepack: bool = False

    def forward(self, x: Tensor) -> Tensor:
        if (x.dtype == torch.bfloat16 and self.weight.dtype == torch.bfloat16 and x.device.type == "cpu"
                and not torch.is_grad_enabled()):
            if x.numel() == x.shape[-1]:
                out = torch.mv(self.weight, x.reshape(-1))
                if self.bias is not None:
                    out = out + self.bias
                return out.view(*x.shape[:-1], -1)
            if self.prepack and (ops := _prepack_ops()) is not None:
                reorder, linear = ops
                packed = fused.cached(self, lambda: (self.weight,),
                                      lambda: reorder(self.weight, _PREPACK_BATCH_HINT))
                return linear(x, packed, self.bias, "none", [], "")
        return super().forward(x)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)  # the same math, one op
        x_float = x.float()
        x_float = x_float * torch.rsqrt(x_float.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x_float.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.config = config
        self.layer_index = layer_index
        heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.q_proj = Linear(config.hidden_size, heads * head_dim, bias=config.attention_bias)
        self.k_proj = Linear(config.hidden_size, kv_heads * head_dim, bias=config.attention_bias)
        self.v_proj = Linear(config.hidden_size, kv_heads * head_dim, bias=config.attention_bias)
        # Llama's attention_bias covers o_proj too; Qwen2's and Qwen3's q/k/v bias do not.
        self.o_proj = Linear(heads * head_dim, config.hidden_size,
                             bias=config.attention_bias and config.model_type == "llama")
        self.enable_gqa = kv_heads != heads
        if config.qk_norm:
            self.q_norm = RMSNorm(head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(head_dim, config.rms_norm_eps)

    def forward(self, x, cos, sin, cache, slots, cache_positions, attn_mask, empty_rows=None, rows=None):
        batch_size, seq_len, _ = x.shape
        head_dim = self.config.head_dim
        q = self.q_proj(x).view(batch_size, seq_len, -1, head_dim)
        k = self.k_proj(x).view(batch_size, seq_len, -1, head_dim)
        if self.config.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(x).view(batch_size, seq_len, -1, head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = fused.write_and_read_cache(cache, self.layer_index, k.transpose(1, 2), v.transpose(1, 2), slots,
                                              rows, cache_positions, attn_mask.shape[-1])
            k, v = k.to(q.dtype), v.to(q.dtype)
        mask = None if attn_mask is None else attn_mask[:, None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=attn_mask is None,
                                             enable_gqa=self.enable_gqa)
        if empty_rows is not None:
            # A query row that may attend to nothing (padding) gives zeros, never NaN, on every backend.
            out = out.masked_fill(empty_rows[:, None, :, None], 0.0)
        return self.o_proj(out.transpose(1, 2).reshape(batch_size, seq_len, -1))


class MLP(nn.Module):
    """The SwiGLU feed-forward block of the target's layers and of the EAGLE-3 drafter's."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.self_attn = Attention(config, layer_index)
        self.mlp = MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, cache, slots, cache_positions, attn_mask, empty_rows=None, rows=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, slots, cache_positions, attn_mask,
                               empty_rows, rows)
        return x + self.mlp(self.post_attention_layernorm(x))

    def fused_sources(self) -> tuple[Tensor, ...]:
        attn, mlp = self.self_attn, self.mlp
        tensors = (self.input_layernorm.weight, self.post_attention_layernorm.weight, attn.q_proj.weight,
                   attn.k_proj.weight, attn.v_proj.weight, attn.o_proj.weight, mlp.gate_proj.weight,
                   mlp.up_proj.weight, mlp.down_proj.weight)
        biases = (attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias, attn.o_proj.bias)
        norms = (attn.q_norm.weight, attn.k_norm.weight) if attn.config.qk_norm else ()
        return tensors + tuple(bias for bias in biases if bias is not None) + norms

    def fused_weights(self) -> tuple[fused.AttentionWeights, fused.MLPWeights]:
        config = self.self_attn.config
        return (fused.attention_weights(self.self_attn, self.input_layernorm.weight, config.num_attention_heads,
                                        config.num_key_value_heads, config.head_dim),
                fused.mlp_weights(self.mlp, self.post_attention_layernorm.weight))

    def forward_fused(self, weights, x: Tensor, batch_size: int, seq_len: int, cos, sin, cache, slots, rows,
                      cache_positions, attn_mask, num_keys, empty_rows, packed=None) -> Tensor:
        """forward() on x [B*T, H] through fused.py with this layer's fused_weights() (inference only)."""
        attn_weights, mlp_weights = weights
        eps = self.input_layernorm.eps
        out = fused.attention(attn_weights, fused.rms_scale(x, eps), batch_size, seq_len, cos, sin, cache,
                              self.self_attn.layer_index, slots, rows, cache_positions, attn_mask, num_keys,
                              empty_rows, packed)
        x = fused.residual_linear(x, out, attn_weights.o, attn_weights.o_bias)
        return fused.mlp(mlp_weights, x, self.post_attention_layernorm.eps)


class Transformer(nn.Module):
    # Inference (no grad, float32) through fused.py: fewer ops, a second copy of the weights.
    # Off by default; the engine turns it on for small float32 models on CPU.
    fused_inference: bool = False

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # cos/sin per position, float32, built once and grown on demand (computing them per
        # forward is a dozen small ops, a real share of a CPU decode step). A plain attribute,
        # not a buffer, so .to(bfloat16) cannot round the angles.
        self.rope_table = torch.empty(0)

    def rope(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos, sin [B, 1, T, head_dim] in dtype (rotate-half layout; angles position * inv_freq
        in float32, read from the table)."""
        num_positions = int(positions.max()) + 1
        table = self.rope_table
        # A table built under inference_mode cannot enter autograd: rebuild it for training.
        if (table.dim() != 3 or table.shape[1] < num_positions or table.device != positions.device
                or (table.is_inference() and not torch.is_inference_mode_enabled())):
            size = max(num_positions, 2 * table.shape[1] if table.dim() == 3 else 0,
                       self.config.max_position_embeddings)
            angles = (torch.arange(size, device=positions.device, dtype=torch.float32)[:, None]
                      * rope_inv_freq(self.config, positions.device))
            angles = torch.cat([angles, angles], dim=-1)
            self.rope_table = table = torch.stack([angles.cos(), angles.sin()])
        cos, sin = table[:, positions].unsqueeze(2).to(dtype).unbind(0)
        return cos, sin

    def fused_weights(self):
        """(each layer's fused_weights(), the lm_head with the final norm folded in), rebuilt when
        a parameter changes (fused.cached: one check per forward)."""
        def sources():
            return sum((layer.fused_sources() for layer in self.layers), (self.norm.weight, self.lm_head.weight))

        return fused.cached(self, sources, lambda: (
            [layer.fused_weights() for layer in self.layers],
            (self.lm_head.weight * self.norm.weight).t().contiguous()))

    def use_fused(self) -> bool:
        weight = self.embed_tokens.weight
        return (self.fused_inference and not torch.is_grad_enabled() and weight.dtype == torch.float32
                and not weight.is_inference())

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # Hugging Face's initialisation (normal, std 0.02), so a fresh tiny model starts sane.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def forward(self, input_ids: Tensor, positions: Tensor | None = None, cache: KVCache | None = None,
                slots: Tensor | None = None, cache_positions: Tensor | None = None,
                attn_mask: Tensor | None = None, hidden_layers: Sequence[int] = (),
                logits_positions: Tensor | None = None, num_real: Tensor | None = None) -> ModelOutput:
        """input_ids, positions (RoPE, default arange), cache_positions (default positions):
        [B, T]; slots: [B] (default arange); attn_mask: bool [B, T, S], True = may attend,
        default causal by cache index (with a cache) or plain causal (without one; a mask given
        without a cache applies to the T tokens themselves); hidden_layers: decoder layers whose
        outputs to return; logits_positions: [B, K] token indices to compute logits at; num_real:
        [B], the rows are ragged: only the first num_real[b] tokens of row b are real, the rest
        padding whose outputs are unspecified (the fused path skips their projections and
        MLPs, a ragged verification's saving)."""
        batch_size, seq_len = input_ids.shape
        device = input_ids.device
        if positions is None:
            positions = torch.arange(seq_len, device=device).expand(batch_size, seq_len)
        use_fused = self.use_fused()
        num_keys = None if attn_mask is None else attn_mask.shape[-1]
        if cache is not None:
            if slots is None:
                slots = torch.arange(batch_size, device=device)
            if cache_positions is None:
                cache_positions = positions
            if attn_mask is None:
                attn_mask, num_keys = fused.causal_cache_mask(cache_positions, allow_none=use_fused)
        x = self.embed_tokens(input_ids)
        cos, sin = self.rope(positions, x.dtype)
        empty_rows = None
        if attn_mask is not None:
            empty_rows = ~attn_mask.any(-1)
            if empty_rows.device.type == "cpu" and not empty_rows.any():
                empty_rows = None  # the common case: skip the masked_fill in every layer
        wanted = set(hidden_layers)
        if any(not 0 <= i < len(self.layers) for i in wanted):
            raise ValueError(f"hidden_layers {tuple(hidden_layers)} must be in [0, {len(self.layers)})")
        hidden = {}
        rows = fused.slot_range(slots, batch_size) if cache is not None else None  # consecutive slots
        if use_fused:
            # fused.py works on [B*T, H] with cos/sin laid out [B, T, 1, d].
            cos, sin = cos.transpose(1, 2), sin.transpose(1, 2)
            attn_mask = fused.additive_mask(attn_mask)
            if cache is not None:
                attn_mask = fused.fold_mask(attn_mask, self.config.num_attention_heads // self.config.num_key_value_heads)
            layer_weights, lm_head = self.fused_weights()
            x = x.view(batch_size * seq_len, -1)
            packed = None
            if num_real is not None:
                if logits_positions is not None:
                    raise ValueError("num_real and logits_positions cannot be combined")
                packed = fused.pack_index(num_real, seq_len)
                x = x.index_select(0, packed)
            for i, layer in enumerate(self.layers):
                x = layer.forward_fused(layer_weights[i], x, batch_size, seq_len, cos, sin, cache, slots, rows,
                                        cache_positions, attn_mask, num_keys, empty_rows, packed)
                if i in wanted:
                    hidden[i] = (x.view(batch_size, seq_len, -1) if packed is None
                                 else fused.unpack(x, packed, batch_size, seq_len))
            if packed is not None:
                flat = fused.rms_scale(x, self.norm.eps)
                logits = fused.unpack(torch.mm(flat, lm_head), packed, batch_size, seq_len)
                return ModelOutput(logits, [hidden[i] for i in hidden_layers])
            x = x.view(batch_size, seq_len, -1)
        else:
            for i, layer in enumerate(self.layers):
                x = layer(x, cos, sin, cache, slots, cache_positions, attn_mask, empty_rows, rows)
                if i in wanted:
                    hidden[i] = x
        if logits_positions is not None:
            x = x.gather(1, logits_positions[:, :, None].expand(-1, -1, x.shape[-1]))
        if use_fused:
            flat = x.reshape(-1, x.shape[-1])
            logits = torch.mm(fused.rms_scale(flat, self.norm.eps), lm_head).view(*x.shape[:-1], lm_head.shape[1])
        else:
            logits = self.lm_head(self.norm(x)).float()
        return ModelOutput(logits, [hidden[i] for i in hidden_layers])
