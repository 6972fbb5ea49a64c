"""The inference fast path: the same math as model.py / drafter.py in fewer, cheaper ops.

A decode step of a small model on a CPU costs what its ops cost to dispatch, not what they
compute (a 128-wide linear layer is ~3 us of work and ~15 us through nn.Linear on a 3-d
input). Under no-grad, for float32 models that opt in (`fused_inference = True`; the engine
sets it on CPU), each decoder block runs on weights derived once from its parameters:

    qkv      [in, (2h + 3kv) d]  q | k | v | rot(q) | rot(k) projections, transposed for mm,
                                 the input RMSNorm weight folded in (rms(x) * w @ W = (x * s) @ (w W))
    o, down  [out, H]            transposed; the residual add rides on addmm
    gate_up  [H, 2I]             gate | up, the post-attention RMSNorm weight folded in
    lm_head  [H, V]              the final RMSNorm weight folded in

so that RoPE is two ops for q and k together: x * cos + rot(x) * sin, where rot(x) (the
rotate-half of x) came out of the projection, a signed permutation of W's rows. RMSNorm's
statistic is one vector_norm. The result equals the unfused forward up to float32 rounding;
tests/engine/test_fused.py checks that on both model families and through the engine.

The derived weights are cached on the module and rebuilt when a source parameter changes:
the key is each parameter's version counter (bumped by in-place updates such as
load_state_dict, copy_ and the default AdamW / SGD steps) and storage address (a new tensor or
device), and any parameter registration in the process (a replaced nn.Parameter) invalidates
every entry. Writes that bypass the version counter are not seen: `.data` writes, fused
optimizer kernels (AdamW(fused=True)), `.to()` under torch.__future__'s overwrite-on-conversion;
call `drop_cache(model)` after those (Engine.load_*_state always does). Cost: one more copy of
the block weights, two more of q/k, and one of the lm_head (a full vocabulary x hidden matrix,
also with tied embeddings), so about twice the weight memory; the engine turns it on only for
small CPU models (see Engine), where per-op dispatch dominates and the copy is a few MB.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def rotate_half_rows(weight: Tensor, num_heads: int, head_dim: int) -> Tensor:
    """Rows of a projection (weight [heads * d, in] or bias [heads * d]) such that
    x @ W_rot^T = rotate_half(x @ W^T) per head: rotate_half(y) = cat(-y[d/2:], y[:d/2])."""
    per_head = weight.reshape(num_heads, head_dim, -1)
    first, second = per_head.chunk(2, dim=1)
    return torch.cat([-second, first], dim=1).reshape(weight.shape)


@dataclass
class AttentionWeights:
    qkv: Tensor  # [in, (2h + 3kv) d]
    qkv_bias: Tensor | None
    o: Tensor  # [h d, H]
    o_bias: Tensor | None
    num_heads: int
    num_kv_heads: int
    head_dim: int
    # Qwen3's per-head RMSNorm of q and k: weights for q | k [h + kv, d], the same for rot(q) |
    # rot(k) (rotate_half(y * w) = rotate_half(y) * swap_halves(w)), and its eps.
    qk_norm: Tensor | None = None
    qk_norm_rot: Tensor | None = None
    qk_norm_eps: float = 0.0


@dataclass
class MLPWeights:
    gate_up: Tensor  # [H, 2I]
    down: Tensor  # [I, H]
    intermediate_size: int


def attention_weights(attn, norm_weight: Tensor, num_heads: int, num_kv_heads: int, head_dim: int) -> AttentionWeights:
    """From a module with q/k/v/o_proj (nn.Linear) and the RMSNorm weight applied to its input."""
    q, k = attn.q_proj, attn.k_proj
    weight = torch.cat([q.weight, k.weight, attn.v_proj.weight, rotate_half_rows(q.weight, num_heads, head_dim),
                        rotate_half_rows(k.weight, num_kv_heads, head_dim)]) * norm_weight
    bias = None
    if q.bias is not None:
        bias = torch.cat([q.bias, k.bias, attn.v_proj.bias, rotate_half_rows(q.bias, num_heads, head_dim),
                          rotate_half_rows(k.bias, num_kv_heads, head_dim)])
    norms = {}
    if getattr(attn, "q_norm", None) is not None:
        w = torch.cat([attn.q_norm.weight.expand(num_heads, -1), attn.k_norm.weight.expand(num_kv_heads, -1)])
        half = head_dim // 2
        norms = dict(qk_norm=w.contiguous(), qk_norm_rot=torch.cat([w[:, half:], w[:, :half]], 1).contiguous(),
                     qk_norm_eps=attn.q_norm.eps)
    return AttentionWeights(weight.t().contiguous(), bias, attn.o_proj.weight.t().contiguous(), attn.o_proj.bias,
                            num_heads, num_kv_heads, head_dim, **norms)


def mlp_weights(mlp, norm_weight: Tensor) -> MLPWeights:
    gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]) * norm_weight
    return MLPWeights(gate_up.t().contiguous(), mlp.down_proj.weight.t().contiguous(), mlp.gate_proj.out_features)


# Parameter (re)registrations anywhere, e.g. `module.weight = nn.Parameter(...)` or
# load_state_dict(assign=True): a cached entry built before one is rebuilt.
_registrations = 0


def _count_registration(module, name, param):
    global _registrations
    _registrations += 1


torch.nn.modules.module.register_module_parameter_registration_hook(_count_registration)


def cached(module, sources, build):
    """build(), cached on `module` until a tensor that sources() returns changes (its version
    counter or storage) or any parameter is re-registered. sources() is only called on a
    rebuild: reading parameters through nn.Module attributes costs more than the check."""
    entry = module.__dict__.get("_fused_cache")
    if entry is not None:
        registrations, tensors, key, value = entry
        if registrations == _registrations and key == tuple((t._version, t.data_ptr()) for t in tensors):
            return value
        del module.__dict__["_fused_cache"], entry, value  # free the stale copy before building the new one
    tensors = sources()
    key = tuple((t._version, t.data_ptr()) for t in tensors)
    # Plain tensors even when called under inference_mode, so no-grad callers can use them too.
    with torch.inference_mode(False), torch.no_grad():
        value = build()
    module.__dict__["_fused_cache"] = (_registrations, tensors, key, value)
    return value


@contextlib.contextmanager
def module_path(*models: torch.nn.Module):
    """Inside the block the models run their module path (fused_inference off): references in
    tests, or anything that wants the unfused numerics of a model an Engine has turned on."""
    saved = [model.fused_inference for model in models]
    for model in models:
        model.fused_inference = False
    try:
        yield
    finally:
        for model, value in zip(models, saved):
            model.fused_inference = value


def drop_cache(module: torch.nn.Module) -> None:
    for submodule in module.modules():
        submodule.__dict__.pop("_fused_cache", None)


def rms_scale(x: Tensor, eps: float) -> Tensor:
    """x / sqrt(mean(x^2) + eps) over the last dim (RMSNorm without its weight), x: [N, H].
    Four ops, none with a Python scalar operand (each of those costs a tensor wrap)."""
    return x * rms_inverse(x, eps)


def rms_inverse(x: Tensor, eps: float) -> Tensor:
    """1 / sqrt(mean(x^2) + eps) over the last dim, keepdim."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return torch.addcmul(_scalar(eps, x), norm, norm, value=1.0 / x.shape[-1]).rsqrt_()


_scalars: dict = {}


def _scalar(value: float, like: Tensor) -> Tensor:
    """A cached 0-dim tensor of `value` with like's dtype and device."""
    key = (value, like.dtype, like.device)
    tensor = _scalars.get(key)
    if tensor is None:
        with torch.inference_mode(False):
            tensor = _scalars[key] = torch.tensor(value, dtype=like.dtype, device=like.device)
    return tensor


def slot_range(slots: Tensor, batch_size: int) -> tuple[int, int] | None:
    """(first, end) when the slots are consecutive (their cache rows are then a slice, not a
    gather); CPU tensors only, where reading them costs no sync."""
    if slots.device.type != "cpu":
        return None
    ids = slots.tolist()
    first = ids[0]
    return (first, first + len(ids)) if ids == list(range(first, first + len(ids))) else None


def causal_cache_mask(cache_positions: Tensor, allow_none: bool = False) -> tuple[Tensor | None, int]:
    """The default mask with a KV cache, bool [B, T, S]: each query sees the cache indices up to
    its own; and S. None instead of the mask, where allow_none (the fused path), for one query
    of one sequence, which sees every key there is."""
    num_keys = int(cache_positions.max()) + 1
    if allow_none and cache_positions.numel() == 1:
        return None, num_keys
    return torch.arange(num_keys, device=cache_positions.device) <= cache_positions[:, :, None], num_keys


def cache_rows(buffer: Tensor, layer: int, slots: Tensor, rows: tuple[int, int] | None, num_keys: int) -> Tensor:
    """buffer[layer, slots, :, :num_keys] ([B, kv_heads, num_keys, head_dim]): a view where the
    slots are consecutive (rows, from slot_range), else an index_select, which on CPU copies
    several times faster than the advanced-indexing gather it equals."""
    if rows is not None:
        return buffer[layer, rows[0]:rows[1], :, :num_keys]
    return buffer[layer, :, :, :num_keys].index_select(0, slots)


def write_and_read_cache(cache, layer: int, k: Tensor, v: Tensor, slots: Tensor, rows: tuple[int, int] | None,
                         cache_positions: Tensor, num_keys: int) -> tuple[Tensor, Tensor]:
    """Write k, v [B, T, kv_heads, d] of this layer at cache_positions of the slots, and read
    back the slots' first num_keys entries ([B, kv_heads, num_keys, d] each)."""
    index = slots[:, None].expand(-1, k.shape[1])
    cache.k[layer, index, :, cache_positions] = k.to(cache.k.dtype)
    cache.v[layer, index, :, cache_positions] = v.to(cache.v.dtype)
    return cache_rows(cache.k, layer, slots, rows, num_keys), cache_rows(cache.v, layer, slots, rows, num_keys)


def additive_mask(attn_mask: Tensor | None) -> Tensor | None:
    """Bool [B, T, S] (True = may attend) -> float [B, 1, T, S] of 0 / -inf, built once per
    forward (SDPA would convert a bool mask in every layer)."""
    if attn_mask is None:
        return None
    return torch.zeros(attn_mask.shape, device=attn_mask.device).masked_fill_(~attn_mask, float("-inf"))[:, None]


# attention() folds grouped query heads for at most this many queries a row (decode and
# verification steps, short prefills): the folded mask is groups times the size of the plain one.
FOLD_MAX_QUERIES = 64


def folds_queries(groups: int, seq_len: int) -> bool:
    """Whether cached attention runs the groups query heads of a K/V head as one head (rows of
    at most FOLD_MAX_QUERIES queries) rather than SDPA's grouped-query path."""
    return groups > 1 and seq_len <= FOLD_MAX_QUERIES


def fold_mask(attn_mask: Tensor | None, groups: int) -> Tensor | None:
    """additive_mask's [B, 1, T, S] for attention()'s folded queries ([B, 1, groups * T, S]),
    built once per forward (a [B, 1, 1, S] mask broadcasts as it is); the plain mask where
    folds_queries() says no."""
    if attn_mask is None or attn_mask.shape[2] == 1 or not folds_queries(groups, attn_mask.shape[2]):
        return attn_mask
    batch_size, _, seq_len, num_keys = attn_mask.shape
    return attn_mask.expand(batch_size, groups, seq_len, num_keys).reshape(batch_size, 1, groups * seq_len, num_keys)


def attention(w: AttentionWeights, x: Tensor, batch_size: int, seq_len: int, cos: Tensor, sin: Tensor, cache,
              layer: int, slots: Tensor | None, rows: tuple[int, int] | None, cache_positions: Tensor | None,
              attn_mask: Tensor | None, num_keys: int | None, empty_rows: Tensor | None,
              packed: Tensor | None = None) -> Tensor:
    """Attention of normalised-but-unweighted inputs x [B*T, in] -> [B*T, h*d] (before o_proj).
    Cache semantics are model.Attention's, over the first num_keys cache entries; attn_mask
    is additive_mask's, or None: with a cache, every query sees all num_keys keys; without
    one, causal attention over the T tokens. packed: x holds only the rows of the [B*T] grid
    listed there (ragged batches: the projections skip the padding, attention runs on the
    grid with zeros in the holes), and so does the result. With a cache, attn_mask is
    fold_mask(additive_mask(...), h / kv): folded for short rows, plain for long ones."""
    h, kv, d = w.num_heads, w.num_kv_heads, w.head_dim
    proj = torch.addmm(w.qkv_bias, x, w.qkv) if w.qkv_bias is not None else torch.mm(x, w.qkv)
    if packed is not None:
        proj = proj.new_zeros(batch_size * seq_len, proj.shape[1]).index_copy_(0, packed, proj)
    proj = proj.view(batch_size, seq_len, 2 * h + 3 * kv, d)
    if w.qk_norm is None:
        qk = torch.addcmul(proj[:, :, :h + kv] * cos, proj[:, :, h + 2 * kv:], sin)
    else:  # one RMS statistic per head serves q and rot(q) alike (rotate_half keeps the norm)
        raw = proj[:, :, :h + kv]
        scale = rms_inverse(raw, w.qk_norm_eps)  # [B, T, h + kv, 1]
        qk = torch.addcmul(raw * scale * w.qk_norm * cos, proj[:, :, h + 2 * kv:] * scale * w.qk_norm_rot, sin)
    k, v = qk[:, :, h:], proj[:, :, h + kv:h + 2 * kv]  # [B, T, kv, d]
    groups = h // kv
    if cache is None:
        q, k, v = qk[:, :, :h].transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None,
                                             enable_gqa=kv != h)
    else:
        k, v = write_and_read_cache(cache, layer, k, v, slots, rows, cache_positions, num_keys)
        if folds_queries(groups, seq_len):
            # The h / kv query heads that share a K/V head go in as one head of that many more
            # queries (attn_mask is fold_mask's): one product per K/V head, 5-20% less time than
            # SDPA's own grouped-query path on CPU.
            q = qk[:, :, :h].reshape(batch_size, seq_len, kv, groups, d).permute(0, 2, 3, 1, 4)
            q = q.reshape(batch_size, kv, groups * seq_len, d)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask).reshape(batch_size, h, seq_len, d)
        else:
            out = F.scaled_dot_product_attention(qk[:, :, :h].transpose(1, 2), k, v, attn_mask=attn_mask,
                                                 enable_gqa=groups > 1)
    if empty_rows is not None:
        out = out.masked_fill(empty_rows[:, None, :, None], 0.0)
    out = out.transpose(1, 2).reshape(batch_size * seq_len, h * d)
    return out if packed is None else out.index_select(0, packed)


def pack_index(num_real: Tensor, seq_len: int) -> Tensor:
    """Flat indices into a [B*T] grid of the first num_real[b] tokens of each row b."""
    return (torch.arange(seq_len, device=num_real.device) < num_real[:, None]).flatten().nonzero().squeeze(1)


def unpack(x: Tensor, packed: Tensor, batch_size: int, seq_len: int) -> Tensor:
    """Packed rows [N, C] back on the [B, T, C] grid, zeros at the padding."""
    return x.new_zeros(batch_size * seq_len, x.shape[-1]).index_copy_(0, packed, x).view(batch_size, seq_len, -1)


def residual_linear(x: Tensor, inputs: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x + inputs @ weight (+ bias), in one addmm."""
    return torch.addmm(x if bias is None else x + bias, inputs, weight)


def mlp(w: MLPWeights, x: Tensor, eps: float) -> Tensor:
    """x + down(silu(gate(rms(x))) * up(rms(x))), x: [N, H]."""
    gate_up = torch.mm(rms_scale(x, eps), w.gate_up)
    size = w.intermediate_size
    return torch.addmm(x, F.silu(gate_up[:, :size]).mul_(gate_up[:, size:]), w.down)
