"""Experiment configuration: pydantic models loaded from YAML, with ``--set key=value`` overrides.

Every key is validated before anything runs: an unknown key, a wrong type or an out-of-range
value is one :class:`BackdoorLabError` naming the key (``attack.size: ...``). Sections whose
parameters depend on the chosen component (``data``, ``model``, ``attack``) accept that
component's own parameters next to the common ones; they are checked against the registry.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from backdoorlab.errors import BackdoorLabError, format_validation_error
from backdoorlab.train import TrainConfig


class _Section(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    def extras(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class DataSection(_Section):
    """``name`` picks a source from the data registry; its parameters (root, path, ...) sit beside."""

    name: str = "mnist5k"
    test_fraction: float = Field(0.2, gt=0, lt=1, description="test share when the source has no test set")
    holdout_fraction: float = Field(0.05, ge=0, lt=1, description="clean held-out share of train, for defenses")
    train_size: Optional[int] = Field(None, ge=10, description="subsample the training set (stratified)")
    test_size: Optional[int] = Field(None, ge=10, description="subsample the test set (stratified)")


class ModelSection(_Section):
    name: str = "cnn"


class AttackSection(_Section):
    """``name`` picks an attack; ``mode``/``rate``/``target``/``source`` set the threat model."""

    name: str = "badnets"
    mode: Literal["all-to-one", "source-specific", "all-to-all", "clean-label"] = "all-to-one"
    rate: float = Field(0.1, gt=0, le=1, description="fraction of the eligible samples poisoned")
    target: int = Field(0, ge=0)
    source: Optional[int] = Field(None, ge=0)


class DefenseSection(_Section):
    """``name`` picks a defense from the registry; its parameters sit beside it."""

    name: str


class ExperimentConfig(BaseModel):
    """One experiment: data -> (attack) -> victim training -> evaluation."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "experiment"
    seed: int = Field(0, ge=0)
    device: str = "cpu"
    threads: Optional[int] = Field(None, ge=1, description="torch threads (default: all cores)")
    cache: bool = Field(True, description="reuse a victim trained earlier with the same data/attack/model/train/seed")
    data: DataSection = DataSection()
    model: ModelSection = ModelSection()
    attack: Optional[AttackSection] = AttackSection()
    train: TrainConfig = TrainConfig(epochs=10)
    defenses: list[DefenseSection] = Field(default_factory=list, description="defenses run against the victim")

    @model_validator(mode="before")
    @classmethod
    def _attack_defaults(cls, doc: Any) -> Any:
        """Keys the user left out take the attack's own defaults for the data set's kind (mode, rate,
        strength, train.epochs): :func:`backdoorlab.attacks.base.apply_attack_defaults`."""
        from backdoorlab.attacks import apply_attack_defaults

        return apply_attack_defaults(doc)

    def check_components(self) -> None:
        """Check component names and parameters against the registries (no data loaded)."""
        from backdoorlab.attacks import ATTACKS
        from backdoorlab.data import DATASETS
        from backdoorlab.models import MODELS

        for section, reg, skip in (("data", DATASETS, set()), ("model", MODELS, {"num_classes", "input_shape"})):
            sec = getattr(self, section)
            reg.get(sec.name)
            known = [p for p in reg.parameters(sec.name) if p not in skip]
            unknown = sorted(set(sec.extras()) - set(known))
            if unknown:
                raise BackdoorLabError(
                    f"{', '.join(f'{section}.{k}' for k in unknown)}: unknown parameter of {reg.kind} {sec.name!r}; "
                    f"its parameters: {', '.join(known) or '(none)'}"
                )
        from backdoorlab.defenses import DEFENSES

        for i, d in enumerate(self.defenses):
            DEFENSES.build(d.name, d.extras(), where=f"defenses.{i}")
        if self.attack is not None:
            atk = ATTACKS.build(self.attack.name, self.attack.extras(), where="attack")
            modes = getattr(atk, "modes", None)
            if modes and self.attack.mode not in modes:  # refused before any training, not when poisoning
                raise BackdoorLabError(f"attack.mode: {self.attack.name} supports {', '.join(modes)}; got "
                                       f"{self.attack.mode!r}; set attack.mode to one of those")
            if self.attack.mode == "source-specific" and self.attack.source is None:
                raise BackdoorLabError("attack.source: mode 'source-specific' needs the source class")

    def victim_key(self) -> str:
        """Hash of everything that determines the trained victim (data, attack, model, train, seed)."""
        from backdoorlab import __version__

        blob = json.dumps(
            {
                "v": __version__,
                "data": self.data.model_dump(),
                "attack": self.attack.model_dump() if self.attack else None,
                "model": self.model.model_dump(),
                "train": self.train.model_dump(),
                "seed": self.seed,
            },
            sort_keys=True,
            default=str,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:20]


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"a.b=value"`` -> (["a", "b"], value parsed as a YAML scalar)."""
    if "=" not in item:
        raise BackdoorLabError(f"--set {item!r}: expected KEY=VALUE, e.g. --set attack.target=1")
    key, raw = item.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise BackdoorLabError(f"--set {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def set_path(doc: dict[str, Any], parts: list[str], value: Any, what: str) -> None:
    """``doc[parts[0]][parts[1]]... = value``, creating sections; ``what`` names the change in errors."""
    node = doc
    for p in parts[:-1]:
        if node.get(p) is None:
            node[p] = {}
        if not isinstance(node[p], dict):
            raise BackdoorLabError(f"{what}: {p} is not a section")
        node = node[p]
    node[parts[-1]] = value


def apply_overrides(doc: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    out = json.loads(json.dumps(doc))  # deep copy of plain data
    for item in overrides:
        parts, value = parse_override(item)
        set_path(out, parts, value, f"--set {item!r}")
    return out


def read_yaml(p: Path, what: str) -> Any:
    """The parsed YAML of ``p`` (``what`` names the file in errors: config, grid); a missing, binary
    or unparsable file is one clear error (:func:`backdoorlab.validate.read_yaml`)."""
    from backdoorlab.validate import read_yaml as _read

    return _read(p, what)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read YAML (or the defaults when ``path`` is None), apply ``--set`` overrides, validate.
    Relative data paths in the file are resolved against its folder; ``--set`` paths against the
    working directory. An empty file is refused (run without a file for the defaults)."""
    from backdoorlab.validate import read_yaml_mapping, resolve_config_paths

    doc: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        doc = resolve_config_paths(read_yaml_mapping(p, "config", "attack: {name: badnets} (or run without a file for "
                                                     "the default experiment)"), p.parent)
    doc = apply_overrides(doc, overrides or [])
    try:
        cfg = ExperimentConfig.model_validate(doc)
    except ValidationError as exc:
        raise BackdoorLabError(format_validation_error(exc)) from exc
    cfg.check_components()
    return cfg


def dump_config(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(json.loads(cfg.model_dump_json()), sort_keys=False)
