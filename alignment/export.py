"""Export a trained encoder as a Hugging Face + sentence-transformers folder.

The folder holds:

* the backbone in Hugging Face format (``config.json``, ``model.safetensors``)
  and the tokenizer, so ``AutoModel`` / ``AutoTokenizer`` load it;
* ``alignment_encoder.json`` (+ ``projection.safetensors``): pooling,
  projection and normalisation, so ``DualEncoder.from_pretrained`` restores it;
* sentence-transformers' files in the long-standing ``sentence_transformers.models``
  layout (``modules.json``, ``sentence_bert_config.json``, ``1_Pooling/``,
  ``2_Dense/`` when projected, ``3_Normalize/``), which every version from 2.x
  to 6.x loads, so ``SentenceTransformer(folder).encode(...)`` and MTEB give the
  training model's embeddings.

Checkpoints: a Lightning ``.ckpt`` file, or a DeepSpeed ZeRO checkpoint folder
(consolidated to fp32 with Lightning's ``convert_zero_checkpoint_to_fp32_state_dict``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from alignment import adapters, fsutil
from alignment.loading import first_line, load_checkpoint_file, load_tokenizer
from alignment.model import ENCODER_META, PIVOT_SUBDIR, DualEncoder
from alignment.model_card import build_model_card
from alignment.runs import CKPT_RUN, TRAINING_RECORD, training_record
from alignment.staging import check_replaceable

CKPT_HF_CONFIG = "alignment_hf_config"
CKPT_TOKENIZER = "alignment_tokenizer"
CKPT_PREFIXES = "alignment_prompts"
_POOLING_FLAGS = {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token", "last": "pooling_mode_lasttoken"}


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


def write_sentence_transformers_files(
    encoder: DualEncoder, directory: Path, *, max_seq_length: int = 128, prompts: dict[str, str] | None = None
) -> None:
    """Add sentence-transformers' module files next to a saved backbone."""
    if encoder.pivot_backbone is not None:
        raise ValueError(
            "a model with a separate pivot tower (--model.encoder.share_encoder=false) has no single "
            "sentence-transformers pipeline; export it with DualEncoder.save_pretrained only"
        )
    hidden = encoder.backbone.config.hidden_size
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}]
    pooling = {flag: False for flag in (*_POOLING_FLAGS.values(), "pooling_mode_max_tokens",
                                        "pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens")}
    pooling[_POOLING_FLAGS[encoder.pooling]] = True
    _write_json(directory / "1_Pooling" / "config.json", {"word_embedding_dimension": hidden, **pooling, "include_prompt": True})
    modules.append({"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"})
    if encoder.projection is not None:
        from safetensors.torch import save_file

        proj = encoder.projection
        _write_json(directory / "2_Dense" / "config.json", {
            "in_features": proj.in_features, "out_features": proj.out_features, "bias": False,
            "activation_function": "torch.nn.modules.linear.Identity",
        })
        save_file({"linear.weight": proj.weight.detach().cpu().contiguous()}, str(directory / "2_Dense" / "model.safetensors"))
        modules.append({"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    if encoder.normalize:
        (directory / "3_Normalize").mkdir(exist_ok=True)
        modules.append({"idx": len(modules), "name": str(len(modules)), "path": "3_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
    _write_json(directory / "modules.json", modules)
    _write_json(directory / "sentence_bert_config.json", {"max_seq_length": max_seq_length, "do_lower_case": False})
    prompts = {name: text for name, text in (prompts or {}).items() if text}
    # The training prefix is the default prompt: plain encode() gives the training embeddings.
    default = "query" if "query" in prompts else (next(iter(prompts)) if prompts else None)
    _write_json(directory / "config_sentence_transformers.json", {
        "prompts": prompts, "default_prompt_name": default,
        "similarity_fn_name": "cosine" if encoder.normalize else "dot",
    })


def export_encoder(
    encoder: DualEncoder,
    directory: str | os.PathLike,
    *,
    tokenizer: Any = None,
    max_seq_length: int = 128,
    prompts: dict[str, str] | None = None,
    overwrite: bool = True,
    run: dict[str, Any] | None = None,
    flag: str | None = None,
    inputs: Sequence[Path] = (),
    adapter: str = "merge",
    extra: Callable[[DualEncoder, Path], None] | None = None,
) -> Path:
    """Write ``encoder`` (and ``tokenizer``) to ``directory``, complete or not at all.

    An encoder with peft adapters is written merged (``adapter="merge"``: a plain model) or as a peft adapter
    folder (``"peft"``); with language adapters, ``merge`` writes a sentence-transformers ``Router`` with one
    merged encoder per adapter (:mod:`alignment.adapters`).

    The folder is published with :func:`alignment.fsutil.publish_folder`, so an
    interrupted export never leaves a half folder under the final name; an
    existing export is replaced only after the new one is complete,
    and only an export (a folder with ``alignment_encoder.json``) that holds none
    of ``inputs`` (``flag`` names the folder in errors). Files and folders get the
    modes the umask gives (readable by the team where the umask allows). ``run``
    (:func:`alignment.runs.describe_run`) adds the model card, ``README.md``. ``extra(encoder, folder)`` adds
    files for the encoder as written (merged, for LoRA) to the folder before it is published (ONNX graphs, language maps: :mod:`alignment.deploy`).
    """
    final = Path(directory)
    check_replaceable(final, overwrite=overwrite, flag="OUT" if flag is None else flag, is_ours=is_export,
                      what=f"an export (no {ENCODER_META} in it)", inputs=inputs)
    if adapters.is_adapted(encoder.backbone):
        adapters.check_exportable(encoder, adapter)
        if adapter == "peft" or encoder.adapter_config.language_groups:
            if extra is not None:
                raise ValueError("--format onnx and --maps apply to a plain (merged) export; a peft adapter folder or a "
                                 "language-adapter Router export carries neither (use --adapter merge without "
                                 "--model.encoder.adapter.language_groups)")
            return _export_adapted(encoder, final, adapter, tokenizer=tokenizer, max_seq_length=max_seq_length,
                                   prompts=prompts, run=run)
        encoder = adapters.merged_copy(encoder)
    fsutil.recover(final)  # what a killed export to the same folder left
    with fsutil.publish_folder(final) as tmp:
        was_training = encoder.training
        encoder.eval()
        encoder.save_pretrained(tmp)
        encoder.train(was_training)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        write_sentence_transformers_files(encoder, tmp, max_seq_length=max_seq_length, prompts=prompts) \
            if encoder.pivot_backbone is None else None
        if run is not None:
            card = build_model_card({**run, "export_name": final.name}, prompts=prompts,
                                    embedding_dim=encoder.embedding_dim)
            card.save(str(tmp / "README.md"))
            _write_json(tmp / TRAINING_RECORD, training_record(run))
        if extra is not None:
            extra(encoder, tmp)
    return final


def _export_adapted(encoder: DualEncoder, final: Path, adapter: str, *, tokenizer: Any, max_seq_length: int,
                    prompts: dict[str, str] | None, run: dict[str, Any] | None) -> Path:
    """A peft adapter folder (``adapter="peft"``) or a language-adapter ``Router`` folder, plus the
    ``alignment_encoder.json`` marker (pooling, projection) and the tokenizer."""
    fsutil.recover(final)
    with fsutil.publish_folder(final) as tmp:
        if adapter == "peft":
            adapters.save_peft_folder(encoder, tmp)
        else:
            if tokenizer is None:
                raise ValueError("a language-adapter export needs the tokenizer (each route loads its own)")
            adapters.write_language_router(encoder, tmp, tokenizer=tokenizer, max_seq_length=max_seq_length,
                                           prompts=prompts)
        meta = {**encoder.card_extra, "pooling": encoder.pooling, "normalize": encoder.normalize,
                "projection_dim": encoder.projection.out_features if encoder.projection is not None else None,
                "share_encoder": True, "embedding_dim": encoder.embedding_dim,
                "adapter": {"format": adapter if adapter == "peft" else "router",
                            "base": encoder.source_name_or_path,
                            "language_groups": dict(encoder.adapter_config.language_groups)}}
        _write_json(tmp / ENCODER_META, meta)
        if encoder.projection is not None:
            from safetensors.torch import save_file

            from alignment.model import PROJECTION_FILE

            save_file({k: v.detach().cpu().contiguous() for k, v in encoder.projection.state_dict().items()},
                      str(tmp / PROJECTION_FILE))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if run is not None:
            _write_json(tmp / TRAINING_RECORD, training_record(run))
    return final


def is_export(folder: Path) -> bool:
    """``folder`` was written by :func:`export_encoder` / ``DualEncoder.save_pretrained`` (its marker file)."""
    return (folder / ENCODER_META).is_file()


# ---------------------------------------------------------------------------- checkpoints


def encoder_from_checkpoint(path: str | os.PathLike) -> tuple[DualEncoder, Any, dict]:
    """Rebuild the trained ``DualEncoder`` from a checkpoint, without the hub.

    Returns ``(encoder, tokenizer or None, info)``; the backbone architecture
    comes from the Hugging Face config stored in the checkpoint, the weights
    from its state dict, the tokenizer from the path recorded at training time
    when it still loads.
    """
    from transformers import AutoConfig

    ckpt = load_checkpoint_file(path)
    hparams = ckpt.get("hyper_parameters", {})
    if CKPT_HF_CONFIG not in ckpt or not isinstance(hparams, dict) or "encoder" not in hparams:
        raise ValueError(f"{path} is not a multiway-align training checkpoint (no encoder config stored in it)")
    try:
        hf = dict(ckpt[CKPT_HF_CONFIG])
        config = AutoConfig.for_model(hf.pop("model_type"), **hf)
        enc = hparams["encoder"]
        knobs = {k: enc[k] for k in ("pooling", "projection_dim", "normalize", "share_encoder")}
        adapter_only = bool(ckpt.get(adapters.ADAPTER_ONLY))
        if not adapter_only:
            encoder = DualEncoder.from_config(config, adapter=adapters.as_config(enc.get("adapter")), **knobs)
            encoder.source_name_or_path = enc.get("name_or_path")
        state = {k[len("encoder."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("encoder.")}
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise ValueError(f"{path}: a damaged multiway-align checkpoint (its encoder config does not rebuild a model: "
                         f"{type(exc).__name__}: {first_line(exc)})") from None
    if adapter_only:  # the frozen base from its name or folder, as at training
        encoder = _base_for_adapter_checkpoint(path, enc)
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(("backbone.pooler", f"{PIVOT_SUBDIR}.pooler"))]
    if adapter_only:
        trainable = {n for n, p in encoder.named_parameters() if p.requires_grad}
        missing = [k for k in missing if k in trainable]
    if missing or unexpected:
        raise ValueError(f"{path}: encoder weights do not match its config (missing {missing[:5]}, unexpected {unexpected[:5]})")
    tokenizer = None
    if ckpt.get(CKPT_TOKENIZER):
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(ckpt[CKPT_TOKENIZER])
        except (OSError, ValueError):
            tokenizer = None
    run = dict(ckpt.get(CKPT_RUN) or {})
    encoder.card_extra = dict(run.get("source") or {})  # the base folder's origin and prefixes, as at training
    run["global_step"] = ckpt.get("global_step")
    info = {"global_step": ckpt.get("global_step"), "epoch": ckpt.get("epoch"), "tokenizer": ckpt.get(CKPT_TOKENIZER),
            "prompts": ckpt.get(CKPT_PREFIXES) or {}, "run": run}
    return encoder.eval(), tokenizer, info


def _base_for_adapter_checkpoint(path, enc: dict) -> DualEncoder:
    from alignment.model import ModelConfig

    try:
        return DualEncoder.from_model_config(ModelConfig(**enc))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} holds only the adapters (--model.encoder.adapter.checkpoint_adapter_only) and its "
                         f"base {enc.get('name_or_path')!r} does not load here: {first_line(exc)}") from None


def check_tokenizer_fits(tokenizer: Any, encoder: DualEncoder, what: str) -> None:
    """Every token id the tokenizer can produce must have a row in the encoder's embedding table."""
    rows = encoder.backbone.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ValueError(
            f"{what} has {len(tokenizer)} tokens but the model's embedding table has {rows} rows: it is another "
            "model's tokenizer (token ids past the table would crash every encode); pass the training tokenizer"
        )


def export_checkpoint(path: str | os.PathLike, out: str | os.PathLike, *, tokenizer: str | None = None,
                      max_seq_length: int = 128, overwrite: bool = False, adapter: str = "merge",
                      extra: Callable[[DualEncoder, Path], None] | None = None) -> Path:
    """``align export CKPT OUT``: a checkpoint to an HF + sentence-transformers folder."""
    inputs = [Path(path)] + ([Path(tokenizer)] if tokenizer is not None and Path(tokenizer).exists() else [])
    check_replaceable(Path(out), overwrite=overwrite, flag="OUT", is_ours=is_export,
                      what=f"an export (no {ENCODER_META} in it)", inputs=inputs)  # before loading anything
    encoder, tok, info = encoder_from_checkpoint(path)
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer, "--tokenizer")
    if tok is None:
        raise ValueError(
            f"the tokenizer recorded in {path} ({info['tokenizer']!r}) does not load here: pass --tokenizer NAME_OR_PATH"
        )
    check_tokenizer_fits(tok, encoder, f"--tokenizer {tokenizer}" if tokenizer is not None else
                         f"the tokenizer recorded in {path} ({info['tokenizer']!r})")
    run = info["run"] or {"model": None, "global_step": info["global_step"], "tokenizer": info["tokenizer"]}
    return export_encoder(encoder, out, tokenizer=tok, max_seq_length=max_seq_length, prompts=info["prompts"],
                          overwrite=overwrite, run=run, inputs=inputs, adapter=adapter,
                          extra=extra)
