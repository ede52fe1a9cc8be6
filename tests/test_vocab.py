"""Vocabularies: T5's ids (pad 0, eos 1, unk 2, 100 extra ids), built offline, checked against a model."""
import pytest

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
