"""What every entry point shares at run time: user errors as one line, devices and distributed processes.
Stop signals (SIGTERM, SIGINT) are signals.py."""
from __future__ import annotations

import os
import signal
import sys
import threading
import traceback
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from types import FrameType
from typing import Callable, ContextManager, Iterator

import torch
import torch.distributed as dist
from torch.utils.data._utils import signal_handling


class UserError(ValueError):
    """A problem with what the user gave us (a path, a value, a file): reported as one line, no traceback.

    Anything else that escapes a script's main is a bug in our code and keeps its traceback.
    """


def run_cli(body: Callable[[], int], debug: bool = False) -> int:
    """Run a script's body: a UserError or a failed file operation (full disk, permissions) becomes one
    `error:` line and exit 1; anything else is a bug and keeps its traceback. `--debug` shows them all."""
    try:
        return body()
    except BrokenPipeError:
        # Whoever read our stdout has gone (`caption.py ... | head -1`): stop quietly, as a command killed by
        # SIGPIPE would (exit 141), and point stdout at /dev/null so the exit-time flush cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        if debug:
            raise
        print("error: interrupted", file=sys.stderr)
        return 130
    except (UserError, OSError) as e:
        if debug:
            raise
        message = " ".join(str(e).split()) if isinstance(e, UserError) else one_line(e)  # one line, uncut
        print(f"error: {message}", file=sys.stderr)
        return 1


def one_line(error: BaseException) -> str:
    """An exception's message folded onto one line (YAML and h5py errors span several)."""
    text = " ".join(str(error).split())
    return text[:300] if text else type(error).__name__


def _dead_worker_in_a_blocked_read(signum: int, frame: FrameType | None) -> None:
    """SIGCHLD: raise a dead DataLoader worker's error only where the main thread is blocked reading a
    worker's pipe, the one wait torch's 5 s liveness check in each fetch cannot end (a batch cut off
    mid-write). torch's own handler raises wherever the main thread is, and an exception raised between a
    lock's acquire and its `with` block leaves the lock held: the loader's shutdown, or TensorBoard's writer,
    then waits on it forever (the likely cause of a CI hang on 2026-12-01, a training with a killed worker)."""
    if frame is not None and frame.f_globals.get("__name__") == "multiprocessing.connection":
        signal_handling._error_if_any_worker_fails()


def _install_sigchld_handler() -> None:
    """Put _dead_worker_in_a_blocked_read in place of torch's handler, in place of the one torch has set
    already or before it sets one (it sets it once a process, when a loader first starts workers)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGCHLD"):
        return
    signal_handling._SIGCHLD_handler_set = True  # torch: "set already", so it never installs its own
    signal.signal(signal.SIGCHLD, _dead_worker_in_a_blocked_read)


def _lost_in_transfer(error: BaseException) -> bool:
    """A batch's tensors come from the worker through a socket (torch's file-descriptor sharing): a worker
    killed mid-transfer is a ConnectionResetError, EOFError or FileNotFoundError raised there."""
    modules = {frame.f_globals.get("__name__") for frame, _ in traceback.walk_tb(error.__traceback__)}
    return bool(modules & {"multiprocessing.resource_sharer", "torch.multiprocessing.reductions"})


@contextmanager
def dead_workers_explained(lower: str, note: str = "") -> Iterator[None]:
    """A DataLoader worker killed (most likely by the OOM killer) is one UserError line naming what to
    lower (`lower`, e.g. "num_workers= or batch_size="), not torch's traceback. The next fetch raises it
    (see _dead_worker_in_a_blocked_read), or the epoch's end when every batch had arrived: wrap the whole
    loop, not the fetch. A UserError raised inside a worker (a shard stream with no usable sample) is its
    own line again, not torch's copy with the worker's traceback folded in."""
    _install_sigchld_handler()
    explain = f"(out of memory? lower {lower})" + (f"; {note}" if note else "")
    try:
        yield
    except UserError as e:  # raised in a worker (a shard stream's bad input): torch wraps it in the traceback
        text = str(e)
        if not text.startswith("Caught UserError in DataLoader worker"):
            raise
        raise UserError(text.rstrip().splitlines()[-1].split("UserError: ", 1)[-1]) from None
    except RuntimeError as e:
        if not str(e).startswith("DataLoader worker"):
            raise
        raise UserError(f"{one_line(e)} {explain}") from None
    except (OSError, EOFError) as e:
        if not _lost_in_transfer(e):
            raise
        raise UserError(f"DataLoader worker lost mid-batch ({one_line(e)}) {explain}") from None


# --------------------------------------------------------------------------------------------
# Devices, mixed precision and distributed training.
# --------------------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"device={name!r} is not a device (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={name} asked for, but CUDA is not available (use device=cpu or auto)")
    return device


def autocast_context(device: torch.device, amp: str) -> ContextManager:
    """One autocast-or-null context, so the training loop has no AMP branches (as nanoGPT)."""
    if device.type != "cuda" or amp == "off":
        return nullcontext()
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


@dataclass
class DistInfo:
    enabled: bool = False
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    is_main: bool = field(default=True)


def init_distributed(device_name: str) -> tuple[DistInfo, torch.device]:
    """Detect torchrun from the environment; nccl on CUDA, gloo on CPU."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return DistInfo(), resolve_device(device_name)
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(True, rank, local_rank, world, rank == 0), device


def cleanup_distributed(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
