"""T5's vocabulary (spiece.model) on a machine that reaches PyPI but not Google Cloud Storage or Hugging Face.

T5's SentencePiece model is normally copied from gs://t5-data/vocabs/cc_all.32000.100extra/sentencepiece.model
(T5X's T5 v1.1 configs name it) or from a Hugging Face T5 repository's spiece.model.
Where only PyPI is reachable: the source distribution of `stable-diffusion-cpp-python` vendors
stable-diffusion.cpp, which embeds T5 v1.1's tokenizer.json (the one its Flux and SD3 text encoders
use) as a C byte array. This script downloads that sdist (an explicit download, with pip), reads the
array out of the header, checks it is T5's (the sha256 of the tokenizer.json that Hugging Face's T5 v1.1
and FLAN-T5 repositories hold beside spiece.model), rebuilds the SentencePiece model with `doa vocab
convert`'s code, checks it against T5 ids published in Hugging Face's T5 documentation, and only then
moves it to --out. The rebuilt file encodes as T5's spiece.model (sha256 d60acb12..., 791,656 bytes)
does; its bytes differ (the original also records how it was trained), so its sha256 is REBUILT_SHA256.

  python scripts/t5_vocab_from_pypi.py --out ~/t5/spiece.model
"""
from __future__ import annotations

import argparse
import hashlib
import pathlib
import re
import subprocess
import sys
import tarfile
import tempfile

from doa_jax import storage
from doa_jax.data import vocab

PACKAGE = "stable-diffusion-cpp-python==0.4.7"
HEADER = "vendor/stable-diffusion.cpp/src/tokenizers/vocab/clip_t5.hpp"
ARRAY = "t5_tokenizer_json_str"
TOKENIZER_JSON_SHA256 = "fe2ebbbbde2985be723e0ce18217853e4020c5e9d35bd07be2c27ab9d3ead57a"
REBUILT_SHA256 = "90dab55a9ec70f4746126b8908b4d591b724b8d508ad190fe902c121eb330cdb"   # what --out holds
# Encodings (EOS left out) printed in Hugging Face's T5 documentation for T5's tokenizer.
KNOWN_IDS = {
    "Hello world": [8774, 296],
    "Studies have been shown that owning a dog is good for you": [6536, 43, 118, 2008, 24, 293, 53, 3, 9, 1782, 19,
                                                                  207, 21, 25],
}


def tokenizer_json_from_header(text: str) -> bytes:
    """The bytes of the header's `t5_tokenizer_json_str[] = {0x.., ...};` array, trailing NULs dropped."""
    start = text.find(ARRAY + "[]")
    if start < 0:
        raise ValueError(f"{HEADER}: no array {ARRAY}")
    body = text[text.index("{", start) + 1:text.index("};", start)]
    return bytes(int(x, 16) for x in re.findall(r"0x[0-9a-fA-F]{1,2}", body)).rstrip(b"\0")


def check_known_ids(v: vocab.Vocabulary) -> None:
    for text, ids in KNOWN_IDS.items():
        if v.encode(text) != ids:
            raise SystemExit(f"{v.path}: {text!r} -> {v.encode(text)}, T5's is {ids}: not T5's vocabulary")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="where to write spiece.model")
    ap.add_argument("--sdist", help=f"an already downloaded {PACKAGE} .tar.gz (else pip downloads it)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        sdist = args.sdist
        if not sdist:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                            "--dest", scratch, PACKAGE], check=True)
            sdist = str(next(pathlib.Path(scratch).glob("*.tar.gz")))
        with tarfile.open(sdist) as tar:
            member = next((m for m in tar.getmembers() if m.name.endswith(HEADER)), None)
            if member is None:
                raise SystemExit(f"{sdist}: no {HEADER}")
            text = tar.extractfile(member).read().decode("ascii")
        data = tokenizer_json_from_header(text)
        if hashlib.sha256(data).hexdigest() != TOKENIZER_JSON_SHA256:
            raise SystemExit(f"{sdist}: the tokenizer.json in {HEADER} is not T5's (sha256 "
                             f"{hashlib.sha256(data).hexdigest()}, T5's {TOKENIZER_JSON_SHA256})")
        tokenizer = pathlib.Path(scratch) / "tokenizer.json"
        tokenizer.write_bytes(data)
        staged, extra_ids = vocab.from_tokenizer_json(tokenizer, pathlib.Path(scratch) / "spiece.model")
        v = vocab.Vocabulary(staged)
        check_known_ids(v)
        out = pathlib.Path(args.out).expanduser()
        storage.write_atomic(out, staged.read_bytes())   # --out is never half written
    spec = vocab.Vocabulary(out).spec()
    print(f"wrote {out}: {v.base_vocab_size} pieces (+{extra_ids} extra ids in the json, added by Vocabulary), "
          f"sha256 {spec['sha256']}; T5's ids for {len(KNOWN_IDS)} documented texts match")
    return 0


if __name__ == "__main__":
    sys.exit(main())
