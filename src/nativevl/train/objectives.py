"""What the one loop minimises, per stage: the language-model loss (pre-training, SFT, PRM), MPO, or the
PRM's two-way label loss.

An objective turns one packed micro-batch into a loss already divided by the global normalisers
(summed over micro-batches and ranks by the loop before the first forward), plus scalars to log.
"""

from __future__ import annotations

import copy

import torch

from nativevl.data.packing import Batch
from nativevl.data.template import IGNORE_INDEX
from nativevl.model.vlm import VisionLanguageModel
from nativevl.train.losses import MPOWeights, RewardShift, labelled_lm_loss, mpo_loss, sequence_logps
from nativevl.train.parallel import all_reduce_sum, is_distributed

OBJECTIVES = ("lm", "mpo", "prm")


class LMObjective:
    """Weighted next-token cross-entropy on the labelled positions (token / sample / square averaging)."""

    def __init__(self, loss_chunk: int) -> None:
        self.loss_chunk = loss_chunk

    def local_normalizers(self, micro: list[Batch]) -> torch.Tensor:
        for b in micro:
            if b.pairs is not None:
                # a pair's documents follow each other, every other sample one document: the pair's sample
                # is its chosen document's index less the pairs before it
                named = [b.sources[chosen - i] for i, (chosen, _) in enumerate(b.pairs.tolist())]
                raise ValueError(f"preference records ({named[:3]}{' ...' if len(named) > 3 else ''}) need "
                                 "--objective=mpo (the mpo recipe)")
        return torch.stack([b.loss_weights.sum() for b in micro]).sum()[None]  # (1,)

    def __call__(self, model: VisionLanguageModel, batch: Batch, norms: torch.Tensor,
                 update: bool = True) -> tuple[torch.Tensor, dict]:
        hidden = model(**batch.model_inputs(), compute_logits=False).hidden_states
        loss = labelled_lm_loss(hidden, model.lm_head.weight, batch.labels, batch.loss_weights, norms[0], self.loss_chunk)
        return loss, {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class PRMObjective:
    """A process reward model's loss: at each label slot a two-way cross-entropy between the '+' and '-'
    tokens (the choice that scoring reads: P('+') = softmax over the two), every other labelled token
    (the `<|im_end|>` after a label, step text under --prm_step_lm) the usual next-token cross-entropy.
    `lm` (VisualPRM's SFT) also pushes every other token of the vocabulary down at the slots; on the toy
    PRM this objective ranks samples better (docs/results/alignment.md)."""

    def __init__(self, label_ids: tuple[int, int], loss_chunk: int) -> None:
        self.good, self.bad = label_ids
        self.loss_chunk = loss_chunk

    def local_normalizers(self, micro: list[Batch]) -> torch.Tensor:
        for b in micro:
            if b.label_slots is None or b.pairs is not None:
                raise ValueError(f"the prm objective needs PRM conversations read with prm_placeholder set "
                                 f"(the prm recipe); a batch of {b.sources[:3]} has no label slots")
        weights = torch.stack([b.loss_weights.sum() for b in micro]).sum()
        slots = torch.tensor(float(sum(int(b.label_slots.sum()) for b in micro)))
        return torch.stack([weights, slots.to(weights.device)])  # (2,): weight sum, label slots

    def __call__(self, model: VisionLanguageModel, batch: Batch, norms: torch.Tensor,
                 update: bool = True) -> tuple[torch.Tensor, dict]:
        hidden = model(**batch.model_inputs(), compute_logits=False).hidden_states
        slots = batch.label_slots & (batch.labels != IGNORE_INDEX)
        at = slots.nonzero().squeeze(1)
        y = batch.labels.index_select(0, at)
        if ((y != self.good) & (y != self.bad)).any():
            raise ValueError(f"a PRM label slot holds a token other than '+' / '-' (documents: {batch.sources})")
        h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, at)
        logits = (h @ model.lm_head.weight[[self.good, self.bad]].t()).float()  # (slots, 2): '+', '-'
        target = (y == self.bad).long()
        w = batch.loss_weights.index_select(0, at).float()
        ce = torch.nn.functional.cross_entropy(logits, target, reduction="none")
        label_loss = (ce * w).sum()
        rest = batch.loss_weights.masked_fill(slots, 0.0)
        text_loss = labelled_lm_loss(hidden, model.lm_head.weight, batch.labels.masked_fill(slots, IGNORE_INDEX), rest,
                                     1.0, self.loss_chunk)
        loss = (label_loss + text_loss) / norms[0]
        slots_total = norms[1].clamp(min=1)
        # this micro-batch's share of the global means over label slots (the loop sums the shares)
        logs = {"label_loss": ce.detach().sum() / slots_total,
                "label_accuracy": (logits.argmax(-1) == target).float().sum().detach() / slots_total}
        return loss, logs

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class MPOObjective:
    """Mixed Preference Optimization: w_p * DPO + w_q * BCO + w_g * NLL(chosen) against a frozen copy
    of the initial model (pi_0). Chosen and rejected are two documents of one packed forward that
    share the image tiles; BCO's reward shift is a running mean over all ranks, kept in checkpoints."""

    def __init__(self, model: VisionLanguageModel, weights: MPOWeights, loss_chunk: int) -> None:
        self.reference = copy.deepcopy(model).eval().requires_grad_(False)
        self.weights, self.loss_chunk = weights, loss_chunk
        self.shift = RewardShift()

    def local_normalizers(self, micro: list[Batch]) -> torch.Tensor:
        for b in micro:
            if b.pairs is None:
                raise ValueError(f"the mpo objective needs preference records; a batch of {b.sources[:3]} has no pairs")
        weights = torch.stack([b.loss_weights.sum() for b in micro]).sum()
        pairs = torch.tensor(float(sum(b.pairs.shape[0] for b in micro)))
        return torch.stack([weights, pairs.to(weights.device)])  # (2,): chosen-token weight sum, pairs

    def __call__(self, model: VisionLanguageModel, batch: Batch, norms: torch.Tensor,
                 update: bool = True) -> tuple[torch.Tensor, dict]:
        inputs = batch.model_inputs()
        hidden = model(**inputs, compute_logits=False).hidden_states
        logps = sequence_logps(hidden, model.lm_head.weight, batch.labels, batch.cu_seqlens, self.loss_chunk)
        with torch.no_grad():
            ref_hidden = self.reference(**inputs, compute_logits=False).hidden_states
            ref_logps = sequence_logps(ref_hidden, self.reference.lm_head.weight, batch.labels, batch.cu_seqlens,
                                       self.loss_chunk)
        if hasattr(self.reference, "reshard"):  # FSDP2: its root, gathered for lm_head, has no backward to reshard it
            self.reference.reshard()
        ratios = logps - ref_logps  # (S,)
        chosen, rejected = ratios[batch.pairs[:, 0]], ratios[batch.pairs[:, 1]]  # (P,)
        nll = labelled_lm_loss(hidden, model.lm_head.weight, batch.labels, batch.loss_weights, norms[0], self.loss_chunk)
        if update:  # one observation per rank and micro-batch: the mean reward over this batch's 2P responses
            world = torch.distributed.get_world_size() if is_distributed() else 1
            batch_mean = all_reduce_sum(self.weights.beta * torch.cat([chosen, rejected]).detach().mean()) / world
            delta = self.shift.update(float(batch_mean), observations=world)
        else:  # validation: the shift as training left it, unchanged
            delta = self.shift.mean
        # per-micro-batch share of the global pair mean: sum over this batch's pairs / global pairs
        loss, parts = mpo_loss(chosen, rejected, nll, delta, self.weights, pair_normalizer=norms[1])
        # every logged value is this micro-batch's share, so the loop's sum over micro-batches and ranks
        # is the global mean
        margin = (self.weights.beta * (chosen - rejected)).detach()
        logs = {k: v.detach() for k, v in parts.items()}
        logs["reward_margin"] = margin.sum() / norms[1]
        logs["reward_accuracy"] = (margin > 0).float().sum() / norms[1]
        logs["reward_shift"] = delta * batch.pairs.shape[0] / norms[1]
        return loss, logs

    def state_dict(self) -> dict:
        return {"reward_shift": self.shift.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "reward_shift" not in state:
            raise ValueError("the checkpoint holds no MPO reward shift: another objective wrote it; resume it with "
                             "that objective, or start a new --out (--init_from its final/ for its weights)")
        self.shift.load_state_dict(state["reward_shift"])


def make_objective(name: str, model: VisionLanguageModel, loss_chunk: int, mpo: MPOWeights | None = None,
                   label_ids: tuple[int, int] | None = None):
    """Build before any LoRA adapter or optimiser exists: the MPO reference is a copy of the model as given.
    `prm` needs the tokenizer's '+' / '-' token ids (infer.prm.label_token_ids)."""
    if name == "lm":
        return LMObjective(loss_chunk)
    if name == "prm":
        if label_ids is None:
            raise ValueError("the prm objective needs the '+' / '-' label token ids")
        return PRMObjective(label_ids, loss_chunk)
    if name == "mpo":
        return MPOObjective(model, mpo or MPOWeights(), loss_chunk)
    raise ValueError(f"objective must be one of {OBJECTIVES}, got {name!r}")
