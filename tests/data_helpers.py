"""A task vocabulary for data tests, built once per test session from ../shared's task text.

`doa vocab build --tasks all --vocab-size 8000` logic: the vocabulary the cards' `[lengths.coverage]` was
measured with (T5's own needs a download: scripts/t5_vocab_from_pypi.py).
"""
import functools
import tempfile

from doa_jax.data import cards, vocab


@functools.lru_cache(maxsize=None)
def task_vocab(data_root: str, vocab_size: int = 8000) -> vocab.Vocabulary:
    names = cards.card_names()
    texts = []
    for name in names:
        card = cards.load_card(name)
        texts += vocab.task_texts([name], f"{data_root}/{card.subdir}")
    path = vocab.build_vocab(texts, f"{tempfile.mkdtemp(prefix='doa_vocab_')}/tasks.model", vocab_size=vocab_size)
    return vocab.Vocabulary(path)


TOY_CARD = """
name = "toy"
input_prefix = "toy: "
metric = "squad"
primary_metric = "f1"
annotation_cost_usd = 0.1
[lengths]
inputs = 16
targets = 8
[data]
files = {{ all = "{file}" }}
urls = {{ all = "{url}" }}
[pools]
carve_from = "all"
fractions = {{ test = 0.2, validation = 0.2, unlabeled = 0.3, train = 0.3 }}
"""


def toy_card(file: str = "toy_all.jsonl", url: str = "https://example.org/toy_all.jsonl") -> str:
    """A task card of one data file carved into the four pools (data download and storage tests)."""
    return TOY_CARD.format(file=file, url=url)
