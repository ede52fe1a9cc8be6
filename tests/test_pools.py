"""Pools: deterministic for a seed, disjoint, covering the file, nested across annotation budgets."""
import json

import pytest

from doa_jax.data import cards, jsonl, pools


def _card(tmp_path, fractions="{ test = 0.2, validation = 0.1, unlabeled = 0.35, train = 0.35 }", n=500):
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    rows = [{"source": f"sentence {i}", "target": f"label {i % 3}"} for i in range(n)]
    jsonl.write_examples(data / "all.jsonl", rows)
    path = tmp_path / "toy.toml"
    path.write_text(f"""
name = "toy"
input_prefix = "toy: "
metric = "squad"
primary_metric = "f1"
annotation_cost_usd = 0.5
[lengths]
inputs = 16
targets = 8
[data]
files = {{ all = "all.jsonl" }}
[pools]
carve_from = "all"
seed = 3
fractions = {fractions}
""")
    return cards.load_card(path), data


def test_same_seed_same_pools_other_seed_other_pools(tmp_path):
    card, data = _card(tmp_path)
    a, b = pools.make_pools(card, data_dir=data), pools.make_pools(card, data_dir=data)
    assert a.train == b.train and a.test == b.test and a.unlabeled == b.unlabeled
    c = pools.make_pools(card, data_dir=data, seed=4)
    assert c.train != a.train and c.seed == 4 and a.seed == 3


def test_pools_are_disjoint_and_cover_the_file(tmp_path):
    card, data = _card(tmp_path)
    p = pools.make_pools(card, data_dir=data)
    parts = [{ex["source"] for ex in p.split(s)} for s in cards.SPLITS]
    assert sum(map(len, parts)) == 500 == len(set().union(*parts))
    assert p.sizes() == {"train": 175, "unlabeled": 175, "validation": 50, "test": 100}


def test_unlabeled_pool_has_no_targets(tmp_path):
    card, data = _card(tmp_path)
    assert {ex["target"] for ex in pools.make_pools(card, data_dir=data).unlabeled} == {""}


def test_annotation_is_nested_across_budgets(tmp_path):
    card, data = _card(tmp_path)
    p = pools.make_pools(card, data_dir=data)
    small, large = p.annotate(20), p.annotate(120)
    assert large[:20] == small and len(large) == 120
    assert p.annotate(175) == p.train


def test_annotating_more_than_the_pool_is_an_error(tmp_path):
    card, data = _card(tmp_path)
    with pytest.raises(ValueError, match="cannot annotate 176 examples; the labeled pool has 175"):
        pools.make_pools(card, data_dir=data).annotate(176)


def test_permutation_is_a_seeded_permutation():
    perm = pools.permutation(1000, seed=7)
    assert sorted(perm) == list(range(1000)) and perm != list(range(1000))
    assert perm == pools.permutation(1000, seed=7) != pools.permutation(1000, seed=8)


def test_separate_files_are_used_as_their_splits(tmp_path):
    """A user's task with all four files: nothing is carved; train is permuted for annotation."""
    data = tmp_path / "mine"
    data.mkdir()
    for split, n in (("train", 30), ("unlabeled", 20), ("validation", 5), ("test", 7)):
        rows = [{"source": f"{split} {i}", "target": "YES"} for i in range(n)]
        if split == "unlabeled":
            (data / f"{split}.jsonl").write_text("".join(json.dumps({"source": r["source"]}) + "\n" for r in rows))
        else:
            jsonl.write_examples(data / f"{split}.jsonl", rows)
    path = tmp_path / "mine.toml"
    path.write_text("""
name = "mine"
input_prefix = "mine: "
metric = "accuracy"
primary_metric = "accuracy"
annotation_cost_usd = 0.1
labels = ["YES", "NO"]
[lengths]
inputs = 32
targets = 4
[data]
files = { train = "train.jsonl", unlabeled = "unlabeled.jsonl", validation = "validation.jsonl", test = "test.jsonl" }
""")
    p = pools.make_pools(cards.load_card(path), data_dir=data)
    assert p.sizes() == {"train": 30, "unlabeled": 20, "validation": 5, "test": 7}
    assert sorted(ex["source"] for ex in p.train) == sorted(f"train {i}" for i in range(30))
    assert [ex["source"] for ex in p.test] == [f"test {i}" for i in range(7)]


def test_real_wlp_pools_from_shared_data(doa_data):
    p = pools.make_pools("wlp", data_dir=doa_data / "wlp")
    train_lines = len((doa_data / "wlp" / "wlp_train_all.jsonl").read_text().splitlines())
    test_lines = len((doa_data / "wlp" / "wlp_test_all.jsonl").read_text().splitlines())
    sizes = p.sizes()
    # empty targets (sentences without entities) are skipped, as the paper's preprocessing did
    assert sizes["train"] + sizes["unlabeled"] + sizes["validation"] == train_lines - p.skipped["train"]
    assert sizes["test"] == test_lines - p.skipped["test"]
    assert p.skipped["train"] > 0 and all(ex["target"].strip() for ex in p.train)


@pytest.mark.parametrize("task", ["stanceosaurus", "fever", "multipit_id", "multipit_gen", "nq"])
def test_single_file_tasks_are_carved_disjointly(doa_data, task):
    card = cards.load_card(task)
    p = pools.make_pools(card, data_dir=doa_data / card.subdir)
    lines = len(card.file_path(card.carve_from, doa_data / card.subdir).read_text().splitlines())
    assert sum(p.sizes().values()) == lines
    assert all(n > 0 for n in p.sizes().values())
