"""The reference's spectrogram chain in numpy/scipy, as the Python project computes it (full
511x511 complex log-DFT matrix times the windowed frames, then dB, uint8, tiling, PNG), on the
same input as runtime/benches/preprocess.rs. Prints JSON lines like the Rust bench.

Needs numpy, scipy, pillow (benchmark only; not a test dependency).
"""
import json, os, sys, tempfile, time

import numpy as np
from scipy.signal import decimate
from PIL import Image

REPEAT = 20
N, R, HOP, NSAMPS = 511, 256, 172, 2048
MIN_DB, MAX_DB = -127.028, -44.068


def log_dftmtx(n):
    e = np.linspace(np.log10(0.5), -3, n // 2)
    neg = -(10.0 ** e)
    freqs = np.concatenate([neg, [0.0], -neg[::-1]])
    omega = np.exp(-2j * np.pi / n)
    return omega ** np.outer(np.fft.ifftshift(freqs) * n, np.arange(n)) / np.sqrt(n)


W = log_dftmtx(N)
WIN = np.hanning(N)


def stft(x):
    dc = x.sum() / np.sqrt(len(x))
    x = x - x.mean()
    x = np.concatenate([x, np.zeros(N - len(x) % HOP)])
    frames = np.lib.stride_tricks.sliding_window_view(x, N)[::HOP][: NSAMPS // HOP + 1] * WIN
    X = W @ frames.T
    X[0, :] = dc
    Xr = X[:R].copy()
    Xr[1:] += np.conj(X[: R - 1 : -1])  # fold the negative-frequency rows in, as fft2rfft
    return Xr


def image(block):
    img = np.zeros((R, R), np.uint8)
    for c, x in enumerate(block):
        db = np.clip(20 * np.log10(np.abs(stft(x)) + 1e-9), MIN_DB, MAX_DB)
        u8 = ((db - MIN_DB) / (MAX_DB - MIN_DB) * 255).astype(np.uint8)[::-1]
        img[:, 8 + 12 * c : 8 + 12 * (c + 1)] = u8
    return img


def median_seconds(run):
    """The median wall time of 5 runs, as the Rust bench measures."""
    times = []
    for _ in range(5):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return sorted(times)[2]


def main(fixture):
    rec = np.load(fixture)
    windows = [rec[:, w * 1024 : w * 1024 + NSAMPS] for w in range(6)] * REPEAT
    out = tempfile.mkdtemp()
    for png in (False, True):
        def run():
            for i, w in enumerate(windows):
                img = image(w)
                if png:
                    Image.fromarray(img, "L").save(os.path.join(out, f"{i}.png"))
        secs = median_seconds(run)
        print(json.dumps({"impl": "numpy", "what": "db-only windows/s", "threads": "numpy default", "png": png, "value": round(len(windows) / secs, 1)}))
    long = np.sin(np.arange(300_000) * 0.01) + np.cos(np.arange(300_000) * 0.37)
    secs = median_seconds(lambda: [decimate(long, 4, zero_phase=True) for _ in range(10)])
    print(json.dumps({"impl": "scipy", "what": "decimation M input samples/s", "threads": 1, "png": False, "value": round(10 * len(long) / secs / 1e6, 1)}))
    channels = np.stack([long[:150_000] * (1 + c * 0.01) for c in range(20)])
    secs = median_seconds(lambda: decimate(channels, 4, axis=1, zero_phase=True))
    print(json.dumps({"impl": "scipy", "what": "decimation of 20 channels M input samples/s", "threads": 1, "png": False, "value": round(20 * 150_000 / secs / 1e6, 1)}))


if __name__ == "__main__":
    main(sys.argv[1])
