"""The aggregate device: several members (GPUs, or virtual members on the CPU) as one PyTorch device.

    x = aggregate(torch.randn(1000, 3), "cpu:4")   # rows striped over 4 members
    p = parameter(torch.zeros(1000, 3), "cpu:4")   # an nn.Parameter whose data is aggregate
    to_plain(x)                                    # an ordinary tensor, rows in global order
    fallback_counts(), exchange_counts()           # ops without a rule; bytes per (src, dst) member
"""

from ms_splatfacto.backend.aggregate import rules  # noqa: F401  (registers the op rules)
from ms_splatfacto.backend.aggregate.dispatch import fallback_counts, has_rule, register, reset_fallback_counts
from ms_splatfacto.backend.aggregate.exchange import exchange_counts, exchange_totals, reset_exchange, wire_totals
from ms_splatfacto.backend.aggregate.layout import Layout, even_layout
from ms_splatfacto.backend.aggregate.members import Members, members
from ms_splatfacto.backend.aggregate.storage import Storage, register_storage
from ms_splatfacto.backend.aggregate.tensor import (
    AggregateTensor,
    aggregate,
    is_aggregate,
    parameter,
    per_member_execution,
    restripe_optimizer_state,
    to_plain,
)

__all__ = [
    "AggregateTensor", "Layout", "Members", "Storage", "aggregate", "even_layout", "exchange_counts", "exchange_totals",
    "fallback_counts", "has_rule", "is_aggregate", "members", "parameter", "per_member_execution",
    "register", "register_storage", "reset_exchange", "reset_fallback_counts", "restripe_optimizer_state",
    "to_plain", "wire_totals",
]
