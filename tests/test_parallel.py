"""The job pool: results in job order, jobs that wait for others get their results, bad graphs fail early."""

from __future__ import annotations

import operator

import pytest

from merging.parallel import After, run_jobs


@pytest.mark.parametrize("workers", [1, 2])
def test_a_waiting_job_gets_the_results_it_waits_for(workers: int) -> None:
    jobs = [
        After((2, 3), lambda r: (r[2], r[3])),  # listed first, runs after 2 and 3
        (1, 2),
        (10, 20),
        After((1,), lambda r: (r[1], 100)),
    ]
    assert run_jobs(operator.add, jobs, workers) == [30 + 103, 3, 30, 103]


def test_cycles_and_unknown_jobs_fail_before_anything_runs() -> None:
    ran: list[int] = []
    with pytest.raises(ValueError, match="cycle"):
        run_jobs(lambda x: ran.append(x), [After((1,), lambda r: (1,)), After((0,), lambda r: (2,))], 1)
    with pytest.raises(ValueError, match="not other jobs"):
        run_jobs(lambda x: ran.append(x), [(1,), After((5,), lambda r: (2,))], 1)
    assert ran == []
