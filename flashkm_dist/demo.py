"""The demo fit: synthetic blobs with known centres, clustered, and a short report of what was found."""
from __future__ import annotations

import argparse
import time

import numpy as np
from sklearn.metrics import adjusted_rand_score

from flashkm_dist import KMeans


def make_blobs(n_samples: int, n_features: int, n_centers: int, seed: int, spread: float = 1.0):
    """Gaussian blobs around centres drawn in a box of side 20 * spread: data with a known answer."""
    rng = np.random.default_rng(seed)
    centers = rng.uniform(-10 * spread, 10 * spread, size=(n_centers, n_features)).astype(np.float32)
    truth = rng.integers(0, n_centers, size=n_samples)
    x = centers[truth] + rng.standard_normal((n_samples, n_features), dtype=np.float32) * 0.5 * spread
    return x, truth, centers


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="flashkm_dist demo: exact k-means on synthetic blobs")
    parser.add_argument("--n-samples", type=int, default=200_000)
    parser.add_argument("--n-features", type=int, default=32)
    parser.add_argument("--n-clusters", type=int, default=16)
    parser.add_argument("--init", default="k-means||")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", metavar="PNG", help="also plot the convergence history to this file")
    args = parser.parse_args(argv)

    x, truth, true_centers = make_blobs(args.n_samples, args.n_features, args.n_clusters, args.seed)
    print(f"data: {x.shape[0]:,} points x {x.shape[1]} features (float32), {args.n_clusters} true blobs")
    t0 = time.perf_counter()
    model = KMeans(args.n_clusters, init=args.init, random_state=args.seed, device=args.device).fit(x)
    seconds = time.perf_counter() - t0
    ari = adjusted_rand_score(truth, model.labels_)
    gaps = np.linalg.norm(model.cluster_centers_[:, None, :] - true_centers[None], axis=2).min(axis=1)
    sizes = np.bincount(model.labels_, minlength=args.n_clusters)
    print(f"fit: init={args.init}, {model.n_iter_} iterations in {seconds:.2f} s on device '{args.device}'")
    print(f"inertia: {model.inertia_:.6g}")
    print(f"agreement with the true blobs: adjusted Rand index {ari:.4f}")
    print(f"found centre to nearest true centre: median {np.median(gaps):.4f}, max {gaps.max():.4f}")
    print(f"cluster sizes: min {sizes.min():,}, max {sizes.max():,}")
    if args.plot:
        from flashkm_dist.plotting import plot_history
        plot_history(model.history_, args.plot)
        print(f"convergence plot: {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
