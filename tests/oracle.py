"""Float64 NumPy oracle and the numerics contract's near-tie test, shared by the test modules."""
import numpy as np


def sq_dists(x, c):
    x = np.asarray(x, dtype=np.float64)
    c = np.asarray(c, dtype=np.float64)
    return ((x[:, None, :] - c[None, :, :]) ** 2).sum(-1)


def assert_labels_exact(x, c, labels, rel=1e-5):
    """A label may differ from the float64 argmin only at a true near-tie:
    d(x, c_label) - d(x, c_best) <= rel * (|x - mu|^2 + |c_best - mu|^2), mu the data mean."""
    x = np.asarray(x, dtype=np.float64)
    c = np.asarray(c, dtype=np.float64)
    labels = np.asarray(labels)
    d = sq_dists(x, c)
    best = d.argmin(1)
    mu = x.mean(0)
    rows = np.arange(len(x))
    slack = d[rows, labels] - d[rows, best]
    bound = rel * (((x - mu) ** 2).sum(1) + ((c[best] - mu) ** 2).sum(1))
    bad = np.flatnonzero(slack > bound)
    assert bad.size == 0, f"{bad.size} labels are not exact, e.g. row {bad[:5]}: {slack[bad[:5]]} > {bound[bad[:5]]}"
    return d


def cos_dists(x, c):
    x = np.asarray(x, np.float64)
    c = np.asarray(c, np.float64)
    xn = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-300)
    cn = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-300)
    return 1.0 - xn @ cn.T
