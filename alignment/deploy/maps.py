"""Post-hoc per-language maps: fitted on a calibration split, saved, applied at eval and at inference.

Two kinds of step, applied in the order of ``kind`` (``centring``, ``procrustes`` or
``centring+procrustes``), each on unit vectors and followed by a renormalisation:

* **centring** (per-language mean removal): ``x <- normalise(x - mu_L)``, ``mu_L`` the mean of language
  ``L``'s unit embeddings on the calibration rows. It removes the language-identity offset that keeps
  translations apart (Libovický et al. 2020, "On the language neutrality of pre-trained multilingual
  representations"). Every language has a mean, the pivot included.
* **procrustes**: ``x <- normalise(x @ W_L)``, ``W_L`` the orthogonal map of ``L`` onto the pivot
  (:func:`alignment.evaluate.procrustes.fit_procrustes`, fitted after the centring when both are
  asked); the pivot is left as it is.

A language the maps do not know is an error everywhere (:class:`UnmappedLanguageError` here,
sentence-transformers' ``ValueError: No route found for task type ...`` in an export): a silent
identity would hand back vectors in another space without anyone noticing.

Files (:meth:`LanguageMaps.save`): ``language_maps.safetensors`` (``mean.<lang>`` ``(D,)``,
``rotation.<lang>`` ``(D, D)``, float32) and ``language_maps.json`` (kind, pivot, languages, dim,
the model identity and the calibration rows).

In an export (:func:`add_maps_to_export`) the maps become one more sentence-transformers module, the
library's own ``Router``, with one route per language; ``SentenceTransformer(folder).encode(texts,
task="de")`` runs route ``de`` (``Normalize``, ``Dense`` = centring, ``Normalize``, ``Dense`` = rotation,
``Normalize``). ``task`` is sentence-transformers' documented routing argument (``Router`` resolves the
route from it); only built-in module classes are used, so no ``trust_remote_code`` is needed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from alignment import fsutil
from alignment.evaluate.embeddings import MultiWayEmbeddings, l2_normalize
from alignment.evaluate.procrustes import fit_procrustes

MapKind = Literal["procrustes", "centring", "centring+procrustes"]
MAPS_META = "language_maps.json"
MAPS_WEIGHTS = "language_maps.safetensors"
MAPS_SUBDIR = "language_maps"  # inside an export: the maps' own files, for align eval --maps
ROUTER_TYPE = "sentence_transformers.base.modules.router.Router"


class UnmappedLanguageError(ValueError):
    """A language the maps were not fitted for."""


def model_fingerprint(model: torch.nn.Module) -> str:
    """``sha256:<hex>`` over the model's parameters (names, shapes, fp32 bytes): the maps' model identity.

    The same weights give the same fingerprint whether loaded from a checkpoint or an export. A
    :class:`~alignment.evaluate.encoder.RouterEncoder` (a language-adapter export) gives its own.
    """
    if callable(getattr(model, "fingerprint", None)):
        return model.fingerprint()
    digest = hashlib.sha256()
    for name, param in sorted(model.state_dict().items()):
        if not name.startswith(("backbone.", "projection", "pivot_backbone.")) or name.endswith("position_ids"):
            continue
        digest.update(name.encode() + str(tuple(param.shape)).encode())
        digest.update(param.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return "sha256:" + digest.hexdigest()


@dataclass
class LanguageMaps:
    """Per-language maps onto a shared space (see the module docstring)."""

    kind: str
    pivot: str
    dim: int
    means: dict[str, Tensor] = field(default_factory=dict)
    """language -> ``(D,)`` mean of its unit embeddings (centring)."""
    rotations: dict[str, Tensor] = field(default_factory=dict)
    """non-pivot language -> ``(D, D)`` orthogonal map, applied as ``x @ W`` (procrustes)."""
    model: dict[str, Any] = field(default_factory=dict)
    """The model the maps were fitted with: ``fingerprint`` (:func:`model_fingerprint`), ``spec``."""
    calibration: dict[str, Any] = field(default_factory=dict)
    """The calibration data: ``data``, ``split``, ``rows``, ``sentences`` per language, ``fit_pairs``."""

    @property
    def steps(self) -> tuple[str, ...]:
        return tuple(self.kind.split("+"))

    @property
    def languages(self) -> tuple[str, ...]:
        known = set(self.means) | set(self.rotations) | {self.pivot}
        return tuple(sorted(known))

    def check_language(self, lang: str) -> None:
        if lang not in self.languages:
            raise UnmappedLanguageError(
                f"no {self.kind} map for language {lang!r}: the maps cover {', '.join(self.languages)}; fit them "
                f"on calibration data that has {lang!r} (align fit-map)"
            )

    def apply_tensor(self, x: Tensor, lang: str) -> Tensor:
        """Map ``x`` ``(n, D)``, all in language ``lang``: each step on unit vectors, renormalised."""
        self.check_language(lang)
        out = l2_normalize(x.float())
        for step in self.steps:
            if step == "centring":
                out = l2_normalize(out - self.means[lang].to(out.device))
            elif lang != self.pivot:
                out = l2_normalize(out @ self.rotations[lang].to(out.device))
        return out

    def apply(self, emb: MultiWayEmbeddings) -> MultiWayEmbeddings:
        """Every sentence mapped by its language (unit norm)."""
        for lang in emb.language_codes:
            self.check_language(lang)
        out = emb.embeddings.clone()  # (N, D)
        for pos, lang in enumerate(emb.language_codes):
            sel = (emb.lang_index == pos).to(out.device)  # (N,)
            out[sel] = self.apply_tensor(out[sel], lang)
        return emb.with_embeddings(out)

    # ---- files

    def tensors(self) -> dict[str, Tensor]:
        out = {f"mean.{k}": v.float().contiguous() for k, v in self.means.items()}
        return out | {f"rotation.{k}": v.float().contiguous() for k, v in self.rotations.items()}

    def meta(self) -> dict[str, Any]:
        return {"kind": self.kind, "pivot": self.pivot, "dim": self.dim, "languages": list(self.languages),
                "apply": "per step on unit vectors, renormalised: centring x - mean[L]; procrustes x @ rotation[L] "
                         "(pivot unchanged)",
                "model": self.model, "calibration": self.calibration}  # fmt: skip

    def write(self, folder: Path) -> None:
        """Write the two files into ``folder`` (an open staging folder)."""
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        save_file(self.tensors(), str(folder / MAPS_WEIGHTS))
        (folder / MAPS_META).write_text(json.dumps(self.meta(), indent=2) + "\n")

    def save(self, folder: str | Path) -> Path:
        """Publish the maps as ``folder`` (complete or not at all)."""
        with fsutil.publish_folder(folder) as tmp:
            self.write(tmp)
        return Path(folder)

    @classmethod
    def load(cls, folder: str | Path) -> LanguageMaps:
        """Read maps from a maps folder, or from an export that carries them (its ``language_maps/``)."""
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / MAPS_META).is_file() and (folder / MAPS_SUBDIR / MAPS_META).is_file():
            folder = folder / MAPS_SUBDIR
        if not (folder / MAPS_META).is_file():
            raise FileNotFoundError(f"{folder} holds no language maps ({MAPS_META}); write them with align fit-map")
        meta = json.loads((folder / MAPS_META).read_text())
        tensors = load_file(str(folder / MAPS_WEIGHTS))
        means = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("mean.")}
        rotations = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("rotation.")}
        return cls(meta["kind"], meta["pivot"], int(meta["dim"]), means, rotations, meta.get("model", {}),
                   meta.get("calibration", {}))  # fmt: skip

    # ---- sentence-transformers

    def router(self):
        """The maps as a sentence-transformers ``Router``: one route per language, no default route."""
        from sentence_transformers.base.modules import Dense, Normalize, Router

        eye = torch.eye(self.dim)
        routes = {}
        for lang in self.languages:
            modules = [Normalize()]
            for step in self.steps:
                if step == "centring":
                    weight, bias = eye.clone(), -self.means[lang].float()
                elif lang != self.pivot:
                    weight, bias = self.rotations[lang].float().T.contiguous(), torch.zeros(self.dim)
                else:
                    continue
                modules += [Dense(self.dim, self.dim, bias=True, activation_function=torch.nn.Identity(),
                                  init_weight=weight, init_bias=bias), Normalize()]  # fmt: skip
            routes[lang] = modules
        return Router(routes, default_route=None, allow_empty_key=False)


def fit_maps(emb: MultiWayEmbeddings, kind: str) -> LanguageMaps:
    """Fit ``kind`` on every row of ``emb`` (the calibration set).

    Raises:
        ValueError: procrustes and a language shares no row with the pivot (named).
    """
    maps = LanguageMaps(kind, emb.pivot, emb.dim)
    current = emb
    for step in maps.steps:
        if step == "centring":
            maps.means = {lang: current.embeddings[current.sentences(lang)].mean(0) for lang in current.language_codes}
            current = LanguageMaps("centring", emb.pivot, emb.dim, maps.means).apply(emb)
        else:
            fitted = fit_procrustes(current, torch.ones(current.num_rows, dtype=torch.bool))
            maps.rotations = dict(fitted.maps)
            maps.calibration["fit_pairs"] = dict(fitted.fit_pairs)
    maps.calibration["sentences"] = {lang: int(emb.sentences(lang).numel()) for lang in emb.language_codes}
    return maps


def attach_maps(folder: Path, maps: LanguageMaps) -> None:
    """Append the maps to the sentence-transformers pipeline of the export being written in ``folder``.

    ``modules.json`` gets a ``Router`` entry (``N_LanguageMaps/``) and the maps' own files go to
    ``language_maps/`` (what ``align eval --maps FOLDER`` reads).
    """
    modules_path = folder / "modules.json"
    if not modules_path.is_file():
        raise FileNotFoundError(f"{folder} has no modules.json: not a sentence-transformers export")
    modules = json.loads(modules_path.read_text())
    if any(m.get("type") == ROUTER_TYPE for m in modules):
        raise ValueError(f"{folder} already carries a Router module (maps or adapters); start from the plain export")
    idx = len(modules)
    path = f"{idx}_LanguageMaps"
    maps.router().save(str(folder / path))
    modules.append({"idx": idx, "name": str(idx), "path": path, "type": ROUTER_TYPE})
    modules_path.write_text(json.dumps(modules, indent=2) + "\n")
    maps.write(folder / MAPS_SUBDIR)


def check_same_model(maps: LanguageMaps, fingerprint: str, what: str) -> None:
    """The maps were fitted with the model whose :func:`model_fingerprint` is ``fingerprint``."""
    fitted = maps.model.get("fingerprint")
    if fitted and fitted != fingerprint:
        raise ValueError(
            f"--maps: these maps were fitted with another model ({maps.model.get('spec')}, {fitted[:19]}...) than "
            f"{what} ({fingerprint[:19]}...): maps only fit the embedding space they were computed in; "
            "refit them with align fit-map --model on this model"
        )


def add_maps_to_export(export: Path, maps: LanguageMaps, out: Path) -> Path:
    """Publish ``out``: a copy of the export ``export`` with the maps attached (:func:`attach_maps`)."""
    if not (export / "modules.json").is_file():
        raise FileNotFoundError(f"{export} has no modules.json: not a sentence-transformers export")
    with fsutil.publish_folder(out) as tmp:
        shutil.copytree(export, tmp, dirs_exist_ok=True)
        attach_maps(tmp, maps)
    return out
