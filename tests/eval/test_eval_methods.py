"""The methods at bounded memory, on the finished micro run:
- a baseline is merged into the run's own backbone (no second copy), equals PEFT's merge_and_unload, and the
  backbone comes back bit for bit;
- teachers are loaded unit by unit of work, never more adapter bytes at once than eval.teacher_group_bytes;
- a hypernetwork method encodes instructions per unit of eval.tasks_per_batch tasks, never the whole split, on the
  run's backbone;
and the answers do not depend on those bounds."""
from __future__ import annotations

import pytest
import torch

from tagi_ds.eval import methods as M
from tagi_ds.eval.scoring import eval_splits
from tagi_ds.modeling.tagi import TagiStudent
from tagi_ds.run.backbone import load_model_folder, load_run_backbone
from tagi_ds.run.paths import RunPaths


@pytest.fixture(scope="module")
def eval_setup(micro):
    cfg = micro.cfg()
    bb = load_run_backbone(cfg)
    return cfg, bb, eval_splits(cfg), micro


def test_baseline_merged_in_place_equals_peft_and_is_restored(eval_setup):
    cfg, bb, splits, micro = eval_setup
    model = bb.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ptrs = {k: v.data_ptr() for k, v in model.state_dict().items()}
    folder = RunPaths.of(cfg).baseline("tk_instruct")
    peft_merged = load_model_folder(folder)[0].merge_and_unload().state_dict()
    m = M.build_method(cfg, "tk_instruct", splits, bb)
    with m.session():
        now = model.state_dict()
        assert {k: v.data_ptr() for k, v in now.items()} == ptrs  # the run's own weights, merged in place
        changed = [k for k in now if not torch.equal(now[k], before[k])]
        assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed)
        for k in now:
            assert torch.allclose(now[k], peft_merged[k], atol=1e-6, rtol=0), k
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # bit for bit


def test_teachers_in_byte_bounded_groups(eval_setup, monkeypatch):
    cfg, bb, splits, micro = eval_setup
    paths = RunPaths.of(cfg)
    one = max((paths.teacher(u) / "adapter_model.safetensors").stat().st_size for u in paths.published_teachers())
    loads: list[list[str]] = []
    real_unit = M.Teachers.unit

    def recording(self, tasks):
        loads.append(sorted({self.unit_of()(t) for t in tasks}))
        return real_unit(self, tasks)

    monkeypatch.setattr(M.Teachers, "unit", recording)
    small = M.predict_method(micro.cfg(f"eval.teacher_group_bytes={one}", "eval.tasks_per_batch=8"), "teacher",
                             splits, bb)
    assert loads == [[u] for u in sorted(paths.published_teachers())]  # one teacher's bytes at a time
    loads.clear()
    big = M.predict_method(micro.cfg(f"eval.teacher_group_bytes={10 * one}", "eval.tasks_per_batch=8"), "teacher",
                           splits, bb)
    assert loads == [sorted(paths.published_teachers())]
    assert small.by_split == big.by_split and small.by_split["seen"] is not None
    assert all(v is None for k, v in small.by_split.items() if k != "seen")


def test_hypernet_encodes_instructions_per_unit_on_the_run_backbone(eval_setup, monkeypatch):
    cfg, bb, splits, micro = eval_setup
    sizes: list[int] = []
    real = TagiStudent.encode_instruction_rows

    def recording(self, rows, *a, **kw):
        assert self.backbone is bb.model  # never a second copy of the backbone
        sizes.append(len(rows))
        return real(self, rows, *a, **kw)

    monkeypatch.setattr(TagiStudent, "encode_instruction_rows", recording)
    per = {}
    for k in (1, 3):
        sizes.clear()
        per[k] = M.predict_method(micro.cfg(f"eval.tasks_per_batch={k}"), "tagi", splits, bb)
        assert max(sizes) <= k and sum(sizes) == sum(len(ts) for ts in splits.values())
    assert per[1].by_split == per[3].by_split
    assert not bb.model._forward_hooks and all(not mod._forward_hooks for mod in bb.model.modules())  # hooks gone


@pytest.mark.parametrize("method", ["teacher", "tagi"])
def test_methods_run_bucketed_widths(eval_setup, method):
    """Issue #17: every backbone call of an evaluation (instructions, prompts, inputs) runs at a multiple of
    collate.WIDTH_BUCKET tokens, the one-token decode steps aside, so the CPU kernel caches stop growing with the
    number of distinct lengths the tasks bring; exact widths (the code before) fail here."""
    from tagi_ds.data.collate import WIDTH_BUCKET

    cfg, bb, splits, micro = eval_setup
    widths: list[int] = []

    def record(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and ids.shape[-1] > 1:
            widths.append(int(ids.shape[-1]))

    handle = bb.model.model.register_forward_pre_hook(record, with_kwargs=True)  # the LlamaModel under every call
    try:
        got = M.predict_method(cfg, method, splits, bb)
    finally:
        handle.remove()
    assert got.by_split["seen"] is not None
    assert widths and all(w % WIDTH_BUCKET == 0 for w in widths), sorted(set(widths))
