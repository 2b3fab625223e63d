"""`tagi-ds generate-adapter` and `tagi-ds predict` end to end on tiny T5 / LLaMA exports (fusion on)."""
from __future__ import annotations

import json

import torch

from tagi_ds.cli import main as cli

from tests.adapters.adapters_helpers import build_backbone_dir, write_task_file


def _preds(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _common(export, tmp_path):
    return ["--hypernet", str(export), "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"]


def test_generate_adapter_loads_in_peft_and_second_call_hits_cache(exported, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, T5ForConditionalGeneration

    arch, backbone, export = exported
    args = ["generate-adapter", *_common(export, tmp_path), "--instruction", "Copy the input words."]
    assert cli(args + ["--out", str(tmp_path / "a1")]) == 0
    assert "generated" in capsys.readouterr().out
    assert cli(args + ["--out", str(tmp_path / "a2")]) == 0
    out = capsys.readouterr().out
    assert "from the adapter cache" in out and "predict" in out  # cache hit; the fusion note is printed
    a1 = (tmp_path / "a1" / "adapter_model.safetensors").read_bytes()
    assert a1 == (tmp_path / "a2" / "adapter_model.safetensors").read_bytes()
    meta = json.loads((tmp_path / "a1" / "tagi_adapter.json").read_text())
    assert meta["instruction"] == "Copy the input words." and meta["fusion"] is True

    cls = T5ForConditionalGeneration if arch == "t5" else AutoModelForCausalLM
    model = PeftModel.from_pretrained(cls.from_pretrained(str(backbone)), str(tmp_path / "a1")).eval()
    x = torch.randint(5, 100, (1, 6))
    with torch.no_grad():
        kw = {"decoder_input_ids": torch.zeros(1, 1, dtype=torch.long)} if arch == "t5" else {}
        got = model(input_ids=x, **kw).logits
        with model.disable_adapter():
            plain = model(input_ids=x, **kw).logits
    assert (got - plain).abs().max() > 1e-4  # the generated LoRA is loaded and active


def test_predict_task_file_merged_equals_unmerged(exported, tmp_path, capsys):
    arch, _, export = exported
    task = write_task_file(tmp_path / "copy_task.json", 0, n_instances=6)
    base = ["predict", *_common(export, tmp_path), "--task-file", str(task), "--max-new-tokens", "6",
            "--batch-size", "4"]
    assert cli(base + ["--out", str(tmp_path / "merged.jsonl")]) == 0
    assert "merged adapter" in capsys.readouterr().out
    assert cli(base + ["--out", str(tmp_path / "hooks.jsonl"), "--no-merge"]) == 0
    assert "hooks" in capsys.readouterr().out
    merged, hooks = _preds(tmp_path / "merged.jsonl"), _preds(tmp_path / "hooks.jsonl")
    assert [p["id"] for p in merged] == [f"t0-{i}" for i in range(6)]  # input order, every instance
    assert merged == hooks
    assert any(p["prediction"] for p in merged)


def test_predict_several_tasks_with_hooks_matches_each_task_alone(exported, tmp_path):
    arch, _, export = exported
    t0, t1 = write_task_file(tmp_path / "copy.json", 0), write_task_file(tmp_path / "last.json", 1)
    rows = [{"id": "a", "input": "red apple river", "task": "copy"}, {"id": "b", "input": "seven", "task": "last"},
            {"id": "c", "input": "blue stone", "task": "copy"}, {"id": "d", "input": "cloud house", "task": "last"}]
    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    common = [*_common(export, tmp_path), "--max-new-tokens", "6"]
    assert cli(["predict", *common, "--task-file", str(t0), "--task-file", str(t1), "--inputs", str(inputs),
                "--out", str(tmp_path / "both.jsonl")]) == 0
    both = {p["id"]: p for p in _preds(tmp_path / "both.jsonl")}
    assert [p["task"] for p in _preds(tmp_path / "both.jsonl")] == ["copy", "last", "copy", "last"]
    for name, f in (("copy", t0), ("last", t1)):
        alone = tmp_path / f"{name}.in.jsonl"
        alone.write_text("\n".join(json.dumps({k: v for k, v in r.items() if k != "task"})
                                   for r in rows if r["task"] == name) + "\n")
        assert cli(["predict", *common, "--task-file", str(f), "--inputs", str(alone),
                    "--out", str(tmp_path / f"{name}.jsonl")]) == 0  # one task: merged
        for p in _preds(tmp_path / f"{name}.jsonl"):
            assert both[p["id"]]["prediction"] == p["prediction"]


# ------------------------------------------------------------------------------------------------ refusals
def _refused(capsys, args, out_path, *needles):
    assert cli(args) == 2
    err = capsys.readouterr().err
    for n in needles:
        assert n in err, err
    assert not out_path.exists()  # nothing written
    return err


def test_bad_inputs_are_refused_with_exit_2_and_nothing_written(exported, tmp_path, capsys):
    arch, _, export = exported
    common = _common(export, tmp_path)
    out_dir, out_file = tmp_path / "adapter", tmp_path / "preds.jsonl"
    # --task-file a directory
    _refused(capsys, ["generate-adapter", *common, "--task-file", str(tmp_path), "--out", str(out_dir)], out_dir,
             str(tmp_path), "is a directory", "SNI task JSON")
    # --task-file not JSON
    bad = tmp_path / "bad.json"
    bad.write_text("{ not json")
    _refused(capsys, ["generate-adapter", *common, "--task-file", str(bad), "--out", str(out_dir)], out_dir,
             str(bad), "not valid JSON")
    _refused(capsys, ["predict", *common, "--task-file", str(bad), "--out", str(out_file)], out_file,
             str(bad), "not valid JSON")
    # a bad jsonl line names the line
    task = write_task_file(tmp_path / "copy.json", 0)
    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text(json.dumps({"input": "red"}) + "\n" + '{"input": "blue"\n')
    _refused(capsys, ["predict", *common, "--task-file", str(task), "--inputs", str(inputs), "--out", str(out_file)],
             out_file, f"{inputs}:2", "not valid JSON")
    inputs.write_text(json.dumps({"input": "red"}) + "\n" + json.dumps({"text": "blue"}) + "\n")
    _refused(capsys, ["predict", *common, "--task-file", str(task), "--inputs", str(inputs), "--out", str(out_file)],
             out_file, f"{inputs}:2", '"input"')
    # an input naming an unknown task
    inputs.write_text(json.dumps({"input": "red", "task": "nope"}) + "\n")
    _refused(capsys, ["predict", *common, "--task-file", str(task), "--inputs", str(inputs), "--out", str(out_file)],
             out_file, "nope", "copy")


def test_export_for_another_backbone_is_refused_naming_both(exported, tmp_path, capsys):
    arch, backbone, export = exported
    other = build_backbone_dir(tmp_path / "other_backbone", arch, d_model=48)
    out_dir = tmp_path / "adapter"
    err = _refused(capsys, ["generate-adapter", *_common(export, tmp_path), "--backbone", str(other),
                            "--instruction", "Copy.", "--out", str(out_dir)], out_dir, str(backbone), str(other))
    assert "made for backbone" in err
    out_file = tmp_path / "p.jsonl"
    _refused(capsys, ["predict", *_common(export, tmp_path), "--backbone", str(other), "--task-file",
                      str(write_task_file(tmp_path / "t.json")), "--out", str(out_file)], out_file,
             str(backbone), str(other))
