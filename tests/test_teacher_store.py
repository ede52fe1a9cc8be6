"""The teacher store: chunked, resumable, keyed, and reused without teacher compute."""
import json
import time

import jax
import numpy as np
import pytest

from doa_jax.distill import store as ts

K = 3


class CountingTeacher:
    """A deterministic stand-in teacher (outputs are a function of the input row); counts rows."""

    def __init__(self, fail_after_rows=None, seconds_per_call=0.0):
        self.rows = 0
        self.fail_after_rows = fail_after_rows
        self.seconds_per_call = seconds_per_call

    def __call__(self, enc):
        if self.fail_after_rows is not None and self.rows >= self.fail_after_rows:
            raise KeyboardInterrupt("killed")
        time.sleep(self.seconds_per_call)
        self.rows += len(enc)
        n = len(enc)
        tokens = np.stack([(enc[:, 0] + t) % 50 + 2 for t in range(4)], 1).astype(np.int32)
        tokens[:, -1] = 1
        values = -np.sin(enc[:, 0, None, None] * 0.1 + np.arange(4)[None, :, None]) - np.arange(K)
        return {"tokens": tokens, "lengths": np.full(n, 4, np.int32), "sequence_logprob": -enc[:, 0] / 10.0,
                "topk_values": values.astype(np.float32), "topk_ids": np.tile(np.arange(K), (n, 4, 1))}


def inputs(n=10):
    sources = [f"sentence {i}" for i in range(n)]
    return sources, np.array([[i + 5, 1] for i in range(n)], np.int32)


def detok(tokens):
    return " ".join(str(t) for t in tokens if t > 1)


def test_killed_build_resumes_without_recomputing_finished_chunks(tmp_path):
    sources, enc = inputs(10)
    store = ts.TeacherStore(tmp_path, "k")
    with pytest.raises(KeyboardInterrupt):
        store.build(sources, enc, CountingTeacher(fail_after_rows=6), detok, chunk_size=3)
    assert not store.is_complete()
    rerun = CountingTeacher()
    stats = store.build(sources, enc, rerun, detok, chunk_size=3)
    assert (stats.reused_chunks, stats.computed_chunks, rerun.rows) == (2, 2, 4)
    out = store.load()
    expected = CountingTeacher()(enc)
    np.testing.assert_array_equal(out.tokens, expected["tokens"])
    np.testing.assert_allclose(out.topk_values, expected["topk_values"])
    assert out.sources == sources and out.predictions[0] == detok(expected["tokens"][0])


def test_chunks_a_killed_build_finished_keep_what_they_took_for_the_build_that_completes_it(tmp_path):
    # Chunks of 3 of 10 inputs, each call 0.05 s: the killed build finishes chunks 0 and 1; the rerun reuses
    # them and reports their chip-seconds, read from their markers (seconds x this host's chips).
    sources, enc = inputs(10)
    store = ts.TeacherStore(tmp_path, "k")
    with pytest.raises(KeyboardInterrupt):
        store.build(sources, enc, CountingTeacher(fail_after_rows=6, seconds_per_call=0.05), detok, chunk_size=3)
    markers = [json.loads((store.dir / f"chunk_{i:05d}.COMPLETED").read_text()) for i in (0, 1)]
    assert all(m["seconds"] >= 0.05 and m["chips"] == jax.local_device_count() for m in markers)
    stats = store.build(sources, enc, CountingTeacher(), detok, chunk_size=3)
    assert (stats.reused_chunks, stats.unmeasured_chunks) == (2, 0)
    assert stats.reused_chip_seconds == pytest.approx(sum(m["seconds"] * m["chips"] for m in markers))
    assert isinstance(ts.BuildStats(store.dir).reused_chip_seconds, float)   # every host gathers the same kind
    # A marker from before markers held seconds counts as unmeasured, not as free.
    (store.dir / "chunk_00000.COMPLETED").write_text(json.dumps({k: markers[0][k] for k in (".npz", ".jsonl")}))
    stats = store.build(sources, enc, CountingTeacher(), detok, chunk_size=3)
    assert (stats.reused_chunks, stats.unmeasured_chunks) == (4, 1) and stats.reused[0] is None
    now = [json.loads((store.dir / f"chunk_{i:05d}.COMPLETED").read_text()) for i in (1, 2, 3)]
    assert stats.reused_chip_seconds == pytest.approx(sum(m["seconds"] * m["chips"] for m in now))


def test_hosts_building_their_shares_of_one_store_leave_the_store_one_host_would(tmp_path):
    # Two hosts, chunks 0, 2 and 1, 3 of 10 inputs in chunks of 3: each computes only its own; the store is
    # complete when both are done and holds what one host's build holds.
    sources, enc = inputs(10)
    shared, alone = ts.TeacherStore(tmp_path / "two", "k"), ts.TeacherStore(tmp_path / "one", "k")
    first, second = CountingTeacher(), CountingTeacher()
    stats = shared.build(sources, enc, first, detok, chunk_size=3, shard=(0, 2))
    assert (stats.computed_chunks, stats.reused_chunks, first.rows) == (2, 0, 6) and not shared.is_complete()
    stats = shared.build(sources, enc, second, detok, chunk_size=3, shard=(1, 2))
    assert (stats.computed_chunks, second.rows) == (2, 4) and shared.is_complete()
    alone.build(sources, enc, CountingTeacher(), detok, chunk_size=3)
    got, want = shared.load(), alone.load()
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_array_equal(got.topk_values, want.topk_values)
    assert got.predictions == want.predictions and got.sources == want.sources
    with pytest.raises(ValueError, match=r"shard must be \(index, count\) with 0 <= index < count, got \(2, 2\)"):
        shared.build(sources, enc, CountingTeacher(), detok, chunk_size=3, shard=(2, 2))


def test_same_key_reuses_the_store_with_no_teacher_compute(tmp_path):
    sources, enc = inputs(7)
    key = ts.store_key("teacher-abc", sources, {"decode": "greedy", "max_len": 4, "topk": K})
    ts.TeacherStore(tmp_path, key).build(sources, enc, CountingTeacher(), detok, chunk_size=4)
    again = CountingTeacher()
    stats = ts.TeacherStore(tmp_path, key).build(sources, enc, again, detok, chunk_size=4)
    assert (again.rows, stats.computed_chunks, stats.reused_chunks) == (0, 0, 2)


def test_key_changes_with_teacher_inputs_or_settings():
    sources = ["a", "b"]
    base = ts.store_key("t1", sources, {"beams": 1})
    assert base == ts.store_key("t1", list(sources), {"beams": 1})
    assert len({base, ts.store_key("t2", sources, {"beams": 1}), ts.store_key("t1", ["a", "c"], {"beams": 1}),
                ts.store_key("t1", sources, {"beams": 4})}) == 4


def test_empty_unlabeled_pool_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="unlabeled pool is empty"):
        ts.TeacherStore(tmp_path, "k").build([], np.zeros((0, 2), np.int32), CountingTeacher(), detok)


def test_param_fingerprint_sees_a_changed_value():
    params = {"a": np.arange(10, dtype=np.float32), "b": {"c": np.ones((3, 3), np.float32)}}
    changed = {"a": params["a"].copy(), "b": params["b"]}
    changed["a"][0] = 7.0
    assert ts.fingerprint_params(params) == ts.fingerprint_params(dict(params))
    assert ts.fingerprint_params(params) != ts.fingerprint_params(changed)


def test_reads_t5x_infer_output_as_pseudo_labels(t5x_fixtures):
    plain = ts.read_t5x_infer_jsonl(t5x_fixtures / "infer_example.jsonl")
    aux = ts.read_t5x_infer_jsonl(t5x_fixtures / "infer_example_with_aux.jsonl")
    assert plain[0] == {"source": "reverse: run big five four", "prediction": "one moon"}
    assert len(aux) == len(plain) == 8
    assert aux[0]["tokens"][-1] == 1 and isinstance(aux[0]["score"], float)


def test_a_bad_t5x_line_names_file_and_line(tmp_path):
    path = tmp_path / "task-predict.jsonl-00000-of-00001"
    path.write_text(json.dumps({"inputs": {"inputs_pretokenized": "x"}, "prediction": "y"}) + "\n{\"oops\": 1}\n")
    with pytest.raises(ValueError, match=r"00001:2: not a T5X infer line"):
        ts.read_t5x_infer_jsonl(path)


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_a_truncated_chunk_is_recomputed_with_a_warning_naming_the_file(tmp_path):
    sources, enc = inputs(10)
    store = ts.TeacherStore(tmp_path, "k")
    store.build(sources, enc, CountingTeacher(), detok, chunk_size=4)
    bad = tmp_path / "k" / "chunk_00001.npz"
    _truncate(bad)
    assert not store.is_complete()
    rerun = CountingTeacher()
    with pytest.warns(RuntimeWarning, match=f"{bad} does not match its checksum .*; recomputing chunk 1"):
        stats = store.build(sources, enc, rerun, detok, chunk_size=4)
    assert (stats.reused_chunks, stats.computed_chunks, rerun.rows) == (2, 1, 4)
    np.testing.assert_array_equal(store.load().topk_values, CountingTeacher()(enc)["topk_values"])


def test_an_altered_predictions_file_fails_its_checksum(tmp_path):
    sources, enc = inputs(4)
    store = ts.TeacherStore(tmp_path, "k")
    store.build(sources, enc, CountingTeacher(), detok, chunk_size=4)
    lines = tmp_path / "k" / "chunk_00000.jsonl"
    lines.write_text(lines.read_text().replace("sentence 2", "sentence 9"))
    assert store.chunk_problem(0) == f"{lines} does not match its checksum (truncated or altered on disk)"


def test_loading_a_store_with_a_truncated_chunk_names_the_file(tmp_path):
    sources, enc = inputs(8)
    store = ts.TeacherStore(tmp_path, "k")
    store.build(sources, enc, CountingTeacher(), detok, chunk_size=4)
    _truncate(tmp_path / "k" / "chunk_00000.npz", keep=0.9)
    with pytest.raises(FileNotFoundError, match=r"chunk_00000\.npz does not match its checksum .*; build it again"):
        store.load()


def test_the_store_record_counts_the_chunks_of_every_attempt(tmp_path):
    from doa_jax.experiment.phases import store_record

    record = tmp_path / "record.json"
    # Completed now (3 s, 2 chunks) after a killed attempt had finished chunks worth 5 s: 8 s.
    assert store_record(record, 3.0, 2, 5.0, 0)["seconds"] == 8.0
    # Another cell finding the store complete reads that record, as written: its own 0.2 s of checks are not a
    # build, and the markers' seconds it summed (6 s here) do not replace the record.
    written = record.read_bytes()
    assert store_record(record, 0.2, 0, 6.0, 0)["seconds"] == 8.0 and record.read_bytes() == written
    # One chunk recomputed (1 s) among chunks whose markers hold no seconds (an older version's): the record's
    # 8 s, which counted them, stands.
    assert store_record(record, 1.0, 1, 0.0, 3)["seconds"] == 8.0
    # An attempt finished every chunk and was killed before writing the record: the chunks' 5 s.
    assert store_record(tmp_path / "other.json", 0.2, 0, 5.0, 1) == {
        "seconds": 5.0, "computed_chunks": 0, "earlier_attempts_seconds": 5.0, "unmeasured_chunks": 1}


def test_loading_reads_each_chunk_file_once(tmp_path, monkeypatch):
    # Checked and parsed from the same bytes (a store on gs:// is read over the network).
    import collections
    import pathlib

    sources, enc = inputs(10)
    store = ts.TeacherStore(tmp_path, "k")
    store.build(sources, enc, CountingTeacher(), detok, chunk_size=3)
    reads = collections.Counter()
    read_bytes = pathlib.Path.read_bytes
    monkeypatch.setattr(pathlib.Path, "read_bytes", lambda self: reads.update([self.name]) or read_bytes(self))
    assert store.load().sources == sources
    assert {name: n for name, n in reads.items() if name.startswith("chunk_")} == {
        f"chunk_{i:05d}{suffix}": 1 for i in range(4) for suffix in (".npz", ".jsonl", ".COMPLETED")}


def test_only_the_first_host_writes_the_manifest(tmp_path):
    sources, enc = inputs(10)
    store = ts.TeacherStore(tmp_path, "k")
    store.build(sources, enc, CountingTeacher(), detok, chunk_size=3, shard=(1, 2))
    assert not store.manifest_path.exists() and (store.dir / "chunk_00001.COMPLETED").exists()
    store.build(sources, enc, CountingTeacher(), detok, chunk_size=3, shard=(0, 2))
    assert json.loads(store.manifest_path.read_text())["num_chunks"] == 4 and store.is_complete()


def test_a_complete_store_is_taken_on_its_shards_markers_without_reading_its_files(tmp_path, monkeypatch):
    # 10 inputs in chunks of 3: host 1 of 2 owns chunks 1 and 3. `load` checks the files as it reads them.
    import pathlib

    sources, enc = inputs(10)
    store = ts.TeacherStore(tmp_path, "k")
    store.build(sources, enc, CountingTeacher(), detok, chunk_size=3)
    read = []
    read_bytes, read_text = pathlib.Path.read_bytes, pathlib.Path.read_text
    monkeypatch.setattr(pathlib.Path, "read_bytes", lambda self: read.append(self.name) or read_bytes(self))
    monkeypatch.setattr(pathlib.Path, "read_text", lambda self, *a, **k: read.append(self.name) or read_text(
        self, *a, **k))
    markers = store.shard_markers((1, 2))
    assert markers == {i: json.loads(read_text(tmp_path / "k" / f"chunk_{i:05d}.COMPLETED")) for i in (1, 3)}
    assert sorted(read) == ["chunk_00001.COMPLETED", "chunk_00003.COMPLETED", "manifest.json"]


@pytest.mark.parametrize("damage", ["missing", "torn", "no checksums"])
def test_a_store_missing_a_marker_or_with_a_torn_one_in_the_shard_is_not_taken_as_complete(tmp_path, damage):
    sources, enc = inputs(10)
    store = ts.TeacherStore(tmp_path, "k")
    store.build(sources, enc, CountingTeacher(), detok, chunk_size=3)
    marker = tmp_path / "k" / "chunk_00002.COMPLETED"
    if damage == "missing":
        marker.unlink()
    else:   # torn, or an older version's marker: seconds but no checksums
        marker.write_text('{"seconds": 1' if damage == "torn" else '{"seconds": 1.0, "chips": 1}')
    assert store.shard_markers((0, 2)) is None
    # a torn marker of another host's chunk is that host's to find; a missing one means the store is not complete
    assert (store.shard_markers((1, 2)) is None) == (damage == "missing")


def test_loading_says_whether_a_chunk_is_missing_or_fails_its_checksums(tmp_path):
    sources, enc = inputs(8)
    store = ts.TeacherStore(tmp_path, "k")
    store.build(sources, enc, CountingTeacher(), detok, chunk_size=4)
    _truncate(tmp_path / "k" / "chunk_00001.jsonl")
    with pytest.raises(ts.StoreIncomplete) as failed:
        store.load()
    assert not failed.value.missing
    (tmp_path / "k" / "chunk_00001.COMPLETED").unlink()
    with pytest.raises(ts.StoreIncomplete, match="chunk 1 was never finished") as failed:
        store.load()
    assert failed.value.missing


def test_an_attempts_two_passes_count_each_chunk_once_and_earlier_attempts_work_only_where_it_remains():
    # Pass 1 computed chunk 3 and reused 0-2 (5 s each by their markers); pass 2, after a load found chunk 1 not
    # whole, recomputed 1 and reused 0, 2 and 3. Chunk 3 is this attempt's (its clock timed it); chunk 1's first
    # computation was lost: earlier attempts' work that remains is chunks 0 and 2.
    first = ts.BuildStats("s", (3,), {0: 5.0, 1: 5.0, 2: 5.0})
    both = first.then(ts.BuildStats("s", (1,), {0: 5.0, 2: 5.0, 3: 0.7}))
    assert (both.computed, dict(both.reused), both.reused_chip_seconds) == ((3, 1), {0: 5.0, 2: 5.0}, 10.0)
    assert (dict(both.lost), both.lost_chip_seconds) == ({1: 5.0}, 5.0)   # chunk 1's first computation
    # a chunk computed in both passes (cut again after it was written) is one chunk computed
    assert first.then(ts.BuildStats("s", (3,), {0: 5.0, 1: 5.0, 2: 5.0})).computed == (3,)
