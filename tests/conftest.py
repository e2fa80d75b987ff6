"""Test-session set-up. Triton decides interpreted-or-compiled when a kernel is decorated, so the interpreter is
chosen here, before any test module imports triton: Triton kernels then run on CPU tensors (no GPU in CI)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
