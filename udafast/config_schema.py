"""The keys a run config may hold, so that a typo stops a run before it starts rather than training
on a default.

The defaults are the schema: one recursive check walks the resolved config beside them. A section
(a dict among the defaults) takes only the keys its default has, at any depth; any other default is
a value, which takes no keys. The sections whose keys depend on another value or live elsewhere:
- `model`: `name` and the keys of that network (`udafast.models.build.model_keys`);
- `data.{source,target,val}`: `name`, `root`, `split` and `options`, the options of that dataset
  (its factory's keyword parameters, `udafast.data.datasets.dataset_options`). Free-form by
  design: the options of a dataset whose factory takes `**options` (a `register_dataset` of your
  own), checked by that factory only;
- `pretrain`: the keys of `train` (it updates that section of the source-only run trained first);
- one section per method (`proda`, `cbst`, ...): that method's `defaults`, whichever method the
  run trains; `adaptsegnet.discriminator` takes the keys of `optimizer`.
Beyond keys given to a value and a value given for a section, values are checked where they are
read (their types and ranges), not here.
"""
import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Union

from udafast.config import DATA_SPLITS, DEFAULTS

__all__ = ["validate_config"]


@dataclass
class _Section:
    """Known keys -> their specs. `optional`: null stands for an empty section (the code reads
    `section or {}`); not so for the sections a run reads key by key (train, data, its splits, ...)."""
    keys: Dict[str, object] = field(default_factory=dict)
    optional: bool = True


#: a value: anything but a mapping
_VALUE = object()
#: anything (a free-form value)
_FREE = object()

#: a spec: a _Section, _VALUE, _FREE, or a function of the node's value returning one
_Spec = Union[_Section, Callable[[object], object], object]


def _from_defaults(defaults: Mapping) -> _Section:
    return _Section({k: _from_defaults(v) if isinstance(v, Mapping) else _VALUE for k, v in defaults.items()})


def _model(node):
    from udafast.models.build import MODEL_NAMES, model_keys
    if not isinstance(node, Mapping):
        return _Section({"name": _VALUE}, optional=False)  # _check reports the value given for the section
    name = node.get("name")
    if name not in MODEL_NAMES:
        raise ValueError(f"model.name: expected one of {', '.join(MODEL_NAMES)}, got {name!r}")
    return _Section({k: _VALUE for k in model_keys(name)}, optional=False)


def _dataset(path):
    def spec(node):
        from udafast.data.datasets import dataset_options
        keys = {"name": _VALUE, "root": _VALUE, "split": _VALUE, "options": _FREE}
        if isinstance(node, Mapping):
            try:
                options = dataset_options(node.get("name"))
            except ValueError as e:
                raise ValueError(f"{path}.{e}") from None
            if options is not None:
                keys["options"] = _Section({k: _FREE for k in options})
        return _Section(keys, optional=False)
    return spec


def _schema() -> _Section:
    from udafast.methods import METHOD_NAMES, method_class
    top = _from_defaults(DEFAULTS)
    for section in top.keys.values():
        if isinstance(section, _Section):
            section.optional = False
    top.keys["preset"] = _VALUE  # the preset's name, recorded by resolve_config
    top.keys["model"] = _model
    top.keys["pretrain"] = _Section(top.keys["train"].keys)
    for split in DATA_SPLITS:
        top.keys["data"].keys[split] = _dataset(f"data.{split}")
    for name in METHOD_NAMES:
        top.keys[name] = _from_defaults(method_class(name).defaults)
    top.keys["adaptsegnet"].keys["discriminator"] = top.keys["optimizer"]
    return top


def validate_config(config: Mapping, what: str = "config") -> None:
    """ValueError unless every key of `config` (a resolved run config) is known, at any depth: one
    line, starting with `what`, naming each unknown key by its dotted path, the closest known key
    ("did you mean train.iters?") and the keys known there."""
    unknown: List[str] = []
    known: Dict[str, List[str]] = {}
    _check(config, _schema(), "", unknown, known)
    if unknown:
        where = "".join(f"; known {'in ' + p if p else 'at the top level'}: {', '.join(keys)}" if keys else
                        f"; {p} takes no keys" for p, keys in known.items())
        raise ValueError(f"{what}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}{where}")


def _check(value, spec: _Spec, path: str, unknown: List[str], known: Dict[str, List[str]]) -> None:
    if callable(spec):
        spec = spec(value)
    if spec is _FREE:
        return
    if spec is _VALUE:
        if isinstance(value, Mapping) and value:
            unknown.extend(f"{path}.{k} ({path} takes a value, not keys)" for k in value)
        return
    if value is None and spec.optional:
        return
    if not isinstance(value, Mapping):
        raise ValueError(f"{path or 'config'}: expected a mapping of {', '.join(sorted(spec.keys)) or 'no keys'}, "
                         f"got {value!r}")
    for key, item in value.items():
        dotted = f"{path}.{key}" if path else str(key)
        if key in spec.keys:
            _check(item, spec.keys[key], dotted, unknown, known)
            continue
        close = difflib.get_close_matches(str(key), list(spec.keys), n=1, cutoff=0.6)
        prefix = f"{path}." if path else ""
        unknown.append(dotted + (f" (did you mean {prefix}{close[0]}?)" if close else ""))
        known[path] = sorted(spec.keys)
