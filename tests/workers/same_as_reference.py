"""The workers' one comparison: a mesh's loss and gradients against the first (single-device) run's."""

import jax
import numpy as np


def same_as_reference(name, loss, grads, ref, grad_atol: float = 1e-6):
    """Returns `ref`, or `(loss, grads)` as the reference when `ref` is None. Loss within 1e-5 relative; each
    gradient within 1e-5 relative plus `grad_atol` of its largest magnitude."""
    loss, grads = float(loss), jax.tree.map(np.asarray, grads)
    if ref is None:
        return loss, grads
    assert abs(loss - ref[0]) <= 1e-5 * abs(ref[0]), (name, loss, ref[0])
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref[1])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=grad_atol * np.abs(b).max(), err_msg=name)
    return ref
