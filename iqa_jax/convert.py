"""Convert another code base's checkpoint into an exported model folder (the iqa_jax.export format):

python -m iqa_jax.convert official --checkpoint DIR [--base FOLDER_OR_HUB_ID] --out MODEL_DIR
                                   [--resume-state FILE] [--dtype float32|bfloat16]

`official`: a folder saved by the paper's official train.py (drkkgy/NR_IQA_AGM: peft's
adapter_config.json + adapter_model.safetensors, and mlp.pt). The base is --base, else the
adapter's base_model_name_or_path (a local folder or a hub id already in the HF cache). Then
`python -m iqa_jax.score --model MODEL_DIR ...` or `Scorer.from_pretrained(MODEL_DIR)`.
"""
from __future__ import annotations

import argparse
import sys

from iqa_jax import cli
from iqa_jax.defaults import OneLineParser
from iqa_jax.inference import official


def main(argv=None) -> int:
  ap = OneLineParser(prog="python -m iqa_jax.convert", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = ap.add_subparsers(dest="source", required=True, parser_class=OneLineParser)
  o = sub.add_parser("official", help="a checkpoint folder of the official NR_IQA_AGM train.py")
  o.add_argument("--checkpoint", required=True, help="folder with adapter_config.json, mlp.pt")
  o.add_argument("--base", default=None, help="SiglipModel folder or cached hub id (default: "
                 "the adapter's base_model_name_or_path)")
  o.add_argument("--out", required=True, help="folder to write (replaced if an earlier export)")
  o.add_argument("--resume-state", default=None,
                 help="the official resume_state/<stage>_latest.pt: its trained backbone, LoRA "
                 "and head (last epoch) replace the folder's")
  o.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                 help="backbone weights' dtype (head and gates stay float32)")
  a = ap.parse_args(argv)
  try:
    out = official.convert_official(a.checkpoint, a.out, base=a.base, dtype=a.dtype,
                                    resume_state=a.resume_state,
                                    log=lambda msg: print(msg, file=sys.stderr))
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"converted {a.checkpoint} -> {out}")
  return 0


if __name__ == "__main__":
  cli.run(main)
