"""A process's memory as Linux reports it in ``/proc/<pid>/status`` — the one reader behind the suite's
per-file peak lines (tests/conftest.py), the servers' peaks in host tests and the benchmarks' CPU peaks."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union


def status_kb(field: str, pid: Union[int, str] = "self") -> Optional[int]:
    """A ``kB`` field of ``/proc/<pid>/status`` (``VmHWM``: peak resident set, ``VmRSS``: now); None where there is
    no such file or field (not Linux, a process that ended)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak() -> bool:
    """Make this process's ``VmHWM`` its current RSS (Linux: 5 → ``/proc/self/clear_refs``); False where it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False
