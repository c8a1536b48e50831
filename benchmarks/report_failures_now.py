"""A pytest plugin for the GPU machine: print each failure's traceback the moment it happens.

pytest writes tracebacks in its closing summary, which a run cut short by the device budget never reaches (two GPU
sessions lost theirs that way). ``device_check.sh`` loads this with ``-p report_failures_now``.
"""

from __future__ import annotations

import sys


def pytest_runtest_logreport(report):
    if report.failed:
        sys.stdout.write(f"\n----- FAILED {report.nodeid} ({report.when}) -----\n{report.longreprtext}\n-----\n")
        sys.stdout.flush()
