"""Config validation: errors name the file and the dotted key before anything starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from respec_async.config import ConfigError, config_to_dict, config_to_toml, load_config, parse_override

GOOD = "[run]\nname = 'x'\n[supervisor]\nmax_restarts = 2\n"


@pytest.fixture
def cfg(tmp_path):
    def write(text: str):
        path = tmp_path / "c.toml"
        path.write_text(text)
        return path

    return write


@pytest.mark.parametrize(
    ("text", "overrides", "key", "expected"),
    [
        ("[supervisor]\nmax_restarts = -1\n", [], "supervisor.max_restarts", ">= 0, got -1"),
        ("[supervisor]\nmax_restartz = 1\n", [], "supervisor.max_restartz", "unknown key"),
        ("[nonsense]\nx = 1\n", [], "nonsense", "unknown key"),
        ("[run]\nseed = 'abc'\n", [], "run.seed", "Expected `int`"),
        ("[transport]\nscheme = 'udp'\n", [], "transport.scheme", "udp"),
        ("[roles]\ntrainer = 2\n", [], "roles.trainer", "<= 1"),
        (GOOD, ["supervisor.ping_timeout_s=0.1"], "supervisor.ping_timeout_s", "greater than"),
        (GOOD, ["supervisor.shutdown_grace_s=abc"], "supervisor.shutdown_grace_s", "Expected `float`"),
        ("[data]\ntask = 'jsonl'\npath = 'x.jsonl'\n", [], "run.final_eval", "run.final_eval = false"),
        ("[roles]\ngenerator = 0\n", [], "roles.generator", "at least one generator"),
        (GOOD, ["roles.reward=0"], "roles.reward", "at least one reward"),
    ],
)
def test_bad_config_names_file_and_dotted_key(cfg, text, overrides, key, expected):
    path = cfg(text)
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides)
    message = str(err.value)
    assert str(path) in message
    assert f": {key}: " in message
    assert expected in message


def test_overrides_apply_with_toml_types(cfg):
    config = load_config(cfg(GOOD), ["supervisor.max_restarts=7", "run.name=other", "transport.insecure=true",
                                     "supervisor.ping_interval_s=0.25"])
    assert config.supervisor.max_restarts == 7
    assert config.run.name == "other"
    assert config.transport.insecure is True
    assert config.supervisor.ping_interval_s == 0.25


def test_malformed_override_is_rejected():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("supervisor.max_restarts")
    with pytest.raises(ConfigError, match="dotted key"):
        parse_override("a..b=1")


def test_resolved_config_round_trips_through_toml(cfg, tmp_path):
    # Ray's resource names hold ':' and '.', which TOML only takes as quoted keys.
    config = load_config(cfg(GOOD), ["roles.echo=2", 'ray.trainer.resources={"node:10.0.0.1" = 0.01}'])
    again = tmp_path / "again.toml"
    again.write_text(config_to_toml(config))
    assert load_config(again) == config


@pytest.mark.process
def test_cli_config_show_and_error_exit_code(cfg):
    path = cfg(GOOD)
    shown = subprocess.run([sys.executable, "-m", "respec_async.cli", "config", "show", str(path)],
                           capture_output=True, text=True)
    assert shown.returncode == 0 and "max_restarts = 2" in shown.stdout
    bad = subprocess.run([sys.executable, "-m", "respec_async.cli", "launch", str(path),
                          "--set", "supervisor.max_restarts=-3"], capture_output=True, text=True)
    assert bad.returncode == 2
    assert "supervisor.max_restarts" in bad.stderr and str(path) in bad.stderr


def flat(table: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in table.items():
        out.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
    return out


def test_a_config_extends_another_table_by_table(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "root.toml").write_text(
        "[run]\nname = 'root'\nseed = 3\n[generator]\nsd_grid = ['1,1,1', '2,1,2']\nmax_batch_size = 8\n")
    (tmp_path / "base" / "mid.toml").write_text("extends = 'root.toml'\n[run]\nname = 'mid'\n")
    (tmp_path / "top.toml").write_text("extends = 'base/mid.toml'\n[generator]\nsd_grid = ['3,1,3']\n")
    config = load_config(tmp_path / "top.toml", ["run.seed=5"])
    # Tables merge key by key along the chain; an array replaces the base's; --set goes last.
    assert (config.run.name, config.run.seed) == ("mid", 5)
    assert config.generator.sd_grid == ["3,1,3"] and config.generator.max_batch_size == 8


def test_extends_errors_name_the_files(tmp_path):
    (tmp_path / "a.toml").write_text("extends = 'b.toml'\n")
    (tmp_path / "b.toml").write_text("extends = 'a.toml'\n")
    with pytest.raises(ConfigError, match=r"a circle of config files: .*a\.toml -> .*b\.toml -> .*a\.toml"):
        load_config(tmp_path / "a.toml")
    (tmp_path / "c.toml").write_text("extends = 'missing.toml'\n")
    with pytest.raises(ConfigError, match=r"missing\.toml: no such config file \(extended by .*c\.toml\)"):
        load_config(tmp_path / "c.toml")
    (tmp_path / "d.toml").write_text("extends = 3\n")
    with pytest.raises(ConfigError, match=r"d\.toml: extends: expected the path of a config file"):
        load_config(tmp_path / "d.toml")


@pytest.mark.parametrize(("ablation", "changed"), [
    ("no-adaptive", {"generator.sd": "static"}),
    ("no-learner", {"roles.drafter_learner": 0}),
    ("no-sd", {"roles.drafter_learner": 0, "generator.sd": "off"}),
    ("no-weighting", {"drafter.weighting": "none"}),
])
def test_each_ablation_is_respec_with_one_mechanism_off(ablation, changed):
    configs = Path(__file__).resolve().parents[2] / "configs"
    full = flat(config_to_dict(load_config(configs / "respec.toml")))
    variant = flat(config_to_dict(load_config(configs / f"ablation-{ablation}.toml")))
    diff = {key: value for key, value in variant.items() if full[key] != value}
    assert diff == {"run.name": f"ablation-{ablation}", **changed}


@pytest.mark.parametrize("kind", ["file", "missing", "empty dir"])
def test_resume_of_a_path_that_is_no_run_is_a_one_line_error(tmp_path, capsys, kind):
    from respec_async.cli import main

    path = tmp_path / "x"
    if kind == "file":
        path.write_text("not a run")
    elif kind == "empty dir":
        path.mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main(["launch", "--resume", str(path)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"--resume {path}: not a run directory" in error and "Traceback" not in capsys.readouterr().err
