"""Loading what a run or the hub left: checkpoints and tokenizers, with errors naming the file or flag.

Checkpoints are unpickled with ``weights_only=True`` (a checkpoint from elsewhere is data, never code); a
DeepSpeed ZeRO folder is consolidated to fp32 first. Used by export, warm starts (``runs``) and the data
module's tokenizer, so none of them imports another.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch


class UnsafeCheckpointError(ValueError):
    """A checkpoint that would need more than tensors and plain containers to unpickle (names the file)."""


def _unsafe_message(path: Path, exc: BaseException) -> str:
    found = re.search(r"GLOBAL ([\w.]+)", str(exc))
    what = f"the Python object {found.group(1)}" if found else "Python objects beyond tensors and plain containers"
    return (
        f"{path}: refusing to load: unpickling it would need {what}, which can run code; a multiway-align "
        "checkpoint holds only tensors, numbers and strings (load only checkpoints from sources you trust)"
    )


def safe_torch_load(path: str | os.PathLike) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU: tensors and plain containers only, never code.

    Raises:
        UnsafeCheckpointError: the file needs more (a crafted or foreign pickle); names the file and the object.
        ValueError: the file is empty, truncated or not a torch checkpoint at all (names the file).
    """
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "GLOBAL" in str(exc) or "Weights only load failed" in str(exc):
            raise UnsafeCheckpointError(_unsafe_message(path, exc)) from None
        raise ValueError(f"{path}: not a readable checkpoint ({first_line(exc)})") from None
    except (EOFError, RuntimeError, ValueError, KeyError, IndexError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{path}: not a readable checkpoint (empty, truncated or another format: "
                         f"{type(exc).__name__}: {first_line(exc)})") from None


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


_DEEPSPEED_SAFE_GLOBALS = (
    # plain records DeepSpeed writes into its optimizer states: an enum, a dataclass, the loss scaler's fields
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
)


def _deepspeed_safe_globals() -> list:
    import importlib

    found = []
    for module, name in _DEEPSPEED_SAFE_GLOBALS:
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return found


@contextlib.contextmanager
def _weights_only_everywhere():
    """Every ``torch.load`` inside (DeepSpeed's consolidation passes ``weights_only=False``) loads weights only,
    plus DeepSpeed's own plain record types."""
    saved = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            yield
    finally:
        if saved is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = saved


def load_checkpoint_file(path: str | os.PathLike) -> dict:
    """A Lightning checkpoint as a dict; a DeepSpeed ZeRO folder is consolidated to fp32 first.

    Every file is unpickled with ``weights_only=True`` (a checkpoint from elsewhere is data, never code).
    """
    path = Path(path)
    if path.is_dir():
        from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "consolidated.ckpt"
            try:
                with _weights_only_everywhere(), contextlib.redirect_stdout(sys.stderr):
                    convert_zero_checkpoint_to_fp32_state_dict(str(path), str(out))
            except pickle.UnpicklingError as exc:
                raise UnsafeCheckpointError(_unsafe_message(path, exc)) from None
            except (EOFError, RuntimeError, KeyError, IndexError, zipfile.BadZipFile) as exc:
                raise ValueError(f"{path}: not a readable DeepSpeed checkpoint folder "
                                 f"({type(exc).__name__}: {first_line(exc)})") from None
            ckpt = safe_torch_load(out)
    elif not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    else:
        ckpt = safe_torch_load(path)
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path} is not a multiway-align training checkpoint (it holds a {type(ckpt).__name__})")
    return ckpt


def looks_like_path(text: str) -> bool:
    """A local path rather than a hub id (``name`` or ``org/name``): absolute, ``./``, ``~``, deeper, or existing."""
    return (Path(text).is_absolute() or text.startswith((".", "~")) or text.strip("/").count("/") > 1
            or text.endswith("/") or Path(text).exists())


def load_tokenizer(name_or_path: str | os.PathLike, flag: str) -> Any:
    """``AutoTokenizer.from_pretrained`` with an error naming ``flag`` for a path that does not exist or load."""
    from transformers import AutoTokenizer

    text = os.fspath(name_or_path)
    if looks_like_path(text) and not Path(text).exists():
        raise ValueError(f"{flag} {text}: no such tokenizer folder")
    try:
        return AutoTokenizer.from_pretrained(text)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"{flag} {text}: the tokenizer does not load ({type(exc).__name__}: {first_line(exc)})") from None
