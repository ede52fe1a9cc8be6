"""A TFDS dataset builder for the paper's tasks: `doa_tasks/<task>`, one config per task card.

It reads the task's files from the manual dir (`<manual_dir>/<task>/` or `<manual_dir>/` itself)
when they are there, and otherwise downloads the paper's files from the card's URLs. Its splits are
the task's pools for the card's seed (`pools.make_pools`): `train` (labeled pool, in annotation
order), `unlabeled` (targets blank), `validation`, `test`. Features: `source`, `target` (text).

    import doa_jax.data.tfds_builder, tensorflow_datasets as tfds
    ds = tfds.load("doa_tasks/nq", split="train",
                   download_and_prepare_kwargs={"download_config":
                       tfds.download.DownloadConfig(manual_dir="/data/doa")})
"""
from __future__ import annotations

import pathlib

from doa_jax.data import quiet_tf  # noqa: F401  (before TF loads: silences its start-up lines)
import tensorflow_datasets as tfds

from doa_jax.data import cards as cards_lib
from doa_jax.data import pools as pools_lib


def _configs() -> list[tfds.core.BuilderConfig]:
    out = []
    for name in cards_lib.card_names():
        card = cards_lib.load_card(name)
        out.append(tfds.core.BuilderConfig(name=name, description=card.description))
    return out


class DoaTasks(tfds.core.GeneratorBasedBuilder):
    """The six tasks of "Distill or Annotate?" as text-to-text pairs, split into pools."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "The paper's files, carved into pools by the task cards."}
    BUILDER_CONFIGS = _configs()
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Optional. Put the task's files (names in tasks/<task>.toml [data] files, .json or .jsonl) in "
        "<manual_dir>/<task>/ or <manual_dir>/; without them the paper's files are downloaded."
    )
    # No registered checksums (the paper's files carry none); this also keeps TFDS from looking up
    # a checksums file next to this module (which needs the importlib_resources package).
    url_infos: dict = {}

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({"source": tfds.features.Text(), "target": tfds.features.Text()}),
            supervised_keys=("source", "target"),
            homepage="https://aclanthology.org/2023.acl-long.622",
            disable_shuffling=True,  # keep `train` in annotation order: its first N are N bought labels
        )

    def _local_files(self, card, dl_manager) -> dict[str, pathlib.Path] | None:
        try:
            manual = pathlib.Path(dl_manager.manual_dir)
        except (AssertionError, ValueError):
            return None
        for folder in (manual / card.subdir, manual):
            try:
                return {key: card.file_path(key, folder) for key in card.files}
            except FileNotFoundError:
                continue
        return None

    def _split_generators(self, dl_manager):
        card = cards_lib.load_card(self.builder_config.name)
        paths = self._local_files(card, dl_manager)
        if paths is None:
            missing = sorted(set(card.files) - set(card.urls))
            if missing:
                raise FileNotFoundError(
                    f"task {card.name}: no manual files and no URLs for {missing} in {card.path}"
                )
            paths = dl_manager.download({key: card.urls[key] for key in card.files})
        pools = pools_lib.make_pools(card, paths={k: pathlib.Path(v) for k, v in paths.items()})
        return {split: self._generate_examples(pools.split(split)) for split in cards_lib.SPLITS}

    def _generate_examples(self, examples):
        for i, ex in enumerate(examples):
            yield i, {"source": ex["source"], "target": ex["target"]}
