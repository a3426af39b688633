"""What a training run leaves behind: DIR/final (the model the run trained, LoRA merged, in the -hf layout,
with DIR/final_adapter in PEFT's format where there is an adapter) and DIR/best (the model of the step
with the best validation loss or evaluation score so far, `--best_metric`)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch

from nativevl.io.adapter import FULL_MODULES, adapter_contents, write_adapter
from nativevl.io.hf import read_config
from nativevl.model.vlm import VisionLanguageModel
from nativevl.train import parallel
from nativevl.train.lora import LoRALinear, merge_lora
from nativevl.train.parallel import barrier, broadcast_object
from nativevl.train.qlora import NF4Linear
from nativevl.train.stages import MODULES, StagePolicy

log = logging.getLogger(__name__)


def export_final(model: VisionLanguageModel, tokenizer, path: Path, main: bool, policy: StagePolicy | None = None) -> None:
    """LoRA merged into the base weights, then the -hf layout with tokenizer and processor files.
    A LoRA run on a saved base (--init_from) also writes its adapter in PEFT's format beside it
    (`final_adapter`: the LoRA layers, and the ViT / MLP when trained in full as modules_to_save),
    after final/, so that nothing about the adapter can cost the merged model. QLoRA: final/ is the
    adapter merged into the decoded 4-bit base (on the host), and the adapter carries the note that
    has nativevl's loader decode the base the same way (io/adapter.py QLORA_FILE).

    A sharded model is gathered whole on rank 0 and copied into a plain one first."""
    full = parallel.full_state_dict(model) if parallel.is_sharded(model) else None  # collective
    loras = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    adapter = None
    if main and loras and policy is not None:
        base = getattr(model, "source_path", None)
        if base is None:
            log.info("no final_adapter: the LoRA run's base is not a saved checkpoint (--init_from); final/ has it merged")
        elif policy.get("llm").mode == "full":
            log.info("no final_adapter: the LLM was trained in full (an adapter would hold all of it); final/ has the model")
        else:
            spec = {name: (m.lora_A.shape[0], m.scale * m.lora_A.shape[0],
                           m.dropout.p if isinstance(m.dropout, torch.nn.Dropout) else 0.0) for name, m in loras.items()}
            whole = [top for m in ("vit", "mlp") if policy.get(m).mode == "full" for top in FULL_MODULES[m]]
            adapter = adapter_contents(full if full is not None else model.state_dict(), spec, whole, str(base))
            if read_config(base)[1] != "hf":
                log.info("final_adapter names transformers' -hf modules; for PEFT, use it on `nativevl convert %s "
                         "BASE_HF --to hf` (nativevl's --adapter takes it on either layout)", base)
    if full is not None and main:
        model = plain_copy(model, full)
    if main:
        if any(isinstance(m, NF4Linear) for m in model.modules()) or any(p.dtype != torch.float32
                                                                          for p in model.parameters()):
            # each 4-bit layer merges into a full-precision one, each bf16 frozen layer widens to float32 for
            # the merge and the save: on the host, not on the GPU the run was sized for
            model.cpu()
        merge_lora(model)
        model.eval().save_pretrained(path, layout="hf", tokenizer=tokenizer, dtype=torch.float32)
        if adapter is not None:
            try:
                qlora = {m: {"nf4_block": policy.get(m).nf4_block, "double_quant": policy.get(m).double_quant}
                         for m in MODULES if policy.get(m).mode == "qlora"}
                write_adapter(path.with_name(path.name + "_adapter"), *adapter, qlora=qlora)
            except OSError as e:
                log.error("final_adapter was not written (%s); final/ holds the merged model", e)
    barrier()


def merged_lora_state(model, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict of LoRA-wrapped layers (name.base.weight, name.lora_A, name.lora_B) as plain ones."""
    out = dict(state)
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            # QLoRA's NF4 base keeps its weight in buffers the state dict leaves out: the replicated copy here
            base = module.base.dequantized().cpu() if isinstance(module.base, NF4Linear) else out.pop(f"{name}.base.weight")
            a, b = out.pop(f"{name}.lora_A"), out.pop(f"{name}.lora_B")
            dtype = torch.promote_types(base.dtype, a.dtype)  # a bf16 frozen base: merged in the adapter's fp32
            out[f"{name}.weight"] = base.to(dtype) + (b.float() @ a.float()).to(dtype) * module.scale
            if f"{name}.base.bias" in out:
                out[f"{name}.bias"] = out.pop(f"{name}.base.bias")
    return out


def plain_copy(model: VisionLanguageModel, state: dict[str, torch.Tensor]) -> VisionLanguageModel:
    """A plain model (no LoRA, not sharded) made of `state`'s tensors (a state dict of `model`, LoRA merged
    here), built on the meta device: no initialisation (which would take minutes for a large model on the
    host, and draw from the training RNG) and no second copy. It keeps the source folder `model` was loaded
    from, whose extra files a save copies."""
    with torch.device("meta"):
        plain = VisionLanguageModel(model.config)
    plain.load_state_dict(merged_lora_state(model, state), assign=True)
    if getattr(model, "source_path", None) is not None:
        plain.source_path = model.source_path
    return plain


def export_snapshot(model: VisionLanguageModel, tokenizer, path: Path, main: bool,
                    extra_files: dict[str, str] | None = None) -> None:
    """The model as it is now, with LoRA merged (into QLoRA's decoded 4-bit base), written to `path` in the
    -hf layout by rank 0 (with `extra_files` inside), leaving the training run as it is. A sharded model is
    gathered whole on rank 0 (collective); either way one float32 copy is made on the host, and the model
    written is built around it (no second copy, no initialisation drawing from the training RNG)."""
    if parallel.is_sharded(model):
        state = parallel.full_state_dict(model)
    else:
        state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()} if main else {}
    try:
        if main:
            plain_copy(model, state).eval().save_pretrained(path, layout="hf", tokenizer=tokenizer,
                                                            dtype=torch.float32, extra_files=extra_files)
    finally:
        barrier()


BEST_FILE = "nativevl_best.json"


class BestModel:
    """`--best_metric`: DIR/best holds the model of the step with the best value so far of a validation or
    evaluation metric (val_loss: the lowest; eval_<task> or eval_mean, the tasks' mean: the highest; a tie
    keeps the earlier step; NaN never wins), with DIR/best/nativevl_best.json: the metric, value, step and
    what it was measured on (`basis`: the held-out sets, or the tasks, n, seed and system message). A
    resumed run reads it back and goes on from its value (also when it came from a step after the resumed
    checkpoint: that model was measured, and is still the best seen), unless it was measured on something
    else or for another metric, or the run starts from step 0."""

    @staticmethod
    def check(metric: str, measured: set[str]) -> None:
        if metric and metric not in measured:
            raise ValueError(f"best_metric {metric!r} is not measured by this run, which measures "
                             f"{sorted(measured) or 'nothing'} (val_loss needs --val_meta; eval_<task> and "
                             "eval_mean need --eval_tasks)")

    def __init__(self, metric: str, basis: dict, out_dir: Path, tokenizer, main: bool, start_step: int) -> None:
        self.metric, self.basis, self.tokenizer, self.main = metric, basis, tokenizer, main
        self.path = Path(out_dir) / "best"
        self.lowest = metric.startswith("val_")
        self.value: float | None = None
        self.step: int | None = None
        found = broadcast_object(self._read(start_step) if main else None)
        if found is not None:
            self.value, self.step = found

    def _read(self, start_step: int) -> tuple[float, int] | None:
        """The best so far from best/'s file, if it counts for this run (a reason is logged if not)."""
        file = self.path / BEST_FILE
        if not file.is_file():
            return None
        try:
            found = json.loads(file.read_text())
            value, step = float(found["value"]), int(found["step"])
            metric, basis = found["metric"], found.get("basis")
        except (OSError, ValueError, TypeError, KeyError) as e:
            log.warning("%s is unreadable (%s): the next %s measured replaces best/", file, e, self.metric)
            return None
        reason = (f"it holds the best {metric}, this run keeps the best {self.metric}" if metric != self.metric
                  else f"its {metric} was measured on {basis}, this run's on {self.basis}" if basis != self.basis
                  else "this run starts from step 0 (without a checkpoint of the run that made it)" if start_step == 0
                  else None)
        if reason is not None:
            log.warning("best/ will be replaced by the next %s measured: %s", self.metric, reason)
            return None
        if step > start_step:  # measured on the model of a step trained again: still the best model measured
            log.info("best/ holds step %d (%s %.4f), after step %d where this run goes on: kept as the best so far",
                     step, metric, value, start_step)
        return value, step

    def value_of(self, record: dict) -> float | None:
        if self.metric == "eval_mean":
            scores = [v for k, v in record.items() if k.startswith("eval_")]
            return sum(scores) / len(scores) if scores else None
        return record.get(self.metric)

    def better(self, value: float | None) -> bool:
        if value is None or not math.isfinite(value):
            return False
        return self.value is None or (value < self.value if self.lowest else value > self.value)

    def offer(self, record: dict, model, step: int) -> bool:
        """Export `model` as the best when `record` (a validation or evaluation line of `step`) beats the best
        so far; collective when the model is sharded (every rank sees the same reduced values). A copy that
        cannot be written (disk full, say) is logged and the run goes on with the previous best."""
        value = self.value_of(record)
        if not self.better(value):
            return False
        note = json.dumps({"metric": self.metric, "value": value, "step": step, "basis": self.basis}, indent=2,
                          default=str)
        written = True
        try:
            export_snapshot(model, self.tokenizer, self.path, self.main, extra_files={BEST_FILE: note + "\n"})
        except OSError as e:  # rank 0's write; the gather and the barrier were reached by every rank
            log.error("step %d: best/ was not written (%s); it keeps step %s", step, e, self.step)
            written = False
        if not broadcast_object(written):
            return False
        self.value, self.step = value, step
        if self.main:
            log.info("step %d: best %s so far (%.4f): %s", step, self.metric, value, self.path)
        return True

    def summary(self) -> dict:
        return {"metric": self.metric, "value": self.value, "step": self.step, "basis": self.basis}
