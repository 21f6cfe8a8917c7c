"""The one place that unpickles: whole pickled objects from the public task-vector releases.

The unpickler resolves ``src.*`` names to the stand-ins below (the original repository is not
needed), other names only from trusted packages (torch, open_clip, torchvision, numpy, PIL,
collections, a few builtins), and refuses the rest; a class those packages no longer have (pickled
by older versions) becomes an inert placeholder module. It stops accidents, it is not a sandbox:
used by ``convert`` and, only where ``basis.trust_pickles`` says so, by ``ingest``.
"""

from __future__ import annotations

import _compat_pickle
import pickle
import types
from pathlib import Path
from typing import Any

import torch
from torch import nn

from axis_stream import errors
from axis_stream.errors import first_line

TRUSTED_PACKAGES = ("torch", "open_clip", "torchvision", "numpy", "PIL", "collections")
TRUSTED_NAMES = {
    ("builtins", n) for n in ("set", "frozenset", "slice", "complex", "bytearray", "range")
} | {("_codecs", "encode"), ("copyreg", "_reconstructor")}


# --- stand-ins for the releases' src.modeling classes: state only, no behaviour ---

class ImageEncoder(nn.Module):
    """Stand-in for ``src.modeling.ImageEncoder``: ``.model`` is an open_clip CLIP."""


class ClassificationHead(nn.Linear):
    """Stand-in for ``src.modeling.ClassificationHead``: a linear layer and a ``normalize`` flag."""


class ImageClassifier(nn.Module):
    """Stand-in for ``src.modeling.ImageClassifier``: ``.image_encoder`` and ``.classification_head``."""


class MultiHeadImageClassifier(nn.Module):
    """Stand-in for ``src.modeling.MultiHeadImageClassifier``."""


STAND_INS: dict[str, type] = {c.__name__: c for c in
                              (ImageEncoder, ClassificationHead, ImageClassifier, MultiHeadImageClassifier)}


class Placeholder(nn.Module):
    """What a class the installed packages no longer have unpickles as: it keeps its state, nothing else."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__()


class _Unpickler(pickle._Unpickler):  # type: ignore[name-defined]
    """Resolves globals by the policy in the module docstring; records the placeholders it made.

    The pure-Python unpickler on purpose: its memo is a dict, where the C unpickler's is an array that
    a damaged ``LONG_BINPUT`` index grows to gigabytes (zero-filled, so really resident) before failing.
    """

    placeholders: list[str]

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _compat_pickle.NAME_MAPPING:  # protocol 2 files name Python 2 modules
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if module == "src" or module.startswith("src."):
            return STAND_INS.get(name) or self._placeholder(module, name)
        if (module, name) in TRUSTED_NAMES:
            return super().find_class(module, name)
        if module.split(".")[0] not in TRUSTED_PACKAGES:
            raise pickle.UnpicklingError(f"refusing {module}.{name}: outside the trusted packages")
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return self._placeholder(module, name)

    def _placeholder(self, module: str, name: str) -> type:
        if not hasattr(self, "placeholders"):
            self.placeholders = []
        self.placeholders.append(f"{module}.{name}")
        return type(name, (Placeholder,), {"__module__": module, "__qualname__": name})


_PICKLE_MODULE = types.SimpleNamespace(
    __name__="axis_stream.store.unpickle.pickle", Unpickler=_Unpickler,
    load=lambda fh, **kw: _Unpickler(fh, **kw).load())


def load_pickle(path: str | Path) -> Any:
    """Unpickle a whole-object torch file with the stand-ins and the trusted-packages policy."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_PICKLE_MODULE)
    except pickle.UnpicklingError as exc:
        if str(exc).startswith("refusing"):
            raise errors.UntrustedPickle(path, str(exc)) from None
        raise errors.NotACheckpoint(path, f"unreadable pickle ({first_line(exc)})") from None
    except EOFError:
        raise errors.TruncatedFile(path, "the pickle ends early") from None
    except Exception as exc:  # the unpickler on damaged bytes raises any type (KeyError, IndexError, ...)
        raise errors.NotACheckpoint(path, f"unreadable torch file ({type(exc).__name__}: {first_line(exc)})") from None


def state_dict_of(obj: Any) -> Any:
    """The tensors inside an unpickled object: a head's weight and bias, an encoder's ``.model``
    state dict, any other module's state dict; a mapping is returned as it is."""
    if isinstance(obj, nn.Linear):
        bias = obj.bias if obj.bias is not None else torch.zeros(obj.weight.shape[0])
        return {"weight": obj.weight.detach(), "bias": bias.detach()}
    if isinstance(obj, nn.Module):
        inner = obj.__dict__.get("_modules", {}).get("model")
        return {k: v.detach() for k, v in (inner if inner is not None else obj).state_dict().items()}
    return obj


# --- the release tree ---

