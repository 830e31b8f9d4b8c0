"""Entry points (`python -m experiments.<name> --gin ...`), benchmarks and gin configs.

Importing the package first keeps XLA:CPU's per-step host buffers mapped between steps
(`experiments.host_memory`); it must run before numpy or JAX start threads.
"""

from experiments.host_memory import keep_host_memory

keep_host_memory()
