"""What a video costs to read into its moments (`cliplens.video.read_moments`): seconds of
work per minute of video, at phone resolutions.

Each video is made here as a phone records one: H.264 (libx264, preset medium, CRF 20,
its default B-frames), 30 frames a second, 1280x720 or 1920x1080, four shots of
scikit-image's photos, each a slow pan across the upscaled photo with sensor-like grain,
so the encoder has motion and detail to code as in a real clip. Reading one decodes its
frames (FFmpeg's own threads), compares frames with the last moment kept (16x16 grey
thumbnails) and crops the moments for the model (224 px). The default sampling (a moment
per new view, at least 1 s and at most 10 s apart) is timed with the frames no other
frame refers to skipped (the default) and with every frame decoded (`all_frames`); the
moments found are printed too.

    PYTHONPATH=src python benchmarks/bench_video.py --seconds 20 --runs 3 --out video.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from cliplens.preprocess import Preprocessing
from cliplens.video import VideoSampling, read_moments

PREP = Preprocessing(224, 224, (0.48, 0.46, 0.41), (0.27, 0.26, 0.28))


def make_clip(path: Path, size: tuple[int, int], seconds: float, fps: int = 30) -> None:
    import av
    from skimage import data

    w, h = size
    photos = [data.chelsea(), data.rocket(), data.coffee(), data.astronaut()]
    frames_per_shot = round(seconds * fps / len(photos))
    rng = np.random.default_rng(0)
    with av.open(str(path), "w", options={"movflags": "+faststart"}) as out:
        stream = out.add_stream("libx264", rate=fps, options={"preset": "medium", "crf": "20"})
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for photo in photos:
            big = Image.fromarray(photo).resize((int(w * 1.25), int(h * 1.25)))
            wide = np.asarray(big, np.int16)
            for i in range(frames_per_shot):  # a slow pan across the photo
                x = round((wide.shape[1] - w) * i / frames_per_shot)
                view = wide[:h, x : x + w] + rng.normal(0, 3, (h, w, 3)).astype(np.int16)
                frame = av.VideoFrame.from_ndarray(np.clip(view, 0, 255).astype(np.uint8))
                out.mux(stream.encode(frame))
        out.mux(stream.encode())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--clips", type=Path, help="keep the clips here and reuse them")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.clips or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for size in ((1280, 720), (1920, 1080)):
            clip = folder / f"clip-{size[1]}p-{args.seconds:g}s.mp4"
            if not clip.exists():
                make_clip(clip, size, args.seconds)
            for every in (False, True):
                rows.append(_measure(clip, size, VideoSampling(all_frames=every), args.runs))
                print(json.dumps(rows[-1]))
    report = {"cpus": os.cpu_count(), "machine": platform.processor(), "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


def _measure(clip: Path, size: tuple[int, int], sampling: VideoSampling, runs: int) -> dict:
    read_moments(str(clip), PREP, sampling)  # warm: the page cache, FFmpeg's libraries
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        moments = read_moments(str(clip), PREP, sampling)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {
        "size": f"{size[0]}x{size[1]}",
        "all_frames": sampling.all_frames,
        "seconds": moments.duration,
        "megabytes": round(clip.stat().st_size / 1e6, 1),
        "moments_s": [t / 1000 for t in moments.times_ms],
        "read_s": round(median, 3),
        "per_minute_s": round(median * 60 / moments.duration, 2),
        "realtime_x": round(moments.duration / median, 1),
    }


if __name__ == "__main__":
    main()
