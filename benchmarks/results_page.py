"""Results pages: a benchmark's table written as Markdown under docs/results/, stamped with the
commit, date, machine and command that produced it (every number in the docs comes from one)."""
from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys


def _cpu_model() -> str:
    """`` (<model name>)`` from /proc/cpuinfo, or nothing: the same code runs at other speeds on other CPUs."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f" ({line.split(':', 1)[1].strip()})"
    except OSError:
        pass
    return ""


def stamp() -> str:
    """One line: commit (``+dirty`` with uncommitted changes), UTC date, machine, command."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    if git("status", "--porcelain", "--untracked-files=no"):
        commit += "+dirty"
    import torch

    machine = f"{platform.machine()}{_cpu_model()}, {os.cpu_count()} CPU threads, torch {torch.__version__}"
    if torch.cuda.is_available():
        machine += f", {torch.cuda.get_device_name(0)}"
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], root), *sys.argv[1:]])
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"commit `{commit}` · {date} · {machine} · `{command}`"


def write_page(path: str, title: str, body: str) -> None:
    """Write ``# title``, the stamp, then ``body`` (Markdown) to ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    line = stamp()  # before the file is opened: rewriting a page already in git would make it "dirty"
    with open(path, "w") as f:
        f.write(f"# {title}\n\n{line}\n\n{body.rstrip()}\n")
    print(f"wrote {path}", file=sys.stderr)
