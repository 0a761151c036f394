"""Photograph throughput of ``denoise folder`` against bare inference, side by
side in one run (issue 26's rows).

Makes three folders of noisy 8-bit photographs (AWGN sigma 25) from the
CBSD432 mirror, each image reflected out to a square:

(a) 200 grey 512x512, (b) 20 grey 2048x2048, (c) 200 colour 512x512,

then measures, for the model (default: the package's built-in grey model):

- bare Keras ``predict`` of whole 512x512 images, batch 1;
- bare OpenVINO, compiled once for 1x512x512, at f32 and at bf16 where the
  CPU has it (AMX or AVX512-BF16; elsewhere OpenVINO would run f32 anyway);
- ``denoise folder`` end to end on each folder, as a user runs it (its own
  process, an empty store so the built-in model is used), with a temporary
  Prefect server (the command starts one) and with a server running
  (``PREFECT_API_URL``, as after ``denoise server start``): wall seconds,
  and the work seconds its summary.json records.

A colour image through a grey model is three grey planes, so its bare rate
is counted in planes and its end-to-end rate in image pixels.

    python bench/photo_throughput.py [--model-dir DIR] [--small 200] [--large 20]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import REPO, start_prefect_server

sys.path.insert(0, str(REPO))
MIRROR = REPO.parent / "shared" / "datasets" / "cbsd432"
SIGMA = 25.0


def square(img: np.ndarray, side: int) -> np.ndarray:
    """``img`` reflected out (and cut) to ``side`` x ``side``."""
    while img.shape[0] < side or img.shape[1] < side:
        pad_h = min(img.shape[0] - 1, max(0, side - img.shape[0]))
        pad_w = min(img.shape[1] - 1, max(0, side - img.shape[1]))
        pads = ((0, pad_h), (0, pad_w)) + ((0, 0),) * (img.ndim - 2)
        img = np.pad(img, pads, mode="reflect")
    return img[:side, :side]


def make_folder(out: Path, sources: list[Path], count: int, side: int, colour: bool, seed: int):
    from PIL import Image

    out.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        rgb = np.asarray(Image.open(sources[i % len(sources)]).convert("RGB"), np.float64)
        img = rgb if colour else rgb @ np.array([0.299, 0.587, 0.114])
        img = square(img, side) + rng.normal(0, SIGMA, square(img, side).shape)
        Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8)).save(out / f"{i:04d}.png")


def planes_of(folder: Path, limit: int) -> list[np.ndarray]:
    """The first ``limit`` images of ``folder`` as (1, H, W, 1) float planes (colour: 3 each)."""
    from PIL import Image

    planes = []
    for path in sorted(folder.iterdir())[:limit]:
        a = np.asarray(Image.open(path), np.float32) / 255.0
        for c in range(a.shape[-1]) if a.ndim == 3 else [None]:
            planes.append((a if c is None else a[..., c])[None, ..., None])
    return planes


def bare_rate(run, planes: list[np.ndarray]) -> float:
    """Megapixels per second of ``run`` over ``planes``, after one warm-up call."""
    run(planes[0])
    start = time.perf_counter()
    for p in planes:
        run(p)
    return sum(p.size for p in planes) / 1e6 / (time.perf_counter() - start)


def bare_rows(model_dir: Path, planes: list[np.ndarray]) -> list[tuple[str, float]]:
    import openvino as ov

    from denoiser.core.cpu import cpu_flags
    from denoiser.nets.models import load_model

    rows = []
    model = load_model(model_dir / "model.keras")
    rows.append(("bare Keras predict, fp32", bare_rate(lambda x: model(x, training=False), planes)))
    core = ov.Core()
    ir = core.read_model(str(model_dir / "model.xml"))
    ir.reshape([1, *planes[0].shape[1:]])
    bf16 = bool({"amx_bf16", "avx512_bf16"} & set(cpu_flags()))
    for precision in ("f32", "bf16") if bf16 else ("f32",):
        compiled = core.compile_model(ir, "CPU", {"INFERENCE_PRECISION_HINT": precision})
        request = compiled.create_infer_request()
        rows.append(
            (
                f"bare OpenVINO {precision}",
                bare_rate(lambda x, r=request: r.infer([x]), planes),
            )
        )
    if not bf16:
        rows.append(("bare OpenVINO bf16", float("nan")))
    return rows


def folder_run(src: Path, work: Path, name: str, runtime: str, api: str | None) -> dict:
    """``denoise folder`` as a user runs it, in its own process, with an empty
    store; with the Prefect server at ``api``, else a temporary one."""
    store, out = work / f"store-{name}", work / f"out-{name}"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="3")
    if api:
        env["PREFECT_API_URL"] = api
    env.pop("DENOISE_BUILTIN_DIR", None)
    cmd = [sys.executable, "-c", "import sys; from flows.cli import main; sys.exit(main())"]
    cmd += ["--store", str(store), "folder", str(src), str(out), "--runtime", runtime]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"denoise folder {name} failed:\n{proc.stderr[-3000:]}")
    summary = json.loads(next(store.rglob("summary.json")).read_text())
    from PIL import Image

    pixels = sum(
        Image.open(p).size[0] * Image.open(p).size[1] for p in src.iterdir() if p.is_file()
    )
    return {"wall": wall, "work": summary["seconds"], "mp": pixels / 1e6, "summary": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, help="a model version folder (default: built in)")
    parser.add_argument("--small", type=int, default=200, help="512x512 images per folder")
    parser.add_argument("--large", type=int, default=20, help="2048x2048 grey images")
    parser.add_argument("--runtime", default="openvino")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from artifacts.builtin import builtin_model

    model_dir = args.model_dir or Path(builtin_model("photos").dir)
    sources = sorted(p for p in MIRROR.iterdir() if p.suffix == ".jpg")
    work = Path(tempfile.mkdtemp(prefix="denoise-photo-bench-"))
    try:
        folders = {
            "(a) grey 512x512": (work / "a", args.small, 512, False),
            "(b) grey 2048x2048": (work / "b", args.large, 2048, False),
            "(c) colour 512x512": (work / "c", args.small, 512, True),
        }
        for k, (path, count, side, colour) in enumerate(folders.values()):
            make_folder(path, sources, count, side, colour, seed=k)
        planes = planes_of(work / "a", 40)
        bare = bare_rows(model_dir, planes)
        print(f"model {model_dir.name}, {os.cpu_count()} CPU cores; 512x512 planes, batch 1")
        print("| row | MP/s |\n|---|---:|")
        for name, rate in bare:
            print(f"| {name} | {rate:.2f} |" if rate == rate else f"| {name} | n/a (no bf16) |")
        openvino_f32 = dict(bare)["bare OpenVINO f32"]
        server, api = start_prefect_server(work / "prefect-home")
        try:
            for label, url in (("a temporary server", None), ("a server running", api)):
                print(
                    f"\n`denoise folder --runtime {args.runtime}` end to end (own process, "
                    f"{label}, empty store):"
                )
                folder_rows(folders, work, args.runtime, url, openvino_f32)
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def folder_rows(folders: dict, work: Path, runtime: str, api: str | None, bare: float) -> None:
    """One table row per folder: ``denoise folder`` on it, against ``bare`` MP/s."""
    print("| folder | images | MP | wall s | work s | MP/s (work) | / bare OpenVINO f32 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, (path, count, _, colour) in folders.items():
        r = folder_run(path, work, f"{name[1]}-{'api' if api else 'temp'}", runtime, api)
        rate = r["mp"] / r["work"]
        planes_rate = rate * (3 if colour else 1)
        print(
            f"| {name} | {count} | {r['mp']:.1f} | {r['wall']:.1f} | {r['work']:.1f} | "
            f"{rate:.2f} | {planes_rate / bare:.2f} |",
            flush=True,
        )
        print(f"  routes: {json.dumps(r['summary'].get('by_model'))}", flush=True)


if __name__ == "__main__":
    main()
