"""The chaos driver's short seeded run (scripts/chaos.py; its full runs, 20 kills per place, print the
figures in notes/chaos.md): the chaos sweep's annotate, distill and mixed cells at one budget, on a
local disk, SIGKILLed three times (two kills aimed from inside at a write, one at a random moment) and
rerun until it finished, ends with the rows, predictions, ledgers and teacher-store chunks of the run
never killed, nothing twice, no temporary file left, and the compute the kills undid recorded as lost."""

import pytest

from conftest import load_script

pytestmark = pytest.mark.slow


def _chaos():
    return load_script("chaos")


def test_a_sweep_killed_three_times_ends_as_the_sweep_never_killed(tmp_path):
    result = _chaos().run_place("local", tmp_path, kills=3, seed=1, quick=True, budgets=[2])
    assert result["problems"] == []
    assert result["kills"] == 3 and result["cells"] == result["rows_equal"] == 3 * result["rounds"]
    assert sum(result["aimed"].values()) >= 1 and result["orphans"] == 0
