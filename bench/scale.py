"""Many machines, measured on one: object storage and Dask against the local way.

On 10,000 small noisy PNGs (the MNIST test set, noise 0.5) and 3 images of
2048x2048, with one real Prefect server and moto's S3 server on loopback
(each its own process), side by side in one run:

* ``denoise folder`` with the store, the input and the output on the local
  disk, in this process (``local``);
* the same with all three in the S3 bucket (``s3``): ratio to local, target >= 0.6;
* the same on a ``distributed.LocalCluster`` of 2 worker processes through
  prefect-dask (``dask``): ratio to local, target >= 0.9 on this 2-core machine;
* how many chunk tasks per second the Prefect server absorbed (a rerun of
  the Dask way in chunks of 10 files, every file already up to date), and so
  at how many workers the server, not the model, would be the limit;
* training (the ``seed`` architecture, batch 64, one epoch) streaming Parquet
  shards from the bucket against the same shards on local disk: samples/s
  ratio, target >= 0.9;
* the peak memory of each way (the command and its worker processes, summed);
* photographs: ``denoise folder`` on grey 512x512 noisy photographs (made
  from the CBSD432 mirror as ``bench/photo_throughput.py`` makes them, the
  package's built-in grey model) with the store and the folders in the
  bucket against the local disk: the ratio for work that is not dominated
  by per-request cost (``--photos N``, default 100; ``--photos-only`` runs
  just these rows).

This machine switches between two speeds every few seconds (see
``bench/denoise_throughput.py``), so each other way runs between two local
runs and is compared with their mean.

    python bench/scale.py [--small 10000] [--large 3] [--samples 20000] [--photos 100]
                          [--quick] [--photos-only]

The model is an untrained ``unet`` from seed 0 (speed does not depend on
training, only on the weights' values, hence the seed).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from _common import (
    REPO,
    add_mirror_argument,
    free_port,
    peak_rss_mb,
    run_child,
    start_prefect_server,
    wait_http,
    write_mnist_shards,
)

sys.path.insert(0, str(REPO))

BUCKET = "bench"
VERSION = "bench-unet"
SUMMARY = re.compile(r"(\d+) denoised, (\d+) skipped, (\d+) failed in ([\d.]+) s")


def request_cost(url: str, moto_pid: int, n: int = 1000) -> dict[str, tuple[float, float]]:
    """CPU per request of small objects (800 bytes) in this client (the folder
    runs' object client, from 16 threads as a folder run does) and in the moto
    server: what S3 costs this machine when the server runs on it too."""
    import resource
    from concurrent.futures import ThreadPoolExecutor

    import psutil

    from denoiser.folder.trees import open_tree

    tree = open_tree(url, "output", must_exist=False)
    moto = psutil.Process(moto_pid)
    data = os.urandom(800)
    out = {}
    with ThreadPoolExecutor(16) as pool:
        for name, call in (
            ("PUT", lambda i: tree.write(tree.path(f"{i}.png"), data)),
            ("GET", lambda i: tree.read(tree.path(f"{i}.png"))),
        ):
            m0, r0 = moto.cpu_times(), resource.getrusage(resource.RUSAGE_SELF)
            list(pool.map(call, range(n)))
            m1, r1 = moto.cpu_times(), resource.getrusage(resource.RUSAGE_SELF)
            client = r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime
            server = m1.user + m1.system - m0.user - m0.system
            out[name] = (client / n * 1e3, server / n * 1e3)
    return out


def start_servers(work: Path) -> tuple[dict[str, str], list[subprocess.Popen]]:
    """moto's S3 server and a Prefect server, each its own process; the
    environment a client needs to use both."""
    s3_port = free_port()
    logs = work / "logs"
    logs.mkdir()
    moto = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(s3_port)],
        stdout=open(logs / "moto.log", "wb"),  # noqa: SIM115 - lives as long as the server
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    started = [moto]
    try:
        prefect, api = start_prefect_server(work / "prefect-server", logs / "prefect.log")
        started.append(prefect)
        wait_http(f"http://127.0.0.1:{s3_port}/", moto, "moto server")
    except BaseException:
        for proc in started:  # no server left behind when one does not answer
            os.killpg(proc.pid, 9)
        raise
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3_port}",
        "PREFECT_API_URL": api,
        "PREFECT_HOME": str(work / "prefect-client"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "PYTHONPATH": str(REPO),
    }
    return env, [moto, prefect]


def make_images(mirror: Path, folder: Path, small: int, large: int) -> None:
    from PIL import Image

    from denoiser.data.datasets import read_idx

    x = read_idx(mirror / "t10k-images-idx3-ubyte.gz")[:small].astype("float64") / 255.0
    noisy = np.clip(x + 0.5 * np.random.default_rng(12345).normal(size=x.shape), 0, 1)
    noisy_u8 = np.rint(noisy * 255).astype(np.uint8)
    for i in range(len(noisy_u8)):
        sub = folder / "small" / f"{i // 1000:02d}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(noisy_u8[i]).save(sub / f"{i:05d}.png")
    rng = np.random.default_rng(1)
    (folder / "large").mkdir(parents=True)
    for i in range(large):
        base = np.kron(x[i % len(x)], np.ones((74, 74)))[:2048, :2048]
        base = np.pad(base, ((0, 2048 - base.shape[0]), (0, 2048 - base.shape[1])))
        img = np.clip(base + 0.3 * rng.normal(size=base.shape), 0, 1)
        Image.fromarray(np.rint(img * 255).astype(np.uint8)).save(folder / "large" / f"big{i}.png")


def register_model(stores: list[str], work: Path) -> None:
    """The same seeded untrained unet as version VERSION in every store."""
    import keras

    from artifacts.registry import register_model as register
    from artifacts.store import Store
    from denoiser.nets.models import build_model

    keras.utils.set_random_seed(0)
    model = build_model("unet")
    folder = work / "model" / VERSION
    folder.mkdir(parents=True)
    model.save(folder / "model.keras")
    card = {
        "version": VERSION,
        "architecture": "unet",
        "params": model.count_params(),
        "dataset": "mnist",
        "quality_gate": {"passed": True},
        "metrics": {"psnr_denoised": 0.0},
    }
    (folder / "model.json").write_text(json.dumps(card))
    for root in stores:
        store = Store.at(root)
        target = store.join("models", VERSION) if store.remote else store.models_root / VERSION
        if store.remote:
            for name in ("model.keras", "model.json"):
                store.write_bytes(f"{target}/{name}", (folder / name).read_bytes())
        else:
            shutil.copytree(folder, target)
        register(root, target)


class TreeMemory:
    """Peak of the summed resident memory of a process and its descendants."""

    def __init__(self, pid: int):
        import psutil

        self.root = psutil.Process(pid)
        self.peak = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self) -> None:
        import psutil

        while not self.stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
                total = 0
                for p in procs:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        continue
                self.peak = max(self.peak, total)
            except psutil.Error:
                return
            time.sleep(0.5)

    def finish(self) -> float:
        self.stop.set()
        self.thread.join()
        return self.peak / 2**20


SERVER_PIDS: dict[str, int] = {}  # moto and prefect: their CPU is counted per run


def server_cpu() -> dict[str, float]:
    import psutil

    out = {}
    for name, pid in SERVER_PIDS.items():
        procs = [psutil.Process(pid)]
        procs += procs[0].children(recursive=True)
        out[name] = sum(sum(p.cpu_times()[:2]) for p in procs)
    return out


def run_folder(env: dict, work: Path, args: list[str], name: str) -> dict:
    """One ``denoise folder`` command; its summary line, wall time, peak
    memory, and the CPU seconds it and each server used meanwhile."""
    import resource

    start = time.perf_counter()
    before, cpu0 = server_cpu(), resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "folder", *args],
        cwd=work,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    memory = TreeMemory(proc.pid)
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    after, cpu1 = server_cpu(), resource.getrusage(resource.RUSAGE_CHILDREN)
    peak = memory.finish()
    match = SUMMARY.search(out)
    if proc.returncode != 0 or match is None:
        sys.exit(f"{name}: exit {proc.returncode}\n{out[-2000:]}\n{err[-3000:]}")
    denoised, skipped, failed, seconds = match.groups()
    return {
        "denoised": int(denoised),
        "skipped": int(skipped),
        "failed": int(failed),
        "seconds": float(seconds),
        "wall": wall,
        "peak_mb": peak,
        "cpu": cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime,
        **{f"cpu_{k}": after[k] - before[k] for k in after},
    }


def train_child(location: str, samples: int) -> dict:
    """One epoch of the seed architecture streamed from the shards at ``location``."""
    import keras

    from denoiser.learning.training import make_dataset
    from denoiser.nets.models import build_model

    keras.utils.set_random_seed(0)
    model = build_model("seed")
    model.compile(keras.optimizers.Adam(), loss="binary_crossentropy")
    ds = make_dataset(location, "train", batch_size=64, shuffle_buffer=10_000, seed=0)
    model.fit(ds.take(1), epochs=1, verbose=0)  # build and trace first
    start = time.perf_counter()
    model.fit(ds, epochs=1, verbose=0)
    return {"samples": samples, "seconds": time.perf_counter() - start, "peak_mb": peak_rss_mb()}


def write_shards(mirror: Path, out: Path, samples: int) -> None:
    from denoiser.data.datasets import read_idx

    images = read_idx(mirror / "train-images-idx3-ubyte.gz")[:samples]
    labels = read_idx(mirror / "train-labels-idx1-ubyte.gz")[:samples]
    write_mnist_shards(out, images, labels, shard_rows=5_000)


def photo_rows(env: dict, work: Path, fs, count: int) -> None:
    """``denoise folder`` on ``count`` grey 512x512 photographs: local, then
    store and folders in the bucket, then local again (the built-in model:
    neither store has a photo model)."""
    from photo_throughput import MIRROR, make_folder

    photos = work / "photos"
    make_folder(photos, sorted(MIRROR.glob("*.jpg")), count, 512, colour=False, seed=0)
    fs.put(str(photos) + "/", f"{BUCKET}/photos", recursive=True)
    local_store, s3_store = str(work / "photo-store"), f"s3://{BUCKET}/photo-store"

    def local(k: int) -> dict:
        out = work / f"photos-out-{k}"
        return run_folder(env, work, [str(photos), str(out), "--store", local_store], "photos")

    first = local(0)
    s3 = run_folder(
        env,
        work,
        [f"s3://{BUCKET}/photos", f"s3://{BUCKET}/photos-clean", "--store", s3_store],
        "photos s3",
    )
    rows = [("local 1", first), ("s3 store, s3 in and out", s3), ("local 2", local(1))]
    mp = count * 512 * 512 / 1e6
    print(f"\n{count} grey 512x512 photographs (built-in grey model, OpenVINO on the CPU):")
    print_ways(rows, "MP/s", lambda r: f"{mp / r['seconds']:.2f}")
    local_rate = np.mean([rate(rows[0][1]), rate(rows[2][1])])
    print(f"ratio s3 / local, photographs: {rate(s3) / local_rate:.2f}\n")


def print_ways(rows: list[tuple[str, dict]], unit: str, speed) -> None:
    """The table of ``run_folder`` results, one row a way; ``speed(r)`` in ``unit``."""
    print(
        f"{'way':<28} {unit:>9} {'stage s':>8} {'wall s':>7} {'peak MB':>8}"
        f" {'CPU s: command':>15} {'moto':>5} {'prefect':>8}"
    )
    for name, r in rows:
        print(
            f"{name:<28} {speed(r):>9} {r['seconds']:>8.1f} {r['wall']:>7.1f}"
            f" {r['peak_mb']:>8.0f} {r['cpu']:>15.1f} {r['cpu_moto']:>5.1f}"
            f" {r['cpu_prefect']:>8.1f}"
        )


def rate(r: dict) -> float:
    return (r["denoised"] + r["skipped"]) / r["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=10_000)
    parser.add_argument("--large", type=int, default=3)
    parser.add_argument("--samples", type=int, default=20_000, help="training samples")
    parser.add_argument("--photos", type=int, default=100, help="grey 512x512 photographs")
    parser.add_argument("--photos-only", action="store_true", help="only the photographs' rows")
    parser.add_argument(
        "--quick", action="store_true", help="1,000 small, 1 large, 5,000 samples, 20 photos"
    )
    parser.add_argument(
        "--train-child", nargs=2, metavar=("LOCATION", "SAMPLES"), help=argparse.SUPPRESS
    )
    add_mirror_argument(parser)
    args = parser.parse_args()
    if args.train_child:
        print(json.dumps(train_child(args.train_child[0], int(args.train_child[1]))))
        return
    if args.quick:
        args.small, args.large, args.samples, args.photos = 1_000, 1, 5_000, 20
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    work = Path(tempfile.mkdtemp(prefix="denoise-scale-"))
    servers: list[subprocess.Popen] = []
    try:
        env, servers = start_servers(work)
        SERVER_PIDS.update(moto=servers[0].pid, prefect=servers[1].pid)
        os.environ.update({k: env[k] for k in env if k.startswith("AWS_")})
        import s3fs

        fs = s3fs.S3FileSystem()
        fs.mkdir(BUCKET)
        cost = request_cost(f"s3://{BUCKET}/cost", servers[0].pid)
        photo_rows(env, work, fs, args.photos)
        if args.photos_only:
            return
        images = work / "images"
        make_images(args.mirror, images, args.small, args.large)
        started = time.perf_counter()
        fs.put(str(images) + "/", f"{BUCKET}/images", recursive=True)
        upload_s = time.perf_counter() - started
        local_store, s3_store = str(work / "store"), f"s3://{BUCKET}/store"
        register_model([local_store, s3_store], work)
        total = args.small + args.large

        def local(k: int) -> dict:
            return run_folder(
                env,
                work,
                [str(images), str(work / f"out-local-{k}"), "--model", VERSION]
                + ["--store", local_store],
                "local",
            )

        runs: dict[str, dict] = {}
        locals_ = [local(0)]
        runs["s3"] = run_folder(
            env,
            work,
            [f"s3://{BUCKET}/images", f"s3://{BUCKET}/clean", "--model", VERSION]
            + ["--store", s3_store],
            "s3",
        )
        locals_.append(local(1))
        runs["dask"] = run_folder(
            env,
            work,
            [str(images), str(work / "out-dask"), "--model", VERSION, "--store", local_store]
            + ["--workers", "2"],
            "dask",
        )
        locals_.append(local(2))
        # every file is up to date now: chunks of 10 cost the orchestration, not the model
        chunks = run_folder(
            env,
            work,
            [str(images), str(work / "out-dask"), "--model", VERSION, "--store", local_store]
            + ["--workers", "2", "--chunk-files", "10"],
            "chunks",
        )

        shards = work / "shards"
        write_shards(args.mirror, shards, args.samples)
        fs.put(str(shards) + "/", f"{BUCKET}/shards", recursive=True)
        train = [
            run_child(__file__, ["--train-child", where, str(args.samples)], name, env)
            for where, name in (
                (str(shards), "train local"),
                (f"s3://{BUCKET}/shards", "train s3"),
                (str(shards), "train local"),
            )
        ]

        print(
            f"{total:,} images ({args.small:,} small 28x28 PNGs + {args.large} of 2048x2048), "
            f"{os.cpu_count()} CPU cores; moto and Prefect servers on loopback "
            f"(upload of the images to the bucket: {upload_s:.1f} s)"
        )
        labels = {"s3": "s3 store, s3 in and out", "dask": "dask, 2 worker processes"}
        rows = [(f"local {k + 1}", r) for k, r in enumerate(locals_)]
        rows += [(labels[n], r) for n, r in runs.items()]
        print_ways(rows, "images/s", lambda r: f"{rate(r):.0f}")
        s3_ratio = rate(runs["s3"]) / np.mean([rate(locals_[0]), rate(locals_[1])])
        dask_ratio = rate(runs["dask"]) / np.mean([rate(locals_[1]), rate(locals_[2])])
        s3_wall = np.mean([locals_[0]["wall"], locals_[1]["wall"]]) / runs["s3"]["wall"]
        dask_wall = np.mean([locals_[1]["wall"], locals_[2]["wall"]]) / runs["dask"]["wall"]
        print(
            f"ratio s3 / local:   {s3_ratio:.2f} (target >= 0.6); by command wall time {s3_wall:.2f}"
        )
        print(
            "  CPU per small-object request on this machine: "
            + ", ".join(
                f"{k} {c:.1f} ms in the client + {m:.1f} ms in moto" for k, (c, m) in cost.items()
            )
        )
        print(
            f"ratio dask / local: {dask_ratio:.2f} (target >= 0.9); by command wall time {dask_wall:.2f}"
        )
        n_chunks = -(-total // 10)
        absorbed = n_chunks / chunks["seconds"]
        from denoiser.folder import auto_chunk_files

        chunk = auto_chunk_files(total, 2)  # what the Dask run above used
        per_worker = rate(runs["dask"]) / 2 / chunk  # chunk tasks/s one worker finishes
        print(
            f"chunk tasks: {n_chunks} of 10 up-to-date files in {chunks['seconds']:.1f} s = "
            f"{absorbed:.1f} tasks/s absorbed (with 2 workers; a lower bound for the server)"
        )
        print(
            f"one worker finishes {per_worker:.2f} chunks/s of {chunk} files here "
            f"({per_worker * chunk / 256:.2f} of 256), so the server would be the limit from "
            f"about {absorbed / per_worker:.0f} such workers ({absorbed / per_worker / chunk * 256:.0f} "
            "with chunks of 256)"
        )
        t_local = [t["samples"] / t["seconds"] for t in (train[0], train[2])]
        t_s3 = train[1]["samples"] / train[1]["seconds"]
        print(
            f"training from shards, seed architecture, {args.samples:,} samples: local "
            f"{t_local[0]:.0f} and {t_local[1]:.0f} samples/s, s3 {t_s3:.0f}; ratio "
            f"{t_s3 / np.mean(t_local):.2f} (target >= 0.9); peak MB local "
            f"{train[0]['peak_mb']:.0f}, s3 {train[1]['peak_mb']:.0f}"
        )
    finally:
        for proc in servers:
            try:
                os.killpg(proc.pid, 15)
                proc.wait(20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(proc.pid, 9)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
