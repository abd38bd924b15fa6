"""What a TFDS build of tfds/build.py is, as data: the builders' version and each dataset's
variants (the adapter options a build fixes). tfds/source.py finds and checks a build from
these without tensorflow_datasets; tfds/build.py makes its builder configs from them."""
from __future__ import annotations

import dataclasses

from iqa_jax.data import koniq10k

VERSION = "1.0.0"
RELEASE_NOTES = {"1.0.0": "Image bytes as released, mos/raw_mos float64, extras as JSON."}


@dataclasses.dataclass(frozen=True)
class Variant:
  name: str          # the builder config's name: the build's folder under the dataset's
  description: str
  options: dict      # the adapter options it fixes, e.g. {"resolution": "512x384"}


VARIANTS: dict[str, tuple[Variant, ...]] = {
    "clive": (Variant("default", "The 7 practice images dropped.", {"drop_practice": True}),
              Variant("with_practice", "All 1169 entries.", {"drop_practice": False})),
    "koniq10k": tuple(Variant(res, f"Images from {res}/.", {"resolution": res})
                      for res in koniq10k.RESOLUTIONS),
    "kadid10k": (),
    "flive": (),
    "spaq": (),
    "agiqa3k": (Variant("quality", "mos_quality / 5 (App. B).", {"target": "quality"}),
                Variant("align", "mos_align / 5.", {"target": "align"})),
    "agiqa1k": (),
}


def variants_of(name: str) -> tuple[Variant, ...]:
  if name not in VARIANTS:
    raise ValueError(f"No TFDS builder for dataset {name!r}; known: {', '.join(VARIANTS)} "
                     "(other datasets: --config.data.source=files).")
  return VARIANTS[name]


def find_variant(name: str, options: dict) -> Variant | None:
  """The variant whose options `options` asks for (None: the dataset has no variants)."""
  variants = variants_of(name)
  if not variants:
    return None
  for variant in variants:
    # Text from --option or typed from the config: 'false' and False both pick drop_practice=False.
    if all(str(options.get(k, v)).lower() == str(v).lower() for k, v in variant.options.items()):
      return variant
  asked = {k: options.get(k) for k in variants[0].options}
  known = ", ".join(describe_options(v.options) for v in variants)
  raise ValueError(f"{name}: no TFDS variant for {describe_options(asked)}; known: {known}.")


def describe_options(options: dict) -> str:
  return ",".join(f"{k}={v}" for k, v in options.items()) or "(no options)"
