"""Hugging Face checkpoints for the target model: config.json + safetensors (single or sharded).

Our parameter names are Hugging Face's without the `model.` prefix (lm_head keeps its name), so
the mapping is one line each way. A tied lm_head is not stored (as transformers does) and is
rebuilt from the embedding on load. Errors name the file and the tensor at fault.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from respec_async.engine.model import ModelConfig, Transformer

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


def hf_name(name: str) -> str:
    return name if name.startswith("lm_head.") else "model." + name


def state_dict_hf(model: Transformer) -> dict[str, torch.Tensor]:
    """HF-named tensors of `model` (no copy); a tied lm_head is left out, as transformers saves it."""
    tied = model.config.tie_word_embeddings
    return {hf_name(name): tensor for name, tensor in model.state_dict().items()
            if not (tied and name == "lm_head.weight")}


def _is_ignorable(name: str) -> bool:
    # Old Llama checkpoints store RoPE inverse frequencies; we recompute them.
    return name.endswith("rotary_emb.inv_freq")


def from_state_dict_hf(config: ModelConfig, tensors: dict[str, torch.Tensor], dtype=torch.float32,
                       device="cpu", source: str = "state dict") -> Transformer:
    """A Transformer holding HF-named `tensors` (cast to dtype, moved to device); raises ValueError
    naming `source` and every missing, unexpected or mis-shaped tensor."""
    with torch.device("meta"):
        model = Transformer(config)
    expected = {hf_name(name): (name, tuple(p.shape)) for name, p in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
        tensors = {name: t for name, t in tensors.items() if name != "lm_head.weight"}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(name for name in set(tensors) - set(expected) if not _is_ignorable(name))
    mis_shaped = [f"{name}: checkpoint {tuple(tensors[name].shape)}, config expects {shape}"
                  for name, (_, shape) in expected.items() if name in tensors and tuple(tensors[name].shape) != shape]
    if missing or unexpected or mis_shaped:
        problems = ([f"missing tensor {name}" for name in missing] + [f"unexpected tensor {name}" for name in unexpected]
                    + [f"wrong shape for {line}" for line in mis_shaped])
        raise ValueError(f"{source} does not match the model config: " + "; ".join(problems))
    state = {ours: tensors[theirs].to(device=device, dtype=dtype) for theirs, (ours, _) in expected.items()}
    model.load_state_dict(state, strict=not config.tie_word_embeddings, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """All tensors of the checkpoint in `path`, and a description of where they came from."""
    index_file, single_file = path / INDEX_NAME, path / WEIGHTS_NAME
    if index_file.exists():
        weight_map = json.loads(index_file.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
        source = str(index_file)
    elif single_file.exists():
        files, source = [WEIGHTS_NAME], str(single_file)
    else:
        raise FileNotFoundError(f"{path}: neither {WEIGHTS_NAME} nor {INDEX_NAME} found")
    tensors = {}
    for file_name in files:
        if not (path / file_name).exists():
            raise FileNotFoundError(f"{index_file}: shard {file_name} is missing")
        try:
            with safe_open(path / file_name, framework="pt") as f:
                for name in f.keys():
                    tensors[name] = f.get_tensor(name)
        except SafetensorError as error:  # a truncated or corrupt file: say which one
            raise ValueError(f"{path / file_name}: not a readable safetensors file ({error})") from error
    return tensors, source


def load_pretrained(path: str | Path, dtype=torch.float32, device="cpu") -> Transformer:
    """A Transformer from a Hugging Face directory: config.json and model.safetensors (or a
    sharded model.safetensors.index.json)."""
    path = Path(path)
    config_file = path / CONFIG_NAME
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file} not found")
    try:
        config = ModelConfig.from_hf_dict(json.loads(config_file.read_text()))
    except (KeyError, ValueError) as error:
        raise ValueError(f"{config_file}: {error}") from error
    tensors, source = _read_tensors(path)
    return from_state_dict_hf(config, tensors, dtype, device, source)


def save_pretrained(model: Transformer, path: str | Path, max_shard_bytes: int | None = None) -> None:
    """Write config.json and safetensors (sharded with an index when larger than
    max_shard_bytes) in the layout transformers' AutoModelForCausalLM.from_pretrained reads."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in state_dict_hf(model).items()}
    config = model.config.to_hf_dict()
    dtype = next(iter(tensors.values())).dtype
    config["torch_dtype"] = config["dtype"] = str(dtype).removeprefix("torch.")
    (path / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    # Leftovers of an earlier save (an index would shadow a new single file) must not mix in.
    for stale in [*path.glob("model*.safetensors"), path / INDEX_NAME]:
        stale.unlink(missing_ok=True)
    metadata = {"format": "pt"}
    sizes = {name: t.numel() * t.element_size() for name, t in tensors.items()}
    if max_shard_bytes is None or sum(sizes.values()) <= max_shard_bytes:
        save_file(tensors, str(path / WEIGHTS_NAME), metadata=metadata)
        return
    shards: list[list[str]] = [[]]
    shard_bytes = 0
    for name in tensors:
        if shards[-1] and shard_bytes + sizes[name] > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(name)
        shard_bytes += sizes[name]
    weight_map = {}
    for i, names in enumerate(shards):
        file_name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({name: tensors[name] for name in names}, str(path / file_name), metadata=metadata)
        weight_map.update(dict.fromkeys(names, file_name))
    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
    (path / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
