"""Two CPU processes on the gloo backend through torchrun: DistributedDataParallel end to end."""

import json
import re
import subprocess
import sys
from pathlib import Path

import torch
from torch.utils.data import RandomSampler

from medvision.training.distributed import ShardedSampler


def test_shards_are_disjoint_equal_and_cover_the_epoch():
    g = [torch.Generator().manual_seed(3) for _ in range(2)]
    base = [RandomSampler(range(11), generator=gen) for gen in g]  # each rank draws the same order
    a, b = list(ShardedSampler(base[0], 0, 2)), list(ShardedSampler(base[1], 1, 2))
    assert len(a) == len(b) == 5 and not set(a) & set(b)
    full = list(RandomSampler(range(11), generator=torch.Generator().manual_seed(3)))
    assert sorted(a + b) == sorted(full[:10])


def test_two_process_ddp_on_gloo(synth_dir, tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    run = tmp_path / "run"
    proc = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "medvision.cli", "train", "--config", "tiny",
         "--labels", str(synth_dir / "labels.csv"), "--images", str(synth_dir / "images"), "--out", str(run),
         "--no-progress", "train.epochs=2", "train.threads=1", "data.val_fraction=0.25", "data.test_fraction=0.25"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((run / "metrics.json").read_text())
    r = m["reproducibility"]
    assert r["world_size"] == 2
    a, b = r["parameter_checksums"]
    assert a == b  # DDP kept the replicas identical
    shards = {int(k): int(v) for k, v in re.findall(r"rank (\d) of 2 \((\d+) samples per epoch\)", proc.stderr)}
    assert set(shards) == {0, 1} and shards[0] == shards[1] == m["images"]["train"] // 2
    assert 0.0 <= m["val_auroc"] <= 1.0 and (run / "best.safetensors").is_file() and (run / "last.pt").is_file()
    assert json.loads(proc.stdout)["best_epoch"] >= 1  # rank 0 printed the summary, rank 1 nothing
