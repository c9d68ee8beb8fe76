"""deqfuse: fast deep-equilibrium and dynamic multimodal fusion layers for PyTorch."""
from ._version import __version__  # noqa: F401
from . import reference, solvers
from .backend import cpu_plan, extension_status, force_cpu_plan, set_triton_autotune, triton_status
from .cell import FusionCell
from .errors import ConvergenceError, ConvergenceWarning
from .dynamic import (ConcatGate, DEQHead, DepthGatedFusion, DynamicFusion, GumbelSchedule, MLPHead, PooledGate,
                      SubsetExpert, fit_gate)
from .implicit import autograd_vjp, implicit_grad, jacobian_reg, phantom_grad
from .layers import DEQFusion, DEQInfo
from .optim import param_groups
from .solvers import SolverStats, anderson, broyden, fixed_point

__all__ = ["DEQFusion", "DynamicFusion", "DepthGatedFusion", "SubsetExpert", "MLPHead", "DEQHead",
           "GumbelSchedule", "PooledGate", "ConcatGate", "fit_gate", "DEQInfo", "FusionCell", "SolverStats", "anderson", "broyden", "fixed_point",
           "implicit_grad", "autograd_vjp", "jacobian_reg", "phantom_grad", "reference", "solvers",
           "extension_status", "triton_status", "cpu_plan", "force_cpu_plan", "set_triton_autotune", "param_groups", "ConvergenceWarning", "ConvergenceError"]


def _load_extension():
    """Load the compiled ops at import (~10 ms): their FLOP formulas and fake kernels must be registered before
    a FlopCounterMode or torch.compile first sees them. A bad DEQFUSE_* value is reported at first use."""
    try:
        extension_status()
    except ValueError:
        pass


_load_extension()
