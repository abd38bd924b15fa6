"""bench --profile's reader: a traced program's time, by XLA op, joined to its HLO line."""
import json
import subprocess
import sys

PROGRAM = """
import json, sys
from iqa_jax.analysis import xprof
xprof.enable_traceme()  # before the backend starts
import jax, jax.numpy as jnp
f = jax.jit(lambda a, b: jnp.tanh(a @ b) + 1.0)
a = jnp.ones((768, 768)); b = jnp.ones((768, 768))
compiled = f.lower(a, b).compile()
compiled(a, b).block_until_ready()
pb = xprof.trace(lambda: compiled(a, b).block_until_ready(), 3, sys.argv[1])
rows, total = xprof.top_ops(pb, compiled.as_text(), 3, top=5)
by_source = xprof.top_ops(pb, compiled.as_text(), 3, top=5, by="source")[0]
print(json.dumps({"rows": rows, "total": total, "by_source": by_source}))
"""


def test_top_ops_puts_the_matmul_first_with_its_hlo_line(tmp_path):
  out = subprocess.run([sys.executable, "-c", PROGRAM, str(tmp_path / "trace")], check=True,
                       capture_output=True, text=True).stdout
  r = json.loads(out.strip().splitlines()[-1])
  top = r["rows"][0]
  # 2 * 768^3 = 0.9 GFLOP of matmul against 0.6 M elementwise ops: the dot has most of the time.
  assert "dot" in top["hlo"] and top["hlo"].startswith("f32[768,768]"), r["rows"]
  assert top["source"] == "dot_general"
  assert top["calls"] >= 1 and top["share"] > 0.5
  assert abs(sum(row["share"] for row in r["rows"]) - 1.0) < 1e-6  # all kernels are listed
  assert abs(sum(row["ms"] for row in r["rows"]) - r["total"]) < 1e-6 * r["total"]
  # By model source: the lambda's dot, then its tanh + add (one fusion named after the add).
  assert [row["source"] for row in r["by_source"]][:2] == ["dot_general", "add"], r["by_source"]


def test_short_source_numbers_layers_as_a_star():
  from iqa_jax.analysis.xprof import short_source
  assert short_source("transpose(jvp(IQAModel))/backbone/while/body/closed_call/"
                      "encoder_layers.step/encoder_layers/mlp/fc2/dot_general") == (
      "transpose(jvp(IQAModel))/backbone/encoder_layers/mlp/fc2/dot_general")
  assert short_source("IQAModel/backbone/encoder_layers_11/self_attn/reshape;jit(f)/x") == (
      "IQAModel/backbone/encoder_layers_*/self_attn/reshape")
