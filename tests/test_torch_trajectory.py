"""doa-jax's PROTOCOL=paper trains as the paper's released PyTorch code trains, step for step.

scripts/torch_side_by_side.py runs both: one tiny random HF T5 saved once and loaded by both sides,
the same examples in the same batches (the cell's per-epoch permutations, given to the PyTorch
sampler), dropout off, on CPU. The PyTorch side (scripts/released_torch.py) is HF `Seq2SeqTrainer`
and the released `DistillationTrainer` (its source executed unchanged from ../shared) with the
released README's training arguments (lr 3e-5, gradient accumulation 1, batch 32) and transformers
4.22's defaults; where transformers 5 (installed) changed 4.22's behaviour it is pinned back there:
4.22's default optimizer `adamw_hf` (eps added to sqrt(v) before bias correction), `tokenizer=`,
`compute_loss(model, inputs)` without `num_items_in_batch`, the loss divided by accumulation steps,
the sampler's order, v1.1's untied lm_head. The doa-jax side is a cell's training phase under the
TrainConfig gin/protocols/paper.gin gives. What these tests found, and fixed in PROTOCOL=paper: the
AdamW eps (params 1.8e-5 apart after 10 steps) and the released code's padding of a distillation
batch from its second epoch (its generate cache; losses up to 45% apart).
"""
import json
import math
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, SHARED, load_script, require_shared
from doa_jax import optimizers

sys.path.insert(0, str(REPO / "scripts"))
import released_torch  # noqa: E402  (scripts/, beside torch_side_by_side.py)

side = load_script("torch_side_by_side")

TOL = 1e-5
RELEASED = SHARED / "reference" / "released" / "run_t5.py"


@pytest.mark.slow
def test_annotation_trajectory_equals_the_released_seq2seq_trainer(tmp_path, capsys):
    """50 steps at the README's lr 3e-5 and batch 32 (80 examples: 3 batches an epoch, the last short)."""
    plot = tmp_path / "losses.png"
    assert side.main(["--arch", "t5_1_1", "--steps", "50", "--seed", "0", "--kd-weight", "0", "--lr", "3e-5",
                      "--batch", "32", "--json", "--plot", str(plot), "--work", str(tmp_path / "work")]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    print(summary)
    assert summary["steps"] == 50
    assert summary["max_rel_loss_diff"] <= TOL
    assert summary["max_rel_lr_diff"] <= TOL
    assert summary["max_abs_param_diff"] <= TOL
    assert plot.stat().st_size > 10_000


@pytest.mark.slow
def test_distillation_trajectory_equals_the_released_distillation_trainer(tmp_path):
    """50 steps of the released DistillationTrainer (T^2 KL at T = 2 on the teacher's greedy output,
    every padded position, batchmean) against doa-jax's online paper distillation. Batch 8, so the
    random teacher's outputs pad batches to different lengths (with 32 rows every batch reaches the
    longest): the released reduction and, from the second epoch, its cache's padding both matter."""
    require_shared(RELEASED)
    theirs, ours, summary = side.side_by_side("t5_1_1", 50, 0, 1.0, 3e-5, 8, tmp_path)
    print(summary)
    assert summary["steps"] == 50
    assert summary["max_rel_loss_diff"] <= TOL
    assert summary["max_rel_lr_diff"] <= TOL
    assert summary["max_abs_param_diff"] <= TOL

    # Both teachers decoded the same tokens (HF generate inside the released class; doa-jax greedy) ...
    examples = side.make_examples(20, side.TINY["vocab_size"], 0)
    teacher = side.checkpoints.load_checkpoint(tmp_path / "teacher", config=side.model_config("t5_1_1", True))
    targets = side.teacher_arrays(*teacher, side.as_arrays(examples))["decoder_target_tokens"]
    tokenizer = released_torch.word_tokenizer(side.TINY["vocab_size"])
    for example, target in zip(examples, targets):
        generated = theirs["generated"][tokenizer.decode(example["input_ids"], skip_special_tokens=True)]
        assert generated[0] == 0 and list(generated[1:]) == list(target[:len(generated) - 1])
    # ... and the batches' padded lengths differ, from the second epoch as the released cache pads them.
    lengths = (targets > 0).sum(1)
    orders = side.epoch_orders(20, 8, 0, 2)
    own = [[int(lengths[o[i:i + 8]].max()) + 1 for i in range(0, 20, 8)] for o in orders]
    first = {row: own[0][i // 8] for i, row in enumerate(orders[0])}
    cached = [max(first[row] for row in orders[1][i:i + 8]) for i in range(0, 20, 8)]
    assert len(set(own[0])) > 1 and cached != own[1]


def adamw_hf_steps(param: np.ndarray, grads: list[np.ndarray], lr: float, b1=0.9, b2=0.999, eps=1e-8) -> np.ndarray:
    """transformers 4.22's AdamW (`adamw_hf`, weight decay 0) in float64, from its documented update:
    denom = sqrt(v) + eps, step size lr * sqrt(1 - b2^t) / (1 - b1^t)."""
    p, m, v = param.astype(np.float64), 0.0, 0.0
    for t, g in enumerate(grads, 1):
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        p = p - lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t) * m / (np.sqrt(v) + eps)
    return p


def _grads(seed=0, steps=6):
    """Gradients from 1e-9 to 1: where adamw_hf's eps and torch's/optax's differ (|g| ~ eps / sqrt(1 - b2^t))."""
    rng = np.random.default_rng(seed)
    scales = np.logspace(-9, 0, 40)
    return rng.normal(size=(40,)) * scales, [rng.normal(size=(40,)) * scales for _ in range(steps)]


def test_the_pinned_torch_optimizer_steps_as_transformers_422_adamw():
    param, grads = _grads()
    want = adamw_hf_steps(param, grads, lr=1e-2)
    tensor = torch.nn.Parameter(torch.tensor(param, dtype=torch.float64))
    opt = released_torch.AdamW422([{"params": [tensor], "weight_decay": 0.0}], lr=1e-2, betas=(0.9, 0.999), eps=1e-8)
    for g in grads:
        tensor.grad = torch.tensor(g)
        opt.step()
    np.testing.assert_allclose(tensor.detach().numpy(), want, rtol=0, atol=1e-12)
    plain = torch.nn.Parameter(torch.tensor(param, dtype=torch.float64))
    torch_opt = torch.optim.AdamW([plain], lr=1e-2, eps=1e-8, weight_decay=0.0)
    for g in grads:
        plain.grad = torch.tensor(g)
        torch_opt.step()
    assert np.abs(plain.detach().numpy() - want).max() > 1e-4   # torch's own AdamW is not adamw_hf


def test_paper_adamw_steps_as_transformers_422_adamw():
    """doa-jax's AdamW under PROTOCOL=paper (`eps_before_bias_correction`) against the same update."""
    param, grads = _grads(seed=1)
    want = adamw_hf_steps(param, grads, lr=1e-2)

    def run(**kw):
        tx, _ = optimizers.OptimizerConfig(name="adamw", learning_rate=1e-2, **kw).build(10)
        p = np.asarray(param, np.float32)
        state = tx.init(p)
        for g in grads:
            p, state, _ = optimizers.apply_gradients(tx, np.asarray(g, np.float32), state, p)
        return np.asarray(p, np.float64)

    np.testing.assert_allclose(run(eps_before_bias_correction=True), want, rtol=0, atol=1e-6)
    assert np.abs(run() - want).max() > 1e-4


def test_the_distillation_trainer_runs_from_the_shared_copy_unchanged():
    require_shared(RELEASED)
    cls = released_torch.released_distillation_trainer(released_torch.Trainer422, RELEASED)
    code = cls.compute_loss.__code__
    assert code.co_filename == str(RELEASED)
    source = RELEASED.read_text().splitlines()
    assert source[code.co_firstlineno - 1].strip() == "def compute_loss(self, model, inputs, return_outputs=False):"
    assert "KLDivLoss" in code.co_names and "temperature" in code.co_varnames


def test_side_by_side_refuses_a_kd_mix_the_released_code_does_not_have(capsys):
    with pytest.raises(SystemExit) as e:
        side.main(["--kd-weight", "0.5", "--json"])
    assert e.value.code == 2
    assert "--kd-weight must be 0 (Seq2SeqTrainer on labels) or 1" in capsys.readouterr().err
