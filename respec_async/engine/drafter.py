"""EAGLE-3 drafter: one decoder layer over [token embedding ; fused target features].

    fused   = fc(cat[f_low, f_mid, f_high])                      (3h -> h; skipped for the
                                                                  drafter's own previous hidden)
    x       = cat[input_layernorm(embed(token)), hidden_norm(fused)]          (2h)
    h       = fused + o_proj(attention(x))                        (residual: the raw hidden)
    h       = h + mlp(post_attention_layernorm(h))
    logits  = lm_head(norm(h))                                    (draft vocabulary)

The returned hidden `h` (before the final norm) feeds the next draft step. Entry i of a
sequence pairs token x_{i+1} with the target's features f_i and sits at RoPE position i, the
convention of `respec_async.algorithms.distill`. The embedding is the target's own module,
shared and frozen: it is read, never registered, so it is not in `parameters()` or the saved
state. The draft vocabulary keeps a subset of target ids: target_id = draft_id + d2t[draft_id];
t2d marks the target ids that have a draft id. Parameter names follow the EAGLE-3 / SpecForge
checkpoints (`fc`, `midlayer.*`, `norm`, `lm_head`, `d2t`, `t2d`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from respec_async.engine import fused
from respec_async.engine.model import MLP, ModelConfig, RMSNorm, apply_rope, eagle3_feature_layers, rope_inv_freq

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class DrafterConfig:
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int  # the target's
    draft_vocab_size: int
    feature_layers: tuple[int, int, int]  # target decoder layers whose outputs are fused (low, mid, high)
    head_dim: int | None = None  # None -> hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        self.feature_layers = tuple(int(layer) for layer in self.feature_layers)
        if len(self.feature_layers) != 3:
            raise ValueError(f"feature_layers must name 3 target layers, got {self.feature_layers}")

    @classmethod
    def from_dir(cls, path: str | Path) -> "DrafterConfig":
        """The config of a drafter directory (save_pretrained's config.json; extra keys ignored)."""
        raw = json.loads((Path(path) / CONFIG_NAME).read_text())
        fields = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in raw.items() if key in fields})

    def cache_config(self) -> ModelConfig:
        """A one-layer target ModelConfig with this drafter's attention shape, for model.KVCache
        (and for the target's RoPE helpers)."""
        return ModelConfig(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=1, num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim, rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta, max_position_embeddings=self.max_position_embeddings)


def _rms_norm(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    """model.RMSNorm's math (float32 statistics) with the fused kernel: the drafter runs s times
    per speculative step, and on CPU its op count is its cost."""
    if x.dtype == torch.float32 and norm.weight.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.eps)
    return norm.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=norm.eps).to(x.dtype)


class DraftAttention(nn.Module):
    def __init__(self, config: DrafterConfig):
        super().__init__()
        self.config = config
        # cos/sin per position, cached and grown on demand: computing them per call is a dozen
        # small ops on the drafting hot path. Kept out of the buffers so .to(bfloat16) cannot
        # round the angles.
        self.rope_table = torch.empty(0)
        heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.q_proj = nn.Linear(2 * config.hidden_size, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(2 * config.hidden_size, kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(2 * config.hidden_size, kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, config.hidden_size, bias=False)

    def forward(self, x, positions, cache, slots, cache_positions, attn_mask):
        config = self.config
        batch_size, seq_len, _ = x.shape
        q = self.q_proj(x).view(batch_size, seq_len, -1, config.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch_size, seq_len, -1, config.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch_size, seq_len, -1, config.head_dim).transpose(1, 2)
        cos, sin = self.rope(positions).to(q.dtype).unbind(0)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            is_causal = attn_mask is None
            mask = None if is_causal else attn_mask[:, None]
        else:
            # Write this step's K/V into the slots, then attend over the slots' cache rows
            # (only the first attn_mask.shape[-1] of them when a narrower mask is given).
            if attn_mask is None:
                attn_mask, _ = fused.causal_cache_mask(cache_positions)
            k, v = fused.write_and_read_cache(cache, 0, k.transpose(1, 2), v.transpose(1, 2), slots, None,
                                              cache_positions, attn_mask.shape[-1])
            k, v = k.to(q.dtype), v.to(q.dtype)
            is_causal, mask = False, attn_mask[:, None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                             enable_gqa=config.num_key_value_heads != config.num_attention_heads)
        return self.o_proj(out.transpose(1, 2).reshape(batch_size, seq_len, -1))

    def rope(self, positions: torch.Tensor) -> torch.Tensor:
        """cos, sin stacked: [2, B, 1, T, head_dim] (float32), rotate-half layout."""
        num_positions = int(positions.max()) + 1
        # A table built under inference_mode cannot enter autograd: rebuild it for training.
        if (self.rope_table.shape[1:2] < (num_positions,) or self.rope_table.device != positions.device
                or (self.rope_table.is_inference() and not torch.is_inference_mode_enabled())):
            size = max(num_positions, 2 * self.rope_table.shape[1] if self.rope_table.dim() == 3 else 0,
                       self.config.max_position_embeddings)
            angles = (torch.arange(size, device=positions.device, dtype=torch.float32)[:, None]
                      * rope_inv_freq(self.config.cache_config(), positions.device))
            angles = torch.cat([angles, angles], dim=-1)
            self.rope_table = torch.stack([angles.cos(), angles.sin()])
        return self.rope_table[:, positions].unsqueeze(2)


class DraftLayer(nn.Module):
    def __init__(self, config: DrafterConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hidden_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = DraftAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config.hidden_size, config.intermediate_size)


class Eagle3Drafter(nn.Module):
    # Inference (no grad, float32) through fused.py, as model.Transformer.fused_inference.
    fused_inference: bool = False

    def __init__(self, config: DrafterConfig, target_embed: nn.Embedding, draft_vocab_ids: torch.Tensor | None = None):
        super().__init__()
        self.config = config
        h = config.hidden_size
        # A tuple keeps the shared module out of this module's parameters and state_dict.
        self._target_embed = (target_embed,)
        self.fc = nn.Linear(3 * h, h, bias=False)
        self.midlayer = DraftLayer(config)
        self.norm = RMSNorm(h, config.rms_norm_eps)
        self.lm_head = nn.Linear(h, config.draft_vocab_size, bias=False)
        if draft_vocab_ids is None:
            draft_vocab_ids = torch.arange(config.draft_vocab_size)
        draft_vocab_ids = torch.as_tensor(draft_vocab_ids, dtype=torch.long)
        if config.draft_vocab_size == config.vocab_size and not torch.equal(draft_vocab_ids, torch.arange(config.vocab_size)):
            raise ValueError("a draft vocabulary as large as the target's must be the identity map")
        if draft_vocab_ids.shape != (config.draft_vocab_size,):
            raise ValueError(f"draft_vocab_ids must have {config.draft_vocab_size} ids, got {tuple(draft_vocab_ids.shape)}")
        self.register_buffer("d2t", draft_vocab_ids - torch.arange(config.draft_vocab_size))
        self.register_buffer("t2d", torch.zeros(config.vocab_size, dtype=torch.bool).index_fill(0, draft_vocab_ids, True))

    @property
    def target_embed(self) -> nn.Embedding:
        return self._target_embed[0]

    @property
    def draft_vocab_ids(self) -> torch.Tensor:
        """Target id of each draft id."""
        return torch.arange(self.config.draft_vocab_size, device=self.d2t.device) + self.d2t

    def forward(self, input_ids: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor | None = None,
                cache=None, slots: torch.Tensor | None = None, cache_positions: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None, logits_positions: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Returns (draft_logits [B, T, V_draft] — or [B, K, V_draft] at logits_positions [B, K],
        or None when logits_positions has K = 0 — and out_hidden [B, T, h]).

        hidden [B, T, 3h]: target features low|mid|high (fc applied); [B, T, h]: the drafter's own
        previous out_hidden. Cache semantics are the target Transformer's: K/V written at
        cache_positions (default positions) in `slots`; attn_mask Bool[B, T, S'] over the first
        S' cache indices (default: causal by cache index).
        """
        batch_size, seq_len = input_ids.shape
        if positions is None:
            positions = torch.arange(seq_len, device=input_ids.device).expand(batch_size, -1)
        if cache_positions is None:
            cache_positions = positions
        weights = (self.target_embed.weight, self.fc.weight)
        if (self.fused_inference and not torch.is_grad_enabled()
                and all(w.dtype == torch.float32 and not w.is_inference() for w in weights)):
            return self._forward_fused(input_ids, hidden, positions, cache, slots, cache_positions, attn_mask,
                                       logits_positions)
        if hidden.shape[-1] == 3 * self.config.hidden_size:
            hidden = self.fc(hidden)
        embeds = F.embedding(input_ids, self.target_embed.weight.detach()).to(hidden.dtype)
        layer = self.midlayer
        x = torch.cat([_rms_norm(layer.input_layernorm, embeds), _rms_norm(layer.hidden_norm, hidden)], dim=-1)
        h = hidden + layer.self_attn(x, positions, cache, slots, cache_positions, attn_mask)
        h = h + layer.mlp(_rms_norm(layer.post_attention_layernorm, h))
        if logits_positions is not None:
            if logits_positions.shape[1] == 0:
                return None, h
            h_at = h.gather(1, logits_positions[:, :, None].expand(-1, -1, h.shape[-1]))
            return self.lm_head(_rms_norm(self.norm, h_at)).float(), h
        return self.lm_head(_rms_norm(self.norm, h)).float(), h

    def _fused_weights(self):
        layer = self.midlayer
        attn, mlp, config = layer.self_attn, layer.mlp, self.config
        return fused.cached(self, lambda: (
            self.fc.weight, layer.input_layernorm.weight, layer.hidden_norm.weight, attn.q_proj.weight,
            attn.k_proj.weight, attn.v_proj.weight, attn.o_proj.weight, layer.post_attention_layernorm.weight,
            mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight, self.norm.weight, self.lm_head.weight), lambda: (
            self.fc.weight.t().contiguous(),
            fused.attention_weights(attn, torch.cat([layer.input_layernorm.weight, layer.hidden_norm.weight]),
                                    config.num_attention_heads, config.num_key_value_heads, config.head_dim),
            fused.mlp_weights(mlp, layer.post_attention_layernorm.weight),
            (self.lm_head.weight * self.norm.weight).t().contiguous()))

    def _forward_fused(self, input_ids, hidden, positions, cache, slots, cache_positions, attn_mask,
                       logits_positions):
        """forward() through fused.py: the same math in fewer ops (inference only)."""
        batch_size, seq_len = input_ids.shape
        fc, attn_weights, mlp_weights, lm_head = self._fused_weights()
        layer, eps = self.midlayer, self.config.rms_norm_eps
        hidden = hidden.reshape(batch_size * seq_len, hidden.shape[-1])
        if hidden.shape[-1] == 3 * self.config.hidden_size:
            hidden = torch.mm(hidden, fc)
        embeds = F.embedding(input_ids.reshape(-1), self.target_embed.weight)
        x = torch.cat([fused.rms_scale(embeds, eps), fused.rms_scale(hidden, eps)], dim=-1)
        cos, sin = layer.self_attn.rope(positions).transpose(2, 3).unbind(0)  # [B, T, 1, d]
        rows, num_keys = None, None if attn_mask is None else attn_mask.shape[-1]
        if cache is not None:
            if attn_mask is None:
                attn_mask, num_keys = fused.causal_cache_mask(cache_positions, allow_none=True)
            rows = fused.slot_range(slots, batch_size)
        attn_mask = fused.additive_mask(attn_mask)
        if cache is not None:
            attn_mask = fused.fold_mask(attn_mask, self.config.num_attention_heads // self.config.num_key_value_heads)
        out = fused.attention(attn_weights, x, batch_size, seq_len, cos, sin, cache, 0, slots, rows, cache_positions,
                              attn_mask, num_keys, None)
        h = fused.mlp(mlp_weights, fused.residual_linear(hidden, out, attn_weights.o), eps)
        h = h.view(batch_size, seq_len, -1)
        if logits_positions is not None:
            if logits_positions.shape[1] == 0:
                return None, h
            h_at = h.gather(1, logits_positions[:, :, None].expand(-1, -1, h.shape[-1]))
        else:
            h_at = h
        logits = torch.mm(fused.rms_scale(h_at.reshape(-1, h.shape[-1]), eps), lm_head)
        return logits.view(*h_at.shape[:-1], lm_head.shape[1]), h

    def draft_logits_to_target(self, logits: torch.Tensor) -> torch.Tensor:
        """Scatter draft-vocabulary logits [..., V_draft] into the target vocabulary [..., V];
        target ids outside the draft vocabulary get -inf."""
        if self.config.draft_vocab_size == self.config.vocab_size:
            return logits  # a full-size draft vocabulary is the identity map
        full = logits.new_full(logits.shape[:-1] + (self.config.vocab_size,), float("-inf"))
        return full.index_copy(-1, self.draft_vocab_ids, logits)

    @classmethod
    def from_target(cls, target, draft_vocab_ids: torch.Tensor | None = None) -> "Eagle3Drafter":
        """A freshly initialised drafter shaped for `target` (a model.Transformer), sharing its
        embedding. draft_vocab_ids: target ids of a reduced draft vocabulary (None: all)."""
        tc = target.config
        config = DrafterConfig(
            hidden_size=tc.hidden_size, intermediate_size=tc.intermediate_size,
            num_attention_heads=tc.num_attention_heads, num_key_value_heads=tc.num_key_value_heads,
            vocab_size=tc.vocab_size,
            draft_vocab_size=tc.vocab_size if draft_vocab_ids is None else len(draft_vocab_ids),
            feature_layers=tuple(eagle3_feature_layers(tc.num_hidden_layers)), head_dim=tc.head_dim,
            rms_norm_eps=tc.rms_norm_eps, rope_theta=tc.rope_theta,
            max_position_embeddings=tc.max_position_embeddings)
        param = target.embed_tokens.weight
        return cls(config, target.embed_tokens, draft_vocab_ids).to(device=param.device, dtype=param.dtype)

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = dataclasses.asdict(self.config)
        config["architectures"] = ["LlamaForCausalLMEagle3"]
        # EAGLE-3 / SGLang name the fused layers by the decoder layer they feed (output index + 1).
        config["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": [layer + 1 for layer in self.config.feature_layers]}
        (path / CONFIG_NAME).write_text(json.dumps(config, indent=2))
        save_file({name: tensor.detach().contiguous().cpu() for name, tensor in self.state_dict().items()},
                  str(path / WEIGHTS_NAME))

    @classmethod
    def load_pretrained(cls, path: str | Path, target_embed: nn.Embedding) -> "Eagle3Drafter":
        path = Path(path)
        config = DrafterConfig.from_dir(path)
        state = load_file(str(path / WEIGHTS_NAME))
        draft_vocab_ids = torch.arange(config.draft_vocab_size) + state["d2t"]
        drafter = cls(config, target_embed, draft_vocab_ids)
        drafter.load_state_dict(state, strict=True)
        param = target_embed.weight
        return drafter.to(device=param.device, dtype=param.dtype)
