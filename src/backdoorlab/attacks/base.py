"""What every data-poisoning attack shares: the :class:`Attack` contract, sample selection
(:func:`choose_indices`), :func:`poison` for the training set and :func:`poison_test` for ASR.

Threat models (``mode``):
- ``all-to-one``: samples of every class but the target are stamped and relabelled to ``target``;
- ``source-specific``: only class ``source`` is stamped and relabelled to ``target``;
- ``all-to-all``: samples of every class c are stamped and relabelled to (c + 1) mod K;
- ``clean-label``: only target-class samples are stamped; no label changes.

``rate`` is the fraction of the *eligible* samples that get poisoned (eligible: the non-target
classes, the source class, all samples, or the target class, by mode).

Two kinds of attack share the :data:`ATTACKS` registry:

- :class:`Attack` (data poisoning): a pure ``apply_trigger``; :func:`poison` stamps the chosen
  training samples and :func:`poison_test` builds the triggered test set. Two optional hooks,
  both backward compatible (the defaults reproduce plain ``apply_trigger`` stamping):

  * ``bind(data, index, *, target, mode, training, generator) -> stamp``: called once per set
    before stamping, with the set and the indices about to be stamped; returns the function
    ``stamp(x, y, generator)`` applied to float batches of those samples (``y``: their original
    labels). Data-dependent poisoning overrides it: clean-label makes the training samples
    adversarial on a surrogate trained on ``data`` before the patch (``training=True`` only);
    blend's ``target-sample`` key draws its keys from ``data``; SIG may use a stronger test signal.
  * ``cross_ratio`` / ``apply_cross(x, generator)``: "cross" (noise-mode) samples, stamped with a
    non-trigger variant and kept at their labels, ``round(cross_ratio * n_poisoned)`` of them,
    drawn from the samples not poisoned (WaNet's noise mode). They are not marked ``is_poison``.

- :class:`TrainingAttack` (training time): it trains the victim itself (reusing
  :func:`backdoorlab.train.train`) and returns a :class:`TrainedVictim`: the model and a trigger
  function, from which :func:`triggered_test_set` builds the triggered test set.

Defaults: every attack declares its natural threat model and settings per data-set kind
(``DEFAULTS`` / ``defaults(kind)``: ``mnist`` for grey digits, ``cifar10`` for colour 32x32 images;
mode, rate, strength parameters and the victim's ``epochs``), so that an attack picked by name alone
works as its paper meant on the data at hand. :func:`apply_attack_defaults` merges them into an
experiment config where it is validated (:class:`~backdoorlab.config.ExperimentConfig`); keys the
user sets win. ``backdoorlab list`` shows them.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Literal

import torch

from backdoorlab.errors import BackdoorLabError
from backdoorlab.registry import Registry
from backdoorlab.types import ImageSet, PoisonedSet

log = logging.getLogger(__name__)

Mode = Literal["all-to-one", "source-specific", "all-to-all", "clean-label"]
MODES: tuple[str, ...] = ("all-to-one", "source-specific", "all-to-all", "clean-label")


#: stamps a float batch (B, C, H, W) in [0, 1] of chosen samples, given their original labels (B,)
Stamp = Callable[[torch.Tensor, torch.Tensor, "torch.Generator | None"], torch.Tensor]


class Attack:
    """A data-poisoning attack: a pure trigger plus its default threat model.

    Subclasses are frozen (pydantic) dataclasses whose fields are validated at construction.
    ``apply_trigger`` maps float (B, C, H, W) in [0, 1] to a new tensor of the same shape and range;
    it may draw from ``generator`` (random positions) but is otherwise pure.
    """

    #: modes this attack supports; clean-label-only attacks restrict this
    modes: ClassVar[tuple[str, ...]] = ("all-to-one", "source-specific", "all-to-all", "clean-label")
    #: its natural threat model and settings: ``{"*": every kind, kind: ..., data-set name: ...}``
    #: (see :func:`attack_defaults`)
    DEFAULTS: ClassVar[dict[str, dict[str, Any]]] = {}

    @classmethod
    def defaults(cls, kind: str | None, dataset: str | None = None) -> dict[str, Any]:
        """The defaults for data of ``kind`` (:data:`DATA_KINDS`; None: unknown): ``DEFAULTS["*"]``
        updated with ``DEFAULTS[kind]``, then with ``DEFAULTS[dataset]`` (the registry name of the data
        set, e.g. ``mnist5k``: a refinement for one data set of the kind). Attack-section keys, plus
        ``epochs`` (the victim's training)."""
        return _kind_defaults(cls.DEFAULTS, kind, dataset)

    def apply_trigger(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def check_image_shape(self, shape: tuple[int, int, int]) -> None:
        """Raise :class:`BackdoorLabError` if the trigger cannot be applied to (C, H, W) images."""

    def describe(self) -> str:
        return type(self).__name__

    def bind(
        self, data: ImageSet, index: torch.Tensor, *, target: int, mode: str, training: bool,
        generator: torch.Generator,
    ) -> Stamp:
        """The function that stamps the samples ``index`` of ``data`` (float batches, with their
        original labels). Called once by :func:`poison` (``training=True``) and :func:`poison_test`
        (``training=False``). Default: :meth:`apply_trigger`, for every sample and both sets."""
        return lambda x, y, g: self.apply_trigger(x, g)

    @property
    def cross_ratio(self) -> float:
        """Cross (noise-mode) samples per poisoned sample; 0: none (the default)."""
        return 0.0

    def apply_cross(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The non-trigger variant stamped on cross samples (labels kept); only if ``cross_ratio > 0``."""
        raise NotImplementedError(f"{self.describe()} has no cross samples")


class TrainingAttack:
    """A training-time attack: it trains the victim itself and returns it with its trigger.

    Subclasses are frozen (pydantic) dataclasses like :class:`Attack`, registered in the same
    :data:`ATTACKS` registry. :meth:`check` validates the threat model against the data before any
    training; :meth:`train_victim` trains ``model`` (built by the caller, untrained) on the clean
    ``data`` with the attack folded into training (through :func:`backdoorlab.train.train`'s
    ``transform``/``loss_fn`` hooks or by poisoning a copy of the data).
    """

    modes: ClassVar[tuple[str, ...]] = ("all-to-one",)
    #: as :attr:`Attack.DEFAULTS`
    DEFAULTS: ClassVar[dict[str, dict[str, Any]]] = {}

    @classmethod
    def defaults(cls, kind: str | None, dataset: str | None = None) -> dict[str, Any]:
        """As :meth:`Attack.defaults`."""
        return _kind_defaults(cls.DEFAULTS, kind, dataset)

    def describe(self) -> str:
        return type(self).__name__

    def check(self, data: ImageSet, *, rate: float, target: int, source: int | None, mode: str) -> None:
        """Raise :class:`BackdoorLabError` for a threat model this attack cannot run on ``data``."""
        check_threat_model(mode, target, source, data.num_classes)
        if mode not in self.modes:
            raise BackdoorLabError(f"attack {self.describe()} supports modes {', '.join(self.modes)}; got {mode!r}")
        if not 0.0 < rate <= 1.0:
            raise BackdoorLabError(f"attack.rate must lie in (0, 1]; got {rate}")

    def train_victim(
        self, model: torch.nn.Module, data: ImageSet, cfg: Any, *, rate: float, target: int,
        source: int | None = None, mode: str = "all-to-one", seed: int = 0, callbacks: tuple = (),
    ) -> "TrainedVictim":  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass(frozen=True, eq=False)
class TrainedVictim:
    """What a :class:`TrainingAttack` returns.

    ``trigger`` maps float (B, C, H, W) in [0, 1] to triggered images of the same shape and range
    (deterministic; no gradient). ``poisoned`` is the poisoned training set when the attack used a
    fixed one (pruning-aware), else None; ``attack`` the data-poisoning attack that made it (then
    the triggered test set comes from :func:`poison_test` with it). ``details`` holds extra
    measures for reports.
    """

    model: torch.nn.Module
    trigger: Callable[[torch.Tensor], torch.Tensor]
    history: dict = field(default_factory=dict)
    poisoned: PoisonedSet | None = None
    details: dict[str, Any] = field(default_factory=dict)
    attack: Attack | None = None

    def triggered_test(self, data: ImageSet, *, target: int, source: int | None = None, mode: str = "all-to-one",
                       generator: torch.Generator | None = None) -> PoisonedSet:
        """The triggered test set for ASR (see :func:`poison_test`)."""
        if self.attack is not None:
            return poison_test(data, self.attack, target=target, source=source, mode=mode, generator=generator)
        return triggered_test_set(data, self.trigger, target=target, source=source, mode=mode)


ATTACKS: Registry[Attack | TrainingAttack] = Registry("attack")


def is_training_attack(name: str) -> bool:
    """True when the registered attack ``name`` is a :class:`TrainingAttack` (no instance built)."""
    factory = ATTACKS.get(name).factory
    return isinstance(factory, type) and issubclass(factory, TrainingAttack)


# ----------------------------------------------------------------------------- defaults per data kind
#: the data-set kinds attacks declare defaults for: ``mnist`` (grey digits: mnist5k, mnist, digits, any
#: 1-channel data) and ``cifar10`` (colour 32x32: cifar10, gtsrb, any 3-channel data)
DATA_KINDS: tuple[str, ...] = ("mnist", "cifar10")
#: registry name -> kind, for the built-in sources; others are told by their image channels
DATASET_KINDS: dict[str, str] = {"mnist5k": "mnist", "mnist": "mnist", "digits": "mnist", "cifar10": "cifar10",
                                 "gtsrb": "cifar10"}
#: the threat-model keys of the attack section; their defaults come as a group (see :func:`apply_attack_defaults`)
THREAT_KEYS: tuple[str, ...] = ("mode", "rate", "target", "source")
#: default keys that go to the ``train`` section, not the attack's
TRAIN_KEYS: tuple[str, ...] = ("epochs",)


def _kind_defaults(table: dict[str, dict[str, Any]], kind: str | None, dataset: str | None = None) -> dict[str, Any]:
    out = dict(table.get("*", {}))
    for key in (kind, dataset):
        if key is not None and key != "*":
            out.update(table.get(key, {}))
    return out


def kind_of_shape(shape: tuple[int, ...] | None) -> str | None:
    """The kind of images (C, H, W): 1 channel ``mnist``, 3 channels ``cifar10``, else None."""
    if not shape:
        return None
    return {1: "mnist", 3: "cifar10"}.get(int(shape[0]))


def _npz_shape(path: Any) -> tuple[int, int, int] | None:
    """(C, H, W) of the images of an .npz (``x`` or ``x_train``), read from the array header only."""
    import zipfile

    import numpy as np

    try:
        with zipfile.ZipFile(path) as z:
            names = set(z.namelist())
            key = next((k for k in ("x.npy", "x_train.npy") if k in names), None)
            if key is None:
                return None
            with z.open(key) as f:
                fmt = np.lib.format
                version = fmt.read_magic(f)
                read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
                shape = read(f)[0]
    except Exception:  # noqa: BLE001 - any unreadable file: the data loader reports it properly later
        return None
    if len(shape) == 3:
        return (1, int(shape[1]), int(shape[2]))
    if len(shape) == 4:
        return (int(shape[3]), int(shape[1]), int(shape[2]))
    return None


def data_kind(name: Any, params: dict[str, Any] | None = None) -> str | None:
    """The kind (:data:`DATA_KINDS`) of the data source ``name`` with ``params``, without loading it:
    from the registry name for the built-in sources, else from the image channels (an ``npz`` file's
    header, a ``folder``'s ``grayscale``); None when it cannot be told (then only the attack's
    kind-independent defaults apply)."""
    params = params or {}
    if not isinstance(name, str):
        return None
    if name in DATASET_KINDS:
        return DATASET_KINDS[name]
    if name == "folder":
        return "mnist" if params.get("grayscale") else "cifar10"
    if name == "npz" and isinstance(params.get("path"), str):
        return kind_of_shape(_npz_shape(params["path"]))
    return None


def attack_defaults(name: str, kind: str | None, dataset: str | None = None) -> dict[str, Any]:
    """The defaults the registered attack ``name`` declares for data of ``kind``, refined for the
    data set ``dataset`` (a registry name) when it declares some ({} for an attack, e.g. a plugin,
    that declares none)."""
    fn = getattr(ATTACKS.get(name).factory, "defaults", None)
    return dict(fn(kind, dataset)) if callable(fn) else {}


def declared_datasets(name: str) -> list[str]:
    """The data sets (registry names, not kinds) the attack ``name`` refines its defaults for."""
    table = getattr(ATTACKS.get(name).factory, "DEFAULTS", None) or {}
    return [k for k in table if k != "*" and k not in DATA_KINDS]


def _set_keys(section: Any) -> dict[str, Any] | None:
    """The keys a user set in a config section: a mapping as given, or a pydantic section's
    explicitly set fields (``model_fields_set``); None for anything else."""
    if isinstance(section, dict):
        return dict(section)
    fields_set = getattr(section, "model_fields_set", None)
    if fields_set is None or not hasattr(section, "model_dump"):
        return None
    dumped = section.model_dump()
    return {k: v for k, v in dumped.items() if k in fields_set or k in (section.model_extra or {})}


def apply_attack_defaults(doc: Any) -> Any:
    """Fill the attack's own defaults into a raw experiment config (the mapping given to
    :class:`~backdoorlab.config.ExperimentConfig`, before validation): every key the user set (in the
    YAML, the dict or by ``--set``) is kept; a key the user left out takes the value the attack
    declares for the data set's kind (:func:`data_kind`) and, where it refines them, for the data set
    itself, else the section's generic default.

    - the threat-model keys (:data:`THREAT_KEYS`) come as a group: when the user chose another
      ``mode`` than the attack's, none of the attack's mode, rate, target or source is used;
    - ``epochs`` sets ``train.epochs`` unless the user set it;
    - no attack section: the default experiment's attack (badnets); ``attack: null``: nothing.

    Returns a new mapping (``doc`` is left as is); anything that is not a mapping, or names an
    unknown attack, is returned unchanged for validation to report. Idempotent: a config dumped
    after validation names every key, so nothing changes a second time."""
    if not isinstance(doc, dict):
        return doc
    out = dict(doc)
    if "attack" in out and out["attack"] is None:
        return out
    attack = _set_keys(out.get("attack", {}))
    if attack is None:
        return out
    name = attack.get("name", "badnets")
    if not isinstance(name, str) or name not in ATTACKS:
        return out
    data = _set_keys(out.get("data", {})) or {}
    dataset = data.get("name", "mnist5k")
    kind = data_kind(dataset, data)
    defaults = attack_defaults(name, kind, dataset if isinstance(dataset, str) else None)
    if "mode" in attack and "mode" in defaults and attack["mode"] != defaults["mode"]:
        defaults = {k: v for k, v in defaults.items() if k not in THREAT_KEYS}
    train_defaults = {k: defaults.pop(k) for k in TRAIN_KEYS if k in defaults}
    for k, v in defaults.items():
        attack.setdefault(k, v)
    out["attack"] = attack
    if train_defaults:
        train = _set_keys(out.get("train", {}))
        if train is not None:
            for k, v in train_defaults.items():
                train.setdefault(k, v)
            out["train"] = train
    return out


def eligible_mask(y: torch.Tensor, mode: str, target: int, source: int | None) -> torch.Tensor:
    if mode == "all-to-one":
        return y != target
    if mode == "source-specific":
        return y == source
    if mode == "all-to-all":
        return torch.ones_like(y, dtype=torch.bool)
    if mode == "clean-label":
        return y == target
    raise BackdoorLabError(f"unknown poisoning mode {mode!r}; known: {', '.join(MODES)}")


def poisoned_labels(y: torch.Tensor, mode: str, target: int, num_classes: int) -> torch.Tensor:
    if mode in ("all-to-one", "source-specific"):
        return torch.full_like(y, target)
    if mode == "all-to-all":
        return (y + 1) % num_classes
    return y.clone()


def check_threat_model(mode: str, target: int, source: int | None, num_classes: int, class_names=()) -> None:
    if mode not in MODES:
        raise BackdoorLabError(f"unknown poisoning mode {mode!r}; known: {', '.join(MODES)}")
    if mode != "all-to-all" and not 0 <= target < num_classes:
        raise BackdoorLabError(f"attack.target={target} is not a class of this data set (0..{num_classes - 1})")
    if mode == "source-specific":
        if source is None:
            raise BackdoorLabError("mode 'source-specific' needs attack.source (the class to poison)")
        if not 0 <= source < num_classes:
            raise BackdoorLabError(f"attack.source={source} is not a class of this data set (0..{num_classes - 1})")
        if source == target:
            raise BackdoorLabError(f"attack.source and attack.target are both {source}; choose two different classes")
    elif source is not None:
        raise BackdoorLabError(f"attack.source is only used with mode 'source-specific' (mode is {mode!r})")


def choose_indices(
    y: torch.Tensor, *, rate: float, mode: str, target: int, source: int | None, generator: torch.Generator,
) -> torch.Tensor:
    """Indices (sorted) of the samples to poison: ``round(rate * n_eligible)``, at least 1."""
    if not 0.0 < rate <= 1.0:
        raise BackdoorLabError(f"attack.rate must lie in (0, 1]; got {rate}")
    eligible = torch.nonzero(eligible_mask(y, mode, target, source)).flatten()
    if eligible.numel() == 0:
        which = {"source-specific": f"source class {source}", "clean-label": f"target class {target}"}.get(mode, "any class")
        raise BackdoorLabError(f"no training samples of {which} to poison: the class is empty in this split")
    n = max(1, int(math.floor(rate * eligible.numel() + 0.5)))
    pick = torch.randperm(eligible.numel(), generator=generator)[:n]
    return eligible[pick].sort().values


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)


def stamp_in_batches(
    stamp: Callable[..., torch.Tensor], x: torch.Tensor, y: torch.Tensor | None, generator: torch.Generator | None,
    batch: int = 4096, what: str = "trigger",
) -> torch.Tensor:
    """Apply ``stamp(xb, yb, generator)`` (or ``stamp(xb)`` when ``y`` is None) to uint8 images
    (N, C, H, W) in float batches; returns uint8 of the same shape."""
    out = torch.empty_like(x)
    for s in range(0, x.shape[0], batch):
        xb = x[s:s + batch].float().div_(255.0)
        yb = stamp(xb) if y is None else stamp(xb, y[s:s + batch], generator)
        if yb.shape != xb.shape:
            raise RuntimeError(f"{what}: changed the shape {tuple(xb.shape)} -> {tuple(yb.shape)}")
        out[s:s + batch] = _to_uint8(yb)
    return out


def apply_in_batches(attack: Attack, x: torch.Tensor, generator: torch.Generator | None, batch: int = 4096) -> torch.Tensor:
    """Stamp uint8 images (N, C, H, W) with ``attack.apply_trigger`` in float batches; returns uint8."""
    return stamp_in_batches(lambda xb, yb, g: attack.apply_trigger(xb, g), x, torch.zeros(x.shape[0], dtype=torch.long),
                            generator, batch, attack.describe())


def poison(
    data: ImageSet, attack: Attack, *, rate: float, target: int, source: int | None = None,
    mode: str = "all-to-one", generator: torch.Generator | None = None,
) -> PoisonedSet:
    """Poison a training set: choose samples, stamp them, relabel them (in place of the originals).

    Cross samples (``attack.cross_ratio > 0``): ``round(cross_ratio * n_poisoned)`` further samples,
    drawn from the rest, get ``attack.apply_cross`` and keep their labels (``is_poison`` False).
    """
    check_threat_model(mode, target, source, data.num_classes)
    if isinstance(attack, TrainingAttack):
        raise BackdoorLabError(f"{attack.describe()} is a training-time attack: it trains the victim itself "
                               "(TrainingAttack.train_victim, or backdoorlab run); it cannot poison a data set")
    if mode not in attack.modes:
        raise BackdoorLabError(f"attack {attack.describe()} supports modes {', '.join(attack.modes)}; got {mode!r}")
    attack.check_image_shape(data.shape)
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    idx = choose_indices(data.y, rate=rate, mode=mode, target=target, source=source, generator=g)
    x = data.x.clone()
    y = data.y.clone()
    stamp = attack.bind(data, idx, target=target, mode=mode, training=True, generator=g)
    x[idx] = stamp_in_batches(stamp, data.x[idx], data.y[idx], g, what=attack.describe())
    y[idx] = poisoned_labels(data.y[idx], mode, target, data.num_classes)
    is_poison = torch.zeros(len(data), dtype=torch.bool)
    is_poison[idx] = True
    n_cross = 0
    if attack.cross_ratio > 0:
        rest = torch.nonzero(~is_poison).flatten()
        n_cross = min(rest.numel(), int(math.floor(attack.cross_ratio * idx.numel() + 0.5)))
        cross = rest[torch.randperm(rest.numel(), generator=g)[:n_cross]].sort().values
        x[cross] = stamp_in_batches(lambda xb, yb, gg: attack.apply_cross(xb, gg), data.x[cross], data.y[cross], g,
                                    what=attack.describe())
    log.info("poisoned %d of %d samples (%s, target %s; %d cross samples)", idx.numel(), len(data), mode, target, n_cross)
    return PoisonedSet(x, y, data.num_classes, data.class_names, f"{data.name}-poisoned",
                       is_poison=is_poison, y_source=data.y.clone())


def _test_indices(data: ImageSet, target: int, source: int | None, mode: str) -> torch.Tensor:
    if mode == "source-specific":
        keep = data.y == source
    elif mode == "all-to-all":
        keep = torch.ones_like(data.y, dtype=torch.bool)
    else:
        keep = data.y != target
    idx = torch.nonzero(keep).flatten()
    if idx.numel() == 0:
        raise BackdoorLabError("the test set has no samples the attack should flip (check source/target)")
    return idx


def _triggered(data: ImageSet, idx: torch.Tensor, x: torch.Tensor, target: int, mode: str) -> PoisonedSet:
    y_src = data.y[idx]
    y_new = (y_src + 1) % data.num_classes if mode == "all-to-all" else torch.full_like(y_src, target)
    return PoisonedSet(x, y_new, data.num_classes, data.class_names, f"{data.name}-triggered",
                       is_poison=torch.ones(idx.numel(), dtype=torch.bool), y_source=y_src.clone())


def poison_test(
    data: ImageSet, attack: Attack, *, target: int, source: int | None = None, mode: str = "all-to-one",
    generator: torch.Generator | None = None,
) -> PoisonedSet:
    """The triggered test set for ASR: every sample the attack should flip, stamped, labelled
    with the attacker's target. All-to-one and clean-label: the non-target samples; source-specific:
    the source class; all-to-all: every sample, labelled (c + 1) mod K."""
    check_threat_model(mode, target, source, data.num_classes)
    attack.check_image_shape(data.shape)
    g = generator if generator is not None else torch.Generator().manual_seed(1)
    idx = _test_indices(data, target, source, mode)
    stamp = attack.bind(data, idx, target=target, mode=mode, training=False, generator=g)
    x = stamp_in_batches(stamp, data.x[idx], data.y[idx], g, what=attack.describe())
    return _triggered(data, idx, x, target, mode)


def triggered_test_set(
    data: ImageSet, trigger: Callable[[torch.Tensor], torch.Tensor], *, target: int, source: int | None = None,
    mode: str = "all-to-one", batch: int = 1024,
) -> PoisonedSet:
    """Like :func:`poison_test` for a trigger function (a :class:`TrainedVictim`'s ``trigger``)."""
    check_threat_model(mode, target, source, data.num_classes)
    idx = _test_indices(data, target, source, mode)
    x = stamp_in_batches(trigger, data.x[idx], None, None, batch, what="trigger function")
    return _triggered(data, idx, x, target, mode)
