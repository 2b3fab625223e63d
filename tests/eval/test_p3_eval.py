"""P3 evaluation by rank classification, on the P3 fixture release converted as a user converts the real one:
- a rigged forward that knows the answers picks every right one; a backbone rigged towards "yes", answered through
  the evaluation's own method path, scores exactly the share of "yes" answers per prompt / dataset / median;
- token mean and sum disagree where the answer choices differ in length;
- the tiny pipeline on configs/tiny-p3.yaml: the report has the accuracy of every held-out dataset, the mean and the
  median of the datasets' medians, equal to a hand computation from the written predictions; a stored score equals
  an independent forward of the model.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
from collections import defaultdict

import pytest
import torch
from tests.proc_helpers import REPO, worker_env
from tests.tiny import bpe_tokenizer, small_backbone_dir, tiny_backbone

from tagi_ds.cli import main as cli_main
from tagi_ds.config import load_config
from tagi_ds.data.collate import pad_id
from tagi_ds.data.p3 import load_p3
from tagi_ds.eval import methods as M
from tagi_ds.eval.rank_classification import HELDOUT_DATASETS, answer_index, rank_classify_ids, t0_report
from tagi_ds.eval.scoring import eval_splits, rank_classification_report
from tagi_ds.run.backbone import LoadedBackbone, load_model_folder
from tagi_ds.run.prompts import prompt_settings, source_ids


@pytest.fixture(scope="module")
def p3_dir(tmp_path_factory):
    """The documented commands: the fixture release (TFRecord shards), then tools/convert_p3.py."""
    root = tmp_path_factory.mktemp("p3")
    for cmd in ([sys.executable, "-m", "tests.data.p3_fixture", str(root / "release"), "--rows", "12"],
                [sys.executable, "tools/convert_p3.py", str(root / "release"), str(root / "p3"), "--no-progress",
                 "--workers", "1"]):
        r = subprocess.run(cmd, cwd=REPO, env=worker_env(), capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-3000:]
    return root / "p3"


@pytest.fixture(scope="module")
def unseen(p3_dir):
    tasks = load_p3(p3_dir, "unseen", num_demonstrations=1, max_instances=6)
    assert {t.meta["dataset"] for t in tasks} == set(HELDOUT_DATASETS)
    return tasks


def _oracle(tok, task):
    """A T5-shaped forward that puts +5 on the labels of each instance's right answer, 0 elsewhere."""
    eos = tok.eos_token_id
    right = {tuple(tok(i.input).input_ids): tok(i.answer_choices[answer_index(task.name, i)],
                                                add_special_tokens=False).input_ids + [eos] for i in task.instances}

    def forward(input_ids, attention_mask, labels):
        logits = torch.zeros(*labels.shape, len(tok))
        for b in range(labels.shape[0]):
            lab = labels[b][labels[b] != -100].tolist()
            if lab == right[tuple(input_ids[b][attention_mask[b].bool()].tolist())]:
                logits[b, torch.arange(len(lab)), lab] = 5.0
        return logits
    return forward


def test_rigged_forward_picks_every_right_answer(unseen):
    tok = bpe_tokenizer("t5")
    results = [rank_classify_ids(_oracle(tok, t), "t5", tok, t, [tok(i.input).input_ids for i in t.instances],
                                 pad_id(tok), batch_size=4) for t in unseen]
    assert all(r.predictions == r.labels for r in results)
    assert len({y for r in results for y in r.labels}) == 3  # the right answer is not always the first choice
    rep = t0_report(results)
    assert rep["missing"] == [] and list(rep["datasets"]) == list(HELDOUT_DATASETS)
    assert all(d["mean"] == d["median"] == 100.0 for d in rep["datasets"].values())
    assert rep["mean"] == rep["median"] == 100.0


def test_token_mean_and_sum_disagree_where_lengths_differ(unseen):
    """A causal forward that gives each answer's first token log-prob -log V and every later token nearly 0: the
    sum prefers the shortest answer, the token mean the longest."""
    tok = bpe_tokenizer("llama")

    def first_token_costs(input_ids, attention_mask, labels):
        logits = torch.zeros(*input_ids.shape, len(tok))
        for b in range(labels.shape[0]):
            pos = (labels[b] != -100).nonzero().flatten().tolist()
            for t in pos[1:]:  # position t-1 predicts token t
                logits[b, t - 1, labels[b, t]] = 10.0
        return logits

    completion = [t for t in unseen if t.meta["dataset"] in ("copa", "hellaswag", "story_cloze")]
    differ = 0
    for t in completion:
        src = [tok(i.input).input_ids for i in t.instances]
        by = {red: rank_classify_ids(first_token_costs, "llama", tok, t, src, pad_id(tok), red, 4)
              for red in ("sum", "mean")}
        lengths = [[len(tok(c, add_special_tokens=False).input_ids) for c in i.answer_choices] for i in t.instances]
        for k, n in enumerate(lengths):
            s, m = by["sum"].scores[k], by["mean"].scores[k]
            assert s == pytest.approx([mi * ni for mi, ni in zip(m, n)], rel=1e-5)
            if len(set(n)) == len(n):  # distinct lengths (equal ones tie up to rounding)
                assert by["sum"].predictions[k] == n.index(min(n))
                assert by["mean"].predictions[k] == n.index(max(n))
                differ += 1
    assert differ > 0


def test_backbone_rigged_towards_yes_through_the_method_path(unseen):
    tok = bpe_tokenizer("t5")
    model = tiny_backbone("t5", vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                          decoder_start_token_id=tok.pad_token_id)
    others = {i for w in ("no", "maybe") for i in tok(w, add_special_tokens=False).input_ids}
    yes = next(i for i in tok("yes", add_special_tokens=False).input_ids if i not in others)  # "yes" alone has it
    head = torch.nn.Linear(model.lm_head.in_features, len(tok), bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[yes] = 8.0
    model.lm_head = head
    cfg = load_config(None, ["data.source=p3", "data.p3_num_demonstrations=1", "data.max_source_length=512",
                             "eval.rank_batch_size=3"])
    bb = LoadedBackbone(tok, model.config, "t5", [], "rigged", "rigged", "x", torch.device("cpu"), _model=model)
    nli = [t for t in unseen if all("yes" in i.answer_choices for i in t.instances)]
    stats = M.UnitStats()
    with M.NoFinetune(cfg, bb).unit(nli) as ans:
        rows = M.answer_unit(ans, nli, bb, reduction="mean", rank_batch_size=3, stats=stats)
    assert stats.rank_classified == len(rows) == sum(len(t.instances) for t in nli) and stats.forwarded_tokens > 0
    assert all(r["prediction"] == "yes" and r["choice"] == r["scores"].index(max(r["scores"])) for r in rows)
    rep = rank_classification_report(nli, rows)
    by_ds: dict[str, dict[str, float]] = defaultdict(dict)
    for t in nli:
        share = 100.0 * sum(i.references[0] == "yes" for i in t.instances) / len(t.instances)
        by_ds[t.meta["dataset"]][t.meta["prompt"]] = share
        assert rep["datasets"][t.meta["dataset"]]["prompts"][t.meta["prompt"]] == pytest.approx(share)
    medians = [statistics.median(p.values()) for p in by_ds.values()]
    assert rep["median"] == pytest.approx(statistics.median(medians))
    assert rep["mean"] == pytest.approx(statistics.fmean(statistics.fmean(p.values()) for p in by_ds.values()))
    assert len(set(medians)) > 1  # not a constant: the numbers could be wrong


# ------------------------------------------------------------------------------------------------ the pipeline
@pytest.fixture(scope="module")
def p3_run(tmp_path_factory, p3_dir):
    root = tmp_path_factory.mktemp("p3run")
    bb = small_backbone_dir(root / "bb", "llama")
    sets = [f"runs_dir={root / 'runs'}", "name=p3", f"backbone.name_or_path={bb}", f"data.p3_dir={p3_dir}",
            "teacher.steps=2", "pretrain.steps=2", "finetune.steps=2", "baselines.steps=2",
            "data.max_eval_instances_per_task=4", "eval.max_new_tokens=4"]
    assert cli_main(["pipeline", "--config", str(REPO / "configs" / "tiny-p3.yaml"), "--no-progress", *sets]) == 0
    return load_config(REPO / "configs" / "tiny-p3.yaml", sets)


def test_tiny_p3_pipeline_report(p3_run):
    cfg = p3_run
    run_dir = cfg.run_dir
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert metrics["rank_classification"]["reduction"] == "mean" and metrics["seen_from"] == "train_instances"
    tasks = {t.name: t for t in eval_splits(cfg)["unseen"]}
    methods = ["no_ft", "no_instruction", "tk_instruct", "hint", "tagi"]
    by_method = metrics["rank_classification"]["by_method"]
    assert {m for m, r in by_method.items() if "unseen" in r} == set(methods)  # the teacher: seen tasks only
    assert "seen" in by_method["teacher"]  # the seen split's classification prompt (rotten_tomatoes)
    for m in methods:
        rows = [json.loads(x) for x in (run_dir / "eval" / "predictions" / m / "unseen.jsonl").read_text().splitlines()]
        hits: dict[str, list[int]] = defaultdict(list)
        for r in rows:
            inst = next(i for i in tasks[r["task"]].instances if i.id == r["id"])
            assert r["choice"] == r["scores"].index(max(r["scores"]))
            assert r["prediction"] == inst.answer_choices[r["choice"]]
            assert r["label"] == list(inst.answer_choices).index(inst.references[0])
            hits[r["task"]].append(int(r["choice"] == r["label"]))
        by_ds: dict[str, list[float]] = defaultdict(list)
        for name, h in hits.items():
            by_ds[tasks[name].meta["dataset"]].append(100.0 * sum(h) / len(h))
        got = metrics["rank_classification"]["by_method"][m]["unseen"]
        assert set(got["datasets"]) == set(HELDOUT_DATASETS) and got["missing"] == []
        for ds, accs in by_ds.items():
            assert got["datasets"][ds]["mean"] == pytest.approx(statistics.fmean(accs))
            assert got["datasets"][ds]["median"] == pytest.approx(statistics.median(accs))
        assert got["mean"] == pytest.approx(statistics.fmean(statistics.fmean(a) for a in by_ds.values()))
        assert got["median"] == pytest.approx(statistics.median([statistics.median(a) for a in by_ds.values()]))
    md = (run_dir / "report.md").read_text()
    table = md[md.index("## Held-out P3 accuracy"):].split("\n## ")[0]
    for ds in HELDOUT_DATASETS:
        assert f"| {ds} |" in table
    assert "| **mean** |" in table and "| **median** |" in table
    assert "seen (TRAIN instances) R-L" in md and "TRAINING-SET accuracy" in md

    # one stored score against an independent forward of the frozen backbone (no_ft reads the full prompt)
    row = json.loads((run_dir / "eval" / "predictions" / "no_ft" / "unseen.jsonl").read_text().splitlines()[0])
    model, tok = load_model_folder(cfg.backbone.name_or_path)
    task = tasks[row["task"]]
    inst = next(i for i in task.instances if i.id == row["id"])
    src = source_ids(task, inst, tok, prompt_settings(cfg, "llama"))
    for choice, stored in zip(inst.answer_choices, row["scores"]):
        c = tok(choice, add_special_tokens=False).input_ids
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([src + c])).logits[0].float(), -1)
        want = sum(logp[len(src) - 1 + k, c[k]].item() for k in range(len(c))) / len(c)
        assert stored == pytest.approx(want, abs=1e-4)


def test_t5_student_rank_classification_is_its_teacher_forced_likelihood(unseen):
    """The TAGI student's forward closure (its task's adapter and instruction states, T5 decoder inputs from the
    labels) scores each answer choice as the student's own forward with those labels, one pair at a time."""
    from pathlib import Path

    from tests.tiny import make_student, randomize_b_heads

    from tagi_ds.data.collate import WIDTH_BUCKET, encode_prompt, instruction_ids
    from tagi_ds.data.prompts import build_task_input

    tok = bpe_tokenizer("t5")
    backbone = tiny_backbone("t5", vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                             decoder_start_token_id=tok.pad_token_id)
    student = make_student("t5", backbone)
    randomize_b_heads(student, std=0.2)
    cfg = load_config(None, ["data.source=p3", "data.p3_num_demonstrations=1", "data.max_source_length=512",
                             "data.max_input_length=128"])
    bb = LoadedBackbone(tok, backbone.config, "t5", student.specs, "s", "s", "x", torch.device("cpu"),
                        _model=backbone)
    tasks = unseen[:2]
    with M.Hypernet(cfg, bb, "tagi", Path("unused"), student=student).unit(tasks) as ans:
        rows = M.answer_unit(ans, tasks, bb, reduction="sum", rank_batch_size=4, stats=M.UnitStats())
    settings = prompt_settings(cfg, "t5")
    # the instruction states the method computes (width buckets: another width moves the scores by ~1e-4 here)
    enc = student.encode_instruction_rows([instruction_ids(t, tok, settings) for t in tasks], pad_id(tok), "cpu",
                                          width_multiple=WIDTH_BUCKET)
    k = 0
    for ti, t in enumerate(tasks):
        for inst in t.instances:
            src = encode_prompt(tok, build_task_input(inst), settings.max_input_length)
            for j, c in enumerate(inst.answer_choices):
                lab = tok(c, add_special_tokens=False).input_ids + [tok.eos_token_id]
                with torch.no_grad():
                    out = student(enc, torch.tensor([ti]), torch.tensor([src]),
                                  torch.ones(1, len(src), dtype=torch.long), labels=torch.tensor([lab]))
                assert rows[k]["scores"][j] == pytest.approx(-out.loss.item() * len(lab), abs=1e-4)
            k += 1
    # the check can fail: the other task's adapter and instruction states score the same pair differently
    inst = tasks[1].instances[0]
    src = torch.tensor([encode_prompt(tok, build_task_input(inst), settings.max_input_length)])
    lab = torch.tensor([tok(inst.answer_choices[0], add_special_tokens=False).input_ids + [tok.eos_token_id]])
    with torch.no_grad():
        other = -student(enc, torch.tensor([0]), src, torch.ones_like(src), labels=lab).loss.item() * lab.shape[1]
    assert abs(other - rows[len(tasks[0].instances)]["scores"][0]) > 1e-3
