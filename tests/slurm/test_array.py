"""Job-array units: index → task/category mapping, range errors, the sbatch submit line."""
from __future__ import annotations

import pytest

from tagi_ds.errors import ConfigError, DataError
from tagi_ds.run.array import array_units, resolve_array_index, sbatch_line, tasks_for_unit

NAMES = ["task_c", "task_a", "task_b", "task_d"]
CATS = {"task_a": ("Sentiment",), "task_b": ["QA"], "task_c": "Sentiment", "task_d": ("QA", "Other")}


def test_units_by_task_are_sorted_and_stable():
    units = array_units(NAMES, CATS, "task")
    assert units == ["task_a", "task_b", "task_c", "task_d"]
    assert array_units(list(reversed(NAMES)), CATS, "task") == units  # input order never matters


def test_units_by_category_use_first_category():
    assert array_units(NAMES, CATS, "category") == ["QA", "Sentiment"]
    assert tasks_for_unit("QA", NAMES, CATS, "category") == ["task_b", "task_d"]
    assert tasks_for_unit("task_c", NAMES, CATS, "task") == ["task_c"]


def test_category_grouping_needs_categories():
    with pytest.raises(DataError, match="task_x"):
        array_units(["task_x"], {}, "category")
    with pytest.raises(ConfigError, match="group_by"):
        array_units(NAMES, CATS, "tasks")


def test_index_out_of_range_names_the_range():
    units = array_units(NAMES, CATS, "task")
    assert resolve_array_index(units, "2") == ["task_c"]
    with pytest.raises(ConfigError, match=r"array_index=4 is out of range: valid indices are 0-3"):
        resolve_array_index(units, 4)
    with pytest.raises(ConfigError, match=r"array_index=-1 .*0-3"):
        resolve_array_index(units, -1)
    with pytest.raises(ConfigError, match="integer"):
        resolve_array_index(units, "x")


def test_sbatch_line():
    assert (sbatch_line("slurm/teachers_array.sbatch", 687, 16, "configs/t5-xl-sni.yaml")
            == "sbatch --array=0-686%16 slurm/teachers_array.sbatch configs/t5-xl-sni.yaml")
    assert sbatch_line("s.sbatch", 1, 0, "c.yaml") == "sbatch --array=0-0 s.sbatch c.yaml"
    with pytest.raises(ConfigError):
        sbatch_line("s.sbatch", 0, 16, "c.yaml")
