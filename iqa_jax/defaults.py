"""The paper's training recipe as one base config; files in configs/ change only what differs."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "iqa"
  c.seed = 8  # App. B: seeds 8, 19, 25

  c.model = ml_collections.ConfigDict()
  c.model.backbone = "siglip"
  c.model.init = "google/siglip2-so400m-patch16-512"  # local folder or cached hub id; None: random
  c.model.variant = "so400m/16@512"  # architecture when init is None ...
  c.model.arch = ml_collections.ConfigDict()  # ... with these fields overridden (tiny towers)
  c.model.head = "gated"  # baseline | sigmoid | gated | agm | relu | "act1,act2"
  c.model.head_hidden = 512
  c.model.finetune = "lora"  # frozen | lora | full | lora_full (LoRA + every backbone weight)
  c.model.lora = ml_collections.ConfigDict({"rank": 4, "alpha": 8.0, "dropout": 0.05})  # §3.1
  c.model.dtype = "bfloat16"  # backbone compute; head, LoRA and gates stay float32 (App. B.1)
  c.model.remat = "nothing"  # none | nothing | dots | everything (per encoder block)
  c.model.scan = True
  c.model.scan_unroll = "auto"  # auto (unrolled to train on CPU without remat) | loop | full
  c.model.attention = "auto"  # auto (cuDNN on GPU, heads_major on CPU) | xla | cudnn | heads_major
  c.model.param_dtype = "float32"  # frozen backbone weights stored in this dtype (bfloat16: half)

  # Analyses (Table 4, Table S3; docs: README "Analyses"). Defaults leave the paper's head as is.
  c.model.feature_keep_percentile = 100.0  # keep the top k% of |feature| per image (Table 4)
  c.model.input_dropout = 0.0  # dropout rate 1 - k on the backbone feature (Table S3)
  c.model.head_dropout = 0.0  # dropout rate 1 - k after each hidden activation (Table S3)

  c.data = ml_collections.ConfigDict()
  c.data.name = "koniq10k"
  c.data.dir = ""
  c.data.split = "random"  # random | content (by reference image / prompt)
  c.data.val_fraction = 0.2  # App. B: 80/20
  c.data.test_fraction = 0.0
  c.data.image_size = 512  # §3.1: images resized to 512
  c.data.pp = ""  # empty: the checkpoint's native recipe at image_size
  c.data.normalize_on_device = True  # batches stay uint8; the model normalises (4x fewer bytes)
  c.data.workers = 0
  c.data.on_error = "raise"  # raise | skip
  c.data.cache = ""
  # TFDS (iqa_jax.data.tfds.source): "files" reads the release folder, "tfds" an ArrayRecord build
  # of python -m iqa_jax.data.tfds_build; tfds_dir "" is $TFDS_DATA_DIR or ~/tensorflow_datasets.
  c.data.source = "files"  # files | tfds
  c.data.tfds_dir = ""
  c.data.features = ""  # a feature cache (python -m iqa_jax.features): train the head alone
  # How a model looks at an image at test time (score, evaluate, Scorer, exported models):
  # resize (the paper's recipe, §3.1) or test_crops crops of image_size at native resolution.
  c.data.test_view = "resize"
  c.data.test_crops = 3
  # Adapter options; each adapter ignores those it does not use (docs/datasets.md).
  c.data.options = ml_collections.ConfigDict({
      "resolution": "1024x768",  # KonIQ-10k: 1024x768 or 512x384
      "target": "quality",  # AGIQA-3K: quality or align
      "image_dir": "",  # override an adapter's image folder
      "drop_practice": True,  # CLIVE: drop the 7 practice images
      "distortions": "",  # demo: a subset of distortion types, e.g. "gaussian_blur,jpeg"
      "koniq_mos_divisor": 5.0,  # KonIQ-10k: mos = MOS / this (App. B; the official code: 100)
      "mos_range": "",  # csv: "LO,HI", the scale of the mos column (e.g. "1,5"); "": in [0, 1]
  })

  c.optim = ml_collections.ConfigDict()
  c.optim.epochs = 30
  c.optim.batch_size = 12  # App. B.1: physical batch 2 x accumulation 6
  c.optim.grad_accum = 6
  c.optim.lr = 1e-4
  c.optim.backbone_lr = 5e-6
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.schedule = "auto"  # auto: constant on CLIVE / AGIQA, multistep on the large four (§3.1)
  c.optim.milestones = (15, 25)
  c.optim.gamma = 0.2

  c.loss = ml_collections.ConfigDict()
  c.loss.margin_lambda = 0.25  # Eq. 1
  c.loss.margin_weight = 1.0
  # eq1 (Eq. 1) | official (util.margin_loss of the official code: std with ddof 0, tied pairs
  # skipped) | official_swapped (that function as its train.py calls it, margin_loss(pred, mos)).
  c.loss.margin_form = "eq1"

  c.eval_batch_size = 32
  c.log_grad_norm = False
  # Also keep the trainable params after every epoch in ckpt/epochs/<n> (Grad-CAM over training,
  # Figure S6: `python -m iqa_jax.explain gradcam --over-training`); off: runs keep last and best.
  c.keep_epoch_checkpoints = False
  c.progress = True

  # Devices (docs/parallel.md): the global batch optim.batch_size is split over all devices.
  c.parallel = "sharded"  # sharded (jit with in/out shardings) | pmap (pmap + lax.pmean of grads)
  c.distributed = False  # jax.distributed.initialize() first (multi-host; or IQA_JAX_DISTRIBUTED=1)
  c.donate = True  # the train step reuses the old state's buffers
  c.prefetch = 2  # batches copied to the devices ahead of the running step (0: on demand)
  c.compilation_cache = ""  # persistent XLA compilation cache folder ("" off)
  # The dense dots' kernels on a CPU (iqa_jax/xla_cpu.py): auto (onednn from ViT-S size up,
  # else eigen; $IQA_JAX_CPU_DOTS) | eigen | onednn | ynnpack (XLA's default). Scores differ by
  # float32 rounding only.
  c.cpu_dots = "auto"
  return c


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _typed(key: str, text: str, default):
  """text -> a value of the default's type (a None default takes the text as is)."""
  if isinstance(default, bool):  # before int: bool is an int
    if text.lower() in _TRUE + _FALSE:
      return text.lower() in _TRUE
    raise ValueError(f"config argument {key}={text!r}: expected true or false")
  for kind in (int, float):
    if isinstance(default, kind):
      try:
        return kind(text)
      except ValueError:
        raise ValueError(f"config argument {key}={text!r}: expected {kind.__name__}") from None
  return text


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """'head=sigmoid,epochs=6' -> {head: 'sigmoid', epochs: 6, <other defaults>} (big_vision's
  config args): every value typed like its default; an argument with no default is an error
  naming the allowed ones, so a misspelt `:lrr=5` never goes unnoticed."""
  values = dict(defaults)
  for kv in (arg or "").split(","):
    if not kv:
      continue
    key, sep, text = kv.partition("=")
    if not sep:
      raise ValueError(f"config argument {kv!r} in {arg!r} is not KEY=VALUE")
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r} in {arg!r}; allowed: "
                       f"{', '.join(sorted(defaults))}")
    values[key] = _typed(key, text, defaults[key])
  return ml_collections.ConfigDict(values, type_safe=False)


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """'configs/x.py:arg' -> that file's get_config(arg), as `--config` of train.py reads it."""
  import importlib.util
  path, _, arg = str(spec).partition(":")
  module_spec = importlib.util.spec_from_file_location("iqa_jax_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def flag_error(e: Exception) -> str:
  """absl/config_flags wrap a config file's error in a multi-line traceback; its last line is
  the one that says what is wrong (e.g. the unknown config argument)."""
  lines = [line.strip() for line in str(e).splitlines() if line.strip()]
  return lines[-1] if lines else type(e).__name__


def help_requested(argv: Sequence[str]) -> bool:
  """-h, --help or --helpfull among the arguments: the absl CLIs print their flags and exit 0
  (absl's own --help exits 1)."""
  return bool({"-h", "--help", "--helpfull"} & set(argv))


def parse_absl_flags(fv, argv: Sequence[str], doc: str) -> int | None:
  """The start of the absl CLIs (train, features, experiments): -h/--help prints `doc` and the
  flags (-> 0); a bad flag or config argument is one line (-> 2); None once `fv` is parsed."""
  from absl import flags
  if help_requested(argv):
    print(doc + "\n" + fv.get_help())
    return 0
  try:
    fv(argv)
  except flags.Error as e:
    print(f"error: {flag_error(e)}", file=sys.stderr)
    return 2
  return None


class OneLineParser(argparse.ArgumentParser):
  """argparse for our CLIs: a flag mistake is one line naming it and exit 2, no usage dump."""

  def error(self, message):
    print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
    sys.exit(2)
