"""Multi-device test workers: a test file runs itself (or the CLI) as a subprocess with fake CPU devices, since
XLA's device count is fixed when JAX starts and the pytest process has one."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def spawn(args: list[str], devices: int, log: Path, stdout: Path | None = None) -> subprocess.Popen:
    """``python args...`` with ``devices`` fake CPU devices; stderr (and stdout unless given) to ``log``."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(HERE), os.environ.get("PYTHONPATH", "")]))
    with open(log, "w") as err, open(stdout or os.devnull, "w") as out:
        proc = subprocess.Popen([sys.executable, *args], env=env, cwd=ROOT, stdout=out if stdout else err,
                                stderr=err, text=True)
    proc.log = log
    return proc



def finish(proc: subprocess.Popen, timeout: float = 900) -> None:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"worker timed out after {timeout} s:\n{proc.log.read_text()[-4000:]}")
    assert proc.returncode == 0, f"worker failed (rc {proc.returncode}):\n{proc.log.read_text()[-6000:]}"



def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]



def jaxpr_walk(jaxpr, inherited=""):
    """(name stack, eqn) over a jaxpr and all sub-jaxprs (closed or open, also in tuples), in order."""
    import jax
    for eqn in jaxpr.eqns:
        stack = inherited + "/" + str(eqn.source_info.name_stack)
        yield stack, eqn
        for val in eqn.params.values():
            for v in (val if isinstance(val, (tuple, list)) else (val,)):
                if isinstance(v, jax.extend.core.ClosedJaxpr):
                    v = v.jaxpr
                if isinstance(v, jax.extend.core.Jaxpr):
                    yield from jaxpr_walk(v, stack)


def run(args: list[str], devices: int, timeout: float = 600) -> None:
    """``python args...`` with ``devices`` fake CPU devices, to the end; fails the test with its stderr's tail."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(HERE), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]


def stop(procs: dict) -> None:
    """Kill the workers still running (a fixture's teardown)."""
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()
