"""Load on satkit.serve beside caption.py on the same photos: latency, throughput and resident memory.

    python -m tools.serve_load --checkpoint runs/flickr8k_lite/best.pt              # 64 Flickr8k test photos
    python -m tools.serve_load --checkpoint runs/shapes/best.pt --photos runs/shapes/samples

Starts `python -m satkit.serve` on a free port of 127.0.0.1; CLIENTS threads each send PER_CLIENT photos one
after another (the page's request: default decoding, n_best 1, the overlay maps), ROUNDS times; then SIGTERM.
Then times caption.py on the same photos (a whole run: start, decode, figures) and the library's batch decode
alone (Captioner, batch 32). Prints the numbers side by side, with the CPU, the date and the load average.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parent.parent
FLICKR8K = ROOT.parent / "shared" / "data" / "flickr8k"


def cpu_line() -> str:
    """`AMD EPYC, 2 cores, AVX-512: no`: what every timing is written beside."""
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown CPU")
    avx512 = " avx512f " in f" {Path('/proc/cpuinfo').read_text().replace(chr(10), ' ')} "
    return f"{model}, {os.cpu_count()} cores, AVX-512: {'yes' if avx512 else 'no'}"


def flickr8k_test_photos(folder: Path, count: int) -> list[Path]:
    """The first `count` photos of the Karpathy test split."""
    split = json.loads((folder / "dataset_flickr8k.json").read_text())["images"]
    return [folder / "images" / image["filename"] for image in split if image["split"] == "test"][:count]


class RssSampler:
    """The resident memory of a process, sampled every 50 ms from /proc (peak since the last `reset`)."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self.samples = pid, 0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def rss_mb(self) -> float:
        try:
            status = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:  # the process has ended
            return 0.0
        return next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS")), 0) / 1024  # 0: a zombie

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.rss_mb())

    def reset(self) -> None:
        self.peak = self.rss_mb()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def post_photo(url: str, photo: Path) -> tuple[int, float, int]:
    """One caption request as the page sends it: (status, seconds, the batch it was decoded in)."""
    import http.client
    from urllib.parse import urlparse

    boundary = uuid.uuid4().hex
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="overlays"\r\n\r\n1\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{photo.name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n").encode() + photo.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    address = urlparse(url)
    started = time.perf_counter()
    conn = http.client.HTTPConnection(address.hostname, address.port, timeout=600)
    try:
        conn.request("POST", "/api/caption", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
        response = conn.getresponse()
        answer = json.loads(response.read())
    finally:
        conn.close()
    return response.status, time.perf_counter() - started, answer.get("batch", 0)


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]  # nearest rank


def load_server(checkpoint: str, photos: list[Path], clients: int, per_client: int, rounds: int) -> dict:
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}  # as omp_env.py does
    started = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "satkit.serve", "--checkpoint", checkpoint, "--port", "0",
                               "--quiet"], cwd=ROOT, stdout=subprocess.PIPE, env=env)
    line = server.stdout.readline().decode()
    if " on http://" not in line:
        server.kill()
        raise SystemExit(f"the server did not start: {line!r}")
    url = "http://" + line.split(" on http://", 1)[1].split()[0]
    ready = time.perf_counter() - started
    rss = RssSampler(server.pid)
    idle_mb = rss.rss_mb()
    results = []
    for _ in range(rounds):
        rss.reset()
        jobs = [[photos[(c * per_client + k) % len(photos)] for k in range(per_client)] for c in range(clients)]
        began = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            answers = [a for done in pool.map(lambda mine: [post_photo(url, p) for p in mine], jobs) for a in done]
        wall = time.perf_counter() - began
        latencies = [seconds for _, seconds, _ in answers]
        results.append({"requests": len(answers), "ok": sum(status == 200 for status, _, _ in answers),
                        "wall_s": wall, "images_per_s": len(answers) / wall, "p50_s": percentile(latencies, 50),
                        "p95_s": percentile(latencies, 95), "max_batch": max(b for _, _, b in answers),
                        "peak_rss_mb": rss.peak})
    hwm = next(int(line.split()[1]) for line in Path(f"/proc/{server.pid}/status").read_text().splitlines()
               if line.startswith("VmHWM")) / 1024
    server.send_signal(signal.SIGTERM)
    code = server.wait(timeout=300)
    rss.stop()
    return {"ready_s": ready, "idle_rss_mb": idle_mb, "rounds": results, "hwm_mb": hwm, "exit_code": code}


def caption_py(checkpoint: str, photos: list[Path]) -> dict:
    """caption.py on the photos: the command's whole run, as a user times it."""
    with tempfile.TemporaryDirectory(prefix="serve_load_") as out:
        started = time.perf_counter()
        child = subprocess.Popen([sys.executable, "caption.py", "--img", *map(str, photos), "--checkpoint", checkpoint,
                                  "--out-dir", out, "--device", "cpu"], cwd=ROOT, stdout=subprocess.DEVNULL)
        rss = RssSampler(child.pid)
        code = child.wait()
        wall = time.perf_counter() - started
        rss.stop()
    return {"wall_s": wall, "images_per_s": len(photos) / wall, "peak_rss_mb": rss.peak, "exit_code": code}


def library_batch(checkpoint: str, photos: list[Path]) -> dict:
    """Captioner (the library caption.py and the server call), batch 32: read and decode only."""
    import torch

    from satkit.captioner import Captioner

    captioner = Captioner.from_checkpoint(checkpoint, device="cpu")
    started = time.perf_counter()
    captioner(photos)
    wall = time.perf_counter() - started
    return {"wall_s": wall, "images_per_s": len(photos) / wall, "threads": torch.get_num_threads()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="runs/flickr8k_lite/best.pt")
    parser.add_argument("--photos", nargs="*", default=[], help="files or folders (default: Flickr8k test photos)")
    parser.add_argument("--flickr8k", type=Path, default=FLICKR8K, help="where the default photos come from")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--per-client", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2, help="rounds of load: memory must not grow between them")
    args = parser.parse_args(argv)
    from satkit.captioner import collect_images

    count = args.clients * args.per_client
    photos = collect_images(args.photos)[0] if args.photos else flickr8k_test_photos(args.flickr8k, count)
    load_before = os.getloadavg()
    print(f"{date.today()}  {cpu_line()}  load average {load_before[0]:.1f} at the start")
    print(f"checkpoint {args.checkpoint}, {len(photos)} photos, {args.clients} clients x {args.per_client} requests")
    served = load_server(args.checkpoint, photos, args.clients, args.per_client, args.rounds)
    command = caption_py(args.checkpoint, photos)
    library = library_batch(args.checkpoint, photos)
    print(f"\nserver: ready in {served['ready_s']:.1f} s (cold start, warm-up included), "
          f"RSS {served['idle_rss_mb']:.0f} MiB idle, peak {served['hwm_mb']:.0f} MiB (VmHWM); "
          f"SIGTERM -> exit code {served['exit_code']}")
    print("| run | requests answered | wall s | images/s | p50 s | p95 s | largest batch | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for n, r in enumerate(served["rounds"], start=1):
        print(f"| server, round {n} | {r['ok']}/{r['requests']} | {r['wall_s']:.1f} | {r['images_per_s']:.2f} | "
              f"{r['p50_s']:.2f} | {r['p95_s']:.2f} | {r['max_batch']} | {r['peak_rss_mb']:.0f} |")
    print(f"| caption.py (start, decode, PNG+GIF figures) | {len(photos)} images, exit {command['exit_code']} | "
          f"{command['wall_s']:.1f} | {command['images_per_s']:.2f} | | | {min(32, len(photos))} | {command['peak_rss_mb']:.0f} |")
    print(f"| Captioner batch decode only ({library['threads']} threads) | {len(photos)} images | {library['wall_s']:.1f} | "
          f"{library['images_per_s']:.2f} | | | {min(32, len(photos))} | |")
    load_after = os.getloadavg()
    print(f"load average {load_after[0]:.1f} at the end (2 cores: above 2 means other work shared the CPU)")
    return 0 if all(r["ok"] == r["requests"] for r in served["rounds"]) and served["exit_code"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
