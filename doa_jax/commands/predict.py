"""`doa predict`: a teacher's outputs on inputs, stored once for distillation (and reused).

    doa predict --checkpoint TEACHER --vocab spiece.model --task wlp --split unlabeled --out stores/
    doa predict --checkpoint TEACHER --vocab spiece.model --inputs inputs.jsonl --out stores/
    doa predict --t5x-infer doa_wlp_inputs-predict_with_aux.jsonl-00000-of-00001 --task wlp --out pl.jsonl

The store (under OUT/<key>/) holds per example the input, the greedy (or beam) output tokens and
text, the sequence log-probability and the teacher's top-k logits at each output position. It is
written in chunks: a rerun after a kill skips finished chunks, and a run with the same key
(teacher weights + inputs + decoding settings) reuses the store with no teacher compute. With
--t5x-infer, T5X `infer` output becomes {"source", "target"} pseudo-labels; with --task, "source" is
the raw input (the card's input_prefix, which the SeqIO task added, removed) as in every other
data file, and a file of another task is an error; without --task it is T5X's input as given.
"""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("predict", help="store a teacher's outputs (tokens, log-probs, top-k logits)",
                              description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="teacher checkpoint (HF dir, T5X checkpoint_N, doa_jax native or run dir)")
    p.add_argument("--vocab", help="SentencePiece model of the teacher")
    p.add_argument("--task", help="task card: inputs are its --split (default: unlabeled); with "
                                  "--t5x-infer, the card whose input prefix is removed")
    p.add_argument("--split", default="unlabeled")
    p.add_argument("--inputs", help="JSON lines with a 'source' field (instead of --task)")
    p.add_argument("--t5x-infer", help="convert T5X infer output to pseudo-labels (no teacher run)")
    p.add_argument("--out", required=True, help="store root directory (or, with --t5x-infer, a .jsonl file)")
    p.add_argument("--max-examples", type=int, default=None)
    p.add_argument("--inputs-length", type=int, default=None, help="default: the task card's, else 512")
    p.add_argument("--max-decode-len", type=int, default=None, help="default: the task card's targets length, else 64")
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--topk", type=int, default=8, help="top-k logits kept per output position")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--chunk-size", type=int, default=1024)
    p.add_argument("--dtype", default="bfloat16", help="activation dtype (float32 to match PyTorch exactly)")
    p.add_argument("--mesh-data", type=int, default=-1, help="devices on the data axis (-1: all left)")
    p.add_argument("--mesh-model", type=int, default=1, help="devices on the model axis")
    p.set_defaults(func=run)


def _convert_t5x(args) -> int:
    import json
    import os
    import re

    from doa_jax import storage
    from doa_jax.distill import store as teacher_store
    from doa_jax.cli import UserError
    from doa_jax.data import cards

    prefix = None
    if args.task:
        card = cards.load_card(args.task)
        # T5X names its output after the SeqIO task: doa_<card>[_inputs]-<mode>.jsonl-...
        m = re.match(r"^doa_(.+?)(?:_inputs)?-predict", os.path.basename(args.t5x_infer))
        if m and m.group(1) != card.name:
            raise UserError(f"{args.t5x_infer} is T5X output of task doa_{m.group(1)}, not of --task {card.name}")
        prefix = card.input_prefix
    rows = teacher_store.read_t5x_infer_jsonl(args.t5x_infer, prefix=prefix)
    storage.write_atomic(args.out, "".join(   # a local file or a URL (gs://)
        json.dumps({"source": row["source"], "target": row["prediction"],
                    **({"score": row["score"]} if "score" in row else {})}) + "\n" for row in rows))
    kind = (f"raw inputs, task {args.task}'s prefix {prefix!r} removed" if args.task else
            "T5X's inputs as given, any task prefix kept (pass --task to store raw inputs)")
    print(f"wrote {len(rows)} pseudo-labels to {args.out}; sources are {kind}")
    return 0


def run(args) -> int:
    from doa_jax.cli import UserError

    if args.t5x_infer:
        return _convert_t5x(args)
    if not args.checkpoint or not args.vocab:
        raise UserError("--checkpoint and --vocab are required (or use --t5x-infer)")
    if bool(args.task) == bool(args.inputs):
        raise UserError("give exactly one of --task and --inputs")

    import time

    from doa_jax import checkpoints, partitioning
    from doa_jax.distill import store as teacher_store
    from doa_jax.data import cards, jsonl, pools, vocab as vocab_lib
    from doa_jax.model import Transformer

    vocab = vocab_lib.load_vocab(args.vocab)
    if args.task:
        card = cards.load_card(args.task)
        examples = pools.make_pools(card).split(args.split)
        prefix, lengths = card.input_prefix, dict(card.feature_lengths)
    else:
        examples = jsonl.load_examples(args.inputs, require_target=False).examples
        prefix, lengths = "", {"inputs": 512, "targets": 64}
    examples = examples[: args.max_examples] if args.max_examples else examples
    inputs_length = args.inputs_length or lengths["inputs"]
    max_len = args.max_decode_len or lengths["targets"]
    config, host_params = checkpoints.load_checkpoint(args.checkpoint)
    config = config.replace(dtype=args.dtype)
    vocab_lib.check_vocab(vocab, config.vocab_size)

    mesh, rules = partitioning.MeshConfig(data=args.mesh_data, model=args.mesh_model).build()
    if args.batch_size % mesh.shape["data"]:
        raise UserError(f"--batch-size {args.batch_size} is not divisible by the mesh's data axis "
                        f"({mesh.shape['data']})")
    module = Transformer(config)
    params = partitioning.put_params(host_params, partitioning.model_shardings(module, mesh, rules))
    request = teacher_store.StoreRequest(
        teacher_store.fingerprint_params(host_params), [ex["source"] for ex in examples], prefix, inputs_length,
        max_len, num_beams=args.num_beams, topk=args.topk, extra_settings={"dtype": args.dtype})
    start = time.perf_counter()

    def progress(done, total, n):
        elapsed = time.perf_counter() - start
        print(f"chunk {done}/{total}: {n} examples, {elapsed:.0f} s", flush=True)

    with partitioning.mesh_context(mesh, rules):
        store, _, stats = teacher_store.build_store(args.out, request, vocab, module, params,
                                                    batch_size=args.batch_size, chunk_size=args.chunk_size,
                                                    on_chunk=progress)
    sources = request.sources
    seconds = time.perf_counter() - start
    computed = stats.computed_chunks
    print(f"store {store.dir}: {len(sources)} examples; computed {computed} chunk(s), reused "
          f"{stats.reused_chunks}" + (f"; {len(sources) / seconds:.1f} examples/s" if computed else
                                      " (no teacher compute)"))
    return 0
