"""The aggregate tensor's op rules, by family (after DTensor's `_ops/`): importing this package
registers them all with the dispatcher."""

from ms_splatfacto.backend.aggregate.rules import pointwise, reductions, selection, sorting, views  # noqa: F401
