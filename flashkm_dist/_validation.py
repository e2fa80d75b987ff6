"""Input checks and conversions: NumPy / array-likes go through scikit-learn's own validation (its messages, its
feature-name handling); torch and CuPy arrays are checked here with the same messages and never leave their device."""
from __future__ import annotations

import numbers
import warnings

import numpy as np
import torch

try:  # scikit-learn >= 1.6
    from sklearn.utils.validation import validate_data
except ImportError:  # older releases: the same checks as an estimator method
    def validate_data(estimator, X, **kwargs):
        return estimator._validate_data(X, **kwargs)

_DTYPES = {
    "float16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
    "float": torch.float32, "float64": torch.float64, "double": torch.float64,
}
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def parse_dtype(dtype) -> torch.dtype | None:
    """None, a name, a NumPy dtype or a torch floating dtype -> torch dtype."""
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in FLOAT_DTYPES:
        return dtype
    name = dtype if isinstance(dtype, str) else getattr(np.dtype(dtype), "name", None) \
        if not isinstance(dtype, torch.dtype) else None
    if name not in _DTYPES:
        raise ValueError(f"dtype must be None or one of float16, bfloat16, float32, float64; got {dtype!r}")
    return _DTYPES[name]


def parse_device(device, data_device: torch.device | None) -> torch.device:
    """'auto' follows the data (a CUDA tensor stays on its GPU), else the first GPU if there is one."""
    if device == "auto":
        if data_device is not None and data_device.type == "cuda":
            return data_device
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N'; got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N'; got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was asked for but CUDA is not available on this machine")
    return dev


def array_kind(X) -> str:
    if torch.is_tensor(X):
        return "torch"
    if type(X).__module__.split(".")[0] == "cupy":
        return "cupy"
    return "numpy"


def _check_tensor(X: torch.Tensor, estimator, reset: bool) -> torch.Tensor:
    if X.is_complex():
        raise ValueError("Complex data not supported")
    if X.dim() != 2:
        raise ValueError(f"Expected 2D array, got {X.dim()}D array instead (shape {tuple(X.shape)})")
    if X.shape[0] < 1:
        raise ValueError(f"Found array with 0 sample(s) (shape={tuple(X.shape)}) while a minimum of 1 is required.")
    if X.shape[1] < 1:
        raise ValueError(f"Found array with 0 feature(s) (shape={tuple(X.shape)}) while a minimum of 1 is required.")
    if X.is_floating_point() and not bool(torch.isfinite(X).all()):
        raise ValueError("Input X contains NaN or infinity.")
    if reset:
        estimator.n_features_in_ = X.shape[1]
        if hasattr(estimator, "feature_names_in_"):
            del estimator.feature_names_in_
    elif X.shape[1] != estimator.n_features_in_:
        raise ValueError(f"X has {X.shape[1]} features, but {type(estimator).__name__} is expecting "
                         f"{estimator.n_features_in_} features as input.")
    return X


def _numpy_to_tensor(arr: np.ndarray) -> torch.Tensor:
    """A view where torch can take one (no copy of large or memory-mapped data)."""
    if any(stride < 0 for stride in arr.strides):
        arr = np.ascontiguousarray(arr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only arrays: x is never written to
        return torch.from_numpy(arr)


def to_tensor(estimator, X, *, reset: bool, device, dtype, keep_on_host: bool = False):
    """Validated 2-D tensor in the compute dtype, on the compute device (or, with keep_on_host, left on the host
    for the engine to stream), the input's kind for the outputs, and the compute device."""
    kind = array_kind(X)
    if kind == "cupy":
        X = torch.from_dlpack(X)
    if kind == "numpy":
        arr = validate_data(estimator, X, reset=reset, dtype=[np.float64, np.float32, np.float16],
                            accept_sparse=False, copy=False)
        t = _numpy_to_tensor(arr)
    else:
        t = _check_tensor(X, estimator, reset)
    target = parse_dtype(dtype) or (t.dtype if t.dtype in FLOAT_DTYPES else torch.float64)
    dev = parse_device(device, t.device)
    if keep_on_host and t.device.type == "cpu":
        return t.to(dtype=target), kind, dev
    return t.to(device=dev, dtype=target), kind, dev


def check_sample_weight(sample_weight, n_samples: int, device) -> torch.Tensor | None:
    """None stays None (unit weights, the fast path); otherwise float64 (N,) that is finite, >= 0, not all 0."""
    if sample_weight is None:
        return None
    if isinstance(sample_weight, numbers.Number):
        w = torch.full((n_samples,), float(sample_weight), dtype=torch.float64)
    else:
        w = torch.from_dlpack(sample_weight) if array_kind(sample_weight) == "cupy" else sample_weight
        w = w.detach() if torch.is_tensor(w) else torch.as_tensor(np.asarray(w, dtype=np.float64))
        if w.is_complex() or w.dim() != 1:
            raise ValueError(f"sample_weight must be a real 1-D array, got shape {tuple(w.shape)}")
        w = w.to(torch.float64)
    if w.shape[0] != n_samples:
        raise ValueError(f"sample_weight has {w.shape[0]} entries but X has {n_samples} samples; "
                         "the lengths must match")
    if not bool(torch.isfinite(w).all()):
        raise ValueError("sample_weight contains NaN or infinity")
    if bool((w < 0).any()):
        raise ValueError("sample_weight must be non-negative")
    if not bool((w > 0).any()):
        raise ValueError("sample_weight must have at least one positive entry (all weights are zero)")
    return w.to(device)


def host_numpy(t: torch.Tensor) -> np.ndarray:
    """NumPy copy on the host; bfloat16, which NumPy lacks, as float32 (exact)."""
    t = t.detach().cpu()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()
