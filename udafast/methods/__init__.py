"""The methods, by name: `METHODS[name]` is the class, `build_method(config, ctx)` an instance.

source_only and oracle bound the comparison; dann, adaptsegnet, cbst, contrastive, proda, dacs, daformer and
mic adapt;
adabn (target BatchNorm statistics, no training) is a control for how much of a gap is statistics;
ssl_source (SimCLR on the source images) is a pretraining, not a compared method: ProDA's stage-2
student may start from it (`proda.student_init: "@ssl_source"`).
Each module reads like its paper's loss; see ../shared/SPEC.md part 2 and the docstrings.
"""
import importlib
from typing import TYPE_CHECKING, Type

if TYPE_CHECKING:  # the modules are imported on first use
    from udafast.methods.base import Method
    from udafast.methods.context import RunContext

__all__ = ["METHODS", "METHOD_NAMES", "method_class", "build_method"]

#: name -> "module:Class", imported on first use
METHODS = {
    "source_only": "udafast.methods.source_only:SourceOnly",
    "oracle": "udafast.methods.oracle:Oracle",
    "dann": "udafast.methods.dann:DANN",
    "adaptsegnet": "udafast.methods.adaptsegnet:AdaptSegNet",
    "cbst": "udafast.methods.cbst:CBST",
    "contrastive": "udafast.methods.contrastive:Contrastive",
    "proda": "udafast.methods.proda:ProDA",
    "dacs": "udafast.methods.dacs:DACS",
    "daformer": "udafast.methods.daformer:DAFormer",
    "mic": "udafast.methods.mic:MIC",
    "adabn": "udafast.methods.adabn:AdaBN",
    # not compared: the self-supervised source pretraining ProDA's stage 2 may start from
    "ssl_source": "udafast.methods.ssl_source:SSLSource",
}
METHOD_NAMES = tuple(METHODS)


def method_class(name: str) -> "Type[Method]":
    """The class of the method `name` (imported on first use); ValueError naming the known ones."""
    if name not in METHODS:
        raise ValueError(f"method: expected one of {', '.join(METHODS)}, got {name!r}")
    module, cls = METHODS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def build_method(config: dict, ctx: "RunContext") -> "Method":
    """The method `config["method"]`, built for the run `ctx`."""
    return method_class(config["method"])(config, ctx)
