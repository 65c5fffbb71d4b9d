"""Which dimensions are coupled: a model's graph, traced once, turned into named unit groups."""

from adaptnet.groups._graph import output_tensors
from adaptnet.groups.tracing import (
    Trace,
    ensure_traced,
    find_group,
    inputs_for,
    macs,
    structure_key,
    trace,
    unit_groups,
    verify_group,
    verify_one_unit,
    widths,
)

__all__ = [
    "Trace",
    "ensure_traced",
    "find_group",
    "inputs_for",
    "macs",
    "output_tensors",
    "structure_key",
    "trace",
    "unit_groups",
    "verify_group",
    "verify_one_unit",
    "widths",
]
