"""Triton kernels, one module per hot path (installed as ``udafast.kernels``).

``LAUNCHERS`` maps an op name of ``udafast.ops`` to its Triton launcher; ``backend="triton"``
raises for an op that has none yet.
"""

LAUNCHERS = {}
