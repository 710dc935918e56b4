"""Look at a quickstart run the way a person does: TensorBoard and the latent dashboard in headless Chromium.

Trains the TopK quickstart (unless ``--run`` names an existing run folder), starts ``tensorboard`` on it
(loopback only), and screenshots the Time Series (TensorBoard's landing page), Scalars, Images and Text
dashboards and the newest ``<checkpoint>.latents.html``; writes the PNGs to ``--out`` (default
``docs/screenshots/``) and prints ``name=value`` lines (paths, sizes, timings).

If the run's evaluation callback does not yet write the latent dashboards (``artifacts``/``texts`` of a
benchmark), the script writes them itself, as the callback would: ``<checkpoint>.latents.html`` beside every
checkpoint and one TensorBoard text entry per latent (``eval/latents/latent_NNNN``) at the checkpoint's step.

Needs the Debian package ``chromium`` (``apt-get install -y chromium``)::

    python benchmarks/screenshots.py                        # quickstart (200 steps, ~2-4 min on 2 cores) + shots
    python benchmarks/screenshots.py --run checkpoints/quickstart-topk --out /tmp/shots
    python benchmarks/screenshots.py --config configs/quickstart/sweep.yaml \
        --pages tensorboard_sweep_scalars tensorboard_sweep_hparams --width 1600 --height 1200   # a sweep's members
"""

from __future__ import annotations

import argparse
import glob
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCHES = "[loss_added,dead_latents,decoder_geometry,latents]"
PAGES = {  # name -> TensorBoard URL fragment (the Scalars shot filters on the training curves, see the README)
    "tensorboard_timeseries": "#timeseries",
    "tensorboard_scalars": "#scalars&tagFilter=%5E(train%7Cval)%2F",
    "tensorboard_images": "#images",
    "tensorboard_text": "#text",
}
#: pages shot only when named in ``--pages`` (a sweep's: its members, each a TensorBoard run, in one chart per metric)
EXTRA_PAGES = {"tensorboard_sweep_scalars": "#scalars&tagFilter=%5E(train%7Cval)%2F",
               "tensorboard_sweep_hparams": "#hparams"}


def train(root: Path, steps: int, config: str = "configs/quickstart/topk.yaml") -> Path:
    """Run a quickstart (``config``, default the TopK one) under ``root``; return its run folder."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    help_text = subprocess.run([sys.executable, "train.py", "--help"], cwd=REPO, env=env, capture_output=True,
                               text=True).stdout
    args = [sys.executable, "train.py", "--config", config, "--trainer.max_steps", str(steps),
            "--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root)]
    if "--evaluation" not in help_text:  # before the evaluation option group: add the callback by hand
        args += ["--trainer.callbacks+=gsae.callbacks.EvaluationCallback", f"--trainer.callbacks.benchmarks={BENCHES}"]
    t = time.perf_counter()
    subprocess.run(args, cwd=REPO, env=env, check=True)
    print(f"train_s={time.perf_counter() - t:.1f}")
    (run,) = {c.parent.parent for c in root.glob("*/checkpoints/*.ckpt")}
    return run


def ensure_latent_dashboards(run: Path) -> None:
    """Write ``<checkpoint>.latents.html`` and the TensorBoard texts where the callback did not."""
    ckpts = sorted(run.glob("checkpoints/*.ckpt"), key=os.path.getmtime)
    if all(Path(str(c) + ".latents.html").is_file() or any(c.parent.glob(glob.escape(c.name) + ".*.latents.html"))
           for c in ckpts):  # a one-SAE run's page, or a sweep's one per member (<checkpoint>.<member>.latents.html)
        return
    import torch
    from torch.utils.tensorboard import SummaryWriter

    from gsae.data.datamodule import TokenDataModule
    from gsae.evals import latents
    from gsae.export import load_checkpoint
    from gsae.lm import LanguageModel

    events = max(run.glob("version_*"), key=os.path.getmtime)
    lm = tokens = None
    writer = SummaryWriter(str(events))
    for ckpt in ckpts:
        sae, meta = load_checkpoint(ckpt)
        if lm is None:
            lm = LanguageModel(meta["lm"]["name"])
            data = meta.get("data") or {}
            dm = TokenDataModule(lm=lm, dataset=data.get("dataset", "gsae-corpus"),
                                 context_size=data.get("context_size", 64), batch_size=data.get("batch_size", 16))
            tokens = torch.tensor(list(itertools.islice(dm.contexts("val"), 32)))
        result = latents.run(sae.eval(), lm, meta["hook"], tokens, seed=0)
        for suffix, text in latents.artifacts(result).items():
            Path(str(ckpt) + suffix).write_text(text)
        step = int(torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"])
        if not ckpt.name.startswith("last"):
            for tag, md in latents.texts(result).items():
                writer.add_text(f"eval/latents/{tag}", md, global_step=step)
    writer.close()
    print(f"latent_dashboards_written_by_script={len(ckpts)}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_tensorboard(logdir: Path, port: int) -> subprocess.Popen:
    tb = shutil.which("tensorboard") or str(Path(sys.executable).with_name("tensorboard"))
    proc = subprocess.Popen([tb, "--logdir", str(logdir), "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(120):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/data/plugins_listing", timeout=2).read()
            return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("tensorboard did not start")


def screenshot(url: str, path: Path, width: int, height: int, budget_ms: int = 20000) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("error: chromium not found (apt-get install -y chromium)")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--user-data-dir={profile}", f"--window-size={width},{height}", f"--virtual-time-budget={budget_ms}",
             f"--screenshot={path}", url],
            check=True, capture_output=True, timeout=180,
        )


def shrink(path: Path, limit: int = 300_000) -> None:
    """Keep a PNG under ``limit`` bytes: quantize to 256 colours (TensorBoard pages are flat colour)."""
    from PIL import Image

    if path.stat().st_size <= limit:
        return
    Image.open(path).convert("RGB").quantize(256).save(path, optimize=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, default=None, help="an existing run folder (default: train the quickstart)")
    p.add_argument("--steps", type=int, default=200, help="quickstart steps when training")
    p.add_argument("--config", default="configs/quickstart/topk.yaml", help="the quickstart to train (without --run)")
    p.add_argument("--pages", nargs="+", default=None, choices=[*PAGES, *EXTRA_PAGES, "latents_html"],
                   help="the shots to take (default: every TensorBoard page but the extra ones, and latents_html); "
                   "e.g. --config configs/quickstart/sweep.yaml --pages tensorboard_sweep_scalars")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "screenshots", help="where the PNGs go")
    p.add_argument("--width", type=int, default=1400)
    p.add_argument("--height", type=int, default=1000)
    a = p.parse_args()
    wanted = a.pages or [*PAGES, "latents_html"]
    run = a.run or train(Path(tempfile.mkdtemp(prefix="gsae-shots-")), a.steps, a.config)
    ensure_latent_dashboards(run)
    a.out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc = start_tensorboard(run, port)
    try:
        for name, frag in {**PAGES, **EXTRA_PAGES}.items():
            if name not in wanted:
                continue
            t = time.perf_counter()
            path = a.out / f"{name}.png"
            screenshot(f"http://127.0.0.1:{port}/{frag}", path, a.width, a.height)
            shrink(path)
            print(f"{name}={path} bytes={path.stat().st_size} seconds={time.perf_counter() - t:.1f}")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(f"run={run}")
    if "latents_html" not in wanted:
        return
    pages = sorted(run.glob("checkpoints/*.latents.html"), key=os.path.getmtime)
    steps = [q for q in pages if not q.name.startswith("last")] or pages
    html_page = steps[-1]
    path = a.out / "latents_html.png"
    screenshot(html_page.resolve().as_uri(), path, a.width, 1600, budget_ms=3000)
    shrink(path)
    print(f"latents_html={path} bytes={path.stat().st_size} source={html_page}")
    print("pages=" + json.dumps(sorted(str(q.name) for q in pages)))


if __name__ == "__main__":
    main()
