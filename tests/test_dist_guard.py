"""--dist_timeout (dist_guard.py): where the ranks of a run can be at different points, a collective that cannot
complete ends the run after --dist_timeout with one line naming the rank and the step, instead of gloo's silent
10-minute wait (issue 34)."""
import os

import pytest
import torch.distributed
import torch.multiprocessing

import dist_guard
from conftest import ROOT, free_port


def one_rank_skips_the_save(rank: int, port: int, result_dir: str) -> None:
    """Two gloo ranks with 3 seconds of --dist_timeout, set up as train.init_distributed does (the process group's
    timeout from dist_guard.timeout, then dist_guard.setup), without DeepSpeed's imports: rank 1 never comes to
    save_checkpoint's first barrier (a dist_guard barrier inside the step's stage), as in the issue, where it sat
    elsewhere. What each rank ended with goes to result_dir/rank<R>."""
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                                         timeout=dist_guard.timeout(0.05))
    dist_guard.setup()
    message = "no error"
    try:
        with dist_guard.stage("step 3 (saving epoch-1-step-3)"):
            if rank == 0:
                dist_guard.barrier()
    except SystemExit as error:
        message = str(error)
    with open(os.path.join(result_dir, f"rank{rank}"), "w", encoding="utf-8") as f:
        f.write(message)
    torch.distributed.destroy_process_group()


def test_a_rank_that_never_arrives_is_named_with_the_step(tmp_path):
    torch.multiprocessing.spawn(one_rank_skips_the_save, args=(free_port(), str(tmp_path)), nprocs=2)
    message = (tmp_path / "rank0").read_text(encoding="utf-8")
    # gloo's monitored barrier names the missing ranks (torch.distributed.monitored_barrier, wait_all_ranks=True)
    assert message.startswith("rank 0, step 3 (saving epoch-1-step-3): a collective waited longer than "
                              "--dist_timeout 0.05 min (")
    assert "Ranks 1 failed to pass monitoredBarrier in 3000 ms" in message and "raise --dist_timeout" in message
    assert "\n" not in message
    assert (tmp_path / "rank1").read_text(encoding="utf-8") == "no error"


def test_dist_timeout_must_be_positive(tiny_dirs, tmp_path, capsys):
    import train

    with pytest.raises(SystemExit) as exit_info:
        train.main(["--model_name_or_path", str(tiny_dirs["glm4"]), "--mode", "glm4", "--train_path",
                    str(ROOT / "data/train.jsonl"), "--output_dir", str(tmp_path / "out"), "--dist_timeout", "0"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("--dist_timeout must be above 0 minutes, got 0.0")
