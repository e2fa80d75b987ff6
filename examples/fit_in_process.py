"""Fit in process (CPU, or one GPU when present), look at the result, save it and plot convergence.

    python examples/fit_in_process.py [history.png]
"""
import sys

import numpy as np

from flashkm_dist import KMeans
from flashkm_dist.demo import make_blobs
from flashkm_dist.plotting import plot_history

x, truth, _ = make_blobs(50_000, 16, 10, seed=1)
model = KMeans(10, init="k-means++", random_state=0, verbose=1).fit(x)
print(f"{model.n_iter_} iterations, inertia {model.inertia_:.6g}")
print("cluster sizes:", np.bincount(model.labels_))
model.save("model.npz")
print("reloaded model agrees:", bool((KMeans.load("model.npz").predict(x) == model.labels_).all()))
if len(sys.argv) > 1:
    plot_history(model.history_, sys.argv[1])
    print("wrote", sys.argv[1])
