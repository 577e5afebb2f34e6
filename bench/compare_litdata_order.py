"""Does LitData give every global batch the same samples on 1 and 2 ranks? (docs/shards.md)

Not part of the product: LitData is not a dependency. Run with it installed:
    pip install litdata && python bench/compare_litdata_order.py
It writes 1000 samples with litdata.optimize, reads them shuffled (seed 7) with a
StreamingDataLoader on 1 rank and on 2 ranks (torch.distributed on gloo, one loader process
each, 16 samples a global batch), and compares the global batches. The same check for
MosaicML Streaming, which passes, is tests/unit/test_shards.py.
"""

import json
import os
import socket
import subprocess
import sys
import tempfile

GLOBAL_BATCH = 16


def read_as_rank(rank: int, world: int, data: str, port: str) -> None:
    import torch.distributed as dist
    from litdata import StreamingDataLoader, StreamingDataset

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    loader = StreamingDataLoader(
        StreamingDataset(data, shuffle=True, seed=7),
        batch_size=GLOBAL_BATCH // world,
        num_workers=1,
    )
    print(json.dumps([[int(i) for i in batch["index"]] for batch in loader]))


def sample(i: int) -> dict:
    return {"index": i}


def global_batches(data: str, world: int) -> list[list[int]]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(rank), str(world), data, port],
            stdout=subprocess.PIPE,
            text=True,
        )
        for rank in range(world)
    ]
    ranks = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    steps = min(len(r) for r in ranks)
    return [sorted(i for r in ranks for i in r[step]) for step in range(steps)]


def main() -> None:
    from litdata import optimize

    data = tempfile.mkdtemp()
    optimize(fn=sample, inputs=list(range(1000)), output_dir=data, chunk_size=50, num_workers=1)
    one, two = global_batches(data, 1), global_batches(data, 2)
    print(
        f"litdata: {len(one)} global batches on 1 rank, {len(two)} on 2; the same samples in "
        f"each: {one == two}; first batch on 1 rank {one[0][:6]}..., on 2 ranks {two[0][:6]}..."
    )


if __name__ == "__main__":
    if len(sys.argv) > 1:
        read_as_rank(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
    else:
        main()
