"""Deviceless AOT compile of the real T5X train step (T5 v1.1) for TPU slices / NVIDIA GPUs.

One case per process:  python aot_t5x.py CASE_NAME      (see CASES below; `--list` prints them)
Appends/replaces the row for CASE_NAME in notes/aot_t5x_peer.json (the figures notes/aot.md quotes).
Set-up (T5X is not a dependency of doa-jax): scripts/t5x_peer/README.md.

Uses T5X's own pieces: t5x.examples.t5.network (unscanned) or t5x.examples.scalable_t5.network
(scan + remat), t5x.models.EncoderDecoderModel, t5x.adafactor.Adafactor / t5x.optimizers.chain
(optax.clip + optax.adamw, as in T5X's base_wmt_from_scratch_adamw.gin), t5x.utils.TrainStateInitializer
(abstract state via jax.eval_shape), t5x.partitioning.PjitPartitioner (standard_logical_axis_rules) and
t5x.trainer.Trainer._partitioned_train_step (train_with_lr, donate_argnums=(0,)), lowered with
ShapeDtypeStructs and compiled for compile-only devices from jax.experimental.topologies.
"""
import os
import sys

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')
# libtpu takes /tmp/libtpu_lockfile; other engineers' AOT jobs on this box may hold it.
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, 't5x_src'), os.path.join(HERE, 'shims'), os.path.join(HERE, 'deps')]

import functools
import json
import re
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
import optax
import seqio
from jax.experimental import topologies
from jax.sharding import Mesh

from t5x import adafactor
from t5x import decoding
from t5x import models
from t5x import optimizers
from t5x import partitioning
from t5x import trainer as trainer_lib
from t5x import utils
from t5x.examples.scalable_t5 import network as scalable_network
from t5x.examples.t5 import network as t5_network

GiB = 2 ** 30
RESULTS = os.path.join(HERE, '..', '..', 'notes', 'aot_t5x_peer.json')

# ------------------------------------------------------------------ targets
# TPU: (topology_name, kwargs, model_parallel_submesh for each model-axis size)
TPU_TARGETS = {
    'v5e-8': ('v5e:2x4', {}, {1: (1, 1, 1, 1), 8: (2, 4, 1, 1)}),
    'v5p-8': ('v5:2x2x1', {'chip_config_name': 'megacore'}, {1: (1, 1, 1, 1), 4: (2, 2, 1, 1)}),
    'v4-8': ('v4:2x2x1', {'chip_config_name': 'megacore'}, {1: (1, 1, 1, 1), 4: (2, 2, 1, 1)}),
    'v6e-8': ('v6e:2x4', {}, {1: (1, 1, 1, 1), 8: (2, 4, 1, 1)}),
}
GPU_TARGETS = {
    'h100x1': ('h100', '1x1x1'),
    'h100x8': ('h100', '1x1x8'),
    'h200x1': ('h200', '1x1x1'),
}

SIZES = {
    'xxl': dict(emb_dim=4096, num_heads=64, num_encoder_layers=24, num_decoder_layers=24, head_dim=64, mlp_dim=10240),
    'small': dict(emb_dim=512, num_heads=6, num_encoder_layers=8, num_decoder_layers=8, head_dim=64, mlp_dim=1024),
}


def get_devices(target):
  if target in TPU_TARGETS:
    name, kw, _ = TPU_TARGETS[target]
    return topologies.get_topology_desc(platform='tpu', topology_name=name, **kw).devices
  family, topo = GPU_TARGETS[target]
  from doa_jax.bench import targets   # the GPU target descriptions `doa aot` uses (openxla/xla's specs)
  target_config = targets.target_config(family)
  return topologies.get_topology_desc('x', 'cuda', target_config=target_config, topology=topo).devices


def build_mesh(target, devices, model):
  if target in TPU_TARGETS:
    mps = TPU_TARGETS[target][2][model]
    # T5X's own TPU mesh builder (default_mesh() has no rule for v5e/v5p/v6e, so pass the submesh).
    return partitioning.get_mesh(mps, input_devices=devices, input_local_devices=devices)
  # GPU: same layout as t5x.partitioning.get_gpu_mesh on one host: [nvlink_dp, nvlink_mp].
  n = len(devices)
  return Mesh(np.asarray(devices, dtype=object).reshape(n // model, model), ['data', 'model'])


# ------------------------------------------------------------------ cases
def C(size, target, model, batch, opt, act, scan, remat, **kw):
  d = dict(size=size, target=target, model=model, batch=batch, optimizer=opt, act_dtype=act,
           scan=scan, remat=remat, mode='train', inputs_len=512, targets_len=128, dropout=0.1)
  d.update(kw)
  return d

CASES = {
    # 1. XXL, one H100, Adafactor, bf16 acts, batch 8
    '1a_xxl_h100x1_adafactor_b8_unscanned': C('xxl', 'h100x1', 1, 8, 'adafactor', 'bfloat16', False, 'none'),
    '1b_xxl_h100x1_adafactor_b8_scan_fullremat': C('xxl', 'h100x1', 1, 8, 'adafactor', 'bfloat16', True, 'full'),
    # 2. XXL, v5e-8, model 8, Adafactor
    '2a_xxl_v5e8_adafactor_b64_scan_fullremat': C('xxl', 'v5e-8', 8, 64, 'adafactor', 'bfloat16', True, 'full'),
    '2b_xxl_v5e8_adafactor_b8_scan_fullremat': C('xxl', 'v5e-8', 8, 8, 'adafactor', 'bfloat16', True, 'full'),
    # 3. paper recipe: AdamW, fp32 params + fp32 activations, batch 32
    '3a_xxl_v5p8_adamw_fp32_b32_scan_fullremat': C('xxl', 'v5p-8', 4, 32, 'adamw', 'float32', True, 'full'),
    '3b_xxl_h100x8_adamw_fp32_b32_scan_fullremat': C('xxl', 'h100x8', 8, 32, 'adamw', 'float32', True, 'full'),
    '3c_xxl_h100x1_adamw_fp32_b32_scan_fullremat': C('xxl', 'h100x1', 1, 32, 'adamw', 'float32', True, 'full'),
    '3d_xxl_h200x1_adamw_fp32_b32_scan_fullremat': C('xxl', 'h200x1', 1, 32, 'adamw', 'float32', True, 'full'),
    # 4. efficient recipe: Adafactor, bf16 activations
    '4a_xxl_v4-8_adafactor_b8_scan_fullremat': C('xxl', 'v4-8', 4, 8, 'adafactor', 'bfloat16', True, 'full'),
    '4b_xxl_v4-8_adafactor_b32_scan_fullremat': C('xxl', 'v4-8', 4, 32, 'adafactor', 'bfloat16', True, 'full'),
    '4c_xxl_v6e8_adafactor_b8_scan_fullremat': C('xxl', 'v6e-8', 8, 8, 'adafactor', 'bfloat16', True, 'full'),
    '4d_xxl_v6e8_adafactor_b32_scan_fullremat': C('xxl', 'v6e-8', 8, 32, 'adafactor', 'bfloat16', True, 'full'),
    '4e_xxl_h100x8_adafactor_b8_scan_fullremat': C('xxl', 'h100x8', 8, 8, 'adafactor', 'bfloat16', True, 'full'),
    '4f_xxl_h100x8_adafactor_b32_scan_fullremat': C('xxl', 'h100x8', 8, 32, 'adafactor', 'bfloat16', True, 'full'),
    '4g_xxl_h200x1_adafactor_b8_scan_fullremat': C('xxl', 'h200x1', 1, 8, 'adafactor', 'bfloat16', True, 'full'),
    '4h_xxl_h200x1_adafactor_b32_scan_fullremat': C('xxl', 'h200x1', 1, 32, 'adafactor', 'bfloat16', True, 'full'),
    # 5. Small
    '5a_small_h100x1_adafactor_b32_unscanned': C('small', 'h100x1', 1, 32, 'adafactor', 'bfloat16', False, 'none'),
    '5b_small_h100x1_adamw_b32_unscanned': C('small', 'h100x1', 1, 32, 'adamw', 'bfloat16', False, 'none'),
    '5c_small_v5e8_adafactor_b32_unscanned': C('small', 'v5e-8', 1, 32, 'adafactor', 'bfloat16', False, 'none'),
    '5d_small_v5e8_adamw_b32_unscanned': C('small', 'v5e-8', 1, 32, 'adamw', 'bfloat16', False, 'none'),
    # 6. inference: greedy predict_batch, bf16 params
    '6a_xxl_h100x1_predict_greedy_b256_in512_dec128': C('xxl', 'h100x1', 1, 256, None, 'bfloat16', False, 'none',
                                                        mode='predict', param_dtype='bfloat16', dropout=0.0),
}

# extra variants (added only when asked for by name)
EXTRA = {
    '1c_xxl_h100x1_adafactor_b8_scan_minimalremat': C('xxl', 'h100x1', 1, 8, 'adafactor', 'bfloat16', True, 'minimal'),
    '1d_xxl_h100x1_adafactor_b8_scan_noremat': C('xxl', 'h100x1', 1, 8, 'adafactor', 'bfloat16', True, 'none'),
    '2c_xxl_v5e8_adafactor_b64_unscanned': C('xxl', 'v5e-8', 8, 64, 'adafactor', 'bfloat16', False, 'none'),
    '2d_xxl_v5e8_adafactor_b8_unscanned': C('xxl', 'v5e-8', 8, 8, 'adafactor', 'bfloat16', False, 'none'),
    '2e_xxl_v5e8_adafactor_b32_scan_fullremat': C('xxl', 'v5e-8', 8, 32, 'adafactor', 'bfloat16', True, 'full'),
    '2f_xxl_v5e8_adafactor_b16_scan_fullremat': C('xxl', 'v5e-8', 8, 16, 'adafactor', 'bfloat16', True, 'full'),
    '4i_xxl_v4-8_adafactor_b48_scan_fullremat': C('xxl', 'v4-8', 4, 48, 'adafactor', 'bfloat16', True, 'full'),
    '4j_xxl_v4-8_adafactor_b64_scan_fullremat': C('xxl', 'v4-8', 4, 64, 'adafactor', 'bfloat16', True, 'full'),
    '5e_small_v5e8_adafactor_b32_scan_fullremat': C('small', 'v5e-8', 1, 32, 'adafactor', 'bfloat16', True, 'full'),
    '6b_xxl_h100x1_predict_greedy_b256_in128_dec64': C('xxl', 'h100x1', 1, 256, None, 'bfloat16', False, 'none',
                                                       mode='predict', param_dtype='bfloat16', dropout=0.0,
                                                       inputs_len=128, targets_len=64),
}
CASES.update(EXTRA)


# ------------------------------------------------------------------ model
def make_model(case):
  size = SIZES[case['size']]
  common = dict(vocab_size=32128, dtype=case['act_dtype'], mlp_activations=('gelu', 'linear'),
                dropout_rate=case['dropout'], logits_via_embedding=False, **size)
  if case['scan'] or case['remat'] != 'none':
    module = scalable_network.Transformer(scalable_network.T5Config(
        scan_layers=case['scan'], remat_policy=case['remat'], **common))
  else:
    module = t5_network.Transformer(t5_network.T5Config(**common))
  if case['optimizer'] == 'adafactor':
    # t5_1_1/base.gin
    opt = adafactor.Adafactor(decay_rate=0.8, step_offset=0,
                              logical_factor_rules=adafactor.standard_logical_factor_rules())
  elif case['optimizer'] == 'adamw':
    # t5x/examples/t5/t5_1_1/examples/base_wmt_from_scratch_adamw.gin
    opt = optimizers.chain(transformations=[
        optax.clip(max_delta=1.0),
        optax.adamw(learning_rate=optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=1e-4, warmup_steps=1000, decay_steps=10_000, end_value=0.0)),
    ])
  else:
    opt = None
  # Vocab is only used for decoding text; a pass-through vocab avoids fetching the gs:// sentencepiece file.
  vocab = seqio.PassThroughVocabulary(size=32128, eos_id=1)
  extra = {}
  if case['mode'] == 'predict':
    # greedy = temperature_sample with temperature 0 (T5X's documented greedy setting)
    extra['decode_fn'] = functools.partial(decoding.temperature_sample, temperature=0.0, topk=1)
  model = models.EncoderDecoderModel(
      module=module, input_vocabulary=vocab, output_vocabulary=vocab, optimizer_def=opt, **extra,
      z_loss=1e-4, label_smoothing=0.0, loss_normalizing_factor=None)
  return model


def mem_fields(ma):
  f = {}
  for k in ('argument_size_in_bytes', 'output_size_in_bytes', 'alias_size_in_bytes', 'temp_size_in_bytes',
            'generated_code_size_in_bytes', 'host_argument_size_in_bytes', 'host_output_size_in_bytes',
            'host_alias_size_in_bytes', 'host_temp_size_in_bytes', 'host_generated_code_size_in_bytes'):
    f[k] = int(getattr(ma, k, 0) or 0)
  # XLA's own peak from its buffer-assignment heap simulation (CompiledMemoryStats.peak_memory_in_bytes)
  f['xla_peak_memory_in_bytes'] = int(getattr(ma, 'peak_memory_in_bytes', 0) or 0)
  f['xla_peak_memory_gib'] = round(f['xla_peak_memory_in_bytes'] / GiB, 3)
  f['peak_bytes'] = f['argument_size_in_bytes'] + f['output_size_in_bytes'] - f['alias_size_in_bytes'] + f['temp_size_in_bytes']
  f['peak_gib'] = round(f['peak_bytes'] / GiB, 3)
  for k in ('argument', 'output', 'alias', 'temp', 'generated_code'):
    f[k + '_gib'] = round(f[k + '_size_in_bytes'] / GiB, 3)
  return f


def write_row(row):
  rows = []
  if os.path.exists(RESULTS):
    with open(RESULTS) as fh:
      rows = json.load(fh)
  rows = [r for r in rows if r['case'] != row['case']]
  rows.append(row)
  rows.sort(key=lambda r: r['case'])
  tmp = RESULTS + '.tmp'
  with open(tmp, 'w') as fh:
    json.dump(rows, fh, indent=1)
  os.replace(tmp, RESULTS)


def run(name):
  case = CASES[name]
  row = dict(case=name, target=case['target'], size=case['size'], mode=case['mode'],
             batch=case['batch'], inputs_len=case['inputs_len'], targets_len=case['targets_len'],
             optimizer=case['optimizer'], param_dtype=case.get('param_dtype', 'float32'),
             activation_dtype=case['act_dtype'], scan=case['scan'], remat=case['remat'],
             dropout=case['dropout'], network=('scalable_t5' if (case['scan'] or case['remat'] != 'none') else 't5'),
             compile_s=None, lower_s=None, refusal=None, error=None, device_kind=None, n_devices=None, mesh=None)
  t0 = time.time()
  try:
    devices = get_devices(case['target'])
    row['device_kind'] = devices[0].device_kind
    row['n_devices'] = len(devices)
    mesh = build_mesh(case['target'], devices, case['model'])
    row['mesh'] = dict(zip(mesh.axis_names, [int(s) for s in mesh.devices.shape]))
    partitioner = partitioning.PjitPartitioner(
        num_partitions=case['model'], logical_axis_rules=partitioning.standard_logical_axis_rules())
    partitioner.mesh = mesh  # overrides the cached_property (which would use jax.devices(), i.e. CPU)
    model = make_model(case)
    B, L, T = case['batch'], case['inputs_len'], case['targets_len']
    if case['mode'] == 'train':
      input_shapes = {'encoder_input_tokens': (B, L), 'decoder_input_tokens': (B, T),
                      'decoder_target_tokens': (B, T), 'decoder_loss_weights': (B, T)}
      input_types = {'encoder_input_tokens': jnp.int32, 'decoder_input_tokens': jnp.int32,
                     'decoder_target_tokens': jnp.int32, 'decoder_loss_weights': jnp.int32}
    else:
      input_shapes = {'encoder_input_tokens': (B, L), 'decoder_input_tokens': (B, T)}
      input_types = {'encoder_input_tokens': jnp.int32, 'decoder_input_tokens': jnp.int32}
    init = utils.TrainStateInitializer(
        optimizer_def=model.optimizer_def, init_fn=model.get_initial_variables,
        input_shapes=input_shapes, input_types=input_types, partitioner=partitioner)
    state_shape = init.global_train_state_shape
    state_axes = init.train_state_axes
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state_shape.params))
    n_state = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(state_shape))
    row['n_params'] = n_params
    row['global_state_gib'] = round(n_state / GiB, 3)
    batch = {k: jax.ShapeDtypeStruct(v, input_types[k]) for k, v in input_shapes.items()}

    if case['mode'] == 'train':
      trainer = trainer_lib.Trainer(
          model=model, train_state=state_shape, partitioner=partitioner, eval_names=[],
          summary_dir=None, train_state_axes=state_axes, rng=jax.random.PRNGKey(0),
          learning_rate_fn=utils.create_learning_rate_scheduler(
              factors='constant', base_learning_rate=0.001, warmup_steps=1000),
          num_microbatches=None)
      pfn = trainer._partitioned_train_step  # pylint: disable=protected-access
      args = (state_shape, batch)
    else:
      # t5x/infer.py: InferenceState restored in bfloat16 (RestoreCheckpointConfig dtype='bfloat16'),
      # partitioned predict_batch (utils.get_infer_fn) with greedy decoding.
      param_dtype = jnp.dtype(case.get('param_dtype', 'bfloat16'))
      params_shape = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, param_dtype)
                                  if jnp.issubdtype(x.dtype, jnp.floating) else x, state_shape.params)
      params_axes = state_axes.params
      decode_len = T

      def predict(params, batch):
        return model.predict_batch(params, batch)

      pfn = partitioner.partition(predict, in_axis_resources=(params_axes, partitioner.data_partition_spec),
                                  out_axis_resources=partitioner.data_partition_spec)
      args = (params_shape, batch)

    t1 = time.time()
    lowered = pfn.lower(*args)
    row['lower_s'] = round(time.time() - t1, 1)
    try:  # evidence that Flax/T5X activation sharding constraints made it into the program
      txt = lowered.as_text()
      row['n_sharding_constraints'] = txt.count('sharding_constraint') + txt.count('@Sharding')
      del txt
    except Exception:  # noqa
      pass
    t2 = time.time()
    c2 = time.process_time()
    try:
      compiled = lowered.compile()
      row['compile_s'] = round(time.time() - t2, 1)
      row['compile_cpu_s'] = round(time.process_time() - c2, 1)  # CPU seconds, all threads (box is shared)
      row['compiles'] = True
      row.update(mem_fields(compiled.memory_analysis()))
      try:
        ca = compiled.cost_analysis()
        if ca:
          ca = ca[0] if isinstance(ca, (list, tuple)) else ca
          row['xla_flops'] = float(ca.get('flops', 0.0))
      except Exception:  # noqa
        pass
    except Exception as e:  # compile refusal
      row['compile_s'] = round(time.time() - t2, 1)
      row['compile_cpu_s'] = round(time.process_time() - c2, 1)
      row['compiles'] = False
      msg = str(e)
      m = re.search(r'(Used [0-9.]+[KMGT]? of [0-9.]+[KMGT]? hbm[^\n]*)', msg) or \
          re.search(r'(HLO temporaries \([^)]*\) exceeds available HBM \([^)]*\)[^\n]*)', msg) or \
          re.search(r'(RESOURCE_EXHAUSTED[^\n]*)', msg)
      if m or 'hbm' in msg.lower() or 'RESOURCE_EXHAUSTED' in msg:
        row['refusal'] = m.group(1)[:500] if m else msg[:500]
        row['refusal_full'] = msg[:4000]
      else:
        row['error'] = msg[:4000]
  except Exception as e:  # noqa
    row['compiles'] = False
    row['error'] = (str(e)[:2000] + '\n' + traceback.format_exc()[-2000:])
  row['total_s'] = round(time.time() - t0, 1)
  row['jax'] = jax.__version__
  write_row(row)
  short = {k: row.get(k) for k in ('case', 'device_kind', 'mesh', 'compiles', 'compile_s', 'argument_gib', 'output_gib',
                                   'alias_gib', 'temp_gib', 'generated_code_gib', 'peak_gib', 'xla_peak_memory_gib', 'refusal')}
  print('RESULT', json.dumps(short))
  if row.get('error'):
    print('ERROR', row['error'])


if __name__ == '__main__':
  if sys.argv[1] == '--list':
    print('\n'.join(CASES))
  else:
    for n in sys.argv[1:]:
      run(n)
