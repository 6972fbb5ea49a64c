"""API conformance of the SGLang adapter on CPU: every SGLang class, method, argument, request
field, launch argument and result key that respec_async/backends/sglang.py relies on
(SGLANG_SURFACE, and every key `engine_kwargs` can return) exists under that name in the pinned
release's source. The wheel is downloaded with pip (no dependencies, nothing imported: SGLang
does not import on a CPU machine) and read with `ast`. Offline, the test skips, except in CI."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from respec_async.backends.sglang import SGLANG_SURFACE, SGLANG_VERSION, engine_kwargs
from respec_async.config import config_from_dict

pytestmark = pytest.mark.process  # pip download


def source_root() -> Path:
    """The unpacked wheel's files the surface names (cached under ~/.cache between runs)."""
    given = os.environ.get("RESPEC_SGLANG_SRC")
    if given:
        return Path(given)
    root = Path.home() / ".cache" / "respec-async" / f"sglang-{SGLANG_VERSION}"
    if (root / ".complete").exists():
        return root
    wheels = root.parent / f"{root.name}-wheel"
    wheels.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                           "--python-version", "3.11", "--platform", "manylinux_2_34_x86_64",
                           f"sglang=={SGLANG_VERSION}", "-d", str(wheels)], capture_output=True, text=True)
    found = sorted(wheels.glob(f"sglang-{SGLANG_VERSION}-*.whl"))
    if done.returncode != 0 or not found:
        if os.environ.get("CI"):
            pytest.fail(f"could not download sglang=={SGLANG_VERSION}: {done.stderr[-500:]}")
        pytest.skip(f"sglang=={SGLANG_VERSION} could not be downloaded (offline?): {done.stderr[-200:]}")
    with zipfile.ZipFile(found[0]) as wheel:
        for name in wheel.namelist():
            if name.startswith("sglang/srt/") and name.endswith(".py"):
                wheel.extract(name, root)
    (root / ".complete").touch()
    for wheel_file in found:
        wheel_file.unlink()  # 39 MB: keep only the sources read here
    return root


@pytest.fixture(scope="module")
def sglang_src() -> Path:
    return source_root()


def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def find_class(tree: ast.Module, name: str) -> ast.ClassDef | None:
    return next((n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == name), None)


def methods(cls: ast.ClassDef) -> dict[str, ast.FunctionDef | ast.AsyncFunctionDef]:
    return {n.name: n for n in cls.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


def field_names(cls: ast.ClassDef) -> set[str]:
    return {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}


def parameters(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> set[str]:
    a = fn.args
    return {p.arg for p in [*a.posonlyargs, *a.args, *a.kwonlyargs]}


def strings(tree: ast.Module) -> set[str]:
    return {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}


def server_args_fields(root: Path) -> set[str]:
    names: set[str] = set()
    for path in sorted((root / "sglang/srt/arg_groups/fields").glob("*.py")):
        for cls in (n for n in ast.walk(parse(path)) if isinstance(n, ast.ClassDef)):
            names |= field_names(cls)
    return names


def missing_names(root: Path, surface: dict[str, dict[str, list[str]]]) -> list[str]:
    """Every name of `surface` the source at `root` does not define, as "file: what"."""
    missing = []
    for file, checks in surface.items():
        if "*" in file:
            continue  # the launch arguments: checked against engine_kwargs below
        path = root / file
        if not path.exists():
            missing.append(f"{file}: no such file")
            continue
        tree = parse(path)
        for what, names in checks.items():
            kind, _, target = what.partition(" ")
            if kind == "strings":
                missing += [f"{file}: string {s!r}" for s in names if s not in strings(tree)]
                continue
            cls_name, _, method = target.partition(".")
            cls = find_class(tree, cls_name)
            if cls is None:
                missing.append(f"{file}: class {cls_name}")
            elif kind == "class":
                missing += [f"{file}: {cls_name}.{m}" for m in names if m not in methods(cls)]
            elif kind == "fields":
                missing += [f"{file}: {cls_name} field {f}" for f in names if f not in field_names(cls)]
            elif kind == "def":
                fn = methods(cls).get(method)
                if fn is None:
                    missing.append(f"{file}: {cls_name}.{method}")
                else:
                    missing += [f"{file}: {cls_name}.{method}({p}=)" for p in names if p not in parameters(fn)]
    return missing


def test_every_sglang_name_the_adapter_uses_exists_in_the_pinned_release(sglang_src):
    assert missing_names(sglang_src, SGLANG_SURFACE) == []


def test_a_wrong_name_is_reported(sglang_src):
    # The check can fail: a misspelt method, argument, field and class are each named.
    wrong = {
        "sglang/srt/entrypoints/engine.py": {"class Engine": ["update_weights_from_distributed", "update_weight"],
                                             "def Engine.async_generate": ["input_ids", "input_token_ids"]},
        "sglang/srt/managers/io_struct.py": {"fields BeginWeightUpdateReqInput": ["selectors"],
                                             "class BeginWeightUpdateRequest": []},
        "sglang/srt/managers/tokenizer_manager.py": {"strings": ["spec_verify_count"]},
    }
    assert missing_names(sglang_src, wrong) == [
        "sglang/srt/entrypoints/engine.py: Engine.update_weight",
        "sglang/srt/entrypoints/engine.py: Engine.async_generate(input_token_ids=)",
        "sglang/srt/managers/io_struct.py: BeginWeightUpdateReqInput field selectors",
        "sglang/srt/managers/io_struct.py: class BeginWeightUpdateRequest",
        "sglang/srt/managers/tokenizer_manager.py: string 'spec_verify_count'",
    ]


@pytest.mark.parametrize("generator", [
    {"sd": "off"},
    {"sd": "static", "sd_num_steps": 3, "sd_top_k": 1, "sd_num_draft_tokens": 3,
     "sd_relaxed_threshold_single": 0.9, "sd_relaxed_threshold_acc": 0.9},
    {"sd": "static", "sd_source": "history", "sd_num_steps": 4, "sd_top_k": 2, "sd_num_draft_tokens": 6},
    {"sd": "adaptive", "sd_grid": ["1,1,1", "3,1,3"]},
])
def test_every_launch_argument_is_a_server_args_field(sglang_src, generator):
    config = config_from_dict({"model": {"device": "cuda"}, "generator": generator})
    kwargs = engine_kwargs(config, "/models/actor", drafter_path="/models/drafter", adaptive_config_path="/a.json")
    fields = server_args_fields(sglang_src)
    assert len(fields) > 200  # the whole ServerArgs was read, not one file of it
    assert sorted(set(kwargs) - fields) == []
