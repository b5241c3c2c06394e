"""Every wandb sweep file is well formed and only sweeps parameters ``raeg pipeline`` knows.

wandb's agent turns a sweep's ``command`` into a process: ``${...}`` macros expand to the
run's parameters (``${args_no_hyphens}``: ``name=value``, the value written with Python's
``str``). These tests build that command with the installed agent's own code, run the
resulting shell command with a stand-in ``raeg`` that records its arguments, hand those to
``raeg pipeline``'s real argument parsing and ``load_pipeline_config`` (the pipeline itself
replaced by a recorder), and check each swept key against the constructor it ends up in.
``wandb sweep`` needs a server, so the files are never submitted.
"""

from __future__ import annotations

import copy
import importlib.util
import inspect
import math
import os
import re
import subprocess
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SWEEPS = sorted((REPO / "experiments" / "sweeps").glob("*.yaml"))
REQUIRED = {"protector_weights", "psnr_target", "protector_lr"}
SWEEP_ID = "sweep0test"

# ------------------------------------------------------------------- sweep file format
# The documented wandb sweep configuration (docs "Sweep configuration options"): top-level
# keys, search methods, metric goals, and for each parameter distribution its keys.
TOP_LEVEL = {
    "name",
    "description",
    "program",
    "command",
    "method",
    "metric",
    "parameters",
    "project",
    "entity",
    "run_cap",
    "early_terminate",
    "controller",
    "kind",
    "apiVersion",
}
METHODS = {"grid", "random", "bayes"}
GOALS = {"minimize", "maximize"}
RANGE_DISTRIBUTIONS = {
    "uniform",
    "int_uniform",
    "log_uniform",
    "log_uniform_values",
    "inv_log_uniform",
    "inv_log_uniform_values",
    "q_uniform",
    "q_log_uniform",
    "q_log_uniform_values",
}
PARAM_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")


def format_problems(sweep: Mapping) -> list[str]:
    """Departures of ``sweep`` from wandb's sweep configuration format."""
    problems = [f"unknown top-level key {k!r}" for k in sweep if k not in TOP_LEVEL]
    if sweep.get("method") not in METHODS:
        problems.append(f"method {sweep.get('method')!r} is not one of {sorted(METHODS)}")
    metric = sweep.get("metric")
    if not isinstance(metric, Mapping) or not isinstance(metric.get("name"), str):
        problems.append("metric must be a mapping with a name")
    else:
        problems += [
            f"unknown metric key {k!r}" for k in metric if k not in {"name", "goal", "target"}
        ]
        if metric.get("goal", "minimize") not in GOALS:
            problems.append(f"metric goal {metric.get('goal')!r} is not one of {sorted(GOALS)}")
    params = sweep.get("parameters")
    if not isinstance(params, Mapping) or not params:
        return [*problems, "parameters must be a non-empty mapping"]
    for name, spec in params.items():
        if not PARAM_NAME.match(str(name)):
            problems.append(f"parameter name {name!r} is not allowed by wandb")
        problems += [f"{name}: {p}" for p in _param_problems(spec)]
    if sweep.get("method") == "grid":
        for name, spec in params.items():
            if isinstance(spec, Mapping) and "values" not in spec and "value" not in spec:
                problems.append(f"{name}: a grid sweep needs values, not a distribution")
    command = sweep.get("command")
    if command is not None and not (
        isinstance(command, list) and all(isinstance(c, str) for c in command)
    ):
        problems.append("command must be a list of strings")
    return problems


def _param_problems(spec: Any) -> list[str]:
    if not isinstance(spec, Mapping):
        return ["a parameter must be a mapping"]
    keys = set(spec)
    if "values" in spec:
        ok = keys <= {"values", "distribution", "probabilities"}
        if not isinstance(spec["values"], list) or not spec["values"]:
            return ["values must be a non-empty list"]
        return [] if ok else [f"unexpected keys {sorted(keys - {'values', 'distribution'})}"]
    if "value" in spec:
        return [] if keys <= {"value", "distribution"} else [f"unexpected keys {sorted(keys)}"]
    dist = spec.get("distribution", "uniform")
    if dist not in RANGE_DISTRIBUTIONS:
        return [f"unknown distribution {dist!r}"]
    if not {"min", "max"} <= keys or not keys <= {"min", "max", "distribution", "q"}:
        return [f"{dist} needs min and max (and optionally q), got {sorted(keys)}"]
    lo, hi = spec["min"], spec["max"]
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (lo, hi)):
        return ["min and max must be numbers"]
    if lo >= hi:
        return [f"min {lo} must be below max {hi}"]
    if dist == "int_uniform" and not (isinstance(lo, int) and isinstance(hi, int)):
        return ["int_uniform needs integer min and max"]
    if dist.endswith("_values") and lo <= 0:
        return [f"{dist} needs min > 0"]
    return []


def wandb_schema_violations(sweep: Mapping) -> list[str] | None:
    """wandb's own schema check (the optional ``sweeps`` package); None where not installed."""
    if importlib.util.find_spec("sweeps") is None:
        return None
    import sweeps

    return list(sweeps.schema_violations_from_proposed_config(copy.deepcopy(dict(sweep))))


# ---------------------------------------------------------------- what raeg accepts
def _hints(fn: Callable, drop: Iterable[str] = ()) -> dict[str, Any]:
    """``{argument: annotation}`` of a constructor, without ``self``, ``*args`` and ``drop``."""
    hints = typing.get_type_hints(fn)
    return {
        n: hints.get(n, Any)
        for n, p in inspect.signature(fn).parameters.items()
        if n not in ("self", *drop)
        and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    }


def pipeline_schema() -> dict[str, Any]:
    """The pipeline config's keys: nested dicts of annotations; a list means "any index".

    Constructor arguments that the pipeline sets itself (surrogate checkpoints, channels,
    classes) are left out: a sweep over them would be overwritten or collide.
    """
    from raeg_pl.data import ImageClassificationDataModule
    from raeg_pl.lit.classifier import ClassifierLitModule
    from raeg_pl.lit.protector import ProtectorLitModule

    trainer = _hints(L.Trainer.__init__)
    data = _hints(ImageClassificationDataModule.__init__)
    classifier = {
        "model": _hints(ClassifierLitModule.__init__, ("num_classes", "in_chans")),
        "data": data,
        "trainer": trainer,
        "max_epochs": int,
    }
    protector = {
        "model": _hints(ProtectorLitModule.__init__, ("surrogate_checkpoints", "in_channels")),
        "data": data,
        "trainer": trainer,
        "max_epochs": int,
        "gradient_clip_val": float,
    }
    return {
        "run_dir": str,
        "seed": int,
        "profile": str | None,
        "description": str,
        "trainer": trainer,
        "data": data,
        "surrogates": [classifier],
        "protector": protector,
        "pirate": classifier,
        "pirate_defenses": list[str],
        "eval_defenses": list[str],
        "export": {"refine_steps": int},
        "wandb": {
            "enabled": bool,
            "project": str,
            "group": str | None,
            "name": str | None,
            "tags": list[str],
            "offline": bool,
            "job_type": str | None,
        },
    }


def resolve(schema: Mapping, key: str) -> Any:
    """The annotation of a dotted pipeline key; KeyError naming the valid keys otherwise."""
    node: Any = schema
    done: list[str] = []
    for part in key.split("."):
        if isinstance(node, list):
            if not part.isdigit():
                raise KeyError(f"{key}: {'.'.join(done)} is a list, {part!r} is no index")
            node = node[0]
        elif isinstance(node, Mapping):
            if part not in node:
                where = ".".join(done) or "the pipeline config"
                raise KeyError(f"{key}: {part!r} is not a key of {where}; valid: {sorted(node)}")
            node = node[part]
        else:
            raise KeyError(f"{key}: {'.'.join(done)} is a value, it has no {part!r}")
        done.append(part)
    if isinstance(node, Mapping | list):
        raise KeyError(f"{key} is a whole section, not one setting")
    return node


def accepts(tp: Any, value: Any) -> bool:
    """Whether ``value`` (as YAML parsed it) fits the annotation ``tp``."""
    if tp is Any:
        return True
    if tp is type(None) or tp is None:
        return value is None
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(accepts(a, value) for a in args)
    if origin is typing.Literal:
        return value in args
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin in (list, Sequence) or tp in (list, Sequence):
        return isinstance(value, list) and (not args or all(accepts(args[0], v) for v in value))
    if origin is tuple:
        if not isinstance(value, list | tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(accepts(args[0], v) for v in value)
        return len(args) == len(value) and all(accepts(a, v) for a, v in zip(args, value))
    if origin in (dict, Mapping) or tp in (dict, Mapping):
        return isinstance(value, dict)
    if isinstance(tp, type):
        return isinstance(value, tp)
    raise TypeError(f"annotation {tp!r} is not handled by this check")


def _get(cfg: Any, key: str) -> Any:
    node = cfg
    for part in key.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


# -------------------------------------------------------------------- sampled values
def samples(spec: Mapping) -> list[Any]:
    """Values a sweep can hand a run: each of ``values``, the bounds and the midpoint."""
    if "values" in spec:
        return list(spec["values"])
    if "value" in spec:
        return [spec["value"]]
    dist = spec.get("distribution", "uniform")
    lo, hi = spec["min"], spec["max"]
    if dist == "int_uniform":
        return [lo, (lo + hi) // 2, hi]
    if dist in ("log_uniform_values", "q_log_uniform_values", "inv_log_uniform_values"):
        return [lo, math.sqrt(lo * hi), hi]
    if dist in ("log_uniform", "q_log_uniform"):  # bounds are natural-log exponents
        return [math.exp(lo), math.exp((lo + hi) / 2), math.exp(hi)]
    if dist == "inv_log_uniform":
        return [math.exp(-hi), math.exp(-(lo + hi) / 2), math.exp(-lo)]
    return [lo, (lo + hi) / 2, hi]


def assignments(sweep: Mapping) -> list[dict[str, Any]]:
    """Parameter sets covering every sampled value of every parameter (others at their first)."""
    params = sweep["parameters"]
    per_param = {name: samples(spec) for name, spec in params.items()}
    base = {name: vals[0] for name, vals in per_param.items()}
    out = [dict(base)]
    for name, vals in per_param.items():
        for v in vals[1:]:
            out.append({**base, name: v})
    return out


# ---------------------------------------------------------------- the agent, replayed
KNOWN_MACROS = {"env", "interpreter", "program", "args_json_file"}


def known_macros() -> set[str]:
    """The ``${...}`` macros the installed wandb agent expands."""
    from wandb.sdk.launch.sweeps import utils as sweep_utils

    formats = sweep_utils.create_sweep_command_args({"args": {}})
    return KNOWN_MACROS | {k for k, v in formats.items() if isinstance(v, list)}


def macro_problems(command: list[str]) -> list[str]:
    problems = []
    macros = known_macros()
    for token in command:
        whole = re.fullmatch(r"\$\{([^}]*)\}", token)
        if whole:
            if whole.group(1) not in macros:
                problems.append(f"unknown macro {token!r}; the agent knows {sorted(macros)}")
            continue
        for inner in re.findall(r"\$\{([^}]*)\}", token):
            if not inner.startswith("envvar:"):
                problems.append(
                    f"{token!r}: only a whole token or ${{envvar:NAME}} is expanded by wandb,"
                    f" ${{{inner}}} would reach the program as written"
                )
    if "${args_no_hyphens}" not in command:
        problems.append("the command does not pass ${args_no_hyphens} (key.path=value)")
    return problems


class SweepReplay:
    """Runs a sweep's command the way ``wandb agent`` would, up to ``raeg pipeline``'s config."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        import wandb.wandb_agent as wandb_agent

        import raeg_pl.pipeline as pipeline

        self.tmp = tmp_path
        self.mp = monkeypatch
        self.spawned: list[dict] = []
        self.pipelines: list[dict] = []
        spawned, pipelines = self.spawned, self.pipelines

        class RecordedProcess:
            """Stands in for the agent's child process: records the command and env."""

            def __init__(self, env=None, command=None, **_: Any) -> None:
                spawned.append({"command": list(command), "env": dict(env)})

        class RecordedPipeline:
            """Stands in for the experiment: records the config it was given."""

            def __init__(self, cfg: dict, run_dir=None, stop_after=None) -> None:
                pipelines.append({"cfg": cfg, "run_dir": run_dir})

            def run(self) -> dict:
                return {}

        monkeypatch.setattr(wandb_agent, "AgentProcess", RecordedProcess)
        monkeypatch.setattr(pipeline, "Pipeline", RecordedPipeline)
        # The agent writes these into os.environ; setting them first lets pytest restore them.
        (tmp_path / "wandb_dir").mkdir()
        monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
        monkeypatch.setenv("WANDB_SWEEP_ID", SWEEP_ID)
        monkeypatch.setenv("WANDB_RUN_ID", "unset")
        monkeypatch.setenv("WANDB_SWEEP_PARAM_PATH", "unset")
        monkeypatch.setenv("WANDB_MODE", "disabled")
        # A stand-in `raeg` first on PATH: it writes its arguments, NUL-separated.
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        fake = bin_dir / "raeg"
        fake.write_text('#!/usr/bin/env bash\nprintf \'%s\\0\' "$@" > "$RAEG_ARGV_OUT"\n')
        fake.chmod(0o755)
        self.bin_dir = bin_dir
        self.agent = wandb_agent.Agent(api=None, queue=None, sweep_id=SWEEP_ID)

    def agent_command(self, sweep: Mapping, params: Mapping[str, Any], run_id: str) -> dict:
        """The command and env the agent would start for one run with ``params``."""
        self.agent._sweep_command = copy.deepcopy(sweep.get("command") or [])
        self.agent._command_run(
            {
                "run_id": run_id,
                "program": sweep.get("program"),
                "args": {k: {"value": v} for k, v in params.items()},
            }
        )
        return self.spawned[-1]

    def raeg_argv(self, spawned: dict) -> list[str]:
        """What ``raeg`` receives when the agent's command runs (through bash, env...)."""
        out = self.tmp / "argv.bin"
        out.unlink(missing_ok=True)
        env = {
            **spawned["env"],
            "PATH": f"{self.bin_dir}{os.pathsep}{spawned['env'].get('PATH', '')}",
            "RAEG_ARGV_OUT": str(out),
        }
        proc = subprocess.run(
            spawned["command"], env=env, cwd=REPO, capture_output=True, text=True, timeout=30
        )
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(
                f"the command did not reach raeg (exit {proc.returncode}): {proc.stderr[-500:]}"
            )
        return out.read_bytes().decode().split("\0")[:-1]

    def run_pipeline_cli(self, argv: list[str]) -> dict:
        """``raeg <argv>`` through the real console entry point, the pipeline recorded."""
        from raeg_pl.cli import main

        before = len(self.pipelines)
        rc = main(argv)
        if rc != 0 or len(self.pipelines) != before + 1:
            raise RuntimeError(f"raeg {argv[:2]} returned {rc} without starting the pipeline")
        return self.pipelines[-1]


def sweep_problems(sweep: Mapping, replay: SweepReplay) -> list[str]:
    """Everything wrong with one sweep; empty when the sweep is good to submit."""
    problems = format_problems(sweep)
    violations = wandb_schema_violations(sweep)
    if violations:
        problems += [f"wandb schema: {v}" for v in violations]
    command = sweep.get("command")
    if not command:
        return [*problems, "no command: wandb would run `python <program> --key=value`"]
    problems += macro_problems(command)
    if problems:
        return problems
    schema = pipeline_schema()
    run_dirs: list[str] = []
    for i, params in enumerate(assignments(sweep)):
        run_id = f"run{i:03d}"
        spawned = replay.agent_command(sweep, params, run_id)
        try:
            argv = replay.raeg_argv(spawned)
        except RuntimeError as err:
            return [*problems, str(err)]
        if argv[:1] != ["pipeline"]:
            return [*problems, f"the command runs `raeg {' '.join(argv[:1])}`, not the pipeline"]
        try:
            recorded = replay.run_pipeline_cli(argv)
        except (SystemExit, ValueError, KeyError, IndexError, RuntimeError) as err:
            return [*problems, f"{params}: raeg pipeline refused {argv[1:]}: {err!r}"]
        cfg = recorded["cfg"]
        run_dirs.append(str(recorded["run_dir"] or cfg.get("run_dir")))
        if not (cfg.get("wandb") or {}).get("enabled"):
            problems.append("wandb is not enabled for the runs: the sweep would see no metric")
        for key, value in params.items():
            try:
                tp = resolve(schema, key)
            except KeyError as err:
                problems.append(f"unknown swept key: {err.args[0]}")
                continue
            got = _get(cfg, key)
            if not accepts(tp, got):
                problems.append(
                    f"{key}={value!r} reaches the pipeline as {got!r} ({type(got).__name__}),"
                    f" not {tp}"
                )
            elif got != pytest.approx(value):
                problems.append(f"{key}={value!r} reaches the pipeline as {got!r}")
    if len(set(run_dirs)) != len(run_dirs):
        problems.append(f"runs share a run directory: {sorted(set(run_dirs))}")
    if any(SWEEP_ID not in d for d in run_dirs):
        problems.append(f"run directories do not name the sweep: {run_dirs[:2]}")
    return sorted(set(problems), key=problems.index)


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


@pytest.fixture()
def replay(tmp_path, monkeypatch) -> SweepReplay:
    return SweepReplay(tmp_path, monkeypatch)


# ------------------------------------------------------------------------------ tests
def test_the_sweeps_exist():
    assert {p.stem for p in SWEEPS} >= REQUIRED


def test_the_schema_covers_the_pipeline_keys():
    from raeg_pl.pipeline import PIPELINE_KEYS

    assert set(pipeline_schema()) == set(PIPELINE_KEYS)


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_sweep_is_valid_and_reaches_the_pipeline(path, replay):
    sweep = _load(path)
    assert sweep_problems(sweep, replay) == []
    # Every sampled value of every parameter went through the agent and the pipeline.
    assert len(replay.pipelines) == len(assignments(sweep)) >= 2


class _StandIn(dict):
    """A stage result that answers any key (with ``default``), as far as summarise reads."""

    def __init__(self, default: Any, **items: Any) -> None:
        super().__init__(**items)
        self.default = default

    def __missing__(self, key: str) -> Any:
        return self.default


def _summary_keys(tmp_path: Path) -> set[str]:
    """The top-level keys of the pipeline's results.json, from ``summarise`` itself.

    The stage results are stand-ins; only the key names of the returned summary are used.
    """
    from raeg_pl.pipeline import summarise

    cfg = load_quick()
    classifier = _StandIn(0.5, test_acc_curve=[0.5], splits={})
    (tmp_path / "protector").mkdir()
    (tmp_path / "protector" / "results.json").write_text('{"metrics": {}, "splits": {}}')
    for i in range(len(cfg["surrogates"])):
        (tmp_path / f"surrogate_{i}").mkdir()
        (tmp_path / f"surrogate_{i}" / "results.json").write_text('{"test_acc": 0.9, "splits": {}}')
    exp = _StandIn(0.0, surrogate_acc_protected_by_defense={"none": 0.1})
    return set(summarise(cfg, tmp_path, exp, _StandIn(classifier)))


def load_quick() -> dict:
    from raeg_pl.pipeline import load_pipeline_config

    return load_pipeline_config(REPO / "experiments" / "protect" / "quick.yaml")


def test_sweep_metrics_are_pipeline_results(tmp_path):
    keys = _summary_keys(tmp_path)
    assert {"pirate_acc", "psnr_protected", "authorized_acc"} <= keys
    for path in SWEEPS:
        metric = _load(path)["metric"]["name"]
        assert metric in keys, f"{path.name}: {metric!r} is not a key of results.json"


# ---------------------------------------------------------------- the checks can fail
def _weights() -> dict:
    return _load(REPO / "experiments" / "sweeps" / "protector_weights.yaml")


def test_a_misspelt_parameter_fails(replay):
    sweep = _weights()
    sweep["parameters"]["protector.model.l_advv"] = sweep["parameters"].pop("protector.model.l_adv")
    problems = sweep_problems(sweep, replay)
    assert any("l_advv" in p and "unknown swept key" in p for p in problems), problems


def test_a_misspelt_section_fails(replay):
    sweep = _weights()
    sweep["parameters"]["protecter.model.l_adv"] = sweep["parameters"].pop("protector.model.l_adv")
    problems = sweep_problems(sweep, replay)
    # load_pipeline_config refuses unknown top-level keys.
    assert any("refused" in p and "unknown" in p and "protecter" in p for p in problems), problems


def test_a_key_the_pipeline_sets_itself_fails(replay):
    sweep = _weights()
    sweep["parameters"] = {"protector.model.in_channels": {"values": [1, 3]}}
    problems = sweep_problems(sweep, replay)
    assert any("in_channels" in p for p in problems), problems


def test_a_value_yaml_reads_as_text_is_taken_as_a_number(replay):
    # wandb writes 1e-05 as "1e-05", which YAML 1.1 reads as a string; the pipeline's
    # override parser reads it as the number it is.
    sweep = _weights()
    sweep["parameters"]["protector.model.l_keep"] = {
        "distribution": "log_uniform_values",
        "min": 1.0e-5,
        "max": 1.0e-3,
    }
    assert sweep_problems(sweep, replay) == []
    from raeg_pl.pipeline import load_pipeline_config

    quick = REPO / "experiments" / "protect" / "quick.yaml"
    cfg = load_pipeline_config(quick, ["protector.model.l_keep=1e-05"])
    assert cfg["protector"]["model"]["l_keep"] == 1e-05


def test_a_wrong_value_type_fails(replay):
    sweep = _weights()
    sweep["parameters"]["protector.model.adv_mode"] = {"values": [3, 4]}
    problems = sweep_problems(sweep, replay)
    assert any("adv_mode=3" in p for p in problems), problems


def test_hyphenated_args_fail(replay):
    sweep = _weights()
    sweep["command"] = [c.replace("${args_no_hyphens}", "${args}") for c in sweep["command"]]
    problems = sweep_problems(sweep, replay)
    assert any("args_no_hyphens" in p for p in problems), problems


def test_an_unknown_macro_fails(replay):
    sweep = _weights()
    sweep["command"] = [*sweep["command"], "${arguments}"]
    problems = sweep_problems(sweep, replay)
    assert any("unknown macro '${arguments}'" in p for p in problems), problems


def test_a_shared_run_dir_fails(replay):
    sweep = _weights()
    sweep["command"] = [
        c.replace('--run_dir "runs/sweeps/$WANDB_SWEEP_ID/$WANDB_RUN_ID"', "")
        for c in sweep["command"]
    ]
    problems = sweep_problems(sweep, replay)
    assert any("share a run directory" in p for p in problems), problems


def test_format_problems_are_found():
    sweep = _weights()
    assert format_problems(sweep) == []
    bad = {**sweep, "method": "hyperopt", "metric": {"name": "pirate_acc", "goal": "lowest"}}
    bad["parameters"] = {
        "a": {"distribution": "log_uniform_values", "min": 0.0, "max": 1.0},
        "b": {"min": 2, "max": 1},
        "c": {"distribution": "gaussian", "min": 0, "max": 1},
        "d b": {"values": [1]},
    }
    problems = format_problems(bad)
    for fragment in ("method 'hyperopt'", "goal 'lowest'", "a: log_uniform_values needs min > 0"):
        assert any(fragment in p for p in problems), (fragment, problems)
    assert any(p.startswith("b: min 2") for p in problems)
    assert any("unknown distribution 'gaussian'" in p for p in problems)
    assert any("'d b'" in p for p in problems)


# ------------------------------------------------------------------ the SLURM example
SBATCH = REPO / "experiments" / "slurm" / "train_ddp.sbatch"


def _sbatch_srun_calls(tmp_path: Path, extra_env: Mapping[str, str], *args: str) -> list[list]:
    """The script run as SLURM would run it, with a stand-in ``srun`` recording its args."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    record = tmp_path / "srun_calls"
    srun = bin_dir / "srun"
    srun.write_text(
        f'#!/usr/bin/env bash\nprintf \'%s\\0\' "$@" >> "{record}"\necho >> "{record}"\n'
    )
    srun.chmod(0o755)
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "SLURM_SUBMIT_DIR": str(REPO),
        "SLURM_JOB_NAME": "raeg-ddp",
        "SLURM_JOB_ID": "4242",
        **extra_env,
    }
    proc = subprocess.run(
        ["bash", str(SBATCH), *args], env=env, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stderr
    calls = record.read_text().split("\n")[:-1]
    return [c.split("\0")[:-1] for c in calls]


def _parse_fit_args(args: list[str]):
    """``raeg fit`` argument parsing (LightningCLI, config files, types), nothing built."""
    from raeg_pl.cli import expand_config_args
    from raeg_pl.data.datamodule import ImageClassificationDataModule
    from raeg_pl.lit.classifier import ClassifierLitModule
    from raeg_pl.trainer_cli import RaegCLI

    class ParseOnly(RaegCLI):
        def instantiate_classes(self) -> None:
            pass

        def _add_configure_optimizers_method_to_model(self, subcommand) -> None:
            pass

        def _run_subcommand(self, subcommand: str) -> None:
            pass

    cli = ParseOnly(
        ClassifierLitModule,
        ImageClassificationDataModule,
        args=expand_config_args(args),
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )
    return cli.config[cli.subcommand]


def test_sbatch_script_is_valid_bash():
    proc = subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_sbatch_tasks_per_node_match_the_gpus():
    directives = dict(
        line.removeprefix("#SBATCH ").split("=", 1)
        for line in SBATCH.read_text().splitlines()
        if line.startswith("#SBATCH --") and "=" in line
    )
    # Lightning: one task per GPU (Trainer devices == --ntasks-per-node).
    assert directives["--gres"] == f"gpu:{directives['--ntasks-per-node']}"
    assert directives["--signal"].startswith("SIGUSR1@")
    assert directives["--job-name"] not in ("bash", "interactive")  # would disable SLURM mode


def test_sbatch_raeg_command_parses(tmp_path, monkeypatch):
    calls = _sbatch_srun_calls(
        tmp_path,
        {"SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "4", "SLURM_CPUS_PER_TASK": "8"},
        "--trainer.max_epochs",
        "3",
    )
    assert len(calls) == 1, calls
    (call,) = calls
    raeg = next(i for i, a in enumerate(call) if a.endswith("/bin/raeg"))
    assert call[raeg] == ".venv/bin/raeg"
    args = call[raeg + 1 :]
    assert args[0] == "fit"
    configs = [args[i + 1] for i, a in enumerate(args) if a == "--config"]
    assert configs == ["experiments/surrogate/paper.yaml", "experiments/_base/ddp.yaml"]
    for c in configs:
        assert (REPO / c).is_file(), c
    monkeypatch.chdir(REPO)
    cfg = _parse_fit_args(args)
    # jsonargparse keeps "4" a string (devices: list[int] | str | int); Lightning reads a
    # digit string as a device count, the number its SLURM check compares with.
    assert cfg.trainer.num_nodes == 2 and int(cfg.trainer.devices) == 4
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.sync_batchnorm is True
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.max_epochs == 3
    assert cfg.model.arch == "resnet18_cifar" and cfg.data.batch_size == 256
    # A requeued job keeps its job id, so it finds its run directory (and checkpoint) again.
    assert cfg.run_dir == "runs/slurm/raeg-ddp-4242"
    # The global batch splits evenly over the 8 ranks.
    assert cfg.data.batch_size % (2 * 4) == 0


def test_sbatch_config_can_be_swapped(tmp_path, monkeypatch):
    (call,) = _sbatch_srun_calls(
        tmp_path,
        {
            "SLURM_NNODES": "1",
            "SLURM_NTASKS_PER_NODE": "2",
            "CONFIG": "experiments/surrogate/quick.yaml",
            "RUN_DIR": "runs/x",
        },
    )
    args = call[call.index(".venv/bin/raeg") + 1 :]
    monkeypatch.chdir(REPO)
    cfg = _parse_fit_args(args)
    assert cfg.model.arch == "resnet_tiny_cifar" and int(cfg.trainer.devices) == 2
    assert cfg.run_dir == "runs/x"
