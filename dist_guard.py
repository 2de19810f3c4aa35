"""--dist_timeout: how long a collective waits for the other ranks, and what a rank says when one never comes.

The ranks of a run go apart at a few places: rank 0 alone writes the sample answers, the loss plot and the
checkpoint's model files while the others wait at the next barrier. A bug there (issue 34: rank 0 generating
through the sequence-parallel all-to-all while rank 1 sat at save_checkpoint's barrier) used to hang silently for
DeepSpeed's default of 10 minutes and then die with gloo's "Timed out waiting 600000ms for recv operation".

Here: the process group's timeout is --dist_timeout (deepspeed.init_distributed(timeout=...), which hands it to
torch.distributed.init_process_group), and the places where the ranks can diverge run inside `stage(what)`: a
collective that times out there ends the rank with one line naming the rank, the step and what it was doing. The
barriers of those places are gloo's monitored barriers (`barrier()`), whose error names the ranks that did not
arrive; on GPUs they run in a small gloo group beside NCCL's (monitored_barrier exists for gloo only).
"""
from __future__ import annotations

import contextlib
import datetime
import logging

import torch

logger = logging.getLogger("chatglm")

# The longest a rank legitimately waits inside a collective is rank 0 writing a checkpoint (a full GLM-4-9B is 19 GB
# of safetensors, minutes on a network file system) or generating the sample answers alone. On GPUs the default stays
# DeepSpeed's and NCCL's 10 minutes; on the CPU (gloo) the models are small and 3 minutes is ample, so a stuck run
# ends in minutes.
DEFAULT_MINUTES = {"gpu": 10.0, "cpu": 3.0}
_guard = {"minutes": None, "group": None}


def add_flag(group) -> None:
    group.add_argument("--dist_timeout", type=float, default=None, metavar="MINUTES",
                       help=f"how long a collective (all-reduce, barrier) waits for the other ranks before the run "
                            f"stops with a line naming the rank and step (default {DEFAULT_MINUTES['gpu']:g} on GPUs, "
                            f"{DEFAULT_MINUTES['cpu']:g} on the CPU); raise it where rank 0 takes longer to write a "
                            f"checkpoint or the sample answers")


def check_flag(parser, args) -> None:
    if args.dist_timeout is not None and not args.dist_timeout > 0:
        parser.error(f"--dist_timeout must be above 0 minutes, got {args.dist_timeout}")


def timeout(minutes: float | None) -> datetime.timedelta:
    """The process group's timeout: --dist_timeout, or the default for this machine."""
    if minutes is None:
        minutes = DEFAULT_MINUTES["gpu" if torch.cuda.is_available() else "cpu"]
    _guard["minutes"] = minutes
    return datetime.timedelta(minutes=minutes)


def setup() -> None:
    """After the process group is up (on every rank: creating a group is collective): the gloo group the monitored
    barriers use, the default group itself where that is gloo already."""
    if torch.distributed.get_backend() != "gloo":
        _guard["group"] = torch.distributed.new_group(backend="gloo", timeout=timeout(_guard["minutes"]))


def barrier() -> None:
    """A barrier that, when ranks are missing after --dist_timeout, raises an error naming them."""
    torch.distributed.monitored_barrier(group=_guard["group"], timeout=timeout(_guard["minutes"]),
                                        wait_all_ranks=True)


def timed_out(error: BaseException) -> bool:
    """A collective gave up waiting: gloo's "Timed out waiting ...", a monitored barrier's "failed to pass", NCCL's
    watchdog timeout, or a peer that died meanwhile ("Connection closed by peer")."""
    text = str(error)
    return any(part in text for part in ("Timed out", "timed out", "failed to pass monitoredBarrier", "Timeout",
                                         "Connection closed by peer", "Connection reset by peer"))


@contextlib.contextmanager
def stage(what: str):
    """Around a part of the run where the ranks can be at different places (`what`: "step 12: saving ..."): a
    collective that times out inside ends this rank with one line that says where it was."""
    try:
        yield
    except RuntimeError as error:  # torch.distributed.DistError and DistBackendError are RuntimeErrors
        if not timed_out(error) or not torch.distributed.is_initialized():
            raise
        rank = torch.distributed.get_rank()
        detail = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise SystemExit(f"rank {rank}, {what}: a collective waited longer than --dist_timeout "
                         f"{_guard['minutes']:g} min ({detail}); the ranks are at different points of the run (each "
                         f"rank's line says where it is). If one rank was only slow (writing a big checkpoint), "
                         f"raise --dist_timeout") from None
