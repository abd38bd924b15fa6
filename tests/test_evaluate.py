"""evaluate's command line: one flag style with the old spellings, and its user mistakes."""
import shutil

import pytest

from iqa_jax import evaluate as evaluate_cli  # the command


def test_old_and_new_flag_spellings_parse_alike(trained_run, tiny_demo_dir, tmp_path):
  """Issue 23 item 12: --batch-size beside --on_error/--data_dir; now dashes, both accepted.
  The same run on the same images: bit-identical metrics (one program, one host)."""
  _, workdir, _ = trained_run
  runs = {}
  for style, flags in (("new", ["--data-dir", "--batch-size", "--on-error"]),
                       ("old", ["--data_dir", "--batch_size", "--on_error"])):
    out = tmp_path / style
    argv = ["--workdir", str(workdir), "--dataset", "demo", flags[0], str(tiny_demo_dir),
            flags[1], "16", flags[2], "skip", "--out", str(out)]
    assert evaluate_cli.main(argv) == 0
    runs[style] = (out / "eval_demo.csv").read_text()
  assert runs["new"] == runs["old"]


def test_a_mistyped_demo_folder_is_refused_not_built(trained_run, tmp_path, capsys):
  """Issue 23 item 12: `--dataset demo` with a mistyped folder built 11,200 images there."""
  _, workdir, _ = trained_run
  typo = tmp_path / "demo_dta"
  assert evaluate_cli.main(["--workdir", str(workdir), "--dataset", "demo", "--data-dir",
                        str(typo)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and f"--data-dir {typo} holds no demo set" in err[0]
  assert not typo.exists()


def test_an_export_folder_as_workdir_is_one_line(trained_run, tiny_demo_dir, tmp_path, capsys):
  """Issue 23 item 9: an exported model's config.json was read as a run config (traceback)."""
  from iqa_jax.inference import exported as export
  _, workdir, _ = trained_run
  model = export.export_run(str(workdir), str(tmp_path / "model"))
  assert evaluate_cli.main(["--workdir", str(model), "--dataset", "demo", "--data-dir",
                        str(tiny_demo_dir)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "is an exported model, not a run folder" in err[0]
  assert f"iqa_jax.score --model {model}" in err[0]


def test_a_run_without_a_best_checkpoint_points_to_which_last(trained_run, tiny_demo_dir,
                                                                tmp_path, capsys):
  """Issue 23 item 11: "train first" when the run holds ckpt/last (all-NaN validation)."""
  _, workdir, _ = trained_run
  run = tmp_path / "run"
  shutil.copytree(workdir, run)
  shutil.rmtree(run / "ckpt" / "best")
  argv = ["--workdir", str(run), "--dataset", "demo", "--data-dir", str(tiny_demo_dir),
          "--out", str(tmp_path / "e")]
  assert evaluate_cli.main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "pass --which last" in err[0] and "train first" not in err[0]
  assert evaluate_cli.main(argv + ["--which", "last"]) == 0


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_names_the_demo_rule(flag, capsys):
  with pytest.raises(SystemExit) as e:
    evaluate_cli.main([flag])
  assert e.value.code == 0
  assert "it is not built here" in " ".join(capsys.readouterr().out.split())
