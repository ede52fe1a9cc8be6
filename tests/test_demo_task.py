"""The built-in demo task: seeded, in WLP's target format, spans taken from the source."""
import re

from doa_jax.data import demo as demo_task


def test_same_seed_same_examples_and_different_seed_different_examples():
    assert demo_task.make_split(50, seed=3) == demo_task.make_split(50, seed=3)
    assert demo_task.make_split(50, seed=3) != demo_task.make_split(50, seed=4)


def test_targets_are_typed_spans_found_in_order_in_the_source():
    for ex in demo_task.make_split(200, seed=0):
        spans = re.findall(r"(.+?) \[([A-Za-z]+)\]\s*", ex["target"])
        assert spans and "".join(f"{t} [{k}] " for t, k in spans).strip() == ex["target"]
        position = 0
        for text, kind in spans:
            assert kind in demo_task.LABELS and text in demo_task.WORDS[kind]
            position = ex["source"].index(text, position) + len(text)


def test_unlabeled_pool_has_inputs_only():
    task = demo_task.make_task(seed=0, labeled=8, unlabeled=16, test=4)
    assert [len(task[k]) for k in ("labeled", "unlabeled", "test")] == [8, 16, 4]
    assert all(ex["target"] == "" and ex["source"] for ex in task["unlabeled"])
