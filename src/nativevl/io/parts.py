"""Native pre-training starts from parts, as InternVL3 does: a ViT from one checkpoint, an LLM from
a Qwen2 / llama-style HF folder, a new random MLP, and the new special-token rows initialised to
the mean embedding."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch

from nativevl.config import ModelConfig, TextConfig, VisionConfig
from nativevl.io import hf as hfio
from nativevl.io import hf_config, keymap
from nativevl.model.vlm import VisionLanguageModel

log = logging.getLogger(__name__)


def _config(path: Path) -> dict:
    f = path / "config.json"
    if not f.is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint folder: {f} does not exist")
    return json.loads(f.read_text())


def load_vit(path: str | Path) -> tuple[VisionConfig, dict[str, torch.Tensor]]:
    """A ViT from an InternVL checkpoint (either layout), a standalone InternViT folder (original
    InternVisionModel names) or transformers' InternVLVisionModel folder; keys come back as ours."""
    path = Path(path)
    d = _config(path)
    raw, _ = hfio.read_tensors(path)
    model_type = d.get("model_type")
    if model_type in ("internvl", "internvl_chat"):
        cfg, layout = hf_config.read_config(path)
        sd = keymap.from_hf(raw) if layout == "hf" else keymap.from_internvl(raw)
        vision = cfg.vision
    elif model_type == "intern_vit_6b":
        sd = keymap.from_internvl({f"vision_model.{k}": v for k, v in raw.items()})
        vision = hf_config.vision_from_dict(d, "internvl")
    elif model_type == "internvl_vision":
        sd = {f"vision_tower.{k.removeprefix('model.')}": v for k, v in raw.items()}
        vision = hf_config.vision_from_dict(d, "hf")
    else:
        raise ValueError(f"{path}: model_type {model_type!r} is not an InternViT or InternVL checkpoint")
    sd = {k: v for k, v in sd.items() if k.startswith("vision_tower.")}
    if not sd:
        raise ValueError(f"{path}: no vision tower weights found")
    return vision, sd


def load_llm(path: str | Path) -> tuple[TextConfig, bool, dict[str, torch.Tensor]]:
    """(config, tied, weights as ours) from a Qwen2ForCausalLM / LlamaForCausalLM folder."""
    path = Path(path)
    d = _config(path)
    text = hf_config.text_from_dict(d, source=str(path / "config.json"))
    raw, _ = hfio.read_tensors(path)
    sd = {}
    for k, v in raw.items():
        if k.endswith(".rotary_emb.inv_freq"):
            continue  # a RoPE buffer older transformers saved (Llama-2 folders); recomputed from the config
        if k.startswith("model."):
            sd["language_model." + k[len("model."):]] = v
        elif k == "lm_head.weight":
            sd[k] = v
        else:
            raise ValueError(f"{path}: unexpected tensor {k!r} for a causal LM folder")
    tied = bool(d.get("tie_word_embeddings", False))
    if not tied and "lm_head.weight" not in sd:
        raise ValueError(f"{path}: no lm_head.weight, and config.json does not set tie_word_embeddings "
                         "(set it to true if the output layer shares the input embeddings)")
    return text, tied, sd


def _llm_tokenizer_size(path: Path) -> int | None:
    """len() of the LLM folder's own tokenizer, None where the folder has none (or it cannot be read)."""
    if not any((path / n).is_file() for n in ("tokenizer.json", "vocab.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    try:
        return len(AutoTokenizer.from_pretrained(str(path), trust_remote_code=False))
    except (OSError, ValueError) as e:
        log.warning("%s: cannot read the LLM's tokenizer (%s); new token rows are those past vocab_size", path, e)
        return None


def _init_new_rows(weight: torch.Tensor, known: int, new_end: int, rows: int) -> torch.Tensor:
    """Grow to `rows` rows and set rows [known, new_end) (the new tokens) to the mean of rows [0, known)
    (InternVL's init for new special tokens); rows past new_end (unused padding) are kept."""
    if new_end <= known:
        return weight
    mean = weight[:known].float().mean(0, keepdim=True).to(weight.dtype)
    if rows > weight.shape[0]:
        weight = torch.cat([weight, mean.expand(rows - weight.shape[0], -1)], dim=0)
    else:
        weight = weight.clone()
    weight[known:new_end] = mean
    return weight


def init_from_parts(
    vit_path: str | Path, llm_path: str | Path, tokenizer, *, downsample_ratio: float = 0.5, seed: int = 0
) -> VisionLanguageModel:
    vision, vit_sd = load_vit(vit_path)
    text, tied, llm_sd = load_llm(llm_path)
    text_vocab = text.vocab_size
    vocab = max(len(tokenizer), text_vocab)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    # a Qwen2 config.json as transformers saves it names no pad id: the tokenizer's, as a from-scratch model
    pad = text.pad_token_id if text.pad_token_id is not None else tokenizer.pad_token_id
    text = dataclasses.replace(text, vocab_size=vocab, eos_token_id=im_end, pad_token_id=pad)
    cfg = ModelConfig(vision=vision, text=text, downsample_ratio=downsample_ratio,
                      image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"), tie_word_embeddings=tied)
    torch.manual_seed(seed)
    model = VisionLanguageModel(cfg)
    model.init_weights()  # the projector keeps this random init; the rest is overwritten below
    # Rows of tokens the LLM's own tokenizer lacks start at the mean of the known rows. Qwen2.5 pads its
    # embedding past its tokenizer (151936 rows, 151665 tokens), so InternVL's tokens get ids inside it.
    base = _llm_tokenizer_size(Path(llm_path))
    known = text_vocab if base is None else min(base, text_vocab)
    new_end = max(len(tokenizer), known)
    embed = "language_model.embed_tokens.weight"
    llm_sd[embed] = _init_new_rows(llm_sd[embed], known, new_end, vocab)
    if not tied:
        llm_sd["lm_head.weight"] = _init_new_rows(llm_sd["lm_head.weight"], known, new_end, vocab)
    else:
        llm_sd.pop("lm_head.weight", None)
    expected = model.state_dict()
    for key, value in {**vit_sd, **llm_sd}.items():
        if key not in expected:
            raise ValueError(f"unexpected tensor {key!r} from the ViT / LLM parts")
        if expected[key].shape != value.shape:
            raise ValueError(f"tensor {key!r} has shape {tuple(value.shape)}, the model expects {tuple(expected[key].shape)}")
    missing = [k for k in expected if not k.startswith("multi_modal_projector.") and k not in vit_sd and k not in llm_sd
               and not (tied and k == "lm_head.weight")]
    if missing:
        raise ValueError(f"the ViT / LLM parts lack {len(missing)} tensor(s), e.g. {missing[:5]}")
    model.load_state_dict({**vit_sd, **llm_sd}, strict=False)
    return model


def grow_llm_depth(model: VisionLanguageModel, layers: int, seed: int = 0) -> VisionLanguageModel:
    """A copy of `model` with `layers` more LLM blocks after its last, each starting as the identity
    (attention output and MLP down projections zero, so the residual stream passes through unchanged):
    the grown model computes exactly what the original does, and training uses the new depth.

    Used for a process reward model initialised from a small policy: checking a step needs the
    policy's own computation of the step and then a comparison carried to the label slot, which is
    more layers than the policy spends on computing it."""
    if layers < 0:
        raise ValueError(f"grow_layers must be >= 0, got {layers}")
    if layers == 0:
        return model
    cfg = model.config
    grown_cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, num_hidden_layers=cfg.text.num_hidden_layers + layers))
    with torch.random.fork_rng(devices=[]):  # the new blocks' other weights: PyTorch's default init, seeded
        torch.manual_seed(seed)
        grown = VisionLanguageModel(grown_cfg)
    grown = grown.to(dtype=next(model.parameters()).dtype)
    missing, unexpected = grown.load_state_dict(model.state_dict(), strict=False)
    first_new = cfg.text.num_hidden_layers
    if unexpected or any(not k.startswith("language_model.layers.") for k in missing):
        raise RuntimeError(f"growing the LLM left keys unmatched: missing {missing[:4]}, unexpected {unexpected[:4]}")
    with torch.no_grad():
        for block in grown.language_model.layers[first_new:]:
            block.self_attn.o_proj.weight.zero_()
            if block.self_attn.o_proj.bias is not None:
                block.self_attn.o_proj.bias.zero_()
            block.mlp.down_proj.weight.zero_()
    log.info("LLM grown from %d to %d blocks (new blocks start as the identity)", first_new, grown_cfg.text.num_hidden_layers)
    return grown
