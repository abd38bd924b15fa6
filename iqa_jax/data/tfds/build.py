"""TFDS builders for the seven benchmarks, written as ArrayRecord so that training reads them with
grain and no TensorFlow (iqa_jax.data.tfds.source). Building needs TensorFlow: the `tfds` extra.

  python -m iqa_jax.data.tfds_build --dataset koniq10k --manual_dir /data/koniq10k \
      --data_dir ~/tensorflow_datasets [--option resolution=512x384] [--on_error skip]

Each builder reads the release folder through the dataset's adapter (one parser per dataset) and
writes one split, 'train', holding every record in the adapter's order (our seed splits stay
ours). Features: the image file's bytes as released, its path relative to the release folder,
the normalised and raw MOS (float64, as the adapter gives them) and the adapter's extras as JSON.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from tqdm.auto import tqdm

from iqa_jax import cli
from iqa_jax.data import datasets, koniq10k, pipeline, spaq
from iqa_jax.data.records import Record
from iqa_jax.data.tfds import source as tfds_source
from iqa_jax.data.tfds import variants
from iqa_jax.data.tfds.variants import describe_options  # noqa: F401 - callers know it here
from iqa_jax.version import __version__

FILE_FORMAT = "array_record"  # random access without TensorFlow (tfds.data_sources, grain)


class IqaConfig(tfds.core.BuilderConfig):
  """A variant of a release, named after the adapter options it fixes (e.g. resolution=512x384)."""

  def __init__(self, *, options: dict, **kwargs):
    super().__init__(**kwargs)
    self.options = options


def _configs(dataset: str) -> list[IqaConfig]:
  """The dataset's variants (tfds/variants.py) as builder configs."""
  return [IqaConfig(name=v.name, description=v.description, options=dict(v.options))
          for v in variants.variants_of(dataset)]


class IqaBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """What the seven builders share: features, the adapter call, ordered ArrayRecord output."""

  VERSION = tfds.core.Version(variants.VERSION)
  RELEASE_NOTES = variants.RELEASE_NOTES
  RELEASE_FILES: tuple[str, ...] = ()  # annotation files, fingerprinted into metadata.json

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS 4.9.10's own lookup imports importlib_resources, which it installs on Python < 3.9 only.
    return epath.Path(inspect.getfile(cls))

  def __init__(self, *, on_error: str = "raise", **kwargs):
    self._on_error = on_error
    kwargs.setdefault("file_format", FILE_FORMAT)
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=(self.__doc__ or "").strip(),
        features=tfds.features.FeaturesDict({
            # The file as released: no re-encoding, so pixels equal a decode of the file.
            "image": tfds.features.Tensor(shape=(), dtype=np.object_),
            "file_name": tfds.features.Text(),  # relative to the release folder
            # BYTES encoding keeps float64; tf.train.Example floats would round to float32.
            "mos": tfds.features.Tensor(shape=(), dtype=np.float64,
                                        encoding=tfds.features.Encoding.BYTES),
            "raw_mos": tfds.features.Tensor(shape=(), dtype=np.float64,
                                            encoding=tfds.features.Encoding.BYTES),
            "extras": tfds.features.Text(),  # Record.extras as JSON (row, std, ref_img, prompt...)
            "index": tfds.features.Scalar(np.int64),  # position in the adapter's order
        }),
        homepage=self.HOMEPAGE,
        disable_shuffling=True,  # rows in the adapter's order, so seed splits match the files
        metadata=tfds.core.MetadataDict(),
    )

  def _options(self) -> dict:
    return dict(self.builder_config.options) if self.builder_config else {}

  def _split_generators(self, dl_manager):
    root = Path(dl_manager.manual_dir)
    records = datasets.get_adapter(self.name)(str(root), **self._options())
    print(f"{self.name}: checking {len(records)} images (each decoded once, as training from "
          "the files does) ...", flush=True)
    records, skipped = pipeline.check_records(records, on_error=self._on_error)
    if not records:
      raise ValueError(f"{self.name}: no usable records in {root}.")
    self.info.metadata.update({
        "dataset": self.name, "options": self._options(), "iqa_jax": __version__,
        "release_files": tfds_source.release_fingerprint(root, self.RELEASE_FILES),
        "skipped": [[os.path.relpath(p, root), why] for p, why in skipped],
    })
    return {tfds_source.SPLIT: self._generate_examples(root, records)}

  def _generate_examples(self, root: Path, records: list[Record]):
    bar = tqdm(records, desc=f"{self.name}: writing", unit="img", dynamic_ncols=True,
               file=sys.stderr)
    for i, r in enumerate(bar):
      # Integer keys: with disable_shuffling TFDS writes in key order, i.e. the adapter's.
      yield i, {"image": Path(r.path).read_bytes(), "file_name": os.path.relpath(r.path, root),
                "mos": np.float64(r.mos), "raw_mos": np.float64(r.raw_mos),
                "extras": json.dumps(r.extras), "index": i}


def _instructions(archives: str, layout: str) -> str:
  return (f"Download {archives} (see docs/datasets.md), unpack so that --manual_dir holds "
          f"{layout}, then run python -m iqa_jax.data.tfds_build --dataset NAME --manual_dir DIR.")


class Clive(IqaBuilder):
  """LIVE In the Wild Image Quality Challenge (CLIVE): 1162 photos, MOS / 100."""

  name = "clive"
  HOMEPAGE = "https://live.ece.utexas.edu/research/ChallengeDB/index.html"
  MANUAL_DOWNLOAD_INSTRUCTIONS = _instructions(
      "ChallengeDB_release.zip", "Data/AllImages_release.mat, Data/AllMOS_release.mat, Images/")
  BUILDER_CONFIGS = _configs("clive")
  RELEASE_FILES = ("Data/AllImages_release.mat", "Data/AllMOS_release.mat",
                   "Data/AllStdDev_release.mat")


class Koniq10k(IqaBuilder):
  """KonIQ-10k: 10073 photos, MOS (1-5) / 5."""

  name = "koniq10k"
  HOMEPAGE = "https://database.mmsp-kn.de/koniq-10k-database.html"
  MANUAL_DOWNLOAD_INSTRUCTIONS = _instructions(
      "koniq10k_scores_and_distributions.zip and koniq10k_1024x768.zip (or _512x384.zip)",
      f"{koniq10k.TABLE} and 1024x768/ (or 512x384/)")
  BUILDER_CONFIGS = _configs("koniq10k")
  RELEASE_FILES = (koniq10k.TABLE,)


class Kadid10k(IqaBuilder):
  """KADID-10k: 81 references x 25 distortions x 5 levels, (DMOS - 1) / 4."""

  name = "kadid10k"
  HOMEPAGE = "https://database.mmsp-kn.de/kadid-10k-database.html"
  MANUAL_DOWNLOAD_INSTRUCTIONS = _instructions("kadid10k.zip", "dmos.csv and images/")
  RELEASE_FILES = ("dmos.csv",)


class Flive(IqaBuilder):
  """FLIVE (PaQ-2-PiQ / LIVE-FB) whole-image labels, mos / 100."""

  name = "flive"
  HOMEPAGE = "https://github.com/baidut/PaQ-2-PiQ"
  MANUAL_DOWNLOAD_INSTRUCTIONS = _instructions("the PaQ-2-PiQ database",
                                               "labels_image.csv and database/")
  RELEASE_FILES = ("labels_image.csv",)


class Spaq(IqaBuilder):
  """SPAQ: 11125 smartphone photos, MOS / 100, five attribute scores."""

  name = "spaq"
  HOMEPAGE = "https://github.com/h4nwei/SPAQ"
  MANUAL_DOWNLOAD_INSTRUCTIONS = _instructions("the SPAQ images and annotations",
                                               f"'{spaq.TABLE}' and TestImage/")
  RELEASE_FILES = (spaq.TABLE,)


class Agiqa3k(IqaBuilder):
  """AGIQA-3K: 2982 AI-generated images, mos_quality / 5 (or mos_align / 5)."""

  name = "agiqa3k"
  HOMEPAGE = "https://github.com/lcysyzxdxc/AGIQA-3k-Database"
  MANUAL_DOWNLOAD_INSTRUCTIONS = _instructions("data.csv and file.zip", "data.csv and file/")
  BUILDER_CONFIGS = _configs("agiqa3k")
  RELEASE_FILES = ("data.csv",)


class Agiqa1k(IqaBuilder):
  """AGIQA-1K: 1080 AI-generated images, MOS / 5."""

  name = "agiqa1k"
  HOMEPAGE = "https://github.com/lcysyzxdxc/AGIQA-1k-Database"
  MANUAL_DOWNLOAD_INSTRUCTIONS = _instructions("AIGC_MOS_Zscore.xlsx and file.zip",
                                               "AIGC_MOS_Zscore.xlsx and file/")
  RELEASE_FILES = ("AIGC_MOS_Zscore.xlsx",)


BUILDERS: dict[str, type[IqaBuilder]] = {
    b.name: b for b in (Clive, Koniq10k, Kadid10k, Flive, Spaq, Agiqa3k, Agiqa1k)}


def find_config(name: str, options: dict) -> IqaConfig | None:
  """The builder config whose options `options` asks for (None: the dataset has no variants)."""
  variant = variants.find_variant(name, options)
  return None if variant is None else next(
      c for c in builder_class(name).BUILDER_CONFIGS if c.name == variant.name)


def builder_class(name: str) -> type[IqaBuilder]:
  if name not in BUILDERS:
    raise ValueError(f"No TFDS builder for dataset {name!r}; known: {', '.join(BUILDERS)} "
                     "(other datasets: --config.data.source=files).")
  return BUILDERS[name]


def build(name: str, manual_dir: str, data_dir: str, options: dict | None = None,
          on_error: str = "raise") -> Path:
  """Builds one dataset variant (or reuses a build of the same release); returns its folder."""
  config = find_config(name, options or {})
  if not Path(manual_dir).expanduser().is_dir():
    raise ValueError(f"--manual_dir {manual_dir} is not a folder; point it at the unpacked "
                     f"{name} release ({datasets.DOCS}).")
  tfds.disable_progress_bar()  # ours counts images with img/s and an ETA
  builder = builder_class(name)(data_dir=str(Path(data_dir).expanduser()), config=config,
                                on_error=on_error)
  folder = Path(builder.data_path)
  if (folder / "dataset_info.json").is_file():  # reused as it is, so it must be this release's
    tfds_source.check_release(str(folder), manual_dir)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=str(Path(manual_dir).expanduser().resolve())))
  return folder


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m iqa_jax.data.tfds_build",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--dataset", required=True, help=", ".join(BUILDERS))
  parser.add_argument("--manual-dir", "--manual_dir", dest="manual_dir", required=True,
                      help="the unpacked official release")
  parser.add_argument("--data-dir", "--data_dir", dest="data_dir",
                      default=os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"),
                      help="TFDS data dir the build goes to (default: $TFDS_DATA_DIR or "
                      "~/tensorflow_datasets)")
  parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                      help="adapter option picking the variant, e.g. resolution=512x384")
  parser.add_argument("--on-error", "--on_error", dest="on_error", default="raise",
                      choices=("raise", "skip"),
                      help="skip: leave unreadable images out, listed in metadata.json")
  args = parser.parse_args(argv)
  t0 = time.time()
  try:
    bad = [o for o in args.option if "=" not in o]
    if bad:
      raise ValueError(f"--option {bad[0]!r}: write KEY=VALUE, e.g. --option resolution=512x384")
    options = dict(o.split("=", 1) for o in args.option)
    folder = build(args.dataset, args.manual_dir, args.data_dir, options, args.on_error)
  except ValueError as e:  # also the adapters' and check_records' errors, which name the row
    print(f"error: {e}", file=sys.stderr)
    return 2
  info = json.loads((folder / "dataset_info.json").read_text())
  n = sum(int(x) for s in info["splits"] for x in s["shardLengths"])
  skipped = json.loads((folder / "metadata.json").read_text()).get("skipped", [])
  print(f"{args.dataset}: {n} images ({len(skipped)} skipped) in {folder} "
        f"({time.time() - t0:.1f} s)")
  return 0


if __name__ == "__main__":
  cli.run(main)
