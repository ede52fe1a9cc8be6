"""Print notes/aot_t5x_peer.json as a markdown table (and attach XLA GPU rematerialization notes from logs/)."""
import json, os, re
HERE = os.path.dirname(os.path.abspath(__file__))
rows = json.load(open(os.path.join(HERE, '..', '..', 'notes', 'aot_t5x_peer.json')))
CAP = {'NVIDIA H100 80GB HBM3': '79.1 (device_memory_size)', 'NVIDIA H200 141GB HBM3e': '141.0 (device_memory_size)'}
changed = False
for r in rows:
  log = os.path.join(HERE, 'logs', r['case'] + '.log')
  if os.path.exists(log):
    notes = [m.group(1) for m in re.finditer(r"hlo_rematerialization\.cc:\d+\] (.*)", open(log, errors='replace').read())]
    if notes and r.get('xla_remat_note') != notes:
      r['xla_remat_note'] = notes; changed = True
if changed:
  json.dump(rows, open(os.path.join(HERE, 'results.json'), 'w'), indent=1)
D = {'float32': 'fp32', 'bfloat16': 'bf16'}
f = lambda x: '' if x is None else (f'{x:.2f}' if isinstance(x, float) else str(x))
print('| case | target (device kind) | mesh data x model | batch | opt | params/acts | network | compiles | arg | out | alias | temp | code | **peak GiB** | refusal / error | compile s (wall / cpu) |')
print('|' + '---|' * 16)
for r in rows:
  m = r.get('mesh') or {}
  net = 'scan+remat=' + r['remat'] if r['scan'] else ('unscanned' + ('' if r['remat'] == 'none' else '+remat=' + r['remat']))
  ref = r.get('refusal') or (('ERROR: ' + r['error'].splitlines()[0][:120]) if r.get('error') else '')
  print(f"| {r['case']} | {r['target']} ({r.get('device_kind')}) | {m.get('data')} x {m.get('model')} | {r['batch']} | "
        f"{r['optimizer'] or r['mode']} | {D[r['param_dtype']]}/{D[r['activation_dtype']]} | {net} | "
        f"{'yes' if r.get('compiles') else 'NO'} | {f(r.get('argument_gib'))} | {f(r.get('output_gib'))} | {f(r.get('alias_gib'))} | "
        f"{f(r.get('temp_gib'))} | {f(r.get('generated_code_gib'))} | **{f(r.get('peak_gib'))}** | {ref} | {f(r.get('compile_s'))} / {f(r.get('compile_cpu_s'))} |")
