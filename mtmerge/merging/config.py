"""Merge configs: a compatible subset of mergekit's YAML, validated into :class:`MergeConfig`.

An existing mergekit config for one of the supported methods works unchanged::

    merge_method: ties            # task_arithmetic, ties, dare_ties, dare_linear,
                                  # consensus_ties, consensus_task_arithmetic
    base_model: ./Llama-3-8B
    models:
      - model: ./Llama-3-8B       # the base may be listed too: it is not a task (as in mergekit)
      - model: ./llama-math
        parameters: {weight: 1.0, density: 0.5}
      - model: ./llama-code
        parameters:
          weight: 0.7
          density:                # per-tensor filters: the first entry whose filter is a
            - {filter: mlp, value: 0.3}   # substring of the tensor name wins,
            - {value: 0.6}                # an entry without filter (or "*") always matches
    parameters:
      lambda: 1.0                 # scale of the merged task vector
      normalize: true             # ties: divide by the agreeing weights; linear methods: by sum(w)
      int8_mask: true             # accepted for compatibility; no effect
      # mtmerge's own:
      scope: tensor               # or global: exact per-task top-k over the whole model
      flavor: mergekit            # TIES knob preset: mergekit (default here), peft or paper
      seed: 0                     # DARE's seed
    dtype: bfloat16               # compute dtype: inputs are cast to it (default: each tensor's own)
    out_dtype: bfloat16           # output dtype (default: dtype, else the base tensor's dtype)

Semantics (mergekit's where it has them):

* ``weight`` (default 1; mergekit requires it) and ``density`` (default 1: keep all) are
  per model; a top-level ``parameters.weight`` / ``parameters.density`` is the default for
  every model. Either may be a number or a filter list. Lists of plain numbers (mergekit's
  layer gradients) are refused: they need architecture knowledge mtmerge does not have.
* ``lambda`` (default 1), ``normalize`` (default true for ``ties`` and ``consensus_ties``,
  false otherwise, as mergekit's registry), ``rescale`` (DARE only: default true = mergekit's
  L1 rescale; ``"inverse"`` = the DARE paper's ``1/density``; false = none) may also be
  filter lists.
* ``normalize`` for TIES-type methods picks ``merge="mean"`` (true) or ``"sum"``; for linear
  methods it divides the weights by their sum (skipped when ``|sum| < 1e-8``, as mergekit).
* ``flavor`` (default ``"mergekit"``: configs come from mergekit) sets the TIES knobs
  (:data:`mtmerge.FLAVORS`); ``scope: global`` needs a magnitude trim (``ties``,
  ``consensus_ties``) and plain-number densities; ``k`` (default 2) and ``tall_lambda``
  (default 0.4) are the consensus methods' knobs.
* ``base_model`` is required: every method works on task vectors ``model - base``.
* Paths are local files or directories, relative to the current directory (as in mergekit);
  nothing is ever downloaded.
* Unknown keys anywhere are errors naming the key path, e.g. ``models[1].parameters.densty``;
  mergekit keys mtmerge does not implement (``slices``, ``tokenizer_source``, ...) are errors
  saying so.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mtmerge.ops.merge import FLAVORS

#: merge_method -> (sparsify, elect, consensus, default normalize, default rescale)
METHODS: dict[str, tuple[str, bool, bool, bool, bool]] = {
    "task_arithmetic": ("none", False, False, False, False),
    "ties": ("magnitude", True, False, True, False),
    "dare_ties": ("dare", True, False, False, True),
    "dare_linear": ("dare", False, False, False, True),
    "consensus_ties": ("magnitude", True, True, True, False),
    "consensus_task_arithmetic": ("none", False, True, False, False),
}

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}

_TOP_KEYS = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype")
_UNSUPPORTED_TOP = ("slices", "modules", "tokenizer_source", "tokenizer", "chat_template")
_MODEL_KEYS = ("model", "parameters")
_MODEL_PARAMS = ("weight", "density")
# top-level parameter -> may it be a per-tensor filter list?
_TOP_PARAMS = {"weight": True, "density": True, "lambda": True, "normalize": True, "int8_mask": True,
               "rescale": True, "scope": False, "flavor": False, "seed": False, "k": False, "tall_lambda": False}

#: a parameter value: a scalar, or ((filter or None, scalar), ...) tried in order
Setting = Any


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _check_keys(mapping: Any, allowed: tuple[str, ...] | Mapping, where: str) -> dict:
    if not isinstance(mapping, Mapping):
        raise ValueError(f"{where or 'config'} must be a mapping, got {_type_name(mapping)}")
    for key in mapping:
        if key not in allowed:
            path = f"{where}.{key}" if where else str(key)
            raise ValueError(f"unknown key {path!r} (allowed here: {', '.join(allowed)})")
    return dict(mapping)


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{where} must be a number, got {_type_name(value)} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{where} must be finite, got {value}")
    return value


def _density(value: Any, where: str) -> float:
    value = _number(value, where)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{where} must be in [0, 1], got {value}")
    return value


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{where} must be true or false, got {_type_name(value)} {value!r}")
    return value


def _rescale(value: Any, where: str) -> str:
    if value is True or value == "l1":
        return "l1"
    if value is False or value == "none":
        return "none"
    if value == "inverse":
        return "inverse"
    raise ValueError(f"{where} must be true (L1, mergekit), false, 'l1', 'inverse' or 'none', got {value!r}")


_SCALARS = {"weight": _number, "density": _density, "lambda": _number, "normalize": _bool, "int8_mask": _bool,
            "rescale": _rescale}


def _setting(value: Any, name: str, where: str, filters_ok: bool = True) -> Setting:
    """A scalar, or a mergekit filter list ``[{filter: substr, value: v}, ..., {value: v}]``."""
    check = _SCALARS[name]
    if isinstance(value, Mapping):  # a single ConditionalParameter
        value = [value]
    if isinstance(value, list):
        if not filters_ok:
            raise ValueError(f"{where} must be a single value, not a list")
        if value and all(not isinstance(v, Mapping) for v in value):
            raise ValueError(f"{where}: lists of values (mergekit's layer gradients) are not supported; "
                             "use filters: [{filter: NAME_PART, value: V}, {value: DEFAULT}]")
        entries = []
        for i, entry in enumerate(value):
            item = f"{where}[{i}]"
            entry = _check_keys(entry, ("filter", "value"), item)
            if "value" not in entry:
                raise ValueError(f"{item} needs a 'value'")
            flt = entry.get("filter")
            if flt is not None and not isinstance(flt, str):
                raise ValueError(f"{item}.filter must be a string, got {_type_name(flt)}")
            if isinstance(entry["value"], list | Mapping):
                raise ValueError(f"{item}.value must be a single value (nested lists and gradients are not supported)")
            entries.append((None if flt in (None, "*") else flt, check(entry["value"], f"{item}.value")))
        return tuple(entries)
    return check(value, where)


def resolve_setting(setting: Setting, tensor_name: str) -> Any:
    """The value of ``setting`` for ``tensor_name`` (``None`` if no filter matches)."""
    if not isinstance(setting, tuple):
        return setting
    for flt, value in setting:
        if flt is None or flt in tensor_name:
            return value
    return None


@dataclass(frozen=True)
class ModelSpec:
    """One fine-tuned model: its path and its own ``weight`` / ``density`` settings (None: unset)."""

    path: Path
    weight: Setting = None
    density: Setting = None


@dataclass(frozen=True)
class MergeConfig:
    """A validated merge config (see the module docstring for the format).

    Build it with :meth:`from_yaml`, :meth:`from_dict` or :func:`load_config`. Per-tensor
    values come from :meth:`weights`, :meth:`densities`, :meth:`lam`, :meth:`normalize` and
    :meth:`rescale`; whole-run values are attributes.

    Attributes
    ----------
    merge_method : str
        One of :data:`METHODS`.
    base_model : Path
        The pre-trained checkpoint (task vectors are ``model - base``).
    models : tuple of ModelSpec
        The fine-tuned checkpoints, the base excluded, in config order (task ``t``).
    parameters : dict
        Top-level parameters as settings (scalars or filter tuples).
    dtype, out_dtype : torch.dtype or None
        Compute dtype and output dtype (None: each tensor's own / the compute dtype).
    text : str or None
        The config as given (YAML), recorded next to the output.
    """

    merge_method: str
    base_model: Path
    models: tuple[ModelSpec, ...]
    parameters: dict[str, Setting] = field(default_factory=dict)
    dtype: torch.dtype | None = None
    out_dtype: torch.dtype | None = None
    text: str | None = None

    # ---- construction ------------------------------------------------------------------------

    @classmethod
    def from_yaml(cls, text: str) -> MergeConfig:
        """Parse a YAML document (the text, not a path)."""
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValueError(f"config is not valid YAML: {exc}") from None
        return cls.from_dict(data, text=text)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> MergeConfig:
        """Read and parse a YAML config file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {str(path)!r} does not exist")
        return cls.from_yaml(path.read_text(encoding="utf-8"))

    @classmethod
    def from_dict(cls, data: Any, *, text: str | None = None) -> MergeConfig:
        """Validate a parsed config (a mapping as ``yaml.safe_load`` returns it)."""
        if data is None:
            raise ValueError("config is empty")
        for key in _UNSUPPORTED_TOP:
            if isinstance(data, Mapping) and key in data:
                raise ValueError(f"{key!r}: mergekit's {key} is not supported by mtmerge merge "
                                 "(supported: models, base_model, merge_method, parameters, dtype, out_dtype)")
        data = _check_keys(data, _TOP_KEYS, "")
        method = data.get("merge_method")
        if method not in METHODS:
            raise ValueError(f"merge_method must be one of {', '.join(METHODS)}, got {method!r}")
        sparsify, _, consensus, _, _ = METHODS[method]
        if data.get("base_model") is None:
            raise ValueError(f"base_model is required: {method} merges task vectors (model - base_model)")
        base = _model_path(data["base_model"], "base_model")

        params = {}
        raw_params = data.get("parameters") or {}
        raw_params = _check_keys(raw_params, tuple(_TOP_PARAMS), "parameters")
        for name, value in raw_params.items():
            where = f"parameters.{name}"
            if value is None:
                continue
            if name in _SCALARS:
                params[name] = _setting(value, name, where, _TOP_PARAMS[name])
            elif name == "scope":
                if value not in ("tensor", "global"):
                    raise ValueError(f"{where} must be 'tensor' or 'global', got {value!r}")
                params[name] = value
            elif name == "flavor":
                if value not in FLAVORS:
                    raise ValueError(f"{where} must be one of {', '.join(FLAVORS)}, got {value!r}")
                params[name] = value
            elif name == "seed":
                if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
                    raise ValueError(f"{where} must be an integer in [0, 2**63), got {value!r}")
                params[name] = value
            elif name == "k":
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ValueError(f"{where} must be an integer >= 1, got {value!r}")
                params[name] = value
            elif name == "tall_lambda":
                params[name] = _number(value, where)
        if not consensus:
            for name in ("k", "tall_lambda"):
                if name in params:
                    raise ValueError(f"parameters.{name} applies to the consensus methods only, not {method}")
        if sparsify != "dare" and "rescale" in params:
            if any(v != "none" for v in _values(params["rescale"])):
                raise ValueError(f"parameters.rescale applies to the DARE methods only (dare_ties, dare_linear), "
                                 f"not {method}")
        if params.get("scope") == "global" and sparsify != "magnitude":
            raise ValueError(f"parameters.scope: 'global' applies to a magnitude trim (ties, consensus_ties), "
                             f"not {method}")

        raw_models = data.get("models")
        if not isinstance(raw_models, list) or not raw_models:
            raise ValueError("models must be a non-empty list of {model: PATH, parameters: {...}}")
        models: list[ModelSpec] = []
        seen: dict[str, int] = {}
        base_key = _same_file_key(base)
        for i, entry in enumerate(raw_models):
            where = f"models[{i}]"
            if isinstance(entry, str):
                entry = {"model": entry}
            entry = _check_keys(entry, _MODEL_KEYS, where)
            if "model" not in entry:
                raise ValueError(f"{where}.model is required")
            path = _model_path(entry["model"], f"{where}.model")
            mparams = _check_keys(entry.get("parameters") or {}, _MODEL_PARAMS, f"{where}.parameters")
            key = _same_file_key(path)
            if key == base_key:
                continue  # mergekit lists the base among the models; it is not a task
            if key in seen:
                raise ValueError(f"{where}.model is the same checkpoint as models[{seen[key]}]: {str(path)!r}")
            seen[key] = i
            models.append(ModelSpec(
                path=path,
                weight=None if mparams.get("weight") is None else _setting(
                    mparams["weight"], "weight", f"{where}.parameters.weight"),
                density=None if mparams.get("density") is None else _setting(
                    mparams["density"], "density", f"{where}.parameters.density"),
            ))
        if not models:
            raise ValueError("models lists no model besides base_model: nothing to merge")
        if params.get("scope") == "global":
            for t, spec in enumerate(models):
                if isinstance(spec.density, tuple) or (spec.density is None and isinstance(params.get("density"),
                                                                                           tuple)):
                    raise ValueError(f"models[{t}]: scope 'global' needs one density per model, not per-tensor "
                                     "filters")

        dtype = _dtype(data.get("dtype"), "dtype")
        out_dtype = _dtype(data.get("out_dtype"), "out_dtype")
        if text is None:
            import yaml

            text = yaml.safe_dump(_plain(data), sort_keys=False)
        return cls(merge_method=method, base_model=base, models=tuple(models), parameters=params, dtype=dtype,
                   out_dtype=out_dtype, text=text)

    # ---- whole-run values --------------------------------------------------------------------

    @property
    def num_tasks(self) -> int:
        return len(self.models)

    @property
    def sparsify(self) -> str:
        """``"none"``, ``"magnitude"`` (TIES trim) or ``"dare"``."""
        return METHODS[self.merge_method][0]

    @property
    def elect(self) -> bool:
        """True for TIES-type methods (sign election), False for linear ones."""
        return METHODS[self.merge_method][1]

    @property
    def consensus(self) -> bool:
        return METHODS[self.merge_method][2]

    @property
    def scope(self) -> str:
        return self.parameters.get("scope", "tensor")

    @property
    def flavor(self) -> str:
        return self.parameters.get("flavor", "mergekit")

    @property
    def seed(self) -> int:
        return self.parameters.get("seed", 0)

    @property
    def k(self) -> int:
        return self.parameters.get("k", 2)

    @property
    def tall_lambda(self) -> float:
        return self.parameters.get("tall_lambda", 0.4)

    @property
    def paths(self) -> list[Path]:
        """Base first, then the models."""
        return [self.base_model] + [m.path for m in self.models]

    # ---- per-tensor values -------------------------------------------------------------------

    def _per_model(self, attr: str, tensor_name: str, default: float) -> list[float]:
        out = []
        for spec in self.models:
            value = resolve_setting(getattr(spec, attr), tensor_name)
            if value is None and attr in self.parameters:
                value = resolve_setting(self.parameters[attr], tensor_name)
            out.append(default if value is None else value)
        return out

    def _shared(self, name: str, tensor_name: str, default: Any) -> Any:
        value = resolve_setting(self.parameters.get(name), tensor_name)
        return default if value is None else value

    def weights(self, tensor_name: str) -> list[float]:
        """``w_t`` for this tensor (model setting, else top-level, else 1)."""
        return self._per_model("weight", tensor_name, 1.0)

    def densities(self, tensor_name: str) -> list[float]:
        """``d_t`` for this tensor (model setting, else top-level, else 1)."""
        return self._per_model("density", tensor_name, 1.0)

    def lam(self, tensor_name: str) -> float:
        return self._shared("lambda", tensor_name, 1.0)

    def normalize(self, tensor_name: str) -> bool:
        return self._shared("normalize", tensor_name, METHODS[self.merge_method][3])

    def rescale(self, tensor_name: str) -> str:
        """DARE's rescale: ``"l1"``, ``"inverse"`` or ``"none"``."""
        return self._shared("rescale", tensor_name, "l1" if METHODS[self.merge_method][4] else "none")


def _values(setting: Setting) -> list[Any]:
    return [v for _, v in setting] if isinstance(setting, tuple) else [setting]


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def _model_path(value: Any, where: str) -> Path:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where} must be a path string, got {_type_name(value)}")
    if "+" in value and not os.path.exists(value):
        raise ValueError(f"{where}: {value!r} looks like mergekit's 'model+lora' syntax, which is not supported; "
                         "merge the adapter into its model first")
    return Path(value).expanduser()


def _same_file_key(path: Path) -> str:
    try:
        return os.path.realpath(path)
    except OSError:
        return os.path.abspath(path)


def _dtype(value: Any, where: str) -> torch.dtype | None:
    if value is None:
        return None
    if isinstance(value, torch.dtype):
        name = str(value).removeprefix("torch.")
    elif isinstance(value, str):
        name = value.removeprefix("torch.")
    else:
        raise ValueError(f"{where} must be a dtype name, got {_type_name(value)}")
    if name not in DTYPES:
        raise ValueError(f"{where} must be one of float32, bfloat16, float16, got {value!r}")
    return DTYPES[name]


def load_config(config: MergeConfig | Mapping | str | os.PathLike) -> MergeConfig:
    """A :class:`MergeConfig` from a config object, a mapping, a YAML file path or YAML text.

    A string is a path if such a file exists, else YAML text if it contains a newline or a
    colon; anything else is a missing file (FileNotFoundError).
    """
    if isinstance(config, MergeConfig):
        return config
    if isinstance(config, Mapping):
        return MergeConfig.from_dict(config)
    if isinstance(config, os.PathLike):
        return MergeConfig.from_file(config)
    if isinstance(config, str):
        if os.path.isfile(config):
            return MergeConfig.from_file(config)
        if "\n" in config or ":" in config:
            return MergeConfig.from_yaml(config)
        raise FileNotFoundError(f"config file {config!r} does not exist")
    raise TypeError(f"config must be a MergeConfig, a mapping, a path or YAML text, got {type(config).__name__}")
