import os as _os
import sys as _sys

# OpenMP threads that spin at barriers while another job holds a core made a 2-thread step 5.8x slower
# (benchmarks/under_load.py); passive threads sleep instead. The OpenMP runtime reads this once, when
# torch loads it, so it counts where this package is imported before torch (our scripts, tests and
# every process they start); an explicit setting is kept. See backend/threads.py.
WAIT_POLICY_APPLIED = "OMP_WAIT_POLICY" in _os.environ or "torch" not in _sys.modules
"""Whether the OpenMP runtime started with the environment's OMP_WAIT_POLICY (not loaded before us)."""
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
