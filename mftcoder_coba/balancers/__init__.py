"""Task-weighting balancers: CoBa (``docs/coba.md``) and the baselines it is judged against.

Pick one by name with :func:`build_balancer` (``balancer.name`` / ``balancer.options`` in the run
config); read its :class:`Needs` to know what to feed it. Importing this package registers every method.
"""
from mftcoder_coba.balancers.base import BALANCERS, Balancer, Needs, build_balancer
from mftcoder_coba.balancers.coba import CoBa
from mftcoder_coba.balancers.dwa import DWA
from mftcoder_coba.balancers.famo import FAMO
from mftcoder_coba.balancers.gradnorm import GradNorm
from mftcoder_coba.balancers.lbtw import LBTW
from mftcoder_coba.balancers.static import Static
from mftcoder_coba.balancers.uncertainty import Uncertainty
from mftcoder_coba.balancers.uniform import Uniform

__all__ = ["BALANCERS", "Balancer", "Needs", "build_balancer", "CoBa", "DWA", "FAMO", "GradNorm", "LBTW",
           "Static", "Uncertainty", "Uniform"]
