"""The NumPy encoder of in-memory pools equals the SeqIO pipeline token for token."""
import numpy as np
import pytest

from doa_jax.data import cards, encode, pipeline, pools
from data_helpers import task_vocab


@pytest.mark.slow
def test_numpy_encoding_equals_the_seqio_pipeline(doa_data):
    card = cards.load_card("wlp")
    vocab = task_vocab(str(doa_data))
    examples = pools.make_pools(card).annotate(24)
    lengths = {"inputs": 24, "targets": 12}  # short, so trimming + EOS is exercised
    ours = encode.encode_examples(card, vocab, examples, lengths)
    theirs = next(pipeline.batches(card, "train", lengths, 24, vocab=vocab, examples=examples))
    for key in ours:
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)
    assert (ours["encoder_input_tokens"][:, -1] == 1).any()  # some inputs were trimmed to EOS


def test_inputs_only_blanks_the_targets():
    class Chars:
        def encode(self, text):
            return [ord(c) % 50 + 3 for c in text]

    card = cards.Card(**{**{f: None for f in cards.Card.__dataclass_fields__}, "input_prefix": "p: "})
    arrays = encode.encode_examples(card, Chars(), [{"source": "ab", "target": "cd"}], {"inputs": 8, "targets": 4},
                                    inputs_only=True)
    assert arrays["encoder_input_tokens"][0].tolist()[:6] == [ord(c) % 50 + 3 for c in "p: ab"] + [1]
    assert arrays["decoder_target_tokens"].tolist() == [[1, 0, 0, 0]]
