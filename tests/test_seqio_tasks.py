"""SeqIO tasks from the cards: every task loads from ../shared, tokenizes, and batches through
EncDecFeatureConverter; pools, shards, packing and the unlabeled-inputs variant behave."""
import numpy as np
import pytest

from data_helpers import task_vocab
from doa_jax.data import cards, pipeline, pools, seqio_tasks

TASKS = cards.card_names()


@pytest.fixture(scope="module")
def vocab():
    from conftest import DATA, require_shared

    return task_vocab(str(require_shared(DATA)))


def _data_dir(doa_data, task):
    return doa_data / cards.load_card(task).subdir


@pytest.mark.parametrize("task", TASKS)
def test_every_task_batches_through_the_feature_converter(doa_data, vocab, task):
    card = cards.load_card(task)
    p = pools.make_pools(card, data_dir=_data_dir(doa_data, task))
    batch = next(pipeline.batches(task, "validation", batch_size=4, vocab=vocab, data_dir=_data_dir(doa_data, task)))
    L_in, L_tgt = card.feature_lengths["inputs"], card.feature_lengths["targets"]
    assert {k: v.shape for k, v in batch.items()} == {
        "encoder_input_tokens": (4, L_in), "decoder_input_tokens": (4, L_tgt),
        "decoder_target_tokens": (4, L_tgt), "decoder_loss_weights": (4, L_tgt)}
    for row, ex in enumerate(p.validation[:4]):
        enc, tgt = batch["encoder_input_tokens"][row], batch["decoder_target_tokens"][row]
        want_in = vocab.encode(card.input_prefix + ex["source"])[: L_in - 1] + [1]
        want_tgt = vocab.encode(ex["target"])[: L_tgt - 1] + [1]
        assert enc[: len(want_in)].tolist() == want_in and not enc[len(want_in):].any()
        assert tgt[: len(want_tgt)].tolist() == want_tgt and not tgt[len(want_tgt):].any()
        # decoder inputs: targets shifted right behind the start id 0; loss on real target tokens
        assert batch["decoder_input_tokens"][row].tolist() == [0] + tgt[:-1].tolist()
        assert batch["decoder_loss_weights"][row].tolist() == (tgt > 0).astype(int).tolist()


def test_vocabulary_tokenizes_like_seqio(vocab, doa_data):
    sv = seqio_tasks.seqio_vocabulary(vocab)
    assert sv.vocab_size == vocab.vocab_size
    texts = [ex["source"] for ex in pools.make_pools("wlp", data_dir=doa_data / "wlp").test[:50]]
    for t in texts:
        assert sv.encode(t) == vocab.encode(t)
    ids = vocab.encode(texts[0]) + [1, 5, 6]
    assert sv.decode(ids) == vocab.decode(ids)


def test_registered_tasks_have_their_splits(vocab, doa_data):
    import seqio

    names = seqio_tasks.register("fever", vocab, data_dir=doa_data / "fever")
    assert names == ["doa_fever", "doa_fever_inputs"]
    labeled, inputs = seqio.get_mixture_or_task("doa_fever"), seqio.get_mixture_or_task("doa_fever_inputs")
    assert set(labeled.splits) == {"train", "validation", "test"}
    assert set(inputs.splits) == {"train", "unlabeled", "validation", "test"}
    ex = next(labeled.get_dataset({"inputs": 64, "targets": 8}, split="test", shuffle=False).as_numpy_iterator())
    first = pools.make_pools("fever", data_dir=doa_data / "fever").test[0]
    assert ex["inputs_pretokenized"].decode() == "fever: " + first["source"]
    assert ex["targets_pretokenized"].decode() == first["target"]
    # registering again replaces the earlier registration
    assert seqio_tasks.register("fever", vocab, data_dir=doa_data / "fever") == names


def test_the_wlp_task_at_1k_start_labels_holds_the_cells_1000_labels(vocab, doa_data):
    import seqio

    names = seqio_tasks.register("wlp", vocab, data_dir=doa_data / "wlp", start_labels=[1000])
    assert names == ["doa_wlp", "doa_wlp_inputs", "doa_wlp_L1000"]
    task = seqio.get_mixture_or_task("doa_wlp_L1000")
    rows = list(task.get_dataset({"inputs": 96, "targets": 128}, split="train", shuffle=False).as_numpy_iterator())
    cell_labels = pools.make_pools("wlp", data_dir=doa_data / "wlp").annotate(1000)   # what `doa run` trains on
    assert len(rows) == 1000 < len(pools.make_pools("wlp", data_dir=doa_data / "wlp").train)
    assert [r["targets_pretokenized"].decode() for r in rows] == [ex["target"] for ex in cell_labels]
    full = seqio.get_mixture_or_task("doa_wlp")
    test = lambda t: next(t.get_dataset({"inputs": 96, "targets": 128}, split="test", shuffle=False)  # noqa: E731
                          .as_numpy_iterator())["inputs_pretokenized"]
    assert test(task) == test(full)     # validation and test are the task's own


def test_doa_start_labels_env_registers_the_start_label_tasks_on_import(vocab, monkeypatch):
    import importlib

    import seqio

    monkeypatch.setenv("DOA_VOCAB", str(vocab.path))
    monkeypatch.setenv("DOA_START_LABELS", "1000,10_000")
    importlib.reload(seqio_tasks)
    assert {"doa_wlp_L1000", "doa_fever_L10000", "doa_nq_L1000"} <= set(seqio.TaskRegistry.names())
    monkeypatch.setenv("DOA_START_LABELS", "1000,k")
    with pytest.raises(ValueError, match=r"DOA_START_LABELS must be comma-separated counts >= 1"):
        seqio_tasks.start_labels_from_env()


def test_unlabeled_split_has_inputs_and_empty_targets(vocab, doa_data):
    p = pools.make_pools("nq", data_dir=doa_data / "nq")
    batch = next(pipeline.batches("nq", "unlabeled", batch_size=8, vocab=vocab, data_dir=doa_data / "nq"))
    assert (batch["decoder_target_tokens"][:, 0] == 1).all() and not batch["decoder_target_tokens"][:, 1:].any()
    assert vocab.decode(batch["encoder_input_tokens"][0]) == "nq: " + p.unlabeled[0]["source"]


def test_explicit_pool_examples_replace_the_split(vocab, doa_data):
    p = pools.make_pools("nq", data_dir=doa_data / "nq")
    bought = p.annotate(70)
    out = list(pipeline.batches("nq", "train", batch_size=32, vocab=vocab, examples=bought))
    assert [len(b["encoder_input_tokens"]) for b in out] == [32, 32, 6]
    padded = list(pipeline.batches("nq", "train", batch_size=32, vocab=vocab, examples=bought, pad_remainder=True))
    assert padded[-1]["encoder_input_tokens"].shape[0] == 32
    assert padded[-1]["encoder_input_tokens"].any(-1).sum() == 6  # all-zero rows are padding
    assert not padded[-1]["decoder_loss_weights"][6:].any()
    decoded = [vocab.decode(row) for b in out for row in b["decoder_target_tokens"]]
    assert decoded == [vocab.decode(vocab.encode(ex["target"])) for ex in bought]


def test_shards_are_disjoint_and_cover_the_split(vocab, doa_data):
    kw = dict(batch_size=16, vocab=vocab, data_dir=doa_data / "nq")
    rows = lambda it: [tuple(r) for b in it for r in b["encoder_input_tokens"]]  # noqa: E731
    whole = rows(pipeline.batches("nq", "validation", **kw))
    shards = [rows(pipeline.batches("nq", "validation", shard_id=i, num_shards=2, **kw)) for i in range(2)]
    assert sorted(shards[0] + shards[1]) == sorted(whole)
    assert abs(len(shards[0]) - len(shards[1])) <= 1


def test_shuffling_is_seeded(vocab, doa_data):
    kw = dict(batch_size=8, vocab=vocab, data_dir=doa_data / "nq", shuffle=True)
    first = lambda seed: next(pipeline.batches("nq", "train", seed=seed, **kw))["encoder_input_tokens"]  # noqa: E731
    np.testing.assert_array_equal(first(1), first(1))
    assert not np.array_equal(first(1), first(2))


def test_packing_adds_segment_ids_and_positions(vocab, doa_data):
    batch = next(pipeline.batches("fever", "train", batch_size=2, vocab=vocab, pack=True, data_dir=doa_data / "fever"))
    for key in ("encoder_segment_ids", "encoder_positions", "decoder_segment_ids", "decoder_positions"):
        assert key in batch
    assert batch["encoder_segment_ids"][0].max() > 1  # several short claims share a row


def test_task_metric_fn_scores_like_the_metrics_table(vocab):
    examples = {"test": [{"source": "a claim", "target": "SUPPORTS"}, {"source": "b claim", "target": "REFUTES"}]}
    task = seqio_tasks.make_task("fever", vocab, examples)
    targets = [seqio_tasks._postprocess(t, {"source": b"x"}, is_target=True) for t in ("SUPPORTS", "REFUTES")]
    got = task.metric_fns[0](targets, ["supports", "NOT SURE"])
    assert got["accuracy"] == pytest.approx(50.0) and got["invalid_predictions"] == 1
    assert got["accuracy"] == cards.load_card("fever").score(["supports", "NOT SURE"], ["SUPPORTS", "REFUTES"])["accuracy"]


def test_seqio_task_names_are_accepted(vocab, doa_data):
    kw = dict(batch_size=4, vocab=vocab, data_dir=doa_data / "nq")
    labeled = next(pipeline.batches("doa_nq", "test", **kw))
    by_card = next(pipeline.batches("nq", "test", **kw))
    np.testing.assert_array_equal(labeled["encoder_input_tokens"], by_card["encoder_input_tokens"])
    inputs = next(pipeline.batches("doa_nq_inputs", "test", **kw))
    assert (inputs["decoder_target_tokens"][:, 0] == 1).all() and not inputs["decoder_target_tokens"][:, 1:].any()


def test_doa_vocab_env_registers_all_tasks_on_import(vocab, monkeypatch):
    import importlib

    import seqio

    for name in TASKS:
        for n in (f"doa_{name}", f"doa_{name}_inputs"):
            if n in seqio.TaskRegistry.names():
                seqio.TaskRegistry.remove(n)
    monkeypatch.setenv("DOA_VOCAB", str(vocab.path))
    importlib.reload(seqio_tasks)
    assert {f"doa_{n}" for n in TASKS} | {f"doa_{n}_inputs" for n in TASKS} <= set(seqio.TaskRegistry.names())


def test_unknown_split_and_missing_vocab_are_clear_errors(vocab):
    with pytest.raises(ValueError, match="unknown split 'dev' of task nq; splits are train, unlabeled"):
        next(pipeline.batches("nq", "dev", vocab=vocab))
    with pytest.raises(ValueError, match="needs a vocabulary"):
        next(pipeline.batches("nq", "train", vocab=None))


def test_tfds_builder_gives_the_pools_as_splits(doa_data, tmp_path):
    import tensorflow_datasets as tfds

    from doa_jax.data import tfds_builder  # noqa: F401  (registers doa_tasks)

    builder = tfds.builder("doa_tasks/nq", data_dir=str(tmp_path))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(doa_data)))
    p = pools.make_pools("nq", data_dir=doa_data / "nq")
    assert {k: v.num_examples for k, v in builder.info.splits.items()} == p.sizes()
    ds = builder.as_dataset(split="train").as_numpy_iterator()
    train = [(ex["source"].decode(), ex["target"].decode()) for ex in ds]
    assert train == [(ex["source"], ex["target"]) for ex in p.train]  # annotation order kept
    assert {k for k in tfds.builder_cls("doa_tasks").builder_configs} == set(TASKS)
