"""Runs a script of tests/scaling/ in a fresh Python process.

Device layouts (logical CPUs, XLA host devices, TF_CONFIG clusters) are fixed
when TensorFlow or JAX first initialises, which the test session has already
done; a child process gets them without touching the rest of the suite.
"""

import json
import os
import socket
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(REPO, "tests", "scaling")


def child_env(**overrides):
    env = dict(os.environ)
    # The suite may run on another backend; each script names its own.
    for name in ("KERAS_BACKEND", "TF_CONFIG", "XLA_FLAGS"):
        env.pop(name, None)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (REPO, env.get("PYTHONPATH")) if p
    )
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.update(overrides)
    return env


def start(script, *args, **env):
    """Starts a script; its stdout and stderr go to one pipe."""
    return subprocess.Popen(
        [sys.executable, os.path.join(SCRIPTS, script), *map(str, args)],
        env=child_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(process, result_path=None, timeout=120):
    """Waits for a started script; returns the JSON it wrote, if any."""
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        raise AssertionError(f"script timed out:\n{output[-4000:]}")
    if process.returncode != 0:
        raise AssertionError(
            f"script exited with {process.returncode}:\n{output[-4000:]}"
        )
    if result_path is None:
        return None
    with open(result_path) as f:
        return json.load(f)


def run(script, *args, result_path=None, timeout=120, **env):
    return finish(start(script, *args, **env), result_path, timeout)


def free_ports(count):
    """Ports free right now; held open together so they are distinct."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()
