"""What every benchmark records about the machine it ran on."""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (the platform's processor string elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def source_state() -> dict:
    """The commit the benchmark ran on and the package files that differed from it."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            return ""
    changed = [line[3:] for line in git("status", "--short", "--", "approxdarts_np").splitlines()]
    return {"commit": git("rev-parse", "HEAD").strip() or None, "uncommitted_package_files": changed}


def avx2_target_env() -> dict:
    """Environment that makes Numba compile for this host's features minus AVX-512 (and AMX):
    the code an AVX2 CPU runs, on any x86-64 machine that has AVX2."""
    from llvmlite import binding
    feats = binding.get_host_cpu_features()
    if not feats.get("avx2"):
        raise SystemExit("this CPU has no AVX2")
    listed = ",".join(("+" if on and not name.startswith(("avx512", "avx10", "amx")) else "-") + name
                      for name, on in feats.items())
    return {"NUMBA_CPU_FEATURES": listed, "NUMBA_CPU_NAME": binding.get_host_cpu_name()}


def numba_builds_avx512() -> bool:
    """Whether Numba builds this process's kernels with AVX-512: the features NUMBA_CPU_FEATURES
    lists when set, else the host's."""
    listed = os.environ.get("NUMBA_CPU_FEATURES")
    if listed is not None:
        return "+avx512f" in listed.split(",")
    from llvmlite import binding
    return bool(binding.get_host_cpu_features().get("avx512f"))


def machine_info(threads: int) -> dict:
    """Python, platform, cores, library versions, CPU model, threading environment and load average."""
    import numba
    import numpy
    info = {"python": platform.python_version(), "platform": platform.platform(), "cores": os.cpu_count(),
            "numpy": numpy.__version__, "numba": numba.__version__, "threads": threads}
    try:
        import torch
        info["torch"] = torch.__version__
    except ImportError:
        info["torch"] = None
    info["cpu"] = cpu_model()
    import approxdarts_np  # noqa: F401  (sets the package's threading defaults, recorded below)
    info["env"] = {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT",
                                                  "NUMBA_THREADING_LAYER", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS",
                                                  "NUMBA_CPU_NAME", "APPROXDARTS_NP_TABLE_KERNELS")}
    from approxdarts_np.kernels import byte_shuffle
    # the table kernels this process runs (the target's features, or a forced path)
    info["table_kernels"] = byte_shuffle.path()
    info["avx512_in_target"] = numba_builds_avx512()
    info["numba_threading_layer"] = numba.config.THREADING_LAYER
    info["load_average"] = os.getloadavg()
    return info
