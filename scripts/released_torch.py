"""The paper's released PyTorch training, run as it ran: the PyTorch half of
scripts/torch_side_by_side.py and tests/test_torch_trajectory.py.

The released run_t5.py (../shared/reference/released/, from jm-kang/Distill-or-Annotate) trains with
HF `Seq2SeqTrainer` (annotation) or its subclass `DistillationTrainer` (distillation), launched by its
README's command under transformers 4.22's defaults. Here both run on the installed transformers 5:

* `DistillationTrainer` is the released class itself: its source is read from the shared copy and
  executed unchanged (`released_distillation_trainer`). The rest of run_t5.py is `main()`, which
  only reads files, tokenizes and builds the trainer (its module imports nltk, datasets and
  evaluate, which this environment does not have), so the trainer is built here as `main()` builds
  it: the README's training arguments, `DataCollatorForSeq2Seq(tokenizer, model=model,
  label_pad_token_id=-100)`, the teacher in eval mode, `max_target_length` = the validation target
  length (8 by default: the README passes `--do_eval`).
* Where transformers 5 changed what 4.22 did, `Trainer422` pins 4.22's behaviour:
  - the optimizer: 4.22's default `adamw_hf` (`transformers.AdamW`, gone in 5; 5's default is torch's
    AdamW) adds eps to sqrt(v) before bias correction. `AdamW422` is torch's AdamW with eps /
    sqrt(1 - beta2^t) at step t, the same update (weight decay 0, the released setting);
  - `tokenizer=` (5 renamed it `processing_class`), and `compute_loss(model, inputs)` without 5's
    `num_items_in_batch` (which the released override does not take);
  - the loss is a per-batch mean divided by gradient accumulation (`model_accepts_loss_kwargs=False`:
    5 lets models that take loss kwargs normalise over the accumulated batch instead);
  - the batch order: one given permutation per epoch (4.22's RandomSampler draw, fixed here so both
    frameworks see the same batches); DataLoader batches it as 4.22 did (last batch short).
* v1.1's lm_head stays untied from the embeddings (4.22 honoured `tie_word_embeddings=False`; 5's
  config says tied but `from_pretrained` keeps two different stored matrices apart: checked).

4.22 defaults that 5 kept are used as they are: linear decay to 0 over the run with no warm-up,
weight decay 0, betas (0.9, 0.999), eps 1e-8, gradient clipping at global norm 1.0, cross-entropy
averaged over the labels that are not -100.
"""
from __future__ import annotations

import ast
import math
import pathlib
from typing import Any, Optional, Sequence

import numpy as np
import torch
import transformers

RELEASED = pathlib.Path(__file__).resolve().parents[1] / ".." / "shared" / "reference" / "released" / "run_t5.py"
PAD, EOS, UNK = 0, 1, 2


def word_tokenizer(vocab_size: int) -> transformers.PreTrainedTokenizerFast:
    """A tokenizer whose ids are the model's (0 pad, 1 EOS, 2 unk, then words `w3` ...): what the
    collator pads with and what the released cache decodes its keys with."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": PAD, "</s>": EOS, "<unk>": UNK, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                                unk_token="<unk>")


def released_distillation_trainer(base: type, path: pathlib.Path = RELEASED) -> type:
    """The released `DistillationTrainer`, its source from `path` executed unchanged over `base`."""
    if not path.exists():
        raise FileNotFoundError(f"the released run_t5.py is not at {path} (../shared is absent)")
    tree = ast.parse(path.read_text(), str(path))
    found = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "DistillationTrainer"]
    if len(found) != 1:
        raise ValueError(f"{path}: expected one class DistillationTrainer, found {len(found)}")
    namespace = {"Seq2SeqTrainer": base, "torch": torch, "nn": torch.nn}
    exec(compile(ast.Module(body=found, type_ignores=[]), str(path), "exec"), namespace)   # noqa: S102
    return namespace["DistillationTrainer"]


class AdamW422(torch.optim.AdamW):
    """4.22's `adamw_hf` update: p -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps).

    torch's AdamW divides by sqrt(v) / sqrt(1 - b2^t) + eps instead; with eps / sqrt(1 - b2^t) in
    its place the two are the same update. (Weight decay is applied before the step here and after
    it in `adamw_hf`: equal only at weight decay 0, which the released runs use.)"""

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        for group in self.param_groups:
            if group["weight_decay"]:
                raise ValueError("AdamW422 matches adamw_hf at weight decay 0 only")
            group["eps_hf"] = group["eps"]

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            steps = {int(self.state[p]["step"]) if p in self.state else 0 for p in group["params"]}
            if len(steps) > 1:
                raise ValueError(f"parameters of one group at different steps {sorted(steps)}")
            t = (steps.pop() if steps else 0) + 1
            group["eps"] = group["eps_hf"] / math.sqrt(1.0 - group["betas"][1] ** t)
        return super().step(closure)


class EpochOrders(torch.utils.data.Sampler):
    """Yields `orders[e]` on the e-th pass (4.22's RandomSampler, with its draws given)."""

    def __init__(self, orders: Sequence[Sequence[int]]):
        self.orders, self.epoch = [list(map(int, o)) for o in orders], 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if self.epoch >= len(self.orders):
            raise ValueError(f"no batch order given for epoch {self.epoch}")
        order = self.orders[self.epoch]
        self.epoch += 1
        return iter(order)

    def __len__(self) -> int:
        return len(self.orders[0])


class Trainer422(transformers.Seq2SeqTrainer):
    """`Seq2SeqTrainer` with transformers 4.22's behaviour where 5 changed it (module doc); records
    each step's loss and the learning rate its update uses in `trajectory`."""

    def __init__(self, *args, tokenizer=None, epoch_orders: Sequence[Sequence[int]] = (), **kwargs):
        super().__init__(*args, processing_class=tokenizer, **kwargs)
        self.model_accepts_loss_kwargs = False
        self.epoch_orders, self.trajectory = epoch_orders, []

    @staticmethod
    def get_optimizer_cls_and_kwargs(args, model=None):
        _, kwargs = transformers.Seq2SeqTrainer.get_optimizer_cls_and_kwargs(args, model)
        return AdamW422, {k: v for k, v in kwargs.items() if k in ("lr", "betas", "eps")}

    def _get_train_sampler(self, train_dataset=None):
        return EpochOrders(self.epoch_orders)

    def record(self, out):
        loss = out[0] if isinstance(out, tuple) else out
        self.trajectory.append((float(loss.detach()), float(self.optimizer.param_groups[0]["lr"])))
        return out

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return self.record(super().compute_loss(model, inputs, return_outputs))


def released_distillation_class(path: pathlib.Path = RELEASED) -> type:
    """The released `DistillationTrainer` over `Trainer422`, called as 4.22 called `compute_loss`."""
    released = released_distillation_trainer(Trainer422, path)

    class Distillation422(released):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return self.record(released.compute_loss(self, model, inputs, return_outputs))

    return Distillation422


def load_t5(directory: pathlib.Path) -> transformers.T5ForConditionalGeneration:
    """An HF T5 from `directory`, float32; v1.1's lm_head checked apart from the embeddings."""
    model = transformers.T5ForConditionalGeneration.from_pretrained(directory, dtype=torch.float32)
    if not model.config.scale_decoder_outputs and model.lm_head.weight is model.shared.weight:
        raise ValueError(f"{directory}: transformers tied v1.1's lm_head to the embeddings")
    return model


def run(student_dir: pathlib.Path, examples: list[dict], orders: Sequence[Sequence[int]], *, batch_size: int,
        epochs: float, learning_rate: float, seed: int, output_dir: pathlib.Path,
        teacher_dir: Optional[pathlib.Path] = None, max_target_length: int = 8) -> dict[str, Any]:
    """Trains as the released README's command does (`--per_device_train_batch_size`,
    `--gradient_accumulation_steps 1`, `--num_train_epochs`, `--learning_rate`; no checkpoint or
    evaluation falls within a short run): `DistillationTrainer` when `teacher_dir` is given, else
    `Seq2SeqTrainer`. `examples`: `input_ids`, `attention_mask`, `labels` lists (the released
    preprocessing's output). Returns per-step `losses` and `learning_rates`, the final `params`
    (state dict, numpy) and, distilling, the teacher's `generated` decoder inputs per input text."""
    model = load_t5(student_dir)
    tokenizer = word_tokenizer(model.config.vocab_size)
    args = transformers.Seq2SeqTrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=batch_size, gradient_accumulation_steps=1,
        num_train_epochs=epochs, learning_rate=learning_rate, seed=seed, predict_with_generate=True,
        save_strategy="no", eval_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
        logging_strategy="no", dataloader_num_workers=0)
    collator = transformers.DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100,
                                                   pad_to_multiple_of=None)
    common = dict(model=model, args=args, train_dataset=examples, tokenizer=tokenizer, data_collator=collator,
                  epoch_orders=orders)
    if teacher_dir is None:
        trainer = Trainer422(**common)
    else:
        trainer = released_distillation_class()(teacher_model=load_t5(teacher_dir),
                                                max_target_length=max_target_length, **common)
    trainer.remove_callback(transformers.trainer_callback.PrinterCallback)   # stdout is the caller's
    trainer.train()
    losses, lrs = zip(*trainer.trajectory) if trainer.trajectory else ((), ())
    out = {"losses": np.array(losses), "learning_rates": np.array(lrs),
           "params": {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}}
    if teacher_dir is not None:
        out["generated"] = {k: v.numpy().copy() for k, v in trainer.cache_decoder_input_ids.items()}
    return out
