"""EAS ``containers[].prepare.pythonRequirements`` for the local runtime.

An instance with requirements is launched as ``python -m elastiserve.controlplane.runtimes.pyreqs
TARGET REQUIREMENTS_FILE -- COMMAND...``: this installs the requirements with
``pip install --target TARGET`` (once per distinct requirement list: TARGET is keyed by their
hash and shared by every instance and version that asks for the same list), then ``exec``\\ s the
container's command with TARGET first on ``PYTHONPATH`` and ``TARGET/bin`` first on ``PATH``.

Why in the instance and not in the control plane: an install can take minutes, and the
reconciler must never block on one service. Here it runs under the instance's own startup
timeout, its output lands in the instance's log, and a failed install is an ordinary crash whose
reason is the last log line. A file lock makes concurrent instances wait for one install; a
``.ready`` marker written last means a half-finished install is never used.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

READY_MARKER = ".ready"


def target_for(root: Path, requirements: list[str]) -> Path:
    """The install directory for this requirement list (and this Python's version)."""
    key = f"{sys.version_info.major}.{sys.version_info.minor}\n" + "\n".join(requirements)
    return root / hashlib.sha256(key.encode()).hexdigest()[:16]


def wrap(command: list[str], target: Path, requirements_file: Path) -> list[str]:
    """``command`` run after the requirements are installed into ``target``."""
    return [sys.executable, "-m", __name__, str(target), str(requirements_file), "--", *command]


def ensure_installed(target: Path, requirements_file: Path) -> int:
    """Install once; 0 when ``target`` is ready, else pip's exit code."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f"{target.name}.lock", "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        if (target / READY_MARKER).exists():
            print(f"elastiserve: python requirements already installed in {target}", flush=True)
            return 0
        shutil.rmtree(target, ignore_errors=True)  # what an interrupted install left
        print(f"elastiserve: installing python requirements into {target}", flush=True)
        pip = [sys.executable, "-m", "pip", "install", "--no-input", "--disable-pip-version-check"]
        code = subprocess.call([*pip, "--target", str(target), "-r", str(requirements_file)])
        if code != 0:
            shutil.rmtree(target, ignore_errors=True)
            return code
        (target / READY_MARKER).write_text("")
        return 0


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[2] != "--":
        print("usage: python -m elastiserve.controlplane.runtimes.pyreqs TARGET REQUIREMENTS -- COMMAND...")
        return 2
    target, requirements_file, command = Path(argv[0]), Path(argv[1]), argv[3:]
    code = ensure_installed(target, requirements_file)
    if code != 0:
        print(f"error: installing prepare.pythonRequirements failed (pip exited with {code})", flush=True)
        return 1
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(target), env.get("PYTHONPATH", "")) if p)
    env["PATH"] = os.pathsep.join(p for p in (str(target / "bin"), env.get("PATH", "")) if p)
    sys.stdout.flush()
    try:
        os.execvpe(command[0], command, env)
    except OSError as exc:
        print(f"error: cannot run {command[0]}: {exc.strerror or exc}", flush=True)
        return 127
    return 0  # not reached: exec replaced this process


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
