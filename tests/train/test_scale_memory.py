"""Training at real size, small: host memory that does not grow with the number of tasks or documents, and a stage
that stops on SIGTERM at a step boundary with a checkpoint the rerun continues from exactly.

The memory runs are real `tagi-ds` processes (their own peak RSS) on SNI-format task files with long instructions
(~900 tokens) and a backbone wide enough that one task's instruction states cost ~8 MiB: holding every task's states
(what the finetune did before, padded to the longest) costs 1.6 GiB at 200 tasks and 0.16 GiB at 20.
"""
from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.proc_helpers import cli_peak_rss, worker_env
from tests.tiny import backbone_dir

REPO = Path(__file__).resolve().parents[2]
WORDS = [f"word{i}" for i in range(300)]


def write_sni(root: Path, n_tasks: int, definition_words: int = 700, instances: int = 6) -> Path:
    """n SNI task files (native format) with long definitions, all in the train split."""
    rng = random.Random(0)
    (root / "tasks").mkdir(parents=True)
    names = []
    for t in range(n_tasks + 1):  # the last one is the test split's
        name = f"task{t:04d}_long"
        data = {"Definition": [" ".join(rng.choice(WORDS) for _ in range(definition_words))],
                "Positive Examples": [{"input": "word1 word2", "output": "word2", "explanation": ""}],
                "Negative Examples": [], "Categories": ["Long"],
                "Instances": [{"id": f"{name}-{i}", "input": " ".join(rng.sample(WORDS, 4)), "output": ["word3"]}
                              for i in range(instances)]}
        (root / "tasks" / f"{name}.json").write_text(json.dumps(data))
        names.append(name)
    (root / "splits").mkdir()
    (root / "splits" / "train_tasks.txt").write_text("\n".join(names[:-1]) + "\n")
    (root / "splits" / "test_tasks.txt").write_text(names[-1] + "\n")
    return root


@pytest.fixture(scope="module")
def wide_backbone(tmp_path_factory) -> Path:
    return backbone_dir(tmp_path_factory.mktemp("wide") / "bb", "llama", hidden=256, heads=4, ffn=256, vocab=400,
                        suite_size=(6, 1))


def _finetune_args(runs: Path, sni: Path, bb: Path, *extra: str) -> list[str]:
    return ["finetune", "--config", str(REPO / "configs" / "tiny.yaml"), f"runs_dir={runs}", "name=mem",
            f"backbone.name_or_path={bb}", "data.source=sni", f"data.sni_dir={sni}", "data.max_source_length=1024",
            "data.max_input_length=16", "data.max_target_length=4", "data.max_instances_per_task=6",
            "data.max_eval_instances_per_task=1", "finetune.steps=2", "finetune.lambda_kl=0", "finetune.lambda_ins=0",
            "finetune.init_from_pretrain=false", "finetune.checkpoint_every=0", "finetune.tasks_per_batch=2",
            "finetune.instances_per_task=2", "threads=1", *extra]


def test_finetune_host_memory_is_flat_in_the_number_of_tasks(tmp_path, wide_backbone):
    peaks = {}
    for n in (20, 200):
        sni = write_sni(tmp_path / f"sni{n}", n)
        rc, peak, err = cli_peak_rss(_finetune_args(tmp_path / f"runs{n}", sni, wide_backbone))
        assert rc == 0, err[-3000:]
        peaks[n] = peak
    print(f"finetune peak RSS: 20 tasks {peaks[20] / 1024:.0f} MiB, 200 tasks {peaks[200] / 1024:.0f} MiB, "
          f"ratio {peaks[200] / peaks[20]:.3f}")
    assert peaks[200] / peaks[20] < 1.2, peaks


def test_pretrain_host_memory_is_flat_in_the_number_of_documents(tmp_path):
    """Stage 1 streams: 20x more documents of text (each ~2k words), nothing held but one micro batch."""
    bb = backbone_dir(tmp_path / "bb", "llama", hidden=64, vocab=400, suite_size=(6, 1))
    rng = random.Random(1)
    peaks = {}
    for n in (200, 4000):
        corpus = tmp_path / f"c{n}.jsonl"
        with open(corpus, "w") as fh:
            for _ in range(n):
                fh.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(2000))}) + "\n")
        rc, peak, err = cli_peak_rss(["pretrain", "--config", str(REPO / "configs" / "tiny.yaml"),
                                      f"runs_dir={tmp_path / f'runs{n}'}", "name=pt", f"backbone.name_or_path={bb}",
                                      f"data.pretrain_text={corpus}", "pretrain.steps=3", "pretrain.checkpoint_every=0",
                                      "pretrain.micro_batch_size=4", "threads=1"])
        assert rc == 0, err[-3000:]
        peaks[n] = peak
    print(f"pretrain peak RSS: 200 docs {peaks[200] / 1024:.0f} MiB, 4000 docs {peaks[4000] / 1024:.0f} MiB")
    assert peaks[4000] / peaks[200] < 1.2, peaks


def _losses(stage_dir: Path) -> dict[int, float]:
    out = {}
    for line in (stage_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec["loss"]
    return out


def test_sigterm_mid_finetune_checkpoints_and_the_rerun_continues_exactly(tmp_path):
    """SIGTERM (what Slurm sends before the limit or on pre-emption) → checkpoint at the next step → exit 75; the
    same command resumes there, and every step's loss equals an uninterrupted run's."""
    from tests.train import recipe_worker as W

    yaml, sets = W.tiny_finetune_run(tmp_path)
    args = ["finetune", "--config", str(yaml), *sets, "finetune.steps=40", "finetune.checkpoint_every=0",
            "finetune.log_every=1", "threads=1"]
    ref = subprocess.run([sys.executable, "-m", "tagi_ds.cli", *args, "variant=ref"], env=worker_env(), cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    cmd = [sys.executable, "-m", "tagi_ds.cli", *args, "variant=term"]
    proc = subprocess.Popen(cmd, env=worker_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    log = tmp_path / "runs" / "r" / "finetune" / "term" / "metrics.jsonl"
    deadline = time.time() + 300
    while not (log.is_file() and len(log.read_text().splitlines()) >= 5):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=300)[1]
    assert proc.returncode == 75, err[-3000:]
    stopped = [ln for ln in err.splitlines() if "stopped:" in ln]
    assert stopped and "SIGTERM" in stopped[0] and "rerun the same command" in stopped[0], err[-2000:]
    done = len(_losses(log.parent))
    assert 5 <= done < 40
    rerun = subprocess.run(cmd, env=worker_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    want, got = _losses(tmp_path / "runs" / "r" / "finetune" / "ref"), _losses(log.parent)
    assert sorted(got) == list(range(1, 41))
    assert json.loads((log.parent / "summary.json").read_text())["resumed_from"] == done
    assert max(abs(got[s] - want[s]) for s in want) < 1e-6
