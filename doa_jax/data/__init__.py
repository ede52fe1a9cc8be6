"""Task data: cards (`tasks/*.toml`), JSON-lines reading, pools, vocabularies, statistics.

These modules import no TensorFlow. `seqio_tasks`, `pipeline` and `tfds_builder` (SeqIO/TFDS,
which import TensorFlow) are imported by name when needed.
"""
