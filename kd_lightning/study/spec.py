"""The study spec: the YAML file (format: ``configs/studies/README.md``), its presets, and the
checks that run before any training. Every run's configuration is parsed once, by the CLI's own
parser, so run arguments are understood in every form the CLI accepts."""

from __future__ import annotations

import hashlib
import itertools
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kd_lightning import KDConfigError
from kd_lightning.jobs import parse_error_text, parse_run, run_parser

FULL, DEFAULT, DEFAULT_STEPS = "full", "default", 2000
#: what a budget M counts (``budget_unit``): labelled examples in all (the default), or per class
TOTAL, PER_CLASS = "total", "per_class"
BUDGET_UNITS = {TOTAL: "labelled examples", PER_CLASS: "per class"}
#: run settings the study gives every run itself; a spec may not set them
CONTROLLED = ("seed_everything", "data.train_subset", "data.train_subset_per_class", "data.subset_seed",
              "trainer.max_epochs", "trainer.max_steps", "model.init_args.teacher_checkpoint",
              "test_after_fit")
STUDY_KEYS = ("name", "output", "teacher", "budgets", "budget_unit", "seeds", "steps", "epochs", "args",
              "set", "epoch_args", "methods", "presets")
METHOD_KEYS = ("name", "config", "method", "reference", "args", "set", "grid", "epoch_args")
Budget = int | None  # None is the full training split
NO_DEFAULT = object()


def budget_label(budget: Budget) -> str:
    return FULL if budget is None else str(budget)


def budget_data_args(unit: str, budget: Budget) -> dict[str, int | None]:
    """The data settings that draw a run's labelled subset: ``data.train_subset`` (M in all) or,
    for ``budget_unit: per_class``, ``data.train_subset_per_class`` (M per class)."""
    return {"train_subset": None, "train_subset_per_class": budget} if unit == PER_CLASS else {"train_subset": budget}


@dataclass(frozen=True)
class PerBudget:
    """A setting whose value depends on the budget M, written ``{50: 500, full: 3000}``; an
    optional ``default`` entry serves every budget the mapping does not name."""

    values: dict  # budget (None for full) -> value
    default: Any = NO_DEFAULT

    def covers(self, budget: Budget) -> bool:
        return budget in self.values or self.default is not NO_DEFAULT

    def at(self, budget: Budget) -> Any:  # KeyError for a budget it does not cover
        return self.values[budget] if self.default is NO_DEFAULT else self.values.get(budget, self.default)

    def raw(self) -> dict[str, Any]:
        """The mapping as written (string keys, for the study's identity)."""
        out = {budget_label(b): v for b, v in self.values.items()}
        return out if self.default is NO_DEFAULT else {**out, DEFAULT: self.default}


def _budget_key(key: Any) -> Any:
    """A per-budget mapping's key as a budget (None: full), ``default``, or NO_DEFAULT if neither."""
    if isinstance(key, str) and key.lower() in (FULL, DEFAULT):
        return None if key.lower() == FULL else DEFAULT
    key = int(key) if isinstance(key, str) and key.isdecimal() else key
    return key if isinstance(key, int) and not isinstance(key, bool) and key >= 1 else NO_DEFAULT


def per_budget(value: Any, where: str) -> Any:
    """``value``, or a :class:`PerBudget` if it is a mapping whose keys are all budgets."""
    if not isinstance(value, dict) or not value:
        return value
    keys = {k: _budget_key(k) for k in value}
    bad = [k for k, b in keys.items() if b is NO_DEFAULT]
    if len(bad) == len(value):
        return value  # an ordinary mapping value (e.g. a class_path/init_args block)
    require(not bad, f"{where} mixes budgets and other keys ({', '.join(map(repr, bad))}). A per-budget value is "
            f"a mapping from budgets (positive integers or '{FULL}') and optionally '{DEFAULT}' to values, e.g. "
            f"{{50: 2.0, {FULL}: 0.3}}.")
    return PerBudget({b: value[k] for k, b in keys.items() if b != DEFAULT},
                     next((value[k] for k, b in keys.items() if b == DEFAULT), NO_DEFAULT))


def at_budget(value: Any, budget: Budget) -> Any:
    return value.at(budget) if isinstance(value, PerBudget) else value


def override_args(settings: dict[str, Any]) -> list[str]:
    """``--key value`` for each setting (strings as they are; other values as JSON)."""
    return [tok for key, value in settings.items()
            for tok in (f"--{key}", value if isinstance(value, str) else json.dumps(value))]


@dataclass
class MethodSpec:
    """One column of the table: a ``kd-lightning fit`` config plus the study's settings for it."""

    name: str
    config: str
    args: list[str] = field(default_factory=list)
    set: dict[str, Any] = field(default_factory=dict)  # dotted key -> value or PerBudget
    grid: dict[str, Any] = field(default_factory=dict)  # dotted key -> list or PerBudget of lists
    epoch_args: dict[str, float] = field(default_factory=dict)
    reference: bool = False  # the student-alone baseline: drawn as the reference line
    method: str | None = None  # class name, checked against the config's model.class_path
    run_config: Any = None  # the parsed configuration (config, study and method args, --trainer.*)


@dataclass
class StudySpec:
    name: str
    output: str
    teacher_config: str
    teacher_args: list[str]
    budgets: list[Budget]
    seeds: list[int]
    steps: Any  # int, PerBudget or None
    methods: list[MethodSpec]
    epochs: Any = None  # int, PerBudget or None
    args: list[str] = field(default_factory=list)
    set: dict[str, Any] = field(default_factory=dict)
    epoch_args: dict[str, float] = field(default_factory=dict)
    path: str = ""  # the study YAML
    budget_unit: str = TOTAL  # what M counts: labelled examples in all, or per class
    teacher_run_config: Any = None
    _run_configs: dict = field(default_factory=dict, repr=False)

    def resolve(self, path: str) -> str:
        """A config path as written, if it exists from here; else relative to the study file."""
        p, beside = Path(path), Path(self.path).parent / path
        return str(beside if self.path and not (p.is_absolute() or p.exists()) and beside.exists() else p)

    def identity(self) -> dict:
        """What makes two studies the same study (their results are comparable)."""
        def digest(path: str) -> str:
            return hashlib.sha256(Path(self.resolve(path)).read_bytes()).hexdigest()[:16]

        def raw(value: Any) -> Any:
            return value.raw() if isinstance(value, PerBudget) else value

        def settings(owner) -> dict:
            return {k: {key: raw(v) for key, v in getattr(owner, k).items()}
                    for k in ("set", "grid") if getattr(owner, k, None)}

        return {"name": self.name, "steps": raw(self.steps), "args": self.args,
                "teacher": {"config": digest(self.teacher_config), "args": self.teacher_args},
                "epoch_args": self.epoch_args,
                "methods": [{"name": m.name, "config": digest(m.config), "args": m.args,
                             "epoch_args": m.epoch_args, **settings(m)} for m in self.methods],
                **settings(self), **({} if self.epochs is None else {"epochs": raw(self.epochs)}),
                **({} if self.budget_unit == TOTAL else {"budget_unit": self.budget_unit})}

    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:12]

    def length(self, budget: Budget) -> tuple[str, int]:
        """``("steps", n)`` or ``("epochs", n)``: how long a run at this budget trains; the one
        naming the budget wins, else the one with a plain value (or a ``default``)."""
        both = (("epochs", self.epochs), ("steps", self.steps))
        named = [(k, v) for k, v in both if isinstance(v, PerBudget) and budget in v.values]
        fallback = [(k, v) for k, v in both if v is not None and (not isinstance(v, PerBudget) or v.covers(budget))]
        label = budget_label(budget)
        require(len(named) < 2, f"both 'steps' and 'epochs' give a value for M={label} in {self.path}; give one "
                f"of them per budget.")
        require(named or len(fallback) < 2, f"both 'steps' and 'epochs' apply to M={label} in {self.path}; give "
                f"one of them, or name the budgets, e.g. steps: 3000 with epochs: {{{FULL}: 60}}.")
        require(named or fallback, f"no training length for M={label} in {self.path}: give it in 'steps' (optimizer "
                f"steps) or 'epochs'.")
        kind, value = (named or fallback)[0]
        n = at_budget(value, budget)
        require(isinstance(n, int) and not isinstance(n, bool) and n >= 1, f"'{kind}' for M={label} in {self.path} "
                f"is {n!r}; it must be a positive integer.")
        return kind, n

    def settings(self, method: MethodSpec, budget: Budget) -> dict[str, Any]:
        """The ``set`` values of a run: the study's (where the method's config has the key), then its own."""
        return {**{k: at_budget(v, budget) for k, v in self.set.items() if k in method.run_config},
                **{k: at_budget(v, budget) for k, v in method.set.items()}}

    def candidates(self, method: MethodSpec, budget: Budget) -> list[dict[str, Any]]:
        """The grid of a method at this budget, one dict per candidate, in grid order."""
        return [dict(zip(method.grid, combo))
                for combo in itertools.product(*(at_budget(v, budget) for v in method.grid.values()))]

    def run_config(self, method: MethodSpec, overrides: dict[str, Any]):
        """The parsed configuration of a run with these ``set``/grid values (parsed once)."""
        args = override_args(overrides)
        key = (method.name, tuple(args))
        if key not in self._run_configs:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._run_configs[key] = run_parser().parse_args(
                    args, namespace=method.run_config.clone()) if args else method.run_config
        return self._run_configs[key]


def require(ok: Any, message: str) -> None:
    if not ok:
        raise KDConfigError(message)


def _checked(value: Any, kind: type, where: str) -> Any:
    """``value`` (``None``: empty) if it is a ``kind`` (list or mapping), else a config error."""
    what = "a list of command-line arguments, e.g. [--data.batch_size, 50]" if kind is list \
        else "a mapping of dotted run arguments to values, e.g. {model.init_args.eps: 2.0}"
    require(isinstance(value, (kind, type(None))), f"{where} must be {what}, got {value!r}.")
    return kind() if value is None else [str(a) for a in value] if kind is list else value


def _settings(entry: dict, kinds: tuple[str, ...], suffix: str) -> dict[str, Any]:
    """``args``, ``epoch_args`` and the per-budget ``kinds`` (set, grid) of a study or method
    entry, none of them a :data:`CONTROLLED` key; ``suffix`` places them in messages (`` in FILE``
    or `` of method 'X' in FILE``)."""
    out = {"args": _checked(entry.get("args"), list, f"'args'{suffix}")}
    for kind in (*kinds, "epoch_args"):
        values = _checked(entry.get(kind), dict, f"'{kind}'{suffix}")
        for key in values:
            require(key not in CONTROLLED, f"'{kind}'{suffix} sets {key}, which the study sets itself for every "
                    f"run (controlled: {', '.join(CONTROLLED)}).")
        out[kind] = {str(k): float(v) for k, v in values.items()} if kind == "epoch_args" else \
            {k: per_budget(v, f"'{kind}: {k}'{suffix}") for k, v in values.items()}
    return out


def _known_keys(entry: dict, valid: tuple[str, ...], where: str) -> None:
    unknown = ", ".join(repr(k) for k in entry if k not in valid)
    require(not unknown, f"{where} has unknown key(s) {unknown}; valid keys: {', '.join(valid)}.")


def load_study(path: str | Path, preset: str | None = None,
               run_args: list[str] | tuple[str, ...] = ()) -> StudySpec:
    """Read and check a study YAML. ``preset`` replaces top-level keys with those of ``presets: {NAME:
    ...}`` and suffixes the name and output folder with ``-NAME``; ``run_args`` (the command line's
    ``--trainer.*`` flags) are given to every run."""
    path = Path(path)
    require(path.is_file(), f"study config '{path}' does not exist.")
    raw = yaml.safe_load(path.read_text()) or {}
    require(isinstance(raw, dict), f"study config {path} must be a YAML mapping (name, teacher, methods, ...), got "
            f"{type(raw).__name__}.")
    _known_keys(raw, STUDY_KEYS, f"study config {path}")
    name, output = str(raw.get("name", path.stem)), str(raw.get("output", f"studies/{path.stem}"))
    if preset is not None:
        presets = raw.get("presets") or {}
        require(preset in presets, f"preset '{preset}' is not defined in {path}; defined presets: "
                f"{', '.join(presets) or 'none'}.")
        chosen = presets[preset] or {}
        _known_keys(chosen, STUDY_KEYS[:-1], f"preset '{preset}' of {path}")
        raw = {**raw, **chosen}
        name = str(raw["name"]) if "name" in chosen else f"{name}-{preset}"
        output = str(raw["output"]) if "output" in chosen else f"{output}-{preset}"
    for key in ("teacher", "methods"):
        require(raw.get(key), f"study config {path} has no '{key}' section.")
    teacher = raw["teacher"]
    require(isinstance(teacher, dict) and "config" in teacher, f"'teacher' in {path} must be a mapping with 'config' "
            f"(a kd-lightning fit config) and optionally 'args', got {teacher!r}.")
    _known_keys(teacher, ("config", "args"), f"'teacher' in {path}")
    written = raw.get("budgets", [50, 100, 500, 1000, FULL])
    budgets = [_budget_key(b) for b in written]
    for b, key in zip(written, budgets):
        require(key not in (NO_DEFAULT, DEFAULT), f"budget {b!r} in {path} is not a positive integer or '{FULL}'.")
    unit = raw.get("budget_unit", TOTAL)
    require(unit in BUDGET_UNITS, f"budget_unit in {path} is {unit!r}; it must be '{TOTAL}' (M labelled "
            f"examples in all, the default) or '{PER_CLASS}' (M labelled examples of every class).")
    seeds = raw.get("seeds", [0, 1, 2])
    require(budgets and seeds, f"study config {path} needs at least one budget and one seed.")
    require(len(set(budgets)) == len(budgets) and len(set(map(str, seeds))) == len(seeds),
            f"budgets and seeds in {path} must not repeat, got budgets {raw.get('budgets')} and seeds {seeds}.")
    require(all(isinstance(s, int) and not isinstance(s, bool) for s in seeds), f"seeds in {path} must be integers, "
            f"got {seeds}.")
    steps = per_budget(raw.get("steps"), f"'steps' in {path}")
    epochs = per_budget(raw.get("epochs"), f"'epochs' in {path}")
    spec = StudySpec(name=name, output=output, teacher_config=str(teacher["config"]),
                     teacher_args=_checked(teacher.get("args"), list, f"'teacher: args' in {path}"),
                     budgets=budgets, seeds=list(seeds), methods=[], epochs=epochs, path=str(path), budget_unit=unit,
                     steps=DEFAULT_STEPS if steps is None and epochs is None else steps,
                     **_settings(raw, ("set",), f" in {path}"))
    for b in budgets:
        spec.length(b)  # every budget has exactly one training length
    teacher_cfg = spec.resolve(spec.teacher_config)
    require(Path(teacher_cfg).is_file(), f"teacher config '{spec.teacher_config}' (in {path}) does not exist.")
    spec.teacher_run_config = parse_run(teacher_cfg, [*spec.teacher_args, *run_args], f"the teacher of {path}")
    require(isinstance(raw["methods"], list), f"'methods' in {path} must be a list of entries with name and config.")
    spec.methods = [_load_method(entry, spec, path, list(run_args)) for entry in raw["methods"]]
    names = [m.name for m in spec.methods]
    require(len(set(names)) == len(names), f"method names in {path} must be unique, got {names}.")
    for k in spec.set:
        require(any(k in m.run_config for m in spec.methods), f"'set: {k}' in {path} is an argument of none of the "
                f"methods' runs (write the full dotted name, as in --{k}).")
    return spec


def _load_method(entry: Any, spec: StudySpec, path: Path, run_args: list[str]) -> MethodSpec:
    require(isinstance(entry, dict) and "name" in entry and "config" in entry, f"every entry of 'methods' in {path} "
            f"needs a name and a config (a kd-lightning fit config), got {entry!r}.")
    where = f"method '{entry['name']}' in {path}"
    _known_keys(entry, METHOD_KEYS, where)
    m = MethodSpec(name=str(entry["name"]), config=str(entry["config"]), reference=bool(entry.get("reference", False)),
                   method=entry.get("method"), **_settings(entry, ("set", "grid"), f" of {where}"))
    from kd_lightning.methods import METHODS

    require(m.method is None or m.method in METHODS, f"unknown method '{m.method}' in study config {path}. "
            f"Valid methods: {', '.join(METHODS)}.")
    cfg = spec.resolve(m.config)
    require(Path(cfg).is_file(), f"{where}: config '{m.config}' does not exist.")
    m.run_config = parse_run(cfg, [*spec.args, *m.args, *run_args], where)
    class_path = m.run_config.model.class_path
    require(m.method in (None, class_path.rsplit(".", 1)[-1]),
            f"{where} says method: {m.method} but its config {m.config} trains {class_path}.")
    for kind in ("set", "grid", "epoch_args"):
        for key in getattr(m, kind):
            parent = key.rsplit(".", 1)[0] if "." in key and key not in m.run_config else ""
            node = m.run_config.get(parent) if parent else None
            names = sorted({k.split(".")[0] for k in node.keys()}) if hasattr(node, "keys") else []
            require(key in m.run_config, f"'{kind}' of {where}: '{key}' is not an argument of the run "
                    f"configured by {m.config} (write the full dotted name, as in --{key})."
                    + (f" Arguments under {parent}: {', '.join(names)}." if names else ""))
            require(kind != "grid" or key not in m.set, f"{where} gives {key} in both 'set' and 'grid'; keep one.")
    for b in spec.budgets:
        label = budget_label(b)
        for key, value in m.grid.items():
            values = value.at(b) if isinstance(value, PerBudget) and value.covers(b) else value
            require(isinstance(values, list) and values, f"'grid: {key}' of {where} has no list of candidates for "
                    f"M={label}: give a non-empty list, e.g. [0.3, 1, 2], or one per budget, e.g. "
                    f"{{{FULL}: [0.1, 0.3], {DEFAULT}: [1, 2]}}.")
        for key, value in [*spec.set.items(), *m.set.items()]:
            require(not isinstance(value, PerBudget) or value.covers(b) or key not in m.run_config, f"'set: {key}' "
                    f"for {where} has no value for M={label}: name the budget or add a '{DEFAULT}' entry.")
        for candidate in spec.candidates(m, b):
            values = {**spec.settings(m, b), **candidate}
            try:
                spec.run_config(m, values)
            except Exception as err:  # noqa: BLE001
                raise KDConfigError(f"{where} at M={label}: the values {values} do not parse: "
                                    f"{parse_error_text(err)}") from None
    # a method distilling from a teacher network must configure the network the study's teacher
    # trains, or the cached teacher weights will not load into it
    wanted = m.run_config.model.init_args.get("teacher")
    trained = spec.teacher_run_config.model.init_args.get("student")
    if hasattr(wanted, "as_dict") and hasattr(trained, "as_dict") and wanted.as_dict() != trained.as_dict():
        args = [", ".join(f"{k}={v!r}" for k, v in (n.as_dict().get("init_args") or {}).items())
                for n in (wanted, trained)]
        raise KDConfigError(f"{where} distils from the teacher network {wanted.class_path}({args[0]}) but the "
                            f"study's teacher (teacher: config: {spec.teacher_config}) trains {trained.class_path}"
                            f"({args[1]}), whose weights would not fit. Make model.init_args.teacher of {m.config} "
                            f"the network of model.init_args.student in {spec.teacher_config}.")
    return m
