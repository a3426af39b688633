"""Run configurations as functions. `nativevl train RECIPE --out DIR --key=value ...` picks one,
applies overrides (a field name unique across the run's dataclasses, or a dotted path such as
`stage.vit.mode`), builds model, tokenizer and data, and runs the one loop."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nativevl.data.pipeline import DataConfig
from nativevl.train.loop import TrainConfig
from nativevl.train.stages import ModulePolicy, StagePolicy


@dataclass(frozen=True)
class ModelSource:
    preset: str = "tiny"  # built from scratch when nothing below is given
    init_from: str | None = None  # a checkpoint folder (either layout) to continue from
    vit_from: str | None = None  # native pre-training: the ViT of this checkpoint ...
    llm_from: str | None = None  # ... and the LLM of this Qwen2 / llama-style folder
    tokenizer: str | None = None  # tokenizer folder (default: init_from, then llm_from)
    grow_layers: int = 0  # LLM blocks added after the last, starting as the identity (io.parts.grow_llm_depth)


@dataclass(frozen=True)
class Run:
    model: ModelSource = field(default_factory=ModelSource)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    stage: StagePolicy = field(default_factory=StagePolicy)
    meta: str | None = None  # dataset meta json; None: the recipe generates its data
    val_meta: str | None = None  # held-out meta json: the validation loss, every train.val_every steps


# ---------------------------------------------------------------- recipes


def debug_tiny() -> Run:
    """A tiny model on generated data: under a minute on a laptop CPU."""
    return Run(
        model=ModelSource(preset="tiny"),
        data=DataConfig(max_tokens=384, max_tiles=8, image_size=56, image_seq_length=4, system_message=None,
                        loss_reduction="square", min_records_before_abort=50),
        train=TrainConfig(max_steps=60, lr=3e-3, warmup_steps=5, global_batch=2, weight_decay=0.0, tensorboard=True),
    )


def pretrain() -> Run:
    """Native multimodal pre-training: every module trains from step 0 on text + multimodal data,
    square averaging, text : multimodal 1 : 3 in tokens, as InternVL3's ~50B + 150B (the datasets' mean
    tokens per sample measured on a few records each; --text_ratio_unit=samples for a share of samples);
    text documents longer than a pack split into pack-sized parts (--long_text=cut keeps the first).
    Needs --meta and --vit_from/--llm_from (or --init_from). V2PE with --v2pe=random."""
    return Run(
        data=DataConfig(loss_reduction="square", text_ratio=0.25, v2pe="off", max_tokens=16384, max_tiles=48),
        train=TrainConfig(lr=1e-4, warmup_steps=200, max_steps=10000, global_batch=8, weight_decay=0.05),
        stage=StagePolicy(vit=ModulePolicy("full", lr=1e-5), mlp=ModulePolicy("full", lr=2e-4), llm=ModulePolicy("full")),
    )


def sft() -> Run:
    """InternVL3's second-stage fine-tuning: packing, square averaging, JPEG augmentation where the
    meta file asks for it, ViT frozen by default (--stage.vit.mode=full to train it). Needs --meta and --init_from."""
    return Run(
        data=DataConfig(loss_reduction="square", max_tokens=16384, max_tiles=48),
        train=TrainConfig(lr=2e-5, warmup_steps=30, max_steps=1000, global_batch=8, weight_decay=0.05),
        stage=StagePolicy(vit=ModulePolicy("frozen")),
    )


def internvl3_1b_sft() -> Run:
    """sft() with the released 1B script's learning rate (1e-5)."""
    run = sft()
    return dataclasses.replace(run, train=dataclasses.replace(run.train, lr=1e-5))


def sft_lora() -> Run:
    """sft() with LoRA (rank 16, alpha 32, dropout 0.05) on the LLM; ViT frozen, MLP full."""
    run = sft()
    return dataclasses.replace(run, stage=dataclasses.replace(run.stage, llm=ModulePolicy("lora")),
                               train=dataclasses.replace(run.train, lr=1e-4))


def sft_qlora() -> Run:
    """sft_lora() over a 4-bit base: the LLM's linear layers stored in NF4 with double quantization
    (QLoRA, as bitsandbytes stores them), LoRA rank 16 on each; ViT frozen, MLP full."""
    run = sft_lora()
    return dataclasses.replace(run, stage=dataclasses.replace(run.stage, llm=ModulePolicy("qlora")))


def mpo() -> Run:
    """Mixed Preference Optimization on preference records ({image, question, chosen, rejected}):
    0.8 DPO + 0.2 BCO (reward shift) + 1.0 NLL of the chosen response, beta 0.1, against the frozen
    initial model; every module trains, token-mean NLL. InternVL3's scripts use lr 2e-7 for 1B-78B at
    batch 256 for one epoch. Needs --meta and --init_from (the SFT model)."""
    return Run(
        data=DataConfig(loss_reduction="token", max_tokens=12288, max_tiles=48),
        train=TrainConfig(lr=2e-7, warmup_steps=10, max_steps=1000, global_batch=8, weight_decay=0.05, objective="mpo"),
        stage=StagePolicy(),
    )


def prm() -> Run:
    """The process reward model: SFT on VisualPRM's multi-turn '+'/'-' conversations (nativevl data prm),
    VisualPRM's lr 1e-5, token averaging, every module trains. Every label slot reads '+' in the input,
    as when scoring, and is trained on its true label. Needs --meta and --init_from. `--objective=prm`
    trains the label slots as a two-way '+'/'-' choice instead (docs/results/alignment.md compares them)."""
    return Run(
        data=DataConfig(loss_reduction="token", max_tokens=16384, max_tiles=48, system_message=None, prm_placeholder="+"),
        train=TrainConfig(lr=1e-5, warmup_steps=30, max_steps=1000, global_batch=8, weight_decay=0.05),
        stage=StagePolicy(),
    )


RECIPES: dict[str, Callable[[], Run]] = {
    "mpo": mpo,
    "prm": prm,
    "debug_tiny": debug_tiny,
    "pretrain": pretrain,
    "sft": sft,
    "sft_lora": sft_lora,
    "sft_qlora": sft_qlora,
    "internvl3_1b_sft": internvl3_1b_sft,
}


def recipe(name: str) -> Run:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known: {sorted(RECIPES)}")
    return RECIPES[name]()


# what a recipe cannot run without, as its docstring says: only debug_tiny generates its data and
# builds its model from scratch; pre-training may start from a preset
NEEDS: dict[str, tuple[str, ...]] = {
    "pretrain": ("meta",),
    "sft": ("meta", "init_from"),
    "internvl3_1b_sft": ("meta", "init_from"),
    "sft_lora": ("meta", "init_from"),
    "sft_qlora": ("meta", "init_from"),
    "mpo": ("meta", "init_from"),
    "prm": ("meta", "init_from"),
}
_NEED_HELP = {"meta": "--meta (the dataset meta json)", "init_from": "--init_from (the checkpoint folder to fine-tune)"}


def check_inputs(name: str, run: Run) -> None:
    """ValueError naming what recipe `name` needs and `run` lacks (instead of a run on generated toy data)."""
    given = {"meta": run.meta is not None, "init_from": run.model.init_from is not None}
    missing = [_NEED_HELP[k] for k in NEEDS.get(name, ()) if not given[k]]
    src = run.model
    if name == "pretrain" and not (src.init_from or src.vit_from or src.llm_from or src.tokenizer):
        # else a tiny model and a tokenizer fitted on the toy corpus would train on the user's data
        missing.append("--vit_from and --llm_from (or --init_from; or --tokenizer for a model built from --preset)")
    if missing:
        raise ValueError(f"recipe {name} needs {' and '.join(missing)}")


# ---------------------------------------------------------------- overrides


def _leaf_paths(obj: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], dataclasses.Field]:
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out.update(_leaf_paths(value, prefix + (f.name,)))
        else:
            out[prefix + (f.name,)] = f
    return out


def _parse(text: str, annotation: Any, key: str) -> Any:
    """A command-line string as the field's type; booleans and None are spelled out."""
    if isinstance(annotation, str):
        annotation = eval(annotation, {"Path": Path, "typing": typing})  # from __future__ annotations
    options = typing.get_args(annotation) if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union else (annotation,)
    if type(None) in options and text.lower() in ("none", "null"):
        return None
    for kind in options:
        if kind is bool:
            if text.lower() in ("true", "1", "yes"):
                return True
            if text.lower() in ("false", "0", "no"):
                return False
            raise ValueError(f"--{key} takes true or false, got {text!r}")
        if kind is str and (text == "~" or text.startswith("~/")):
            return str(Path(text).expanduser())  # --meta=~/data/meta.json: the shell leaves a '~' after '=' alone
        if kind in (int, float, str):
            try:
                return kind(text)
            except ValueError:
                continue
    raise ValueError(f"--{key}: cannot read {text!r} as {annotation}")


def _set(obj: Any, path: tuple[str, ...], value: Any) -> Any:
    if len(path) == 1:
        return dataclasses.replace(obj, **{path[0]: value})
    return dataclasses.replace(obj, **{path[0]: _set(getattr(obj, path[0]), path[1:], value)})


def apply_overrides(run: Run, overrides: list[str]) -> Run:
    """`--key=value` or `--key value` strings; an unknown or ambiguous key is an error."""
    leaves = _leaf_paths(run)
    items, pending = [], list(overrides)
    while pending:
        arg = pending.pop(0)
        if not arg.startswith("--"):
            raise ValueError(f"overrides look like --key=value, got {arg!r}")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
        elif pending:
            key, value = arg[2:], pending.pop(0)
        else:
            raise ValueError(f"{arg} needs a value")
        items.append((key, value))
    for key, value in items:
        path = tuple(key.split("."))
        matches = [p for p in leaves if p == path] or [p for p in leaves if p[-len(path):] == path]
        if not matches:
            raise ValueError(f"unknown key {key!r}; known: {sorted('.'.join(p) for p in leaves)}")
        if len(matches) > 1:  # e.g. --lr: the run's (train.lr) rather than a module's (stage.vit.lr)
            shallowest = min(len(p) for p in matches)
            if sum(len(p) == shallowest for p in matches) == 1:
                matches = [p for p in matches if len(p) == shallowest]
        if len(matches) > 1:
            raise ValueError(f"key {key!r} is ambiguous: {sorted('.'.join(p) for p in matches)}; use the dotted path")
        run = _set(run, matches[0], _parse(value, leaves[matches[0]].type, key))
    return run


# ---------------------------------------------------------------- build and launch


def build(run: Run, out_dir: str | Path):
    """(model, tokenizer, dataset, run) for a run; the data config is aligned with the model's shapes."""
    import torch

    from nativevl.config import preset
    from nativevl.data import synthetic
    from nativevl.data.pipeline import PackedDataset
    from nativevl.data.records import load_meta
    from nativevl.io.hf import load_model
    from nativevl.io.parts import grow_llm_depth, init_from_parts
    from nativevl.io.tokenizer import load_tokenizer, train_tokenizer
    from nativevl.model.vlm import VisionLanguageModel
    from nativevl.train.parallel import init_distributed

    out_dir = Path(out_dir)
    rank, world, _ = init_distributed()
    src = run.model
    meta = run.meta
    if meta is None:  # generated data (debug runs), written once by rank 0
        meta = str(out_dir / "data" / "meta.json")
        if rank == 0 and not Path(meta).is_file():
            synthetic.write_dataset(out_dir / "data", seed=run.data.seed, size=run.data.image_size)
        if world > 1:
            torch.distributed.barrier()
    tok_path = src.tokenizer or src.init_from or src.llm_from
    if tok_path is not None:
        try:
            tokenizer = load_tokenizer(tok_path)
        except ValueError as e:
            if tok_path == src.llm_from and tok_path != src.tokenizer:  # a plain Qwen2.5 / InternLM3 folder
                raise ValueError(f"{e}. Pre-training from parts needs InternVL's tokenizer (the LLM's vocabulary "
                                 "plus <img>, </img>, <IMG_CONTEXT> ...): pass --tokenizer <an InternVL3 tokenizer "
                                 "folder>") from None
            raise
    elif (out_dir / "data" / "tokenizer").is_dir():  # a resumed debug run: the same tokenizer as before
        tokenizer = load_tokenizer(out_dir / "data" / "tokenizer")
    else:
        tokenizer = train_tokenizer(synthetic.corpus(), vocab_size=preset(src.preset).text.vocab_size)
        if rank == 0:
            tokenizer.save_pretrained(str(out_dir / "data" / "tokenizer"))
    if src.init_from:
        model = load_model(src.init_from, dtype=torch.float32)
    elif src.vit_from or src.llm_from:
        if not (src.vit_from and src.llm_from):
            raise ValueError("native pre-training from parts needs both --vit_from and --llm_from")
        model = init_from_parts(src.vit_from, src.llm_from, tokenizer, seed=run.train.seed)
    else:
        cfg = preset(src.preset)
        cfg = dataclasses.replace(
            cfg,
            text=dataclasses.replace(cfg.text, vocab_size=len(tokenizer), eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                                     pad_token_id=tokenizer.pad_token_id, bos_token_id=None),
            image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        )
        torch.manual_seed(run.train.seed)
        model = VisionLanguageModel(cfg)
        model.init_weights()
    if src.grow_layers:
        if not src.init_from:
            raise ValueError("--grow_layers grows a trained model: it needs --init_from")
        model = grow_llm_depth(model, src.grow_layers, seed=run.train.seed)
    mcfg = model.config
    # a checkpoint and a tokenizer that disagree fail here, by name, not as an IndexError in the first
    # forward or as every record rejected for its image placeholders
    if len(tokenizer) > mcfg.text.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary holds "
                         f"{mcfg.text.vocab_size} (model {src.init_from or src.llm_from or src.preset}, tokenizer "
                         f"{tok_path or 'generated'}); give the model's own tokenizer (--tokenizer)")
    image_token = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    if image_token != mcfg.image_token_id:
        raise ValueError(f"<IMG_CONTEXT> is token {image_token} in the tokenizer but {mcfg.image_token_id} in the model "
                         f"(model {src.init_from or src.llm_from or src.preset}, tokenizer {tok_path or 'generated'}); "
                         f"give the model's own tokenizer (--tokenizer)")
    data = run.data.for_model(mcfg)
    run = dataclasses.replace(run, data=data, meta=meta)
    dataset = PackedDataset(load_meta(meta), tokenizer, data, rank=rank, world_size=world, rejects_dir=out_dir / "rejects")
    return model, tokenizer, dataset, run


def launch(run: Run, out_dir: str | Path) -> dict:
    from nativevl.train.loop import train

    model, tokenizer, dataset, run = build(run, out_dir)
    # the records each dataset holds: a resume after its files changed is told that its position moved
    records = {"data_records": {src.name: len(src) for src in dataset.sources}}
    return train(model, tokenizer, dataset, run.stage, run.train, out_dir, run_config=dataclasses.asdict(run) | records,
                 val_dataset=build_val_dataset(run, tokenizer, out_dir))


def build_val_dataset(run: Run, tokenizer, out_dir: str | Path):
    """The validation stream of `run.val_meta` (None without one): all its records, each once (or a
    seeded sample of train.val_records of them, without repeats, when it holds more; repeat_time and
    text_ratio shape training only), packed as the training data (the data config `build` aligned with
    the model), for this rank."""
    if run.val_meta is None:
        return None
    import logging

    from nativevl.data.pipeline import FileSource, PackedDataset
    from nativevl.data.records import load_meta
    from nativevl.train.parallel import init_distributed

    rank, world, _ = init_distributed()
    sources = [FileSource(spec) for spec in load_meta(run.val_meta)]
    total = sum(len(src) for src in sources)
    if run.train.val_records > total:
        logging.getLogger(__name__).warning("val_records %d is over the %d records of %s: using all %d",
                                            run.train.val_records, total, run.val_meta, total)
    # as at test time: no augmentation, V2PE's fixed stride, evenly spaced video frames
    data = dataclasses.replace(run.data, max_records=min(run.train.val_records, total), text_ratio=None,
                               training=False, read_once=True)  # each record once: the set named, not a sample of it
    return PackedDataset(sources, tokenizer, data, rank=rank, world_size=world, rejects_dir=Path(out_dir) / "rejects-val")
