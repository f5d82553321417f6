"""Where an image was rendered: the software stack and hardware it was rendered on (the
`env` column: bits can change with any of them) and the worker process (`worker`)."""

from __future__ import annotations

import os
import platform
import socket

from . import __version__


def environment_fingerprint(device: str) -> dict[str, str]:
    import diffusers
    import torch
    import transformers

    if device == "cuda":
        hardware = torch.cuda.get_device_name(0)
    else:
        hardware = _cpu_model()
    return {
        "sdbatch": __version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "hardware": hardware,
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _node_id() -> str:
    try:
        import ray

        if not ray.is_initialized():  # reruns and calibration run outside Ray
            return "local"
        return ray.get_runtime_context().get_node_id() or "local"
    except Exception:  # noqa: BLE001 - outside Ray (reruns, calibration)
        return "local"


def worker_name() -> str:
    """host:node:pid of this process (a node id only inside Ray)."""
    return f"{socket.gethostname()}:{_node_id()[:12]}:{os.getpid()}"
