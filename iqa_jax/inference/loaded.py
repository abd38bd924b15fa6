"""A loaded model and how it sees an image, from a training run folder (`load_run`); the
exported folder's loader (exported.py) gives the same `LoadedModel`."""
from __future__ import annotations

import dataclasses
from typing import Any

from iqa_jax.data import pp
from iqa_jax.data.records import mos_scale
from iqa_jax.models.model import create_model
from iqa_jax.runs import backbone, checkpoint
from iqa_jax.runs import folder as run_folder

VIEWS = ("resize", "crops")  # how a model looks at an image (scorer.Scorer.views)


@dataclasses.dataclass
class LoadedModel:
  """What a run folder or an exported folder gives: the model and how it sees an image."""
  model: Any                       # IQAModel
  params: dict
  pp_str: str                      # the run's pp string (the `resize` view)
  input_size: int                  # side of the square the model was trained on
  view: str = "resize"             # resize | crops
  crops: int = 3
  mos_scale: tuple[float, float] = (1.0, 0.0)  # mos = score * scale + offset (App. B inverse)
  info: dict = dataclasses.field(default_factory=dict)  # dataset, source folder, ...


def input_size(config, preprocessing: dict) -> int:
  """The square side the model was trained on: data.image_size, else the checkpoint's recipe."""
  return int(config.data.get("image_size") or preprocessing.get("crop")
             or preprocessing["size"])


def load_run(workdir: str, which: str = "best") -> LoadedModel:
  """A trained run folder -> LoadedModel (its config, base checkpoint and trained leaves).

  A head trained on a feature cache is scored under the backbone that made the features."""
  config = run_folder.read_config(workdir)  # the model the run was trained as, checked
  if config.data.get("features"):
    config, model, params, preprocessing = backbone.scoring_backbone(workdir, config)
  else:
    run_folder.check_base_checkpoint(workdir, config)  # against the frozen weights it started
    model, params, preprocessing = create_model(config)
  flat, _ = checkpoint.load_params(workdir, which)
  params = checkpoint.unflatten_into(params, flat)
  return LoadedModel(
      model=model, params=params, pp_str=pp.run_pp(config.data, preprocessing),
      input_size=input_size(config, preprocessing),
      view=config.data.get("test_view", "resize"), crops=int(config.data.get("test_crops", 3)),
      mos_scale=mos_scale(config.data),
      info={"dataset": config.data.name, "source": str(workdir), "config": config.to_dict(),
            "preprocessing": dict(preprocessing)})
