"""``align submit`` without SLURM: the allocation checks, the rendering of ``slurm/train.sbatch``, ``--dry_run``,
and ``--job translate`` (``slurm/translate.sbatch`` as an array job and its merge).

The checks run on configs parsed by the real ``align fit`` parser
(``parse_config``) over shards built on the fly; the rendered scripts are
syntax-checked with ``bash -n``. Submitting for real is the cluster tier's job
(``tests/cluster/test_train_job.py``).
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch

from alignment.cli import main
from alignment.commands.fit import parse_config
from alignment.commands.slurm import MARKER, Allocation, render, time_limit_seconds
from alignment.commands.submit import REPO_TEMPLATE, check_allocation
from tests import _training as T

SCRIPTS = [T.REPO / "slurm" / name for name in ("train.sbatch", "shards.sbatch", "eval.sbatch", "translate.sbatch")]


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["align"])  # LightningCLI compares its args with sys.argv


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return T.make_corpus(tmp_path_factory.mktemp("corpus"), rows=120, rows_per_shard=20)  # 6 training shards


def _config(corpus, *overrides):
    return parse_config(["--config", str(T.DEBUG_YAML), "--data.train_shards", str(corpus.shards),
                         "--data.tokenizer", str(corpus.tokenizer), *overrides])


# ---------------------------------------------------------------------------- allocation


@pytest.mark.parametrize("text,seconds", [("30", 1800), ("30:15", 1815), ("04:00:00", 14400), ("1-12", 129600),
                                          ("1-12:30", 131400), ("2-00:00:10", 172810)])
def test_time_limits_in_every_slurm_format(text, seconds):
    assert time_limit_seconds(text) == seconds


@pytest.mark.parametrize("text", ["", "4h", "1:2:3:4", "0", "-5"])
def test_bad_time_limits_name_the_flag(text):
    with pytest.raises(ValueError, match="--time"):
        time_limit_seconds(text)


def test_allocation_defaults_and_errors():
    assert Allocation(gpus_per_node=8).tasks_per_node == 8  # one task per GPU
    assert Allocation(gpus_per_node=0).tasks_per_node == 1
    assert Allocation(nodes=4, gpus_per_node=8).world_size == 32
    with pytest.raises(ValueError, match="--signal_lead 300 s is not shorter than --time 5 "):
        Allocation(time="5")
    with pytest.raises(ValueError, match="--nodes must be >= 1"):
        Allocation(nodes=0)
    with pytest.raises(ValueError, match="--sbatch_arg must be one long sbatch option"):
        Allocation(extra=["-p gpu"])


# ---------------------------------------------------------------------------- checks


def test_a_matching_config_has_no_problems(corpus):
    config = _config(corpus, "--trainer.num_nodes", "2")
    assert check_allocation(config, Allocation(nodes=2, gpus_per_node=0)) == []


def test_every_mismatch_is_reported_with_its_fix(corpus):
    config = _config(corpus, "--trainer.accelerator", "cpu", "--data.num_workers", "2",
                     "--checkpoint.dirpath", "null")
    problems = check_allocation(config, Allocation(nodes=2, gpus_per_node=4))
    text = "\n".join(problems)
    assert "--nodes 2 but the config's trainer.num_nodes is 1: add `-- --trainer.num_nodes 2`" in text
    assert "4 task(s) per node but the config's trainer.devices is 1" in text and "--trainer.devices 4" in text
    assert "--gpus_per_node 4 requests GPUs for a run with trainer.accelerator cpu" in text
    # 6 shards for 2 nodes x 4 tasks x 2 workers
    assert "has 6 shard(s) but a finite epoch needs one per reader: 2 node(s) x 4 task(s) x 2 worker(s) = 16" in text
    # an unset --checkpoint.dirpath is no longer a problem: it derives from the run folder (alignment/runs.py)
    assert config.checkpoint.dirpath.endswith("runs/debug/checkpoints")
    assert len(problems) == 4


def test_gpu_runs_need_one_task_per_gpu_and_gpus(corpus):
    config = _config(corpus, "--trainer.accelerator", "gpu", "--trainer.devices", "auto", "--trainer.num_nodes", "2")
    assert check_allocation(config, Allocation(nodes=2, gpus_per_node=2)) == []  # auto: the task's 2 GPUs
    problems = check_allocation(config, Allocation(nodes=2, gpus_per_node=2, tasks_per_node=1))
    assert any("Lightning needs one task per GPU" in p for p in problems)
    problems = check_allocation(config, Allocation(nodes=2, gpus_per_node=0, tasks_per_node=2))
    assert any("trainer.accelerator gpu but --gpus_per_node 0" in p for p in problems)


def test_resampled_streams_and_global_batch_and_validation_shards(corpus):
    config = _config(corpus, "--data.resampled", "true", "--data.steps_per_epoch", "10",
                     "--data.num_workers", "4", "--trainer.devices", "2")
    assert check_allocation(config, Allocation(gpus_per_node=0, tasks_per_node=2)) == []  # no per-reader limit
    config = _config(corpus, "--data.batch_size", "1")
    assert any("global batch of 1 row" in p for p in check_allocation(config, Allocation(gpus_per_node=0)))
    config = _config(corpus, "--data.val_shards", str(corpus.shards), "--trainer.num_nodes", "2")
    assert any("val_shards has 1 shard(s) for 2 ranks" in p
               for p in check_allocation(config, Allocation(nodes=2, gpus_per_node=0)))
    config = _config(corpus, "--data.train_shards", str(corpus.shards / "nothing-*.tar"))
    assert any("--data.train_shards:" in p and "matches no shard files" in p
               for p in check_allocation(config, Allocation(gpus_per_node=0)))


# ---------------------------------------------------------------------------- rendering


def _bash_syntax_ok(path):
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("path", [*SCRIPTS, T.REPO / "launch" / "local.sh"], ids=lambda p: p.name)
def test_shipped_scripts_parse_and_name_no_site_paths(path):
    _bash_syntax_ok(path)
    text = path.read_text()
    for site in ("/home/", "/scratch/", "/work/", "/gpfs/", "/lustre/"):
        assert site not in text.replace("/path/to/", ""), f"{path.name} bakes in a site path {site}"


def test_render_fills_the_template(tmp_path):
    alloc = Allocation(nodes=4, gpus_per_node=8, time="1-00:00:00", partition="gpu", account="proj",
                       cpus_per_task=12, signal_lead=600, job_name="align-labse", extra=["--constraint=a100"])
    script = render(REPO_TEMPLATE.read_text(), alloc, configs=["/cfg/a.yaml", "/cfg/b c.yaml"],
                    fit_args=["--trainer.max_steps", "100", "--data.train_shards", "/data/x y"],
                    log_dir="/runs/r/slurm", workdir="/repo", setup="source /env/bin/activate")
    sbatch = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    for expected in ("--job-name=align-labse", "--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8",
                     "--time=1-00:00:00", "--signal=B:USR1@600", "--requeue", "--open-mode=append",
                     "--output=/runs/r/slurm/%x-%j.out", "--chdir=/repo", "--partition=gpu", "--account=proj",
                     "--cpus-per-task=12", "--constraint=a100"):
        assert f"#SBATCH {expected}" in sbatch, expected
    assert len(sbatch) == 14  # each value once: nothing left from the template's defaults
    assert "export ALIGN_CONFIG=/cfg/a.yaml" in script
    assert "export ALIGN_SETUP='source /env/bin/activate'" in script
    assert """set -- --config '/cfg/b c.yaml' --trainer.max_steps 100 --data.train_shards '/data/x y' "$@\"""" in script
    # every #SBATCH line comes before the first command, or sbatch ignores it
    lines = script.splitlines()
    first_command = next(i for i, line in enumerate(lines) if line and not line.startswith("#"))
    assert all(i < first_command for i, line in enumerate(lines) if line.startswith("#SBATCH"))
    path = tmp_path / "rendered.sbatch"
    path.write_text(script)
    _bash_syntax_ok(path)


def test_render_drops_gpus_for_cpu_nodes_and_refuses_other_templates():
    script = render(REPO_TEMPLATE.read_text(), Allocation(gpus_per_node=0), configs=["/c.yaml"], fit_args=[],
                    log_dir="/l", workdir="/w")
    assert not [line for line in script.splitlines() if line.startswith("#SBATCH --gpus-per-node")]
    assert "\nset -- " not in script
    with pytest.raises(ValueError, match=f"no `{MARKER}` line"):
        render("#!/bin/bash\n#SBATCH --nodes=1\n", Allocation(), configs=["/c.yaml"], fit_args=[], log_dir="/l",
               workdir="/w")
    without_time = "\n".join(line for line in REPO_TEMPLATE.read_text().splitlines() if "--time" not in line)
    with pytest.raises(ValueError, match="no #SBATCH line for --time"):
        render(without_time, Allocation(), configs=["/c.yaml"], fit_args=[], log_dir="/l", workdir="/w")


# ---------------------------------------------------------------------------- the command


def test_dry_run_prints_the_checked_script_and_writes_nothing(corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc = main(["submit", "--fit_config", str(T.DEBUG_YAML), "--nodes", "2", "--gpus_per_node", "0", "--time", "30",
               "--dry_run", "--", "--trainer.num_nodes", "2", "--data.train_shards", str(corpus.shards)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert out.startswith("#!/usr/bin/env bash") and "#SBATCH --nodes=2" in out
    assert f"#SBATCH --output={tmp_path}/runs/debug/slurm/%x-%j.out" in out
    assert "global batch: 16 rows/rank x 2 = 32 rows" in err
    assert not (tmp_path / "runs").exists()


def test_mismatches_exit_2_before_anything_is_submitted(corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc = main(["submit", "--fit_config", str(T.DEBUG_YAML), "--nodes", "2", "--gpus_per_node", "0",
               "--", "--data.train_shards", str(corpus.shards)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "align submit: error: --nodes 2 but the config's trainer.num_nodes is 1" in err
    assert "1 problem(s); nothing submitted" in err
    assert not (tmp_path / "runs").exists()


def test_missing_template_config_and_sbatch_are_clear_errors(corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["submit", "--fit_config", str(T.DEBUG_YAML), "--template", "nowhere.sbatch", "--dry_run"]) == 2
    assert "sbatch template nowhere.sbatch not found: pass --template PATH" in capsys.readouterr().err
    assert main(["submit", "--fit_config", "missing.yaml", "--dry_run"]) == 2
    assert "--fit_config missing.yaml: no such file" in capsys.readouterr().err
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    if shutil.which("sbatch") is None:
        rc = main(["submit", "--fit_config", str(T.DEBUG_YAML), "--gpus_per_node", "0", "--time", "30",
                   "--", "--data.train_shards", str(corpus.shards)])
        assert rc == 2 and "sbatch not found on PATH" in capsys.readouterr().err


# ---------------------------------------------------------------------------- --job translate


def _split_translate(out):
    array, merge = out.split("# ---- merge job: sbatch --dependency=afterok:<array job> --kill-on-invalid-dep=yes ----\n")
    return array, merge


def _sbatch_lines(script):
    return [line for line in script.splitlines() if line.startswith("#SBATCH")]


def test_translate_dry_run_renders_the_array_and_its_merge(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "news.en.txt").write_text("Hello.\n")
    rc = main(["submit", "--job", "translate", "--array_tasks", "3", "--gpus_per_node", "1", "--cpus_per_task", "4",
               "--time", "2:00:00", "--partition", "gpu", "--account", "proj", "--sbatch_arg=--mem=8G", "--dry_run",
               "--", "news.en.txt", "--model", "/models/nllb", "--targets", "de,fr", "--out", "syn x",
               "--generate.beams", "2"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    array, merge = _split_translate(out)
    logs = tmp_path / "logs"
    common = ["--job-name=align-translate", "--nodes=1", "--ntasks-per-node=1", "--time=2:00:00",
              "--open-mode=append", f"--chdir={tmp_path}", "--partition=gpu", "--account=proj"]
    assert sorted(_sbatch_lines(array)) == sorted(f"#SBATCH {v}" for v in [
        *common, "--gpus-per-node=1", f"--output={logs}/%x-%A_%a.out", "--array=0-2", "--cpus-per-task=4",
        "--mem=8G"])
    assert sorted(_sbatch_lines(merge)) == sorted(f"#SBATCH {v}" for v in [  # no GPU, no array, one CPU
        *common, f"--output={logs}/%x-%j.out", "--cpus-per-task=1", "--mem=8G"])
    assert "export TRANSLATE_STAGE=run\nexport TRANSLATE_TASKS=3\n" in array
    assert "export TRANSLATE_STAGE=merge\n" in merge
    command = """set -- news.en.txt --model /models/nllb --targets de,fr --out 'syn x' --generate.beams 2 "$@\""""
    assert command in array and command in merge
    for i, script in enumerate((array, merge)):
        lines = script.splitlines()
        first_command = next(j for j, line in enumerate(lines) if line and not line.startswith("#"))
        assert all(j < first_command for j, line in enumerate(lines) if line.startswith("#SBATCH"))
        (tmp_path / f"{i}.sbatch").write_text(script)
        _bash_syntax_ok(tmp_path / f"{i}.sbatch")
    assert "translate: 3 array task(s) x 1 GPU(s)" in err and "-> syn x/corpus.jsonl" in err
    assert not logs.exists()


@pytest.mark.parametrize(("translate_args", "submit_args", "message"), [
    (["--beems", "2"], [], "align submit: error: align translate run: unrecognized arguments: --beems 2"),
    (["--generate.dtype", "fp8"], [], "align translate run: --generate.dtype: must be one of auto, bf16, fp16, fp32, got 'fp8'"),
    (["--part_rows", "0"], [], "align translate run: --part_rows must be >= 1, got 0"),
    (["--rank", "0", "--world_size", "2"], [], "--rank / --world_size / --merge false are set by the array job"),
    (["--generate.dtype", "bf16"], ["--gpus_per_node", "0"], "--generate.dtype bf16 on CPU tasks (--gpus_per_node 0)"),
    ([], ["--nodes", "2"], "--nodes 2 / --tasks_per_node None: a translate job runs one task per array element"),
    ([], ["--fit_config", "x.yaml"], "--fit_config is for --job train"),
])
def test_bad_translate_arguments_exit_2_before_sbatch(tmp_path, monkeypatch, capsys, translate_args, submit_args,
                                                      message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "news.en.txt").write_text("Hello.\n")
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch: reaching it would say "sbatch not found"
    rc = main(["submit", "--job", "translate", *submit_args, "--", "news.en.txt", "--model", "m", "--targets", "de",
               "--out", "syn", *translate_args])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err
    assert len([line for line in err.splitlines() if line.startswith("align submit: error:")]) == 1
    assert "sbatch" not in err and not (tmp_path / "logs").exists()


def test_translate_without_the_input_names_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["submit", "--job", "translate", "--dry_run", "--", "gone.txt", "--model", "m", "--targets", "de",
                 "--out", "syn"]) == 2
    assert "align submit: error: align translate run: INPUT gone.txt: no such file or folder" in capsys.readouterr().err


def test_the_translate_script_submits_through_align_submit(tmp_path):
    """``bash slurm/translate.sbatch ARGS`` on a login node is ``align submit --job translate -- ARGS``."""
    (tmp_path / "news.en.txt").write_text("Hello.\n")
    env = T.align_env(PATH=str(tmp_path), ALIGN_CMD=f"{sys.executable} -m alignment.cli", TRANSLATE_TASKS="2",
                      TRANSLATE_GPUS="0")  # no sbatch on this PATH

    def script(*args):
        return subprocess.run([shutil.which("bash"), str(T.REPO / "slurm" / "translate.sbatch"), "news.en.txt",
                               "--model", "m", "--targets", "de", "--out", "syn", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=60)

    typo = script("--beems", "2")
    assert typo.returncode == 2
    assert typo.stderr.strip().splitlines()[-1] == (
        "align submit: error: align translate run: unrecognized arguments: --beems 2")
    checked = script("--generate.beams", "2")  # valid: rendered, then stopped only by the missing sbatch
    assert checked.returncode == 2
    assert "translate: 2 array task(s) x 0 GPU(s)" in checked.stderr
    assert "align submit: error: sbatch not found on PATH" in checked.stderr


def test_launch_shim_is_the_same_command():
    result = subprocess.run([sys.executable, str(T.REPO / "launch" / "submit.py"), "--help"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: align submit") and "--gpus_per_node" in result.stdout


def test_local_launcher_trains_and_resumes_like_a_requeued_job(tmp_path):
    corpus = T.make_corpus(tmp_path / "data", rows=120, rows_per_shard=20)
    flags = ["--data.train_shards", str(corpus.shards), "--data.tokenizer", str(corpus.tokenizer),
             "--model.encoder.vocab_size", str(corpus.vocab_size), "--trainer.logger", "false",
             "--trainer.limit_val_batches", "0", "--data.batch_size", "8"]
    env = T.align_env(ALIGN_CMD=f"{sys.executable} -m alignment.cli")
    launcher = str(T.REPO / "launch" / "local.sh")
    for steps in (2, 3):  # the second call continues the first run from its last.ckpt
        result = subprocess.run([launcher, str(T.DEBUG_YAML), *flags, "--trainer.max_steps", str(steps)],
                                cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    assert "Restoring states from the checkpoint path at" in result.stderr + result.stdout
    last = tmp_path / "runs" / "debug" / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 3
    result = subprocess.run([launcher], capture_output=True, text=True)
    assert result.returncode == 2 and "usage:" in result.stderr
