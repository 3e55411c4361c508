"""Benchmark grids: data sets x models x attacks x defenses x seeds, from one YAML file.

A grid expands into *victims* (data x model x attack x seed; each trained once) and *cells*: the
victim's own cell (defense ``none``: CA / ASR before any defense) plus one cell per defense run
against it. Every cell has a deterministic id (a hash of the grid name, the victim's configuration
and the defense's parameters, its defaults included), so an interrupted ``bench`` resumes where it
stopped, and a library whose defaults changed runs the affected cells again.

YAML form (every list but ``attacks`` has a default)::

    name: seed000-mnist
    base: {train: {epochs: 4}, data: {holdout_fraction: 0.1}}   # experiment keys shared by all cells
    datasets: [{name: mnist5k}]                                   # data sections (+ optional label)
    models: [{name: cnn}]
    attacks: [{name: badnets, mode: source-specific, source: 7, target: 1, rate: 0.3, label: b71}]
    defenses: [{name: pairwise}, {name: pattern-subtraction}]
    seeds: [0]
    overrides:                                                   # per-cell changes, first match wins last
      - match: {attack: b71}
        set: {train.epochs: 3, defense.images_per_class: 20}

``match`` keys are ``data``, ``model``, ``attack``, ``defense``, ``seed`` (labels); ``set`` keys are
dotted experiment keys (``train.epochs``, ``attack.rate``, ...) or ``defense.<param>``. An override
that changes the victim (anything but ``defense.*``) may not match on ``defense``: the victim is
shared by all the defenses.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from backdoorlab.config import DefenseSection, ExperimentConfig
from backdoorlab.errors import BackdoorLabError, format_validation_error

_MATCH_KEYS = ("data", "model", "attack", "defense", "seed")


class CellOverride(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    match: dict[str, Union[str, int]] = Field(default_factory=dict, description="labels a cell must have")
    set: dict[str, Any] = Field(description="dotted keys -> values, e.g. train.epochs: 3")


class GridSpec(BaseModel):
    """A benchmark grid (validated). Entries are experiment sections plus an optional ``label``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="grid name: letters, digits, _ . -")
    description: str = ""
    base: dict[str, Any] = Field(default_factory=dict, description="experiment keys shared by every cell")
    datasets: list[dict[str, Any]] = Field(default_factory=lambda: [{"name": "mnist5k"}])
    models: list[dict[str, Any]] = Field(default_factory=lambda: [{"name": "cnn"}])
    attacks: list[Optional[dict[str, Any]]]
    defenses: list[dict[str, Any]] = Field(default_factory=list)
    seeds: list[int] = Field(default_factory=lambda: [0])
    overrides: list[CellOverride] = Field(default_factory=list)
    sample: Optional[int] = Field(None, ge=1, description="population: keep every clean victim (attack null) and this many "
                                  "backdoored victims drawn from the product with sample_seed")
    sample_seed: int = 0


@dataclass(frozen=True)
class Cell:
    """One unit of a grid's results. ``config`` is the victim's experiment (``defenses`` holds this
    cell's defense, or nothing for the victim's own cell)."""

    cell_id: str
    grid: str
    kind: str  # "victim" or "defense"
    data: str
    model: str
    attack: str
    defense: str  # "none" for the victim cell
    family: str  # the defense family, "victim" for the victim cell
    seed: int
    victim_key: str
    config: ExperimentConfig

    def labels(self) -> dict[str, Any]:
        return {"data": self.data, "model": self.model, "attack": self.attack, "defense": self.defense, "seed": self.seed}

    def title(self) -> str:
        return f"{self.data}/{self.model}/{self.attack}/{self.defense}/seed{self.seed}"


@dataclass(frozen=True)
class VictimGroup:
    """A victim (trained once) and the defense cells run against it."""

    victim: Cell
    defenses: tuple[Cell, ...]
    training_attack: bool = False  # trained by a TrainingAttack: not cacheable, defenses run in the same task

    @property
    def cells(self) -> tuple[Cell, ...]:
        return (self.victim, *self.defenses)


@dataclass(frozen=True)
class Grid:
    spec: GridSpec
    groups: tuple[VictimGroup, ...] = field(default_factory=tuple)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def cells(self) -> list[Cell]:
        return [c for g in self.groups for c in g.cells]


# ----------------------------------------------------------------------------- loading
def load_grid(path: str | Path, overrides: list[str] | None = None) -> Grid:
    """Read, validate and expand a grid YAML. Every problem is reported at once, before anything runs."""
    from backdoorlab.validate import read_yaml_mapping, resolve_grid_paths

    p = Path(path)
    doc = resolve_grid_paths(read_yaml_mapping(p, "grid", "{name: my-grid, attacks: [{name: badnets}]} "
                                               "(see configs/grids/)"), p.parent)
    if overrides:
        from backdoorlab.config import apply_overrides

        doc = apply_overrides(doc, overrides)
    return expand(parse_spec(doc, where=str(p)))


def parse_spec(doc: dict[str, Any], where: str = "grid") -> GridSpec:
    try:
        spec = GridSpec.model_validate(doc)
    except ValidationError as exc:
        raise BackdoorLabError(f"{where}: {format_validation_error(exc)}") from exc
    empty = [k for k in ("datasets", "models", "attacks", "seeds") if not getattr(spec, k)]
    if empty:
        raise BackdoorLabError(f"{where}: grid {spec.name!r} has no cells: {', '.join(empty)} "
                               f"{'is' if len(empty) == 1 else 'are'} empty; list at least one entry in each")
    return spec


def _names(entries: list[dict[str, Any] | None], what: str, where: str) -> list[str]:
    out = []
    for i, e in enumerate(entries):
        if e is None:
            out.append("none")
            continue
        if not isinstance(e, dict) or "name" not in e:
            raise BackdoorLabError(f"{where}: {what}.{i}: each entry needs a name, e.g. {{name: badnets}}")
        out.append(str(e["name"]))
    return out


def _labels(entries: list[dict[str, Any] | None], names: list[str], what: str, where: str) -> list[str]:
    labels = [str(e.get("label", n)) if e else n for e, n in zip(entries, names)]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise BackdoorLabError(f"{where}: {what} {', '.join(map(repr, dup))} appear more than once; "
                               "give each entry a distinct label: (e.g. {name: badnets, label: badnets-3x3})")
    return labels


def check_names(spec: GridSpec, where: str = "grid") -> None:
    """All unknown data set / model / attack / defense names, in one error."""
    from backdoorlab.attacks import ATTACKS
    from backdoorlab.data import DATASETS
    from backdoorlab.defenses import DEFENSES
    from backdoorlab.models import MODELS

    problems = []
    for what, entries, reg in (("data set", spec.datasets, DATASETS), ("model", spec.models, MODELS),
                               ("attack", spec.attacks, ATTACKS), ("defense", spec.defenses, DEFENSES)):
        names = _names(entries, what + "s", where)
        unknown = sorted({n for n in names if n not in reg and not (what == "attack" and n == "none")})
        if unknown:
            s = "s" if len(unknown) > 1 else ""
            problems.append(f"unknown {what}{s} {', '.join(map(repr, unknown))} (known: {', '.join(reg.names())})")
    if problems:
        raise BackdoorLabError(f"{where}: " + "; ".join(problems))


def _set_path(doc: dict[str, Any], dotted: str, value: Any) -> None:
    from backdoorlab.config import set_path

    set_path(doc, [p for p in dotted.split(".") if p], value, f"override {dotted!r}")


def _checked(errors: list[str], title: str, fn):
    """``fn()``, or None with its error appended to ``errors`` (so that all are reported at once)."""
    try:
        return fn()
    except ValidationError as exc:
        errors.append(f"{title}: {format_validation_error(exc)}")
    except BackdoorLabError as exc:
        errors.append(f"{title}: {exc}")
    return None


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _matches(match: dict[str, Any], labels: dict[str, Any]) -> bool:
    return all(str(labels.get(k)) == str(v) for k, v in match.items())


def resolved_parameters(defense: Any) -> dict[str, Any]:
    """Every parameter of a built defense (a pydantic dataclass), defaults included, as JSON values."""
    from pydantic import TypeAdapter

    return TypeAdapter(type(defense)).dump_python(defense, mode="json")


def cell_id(grid: str, victim: ExperimentConfig, defense: DefenseSection | None, resolved: dict[str, Any] | None = None) -> str:
    """The cell's key: the grid, the victim and the defense with every parameter it runs with
    (``resolved``, defaults included), so that a changed library default makes a new cell instead
    of reusing a result computed with the old one; a default spelled out in the YAML is the same cell."""
    d = None if defense is None else {"name": defense.name, **(resolved if resolved is not None else defense.extras())}
    blob = json.dumps({"grid": grid, "victim": victim.victim_key(), "defense": d}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def expand(spec: GridSpec, where: str = "grid") -> Grid:
    """The grid's victims and cells, each configuration validated (all errors reported together)."""
    from backdoorlab.attacks.base import TrainingAttack
    from backdoorlab.attacks import ATTACKS
    from backdoorlab.defenses import DEFENSES

    check_names(spec, where)
    for i, o in enumerate(spec.overrides):
        bad = sorted(set(o.match) - set(_MATCH_KEYS))
        if bad:
            raise BackdoorLabError(f"{where}: overrides.{i}.match: unknown key(s) {', '.join(bad)}; use {', '.join(_MATCH_KEYS)}")
        victim_keys = [k for k in o.set if not k.startswith("defense.")]
        if "defense" in o.match and victim_keys:
            raise BackdoorLabError(f"{where}: overrides.{i}: {', '.join(victim_keys)} change the victim, which all defenses "
                                   "share; drop 'defense' from match or set only defense.<param> keys")
    d_names = _names(spec.datasets, "datasets", where)
    m_names = _names(spec.models, "models", where)
    a_names = _names(spec.attacks, "attacks", where)
    f_names = _names(spec.defenses, "defenses", where)
    d_labels = _labels(spec.datasets, d_names, "datasets", where)
    m_labels = _labels(spec.models, m_names, "models", where)
    a_labels = _labels(spec.attacks, a_names, "attacks", where)
    f_labels = _labels(spec.defenses, f_names, "defenses", where)

    def strip(e: dict[str, Any] | None) -> dict[str, Any] | None:
        return None if e is None else {k: v for k, v in e.items() if k != "label"}

    groups: list[VictimGroup] = []
    errors: list[str] = []
    seen: dict[str, str] = {}
    for d_entry, d_label in zip(spec.datasets, d_labels):
        for m_entry, m_label in zip(spec.models, m_labels):
            for a_entry, a_label in zip(spec.attacks, a_labels):
                for seed in spec.seeds:
                    vlabels = {"data": d_label, "model": m_label, "attack": a_label, "seed": seed}
                    title = f"{d_label}/{m_label}/{a_label}/seed{seed}"
                    doc = _merge(spec.base, {"name": f"{spec.name}/{d_label}/{m_label}/{a_label}/{seed}", "seed": seed,
                                             "data": strip(d_entry), "model": strip(m_entry)})
                    doc["attack"] = None if a_entry is None else _merge(spec.base.get("attack") or {}, strip(a_entry))
                    doc["defenses"] = []
                    for o in spec.overrides:
                        if "defense" not in o.match and _matches(o.match, vlabels):
                            for k, v in o.set.items():
                                if not k.startswith("defense."):
                                    _set_path(doc, k, v)
                    def victim_config(doc=doc) -> ExperimentConfig:
                        c = ExperimentConfig.model_validate(doc)
                        c.check_components()
                        return c

                    cfg = _checked(errors, title, victim_config)
                    if cfg is None:
                        continue
                    if cfg.victim_key() in seen:
                        errors.append(f"{title}: the same victim as {seen[cfg.victim_key()]}; remove the duplicate entry")
                        continue
                    seen[cfg.victim_key()] = title
                    victim = Cell(cell_id(spec.name, cfg, None), spec.name, "victim", d_label, m_label, a_label, "none",
                                  "victim", seed, cfg.victim_key(), cfg)
                    defense_cells = []
                    for f_entry, f_label in zip(spec.defenses, f_labels):
                        params = strip(f_entry)
                        labels = {**vlabels, "defense": f_label}
                        for o in spec.overrides:
                            if _matches(o.match, labels):
                                for k, v in o.set.items():
                                    if k.startswith("defense."):
                                        params[k.split(".", 1)[1]] = v
                        def defense_section(params=params, f_label=f_label) -> tuple[DefenseSection, dict[str, Any]]:
                            sec = DefenseSection.model_validate(params)
                            return sec, resolved_parameters(DEFENSES.build(sec.name, sec.extras(), where=f"defense {f_label}"))

                        built = _checked(errors, f"{title}/{f_label}", defense_section)
                        if built is None:
                            continue
                        section, resolved = built
                        fam = getattr(DEFENSES.get(section.name).factory, "family", "") or "defense"
                        dcfg = cfg.model_copy(update={"defenses": [section]})
                        defense_cells.append(Cell(cell_id(spec.name, cfg, section, resolved), spec.name, "defense", d_label, m_label,
                                                  a_label, f_label, fam, seed, cfg.victim_key(), dcfg))
                    training = False
                    if cfg.attack is not None:
                        training = isinstance(ATTACKS.build(cfg.attack.name, cfg.attack.extras(), where="attack"), TrainingAttack)
                    groups.append(VictimGroup(victim, tuple(defense_cells), training))
    if errors:
        shown = errors[:20] + ([f"... and {len(errors) - 20} more"] if len(errors) > 20 else [])
        raise BackdoorLabError(f"{where}: {len(errors)} invalid cell(s): " + "; ".join(shown))
    if not groups:
        raise BackdoorLabError(f"{where}: grid {spec.name!r} has no cells")
    if spec.sample is not None:  # a population: all clean victims, a seeded draw of the backdoored ones
        import random

        bad = [i for i, g in enumerate(groups) if g.victim.config.attack is not None]
        keep = set(random.Random(spec.sample_seed).sample(bad, min(spec.sample, len(bad))))
        groups = [g for i, g in enumerate(groups) if g.victim.config.attack is None or i in keep]
    return Grid(spec, tuple(groups))
